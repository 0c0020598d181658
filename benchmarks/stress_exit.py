"""Stress the ways a finished or killed process can fail to die cleanly (issue 33).

Repeats, with a CPU hog beside them (the load under which CI saw the abort):
  - a 2-rank `KDTrainer` run under torchrun (gloo), the user-script route;
  - a 2-rank `train-student` run under torchrun;
  - with --vllm-python: a `dump-teacher --backend vllm` killed with -9 after its first shard,
    then resumed to the end.
and counts aborts (exit -6 / "terminate called" on any rank), other failures, and `VLLM::`
processes alive after each killed and each finished dump (they must be 0).

    python benchmarks/stress_exit.py --repeats 20 --vllm-python .venv-vllm/bin/python \
        --out docs/stress_exit.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_LOGGING_LEVEL": "WARNING"}

KDTRAINER_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, TrainingArguments
from atkd_cache.hf import KDCollator, KDTrainer, cache_dataset
from atkd_cache.losses.kd import LossConfig
cache, student, out = sys.argv[1:4]
args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=3,
                         learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
                         ddp_backend="gloo", disable_tqdm=True)
model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
KDTrainer(model=model, args=args, loss=LossConfig(), train_dataset=cache_dataset(cache),
          data_collator=KDCollator()).train()
"""


def build_assets(root: Path) -> dict:
    """A tiny tokenizer, a teacher whose head size vLLM's CPU attention takes, a student,
    chat data, and a cache of it."""
    from transformers import AutoTokenizer

    from atkd_cache import tiny
    from atkd_cache.data import DataSpec
    from atkd_cache.dump import DumpConfig, dump_teacher

    teacher, student = str(root / "teacher"), str(root / "student")
    tiny.build_tokenizer(teacher)
    vocab = len(AutoTokenizer.from_pretrained(teacher))
    tiny.build_model(teacher, vocab, hidden=256, layers=2)
    tiny.build_tokenizer(student)
    tiny.build_model(student, vocab, arch="llama", seed=1)
    data = tiny.write_datasets(str(root / "data"), n=48)["chat"]
    cache = str(root / "cache")
    dump_teacher(DumpConfig(model=teacher, data=DataSpec(source=data, messages_field="messages"),
                            output=cache, dtype="fp32", top_k=8, progress=False,
                            shard_positions=200), log=lambda m: None)
    return {"teacher": teacher, "student": student, "data": data, "cache": cache}


def vllm_processes() -> list[str]:
    """`VLLM::` processes alive on this machine (pid and name)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in ps.splitlines() if "VLLM::" in line]


def outcome(proc: subprocess.CompletedProcess) -> str:
    """'ok', 'abort' (SIGABRT or std::terminate on a rank), or 'fail'."""
    if proc.returncode == 0:
        return "ok"
    if proc.returncode == -6 or "terminate called" in proc.stderr or "exitcode  : -6" in \
            proc.stderr:
        return "abort"
    return "fail"


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", *args]


def run_kdtrainer(a: dict, out: Path) -> subprocess.CompletedProcess:
    script = out.parent / "kdtrainer.py"
    script.write_text(KDTRAINER_SCRIPT)
    return subprocess.run(torchrun(str(script), a["cache"], a["student"], str(out)), env=ENV,
                          capture_output=True, text=True, timeout=600)


def run_train_student(a: dict, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun("-m", "atkd_cache.cli.main", "train-student", "--cache",
                                   a["cache"], "--student", a["student"], "-o", str(out),
                                   "--max-steps", "3", "--batch-tokens", "300", "--no-progress",
                                   "--no-tensorboard"),
                          env=ENV, capture_output=True, text=True, timeout=600)


def run_vllm_kill_resume(a: dict, out: Path, python: str) -> dict:
    """Kill a vLLM dump after its first shard, count survivors, resume, count again."""
    args = [python, "-m", "atkd_cache.cli.main", "dump-teacher", "--backend", "vllm",
            "--model", a["teacher"], "--data", a["data"], "--messages-field", "messages",
            "-o", str(out), "--top-k", "8", "--dtype", "fp32", "--shard-positions", "100",
            "--enforce-eager", "--no-progress"]
    # (not a pipe: an orphaned engine would hold it open and communicate() would never end)
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "manifest.parquet").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3.0)  # what dies with its parent has had time to
    after_kill = vllm_processes()
    for line in after_kill:
        os.kill(int(line.split()[0]), signal.SIGKILL)
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        done = subprocess.run(args, env=ENV, stdout=subprocess.DEVNULL, stderr=f, timeout=600)
    done.stderr = log.read_text()
    time.sleep(1.0)
    for line in vllm_processes():  # count them once, then clear them for the next repeat
        os.kill(int(line.split()[0]), signal.SIGKILL)
    return {"killed_mid_run": killed, "survivors_after_kill": len(after_kill),
            "resume": outcome(done), "survivors_after_finish": len(vllm_processes()),
            "stderr": done.stderr[-500:] if done.returncode else ""}


def report(runs: dict[str, dict]) -> str:
    """The docs/benchmarks.md table from results files (label -> counts)."""
    lines = ["| code | repeats (CPU hog) | KDTrainer 2 ranks | train-student 2 ranks | vLLM dumps "
             "killed mid-run | VLLM:: processes alive after the kills | after the resumes | "
             "failed resumes |", "|---|---|---|---|---|---|---|---|"]
    def cell(counts):
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))

    for label, r in runs.items():
        v = r["vllm_summary"]
        hog = "yes" if r["cpu_hog"] else "no"
        lines.append(f"| {label} | {r.get('done', r['repeats'])} ({hog}) "
                     f"| {cell(r['kdtrainer'])} | {cell(r['train_student'])} | "
                     f"{v['killed_mid_run']} of {v['runs']} | {v['survivors_after_kill']} | "
                     f"{v['survivors_after_finish']} | {v['resume_failures']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", nargs="+", metavar="LABEL=FILE",
                        help="only print the table of these results files")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--vllm-python", help="a Python with vLLM (scripts/setup-vllm)")
    parser.add_argument("--no-hog", action="store_true", help="without the CPU hog")
    parser.add_argument("--out", help="write the counts here (JSON)")
    args = parser.parse_args()
    if args.report:
        print(report({label: json.loads(Path(path).read_text())
                      for label, path in (item.split("=", 1) for item in args.report)}))
        return
    root = Path(tempfile.mkdtemp(prefix="stress-exit-"))
    a = build_assets(root)
    hog = None if args.no_hog else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    counts: dict = {"repeats": args.repeats, "done": 0, "cpu_hog": hog is not None,
                    "kdtrainer": {}, "train_student": {}, "vllm": []}
    t0 = time.time()
    try:
        for i in range(args.repeats):
            for name, fn in (("kdtrainer", run_kdtrainer), ("train_student", run_train_student)):
                r = fn(a, root / f"{name}-{i}")
                o = outcome(r)
                counts[name][o] = counts[name].get(o, 0) + 1
                if o != "ok":
                    print(f"{name} #{i}: {o}: {r.stderr[-800:]}", file=sys.stderr)
            if args.vllm_python:
                counts["vllm"].append(run_vllm_kill_resume(a, root / f"vllm-{i}",
                                                           args.vllm_python))
            counts["done"] = i + 1
            print(f"repeat {i + 1}/{args.repeats}: {json.dumps(save(counts, t0, args.out))}",
                  flush=True)
    finally:
        if hog is not None:
            hog.kill()
    print(json.dumps(save(counts, t0, args.out)))


def save(counts: dict, t0: float, out: str | None) -> dict:
    """Add the totals, write the counts (after every repeat: a stopped run keeps what it
    counted), and return the summary."""
    v = counts["vllm"]
    counts["vllm_summary"] = {
        "runs": len(v), "killed_mid_run": sum(x["killed_mid_run"] for x in v),
        "survivors_after_kill": sum(x["survivors_after_kill"] for x in v),
        "survivors_after_finish": sum(x["survivors_after_finish"] for x in v),
        "resume_failures": sum(x["resume"] != "ok" for x in v)}
    counts["seconds"] = round(time.time() - t0, 1)
    counts["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip()
    if out:
        Path(out).write_text(json.dumps(counts, indent=1) + "\n")
    return {k: counts[k] for k in ("done", "kdtrainer", "train_student", "vllm_summary",
                                   "seconds")}


if __name__ == "__main__":
    main()
