"""The GPU check: one script to run the day a GPU is lent (about 5 minutes on one H200), and
`--smoke` runs the same code at toy sizes on the CPU (in CI: tests/test_gpu_check.py).

Random-init models of real shapes (no download): a SmolLM2-1.7B-config teacher in bf16, a
SmolLM2-360M-config student (V = 49,152), and a V = 151,936 LM head. It measures, printing
ratios and writing one JSON (--out):
  1. teacher pass: forward + top-32 extraction + shard write vs the bare forward;
  2. train step (forward + backward + AdamW, bf16 autocast): plain CE, cached ATKD with the
     fused head, cached ATKD unfused, online KD with the teacher resident (dense KL);
  3. LM head + loss alone at V = 49,152 and 151,936: CE vs unfused ATKD vs fused ATKD;
  4. loader throughput (one worker, the teacher pass's cache) vs what the ATKD step consumes;
  5. bf16 autocast vs fp32: the fused ATKD loss and its gradients;
  6. generation with capture (dump-teacher --generate's sampler: top-32 + target + entropy
     per step) vs plain `generate` sampling, same prompts, same lengths (no EOS);
  7. joining two teachers' top-32 rows (each --mix) vs the fused ATKD head + loss at the same
     rows (V = 49,152);
  8. one on-policy round (`atkd-cache on-policy`'s stages, in process): the student writes
     the replies (the --generate sampler, top-1 + its own log-probs), the teacher scores
     exactly those sequences (top-32), one fused training step on them with `kd` and with
     `rkl-tokens`; seconds per stage.
Time: CUDA-synchronised medians of 3 after 1 warm-up; memory: torch.cuda.max_memory_allocated
above what was allocated before (on the CPU, smoke mode reports no memory).

The device has Python 3.12, torch with CUDA, transformers, pyarrow, click, tqdm and no
internet. Carry the rest as wheels (about 12 MiB; the script does not need `datasets`):
    pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 -d wheels \
        zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.7.1 crc32c==2.8 donfig==0.8.1.post1 \
        fsspec==2026.9.0
and run there (the device tool's `run`, carrying `wheels`):
    pip install --no-deps wheels/*.whl && pip install --no-deps -e . && \
        python benchmarks/gpu_check.py --out $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from atkd_cache.cache import CacheCard, CacheWriter, SequenceRecord  # noqa: E402
from atkd_cache.data import TokenizedSequence  # noqa: E402
from atkd_cache.losses import LossConfig, SparseTeacher, kd_loss  # noqa: E402
from atkd_cache.losses.fused import fused_kd_loss, head_logits  # noqa: E402
from atkd_cache.losses.teachers import join_teachers  # noqa: E402
from atkd_cache.split import hard_labels_np  # noqa: E402
from atkd_cache.teacher.generate import GenerationSpec, Prompt, generate_outputs  # noqa: E402
from atkd_cache.teacher.hf import teacher_outputs  # noqa: E402
from atkd_cache.train.loader import CacheDataset, LoaderConfig, make_loader  # noqa: E402
from atkd_cache.train.student import RowLogits  # noqa: E402
from atkd_cache.train.trainer import Dist, accumulate_gradients  # noqa: E402

FULL = {
    "teacher": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=49152),
    "student": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                    num_attention_heads=15, num_key_value_heads=5, vocab_size=49152),
    "batch": 8, "seq_len": 1024, "shards": 4, "head_rows": 16384, "head_hidden": 960,
    "vocabs": (49152, 151936), "k": 32, "gen_prompts": 64, "gen_prompt_len": 256,
    "gen_new_tokens": 256,
}
SMOKE = {
    "teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "batch": 2, "seq_len": 32, "shards": 2, "head_rows": 64, "head_hidden": 32,
    "vocabs": (512, 1024), "k": 8, "gen_prompts": 2, "gen_prompt_len": 8, "gen_new_tokens": 4,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> dict:
    """Median seconds of fn() after one warm-up, and the peak memory above the start."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - start) / 2**20
    return {"seconds": statistics.median(times), "peak_extra_mb": peak}


def llama(shape: dict, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)


def sequences(size: dict, count: int, vocab: int) -> list[TokenizedSequence]:
    g = np.random.default_rng(0)
    return [TokenizedSequence(i, g.integers(3, vocab, size["seq_len"]).astype(np.int64),
                              np.ones(size["seq_len"] - 1, bool)) for i in range(count)]


def teacher_pass(size: dict, teacher, device, workdir: str) -> dict:
    """Forward + extraction + shard write vs the bare forward, one batch per shard."""
    vocab, k = size["teacher"]["vocab_size"], size["k"]
    seqs = sequences(size, size["batch"] * size["shards"], vocab)
    ids = torch.tensor(np.stack([s.input_ids for s in seqs[: size["batch"]]]), device=device)
    card = CacheCard(
        teacher_id="random-init", teacher_revision=None, teacher_weights_hash="",
        teacher_dtype="bf16", tokenizer_fingerprint="none", tokenizer_vocab_size=vocab,
        logits_width=vocab, top_k=k, temperature=1.0, data_source="random", data_split=None,
        data_shape="text", data_fields={"text": "text"}, data_template=None, data_limit=None,
        data_fingerprint="none", max_length=None, label_rule="per-sequence", hard_ratio=0.5,
        backend="hf", exactness={}, logprob_dtype="float16", shard_positions=1,
        tool_version="gpu-check", planned_shards=size["shards"])
    path = os.path.join(workdir, "cache")
    writer = CacheWriter(path, card)
    writer.open()
    batch = size["batch"]

    @torch.no_grad()
    def bare():
        teacher(input_ids=ids, use_cache=False).logits.float().sum().item()

    state = {"shard": 0}

    @torch.no_grad()
    def full():
        i = state["shard"] % size["shards"]
        window = seqs[i * batch : (i + 1) * batch]
        outs = teacher_outputs(teacher, window, k)
        records = [SequenceRecord(seq_id=s.seq_id, input_ids=s.input_ids,
                                  supervised=s.supervised,
                                  hard=hard_labels_np(-o["target_logprob"], 0.5), **o)
                   for s, o in zip(window, outs, strict=True)]
        if i not in {r["index"] for r in writer.committed}:
            writer.write_shard(records, i * batch, index=i)
        state["shard"] += 1

    base, total = timed(bare, device), timed(full, device, repeats=size["shards"] - 1)
    writer.finish(size["shards"])
    writer.close()
    tokens = batch * size["seq_len"]
    return {"cache": path, "bare_forward": base, "teacher_pass": total,
            "ratio": total["seconds"] / base["seconds"],
            "tokens_per_s": tokens / total["seconds"]}


def train_steps(size: dict, teacher, device, cache: str) -> dict:
    """One optimizer step per variant over the same micro-batch, bf16 autocast on CUDA."""
    student = llama(size["student"], torch.float32, device)
    net = RowLogits(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    loader = make_loader(CacheDataset(cache, LoaderConfig(
        batch_tokens=size["batch"] * size["seq_len"], shuffle=False, num_workers=0)))
    batch = next(iter(loader))
    n = float(batch["rows"].numel())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" \
        else None
    dist = Dist(device=device)

    def step(variant):
        def run():
            if variant == "ce":
                with autocast or torch.autocast("cpu", enabled=False):
                    logits = net(batch["input_ids"].to(device), batch["rows"].to(device),
                                 attention_mask=batch["attention_mask"].to(device))
                torch.nn.functional.cross_entropy(logits.float(),
                                                  batch["target_ids"].to(device)).backward()
            elif variant == "online-kd":
                with autocast or torch.autocast("cpu", enabled=False):
                    with torch.no_grad():
                        t_logits = RowLogits(teacher)(
                            batch["input_ids"].to(device), batch["rows"].to(device),
                            attention_mask=batch["attention_mask"].to(device)).float()
                    s_logits = net(batch["input_ids"].to(device), batch["rows"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).float()
                torch.nn.functional.kl_div(torch.log_softmax(s_logits, -1),
                                           torch.log_softmax(t_logits, -1), log_target=True,
                                           reduction="batchmean").backward()
            else:
                accumulate_gradients(net, [batch], LossConfig(loss="atkd"), dist, n, autocast,
                                     fused=variant == "atkd-fused")
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    out = {v: timed(step(v), device) for v in ("ce", "atkd-fused", "atkd", "online-kd")}
    for v in out:
        out[v]["x_ce"] = out[v]["seconds"] / out["ce"]["seconds"]
    out["tokens_per_step"] = n
    return out


def head_and_loss(size: dict, device) -> dict:
    """LM head + loss, forward + backward, at each vocabulary size (float32 weights, bf16
    autocast on CUDA as in training)."""
    out = {}
    for vocab in size["vocabs"]:
        g = torch.Generator().manual_seed(0)
        n, h = size["head_rows"], size["head_hidden"]
        hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
        weight = (torch.randn(vocab, h, generator=g) / h**0.5).to(device).requires_grad_()
        teacher = random_teacher(n, vocab, size["k"], device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)

        def run(variant, hidden=hidden, weight=weight, teacher=teacher, autocast=autocast):
            def go():
                with autocast:
                    if variant == "atkd-fused":
                        loss = fused_kd_loss(hidden, weight, teacher, LossConfig()).loss
                    else:
                        logits = head_logits(hidden, weight, None, None)
                if variant == "ce":
                    loss = torch.nn.functional.cross_entropy(logits.float(), teacher.target_ids)
                elif variant == "atkd":
                    loss = kd_loss(logits, teacher, LossConfig()).loss
                loss.backward()
            return go

        row = {name: timed(run(name), device) for name in ("ce", "atkd", "atkd-fused")}
        for name in row:
            row[name]["x_ce_time"] = row[name]["seconds"] / row["ce"]["seconds"]
            if row["ce"]["peak_extra_mb"]:
                row[name]["x_ce_memory"] = row[name]["peak_extra_mb"] / row["ce"]["peak_extra_mb"]
        out[str(vocab)] = row
    return out


def random_teacher(n: int, vocab: int, k: int, device, seed: int = 1) -> SparseTeacher:
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, -1).sort(-1, True).values
    ids = torch.randint(0, vocab, (n, k), generator=g)
    targets = ids[:, 0].clone()
    targets[n // 5 :] = torch.randint(0, vocab, (n - n // 5,), generator=g)
    target_lp = torch.where(targets == ids[:, 0], logp[:, 0], torch.full((n,), -8.0))
    return SparseTeacher(topk_ids=ids.to(device), topk_logprobs=logp.half().to(device),
                         target_ids=targets.to(device), target_logprob=target_lp.to(device),
                         hard=(torch.rand(n, generator=g) < 0.5).to(device))


def joined_teachers(size: dict, device, fused_seconds: float) -> dict:
    """Joining two teachers' rows (losses/teachers.py) for head_rows rows in sequences of
    512, per mix, vs the fused ATKD head + loss at the same rows (`fused_seconds`)."""
    n, vocab, k = size["head_rows"], size["vocabs"][0], size["k"]
    teachers = [random_teacher(n, vocab, k, device, seed) for seed in (1, 2)]
    first, second = teachers  # the same tokens: the second teacher scores the first's targets
    second.target_ids = first.target_ids
    second.target_logprob = torch.where(second.topk_ids[:, 0] == first.target_ids,
                                        second.topk_logprobs[:, 0].float(),
                                        torch.full_like(first.target_logprob, -8.0))
    offsets = torch.arange(0, n + 1, min(512, n), device=device)
    out = {}
    for mix in ("mixture", "confident", "route-by-hard"):
        row = timed(lambda mix=mix: join_teachers(teachers, None, mix, 0.5, offsets), device)
        row["x_fused_atkd"] = row["seconds"] / fused_seconds
        out[mix] = row
    return out


def loader_rate(cache: str, size: dict) -> dict:
    loader = make_loader(CacheDataset(cache, LoaderConfig(
        batch_tokens=size["batch"] * size["seq_len"], num_workers=1)))
    t0, tokens = time.perf_counter(), 0
    for b in loader:
        tokens += int(b["rows"].numel())
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "tokens": tokens}


def bf16_agreement(size: dict, device) -> dict:
    """Fused ATKD under bf16 autocast vs float32: relative error of the loss and gradients."""
    n, h, vocab = size["head_rows"], size["head_hidden"], size["vocabs"][0]
    g = torch.Generator().manual_seed(2)
    hidden0 = torch.randn(n, h, generator=g).to(device)
    weight0 = (torch.randn(vocab, h, generator=g) / h**0.5).to(device)
    teacher = random_teacher(n, vocab, size["k"], device)
    results = []
    for dtype in (None, torch.bfloat16):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else \
            torch.autocast(device.type, enabled=False)
        with ctx:
            out = fused_kd_loss(hidden, weight, teacher, LossConfig(loss="atkd"))
        out.loss.backward()
        results.append((out.loss.detach().float(), hidden.grad.float(), weight.grad.float()))

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))

    (l32, h32, w32), (l16, h16, w16) = results
    return {"loss_fp32": float(l32), "loss_bf16": float(l16), "loss_rel": rel(l16, l32),
            "grad_hidden_rel": rel(h16, h32), "grad_weight_rel": rel(w16, w32)}


def generation(size: dict, teacher, device) -> dict:
    """One batch of replies, captured vs plain sampling (temperature 0.8, top-p 0.95)."""
    from transformers import GenerationConfig

    g = np.random.default_rng(1)
    vocab, n = size["teacher"]["vocab_size"], size["gen_prompts"]
    prompts = [Prompt(i, g.integers(3, vocab, size["gen_prompt_len"]).astype(np.int64))
               for i in range(n)]
    spec = GenerationSpec(temperature=0.8, top_p=0.95, max_new_tokens=size["gen_new_tokens"])
    teacher.generation_config = GenerationConfig(pad_token_id=0)  # no EOS: full length
    ids = torch.tensor(np.stack([p.input_ids for p in prompts]), device=device)

    def capture():
        generate_outputs(teacher, prompts, spec, size["k"])

    @torch.no_grad()
    def plain():
        teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         temperature=0.8, top_p=0.95, top_k=None,
                         max_new_tokens=spec.max_new_tokens, pad_token_id=0)

    cap, base = timed(capture, device, repeats=2), timed(plain, device, repeats=2)
    tokens = n * spec.max_new_tokens
    return {"capture": cap, "plain": base, "ratio": base["seconds"] / cap["seconds"],
            "capture_tokens_per_s": tokens / cap["seconds"],
            "plain_tokens_per_s": tokens / base["seconds"]}


def on_policy_round(size: dict, teacher, device) -> dict:
    """Rollout (student, capture) -> scoring (teacher, top-k) -> one fused step per loss."""
    g = np.random.default_rng(2)
    vocab, k, n = size["teacher"]["vocab_size"], size["k"], size["gen_prompts"]
    student = llama(size["student"], torch.float32, device)
    student.generation_config.pad_token_id = 0
    net = RowLogits(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    prompts = [Prompt(i, g.integers(3, vocab, size["gen_prompt_len"]).astype(np.int64))
               for i in range(n)]
    spec = GenerationSpec(temperature=1.0, max_new_tokens=size["gen_new_tokens"])
    out: dict = {}
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pairs = generate_outputs(student, prompts, spec, 1)
    sync(device)
    out["rollout_seconds"] = time.perf_counter() - t0
    seqs = [q for q, _ in pairs]
    t0 = time.perf_counter()
    scored = teacher_outputs(teacher, seqs, k)
    sync(device)
    out["scoring_seconds"] = time.perf_counter() - t0
    ids = torch.tensor(np.stack([q.input_ids for q in seqs]), device=device)
    width = ids.shape[1]
    rows = torch.cat([torch.nonzero(torch.from_numpy(q.supervised)).view(-1) + i * width
                      for i, q in enumerate(seqs)]).to(device)
    counts = [int(q.supervised.sum()) for q in seqs]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), device=device)

    def cat(name, dtype):
        return torch.from_numpy(np.concatenate([o[name] for o in scored])).to(device, dtype)

    rows_teacher = SparseTeacher(
        topk_ids=cat("topk_ids", torch.long), topk_logprobs=cat("topk_logprobs", torch.float32),
        target_ids=torch.from_numpy(np.concatenate([q.input_ids[1:][q.supervised]
                                                    for q in seqs])).to(device),
        target_logprob=cat("target_logprob", torch.float32),
        hard=torch.from_numpy(np.concatenate([hard_labels_np(-o["target_logprob"], 0.5)
                                              for o in scored])).to(device))
    for loss in ("kd", "rkl-tokens"):
        def step(loss=loss):
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=device.type == "cuda"):
                res = net(ids, rows, teacher=rows_teacher, loss_cfg=LossConfig(loss=loss),
                          group_offsets=offsets)
            res["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[f"train_{loss}"] = timed(step, device, repeats=2)
    out["reply_tokens"] = int(sum(counts))
    out["rollout_tokens_per_s"] = out["reply_tokens"] / out["rollout_seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="Toy sizes on the CPU (CI).")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    size = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "smoke": args.smoke, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as workdir:
        teacher = llama(size["teacher"], dtype, device).eval()
        report["teacher_pass"] = teacher_pass(size, teacher, device, workdir)
        cache = report["teacher_pass"].pop("cache")
        print(f"teacher pass: {report['teacher_pass']['ratio']:.3f}x the bare forward", flush=True)
        report["train_step"] = train_steps(size, teacher, device, cache)
        for v in ("atkd-fused", "atkd", "online-kd"):
            print(f"train step {v}: {report['train_step'][v]['x_ce']:.2f}x plain CE", flush=True)
        report["loader"] = loader_rate(cache, size)
        step = report["train_step"]
        consume = step["tokens_per_step"] / step["atkd-fused"]["seconds"]
        report["loader"]["x_consumption"] = report["loader"]["tokens_per_s"] / consume
        print(f"loader: {report['loader']['x_consumption']:.1f}x what the step consumes")
        report["generation"] = generation(size, teacher, device)
        print(f"generation with capture: {report['generation']['ratio']:.2f}x plain generate's "
              f"tokens/s", flush=True)
        report["on_policy_round"] = on_policy_round(size, teacher, device)
        r = report["on_policy_round"]
        print(f"on-policy round: rollout {r['rollout_seconds']:.1f} s, scoring "
              f"{r['scoring_seconds']:.1f} s, kd step {r['train_kd']['seconds']:.2f} s, "
              f"rkl-tokens step {r['train_rkl-tokens']['seconds']:.2f} s", flush=True)
    report["head_and_loss"] = head_and_loss(size, device)
    for vocab, row in report["head_and_loss"].items():
        print(f"V={vocab}: fused ATKD {row['atkd-fused']['x_ce_time']:.2f}x CE time" + (
            f", {row['atkd-fused']['x_ce_memory']:.3f}x CE memory"
            if "x_ce_memory" in row["atkd-fused"] else ""), flush=True)
    fused = report["head_and_loss"][str(size["vocabs"][0])]["atkd-fused"]["seconds"]
    report["joined_teachers"] = joined_teachers(size, device, fused)
    for mix, row in report["joined_teachers"].items():
        print(f"joining 2 teachers ({mix}): {row['x_fused_atkd']:.3f}x the fused ATKD head + "
              f"loss at the same rows", flush=True)
    report["bf16_vs_fp32"] = bf16_agreement(size, device)
    print(f"bf16 vs fp32: {report['bf16_vs_fp32']}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
