"""train-student from the command line, for real: kill -9 after a checkpoint and resume to the
same weights as an uninterrupted run; torchrun with 2 CPU processes (gloo) on disjoint data
ending with identical weights; resuming that run on 1 process; one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from atkd_cache.train.student import init_student
from conftest import dump

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
CLI = [sys.executable, "-m", "atkd_cache.cli.main"]


@pytest.fixture(scope="module")
def setup(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    cache = root / "cache"
    dump(assets, cache, shape="chat", shard_positions=80)
    student = str(root / "gpt2-student")  # GPT-2 has dropout: resume must restore the RNG
    init_student(assets["gpt2"], "1", student)
    return {"cache": str(cache), "student": student}


def train_args(setup, out, *extra):
    return [
        "train-student", "--cache", setup["cache"], "--student", setup["student"],
        "--output", str(out), "--batch-tokens", "300", "--lr", "2e-3", "--no-progress",
        "--no-tensorboard", *extra,
    ]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600, **kw)


def weights(out):
    return load_file(os.path.join(out, "model", "model.safetensors"))


def test_kill_after_checkpoint_then_resume_is_exact(setup, tmp_path):
    extra = ("--max-steps", "24", "--checkpoint-every", "4", "--grad-accum", "2",
             "--num-workers", "2", "--loss", "atkd", "--base", "jsd")
    full = tmp_path / "full"
    r = run(CLI + train_args(setup, full, *extra))
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(CLI + train_args(setup, killed, *extra), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "step-00000004"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (killed / "summary.json").exists(), "run was not interrupted"
    r = run(CLI + train_args(setup, killed, *extra, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    steps = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert steps == list(range(1, 25))  # no step logged twice after the resume


def test_torchrun_two_ranks_then_resume_on_one(setup, tmp_path):
    out = tmp_path / "ddp"
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node", "2", "-m", "atkd_cache.cli.main",
             *train_args(setup, out, "--max-steps", "3", "--log-sequences", "--loss", "kd")])
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2 and summary["ranks_agree"]
    assert summary["weights_sha256"][0] == summary["weights_sha256"][1]
    logs = [[json.loads(line) for line in open(out / f"sequences-rank{r}.jsonl")]
            for r in range(2)]
    assert [len(x) for x in logs] == [3, 3]
    for s0, s1 in zip(*logs, strict=True):
        assert s0["step"] == s1["step"] and not set(s0["seq_index"]) & set(s1["seq_index"])
    # resume the 2-rank run on 1 process to the end of the epoch: every sequence exactly once
    r = run(CLI + train_args(setup, out, "--epochs", "1", "--log-sequences", "--loss", "kd",
                              "--resume"))
    assert r.returncode == 0, r.stderr
    seen = [i for rank in range(2) for line in open(out / f"sequences-rank{rank}.jsonl")
            for i in json.loads(line)["seq_index"]]
    from atkd_cache.cache import open_cache

    assert sorted(seen) == list(range(len(open_cache(setup["cache"]))))


def test_bad_inputs_one_line(setup, assets, tmp_path):
    from atkd_cache import tiny

    other = str(tmp_path / "other")
    tiny.build_tokenizer(other, vocab_size=280, seed=3)
    tiny.build_model(other, 300)
    cases = [
        (train_args(setup, tmp_path / "a", "--max-steps", "1", "--student", other),
         "tokenizer mismatch"),
        (train_args(setup, tmp_path / "b"), "give --max-steps or --epochs"),
        (train_args(setup, tmp_path / "c", "--max-steps", "1", "--resume"), "no checkpoint"),
        (["init-student", "--from", assets["llama"], "--layers", "5", "-o",
          str(tmp_path / "s")], "the teacher has 2 layers"),
        (["evaluate", "--model", setup["student"]], "give --cache"),
    ]
    done = tmp_path / "done"
    r = run(CLI + train_args(setup, done, "--max-steps", "1"))
    assert r.returncode == 0, r.stderr
    cases.append((train_args(setup, done, "--max-steps", "1"), "already holds a run"))
    for args, message in cases:
        r = run(CLI + args)
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert r.returncode == 2, (args, r.stderr[-1500:])
        assert len(lines) == 1 and message in lines[0], (message, r.stderr[-1500:])
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "a" / "model").exists()


def test_fsdp_matches_ddp_and_checkpoints_cross_over(setup, tmp_path):
    """FSDP2 on 2 CPU ranks (gloo) trains the same weights as DDP; an FSDP checkpoint resumes
    under DDP and a DDP one under FSDP (exact replay: same weights as uninterrupted), and an
    FSDP checkpoint resumes on 1 process."""
    import shutil

    import torch

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "atkd_cache.cli.main"]
    common = ("--max-steps", "4", "--loss", "atkd", "--checkpoint-every", "2",
              "--keep-checkpoints", "3")
    runs = {"ddp": (), "fsdp": ("--fsdp",)}
    for name, extra in runs.items():
        r = run(torchrun + train_args(setup, tmp_path / name, *common, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k
    state = json.load(open(tmp_path / "fsdp" / "checkpoints" / "step-00000004" / "state.json"))
    assert state["optimizer_keys"] == "fqn"

    # resume each run's step-2 checkpoint under the other mode, to step 4
    for src, extra in (("fsdp", ()), ("ddp", ("--fsdp",))):
        dst = tmp_path / f"{src}-resumed"
        shutil.copytree(tmp_path / src, dst)
        shutil.rmtree(dst / "checkpoints" / "step-00000004")
        shutil.rmtree(dst / "model")
        r = run(torchrun + train_args(setup, dst, *common, *extra, "--resume"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resuming from" in r.stderr and "step-00000002" in r.stderr
        got, want = weights(dst), weights(tmp_path / src)
        for k in want:
            assert torch.allclose(got[k], want[k], atol=2e-5), (src, k)

    # and the FSDP run continues on a single process
    r = run(CLI + train_args(setup, tmp_path / "fsdp", "--max-steps", "5", "--loss", "atkd",
                              "--fsdp", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "fsdp" / "summary.json"))["steps"] == 5
