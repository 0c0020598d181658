"""The command line: kill -9 and resume in a real subprocess, verify/info, and every bad input
giving one clear line and a non-zero exit without a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.cli.main import main

CLI = [sys.executable, "-m", "atkd_cache.cli.main"]


def dump_args(assets, data, out, *extra, shard_positions="400"):
    return [
        "dump-teacher", "--model", assets["llama"], "--data", data, "--text-field", "text",
        "-o", str(out), "--top-k", "8", "--dtype", "fp32", "--batch-size", "4",
        "--shard-positions", shard_positions, "--no-progress", *extra,
    ]


def all_arrays(path):
    cache = open_cache(path)
    return {k: cache.column(k) for k in cache.array_names if not k.endswith("_offsets")}


def test_kill_9_at_several_moments_then_resume_equals_uninterrupted(assets, tmp_path):
    data = tiny.write_datasets(str(tmp_path / "data"), n=300, seed=3)["text"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(CLI + dump_args(assets, data, ref), check=True, env=env, capture_output=True)
    expected = all_arrays(ref)
    out = tmp_path / "killed"
    # kill when a shard is being written (tmp dir present), then after a few commits
    for condition in ("start", "tmp", "rows>=3", "rows>=8"):
        proc = subprocess.Popen(CLI + dump_args(assets, data, out), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if condition == "start":  # while the cache itself is being created
                hit = out.exists()
            elif condition == "tmp":
                tmp = out / ".tmp"
                hit = tmp.exists() and any(p.name.startswith("shard-") for p in tmp.iterdir())
            else:
                mf = out / "manifest.parquet"
                hit = mf.exists() and pq.read_metadata(mf).num_rows >= int(condition[-1])
            if hit:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # whatever was committed so far reads and verifies cleanly
        if (out / "zarr.json").exists():
            r = CliRunner().invoke(main, ["verify", str(out)])
            assert r.exit_code == 0, r.output
    done = subprocess.run(CLI + dump_args(assets, data, out), env=env, capture_output=True,
                          text=True, check=True)
    assert "resuming after" in done.stderr
    got = all_arrays(out)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert not (out / ".tmp").exists() or not any((out / ".tmp").iterdir())


def test_verify_reports_flipped_byte_with_shard_and_array(assets, tmp_path):
    from conftest import dump

    dump(assets, tmp_path / "c")
    runner = CliRunner()
    assert runner.invoke(main, ["verify", str(tmp_path / "c")]).exit_code == 0
    chunk = tmp_path / "c" / "shards" / "shard-000001" / "topk_logprobs" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    r = runner.invoke(main, ["verify", str(tmp_path / "c")])
    assert r.exit_code == 1
    assert "shard-000001/topk_logprobs" in r.output
    assert "Traceback" not in r.output


def test_verify_reports_missing_shard(assets, tmp_path):
    import shutil

    from conftest import dump

    dump(assets, tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "shards" / "shard-000002")
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "c")])
    assert r.exit_code == 1 and "shard-000002: listed in the manifest but missing" in r.output


def test_info_reports_counts_and_summaries(assets, tmp_path):
    from conftest import dump

    dump(assets, tmp_path / "c", shape="chat")
    r = CliRunner().invoke(main, ["info", "--json", str(tmp_path / "c")])
    assert r.exit_code == 0
    info = json.loads(r.output)
    cache = open_cache(tmp_path / "c")
    assert info["sequences"] == 24 and info["supervised"] == cache.num_supervised
    assert 0 < info["supervised_fraction"] < 1  # chat: user turns are not supervised
    assert 0.45 <= info["hard_fraction"] <= 0.75
    assert info["card"]["data_shape"] == "chat"
    assert info["bytes_per_supervised_token"] == pytest.approx(
        cache.num_bytes / cache.num_supervised
    )
    text = CliRunner().invoke(main, ["info", str(tmp_path / "c")])
    assert "tokenizer_fingerprint" in text.output and "uncertainty" in text.output


def one_line_error(args, expect):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], r.output
    return r


def test_bad_inputs_give_one_clear_line(assets, tmp_path):
    text = assets["text"]
    one_line_error(dump_args(assets, text, tmp_path / "a", "--model", "/nope/model"),
                   "/nope/model does not exist")
    args = dump_args(assets, text, tmp_path / "b")
    args[args.index("--text-field") + 1] = "body"
    one_line_error(args, "field 'body' is not in dataset")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(dump_args(assets, str(empty), tmp_path / "c"), "")
    one_line_error(dump_args(assets, text, tmp_path / "d", "--top-k", "100000"),
                   "exceeds the teacher's vocabulary")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(dump_args(assets, text, blocker / "cache"), "cannot write the cache")
    one_line_error(dump_args(assets, str(tmp_path / "missing.jsonl"), tmp_path / "e"),
                   "does not exist")
    one_line_error(["info", str(tmp_path)], "is not an atkd-cache cache")
    one_line_error(["verify", str(tmp_path / "nowhere")], "does not exist")
    # no half-written cache is left by any of the failures above
    for name in "abcde":
        assert not (tmp_path / name / "manifest.parquet").exists()


def test_empty_dataset_message(assets, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(dump_args(assets, str(empty), tmp_path / "c"), "empty.jsonl is empty")


def test_newer_format_version_is_refused(assets, tmp_path):
    from conftest import dump

    dump(assets, tmp_path / "c", limit=2)
    meta_path = tmp_path / "c" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    one_line_error(["info", str(tmp_path / "c")], "newer atkd-cache (format version 99")


def test_subprocess_error_has_no_traceback(assets, tmp_path):
    r = subprocess.run(CLI + ["info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_vllm_backend_without_vllm_is_one_line(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    r = CliRunner().invoke(main, [
        "dump-teacher", "--backend", "vllm", "--model", assets["llama"], "--data",
        assets["text"], "-o", str(tmp_path / "c"), "--no-progress",
    ])
    assert r.exit_code == 2
    assert r.output.count("error:") == 1 and "needs vLLM" in r.output
    assert not (tmp_path / "c" / "zarr.json").exists()


BUSY_AT_EXIT = """
import sys, threading, time
import torch
from atkd_cache.cli import main as cli
def busy():  # a daemon thread inside a C++ op when the program ends (a codec or IO worker)
    a = torch.randn(800, 800)
    while True:
        a @ a
threading.Thread(target=busy, daemon=True).start()
time.sleep(0.2)
entry = getattr(cli, sys.argv[1])
sys.argv = ["atkd-cache", *sys.argv[2:]]
entry()
"""


def test_the_program_ends_with_its_exit_code_while_a_thread_is_in_cpp(tmp_path):
    """The abort CI saw after a clean refusal ("terminate called without an active
    exception", SIGABRT): a daemon thread inside C++ code when the interpreter finalizes.
    Ending through Click's `main` aborts; the `atkd-cache` program (`run`) ends with the
    command's own code and its whole output, refusal or success."""
    script = tmp_path / "busy.py"
    script.write_text(BUSY_AT_EXIT)

    def program(entry, *args):
        return subprocess.run([sys.executable, str(script), entry, *args], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    plain = [program("main", "verify", str(tmp_path / "missing")) for _ in range(2)]
    assert any(r.returncode == -signal.SIGABRT and "terminate called" in r.stderr
               for r in plain), [r.returncode for r in plain]  # (the failure is real here)
    for _ in range(2):
        r = program("run", "verify", str(tmp_path / "missing"))
        assert r.returncode == 2, (r.returncode, r.stderr[-500:])
        assert r.stderr.strip().splitlines() == [
            f"error: {tmp_path / 'missing'} does not exist or is not a folder: give a cache path"]
    r = program("run", "--version")
    assert r.returncode == 0 and r.stdout.startswith("atkd-cache, version "), r
