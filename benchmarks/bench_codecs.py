"""Which codec per array: compressed bytes per supervised token of a real k=32 cache shard
(written by bench_dump.py) under several Blosc/zstd settings, and encode/decode speed.

    python benchmarks/bench_codecs.py [runs/bench/cache-k32]
"""

from __future__ import annotations

import os
import sys
import time

import numcodecs
import zarr

CODECS = {
    "zstd-3": numcodecs.Zstd(level=3),
    "blosc-zstd5-noshuffle": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.NOSHUFFLE),
    "blosc-zstd5-shuffle": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE),
    "blosc-zstd5-bitshuffle": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.BITSHUFFLE),
    "blosc-zstd9-shuffle": numcodecs.Blosc("zstd", 9, numcodecs.Blosc.SHUFFLE),
    "blosc-lz4-shuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
}


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "runs/bench/cache-k32"
    root = zarr.open_group(path, mode="r")
    shard = next(iter(root["shards"].groups()))[1]
    m = shard["target_logprob"].shape[0]
    names = ["topk_ids", "topk_logprobs", "target_logprob", "entropy", "uncertainty",
             "input_ids", "supervised", "hard"]
    print(f"{m} supervised positions; bytes per supervised token (raw -> compressed)")
    print(f"{'array':16s} {'raw':>6s} " + " ".join(f"{c:>22s}" for c in CODECS))
    totals = dict.fromkeys(CODECS, 0.0)
    speed = dict.fromkeys(CODECS, 0.0)
    for name in names:
        a = shard[name][...]
        cells = []
        for cname, codec in CODECS.items():
            t0 = time.perf_counter()
            enc = codec.encode(a)
            codec.decode(enc)
            speed[cname] += time.perf_counter() - t0
            totals[cname] += len(enc) / m
            cells.append(f"{len(enc) / m:22.2f}")
        print(f"{name:16s} {a.nbytes / m:6.2f} " + " ".join(cells))
    print(f"{'total':16s} {'':6s} " + " ".join(f"{totals[c]:22.2f}" for c in CODECS))
    print(f"{'enc+dec ms':16s} {'':6s} " + " ".join(f"{speed[c] * 1000:22.1f}" for c in CODECS))
    print(f"(on disk the writer adds a 4-byte crc32c per chunk; shard dir: "
          f"{sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)}"
          " bytes)")


if __name__ == "__main__":
    main()
