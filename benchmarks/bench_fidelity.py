"""Bytes/token against gradient fidelity for every cache mode and encoding (issue 6).

One teacher pass (SmolLM2-135M-Instruct, fp32) over chitchat text (every position
supervised) feeds, through the real CacheWriter, one cache per variant:
  top-k  k = 8/16/32/64 (standard and packed encodings; the first k columns of the top-64)
  sampled N = 12/50/100 (standard and packed; the first N of 100 seeded draws per position)
Then one fixed student (6 of the teacher's 30 layers, then 40 AdamW steps of plain
cross-entropy on other chitchat text: straight after truncation its NLL is 17, worse than
uniform, and its gradient is so dominated by its own wrong confidence that every teacher
looks alike) is run on batches of >= 4096 supervised tokens and, for each variant read back from
its cache, the gradient of the cached loss with respect to every student parameter is
compared with the gradient of the same loss over the full vocabulary (teacher log-probs
recomputed densely):
  forward KL  vs  full KL(p || q)
  ATKD (fkl)  vs  full ATKD (the formulas of DESIGN §3, dense)
The angle is reported per variant (mean over the batches), with "ce" (no teacher at all) as
the floor. Prints a table; writes JSON and a bytes-vs-angle plot.

    python benchmarks/bench_fidelity.py [--tokens 20000] [--batches 2] [--out docs/fidelity]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))

from assets import chitchat_sequences, chitchat_texts  # noqa: E402

from atkd_cache.assets import smollm2_folder  # noqa: E402
from atkd_cache.cache import open_cache  # noqa: E402
from atkd_cache.cache.writer import CacheWriter  # noqa: E402
from atkd_cache.data import DataSpec  # noqa: E402
from atkd_cache.dump import DumpConfig, build_card, length_batches, records_for_window  # noqa: E402
from atkd_cache.losses.kd import LossConfig, kd_loss  # noqa: E402
from atkd_cache.losses.sampled import log1mexp  # noqa: E402
from atkd_cache.models import load_causal_lm, load_tokenizer, logits_width  # noqa: E402
from atkd_cache.teacher.hf import split_samples, teacher_outputs  # noqa: E402
from atkd_cache.train.loader import collate  # noqa: E402
from atkd_cache.train.student import RowLogits, init_student  # noqa: E402
from atkd_cache.train.trainer import sparse_teacher  # noqa: E402

TOPK = (8, 16, 32, 64)
SAMPLES = (12, 50, 100)
ENCODINGS = ("standard", "packed")
ROW_CHUNK = 512


def variants() -> list[dict]:
    """Every cache written: mode, size parameter, encoding."""
    out = [{"mode": "topk", "k": k, "encoding": e} for k in TOPK for e in ENCODINGS]
    out += [{"mode": "sampled", "n": n, "encoding": e} for n in SAMPLES for e in ENCODINGS]
    return out


def name_of(v: dict) -> str:
    size = f"k={v['k']}" if v["mode"] == "topk" else f"N={v['n']}"
    return f"{v['mode']} {size} {v['encoding']}"


def teacher_pass(model, seqs, batch_tokens):
    """Per sequence: the top-64 outputs and 100 draws per position (draws kept raw)."""
    out = {}
    for batch in length_batches([len(s.input_ids) for s in seqs], None, batch_tokens):
        group = [seqs[i] for i in batch]
        outs = teacher_outputs(model, group, max(TOPK), num_samples=max(SAMPLES),
                               keep_draws=True)
        out.update(zip(batch, outs, strict=True))
    return out


def write_caches(outputs, seqs, folder, tok, width, workdir) -> dict[str, dict]:
    """Write every variant's cache; return name -> {path, bytes_per_token, per_array}."""
    base = DumpConfig(model=folder, data=DataSpec("chitchat-dataset", text_field="text"),
                      output="")
    result = {}
    for v in variants():
        cfg = replace(base, mode=v["mode"], encoding=v["encoding"], top_k=v.get("k", 32),
                      num_samples=v.get("n", 50))
        per_seq = []
        for i in range(len(seqs)):
            o = {key: outputs[i][key] for key in ("target_logprob", "entropy", "uncertainty")}
            if v["mode"] == "topk":
                o.update(topk_ids=outputs[i]["topk_ids"][:, : v["k"]],
                         topk_logprobs=outputs[i]["topk_logprobs"][:, : v["k"]])
            else:
                o.update(split_samples(outputs[i]["draws"][:, : v["n"]]))
            per_seq.append(o)
        path = os.path.join(workdir, "fidelity", name_of(v).replace(" ", "-").replace("=", ""))
        shutil.rmtree(path, ignore_errors=True)
        card = build_card(cfg, width, None, tok, "bench", planned_shards=1)
        with CacheWriter(path, card) as w:
            row = w.write_shard(records_for_window(seqs, per_seq, 0.5), 0)
            w.finish(1)
        shard = os.path.join(path, "shards", row["shard"])
        per_array = {
            name: sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in
                      os.walk(os.path.join(shard, name)) for f in fs) / row["num_supervised"]
            for name in sorted(os.listdir(shard)) if name != "zarr.json"
        }
        result[name_of(v)] = {**v, "path": path,
                              "bytes_per_token": row["bytes"] / row["num_supervised"],
                              "per_array": per_array}
    return result


def full_terms(z, logp, targets):
    """Dense per-row forward KL, TKD and DKD over the full vocabulary (float32)."""
    lq = torch.log_softmax(z, -1)
    onehot = torch.zeros_like(lq, dtype=torch.bool).scatter_(1, targets[:, None], True)
    fkl = (logp.exp() * (logp - lq)).sum(-1)
    lp_g = logp.gather(1, targets[:, None])[:, 0]
    lq_g = lq.gather(1, targets[:, None])[:, 0]
    lr_p = log1mexp(lp_g.double()).float()
    lr_q = torch.logsumexp(lq.masked_fill(onehot, float("-inf")), -1)
    p_g = lp_g.exp()
    tkd = p_g * (lp_g - lq_g) + (1 - p_g) * (lr_p - lr_q)
    lph = (logp - lr_p[:, None]).masked_fill(onehot, float("-inf"))
    lqh = lq - lr_q[:, None]
    dkd = torch.where(onehot, 0.0, lph.exp() * (lph - lqh)).sum(-1)
    return fkl, tkd, dkd


def full_logit_grad(logits, logp, targets, hard, loss: str, alpha=0.2):
    """d loss / d logits of the dense loss, computed in row chunks (same coefficients)."""
    n = logits.shape[0]
    n_hard, n_easy = float(hard.sum()), float((~hard).sum())
    grad = torch.zeros_like(logits)
    for lo in range(0, n, ROW_CHUNK):
        z = logits[lo : lo + ROW_CHUNK].detach().requires_grad_()
        fkl, tkd, dkd = full_terms(z, logp[lo : lo + ROW_CHUNK], targets[lo : lo + ROW_CHUNK])
        h = hard[lo : lo + ROW_CHUNK]
        if loss == "fkl":
            total = fkl.sum() / n
        else:
            total = (torch.where(h, (1 - alpha) / max(n_hard, 1.0) * (tkd + dkd),
                                 alpha / max(n_easy, 1.0) * dkd)).sum()
        (grad[lo : lo + ROW_CHUNK],) = torch.autograd.grad(total, z)
    return grad


def fixed_student(folder: str, tok, workdir: str, steps: int = 40) -> str:
    """6 of the teacher's layers, then `steps` of cross-entropy on chitchat texts 3000+ (not
    the benchmark's); made once and kept in workdir."""
    out = os.path.join(workdir, f"student-6L-ce{steps}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    init_student(folder, "6", out)
    model = load_causal_lm(out, "fp32").train()
    texts = [t for i, t in enumerate(chitchat_texts()) if i >= 3000][: steps * 8]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for step in range(steps):
        enc = tok(texts[step * 8 : step * 8 + 8], return_tensors="pt", padding=True,
                  truncation=True, max_length=256)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  student CE step {step}: {loss.item():.3f}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two flat vectors (in float64: a float32 dot over 10^7
    entries is off by ~1e-4, which reads as 0 for angles under ~1.5 degrees)."""
    a, b = a.double(), b.double()
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--angle-tokens", type=int, default=4096, help="supervised per batch")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--out", default="docs/fidelity")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    folder = smollm2_folder(args.workdir, dtype="fp32")
    tok = load_tokenizer(folder)
    teacher = load_causal_lm(folder, "fp32")
    width = logits_width(teacher)
    seqs = chitchat_sequences(tok, args.tokens, args.max_length)
    n_tokens = sum(len(s.input_ids) - 1 for s in seqs)
    print(f"teacher SmolLM2-135M-Instruct fp32, {len(seqs)} chitchat sequences, {n_tokens} "
          f"supervised tokens; {torch.get_num_threads()} threads")
    outputs = teacher_pass(teacher, seqs, args.batch_tokens)
    print(f"teacher pass {time.perf_counter() - t_start:.0f}s")
    caches = write_caches(outputs, seqs, folder, tok, width, args.workdir)
    del outputs

    # angle batches: consecutive sequences with >= angle_tokens supervised positions each
    groups, cur, acc = [], [], 0
    for i, s in enumerate(seqs):
        cur.append(i)
        acc += len(s.input_ids) - 1
        if acc >= args.angle_tokens:
            groups.append(cur)
            cur, acc = [], 0
        if len(groups) == args.batches:
            break
    student_dir = fixed_student(folder, tok, os.path.join(args.workdir, "fidelity"))
    student = RowLogits(load_causal_lm(student_dir, "fp32")).train(False)
    params = [p for p in student.parameters() if p.requires_grad]
    teacher_rows = RowLogits(teacher).eval()
    opened = {name: open_cache(c["path"]) for name, c in caches.items()}
    any_cache = next(iter(opened.values()))
    angles: dict[str, list[float]] = {}

    def param_grad(logits, g_logits):
        grads = torch.autograd.grad(logits, params, g_logits, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    for b, group in enumerate(groups):
        # packed: one row, positions restart per sequence (no padding to run through)
        base = collate([any_cache[i] for i in group], pack=True)
        with torch.no_grad():
            logp = torch.log_softmax(
                teacher_rows(base["input_ids"], base["rows"], None, base["position_ids"]).float(),
                -1,
            )
        logits = student(base["input_ids"], base["rows"], None, base["position_ids"])
        targets = base["target_ids"]
        hard = base["hard"].bool()
        ref = {loss: param_grad(logits, full_logit_grad(logits, logp, targets, hard, loss))
               for loss in ("fkl", "atkd")}
        del logp
        z = logits.detach().requires_grad_()
        ce = kd_loss(z, sparse_teacher(base, z.device), LossConfig(loss="ce")).loss
        g_ce = param_grad(logits, torch.autograd.grad(ce, z)[0])
        for loss in ("fkl", "atkd"):
            angles.setdefault(f"ce (no teacher) | {loss}", []).append(angle(g_ce, ref[loss]))
        for name, cache in opened.items():
            batch = collate([cache[i] for i in group], pack=True)
            t = sparse_teacher(batch, z.device)
            tails = ("bucket", "renorm") if (
                caches[name]["mode"] == "topk" and caches[name]["encoding"] == "standard"
            ) else ("bucket",)
            for loss in ("fkl", "atkd"):
                for tail in tails:
                    cfg = LossConfig(loss="kd" if loss == "fkl" else "atkd", base="fkl",
                                     tail=tail)
                    out = kd_loss(z, t, cfg)
                    g = param_grad(logits, torch.autograd.grad(out.loss, z)[0])
                    label = name + (f" {tail}" if caches[name]["mode"] == "topk" else "")
                    angles.setdefault(f"{label} | {loss}", []).append(angle(g, ref[loss]))
        print(f"batch {b}: {len(targets)} supervised tokens, student NLL {float(ce):.3f}, "
              f"{time.perf_counter() - t_start:.0f}s")

    rows = []
    for key, values in angles.items():
        label, loss = key.split(" | ")
        cache_name = label.rsplit(" ", 1)[0] if label.endswith(("bucket", "renorm")) else label
        bpt = caches[cache_name]["bytes_per_token"] if cache_name in caches else 0.0
        rows.append({"variant": label, "loss": loss, "bytes_per_token": bpt,
                     "angle_deg": float(np.mean(values)), "angles": values})
    print(f"\n{'variant':34s} {'bytes/token':>11s} {'fkl angle':>10s} {'atkd angle':>10s}")
    for label in dict.fromkeys(r["variant"] for r in rows):
        got = {r["loss"]: r for r in rows if r["variant"] == label}
        print(f"{label:34s} {got['fkl']['bytes_per_token']:11.1f} "
              f"{got['fkl']['angle_deg']:9.2f}° {got['atkd']['angle_deg']:9.2f}°")
    print("\nbytes/token per array:")
    for name, c in caches.items():
        print(f"  {name:26s} " + ", ".join(f"{k} {v:.2f}" for k, v in c["per_array"].items()))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "caches": {k: {kk: vv for kk, vv in c.items() if kk != "path"}
                                            for k, c in caches.items()},
                   "tokens": n_tokens, "batches": [len(g) for g in groups]}, f, indent=1)
    plot(rows, args.out + ".png")
    print(f"\nwrote {args.out}.json and {args.out}.png in {time.perf_counter() - t_start:.0f}s")


def plot(rows: list[dict], path: str) -> None:
    """Bytes/token (x, log) against angle (y), one panel per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    styles = {"topk": "o", "sampled": "s"}
    for ax, loss in zip(axes, ("fkl", "atkd"), strict=True):
        for series in ("topk bucket", "topk renorm", "sampled"):
            pts = [r for r in rows if r["loss"] == loss and r["variant"].startswith(
                series.split()[0]) and (len(series.split()) == 1 or r["variant"].endswith(
                    series.split()[1]))]
            for enc, fill in (("standard", "full"), ("packed", "none")):
                sel = sorted((r for r in pts if f" {enc}" in r["variant"]),
                             key=lambda r: r["bytes_per_token"])
                if not sel:
                    continue
                ax.plot([r["bytes_per_token"] for r in sel], [r["angle_deg"] for r in sel],
                        marker=styles[series.split()[0]], fillstyle=fill,
                        label=f"{series} {enc}")
        floor = [r for r in rows if r["loss"] == loss and r["variant"].startswith("ce ")]
        if floor:
            ax.axhline(floor[0]["angle_deg"], color="black", ls="--", lw=1,
                       label="cross-entropy only (no teacher)")
        ax.axvline(32, color="grey", ls=":", lw=1)
        ax.axhline(5, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("bytes per supervised token on disk")
        full = "forward KL" if loss == "fkl" else "ATKD"
        ax.set_title(f"gradient angle to full-vocabulary {full}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("angle (degrees)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
