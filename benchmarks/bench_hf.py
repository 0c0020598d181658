"""What the Hugging Face route costs: the same student and cache trained by `train-student`,
by `KDTrainer` (fused LM head + ATKD, and with fused_head=False), and, as the baseline a
Trainer user knows, a plain `Trainer` on the model's own cross-entropy over the same rows.

Teacher SmolLM2-135M-Instruct, chitchat text, cache and 6-layer student as in
bench_train.py. Every variant runs in a fresh process (its own peak RSS) for --steps steps of
micro-batches of --batch sequences (train-student: the loader's token budget set to the
same padded size); the step time is the median over the steps after the first.

    python benchmarks/bench_hf.py [--steps 6] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

VARIANTS = ("train-student", "kdtrainer", "kdtrainer-unfused", "trainer-ce")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args) -> dict:
    import torch
    from bench_train import prepare
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from atkd_cache.cache.reader import open_cache
    from atkd_cache.hf import KDCollator, KDTrainer, cache_dataset
    from atkd_cache.losses.kd import LossConfig
    from atkd_cache.train.loader import LoaderConfig
    from atkd_cache.train.trainer import TrainConfig, train

    torch.manual_seed(0)
    _, cache, student = prepare(argparse.Namespace(workdir=args.workdir, tokens=8000))
    width = max(len(s.input_ids) for s in open_cache(cache))
    out = tempfile.mkdtemp(prefix="bench-hf-")
    if args.variant == "train-student":
        train(TrainConfig(cache=cache, student=student, output=out, max_steps=args.steps,
                          loader=LoaderConfig(batch_tokens=args.batch * width, shuffle=False,
                                              num_workers=0),
                          lr=1e-5, precision="fp32", device="cpu", progress=False,
                          tensorboard=False), log=lambda m: None)
        steps = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:], strict=False)]
        tokens = statistics.mean(s["supervised_tokens"] for s in steps)
        return {"step_s": statistics.median(times), "tokens_per_step": tokens,
                "peak_rss_mb": peak_rss_mb()}

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            stamps.append(time.perf_counter())

    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=1e-5, save_strategy="no",
                              report_to=[], use_cpu=True, disable_tqdm=True,
                              train_sampling_strategy="sequential", logging_steps=1,
                              remove_unused_columns=args.variant != "trainer-ce")
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    data = cache_dataset(cache, streaming=False, cache_dir=os.path.join(out, "hf"))
    if args.variant == "trainer-ce":  # the model's own loss on the same labels
        collate = KDCollator()

        def ce_batch(rows):
            b = collate(rows)
            return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}

        trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=ce_batch)
    else:
        trainer = KDTrainer(model=model, args=targs, train_dataset=data,
                            data_collator=KDCollator(), loss=LossConfig(loss="atkd"),
                            fused_head=args.variant == "kdtrainer")
    trainer.add_callback(Clock())
    trainer.train()
    per_epoch = [int(KDCollator()(list(data.select(range(i, min(i + args.batch, len(data))))))
                     ["rows"].numel()) for i in range(0, len(data), args.batch)]
    rows = [per_epoch[i % len(per_epoch)] for i in range(args.steps)]  # epochs repeat
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"step_s": statistics.median(gaps),
            "tokens_per_step": statistics.mean(rows), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--variant", choices=VARIANTS, default=None)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
               "--batch", str(args.batch), "--workdir", args.workdir]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(variant, results[variant], flush=True)
    base = results["train-student"]
    print(f"\n{'variant':18s} {'step s':>7s} {'tok/step':>9s} {'tok/s':>7s} "
          f"{'x train-student':>16s} {'peak RSS MB':>12s}")
    for v, r in results.items():
        rate = r["tokens_per_step"] / r["step_s"]
        print(f"{v:18s} {r['step_s']:7.2f} {r['tokens_per_step']:9.0f} {rate:7.0f} "
              f"{rate / (base['tokens_per_step'] / base['step_s']):16.2f} "
              f"{r['peak_rss_mb']:12.0f}")


if __name__ == "__main__":
    main()
