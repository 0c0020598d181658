"""Every verb with bad input: one line saying what is wrong and how to fix it, a non-zero exit,
no traceback, and nothing half-written. Each case here is a row of docs/reliability.md (the
test checks that the doc shows the line the case gets)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from atkd_cache.cache.integrity import manifest_table
from atkd_cache.cli.main import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def train_args(cache, student, out, *extra):
    return ["train-student", "--cache", str(cache), "--student", str(student), "-o", str(out),
            "--max-steps", "2", "--batch-tokens", "256", "--num-workers", "0", "--no-progress",
            "--no-tensorboard", *extra]


@pytest.fixture(scope="module")
def w(assets, tmp_path_factory):
    """Real caches, students and runs, good and damaged in the ways the cases need."""
    from conftest import dump

    p = tmp_path_factory.mktemp("reliability")
    dump(assets, p / "cache", limit=12, shard_positions=200)
    dump(assets, p / "partial", limit=12, shard_positions=200, rank=0, world_size=2)
    dump(assets, p / "fewer", limit=8, shard_positions=200)  # other data, for two caches
    shutil.copytree(p / "cache", p / "damaged")
    os.remove(p / "damaged" / "shards" / "shard-000001" / "topk_logprobs" / "c" / "0" / "0")
    shutil.copytree(p / "cache", p / "newer")
    meta = json.loads((p / "newer" / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (p / "newer" / "zarr.json").write_text(json.dumps(meta))
    shutil.copytree(p / "cache", p / "no-manifest")
    os.remove(p / "no-manifest" / "manifest.parquet")
    os.remove(p / "no-manifest" / "complete.json")
    shutil.copytree(p / "cache", p / "lost-rows")  # a self-consistent manifest, one row short
    table = pq.read_table(p / "lost-rows" / "manifest.parquet")
    attrs = json.loads((p / "lost-rows" / "zarr.json").read_text())["attributes"]
    pq.write_table(manifest_table(table.to_pylist()[:-1], attrs),
                   p / "lost-rows" / "manifest.parquet")
    (p / "not-a-cache").mkdir()
    (p / "not-a-cache" / "notes.txt").write_text("hello")
    (p / "a-file").write_text("x")
    shutil.copytree(assets["llama"], p / "no-weights")
    for f in (p / "no-weights").glob("*.safetensors"):
        f.unlink()
    r = CliRunner().invoke(main, train_args(p / "cache", assets["llama"], p / "run",
                                            "--checkpoint-every", "1"))
    assert r.exit_code == 0, r.output
    shutil.copytree(p / "run", p / "damaged-run")
    weights = p / "damaged-run" / "checkpoints" / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    rows = {
        "malformed.jsonl": '{"text": "one two three"}\n{"text": "four\n{"text": "five six"}\n',
        "empty.jsonl": "",
        "int-text.jsonl": '{"text": "one two three"}\n{"text": 5}\n',
        "null-text.jsonl": '{"text": "one two three"}\n{"text": null}\n',
        "bad-messages.jsonl": '{"messages": "hello"}\n',
    }
    for name, text in rows.items():
        (p / name).write_text(text)
    return {"p": p, "llama": assets["llama"], "text": assets["text"], "chat": assets["chat"]}


def dump_args(w, data, out, *extra):
    return ["dump-teacher", "--model", w["llama"], "--data", str(data), "--text-field", "text",
            "-o", str(out), "--top-k", "4", "--dtype", "fp32", "--no-progress", *extra]


# case id -> (arguments from the fixture, the fragment the one error line must contain)
CASES = {
    "dump/malformed-line": (lambda w: dump_args(w, w["p"] / "malformed.jsonl", w["p"] / "o1"),
                            "malformed.jsonl line 2: not valid JSON"),
    "dump/empty-file": (lambda w: dump_args(w, w["p"] / "empty.jsonl", w["p"] / "o2"),
                        "empty.jsonl is empty"),
    "dump/int-text": (lambda w: dump_args(w, w["p"] / "int-text.jsonl", w["p"] / "o3"),
                      "row 1 (counting from 0) has field 'text' = '5' of type int"),
    "dump/null-text": (lambda w: dump_args(w, w["p"] / "null-text.jsonl", w["p"] / "o4"),
                       "of type NoneType, not a string"),
    "dump/bad-messages": (
        lambda w: ["dump-teacher", "--model", w["llama"], "--data",
                   str(w["p"] / "bad-messages.jsonl"), "--messages-field", "messages",
                   "-o", str(w["p"] / "o5"), "--no-progress"],
        "must hold a list of {role, content} messages"),
    "dump/output-is-file": (lambda w: dump_args(w, w["text"], w["p"] / "a-file"),
                            "a-file is a file, not a folder"),
    "dump/output-under-file": (lambda w: dump_args(w, w["text"], w["p"] / "a-file" / "c"),
                               "a-file is a file, not a folder"),
    "dump/output-unwritable": (lambda w: dump_args(w, w["text"], "/sys/atkd-cache-test"),
                               "/sys is not writable"),
    "dump/output-not-a-cache": (lambda w: dump_args(w, w["text"], w["p"] / "not-a-cache"),
                                "exists and is not an atkd-cache cache"),
    "dump/missing-model": (lambda w: dump_args(w, w["text"], w["p"] / "o6", "--model",
                                               "/nope/model"), "/nope/model does not exist"),
    "dump/generate-plain-text": (lambda w: dump_args(w, w["text"], w["p"] / "o7", "--generate"),
                                 "--generate needs prompts: give --prompt-field"),
    "info/not-a-cache": (lambda w: ["info", str(w["p"] / "not-a-cache")],
                         "is not an atkd-cache cache"),
    "info/a-file": (lambda w: ["info", str(w["p"] / "a-file")],
                    "does not exist or is not a folder"),
    "info/newer-version": (lambda w: ["info", str(w["p"] / "newer")],
                           "newer atkd-cache (format version 99"),
    "info/manifest-lost": (lambda w: ["info", str(w["p"] / "no-manifest")],
                           "manifest.parquet is missing but shards/ holds"),
    "verify/not-a-cache": (lambda w: ["verify", str(w["p"] / "not-a-cache")],
                           "is not an atkd-cache cache"),
    "verify/missing-chunk": (lambda w: ["verify", str(w["p"] / "damaged")],
                             "shard-000001/topk_logprobs: sha256 differs from the manifest"),
    "verify/manifest-lost": (lambda w: ["verify", str(w["p"] / "no-manifest")],
                             "manifest.parquet is missing but shards/ holds"),
    "verify/manifest-lost-rows": (lambda w: ["verify", str(w["p"] / "lost-rows")],
                                  "shards but the manifest lists"),
    "export/output-not-empty": (lambda w: ["export", "--format", "axolotl", str(w["p"] / "cache"),
                                            "-o", str(w["p"] / "not-a-cache")],
                                "is not empty: give a new folder"),
    "export/partial-input": (lambda w: ["export", "--format", "axolotl", str(w["p"] / "partial"),
                                        "-o", str(w["p"] / "x1")],
                             "export a finished cache"),
    "export/damaged-input": (lambda w: ["export", "--format", "axolotl", str(w["p"] / "damaged"),
                                        "-o", str(w["p"] / "x2"), "--no-progress"],
                             "shard-000001/topk_logprobs: differs from its sha256"),
    "concat/one-input": (lambda w: ["concat", str(w["p"] / "cache"), "-o", str(w["p"] / "j1")],
                         "concat needs at least two caches"),
    "concat/output-is-file": (lambda w: ["concat", str(w["p"] / "cache"), str(w["p"] / "cache"),
                                         "-o", str(w["p"] / "a-file")],
                              "a-file is a file, not a folder"),
    "concat/not-a-cache": (lambda w: ["concat", str(w["p"] / "cache"),
                                      str(w["p"] / "not-a-cache"), "-o", str(w["p"] / "j2")],
                           "is not an atkd-cache cache"),
    "concat/partial-input": (lambda w: ["concat", str(w["p"] / "cache"), str(w["p"] / "partial"),
                                        "-o", str(w["p"] / "j3")],
                             "concat joins finished caches"),
    "concat/damaged-input": (lambda w: ["concat", str(w["p"] / "cache"), str(w["p"] / "damaged"),
                                        "-o", str(w["p"] / "j4")],
                             "is damaged (shard-000001/topk_logprobs: sha256 differs"),
    "init-student/output-exists": (
        lambda w: ["init-student", "--from", w["llama"], "--layers", "1", "-o",
                   str(w["p"] / "a-file")], "already exists: choose a new --output folder"),
    "init-student/output-under-file": (
        lambda w: ["init-student", "--from", w["llama"], "--layers", "1", "-o",
                   str(w["p"] / "a-file" / "s")], "a-file is a file, not a folder"),
    "init-student/bad-layers": (
        lambda w: ["init-student", "--from", w["llama"], "--layers", "x", "-o",
                   str(w["p"] / "s1")], "--layers must be a count or a comma list"),
    "init-student/missing-weights": (
        lambda w: ["init-student", "--from", str(w["p"] / "no-weights"), "--layers", "1", "-o",
                   str(w["p"] / "s2")], "cannot load a causal LM from"),
    "train/output-is-file": (lambda w: train_args(w["p"] / "cache", w["llama"],
                                                  w["p"] / "a-file"),
                             "a-file is a file, not a folder"),
    "train/not-a-cache": (lambda w: train_args(w["p"] / "not-a-cache", w["llama"], w["p"] / "r1"),
                          "is not an atkd-cache cache"),
    "train/partial-cache": (lambda w: train_args(w["p"] / "partial", w["llama"], w["p"] / "r2"),
                            "pass --allow-partial to train on what is committed"),
    "train/caches-of-other-data": (
        lambda w: train_args(w["p"] / "cache", w["llama"], w["p"] / "r6", "--cache",
                             str(w["p"] / "fewer")), "hold different data (data fingerprint"),
    "train/teacher-weights-count": (
        lambda w: train_args(w["p"] / "cache", w["llama"], w["p"] / "r7", "--cache",
                             str(w["p"] / "cache"), "--teacher-weights", "1,2,3"),
        "--teacher-weights: 3 teacher weights for 2 caches: give one per cache"),
    "train/missing-chunk": (lambda w: train_args(w["p"] / "damaged", w["llama"], w["p"] / "r3",
                                                 "--max-steps", "50"),
                            "shard-000001/topk_logprobs: differs from its sha256"),
    "train/newer-version": (lambda w: train_args(w["p"] / "newer", w["llama"], w["p"] / "r4"),
                            "newer atkd-cache (format version 99"),
    "train/missing-weights": (lambda w: train_args(w["p"] / "cache", w["p"] / "no-weights",
                                                   w["p"] / "r5"),
                              "cannot load a causal LM from"),
    "train/damaged-checkpoint": (
        lambda w: train_args(w["p"] / "cache", w["llama"], w["p"] / "damaged-run", "--resume",
                             "--max-steps", "3"),
        "model.safetensors differs from its sha256 (damaged)"),
    "evaluate/missing-weights": (lambda w: ["evaluate", "--model", str(w["p"] / "no-weights"),
                                            "--cache", str(w["p"] / "cache")],
                                 "cannot load a causal LM from"),
    "evaluate/not-a-cache": (lambda w: ["evaluate", "--model", w["llama"], "--cache",
                                        str(w["p"] / "not-a-cache")],
                             "is not an atkd-cache cache"),
    "evaluate/missing-chunk": (lambda w: ["evaluate", "--model", w["llama"], "--cache",
                                          str(w["p"] / "damaged")],
                               "shard-000001/topk_logprobs: differs from its sha256"),
    "evaluate/caches-of-other-data": (
        lambda w: ["evaluate", "--model", w["llama"], "--cache", str(w["p"] / "cache"),
                   "--cache", str(w["p"] / "fewer"), "--data", w["chat"],
                   "--messages-field", "messages"],
        "hold different data (data fingerprint"),
    "evaluate/teacher-weights-count": (
        lambda w: ["evaluate", "--model", w["llama"], "--cache", str(w["p"] / "cache"),
                   "--cache", str(w["p"] / "cache"), "--teacher-weights", "1,2,3"],
        "--teacher-weights: 3 teacher weights for 2 caches: give one per cache"),
    "evaluate/json-is-folder": (lambda w: ["evaluate", "--model", w["llama"], "--cache",
                                           str(w["p"] / "cache"), "--json", str(w["p"])],
                                "is a folder: give a file path"),
    "evaluate/malformed-data": (lambda w: ["evaluate", "--model", w["llama"], "--data",
                                           str(w["p"] / "malformed.jsonl"),
                                           "--prompt-field", "text", "--response-field", "text"],
                                "malformed.jsonl line 2: not valid JSON"),
    "study/unknown-arm": (lambda w: ["study", "--smoke", "--workdir", str(w["p"] / "st"),
                                     "--arms", "kd,atdk"],
                          "unknown arm or setting 'atdk'"),
    "study-report/not-json": (lambda w: ["study-report", str(w["p"] / "a-file")],
                              "a-file: not a readable results file"),
    "study-report/first-design": (lambda w: ["study-report", str(DOC.parent /
                                                              "study_v1_results.json")],
                                  "not a results file of the study's second design"),
}


# Refusals whose check needs only the flags or the caches' cards: nothing but the one line is
# printed (no model-loading or dataset-generating progress bar before it).
ONLY_THE_LINE = ("dump/generate-plain-text", "evaluate/caches-of-other-data",
                 "evaluate/teacher-weights-count", "train/caches-of-other-data",
                 "train/teacher-weights-count")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_line(w, case):
    build, expect = CASES[case]
    r = CliRunner().invoke(main, build(w))
    if case in ONLY_THE_LINE:
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    if case.startswith("verify/") and case != "verify/not-a-cache":  # verify lists problems
        assert r.exit_code == 1, r.output
        problem = [line for line in r.output.splitlines() if line.startswith("CORRUPT")]
        assert any(expect in line for line in problem), r.output
    else:
        assert r.exit_code == 2, r.output
        assert len(errors) == 1 and expect in errors[0], r.output
    doc_rows = [line for line in DOC.read_text().splitlines() if f"`{case}`" in line]
    assert len(doc_rows) == 1 and expect in doc_rows[0], f"docs/reliability.md row for {case}"


def test_nothing_half_written_by_the_failures(w):
    p = w["p"]
    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "j1", "j2", "j3", "j4", "s1", "s2"):
        assert not (p / name / "manifest.parquet").exists() and not (p / name / "model").exists()
    for name in ("x1", "x2"):  # export: the folder appears complete or not at all
        assert not (p / name).exists()
    assert not [n for n in os.listdir(p) if n.startswith(".atkd-export-")]
    assert not (p / "r3" / "model").exists()  # training stopped at the damaged shard
    assert sorted(os.listdir(p / "not-a-cache")) == ["notes.txt"]
    assert not os.path.exists("/sys/atkd-cache-test")
    assert not (p / "st").exists() and not (p / "st-quick").exists()  # study refused first
