"""Sharing caches: the content fingerprint (same content -> same fingerprint wherever it was
made; any parameter -> another), `info` shows it, training runs record it and refuse to
resume on another cache; `concat` joins parts of the data into what one dump of all of it
would be."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from atkd_cache.cache import open_cache
from atkd_cache.cache.concat import concat_caches
from atkd_cache.cache.inspect import verify_cache
from atkd_cache.cli.main import main
from atkd_cache.errors import UserError
from atkd_cache.losses.kd import LossConfig
from atkd_cache.train.loader import LoaderConfig
from atkd_cache.train.student import init_student
from atkd_cache.train.trainer import TrainConfig, train
from conftest import dump


@pytest.fixture(scope="module")
def parts(assets, tmp_path_factory):
    """The chat data as one file and as two halves, dumped one sequence per forward."""
    root = tmp_path_factory.mktemp("share")
    lines = open(assets["chat"]).read().splitlines()
    half = len(lines) // 2
    files = {"all": lines, "a": lines[:half], "b": lines[half:]}
    out = {}
    for name, rows in files.items():
        path = root / f"{name}.jsonl"
        path.write_text("\n".join(rows) + "\n")
        out[name] = root / f"cache-{name}"
        dump({**assets, "chat": str(path)}, out[name], shape="chat", batch_size=1,
             shard_positions=60)
    return out


def test_fingerprint_is_content_not_place(assets, parts, tmp_path):
    moved_teacher = tmp_path / "teacher-copy"
    shutil.copytree(assets["llama"], moved_teacher)
    again = tmp_path / "again"
    dump({**assets, "llama": str(moved_teacher)}, again, shape="chat", batch_size=1,
         shard_positions=200)  # other path, other shard size: same content
    ref = open_cache(parts["all"]).card
    assert ref.fingerprint.startswith("sha256:") and ref.fingerprint == ref.content_fingerprint()
    assert open_cache(again).card.fingerprint == ref.fingerprint
    other = tmp_path / "other"
    dump(assets, other, shape="chat", batch_size=1, top_k=4)
    assert open_cache(other).card.fingerprint != ref.fingerprint
    assert open_cache(parts["a"]).card.fingerprint != ref.fingerprint  # other data
    r = CliRunner().invoke(main, ["info", str(parts["all"])])
    assert r.exit_code == 0 and f"fingerprint {ref.fingerprint}" in r.output


def test_concat_equals_one_dump_of_all_the_data(parts, tmp_path):
    out = tmp_path / "joined"
    r = CliRunner().invoke(main, ["concat", str(parts["a"]), str(parts["b"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    joined, whole = open_cache(out), open_cache(parts["all"])
    a, b = open_cache(parts["a"]), open_cache(parts["b"])
    assert len(joined) == len(whole) == len(a) + len(b)
    assert len(joined.shard_rows) == len(a.shard_rows) + len(b.shard_rows)
    assert verify_cache(joined) == []
    for name in joined.array_names:
        if name in ("seq_ids", "token_offsets", "sup_offsets"):
            continue
        np.testing.assert_array_equal(joined.column(name), whole.column(name), err_msg=name)
    for i in range(len(joined)):  # sequence by sequence, through the reader
        np.testing.assert_array_equal(joined[i].topk_ids, whole[i].topk_ids)
    card = joined.card
    assert card.extra["concat"][1]["fingerprint"] == b.card.fingerprint
    assert card.fingerprint not in (a.card.fingerprint, b.card.fingerprint)
    # the sources are untouched (their shard metadata was replaced, not written through)
    assert verify_cache(a) == [] and verify_cache(b) == []
    assert json.load(open(parts["b"] / "shards" / "shard-000000" / "zarr.json"))[
        "attributes"]["shard_index"] == 0


def test_concat_refuses_other_cards_and_used_outputs(assets, parts, tmp_path):
    other = tmp_path / "k4"
    dump(assets, other, shape="chat", top_k=4)
    with pytest.raises(UserError, match="top_k is 4 there but 8"):
        concat_caches([str(parts["a"]), str(other)], str(tmp_path / "x"))
    r = CliRunner().invoke(main, ["concat", str(parts["a"]), str(parts["b"]), "-o",
                                  str(parts["all"])])
    assert r.exit_code != 0 and "not empty" in r.output and "Traceback" not in r.output
    assert not any(p.name.startswith(".x.concat") for p in tmp_path.iterdir())


def test_runs_record_the_fingerprint_and_resume_only_on_it(assets, parts, tmp_path):
    student = str(tmp_path / "student")
    init_student(assets["llama"], "1", student)
    cfg = TrainConfig(
        cache=str(parts["a"]), student=student, output=str(tmp_path / "run"), max_steps=2,
        loss=LossConfig(loss="kd"), loader=LoaderConfig(batch_tokens=300, num_workers=0),
        progress=False, tensorboard=False, checkpoint_every=1,
    )
    summary = train(cfg, log=lambda m: None)
    fp = open_cache(parts["a"]).card.fingerprint
    assert summary["cache_fingerprint"] == fp
    assert json.load(open(os.path.join(cfg.output, "run.json")))["cache_fingerprint"] == fp
    cfg.resume, cfg.max_steps, cfg.cache = True, 3, str(parts["b"])
    with pytest.raises(UserError, match="resume with the cache the run started on"):
        train(cfg, log=lambda m: None)
