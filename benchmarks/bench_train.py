"""Trainer step time and peak memory: cached ATKD vs plain cross-entropy vs online KD with the
teacher resident, on the same student and the same micro-batches; and loader throughput
against the trainer's consumption.

Teacher: SmolLM2-135M-Instruct (DESIGN §6), fp32 on CPU. Data: chitchat conversations as
plain text. Student: the teacher's layers {0, 6, 12, 17, 23, 29} (`init-student --layers 6`).
Every variant runs in a fresh process (so peak RSS is its own) over the same micro-batches:
    ce         plain SFT: F.cross_entropy on the supervised tokens (no teacher at all)
    atkd       ATKD (fkl base) from the cache: loader batch -> sparse teacher rows
    kd         bucketed forward KL from the cache
    online-kd  teacher resident: teacher forward (no grad) at the same rows, dense forward KL
               over the full vocabulary (what TRL/torchtune-style online KD computes)
Step = forward + loss + backward + AdamW step; median over the timed steps after one warmup.

    python benchmarks/bench_train.py [--tokens 8000] [--batch-tokens 2048] [--steps 3]
    python benchmarks/bench_train.py --two-caches   # loader: 2 teachers' caches vs 1

--two-caches: a second cache of the same data by teacher B, the teacher's 24-layer cut
(`init-student --layers 24`), top-32 as A. Loader epochs over A alone, B alone, A + B in
lock-step, and A with the read-ahead as it was before a fix (each cache replicated 40x, one
worker, checksums on), interleaved, median of --repeats; then the cost of joining the two
teachers' rows per micro-batch (mixture). Results: --two-caches-out; --report prints them.
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
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(__file__))

from assets import chitchat_texts, smollm2_folder  # noqa: E402

from atkd_cache.cache import CacheWriter, open_cache  # noqa: E402
from atkd_cache.cache.integrity import array_sha256  # noqa: E402
from atkd_cache.data import DataSpec  # noqa: E402
from atkd_cache.dump import DumpConfig, dump_teacher  # noqa: E402
from atkd_cache.losses.kd import LossConfig  # noqa: E402
from atkd_cache.models import load_causal_lm  # noqa: E402
from atkd_cache.train.loader import (  # noqa: E402
    CacheDataset,
    LoaderConfig,
    ShardReadAhead,
    make_loader,
)
from atkd_cache.train.student import RowLogits, init_student  # noqa: E402
from atkd_cache.train.trainer import Dist, accumulate_gradients, forward_rows  # noqa: E402

VARIANTS = ("ce", "atkd", "kd", "online-kd")


def prepare(args) -> tuple[str, str, str]:
    """(teacher folder, cache, student folder), built once under --workdir."""
    teacher = smollm2_folder(args.workdir)
    root = os.path.join(args.workdir, "train-bench")
    os.makedirs(root, exist_ok=True)
    data = os.path.join(root, "chitchat.jsonl")
    cache = os.path.join(root, f"cache-{args.tokens}")
    if not os.path.exists(os.path.join(cache, "manifest.parquet")):
        total = 0
        with open(data, "w") as f:
            for text in chitchat_texts():
                f.write(json.dumps({"text": text}) + "\n")
                total += len(text) // 4
                if total >= args.tokens:
                    break
        dump_teacher(DumpConfig(model=teacher, data=DataSpec(source=data, text_field="text",
                                                             max_length=256),
                                output=cache, top_k=32, batch_tokens=4096, batch_size=None,
                                progress=False), log=lambda m: None)
    student = os.path.join(root, "student-6L")
    if not os.path.exists(os.path.join(student, "config.json")):
        init_student(teacher, "6", student)
    return teacher, cache, student


def micro_batches(cache: str | list[str], batch_tokens: int, count: int) -> list[dict]:
    ds = CacheDataset(cache, LoaderConfig(batch_tokens=batch_tokens, shuffle=False,
                                          num_workers=0))
    out = []
    for b in make_loader(ds):
        out.append(b)
        if len(out) == count:
            break
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(args) -> dict:
    """One variant in this process: timings and memory as JSON."""
    torch.manual_seed(0)
    teacher_dir, cache, student_dir = prepare(args)
    batches = micro_batches(cache, args.batch_tokens, args.steps + 1)
    student = load_causal_lm(student_dir, dtype="fp32").train()
    net = RowLogits(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    teacher = None
    if args.variant == "online-kd":
        teacher = RowLogits(load_causal_lm(teacher_dir, dtype="fp32").eval())
    base = rss_mb()
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        n = float(b["rows"].numel())
        if args.variant == "ce":
            logits = forward_rows(net, b, torch.device("cpu"))
            torch.nn.functional.cross_entropy(logits, b["target_ids"]).backward()
        elif teacher is None:
            accumulate_gradients(net, [b], LossConfig(loss=args.variant), Dist(), n)
        else:
            with torch.no_grad():
                t_logits = forward_rows(teacher, b, torch.device("cpu"))
            s_logits = forward_rows(net, b, torch.device("cpu"))
            loss = torch.nn.functional.kl_div(
                torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1),
                log_target=True, reduction="batchmean",
            )
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # the first step warms up allocator and kernels
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = statistics.mean(float(b["rows"].numel()) for b in batches[1:])
    return {"variant": args.variant, "step_s": statistics.median(times),
            "tokens_per_step": tokens, "peak_rss_mb": peak, "rss_before_steps_mb": base}


def replicated(cache: str, copies: int, out: str) -> str:
    """The real cache's sequences written `copies` times into a bigger cache (same card), so
    that loader throughput is measured in steady state, not dominated by worker start-up."""
    if os.path.exists(os.path.join(out, "manifest.parquet")):
        return out
    src = open_cache(cache)
    seqs = list(src)
    with CacheWriter(out, replace(src.card, planned_shards=copies)) as writer:
        for c in range(copies):
            writer.write_shard(seqs, first_sequence=c * len(seqs))
        writer.finish(copies)
    return out


def loader_throughput(cache: str | list[str], batch_tokens: int, verify_reads: bool = True
                      ) -> dict:
    """Supervised tokens/s one DataLoader worker delivers over one epoch (start-up included)."""
    ds = CacheDataset(cache, LoaderConfig(batch_tokens=batch_tokens, num_workers=1,
                                          verify_reads=verify_reads))
    tokens, batches = 0, 0
    t0 = time.perf_counter()
    for b in make_loader(ds):
        tokens += int(b["rows"].numel())
        batches += 1
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": tokens / elapsed, "batches": batches, "tokens": tokens}


def checksum_cost(cache: str, batch_tokens: int, repeats: int = 6) -> None:
    """What checking every shard against the manifest's sha256 costs the loader: epochs with
    checks on and off, interleaved; and per shard, hashing vs decoding time."""
    runs = {True: [], False: []}
    for r in range(repeats):  # alternate which goes first, so neither gains from order
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            runs[on].append(loader_throughput(cache, batch_tokens, on)["tokens_per_s"])
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    src = open_cache(cache, check=False)
    decode = hashing = 0.0
    for i in range(len(src.shard_rows)):
        t0 = time.perf_counter()
        arrays = src.read_shard(i)
        t1 = time.perf_counter()
        for values in arrays.values():
            array_sha256(values)
        decode, hashing = decode + t1 - t0, hashing + time.perf_counter() - t1
    print(f"loader with checksums {on:.0f} tokens/s, without {off:.0f} (median of {repeats} "
          f"interleaved epochs): {on / off:.3f}x; per shard, sha256 takes "
          f"{hashing / decode * 100:.1f} % of the decode time")


def two_caches(args) -> None:
    """Loader throughput with two teachers' caches read in lock-step vs one, and the join's
    cost per micro-batch."""
    teacher, cache_a, _ = prepare(args)
    root = os.path.dirname(cache_a)
    teacher_b = os.path.join(root, "teacher-b-24L")
    if not os.path.exists(os.path.join(teacher_b, "config.json")):
        init_student(teacher, "24", teacher_b)
    cache_b = cache_a + "-teacher-b"
    if not os.path.exists(os.path.join(cache_b, "complete.json")):
        card = open_cache(cache_a).card
        dump_teacher(DumpConfig(model=teacher_b, data=DataSpec(source=card.data_source,
                                                               text_field="text",
                                                               max_length=256),
                                output=cache_b, top_k=32, batch_tokens=4096, batch_size=None,
                                progress=False), log=lambda m: None)
    big_a = replicated(cache_a, 40, cache_a + "-x40")
    big_b = replicated(cache_b, 40, cache_b + "-x40")
    arms = {"A": big_a, "B": big_b, "A+B": [big_a, big_b], "A, old read-ahead": big_a}
    runs = {name: [] for name in arms}
    fixed_get = ShardReadAhead.get
    for r in range(args.repeats):
        names = list(arms) if r % 2 == 0 else list(reversed(arms))
        for name in names:
            ShardReadAhead.get = _read_ahead_before_fix if "old" in name else fixed_get
            t = loader_throughput(arms[name], args.batch_tokens)
            runs[name].append(t["tokens"] / t["tokens_per_s"])  # seconds per epoch
    ShardReadAhead.get = fixed_get
    from atkd_cache.train.trainer import sparse_teacher

    batches = micro_batches([cache_a, cache_b], args.batch_tokens, 8)
    one, both = [], []
    for b in batches:
        for out, batch in ((one, {k: v for k, v in b.items() if not k.startswith("teacher")}),
                           (both, b)):
            t0 = time.perf_counter()
            sparse_teacher(batch, torch.device("cpu"), LossConfig())
            out.append(time.perf_counter() - t0)
    results = {
        "epoch_tokens": t["tokens"], "repeats": args.repeats,
        "epoch_s": {name: statistics.median(v) for name, v in runs.items()},
        "join_rows": statistics.mean(float(b["rows"].numel()) for b in batches),
        "rows_ms_one": statistics.median(one) * 1e3, "rows_ms_two": statistics.median(both) * 1e3,
    }
    with open(args.two_caches_out, "w") as f:
        json.dump(results, f, indent=1)
    print(two_caches_report(results))


def _read_ahead_before_fix(self, shard: int):
    """ShardReadAhead.get as it was before the fix (for the "before" arm only): it read ahead
    the next shards in plan order even when the shuffle buffer had asked for them already."""
    if self.pool is None:
        return self.cache.read_shard(shard)
    future = self.futures.pop(shard, None) or self.pool.submit(self.cache.read_shard, shard)
    at = self.order.index(shard) if shard in self.order else len(self.order)
    for nxt in self.order[at + 1 : at + 1 + self.depth]:
        if nxt not in self.futures:
            self.futures[nxt] = self.pool.submit(self.cache.read_shard, nxt)
    return future.result()


def two_caches_report(r: dict) -> str:
    """The markdown of docs/benchmarks.md's two-caches section, from its results file."""
    sec, tokens = r["epoch_s"], r["epoch_tokens"]
    rows = [f"| {name} | {s:.2f} | {tokens / s:,.0f} |" for name, s in sec.items()]
    return "\n".join([
        f"One loader worker, checksums on, one epoch of {tokens:,} supervised tokens, median "
        f"of {r['repeats']} interleaved epochs:", "",
        "| loader epoch over | seconds | supervised tokens/s |", "|---|---|---|", *rows, "",
        f"A + B in lock-step / (A, then B): **{sec['A+B'] / (sec['A'] + sec['B']):.2f}×**; "
        f"A + B / A alone: {sec['A+B'] / sec['A']:.2f}×. Joining the two teachers' rows "
        f"(`mixture`): {r['rows_ms_two']:.1f} ms per micro-batch of {r['join_rows']:,.0f} "
        f"rows ({r['rows_ms_one']:.1f} ms for one cache's rows). The read-ahead fix: one "
        f"cache, {tokens / sec['A, old read-ahead']:,.0f} → {tokens / sec['A']:,.0f} "
        f"tokens/s ({sec['A, old read-ahead'] / sec['A']:.2f}×).",
    ])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--variant", choices=VARIANTS, default=None)
    ap.add_argument("--two-caches", action="store_true",
                    help="Only the loader with two teachers' caches vs one.")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--two-caches-out", default="docs/bench_two_caches.json")
    ap.add_argument("--report", action="store_true",
                    help="With --two-caches: only print the table from --two-caches-out.")
    ap.add_argument("--loader-only", action="store_true",
                    help="Only the loader: checksum cost and throughput.")
    args = ap.parse_args()
    if args.two_caches and args.report:
        with open(args.two_caches_out) as f:
            print(two_caches_report(json.load(f)))
        return
    if args.two_caches:
        two_caches(args)
        return
    if args.loader_only:
        _, cache, _ = prepare(args)
        big = replicated(cache, 40, cache + "-x40")
        checksum_cost(big, args.batch_tokens)
        return
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    _, cache, _ = prepare(args)
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
               "--batch-tokens", str(args.batch_tokens), "--steps", str(args.steps),
               "--workdir", args.workdir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        print(results[variant], flush=True)
    ce = results["ce"]
    print(f"\n{'variant':10s} {'step s':>8s} {'x CE':>6s} {'peak RSS MB':>12s} {'x CE':>6s}")
    for v, r in results.items():
        print(f"{v:10s} {r['step_s']:8.2f} {r['step_s'] / ce['step_s']:6.2f} "
              f"{r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / ce['peak_rss_mb']:6.2f}")
    online, atkd = results["online-kd"], results["atkd"]
    print(f"cached ATKD vs online KD: {atkd['step_s'] / online['step_s']:.2f}x time, "
          f"{online['peak_rss_mb'] - atkd['peak_rss_mb']:.0f} MB less peak memory")
    big = replicated(cache, 40, cache + "-x40")
    checksum_cost(big, args.batch_tokens)
    load = loader_throughput(big, args.batch_tokens)
    consume = atkd["tokens_per_step"] / atkd["step_s"]
    print(f"loader (1 worker, {load['tokens']} tokens in {load['batches']} batches): "
          f"{load['tokens_per_s']:.0f} supervised tokens/s; trainer (ATKD) "
          f"consumes {consume:.0f} tokens/s: ratio {load['tokens_per_s'] / consume:.0f}x")


if __name__ == "__main__":
    main()
