"""Served teacher vs offline vLLM on the same CPU, same sequences, same k: the teacher pass's
tokens/s through `--backend server` (a `vllm serve` of the teacher on loopback, our httpx
client) and through the offline engine (`--backend vllm`), each arm in its own process, the
engine already started (start-up is not timed). Runs in .venv-vllm.

Teacher: SmolLM2-135M-Instruct fp32 (DESIGN §6). Data: chitchat conversations as plain text,
cut at --max-length. Results: --out (JSON); --report prints the table.

    .venv-vllm/bin/python benchmarks/bench_server.py [--tokens 20000] [--repeats 3]
    .venv-vllm/bin/python benchmarks/bench_server.py --report
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

import click

sys.path.insert(0, os.path.dirname(__file__))

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
K = 32


def sequences(teacher: str, tokens: int, max_length: int):
    from assets import chitchat_sequences

    from atkd_cache.models import load_tokenizer

    return chitchat_sequences(load_tokenizer(teacher), tokens, max_length)


def timed_passes(score, seqs, repeats: int) -> dict:
    score(seqs[:4])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score(seqs)
        times.append(time.perf_counter() - t0)
    tokens = sum(len(s.input_ids) for s in seqs)
    return {"seconds": statistics.median(times), "tokens": tokens,
            "tokens_per_s": tokens / statistics.median(times)}


def arm_offline(teacher: str, tokens: int, max_length: int, repeats: int) -> dict:
    from atkd_cache.teacher.vllm import VllmTeacher

    engine = VllmTeacher(teacher, K, "fp32", max_model_len=max_length + 1,
                         enforce_eager=True)
    return timed_passes(engine.outputs, sequences(teacher, tokens, max_length), repeats)


def arm_server(teacher: str, tokens: int, max_length: int, repeats: int,
               concurrency: int) -> dict:
    import httpx

    from atkd_cache.models import load_tokenizer
    from atkd_cache.teacher.server import ServerConfig, ServerTeacher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher,
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-logprobs", str(K), "--max-model-len", str(max_length + 1), "--enforce-eager",
         "--served-model-name", "teacher"], env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        served = ServerTeacher(ServerConfig([url], "teacher", K, concurrency=concurrency))
        seqs = sequences(teacher, tokens, max_length)
        served.check(load_tokenizer(teacher), max(len(s.input_ids) for s in seqs))
        return timed_passes(served.score, seqs, repeats)
    finally:
        proc.kill()
        proc.wait(60)


def report(r: dict) -> str:
    off, srv = r["offline"], r["server"]
    return "\n".join([
        f"SmolLM2-135M-Instruct fp32, {off['tokens']:,} tokens of chitchat (<= "
        f"{r['max_length']} per sequence), top-{K}, median of {r['repeats']} passes, "
        f"engine start not timed; server: one `vllm serve` on loopback, concurrency "
        f"{r['concurrency']}.", "",
        "| backend | seconds | tokens/s | × offline |", "|---|---|---|---|",
        f"| offline vLLM (`--backend vllm`) | {off['seconds']:.1f} | "
        f"{off['tokens_per_s']:,.0f} | 1.00 |",
        f"| served (`--backend server`) | {srv['seconds']:.1f} | {srv['tokens_per_s']:,.0f} | "
        f"{srv['tokens_per_s'] / off['tokens_per_s']:.2f} |",
    ])


@click.command()
@click.option("--tokens", type=int, default=20000, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--concurrency", type=int, default=8, show_default=True)
@click.option("--workdir", default="runs/bench", show_default=True)
@click.option("--out", default="docs/bench_server.json", show_default=True)
@click.option("--arm", type=click.Choice(["offline", "server"]), default=None, hidden=True)
@click.option("--report", "only_report", is_flag=True, help="Only print the table from --out.")
def main(tokens, max_length, repeats, concurrency, workdir, out, arm, only_report):
    """Served teacher vs offline vLLM, side by side."""
    if only_report:
        with open(out) as f:
            print(report(json.load(f)))
        return
    from atkd_cache.assets import smollm2_folder

    teacher = smollm2_folder(workdir)
    if arm == "offline":
        print("RESULT " + json.dumps(arm_offline(teacher, tokens, max_length, repeats)))
        return
    if arm == "server":
        print("RESULT " + json.dumps(arm_server(teacher, tokens, max_length, repeats,
                                                concurrency)))
        return
    results = {"max_length": max_length, "repeats": repeats, "concurrency": concurrency}
    for name in ("offline", "server"):
        cmd = [sys.executable, __file__, "--arm", name, "--tokens", str(tokens),
               "--max-length", str(max_length), "--repeats", str(repeats),
               "--concurrency", str(concurrency), "--workdir", workdir]
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"arm {name} failed:\n{done.stderr[-3000:]}")
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        results[name] = json.loads(line[len("RESULT "):])
        print(name, results[name], flush=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(report(results))


if __name__ == "__main__":
    main()
