"""Teacher pass throughput: the vLLM backend against the HF backend, same teacher, same
sequences, same top-k. Run it in .venv-vllm (scripts/setup-vllm):

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--tokens 10000] [--top-k 32]

Teacher: SmolLM2-135M-Instruct, fp32 weights (DESIGN §6), chitchat conversations as plain
text, max length 256. Timed: the teacher pass over all sequences into per-position arrays
(forward + extraction for HF; generate + log-prob conversion for vLLM), after a warm-up
pass over the first sequences; engine start-up is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from assets import chitchat_sequences  # noqa: E402

from atkd_cache.assets import smollm2_folder  # noqa: E402
from atkd_cache.dump import DumpConfig, hf_window_outputs  # noqa: E402
from atkd_cache.models import load_causal_lm, load_tokenizer  # noqa: E402


def timed(fn, seqs) -> tuple[float, list[dict]]:
    fn(seqs[:4])  # warm-up
    t0 = time.perf_counter()
    outs = fn(seqs)
    return time.perf_counter() - t0, outs


def run(variant: str, teacher: str, seqs, top_k: int) -> tuple[float, float, list[dict]]:
    """(seconds for the timed pass, start-up seconds, outputs) of one backend variant."""
    t0 = time.perf_counter()
    if variant == "hf":
        cfg = DumpConfig(model=teacher, data=None, output="", top_k=top_k, dtype="fp32",
                         batch_size=None, batch_tokens=4096)
        model = load_causal_lm(teacher, dtype="fp32")
        fn = lambda s: hf_window_outputs(model, s, cfg, pad_id=0)  # noqa: E731
    else:
        from atkd_cache.teacher.vllm import VllmTeacher

        fn = VllmTeacher(teacher, top_k, "fp32", enforce_eager=variant == "vllm-eager").outputs
    start = time.perf_counter() - t0
    seconds, outs = timed(fn, seqs)
    return seconds, start, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=10000)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--variant", default=None, help="(internal) run one variant")
    args = ap.parse_args()
    teacher = smollm2_folder(args.workdir, dtype="fp32")
    seqs = chitchat_sequences(load_tokenizer(teacher), args.tokens, args.max_length)
    n = sum(len(s.input_ids) for s in seqs)
    if args.variant:  # one engine per process: vLLM owns its process's parallel state
        seconds, start, outs = run(args.variant, teacher, seqs, args.top_k)
        np.save(os.path.join(args.workdir, f"bench-vllm-{args.variant}.npy"),
                np.concatenate([o["target_logprob"] for o in outs]))
        print(json.dumps({"variant": args.variant, "seconds": seconds, "start": start}))
        return
    print(f"{len(seqs)} sequences, {n} tokens, k = {args.top_k}")
    results = {}
    for variant in ("hf", "vllm", "vllm-eager"):
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
               "--top-k", str(args.top_k), "--max-length", str(args.max_length),
               "--workdir", args.workdir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        # (vLLM logs to stdout as well: take our one JSON line)
        line = [x for x in out.splitlines() if x.startswith('{"variant"')][-1]
        results[variant] = json.loads(line)
    ref = np.load(os.path.join(args.workdir, "bench-vllm-hf.npy"))
    hf = results["hf"]["seconds"]
    for variant, r in results.items():
        lp = np.load(os.path.join(args.workdir, f"bench-vllm-{variant}.npy"))
        print(f"{variant:10s} {n / r['seconds']:8.0f} tokens/s  x HF {hf / r['seconds']:.2f}  "
              f"start-up {r['start']:.0f}s  max |target log-prob - HF| "
              f"{np.abs(lp - ref).max():.1e}")


if __name__ == "__main__":
    main()
