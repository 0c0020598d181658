"""Time and peak memory of every loss against plain cross-entropy on the same logits.

For each (V, k): N = 4096 positions of random student logits and a random sparse teacher;
forward + backward of F.cross_entropy and of each loss (kd with every base, atkd with fkl
and with jsd), timed in one process (median of --repeats, interleaved with cross-entropy),
and the peak extra memory of forward + backward measured in a fresh subprocess per loss
(ru_maxrss growth over the logits already allocated). Prints ratios to cross-entropy.

    python benchmarks/bench_losses.py [--n 4096] [--vocab 32000 49152] [--k 8 32 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

from atkd_cache.losses import LossConfig, SparseTeacher, kd_loss

LOSSES = {
    "ce": None,
    "kd-fkl": LossConfig(loss="kd", base="fkl"),
    "kd-rkl": LossConfig(loss="kd", base="rkl"),
    "kd-jsd": LossConfig(loss="kd", base="jsd"),
    "kd-tvd": LossConfig(loss="kd", base="tvd"),
    "kd-skl": LossConfig(loss="kd", base="skl"),
    "kd-srkl": LossConfig(loss="kd", base="srkl"),
    "atkd-fkl": LossConfig(loss="atkd", base="fkl"),
    "atkd-jsd": LossConfig(loss="atkd", base="jsd"),
}


def make(n: int, v: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 2).to(dtype)
    t_logits = torch.randn(n, v, generator=g) * 3
    lp = torch.log_softmax(t_logits, -1)
    top = lp.topk(k, -1)
    targets = torch.randint(0, v, (n,), generator=g)
    teacher = SparseTeacher(
        topk_ids=top.indices, topk_logprobs=top.values.half().float(), target_ids=targets,
        target_logprob=lp.gather(1, targets[:, None]).squeeze(1),
        hard=torch.rand(n, generator=g) < 0.5,
    )
    return logits, teacher


def step(name: str, logits: torch.Tensor, teacher: SparseTeacher) -> None:
    x = logits.detach().requires_grad_(True)
    if name == "ce":
        loss = F.cross_entropy(x, teacher.target_ids)
    else:
        loss = kd_loss(x, teacher, LOSSES[name]).loss
    loss.backward()


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_peak(name: str, n: int, v: int, k: int, dtype: str) -> float:
    """In this process: peak RSS above the RSS just before one forward+backward, sampled
    every 0.2 ms by a thread (the logits and teacher are already allocated)."""
    logits, teacher = make(n, v, k, getattr(torch, dtype))
    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.0002)

    thread = threading.Thread(target=poll)
    thread.start()
    step(name, logits, teacher)
    done.set()
    thread.join()
    return peak[0] - base


def peak_extra_mb(name: str, n: int, v: int, k: int, dtype: str) -> float:
    """Run one forward+backward in a fresh process; return its peak RSS growth in MB."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks');"
        "from bench_losses import measure_peak;"
        f"print(measure_peak({name!r}, {n}, {v}, {k}, {dtype!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152])
    ap.add_argument("--k", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory", nargs="*", default=["ce", "kd-fkl", "atkd-fkl"])
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"N={args.n} logits {args.dtype}, {torch.get_num_threads()} threads, forward+backward, "
          f"median of {args.repeats}; memory = peak RSS growth in a fresh process")
    results = []
    for v in args.vocab:
        for k in args.k:
            logits, teacher = make(args.n, v, k, dtype)
            times: dict[str, list[float]] = {name: [] for name in LOSSES}
            for name in LOSSES:
                step(name, logits, teacher)  # warm-up
            for _ in range(args.repeats):
                for name in LOSSES:
                    t0 = time.perf_counter()
                    step(name, logits, teacher)
                    times[name].append(time.perf_counter() - t0)
            ce_t = statistics.median(times["ce"])
            mem = {m: peak_extra_mb(m, args.n, v, k, args.dtype) for m in args.memory}
            print(f"\nV={v} k={k}: cross-entropy {ce_t * 1000:.0f} ms, peak +{mem['ce']:.0f} MB")
            for name in LOSSES:
                t = statistics.median(times[name])
                line = f"  {name:9s} {t * 1000:7.0f} ms  time x{t / ce_t:5.2f}"
                if name in mem:
                    line += f"   peak +{mem[name]:6.0f} MB  memory x{mem[name] / mem['ce']:5.2f}"
                print(line)
                results.append({"V": v, "k": k, "loss": name, "ms": t * 1000,
                                "time_ratio": t / ce_t, "peak_mb": mem.get(name),
                                "memory_ratio": mem[name] / mem["ce"] if name in mem else None})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
