"""The data-parallel teacher pass for real: torchrun with 2 CPU processes writes the same cache
as one process; a rank killed with -9 and re-run alone completes it; ranks of another world
size finish a partly written cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import verify_cache
from atkd_cache.cache.writer import CacheWriter

CLI = [sys.executable, "-m", "atkd_cache.cli.main"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def args(assets, data, out, *extra):
    return [
        "dump-teacher", "--model", assets["llama"], "--data", data, "--text-field", "text",
        "-o", str(out), "--top-k", "8", "--dtype", "fp32", "--batch-size", "4",
        "--shard-positions", "600", "--no-progress", *extra,
    ]


def arrays(path):
    cache = open_cache(path)
    return {k: cache.column(k) for k in cache.array_names if not k.endswith("_offsets")}


def assert_same_cache(got, expected):
    a, b = arrays(got), arrays(expected)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    cache = open_cache(got)
    assert verify_cache(cache) == []
    assert not (got / "parts").exists()  # per-rank manifests are gone once complete


def run(cmd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_ranks_equal_one_process_and_a_killed_rank_reruns_alone(assets, tmp_path):
    data = tiny.write_datasets(str(tmp_path / "data"), n=200, seed=5)["text"]
    single = tmp_path / "single"
    run(CLI + args(assets, data, single))
    n_shards = len(open_cache(single).shard_rows)
    assert n_shards >= 4

    both = tmp_path / "torchrun"
    r = run(TORCHRUN + ["--nproc_per_node", "2", "-m", "atkd_cache.cli.main",
                        *args(assets, data, both)])
    assert "cache:" in r.stdout  # the last rank to finish reports the whole cache
    assert_same_cache(both, single)

    # rank 1 is killed after its first committed shard; rank 0 runs to its end meanwhile
    out = tmp_path / "killed"
    victim = subprocess.Popen(CLI + args(assets, data, out, "--rank", "1", "--world-size", "2"),
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out / "parts" / "rank-00001-of-00002.parquet"
    deadline = time.time() + 120
    while victim.poll() is None and time.time() < deadline:
        if part.exists() and pq.read_metadata(part).num_rows >= 1:
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    r0 = run(CLI + args(assets, data, out, "--rank", "0", "--world-size", "2"))
    assert "rank 0 of 2" in r0.stdout and "once the other ranks finish" in r0.stdout
    partial = open_cache(out)  # readers see the committed prefix, which verifies
    assert 1 <= len(partial.shard_rows) < n_shards and verify_cache(partial) == []
    r1 = run(CLI + args(assets, data, out, "--rank", "1", "--world-size", "2"))
    assert "resuming after" in r1.stderr and "cache:" in r1.stdout
    assert_same_cache(out, single)


def test_other_world_size_finishes_a_partial_cache(assets, tmp_path):
    data = tiny.write_datasets(str(tmp_path / "data"), n=120, seed=6)["text"]
    single = tmp_path / "single"
    run(CLI + args(assets, data, single))
    out = tmp_path / "mixed"
    run(CLI + args(assets, data, out, "--rank", "2", "--world-size", "3"))
    assert len(open_cache(out).shard_rows) == 0  # shard 0 is not there yet: nothing listed
    run(CLI + args(assets, data, out))  # one process does what is left
    assert_same_cache(out, single)


# The other rank: replace its part manifest, atomically, with one of two versions, until told.
REPLACER = """
import os, sys
part, stop, *versions = sys.argv[1:]
i = 0
while not os.path.exists(stop):
    tmp = part + ".next"
    with open(tmp, "wb") as f:
        f.write(open(versions[i % 2], "rb").read())
    os.replace(tmp, part)
    i += 1
"""


def test_a_part_manifest_replaced_while_read_is_read_whole(assets, tmp_path):
    """Rank 0 merges the manifest while rank 1 renames a new part manifest into place: the
    read sees the old file or the new one, never the old footer with the new pages (CI saw
    "parts/rank-00001-of-00002.parquet is unreadable" from exactly that)."""
    from conftest import dump

    dump(assets, tmp_path / "src", limit=16, shard_positions=300)
    src = open_cache(tmp_path / "src")
    rows = pq.read_table(tmp_path / "src" / "manifest.parquet")
    assert rows.num_rows == 2
    versions = [tmp_path / "one.parquet", tmp_path / "two.parquet"]
    pq.write_table(rows.slice(0, 1), versions[0])
    pq.write_table(rows, versions[1])
    stop = tmp_path / "stop"
    with CacheWriter(tmp_path / "c", src.card, rank=0, world_size=2) as writer:
        part = tmp_path / "c" / "parts" / "rank-00001-of-00002.parquet"
        pq.write_table(rows.slice(0, 1), part)
        other = subprocess.Popen([sys.executable, "-c", REPLACER, str(part), str(stop),
                                  *map(str, versions)])
        try:
            seen = {len(writer._all_rows()) for _ in range(1500)}
        finally:
            stop.touch()
            other.wait(timeout=30)
    assert seen <= {1, 2} and other.returncode == 0
