"""`atkd-cache on-policy` (recipes/on_policy.py) on tiny real models: each round's cache is the
teacher's teacher-forced scoring of exactly the student's replies, the rollouts hold the
log-probs of the checkpoint that wrote them, each round starts from the last round's model,
a re-run redoes nothing, kill -9 anywhere then a re-run ends with the uninterrupted run's
weights, and bad input is one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.cli.main import main
from atkd_cache.fingerprint import weights_hash
from atkd_cache.models import load_causal_lm
from conftest import rescore

CLI = [sys.executable, "-m", "atkd_cache.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def setup(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy")
    student = str(root / "student")
    tiny.build_tokenizer(student)
    tiny.build_model(student, assets["vocab"], arch="llama", seed=1)
    return {**assets, "student": student, "root": root}


def args(s, out, *extra):
    return ["on-policy", "--student", s["student"], "--teacher", s["llama"], "--data",
            s["chat"], "--messages-field", "messages", "-o", str(out), "--rounds", "2",
            "--prompts-per-round", "4", "--num-responses", "2", "--max-new-tokens", "6",
            "--top-k", "8", "--batch-tokens", "64", "--checkpoint-every", "1",
            "--lr", "1e-3", "--no-progress", *extra]


def model_sha(folder) -> str:
    return hashlib.sha256(open(os.path.join(folder, "model.safetensors"), "rb").read()
                          ).hexdigest()


def test_rounds_score_the_students_exact_replies(setup, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, args(setup, out, "--eval-data", setup["chat"],
                                      "--eval-prompts", "4"))
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["rounds"]) == ["0", "1", "2"]
    teacher = load_causal_lm(setup["llama"], "fp32")
    policy = setup["student"]
    for rnd in (1, 2):
        folder = out / f"round-{rnd:03d}"
        entry = results["rounds"][str(rnd)]
        # the round's rollouts were written by the previous round's model
        assert entry["policy_weights_hash"] == weights_hash(policy)
        writer = load_causal_lm(policy, "fp32")
        rollouts, cache = open_cache(folder / "rollouts"), open_cache(folder / "teacher")
        assert len(rollouts) == len(cache) == 8
        assert cache.card.extra["on_policy"] == {"round": rnd,
                                                 "policy_weights_hash": weights_hash(policy)}
        assert cache.card.data_shape == "ids"
        for a, b in zip(rollouts, cache, strict=True):
            # the teacher scored exactly the student's tokens, the student's reply supervised
            assert np.array_equal(a.input_ids, b.input_ids)
            assert np.array_equal(a.supervised, b.supervised)
            ref = rescore(teacher, b, k=8)
            np.testing.assert_allclose(b.target_logprob, ref["target_logprob"], atol=1e-5)
            np.testing.assert_allclose(b.topk_logprobs, ref["topk_logprobs"], atol=1e-5)
            # the rollout cache holds the writer's own log-probs of its sampled tokens
            own = rescore(writer, a, k=1)
            np.testing.assert_allclose(a.target_logprob, own["target_logprob"], atol=1e-4)
        assert entry["teacher_tokens_scored"] == cache.num_supervised
        assert set(entry["eval"]) >= {"rouge_l_to_teacher", "stop_rate", "distinct_3"}
        policy = str(folder / "train" / "model")
    assert "eval" in results["rounds"]["0"] and (out / "rounds.png").stat().st_size > 1000
    # a re-run finds everything done: nothing is written again
    stamp = {p: os.path.getmtime(p) for p in (out / "results.json",
                                              out / "round-002" / "teacher" / "zarr.json")}
    r = CliRunner().invoke(main, args(setup, out, "--eval-data", setup["chat"],
                                      "--eval-prompts", "4"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "results.json").read_text())["rounds"] == results["rounds"]
    assert os.path.getmtime(out / "round-002" / "teacher" / "zarr.json") == \
        stamp[out / "round-002" / "teacher" / "zarr.json"]


@pytest.fixture(scope="module")
def full_run(setup):
    """The uninterrupted 2-round run, one process (the reference of the next two tests)."""
    full = setup["root"] / "full"
    r = subprocess.run(CLI + args(setup, full), env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return full


def test_kill_9_anywhere_then_rerun_equals_the_uninterrupted_run(setup, full_run, tmp_path):
    full = full_run
    killed = tmp_path / "killed"
    # kill during round 1's training (after a checkpoint), then during round 2's rollouts,
    # then during round 2's scoring
    for marker in ("round-001/train/checkpoints", "round-002/rollouts",
                   "round-002/teacher"):
        proc = subprocess.Popen(CLI + args(setup, killed), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (killed / marker).exists() and proc.poll() is None and \
                time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = subprocess.run(CLI + args(setup, killed), env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert model_sha(killed / "round-002" / "train" / "model") == \
        model_sha(full / "round-002" / "train" / "model")
    for rnd in ("round-001", "round-002"):
        assert open_cache(killed / rnd / "teacher").card.fingerprint == \
            open_cache(full / rnd / "teacher").card.fingerprint


def test_torchrun_two_ranks_each_write_their_slice_and_train_data_parallel(setup, full_run,
                                                                           tmp_path):
    """The loop under torchrun (2 CPU ranks): round 1's rollouts and teacher cache equal the
    one-process run's (each rank wrote its slice, merged into one cache), every round trains
    data-parallel with the ranks agreeing, each round's rollouts come from the previous
    round's 2-rank model, and rank 0 alone wrote the results."""
    out = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "atkd_cache.cli.main",
                        *args(setup, out, "--shard-positions", "8")], env=ENV,
                       capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("rollouts", "teacher"):
        one, two = (open_cache(run / "round-001" / name) for run in (full_run, out))
        assert len(one) == len(two) == 8
        for a, b in zip(one, two, strict=True):  # the same tokens; float32 batch-shape noise
            for field in ("input_ids", "supervised"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), field)
            for field in ("target_logprob", "topk_logprobs"):
                np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-4,
                                           err_msg=field)
    assert len(open_cache(out / "round-001" / "teacher").shard_rows) >= 2  # one per rank
    results = json.loads((out / "results.json").read_text())
    policy = setup["student"]
    for rnd in (1, 2):
        train = out / f"round-{rnd:03d}" / "train"
        summary = json.loads((train / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["ranks_agree"]
        assert results["rounds"][str(rnd)]["policy_weights_hash"] == weights_hash(policy)
        assert results["rounds"][str(rnd)]["replies"] == 8
        assert not (train / "checkpoints").exists()
        policy = str(train / "model")
    # rounds too small for a shard per rank are refused before anything is written
    bad = tmp_path / "bad"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "atkd_cache.cli.main",
                        *args(setup, bad)], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "fewer than 2 shards of --shard-positions" in r.stderr
    ours = [x for x in r.stderr.splitlines() if x.startswith("error:")]  # (torchrun's own
    assert len(ours) == 2 and not bad.exists()  # launcher adds its traceback after them)
    # a re-run under torchrun finds every stage done
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "atkd_cache.cli.main",
                        *args(setup, out, "--shard-positions", "8")], env=ENV,
                       capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["rounds"] == results["rounds"]


def test_bad_input_is_one_line(setup, tmp_path):
    done = tmp_path / "done"
    r = CliRunner().invoke(main, args(setup, done, "--rounds", "1"))
    assert r.exit_code == 0, r.output
    other = tmp_path / "other-teacher"  # the same path, other weights: another teacher
    shutil.copytree(setup["llama"], other)
    shifted = tmp_path / "shifted"
    r = CliRunner().invoke(main, args({**setup, "llama": str(other)}, shifted, "--rounds", "1"))
    assert r.exit_code == 0, r.output
    tiny.build_model(str(other), setup["vocab"], seed=7)
    cases = [
        (args(setup, tmp_path / "a", "--rounds", "0"), "--rounds must be at least 1"),
        (args(setup, tmp_path / "b", "--rounds", "7"),
         "7 rounds of 4 prompts need 28 prompts"),
        (args(setup, tmp_path / "c", "--max-length", "8"), "which leaves no room for"),
        (args(setup, done, "--lr", "5e-4"), "was started with lr = 0.001, now 0.0005"),
        (args({**setup, "llama": str(other)}, shifted),
         f"{other} is not the teacher that scored"),
    ]
    for argv, message in cases:
        r = CliRunner().invoke(main, argv)
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1 and message in errors[0], \
            (message, r.output[-1500:])
        assert "Traceback" not in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not (shifted / "round-002" / "teacher").exists()  # refused before it scored
