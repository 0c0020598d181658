"""LM head + loss, forward + backward: peak extra memory and time of
    ce            F.cross_entropy on the full [N, V] logits (what plain SFT does)
    atkd          our unfused ATKD: LM head -> [N, V] logits -> kd_loss (streams a buffer)
    atkd-fused    the fused LM head + ATKD (losses/fused.py): no [N, V] logits
    kd-fused      the fused LM head + bucketed forward KL
    xt-alm, xt-gold              a student of another tokenizer (losses/crosstok.py): the
                                 chunk losses over the [N, V] logits ...
    xt-alm-fused, xt-gold-fused  ... and through the fused head (fused_crosstok_loss);
                                 a chunk every ~1.4 rows, GOLD's support 20 % unmatched
    liger-jsd     Liger-Kernel's LigerFusedLinearJSD (an online teacher's hidden states and
                  head), if it runs here: on these CPUs it does not (Triton has no CPU
                  driver: "0 active drivers"), and it is skipped with that line
at V in {49,152, 128,256, 151,936}, H in {576, 2,048}, N in {4,096, 16,384} supervised rows,
teacher top-32 (fp16 log-probs as in a cache), float32 on the CPU.

Each (variant, V, H, N) runs in a fresh process: inputs are built, the process's RSS noted,
then one forward + backward is timed and the peak RSS minus that baseline is the extra memory
(the head's weight gradient included: every variant needs it). A variant that would not fit
in this machine's memory is skipped (estimated from [N, V] float32 tensors) and marked so.
Results go to --out (JSON), one entry per measurement, and a re-run skips what is there, so
the whole grid can be measured over several sessions.

    python benchmarks/bench_fused.py [--v 49152,151936] [--h 576] [--n 4096] [--out ...]
    python benchmarks/bench_fused.py --step --v 151936 --h 576   # whole steps, see step_ladder
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

VARIANTS = ("ce", "atkd", "atkd-fused", "kd-fused", "liger-jsd")
CROSSTOK = ("xt-alm", "xt-alm-fused", "xt-gold", "xt-gold-fused")  # (--variants to run them)
K = 32


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inputs(v: int, h: int, n: int):
    from atkd_cache.losses import SparseTeacher

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    # a peaked teacher over K ids (the target among them at ~80 % of rows, as measured)
    ids = torch.randint(0, v, (n, K), generator=g)
    ids[: int(0.8 * n), 0] = targets[: int(0.8 * n)]
    logp = torch.log_softmax(torch.randn(n, K, generator=g) * 2, -1) - 0.15
    logp, order = logp.sort(-1, descending=True)
    target_lp = torch.where(ids[:, 0] == targets, logp[:, 0], torch.full((n,), -8.0))
    teacher = SparseTeacher(topk_ids=ids.gather(1, order), topk_logprobs=logp.half(),
                            target_ids=targets, target_logprob=target_lp,
                            hard=torch.rand(n, generator=g) < 0.5)
    return hidden, weight, teacher


def chunk_inputs(teacher, v: int):
    """A cross-tokenizer batch over the same rows: chunks of 1-2 student rows (a new chunk
    at ~70 % of rows), the teacher's support (target + top-k) at each chunk's first row
    mapped to student ids, 20 % of them to none."""
    from atkd_cache.losses.bucket import support_columns
    from atkd_cache.losses.crosstok import ChunkTeacher

    g = torch.Generator().manual_seed(1)
    n = teacher.target_ids.shape[0]
    starts = torch.rand(n, generator=g) < 0.7
    starts[0] = True
    chunk_of_row = starts.long().cumsum(0) - 1
    first_row = starts.nonzero()[:, 0]
    ids, valid = support_columns(teacher.topk_ids[first_row], teacher.target_ids[first_row])
    lp = torch.cat([teacher.target_logprob[first_row, None],
                    teacher.topk_logprobs[first_row].float()], 1)
    sids = torch.randint(0, v, ids.shape, generator=g)
    sids[torch.rand(ids.shape, generator=g) < 0.2] = -1
    c = first_row.numel()
    return ChunkTeacher(target_ids=teacher.target_ids, chunk_of_row=chunk_of_row,
                        teacher_ll=-torch.rand(c, generator=g) * 2, first_row=first_row,
                        support_logprobs=lp, support_valid=valid, support_student_ids=sids)


def run_one(variant: str, v: int, h: int, n: int) -> dict:
    from atkd_cache.losses import LossConfig, kd_loss
    from atkd_cache.losses.fused import fused_kd_loss

    hidden, weight, teacher = inputs(v, h, n)
    chunks = chunk_inputs(teacher, v) if variant.startswith("xt-") else None
    if variant == "liger-jsd":  # an online teacher's hidden states and head, as Liger takes
        from liger_kernel.transformers import LigerFusedLinearJSD

        teacher_h, teacher_w = hidden.detach().clone(), weight.detach().clone()
    base = rss_mb()
    t0 = time.perf_counter()
    if variant == "ce":
        logits = hidden @ weight.T
        loss = torch.nn.functional.cross_entropy(logits, teacher.target_ids)
    elif variant == "atkd":
        loss = kd_loss(hidden @ weight.T, teacher, LossConfig(loss="atkd")).loss
    elif variant in ("atkd-fused", "kd-fused"):
        cfg = LossConfig(loss=variant.removesuffix("-fused"))
        loss = fused_kd_loss(hidden, weight, teacher, cfg).loss
    elif variant.startswith("xt-"):
        from atkd_cache.losses.crosstok import crosstok_loss
        from atkd_cache.losses.fused import fused_crosstok_loss

        cfg = LossConfig(cross_tokenizer=variant.split("-")[1])
        if variant.endswith("-fused"):
            loss = fused_crosstok_loss(hidden, weight, chunks, cfg).loss
        else:
            loss = crosstok_loss(hidden @ weight.T, chunks, cfg).loss
    elif variant == "liger-jsd":
        loss = LigerFusedLinearJSD()(hidden, weight, teacher_h, teacher_w, None)
    else:
        raise SystemExit(f"unknown variant {variant}")
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"variant": variant, "V": v, "H": h, "N": n, "seconds": seconds,
            "extra_mb": peak_mb() - base, "loss": float(loss.detach())}


def train_step(fused: bool, tokens: int, v: int, h: int) -> dict:
    """One whole train-student step (forward, loss, backward, AdamW; the same
    accumulate_gradients train-student runs) of a 2-layer student with a V-wide tied head,
    on one micro-batch of `tokens` supervised tokens (rows of 1,024) and a top-32 teacher."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from atkd_cache.losses import LossConfig
    from atkd_cache.train.student import RowLogits
    from atkd_cache.train.trainer import Dist, accumulate_gradients

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=v, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        max_position_embeddings=1024))
    net = RowLogits(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows_per_seq = 1024
    b = tokens // rows_per_seq
    _, _, teacher = inputs(v, 8, b * (rows_per_seq - 1))
    batch = {"input_ids": torch.randint(0, v, (b, rows_per_seq)),
             "attention_mask": torch.ones(b, rows_per_seq, dtype=torch.long),
             "rows": (torch.arange(b)[:, None] * rows_per_seq
                      + torch.arange(rows_per_seq - 1)[None]).reshape(-1),
             "group_offsets": torch.arange(b + 1) * (rows_per_seq - 1),
             "target_ids": teacher.target_ids, "target_logprob": teacher.target_logprob,
             "topk_ids": teacher.topk_ids.int(), "topk_logprobs": teacher.topk_logprobs,
             "hard": teacher.hard, "uncertainty": -torch.expm1(teacher.target_logprob),
             "entropy": torch.zeros(b * (rows_per_seq - 1))}
    base = rss_mb()
    t0 = time.perf_counter()
    n = float(batch["rows"].numel())
    accumulate_gradients(net, [batch], LossConfig(loss="atkd"), Dist(), n, fused=fused)
    opt.step()
    return {"fused": fused, "tokens": tokens, "V": v, "H": h,
            "seconds": time.perf_counter() - t0, "extra_mb": peak_mb() - base,
            "peak_rss_mb": peak_mb()}


def step_ladder(v: int, h: int, out: str) -> None:
    """The largest micro-batch (tokens, doubling from 2,048) one train-student step fits in
    this machine's memory, unfused vs fused; a step that is killed or fails ends a ladder."""
    done = json.load(open(out)) if os.path.exists(out) else []
    fitted = {False: 0, True: 0}
    for fused in (False, True):
        tokens = 2048
        # the fused ladder stops at 4x what fitted unfused: enough for the claim, and each
        # doubling doubles a CPU step that already takes minutes
        limit = 65536 if not fused else max(2048, 4 * fitted[False])
        while True:
            key = {"fused": fused, "tokens": tokens, "V": v, "H": h}
            row = next((r for r in done if all(r.get(k) == x for k, x in key.items())), None)
            if row is None:
                r = subprocess.run([sys.executable, __file__, "--step-one", str(int(fused)),
                                    str(tokens), str(v), str(h)], capture_output=True, text=True)
                if r.returncode == 0:
                    row = json.loads(r.stdout.strip().splitlines()[-1])
                else:
                    why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
                    row = {**key, "failed": f"exit {r.returncode}: {why[:150]}"}
                done.append(row)
                with open(out, "w") as f:
                    json.dump(done, f, indent=1)
            print(row, flush=True)
            if "failed" in row:
                break
            fitted[fused] = tokens
            if tokens >= limit:
                break
            tokens *= 2
    print(f"largest micro-batch that fits: unfused {fitted[False]} tokens, fused at least "
          f"{fitted[True]} ({fitted[True] / max(1, fitted[False]):.0f}x)")


def fits(variant: str, v: int, n: int, budget_gb: float) -> bool:
    """Rough: the unfused variants hold ~3 [N, V] float32 tensors at their peak."""
    if variant.endswith("fused"):
        return True
    return 3 * n * v * 4 / 2**30 < budget_gb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--v", default="49152,128256,151936")
    ap.add_argument("--h", default="576,2048")
    ap.add_argument("--n", default="4096,16384")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget-gb", type=float, default=18.0,
                    help="Skip unfused variants whose [N, V] tensors would not fit.")
    ap.add_argument("--out", default="runs/bench/fused.json")
    ap.add_argument("--repeats", type=int, default=3, help="Fresh processes per cell.")
    ap.add_argument("--report", action="store_true",
                    help="Only print the tables of --out (measures nothing).")
    ap.add_argument("--one", nargs=4, metavar=("VARIANT", "V", "H", "N"))
    ap.add_argument("--step", action="store_true",
                    help="Whole train-student steps: the largest micro-batch that fits, "
                         "unfused vs fused, at the first --v and --h.")
    ap.add_argument("--step-one", nargs=4, metavar=("FUSED", "TOKENS", "V", "H"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.step_one:
        fused, tokens, v, h = map(int, args.step_one)
        print(json.dumps(train_step(bool(fused), tokens, v, h)))
        return
    if args.step:
        step_ladder(int(args.v.split(",")[0]), int(args.h.split(",")[0]),
                    args.out.replace(".json", "-step.json"))
        return
    if args.one:
        variant, v, h, n = args.one
        print(json.dumps(run_one(variant, int(v), int(h), int(n))))
        return
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    done = json.load(open(args.out)) if os.path.exists(args.out) else []
    if args.report:
        args.n = ""  # nothing to measure
    seen = {(r["variant"], r["V"], r["H"], r["N"]) for r in done}
    for n in (int(x) for x in args.n.split(",") if x):
        for h in map(int, args.h.split(",")):
            for v in map(int, args.v.split(",")):
                for variant in args.variants.split(","):
                    if (variant, v, h, n) in seen:
                        continue
                    if not fits(variant, v, n, args.budget_gb):
                        row = {"variant": variant, "V": v, "H": h, "N": n,
                               "skipped": f"[N, V] tensors need > {args.budget_gb} GB"}
                    else:
                        row = measure(variant, v, h, n, args.repeats)
                    done.append(row)
                    with open(args.out, "w") as f:
                        json.dump(done, f, indent=1)
                    print(row, flush=True)
    table(done)
    if any(r["variant"].startswith("xt-") for r in done):
        print("\n" + crosstok_markdown(done))


def measure(variant: str, v: int, h: int, n: int, repeats: int) -> dict:
    """Median time and extra memory over `repeats` fresh processes (or why it did not run)."""
    runs = []
    for _ in range(repeats):
        r = subprocess.run([sys.executable, __file__, "--one", variant, str(v), str(h), str(n)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            return {"variant": variant, "V": v, "H": h, "N": n, "skipped": last[:200]}
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    mid = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]
    return {**mid, "extra_mb": statistics.median(x["extra_mb"] for x in runs),
            "seconds_all": [x["seconds"] for x in runs], "repeats": repeats}


def crosstok_markdown(rows: list[dict]) -> str:
    """docs/benchmarks.md's cross-tokenizer table: each chunk loss fused against itself over
    full logits and against cross-entropy (time, extra memory)."""
    by = {(r["V"], r["H"], r["N"], r["variant"]): r for r in rows if "skipped" not in r}
    out = ["| V | H | N | loss | head | s | × unfused | × CE | extra MB | × unfused | × CE |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (v, h, n, name), r in sorted(by.items()):
        if not name.startswith("xt-"):
            continue
        ce, plain = by.get((v, h, n, "ce")), by[(v, h, n, name.removesuffix("-fused"))]
        fused = name.endswith("-fused")

        def ratio(key, ref, r=r):
            return f"{r[key] / ref[key]:.2f}" if ref else "–"

        out.append(f"| {v:,} | {h:,} | {n:,} | {name.split('-')[1]} | "
                   f"{'fused' if fused else 'logits'} | {r['seconds']:.1f} | "
                   f"{ratio('seconds', plain)} | {ratio('seconds', ce)} | "
                   f"{r['extra_mb']:,.0f} | {ratio('extra_mb', plain)} | "
                   f"{ratio('extra_mb', ce)} |")
    said = []
    for (v, h, n, name), r in sorted(by.items()):
        plain = by.get((v, h, n, name.removesuffix("-fused")))
        if name.startswith("xt-") and name.endswith("-fused") and plain:
            said.append(f"{name.split('-')[1]} at V = {v:,}, H = {h:,}, N = {n:,}: extra memory "
                        f"{plain['extra_mb']:,.0f} → {r['extra_mb']:,.0f} MB "
                        f"({r['extra_mb'] / plain['extra_mb']:.2f}×), time "
                        f"{r['seconds'] / plain['seconds']:.2f}×")
    if said:
        out += ["", "Fused against the same loss over full logits: " + "; ".join(said) + "."]
    return "\n".join(out)


def table(rows: list[dict]) -> None:
    """Print time and extra memory per configuration, with ratios to cross-entropy."""
    by = {(r["V"], r["H"], r["N"]): {} for r in rows}
    for r in rows:
        by[(r["V"], r["H"], r["N"])][r["variant"]] = r
    print(f"\n{'V':>7} {'H':>5} {'N':>6} {'variant':>11} {'s':>8} {'x CE':>6} {'extra MB':>9} "
          f"{'x CE':>6}")
    for (v, h, n), cells in sorted(by.items()):
        ce = cells.get("ce", {})
        for name, r in cells.items():
            if "skipped" in r:
                print(f"{v:>7} {h:>5} {n:>6} {name:>11}  skipped: {r['skipped']}")
                continue
            ts = f"{r['seconds'] / ce['seconds']:6.2f}" if "seconds" in ce else "     -"
            ms = f"{r['extra_mb'] / ce['extra_mb']:6.3f}" if "extra_mb" in ce else "     -"
            print(f"{v:>7} {h:>5} {n:>6} {name:>11} {r['seconds']:8.2f} {ts} "
                  f"{r['extra_mb']:9.0f} {ms}")


if __name__ == "__main__":
    main()
