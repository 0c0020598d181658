"""Caches at fsspec URLs, for real: an S3-compatible HTTP server (moto's server mode) started
on loopback; dump-teacher writes to s3:// from the command line (also after a kill -9),
verify/info read it, the loader reads it from forked workers with read-ahead, train-student
trains from it; and memory:// in process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from atkd_cache import tiny
from atkd_cache.cache import open_cache, writer
from atkd_cache.cache.inspect import verify_cache
from atkd_cache.cache.reader import read_manifest
from atkd_cache.cache.writer import CacheWriter
from atkd_cache.errors import UserError
from atkd_cache.train.loader import CacheDataset, LoaderConfig, make_loader
from conftest import dump

CLI = [sys.executable, "-m", "atkd_cache.cli.main"]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the environment that points clients at it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("caches")
    yield {"fs": fs, "env": {**os.environ, **env, "OMP_NUM_THREADS": "1"}}
    server.terminate()
    server.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def dump_args(assets, data, out, *extra):
    return [
        "dump-teacher", "--model", assets["llama"], "--data", data, "--text-field", "text",
        "-o", out, "--top-k", "8", "--dtype", "fp32", "--batch-size", "4",
        "--shard-positions", "500", "--no-progress", *extra,
    ]


def local_reference(assets, s3, tmp_path, n: int, seed: int):
    """A text dataset and its cache dumped to a local folder by the CLI."""
    data = tiny.write_datasets(str(tmp_path / "data"), n=n, seed=seed)["text"]
    local = tmp_path / "local"
    subprocess.run(CLI + dump_args(assets, data, str(local)), check=True, env=s3["env"],
                   capture_output=True)
    return data, local


def same_arrays(a, b):
    x, y = open_cache(a), open_cache(b)
    assert len(x) == len(y) and x.array_names == y.array_names
    for name in x.array_names:
        np.testing.assert_array_equal(x.column(name), y.column(name), err_msg=name)


def test_dump_to_s3_after_a_kill_then_read_and_train(assets, s3, tmp_path):
    data, local = local_reference(assets, s3, tmp_path, n=160, seed=8)
    url = "s3://caches/run-1/cache"
    victim = subprocess.Popen(CLI + dump_args(assets, data, url), env=s3["env"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while victim.poll() is None and time.time() < deadline:
        if s3["fs"].exists("caches/run-1/cache/manifest.parquet"):
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    r = subprocess.run(CLI + dump_args(assets, data, url), env=s3["env"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after" in r.stderr
    same_arrays(url, local)
    for cmd, expect in ((["verify", url], "ok:"), (["info", url], "fingerprint sha256:")):
        r = subprocess.run(CLI + cmd, env=s3["env"], capture_output=True, text=True)
        assert r.returncode == 0 and expect in r.stdout, r.stderr[-2000:]
    assert verify_cache(open_cache(url)) == []

    # the loader over s3 (forked workers, read-ahead) delivers what it delivers locally
    def batches(path):
        cfg = LoaderConfig(batch_tokens=400, num_workers=2, read_ahead=2, seed=3)
        out = [b for b in make_loader(CacheDataset(path, cfg))]
        return sorted((b["seq_index"].tolist(), b["topk_logprobs"].numpy().tobytes())
                      for b in out)

    assert batches(url) == batches(str(local))

    from atkd_cache.train.student import init_student

    student = str(tmp_path / "student")
    init_student(assets["llama"], "1", student)
    r = subprocess.run(CLI + ["train-student", "--cache", url, "--student", student, "-o",
                              str(tmp_path / "run"), "--max-steps", "2", "--batch-tokens",
                              "400", "--num-workers", "2", "--no-progress"],
                       env=s3["env"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 2 steps" in r.stdout


def test_memory_url_round_trip(assets, tmp_path):
    url = "memory://atkd-test/cache"
    dump(assets, url, shape="chat", shard_positions=100)
    dump(assets, tmp_path / "local", shape="chat", shard_positions=100)
    same_arrays(url, tmp_path / "local")
    assert verify_cache(open_cache(url)) == []


def test_two_ranks_write_one_s3_cache(assets, s3, tmp_path):
    data, local = local_reference(assets, s3, tmp_path, n=120, seed=9)
    url = "s3://caches/ranks/cache"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "atkd_cache.cli.main",
                        *dump_args(assets, data, url)], env=s3["env"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    same_arrays(url, local)
    assert verify_cache(open_cache(url)) == []
    s3["fs"].invalidate_cache()
    assert not s3["fs"].exists("caches/ranks/cache/parts")


class StaleListing(CacheWriter):
    """A writer whose look for the card finds none, as a rank's does when the other rank
    puts the card just after it (or when its client's listing cache predates the put)."""

    def _exists(self, *parts: str) -> bool:
        return parts != ("zarr.json",) and super()._exists(*parts)


def test_a_rank_that_misses_the_card_keeps_the_one_put_first(assets, tmp_path, monkeypatch):
    # CI saw two ranks on S3 both create zarr.json (the manifest's card digest was taken of
    # one, the other stayed, and the finished cache read as damaged), and a rank that looked
    # for the card, then listed the folder, take the card put meanwhile for a stranger's file
    monkeypatch.setattr(writer, "CARD_WAIT_S", 0.0)  # no head start for rank 0: the race
    dump(assets, tmp_path / "c", limit=2)
    card = open_cache(tmp_path / "c").card
    url = "memory://atkd-race/card"
    with CacheWriter(url, replace(card, created_at="first"), rank=0, world_size=2):
        pass
    with StaleListing(url, replace(card, created_at="second"), rank=1, world_size=2) as late:
        assert late.card.created_at == "first"
    assert open_cache(url, check=False).card.created_at == "first"
    with pytest.raises(UserError, match="top_k is 8 in the cache but 4 now"):
        StaleListing(url, replace(card, top_k=4), rank=1, world_size=2).open()


def test_ranks_on_an_object_store_put_only_the_whole_manifest(assets, tmp_path):
    # Two ranks' puts of a growing prefix can land out of order there (no lock orders
    # them); a short one landing after the cache is marked complete would damage it.
    dump(assets, tmp_path / "local", shape="chat", shard_positions=100)
    url = "memory://atkd-ranks/cache"
    dump(assets, url, shape="chat", shard_positions=100, rank=0, world_size=2)
    assert len(read_manifest(url)) == 0  # rank 0 committed its shards to its part only
    assert open_cache(url).status == "partial" and len(open_cache(url)) == 0
    dump(assets, url, shape="chat", shard_positions=100, rank=1, world_size=2)
    assert len(read_manifest(url)) == len(open_cache(tmp_path / "local").shard_rows) >= 4
    same_arrays(url, tmp_path / "local")
    assert verify_cache(open_cache(url)) == []
