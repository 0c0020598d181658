"""The vLLM backend on vLLM's real CPU build (runs in .venv-vllm: scripts/setup-vllm, marker
`vllm`): parity with the HF backend on the same sequences, one-line errors, kill -9 +
resume behaving as with the HF backend, and a data-parallel pass with one engine per rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import verify_cache
from conftest import dump, shared_smollm2

pytestmark = pytest.mark.vllm
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
CLI = [sys.executable, "-m", "atkd_cache.cli.main"]
TOL = 1e-3


@pytest.fixture(scope="module")
def teacher(assets, tmp_path_factory):
    """A tiny random Llama whose head size (64) vLLM's CPU attention supports."""
    folder = str(tmp_path_factory.mktemp("vllm") / "llama64")
    tiny.build_tokenizer(folder)
    tiny.build_model(folder, assets["vocab"], hidden=256, layers=2)
    return folder


# Process groups of the servers the tests started and have not stopped yet, and the VLLM::
# processes that were alive before the suite (another user's): anything else is a leak.
LIVE_GROUPS: set[int] = set()
BEFORE: set[int] = set()


def vllm_processes() -> dict[int, str]:
    """pid -> command of every live `VLLM::` process (engine cores and workers)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]): line.split(None, 1)[1] for line in ps.splitlines()
            if "VLLM::" in line}


def stray_vllm_processes() -> list[str]:
    """`VLLM::` processes that belong to no live test server and were not there before."""
    stray = []
    for pid, command in vllm_processes().items():
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            continue
        if pid not in BEFORE and group not in LIVE_GROUPS:
            stray.append(f"{pid} {command}")
    return stray


@pytest.fixture(scope="module", autouse=True)
def no_engine_outlives_the_suite():
    BEFORE.update(vllm_processes())
    yield
    deadline = time.time() + 30  # the last server's group is being killed
    while stray_vllm_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert stray_vllm_processes() == []


def vllm_dump(assets, teacher, out, *extra, popen=False):
    args = CLI + [
        "dump-teacher", "--backend", "vllm", "--model", teacher, "--data", assets["chat"],
        "--messages-field", "messages", "-o", str(out), "--top-k", "8", "--dtype", "fp32",
        "--logprob-dtype", "float32", "--shard-positions", "200", "--enforce-eager",
        "--no-progress", *extra,
    ]
    if popen:
        return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=900)


def assert_topk_match(ids_a, lp_a, ids_b, lp_b):
    """Same values in order; the same id sets except ids tied (within TOL) at the k-th value."""
    assert np.allclose(lp_a, lp_b, atol=TOL)
    for row in range(len(ids_a)):
        differ = set(ids_a[row]) ^ set(ids_b[row])
        if differ:
            kth = min(lp_a[row, -1], lp_b[row, -1])
            values = dict(zip(ids_a[row], lp_a[row], strict=True))
            values.update(zip(ids_b[row], lp_b[row], strict=True))
            assert all(abs(values[i] - kth) < TOL for i in differ), row


@pytest.fixture(scope="module")
def caches(assets, teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    assets = {**assets, "llama64": teacher}
    dump(assets, root / "hf", shape="chat", model="llama64", logprob_dtype="float32")
    r = vllm_dump(assets, teacher, root / "vllm")
    assert r.returncode == 0, r.stderr[-3000:]
    return open_cache(root / "hf"), open_cache(root / "vllm")


def test_parity_with_hf_backend(caches):
    hf, vl = caches
    assert len(hf) == len(vl) > 0 and len(hf.shard_rows) == len(vl.shard_rows) > 1
    for a, b in zip(hf, vl, strict=True):
        assert a.seq_id == b.seq_id
        assert np.array_equal(a.input_ids, b.input_ids)
        assert np.array_equal(a.supervised, b.supervised)
        assert np.allclose(a.target_logprob, b.target_logprob, atol=TOL)
        assert np.allclose(a.uncertainty, b.uncertainty, atol=TOL)
        assert_topk_match(a.topk_ids, a.topk_logprobs, b.topk_ids, b.topk_logprobs)
        assert np.array_equal(a.hard, b.hard)
        assert np.all(b.entropy <= a.entropy + 1e-4)  # vLLM's entropy is a lower bound
    diff = {k for k, v in hf.card.to_attrs().items() if vl.card.to_attrs()[k] != v}
    assert diff == {"backend", "exactness", "created_at", "fingerprint"}
    assert vl.card.backend == "vllm" and vl.card.exactness["entropy"] == "lower_bound"
    assert all(vl.card.exactness[q] == "exact" for q in ("topk", "target_logprob", "hard"))
    assert verify_cache(vl) == []


def test_kill_then_resume_matches(assets, teacher, caches, tmp_path):
    _, full = caches
    out = tmp_path / "killed"
    proc = vllm_dump(assets, teacher, out, popen=True)
    manifest = out / "manifest.parquet"
    deadline = time.time() + 600
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # the dump only: what it started must die with it
    proc.wait()
    time.sleep(2.0)
    assert stray_vllm_processes() == []  # the engine ran in the dump's process
    partial = open_cache(out)
    assert 0 < len(partial.shard_rows) < len(full.shard_rows), "the dump was not interrupted"
    assert verify_cache(partial) == []
    r = vllm_dump(assets, teacher, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after" in r.stderr
    resumed = open_cache(out)
    assert len(resumed) == len(full) and verify_cache(resumed) == []
    for a, b in zip(full, resumed, strict=True):
        assert np.allclose(a.target_logprob, b.target_logprob, atol=1e-5)
        assert_topk_match(a.topk_ids, a.topk_logprobs, b.topk_ids, b.topk_logprobs)


def test_top_k_beyond_vocabulary_is_one_line(assets, teacher, tmp_path):
    r = vllm_dump(assets, teacher, tmp_path / "c", "--top-k", "100000")
    assert r.returncode == 2
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "exceeds the teacher's vocabulary" in errors[0]
    assert not (tmp_path / "c" / "zarr.json").exists()


def test_one_engine_per_rank_equals_one_process(assets, teacher, caches, tmp_path):
    """Two ranks, each with its own engine, under torchrun-style variables (which vLLM must
    not see: it would try to join that job). Run one after the other: two engines at once
    starve each other on 2 cores."""
    _, single = caches
    out = tmp_path / "ranks"
    for rank in (1, 0):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
        args = CLI + [
            "dump-teacher", "--backend", "vllm", "--model", teacher, "--data", assets["chat"],
            "--messages-field", "messages", "-o", str(out), "--top-k", "8", "--dtype", "fp32",
            "--logprob-dtype", "float32", "--shard-positions", "200", "--enforce-eager",
            "--no-progress",
        ]
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "cache:" in r.stdout  # rank 0 finished last and completed the manifest
    got = open_cache(out)
    assert len(got) == len(single) and verify_cache(got) == []
    assert got.card.fingerprint == single.card.fingerprint
    for a, b in zip(single, got, strict=True):
        assert a.seq_id == b.seq_id and np.array_equal(a.input_ids, b.input_ids)
        assert np.allclose(a.target_logprob, b.target_logprob, atol=1e-5)
        assert_topk_match(a.topk_ids, a.topk_logprobs, b.topk_ids, b.topk_logprobs)


GEN = ("--generate", "--num-responses", "2", "--max-new-tokens", "12", "--gen-temperature",
       "0.7", "--top-p", "0.9", "--limit", "8", "--shard-positions", "48")


@pytest.fixture(scope="module")
def generated(assets, teacher, tmp_path_factory):
    """A --generate dump on the offline engine. (That the same seeds give the same replies
    on another engine run is test_server_generate_equals_offline_vllm_generate's check.)"""
    out = tmp_path_factory.mktemp("generated") / "a"
    r = vllm_dump(assets, teacher, out, *GEN)
    assert r.returncode == 0, r.stderr[-3000:]
    return open_cache(out)


def test_generate_captures_raw_logprobs_equal_to_hf_rescoring(teacher, generated):
    """--generate on vLLM: sample log-probs (raw, not the 0.7-tempered ones the sampler
    used) equal a teacher-forced HF pass over each finished sequence."""
    import torch

    from atkd_cache.data import TokenizedSequence
    from atkd_cache.models import load_causal_lm
    from atkd_cache.teacher.hf import teacher_outputs

    cache = generated
    assert cache.card.generated and len(cache) == 16 and verify_cache(cache) == []
    assert cache.card.generation["temperature"] == 0.7 and cache.card.backend == "vllm"
    model = load_causal_lm(teacher, "fp32")
    worst_tempered = 0.0
    for seq in cache:
        ids = seq.input_ids.astype(np.int64)
        ref = teacher_outputs(model, [TokenizedSequence(seq.seq_id, ids, seq.supervised)],
                              8)[0]
        assert np.allclose(seq.target_logprob, ref["target_logprob"], atol=TOL)
        assert_topk_match(seq.topk_ids, seq.topk_logprobs, ref["topk_ids"],
                          ref["topk_logprobs"])
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0, :-1]
        sup = torch.from_numpy(seq.supervised)
        tempered = torch.log_softmax(logits / 0.7, -1)[sup]
        lp = tempered.gather(1, torch.from_numpy(ids[1:])[sup][:, None])[:, 0].numpy()
        worst_tempered = max(worst_tempered, float(np.abs(lp - seq.target_logprob).max()))
    assert worst_tempered > 0.05  # raw and processed log-probs are told apart


# -- the served teacher (--backend server) against real vLLM OpenAI-compatible servers --------

SERVED = "teacher"  # --served-model-name of the test servers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log, *flags) -> subprocess.Popen:
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` script looks up the package
    named vllm, which the CPU build is not) on loopback, once it answers /v1/models."""
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-logprobs", "16", "--max-model-len", "512", "--enforce-eager",
         "--served-model-name", SERVED, "--gpu-memory-utilization", "0.1", *flags],
        env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    LIVE_GROUPS.add(proc.pid)  # its engine core and workers share its process group
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"the vLLM server did not start (see {log.name})")


def stop(proc: subprocess.Popen) -> None:
    """Kill the server and everything it started (its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)
    LIVE_GROUPS.discard(proc.pid)


@pytest.fixture(scope="module")
def server(teacher, tmp_path_factory):
    """One server of the test teacher for every server test that does not kill it."""
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    proc = start_server(teacher, free_port(), log)
    yield f"http://127.0.0.1:{proc.args[proc.args.index('--port') + 1]}"
    stop(proc)


def server_dump(assets, teacher, out, *urls_and_flags, popen=False):
    args = CLI + [
        "dump-teacher", "--backend", "server", "--model", SERVED, "--tokenizer", teacher,
        "--data", assets["chat"], "--messages-field", "messages", "-o", str(out),
        "--top-k", "8", "--logprob-dtype", "float32", "--shard-positions", "200",
        "--no-progress", *urls_and_flags,
    ]
    if popen:
        return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=900)


def assert_same_arrays(a, b, exact=False):
    assert len(a) == len(b) and len(a.shard_rows) == len(b.shard_rows)
    for x, y in zip(a, b, strict=True):
        assert x.seq_id == y.seq_id and np.array_equal(x.input_ids, y.input_ids)
        if exact:
            for name in ("topk_ids", "topk_logprobs", "target_logprob", "entropy", "hard"):
                assert np.array_equal(getattr(x, name), getattr(y, name)), name
        else:
            assert np.allclose(x.target_logprob, y.target_logprob, atol=TOL)
            assert_topk_match(x.topk_ids, x.topk_logprobs, y.topk_ids, y.topk_logprobs)


@pytest.fixture(scope="module")
def served_cache(assets, teacher, server, tmp_path_factory):
    out = tmp_path_factory.mktemp("served") / "cache"
    r = server_dump(assets, teacher, out, "--url", server)
    assert r.returncode == 0, r.stderr[-3000:]
    return open_cache(out)


def test_server_backend_equals_offline_vllm_and_hf(served_cache, caches):
    hf, vl = caches
    assert_same_arrays(served_cache, vl)
    assert_same_arrays(served_cache, hf)
    card = served_cache.card
    assert card.backend == "server" and card.teacher_id == SERVED
    assert card.extra["server"]["engine"].startswith("vllm ")
    assert card.exactness["entropy"] == "lower_bound" and verify_cache(served_cache) == []


def test_faults_are_retried_and_every_sequence_lands_once(assets, teacher, server,
                                                          served_cache, tmp_path):
    import fault_proxy

    with fault_proxy.FaultProxy(server, stall=5.0) as proxy:
        r = server_dump(assets, teacher, tmp_path / "c", "--url", proxy.url,
                        "--request-timeout", "2", "--concurrency", "4")
        counts = dict(proxy.counts)
    assert r.returncode == 0, r.stderr[-3000:]
    assert counts["500"] and counts["reset"] and counts["stall"], counts
    faulty = open_cache(tmp_path / "c")
    assert_same_arrays(faulty, served_cache, exact=True)
    assert len({s.seq_id for s in faulty}) == len(faulty)  # every sequence exactly once
    assert verify_cache(faulty) == []


def test_slow_and_malformed_answers_are_retried_and_the_dump_is_unchanged(
        assets, teacher, server, served_cache, tmp_path):
    """An answer dripped one byte per 0.5 s (past --request-timeout 2 s, which bounds the
    whole request), one a log-prob entry short, another sequence's, and one cut short: each
    is retried, and the cache equals the clean one exactly (the bound: 0)."""
    import fault_proxy

    shapes = ("drip", "short", "swap", "cut")
    plan = {n: shapes[(n - 1) % 4] for n in range(1, 9)}  # n = 0 is the check's probe
    with fault_proxy.FaultProxy(server, plan=plan.get, drip=0.5) as proxy:
        start = time.monotonic()
        r = server_dump(assets, teacher, tmp_path / "c", "--url", proxy.url,
                        "--request-timeout", "2", "--concurrency", "2")
        took = time.monotonic() - start
        counts = dict(proxy.counts)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(counts.get(shape) == 2 for shape in shapes), counts
    assert took < 120  # not hung on the dripping answers
    assert_same_arrays(open_cache(tmp_path / "c"), served_cache, exact=True)


def test_an_answer_bad_every_time_stops_in_one_line_naming_server_and_sequence(
        assets, teacher, server, tmp_path):
    import re

    import fault_proxy

    with fault_proxy.FaultProxy(server, plan=lambda n: "short" if n else None) as proxy:
        r = server_dump(assets, teacher, tmp_path / "c", "--url", proxy.url, "--retries", "2")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert re.search(r"failed 2 times on sequence \d+ \(last: " + re.escape(proxy.url), errors[0])
    assert "prompt log-prob entries" in errors[0] and "Traceback" not in r.stderr


def test_429_waits_its_retry_after_and_does_not_use_up_retries(assets, teacher, server,
                                                               served_cache, tmp_path):
    """Six 429s with `Retry-After: 1` under --retries 1: the dump completes, and no sequence
    is asked again sooner than 1 s after its 429."""
    import fault_proxy

    with fault_proxy.FaultProxy(server, plan=lambda n: "429" if 1 <= n <= 6 else None,
                                retry_after=1.0) as proxy:
        r = server_dump(assets, teacher, tmp_path / "c", "--url", proxy.url, "--retries", "1",
                        "--concurrency", "2")
        events = list(proxy.events)
    assert r.returncode == 0, r.stderr[-3000:]
    busy = [(t, body) for t, _, fault, body in events if fault == "429"]
    assert len(busy) == 6
    for t, body in busy:
        again = [u for u, _, _, b in events if b == body and u > t]
        assert again and min(again) - t >= 1.0, min(again) - t
    assert_same_arrays(open_cache(tmp_path / "c"), served_cache, exact=True)


def test_a_dead_url_at_the_start_is_left_out_and_a_v1_url_is_the_same_server(
        assets, teacher, server, served_cache, tmp_path):
    r = server_dump(assets, teacher, tmp_path / "c", "--url", "http://127.0.0.1:9",
                    "--url", server + "/v1", "--retries", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "http://127.0.0.1:9 (ConnectError" in warnings[0], r.stderr
    cache = open_cache(tmp_path / "c")
    assert_same_arrays(cache, served_cache, exact=True)
    assert cache.card.fingerprint == served_cache.card.fingerprint


def test_a_server_of_another_dtype_is_refused_before_work_and_on_resume(
        assets, teacher, server, served_cache, tmp_path):
    """The probe tells a bf16 server of the same weights from the fp32 ones: a fleet that
    mixes them is refused before work, and so is resuming an fp32 cache against it."""
    import shutil

    assert len(served_cache.card.teacher_probe) > 20
    port = free_port()
    proc = start_server(teacher, port, open(tmp_path / "s.log", "w"), "--dtype", "bfloat16")
    bf16 = f"http://127.0.0.1:{port}"
    resumed = tmp_path / "resumed"
    shutil.copytree(served_cache.path, resumed)
    try:
        mixed = server_dump(assets, teacher, tmp_path / "mixed", "--url", server, "--url", bf16)
        again = server_dump(assets, teacher, resumed, "--url", bf16)
    finally:
        stop(proc)
    for r, message in ((mixed, f"servers {server} and {bf16} compute the teacher differently"),
                       (again, "made by a served teacher that computes differently")):
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
        assert message in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "mixed" / "zarr.json").exists()
    assert verify_cache(open_cache(resumed)) == []  # the refused resume changed nothing


def test_wrong_server_settings_are_refused_before_work(assets, teacher, server, tmp_path):
    other = str(tmp_path / "other-tokenizer")
    tiny.build_tokenizer(other, vocab_size=280, seed=9)
    cases = [
        (["--url", server, "--model", "nope"], f"serves ['{SERVED}'], not 'nope'"),
        (["--url", server, "--top-k", "20"], "restart it with --max-logprobs 20 or more"),
        (["--url", server, "--tokenizer", other], "tokenizer disagrees with the local one"),
        # (2 tries: the default 8, with backoff, spend ~80 s on a port nobody answers)
        (["--url", "http://127.0.0.1:9", "--retries", "2"],
         "no server answers (http://127.0.0.1:9 (ConnectError, 2 tries))"),
    ]
    for i, (flags, message) in enumerate(cases):
        r = server_dump(assets, teacher, tmp_path / f"c{i}", *flags)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr and not (tmp_path / f"c{i}" / "zarr.json").exists()


def test_server_generate_equals_offline_vllm_generate(assets, teacher, server, generated,
                                                       tmp_path):
    """--generate through a server: the same replies as the offline engine with the same
    seeds, and the same raw sample log-probs; the card says it was generated, served."""
    r = server_dump(assets, teacher, tmp_path / "g", "--url", server, *GEN)
    assert r.returncode == 0, r.stderr[-3000:]
    served, offline = open_cache(tmp_path / "g"), generated
    assert served.card.generated and served.card.backend == "server"
    assert served.card.generation == offline.card.generation
    assert_same_arrays(served, offline)
    assert verify_cache(served) == []


def test_server_with_processed_logprobs_is_refused_for_generate(assets, teacher, tmp_path):
    """A server started with --logprobs-mode processed_logprobs would store tempered
    log-probs as the teacher's: --generate refuses it before any work, in one line."""
    port = free_port()
    proc = start_server(teacher, port, open(tmp_path / "s.log", "w"),
                        "--logprobs-mode", "processed_logprobs")
    try:
        r = server_dump(assets, teacher, tmp_path / "g", "--url", f"http://127.0.0.1:{port}",
                        *GEN)
    finally:
        stop(proc)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert "--logprobs-mode raw_logprobs" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "g" / "zarr.json").exists()


def wait_for_shard(cache_dir, proc, more_than=0, timeout=300):
    """Wait until the dump in `proc` has committed more than `more_than` shards."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (cache_dir / "manifest.parquet").exists() and len(open_cache(cache_dir, check=False)
                                                            .shard_rows) > more_than:
            return True
        time.sleep(0.1)
    return False


def test_killed_server_stops_the_dump_and_a_restart_completes_it(assets, teacher, server,
                                                                 served_cache, tmp_path):
    """A server killed mid-dump stops it in one line (the shards so far stay); the re-run,
    with it restarted beside another and killed again mid-run, is finished by the other.
    A proxy holds a request in flight until the kill has landed, so that each kill is
    mid-run whatever the machine's speed."""
    import fault_proxy

    first_window = int(served_cache.shard_rows[0]["num_sequences"])
    port = free_port()
    log = open(tmp_path / "s.log", "w")
    second = start_server(teacher, port, log)
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "c"
    # request 0 is the check's probe; 1..first_window are the first shard's sequences
    with fault_proxy.FaultProxy(url, plan=lambda n: "hold" if n > first_window else None) as p:
        dump_proc = server_dump(assets, teacher, out, "--url", p.url, "--concurrency", "1",
                                "--retries", "3", popen=True)
        assert wait_for_shard(out, dump_proc) and p.wait_held()
        stop(second)
        p.release_held()
        _, stderr = dump_proc.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert dump_proc.returncode == 2 and len(errors) == 1, stderr[-2000:]
    assert "failed 3 times" in errors[0] and "Traceback" not in stderr
    partial = open_cache(out)
    assert partial.status == "partial" and len(partial.shard_rows) == 1
    assert verify_cache(partial) == []
    second = start_server(teacher, port, log)
    try:  # two servers, one of them killed while its request is in flight: the other finishes
        with fault_proxy.FaultProxy(url, plan=lambda n: "hold" if n else None) as p:
            resumed = server_dump(assets, teacher, out, "--url", p.url, "--url", server,
                                  "--concurrency", "1", popen=True)
            assert p.wait_held()
            stop(second)
            p.release_held()
            _, stderr = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, stderr[-3000:]
    finally:
        if second.poll() is None:
            stop(second)
    done = open_cache(out)
    assert done.status == "complete" and verify_cache(done) == []
    assert_same_arrays(done, served_cache, exact=True)


def test_real_smollm2_served_equals_offline_vllm_and_hf(tmp_path_factory):
    """The real teacher (SmolLM2-135M-Instruct, DESIGN §6) behind a real server, on real chat
    data: the served cache equals the offline vLLM engine's and HF's within the parity
    tolerance, top-k for top-k."""
    from atkd_cache import assets as real

    root = tmp_path_factory.mktemp("smollm2")
    teacher = shared_smollm2()  # (converted once per checkout, shared with the main suite)
    chats = [c for c in (real.to_chat(x, 4) for x in real.chitchat_conversations(12)) if c]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    common = ["--data", str(data), "--messages-field", "messages", "--top-k", "16",
              "--logprob-dtype", "float32", "--shard-positions", "400", "--no-progress"]
    proc = start_server(teacher, free_port(), open(root / "server.log", "w"))
    url = f"http://127.0.0.1:{proc.args[proc.args.index('--port') + 1]}"
    try:
        served = subprocess.run(CLI + ["dump-teacher", "--backend", "server", "--url", url,
                                       "--model", SERVED, "--tokenizer", teacher,
                                       "-o", str(root / "served"), *common],
                                env=ENV, capture_output=True, text=True, timeout=900)
    finally:
        stop(proc)
    assert served.returncode == 0, served.stderr[-3000:]
    for backend in ("vllm", "hf"):
        extra = ["--enforce-eager", "--max-model-len", "512"] if backend == "vllm" else []
        r = subprocess.run(CLI + ["dump-teacher", "--backend", backend, "--model", teacher,
                                  "--dtype", "fp32", "-o", str(root / backend), *common,
                                  *extra], env=ENV, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    served = open_cache(root / "served")
    assert len(served) == len(chats) and served.card.backend == "server"
    assert verify_cache(served) == []
    for other in ("vllm", "hf"):
        assert_same_arrays(served, open_cache(root / other))


def test_an_on_policy_round_scored_by_a_server_equals_the_in_process_round(
        assets, teacher, server, tmp_path):
    """atkd-cache on-policy with --backend server (the shared server of the same teacher)
    writes the same round cache as with the teacher in process, within the parity
    tolerance; the rollouts are the same (written by the same student with the same seeds)."""
    student = str(tmp_path / "student")
    tiny.build_tokenizer(student)
    tiny.build_model(student, assets["vocab"], seed=1)
    common = ["on-policy", "--student", student, "--data", assets["chat"], "--messages-field",
              "messages", "--rounds", "1", "--prompts-per-round", "4", "--num-responses", "2",
              "--max-new-tokens", "6", "--top-k", "8", "--batch-tokens", "64",
              "--no-progress"]
    runs = {"hf": ["--teacher", teacher],
            "server": ["--teacher", SERVED, "--backend", "server", "--url", server,
                       "--teacher-tokenizer", teacher]}
    for name, extra in runs.items():
        r = subprocess.run(CLI + common + ["-o", str(tmp_path / name), *extra], env=ENV,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    caches = {n: open_cache(tmp_path / n / "round-001" / "teacher") for n in runs}
    assert caches["server"].card.backend == "server" and len(caches["server"]) == 8
    assert_same_arrays(caches["server"], caches["hf"])
    assert caches["server"].card.extra["on_policy"] == caches["hf"].card.extra["on_policy"]
