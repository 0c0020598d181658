"""Complete vs partial caches and damage on real caches written by the CLI's library calls:
readers refuse damaged data (never zeros), a data-parallel dump is partial until its last rank
finishes, verify fails on lost files but only notes an interrupted dump's leftovers, and a
damaged shard stops training on every rank (DataLoader workers, torchrun) before it is used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import leftovers, verify_cache
from atkd_cache.cache.integrity import manifest_table
from atkd_cache.cache.reader import DamagedCache
from atkd_cache.cli.main import main
from atkd_cache.errors import UserError
from conftest import dump

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
CHUNK = ("shards", "shard-000001", "topk_logprobs", "c", "0", "0")


@pytest.fixture(scope="module")
def cache(assets, tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "cache"
    dump(assets, path, limit=16, shard_positions=150)
    return path


def copy(cache, tmp_path, name="c"):
    shutil.copytree(cache, tmp_path / name)
    return tmp_path / name


def test_missing_chunk_is_refused_where_zarr_would_give_zeros(cache, tmp_path):
    c = copy(cache, tmp_path)
    first = open_cache(c).shard_rows[1]["first_sequence"]
    good = open_cache(c)[first].topk_logprobs.copy()
    os.remove(c.joinpath(*CHUNK))
    unchecked = open_cache(c, check=False)[first].topk_logprobs
    assert (unchecked == 0).all() and not (good == 0).all()  # what zarr hands out silently
    with pytest.raises(DamagedCache, match=r"shard-000001/topk_logprobs: differs from its "):
        open_cache(c)[first]
    assert open_cache(c)[0].topk_logprobs.shape[1] == 8  # the other shards still read
    assert verify_cache(open_cache(c, check=False)) == [
        "shard-000001/topk_logprobs: sha256 differs from the manifest"]


def test_complete_cache_records_its_counts(cache):
    opened = open_cache(cache)
    record = json.loads((cache / "complete.json").read_text())
    assert opened.status == "complete" and opened.card.planned_shards == len(opened.shard_rows)
    assert record["shards"] == len(opened.shard_rows) >= 3
    assert record["sequences"] == len(opened) == 16
    assert record["supervised"] == opened.num_supervised and not (cache / "parts").exists()
    r = CliRunner().invoke(main, ["info", str(cache)])
    assert f"status                     complete ({record['shards']} shards)" in r.output
    r = CliRunner().invoke(main, ["verify", str(cache)])
    assert r.exit_code == 0 and r.output.startswith("ok: complete")


def test_lost_completion_record_or_parts_fail_verify(cache, tmp_path):
    c = copy(cache, tmp_path)
    os.remove(c / "complete.json")
    problems = verify_cache(open_cache(c, check=False))
    assert problems == ["complete.json is missing though the manifest lists every planned shard"]
    with pytest.raises(UserError, match="complete.json is missing"):
        open_cache(c)


def test_data_parallel_dump_is_partial_until_the_last_rank(assets, cache, tmp_path):
    out = tmp_path / "dp"
    s0 = dump(assets, out, limit=16, shard_positions=150, rank=0, world_size=2)
    assert not s0.complete
    partial = open_cache(out)
    n = partial.card.planned_shards
    assert partial.status == "partial" and len(partial.shard_rows) == 1 < n
    assert not (out / "complete.json").exists() and (out / "parts").exists()
    r = CliRunner().invoke(main, ["info", "--json", str(out)])
    assert json.loads(r.output)["status"] == f"partial (1 of {n} shards committed)"
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and f"\nok: partial (1 of {n} shards committed)" in r.output
    assert "note:" in r.output and "not in the manifest" in r.output  # rank 0's later shards
    student = assets["llama"]
    args = ["train-student", "--cache", str(out), "--student", student, "--max-steps", "1",
            "--batch-tokens", "256", "--num-workers", "0", "--no-progress", "--no-tensorboard"]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r1")])
    assert r.exit_code == 2 and "--allow-partial" in r.output
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r2"), "--allow-partial"])
    assert r.exit_code == 0, r.output
    assert f"warning: {out} is partial (1 of {n} shards committed)" in r.output
    s1 = dump(assets, out, limit=16, shard_positions=150, rank=1, world_size=2)
    assert s1.complete
    done = open_cache(out)
    assert done.status == "complete" and not (out / "parts").exists()
    assert verify_cache(done) == [] and leftovers(done) == []
    assert (out / "complete.json").read_bytes() == (cache / "complete.json").read_bytes()


def test_interrupted_dump_leftovers_are_noted_not_failed(cache, tmp_path):
    c = copy(cache, tmp_path)
    shutil.copytree(c / "shards" / "shard-000000", c / "shards" / "shard-000009")
    (c / ".tmp").mkdir(exist_ok=True)
    (c / ".tmp" / "manifest.parquet.123").write_text("half")
    r = CliRunner().invoke(main, ["verify", str(c)])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "shard-000009" in notes[0] and ".tmp/" in notes[1]


def test_damaged_shard_stops_forked_workers_and_torchrun_ranks(assets, cache, tmp_path):
    c = copy(cache, tmp_path)
    os.remove(c.joinpath(*CHUNK))
    base = [sys.executable, "-m", "atkd_cache.cli.main", "train-student", "--cache", str(c),
            "--student", assets["llama"], "--epochs", "1", "--batch-tokens", "128",
            "--no-progress", "--no-tensorboard"]
    expect = "shard-000001/topk_logprobs: differs from its sha256 in the manifest"
    r = subprocess.run(base + ["-o", str(tmp_path / "w2"), "--num-workers", "2"], env=ENV,
                       capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and expect in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "w2" / "model").exists()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "atkd_cache.cli.main", *base[3:]]
    r = subprocess.run(torchrun + ["-o", str(tmp_path / "ddp"), "--num-workers", "1"], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and expect in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "ddp" / "model").exists()
    # the same runs on the intact cache train (the failure above is the damage, not the setup)
    r = subprocess.run(base[:5] + [str(cache)] + base[6:] + ["-o", str(tmp_path / "ok"),
                                                             "--num-workers", "2"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_concat_output_is_complete_and_verifies_part_fingerprints(assets, cache, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    dump(assets, a, limit=8, shard_positions=150)
    dump(assets, b, limit=16, shard_positions=150)
    out = tmp_path / "joined"
    r = CliRunner().invoke(main, ["concat", str(a), str(b), "-o", str(out)])
    assert r.exit_code == 0, r.output
    joined = open_cache(out)
    assert joined.status == "complete" and verify_cache(joined) == []
    parts = joined.card.extra["concat"]
    assert [p["data_fingerprint"] for p in parts] == [open_cache(a).card.data_fingerprint,
                                                       open_cache(b).card.data_fingerprint]
    # the joined data_fingerprint is recomputed per part: swapping two parts' rows breaks it
    card = json.loads((out / "zarr.json").read_text())
    parts[0]["data_fingerprint"], parts[1]["data_fingerprint"] = (parts[1]["data_fingerprint"],
                                                                  parts[0]["data_fingerprint"])
    card["attributes"]["extra"]["concat"] = parts
    (out / "zarr.json").write_text(json.dumps(card))
    problems = verify_cache(open_cache(out, check=False))
    assert problems == ["the card (zarr.json) differs from the one the manifest was written with"]
    np.testing.assert_array_equal(open_cache(out, check=False)[0].input_ids,
                                  open_cache(a)[0].input_ids)
    # ... and with the manifest's card digest forged to match, the recomputed part
    # fingerprints still give it away
    table = pq.read_table(out / "manifest.parquet")
    pq.write_table(manifest_table(table.to_pylist(), card["attributes"]),
                   out / "manifest.parquet")
    assert verify_cache(open_cache(out)) == [
        "card: a part's data_fingerprint does not match its stored sequences"]
