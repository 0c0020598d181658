"""Packing options for the packed encoding, measured on real shards (written by
bench_fidelity.py): bytes per supervised token of each array under candidate filters, all
followed by the writer's Blosc-zstd 5 (shuffle as noted), plus the worst relative error of
the lossy ones. What the packed encoding uses is marked with *.

    python benchmarks/bench_packing.py [runs/bench/fidelity]
"""

from __future__ import annotations

import os
import sys

import numcodecs
import numpy as np
import zarr

BLOSC = {
    "noshuffle": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.NOSHUFFLE),
    "shuffle": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE),
}


def size(a: np.ndarray, shuffle: str) -> int:
    return len(BLOSC[shuffle].encode(np.ascontiguousarray(a)))


def shard_of(path: str):
    root = zarr.open_group(path, mode="r")
    return next(iter(root["shards"].groups()))[1]


def ids_table(shard, name: str, m: int) -> None:
    ids = shard[name][...]
    print(f"\n{name} ({ids.dtype}, {ids.size} ids): bytes/token")
    rows = {
        "* as stored, no shuffle": size(ids, "noshuffle"),
        "delta-coded (numcodecs Delta), no shuffle": size(
            numcodecs.Delta(ids.dtype).encode(ids.ravel()), "noshuffle"),
        "delta-coded, byte shuffle": size(numcodecs.Delta(ids.dtype).encode(ids.ravel()),
                                          "shuffle"),
        "as uint32 (V > 65,536), byte shuffle": size(ids.astype("<u4"), "shuffle"),
        "as uint32, no shuffle": size(ids.astype("<u4"), "noshuffle"),
    }
    if name == "topk_ids":  # the loss does not care about the order inside a row
        by_id = np.sort(ids, axis=1)
        rows["sorted by id per row, delta-coded"] = size(
            numcodecs.Delta(ids.dtype).encode(by_id.ravel()), "noshuffle")
    for label, n in rows.items():
        print(f"  {label:44s} {n / m:7.2f}")


def floats_table(shard, name: str, m: int, bits: list[int], chosen: int) -> None:
    a = shard[name][...]
    print(f"\n{name} ({a.dtype}): bytes/token, max relative error")
    for keep in bits:
        r = numcodecs.BitRound(keep).encode(a).view(a.dtype).reshape(a.shape) if keep else a
        nz = a != 0
        err = float(np.max(np.abs(r[nz] - a[nz]) / np.abs(a[nz]))) if nz.any() else 0.0
        mark = "*" if keep == chosen else " "
        label = "as stored" if keep == 0 else f"bitround keep {keep} bits"
        print(f"  {mark} {label:26s} {size(r, 'shuffle') / m:7.2f}   {err:.2e}")


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else "runs/bench/fidelity"
    topk = shard_of(os.path.join(base, "topk-k32-standard"))
    sampled = shard_of(os.path.join(base, "sampled-N50-standard"))
    m = topk["target_logprob"].shape[0]
    print(f"{m} supervised positions")
    ids_table(topk, "topk_ids", m)
    ids_table(sampled, "sample_ids", m)
    counts = sampled["sample_counts"][...]
    print(f"\nsample_counts (uint8): no shuffle {size(counts, 'noshuffle') / m:.2f}")
    floats_table(topk, "topk_logprobs", m, [0, 10, 7, 5, 3], 7)
    for name, chosen in (("target_logprob", 10), ("uncertainty", 10), ("entropy", 7)):
        floats_table(topk, name, m, [0, 16, 10, 7, 5], chosen)


if __name__ == "__main__":
    main()
