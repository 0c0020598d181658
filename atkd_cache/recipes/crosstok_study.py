"""A student with another tokenizer, distilled from one teacher cache: CE on the teacher's
replies against ALM, ULD and GOLD (issue 32; registered in docs/training.md).

The study's setup (atkd_cache/recipes/study.py: the fp32 SmolLM2 teacher, the chitchat
splits, the teacher's sampled training replies and greedy test replies, the KJV healing
text), with a student of another family:
1. tokenizer  a byte-level BPE of `student_vocab` ids trained on the training
              conversations, with the teacher's chat template (ChatML markers as added
              tokens), so prompts render to the same text;
2. student    the teacher's layer cut with its embeddings moved to that vocabulary
              (`init-student --tokenizer`), healed by CE on the KJV chats in its own
              tokenization (`--cross-tokenizer ce`); its weights' hash pins the results;
3. arms       `train-student --cross-tokenizer ce|alm|uld|gold` on the teacher's training
              replies, one epoch, the study's schedule; every arm searches the same lr grid
              on validation (seed 0) and runs every seed at its choice (the primary pair,
              ce and alm, first);
4. scores     per test prompt: ROUGE-L F1 of the greedy reply against the teacher's and the
              human reply, its stop/distinct-3/bytes; per run: bits per byte of the
              teacher's test replies and of the human test replies (comparable across
              tokenizers: train/evaluate.py bits_per_byte).
The student writes at most max_new_tokens x (the teacher's bytes per token / its own) new
tokens, so both sides have the same byte budget for a reply.

    atkd-cache crosstok-study [--workdir runs/crosstok-study] [--smoke] [--report FILE]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from atkd_cache import assets, tiny
from atkd_cache.cache import open_cache
from atkd_cache.data import DataSpec, generation_prompts, load_rows
from atkd_cache.errors import UserError
from atkd_cache.losses.kd import LossConfig
from atkd_cache.recipes import study
from atkd_cache.recipes.stats import Paired, paired_bootstrap, seed_interval, verdict
from atkd_cache.recipes.study_config import CROSSTOK_ARMS, CrossTokStudyConfig
from atkd_cache.recipes.study_report import _cell, _interval, _mean_std, grid_edges, grid_table
from atkd_cache.train import checkpoint
from atkd_cache.train.align import Aligner, cache_aligner
from atkd_cache.train.evaluate import bits_per_byte, decode_replies, reply_scores
from atkd_cache.train.loader import LoaderConfig
from atkd_cache.train.student import init_student
from atkd_cache.train.trainer import TrainConfig, train

DESIGN = "crosstok-1"
DOCS_BLOCK = ("docs/training.md", "crosstok", "report")  # `--report FILE --docs` fills it
README_BLOCK = ("README.md", "crosstok", "headline")  # ... and this one with headline()
PRIMARY = "rouge_teacher"
PROMPT_METRICS = {"rouge_teacher": "ROUGE-L vs teacher", "rouge_human": "ROUGE-L vs human",
                  "stopped": "stop rate", "distinct_3": "distinct 3-grams",
                  "reply_bytes": "reply bytes"}
BPB = {"teacher": "bits/byte, teacher replies", "human": "bits/byte, human replies"}
STAGES = {"1": "teacher", "2": "data", "3": "caches", "4": "student (tokenizer, moved "
          "embeddings, healing, floor)", "5": "primary arms", "6": "other arms", "7": "report"}


# ------------------------------------------------------------------------- the student


def student_tokenizer(cfg: CrossTokStudyConfig, teacher_tok, data: dict[str, str]) -> str:
    """A byte-level BPE trained on the training conversations' text, with the teacher's
    chat template (written once)."""
    folder = os.path.join(cfg.workdir, f"student-tokenizer-{cfg.student_vocab}")
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        rows = load_rows(DataSpec(source=data.get("train-human", data["train-teacher"]),
                                  messages_field="messages"))
        texts = [m["content"] for r in rows for m in r["messages"]]
        tmp = folder + f".tmp-{os.getpid()}"
        tiny.build_tokenizer(tmp, vocab_size=cfg.student_vocab, texts=texts)
        from atkd_cache.models import load_tokenizer

        tok = load_tokenizer(tmp)
        tok.chat_template = teacher_tok.chat_template  # prompts render to the same text
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


def build_student(cfg: CrossTokStudyConfig, teacher: str, tokenizer: str, caches,
                  results: study.Results) -> str:
    """The layer cut moved to the student's tokenizer, healed by CE on the KJV chats in its
    own tokenization; its weights' hash pins the results file."""
    cut = os.path.join(cfg.workdir, f"student-{cfg.layers}L-{cfg.student_vocab}-cut")
    if not os.path.exists(os.path.join(cut, "config.json")):
        init_student(teacher, cfg.layers, cut, tokenizer=tokenizer)
    healed = os.path.join(cfg.workdir, f"student-{cfg.layers}L-{cfg.student_vocab}-kjv-"
                                       f"{cfg.heal_chats}")
    return study.heal(cfg, cut, healed, caches["heal"], results,
                      LossConfig(cross_tokenizer="ce"), fused_head=False)


def train_arm(cfg: CrossTokStudyConfig, arm: str, lr: float, seed: int, student: str,
              caches) -> dict:
    """One run: the study's recipe with `--cross-tokenizer arm` on the teacher's replies."""
    out = os.path.join(cfg.workdir, "runs", arm, f"lr{lr:g}-seed{seed}")
    if not os.path.exists(os.path.join(out, "summary.json")):
        train(TrainConfig(
            cache=caches["train-teacher"], student=student, output=out, epochs=cfg.epochs,
            lr=lr, warmup_ratio=0.03, min_lr_ratio=0.0, seed=seed,
            resume=checkpoint.resumable(out), fused_head=False,
            loss=LossConfig(cross_tokenizer=arm, chunk_temperature=cfg.chunk_temperature),
            loader=LoaderConfig(batch_tokens=cfg.batch_tokens, seed=seed),
            checkpoint_every=50, progress=False, tensorboard=False), log=lambda m: None)
    checkpoint.drop_checkpoints(out)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {"out": out, "steps": summary["steps"], "tokens": summary["tokens_seen"],
            "lr": lr, "seed": seed, "loss": arm}


# ---------------------------------------------------------------------------- scoring


@dataclass
class EvalSet:
    """A split's prompts in the student's rendering, the teacher's greedy replies (text) and
    the human replies."""

    prompts: list[list[int]]
    teacher_text: list[str]
    human_text: list[str]


def eval_set(data_file: str, cache_path: str, student_tok, teacher_tok) -> EvalSet:
    spec = DataSpec(source=data_file, messages_field="messages")
    pairs = generation_prompts(load_rows(spec), student_tok, spec)
    replies = [r for _, r in study.cached_replies(cache_path)]
    if len(replies) != len(pairs):
        raise UserError(f"{cache_path}: its prompts differ from {data_file}'s: delete the cache")
    return EvalSet([p for p, _ in pairs], decode_replies(teacher_tok, replies),
                   [h for _, h in pairs])


def byte_budget(cache: str, aligner: Aligner, max_new_tokens: int) -> int:
    """Student tokens with the byte budget of `max_new_tokens` teacher tokens: scaled by the
    teacher's tokens per student token over the cache's counted chunks."""
    teacher_tokens = student_tokens = 0
    for seq in open_cache(cache):
        a = aligner.align(seq)
        student_tokens += len(a.rows)
        teacher_tokens += int(seq.supervised.sum())
    return math.ceil(max_new_tokens * student_tokens / max(teacher_tokens, 1))


class Scorer:
    """Scores a student: greedy replies on a split, bits per byte on its caches."""

    def __init__(self, cfg, student_tok, aligner, evals, caches, max_new_tokens):
        self.cfg, self.tok, self.aligner, self.evals = cfg, student_tok, aligner, evals
        self.caches, self.max_new_tokens = caches, max_new_tokens

    def __call__(self, model_path: str, split: str) -> dict:
        from atkd_cache.models import load_causal_lm

        model = load_causal_lm(model_path, dtype="fp32", device="cpu").eval()
        ev = self.evals[split]
        ids, text, pp = reply_scores(model, self.tok, ev.prompts,
                                     {"teacher": ev.teacher_text, "human": ev.human_text},
                                     self.max_new_tokens, None, batch_size=32)
        pp["reply_bytes"] = [len(t.encode("utf-8")) for t in text]
        names = ("teacher",) if split == "val" else ("teacher", "human")
        bpb = {name: bits_per_byte(model, self.caches[f"{split}-{name}"], self.aligner)
               for name in names}
        return {"per_prompt": {k: [round(float(v), 6) for v in vals] for k, vals in pp.items()
                               if k in PROMPT_METRICS},
                "bpb": bpb, "reply_ids": ids, "examples": text[:3]}


def run_crosstok_study(cfg: CrossTokStudyConfig, log=print) -> dict:
    """Run (or continue) every stage; returns the results document."""
    from atkd_cache.models import load_tokenizer

    unknown = [a for a in cfg.arms if a not in CROSSTOK_ARMS]
    if unknown or cfg.baseline not in cfg.arms or cfg.challenger not in cfg.arms:
        raise UserError(f"--arms must be among {', '.join(CROSSTOK_ARMS)} and hold "
                        f"{cfg.baseline} and {cfg.challenger}")
    os.makedirs(cfg.workdir, exist_ok=True)
    results = study.Results(cfg.results or os.path.join(cfg.workdir, "results.json"), cfg,
                            design=DESIGN)
    stage = study.StageClock(results, 7, log)

    stage(1, "teacher: SmolLM2-135M-Instruct (GGUF -> HF folder, once)")
    teacher = assets.smollm2_folder(os.path.join(cfg.workdir, "assets"), dtype="fp32")
    teacher_tok = load_tokenizer(teacher)
    stage(2, "data: the study's chitchat splits and KJV healing chats")
    data = study.write_data(cfg, teacher_tok)
    stage(3, "caches: the study's (teacher replies, healing text, test replies)")
    caches = study.build_caches(cfg, teacher, data, log)
    stage(4, f"student: {cfg.layers} layers moved to a {cfg.student_vocab}-id tokenizer, "
             f"healed by CE on KJV")
    tok_folder = student_tokenizer(cfg, teacher_tok, data)
    student = build_student(cfg, teacher, tok_folder, caches, results)
    student_tok = load_tokenizer(student)
    aligner = cache_aligner(open_cache(caches["train-teacher"]), student_tok, student)
    budget = byte_budget(caches["train-teacher"], aligner, cfg.max_new_tokens)
    results.doc["data"] = {"student_max_new_tokens": budget,
                           "test_prompts": cfg.test_prompts, "val_prompts": cfg.val_prompts}
    caches["val-human"] = caches["test-human"]  # (validation scores the teacher's only)
    evals = {split: eval_set(data[split], caches[f"{split}-teacher"], student_tok,
                             teacher_tok) for split in ("val", "test")}
    score = Scorer(cfg, student_tok, aligner, evals, caches, budget)
    start = results.doc["student"]
    if "test" not in start:
        start["val"], start["test"] = score(student, "val"), score(student, "test")
        results.save()
    st = study.Stage(cfg, student, caches, evals, results, student_tok, None, log,
                     trainer=lambda setting, arm, lr, seed: train_arm(
                         cfg, arm, lr, seed, student, caches),
                     scorer=score)
    primary = [cfg.baseline, cfg.challenger]
    stage(5, f"primary arms {primary}: lr {cfg.lrs} on validation, seeds {cfg.seeds} on test")
    study.grid_then_seeds(st, primary)
    stage(6, "the other arms: the same grid and seeds")
    study.grid_then_seeds(st, [a for a in cfg.arms if a not in primary])
    stage(7, "report")
    stage(None)
    log(results.finish(format_report, os.path.join(cfg.workdir, "crosstok-report.md")))
    return results.doc


# ---------------------------------------------------------------------------------- report


def _runs(doc: dict, arm: str) -> dict[int, dict]:
    lr = doc.get("best_lr", {}).get(arm)
    out = {}
    for seed in doc["config"]["seeds"]:
        run = doc["runs"].get(study.run_key("teacher", arm, lr, seed)) if lr else None
        if run and "test" in run:
            out[seed] = run["test"]
    return out


def _value(scores: dict, metric: str) -> float:
    if metric in BPB:
        return float(scores["bpb"][metric]["bits_per_byte"])
    return float(np.nanmean(scores["per_prompt"][metric]))


def summarize(doc: dict) -> dict:
    """Each arm's mean ± std over seeds; each arm − the baseline paired (per-prompt metrics:
    bootstrap over seeds and prompts; bits/byte: t interval over seeds); the primary effect
    as a t interval over seed means (the registration: fewer than 5 seeds); the gate."""
    cfg = doc["config"]
    metrics = [*PROMPT_METRICS, *BPB]
    runs = {arm: _runs(doc, arm) for arm in cfg["arms"]}
    table = {arm: {m: _mean_std([_value(s, m) for s in r.values()]) for m in metrics}
             for arm, r in runs.items() if r}
    base = runs.get(cfg["baseline"], {})
    paired = {}
    for arm, r in runs.items():
        common = sorted(set(r) & set(base))
        if arm == cfg["baseline"] or not common:
            continue
        paired[arm] = {m: (seed_interval([_value(r[s], m) - _value(base[s], m) for s in common])
                           if m in BPB else paired_bootstrap(
                               [np.subtract(r[s]["per_prompt"][m], base[s]["per_prompt"][m])
                                for s in common])).to_json() for m in metrics}
    out = {"table": table, "paired": paired}
    start = doc["student"].get("test")
    if start:
        out["floor"] = {m: _value(start, m) for m in metrics}
    if start and cfg["baseline"] in table:
        cut = out["floor"]["teacher"] - table[cfg["baseline"]]["teacher"][0]
        out["headroom"] = {"cut": cut, "needed": cfg["headroom_bpb"],
                           "passed": cut >= cfg["headroom_bpb"]}
    chal = runs.get(cfg["challenger"], {})
    common = sorted(set(chal) & set(base))
    if common:
        t = seed_interval([_value(chal[s], PRIMARY) - _value(base[s], PRIMARY) for s in common])
        if len(common) < 2:
            words = (f"1 seed: no verdict (the registration needs ≥ 3; one seed gives no "
                     f"interval over seeds): on this seed {cfg['challenger']} − CE is "
                     f"{t.mean:+.4f}")
        else:
            words = verdict(t, cfg["smallest_effect"], f"{cfg['challenger']} better than CE",
                            f"{cfg['challenger']} worse than CE")
        out["primary"] = {"effect": t.to_json(), "verdict": words}
    return out


def headline(doc: dict, summary: dict | None = None) -> str:
    """The gate, the primary comparison and its verdict (the README's block); `summary`:
    summarize(doc) when the caller has it."""
    cfg, s = doc["config"], summary or summarize(doc)
    lines = []
    gate = s.get("headroom")
    if gate:
        lines.append(f"Headroom gate: CE cut the student's bits/byte of the teacher's test "
                     f"replies by {gate['cut']:.4f} from the start (needed ≥ "
                     f"{gate['needed']:g}): " + ("passed." if gate["passed"] else
                                                 "FAILED — no headroom."))
    p = s.get("primary")
    if p:
        e = Paired(**p["effect"])
        lines.append(f"Primary (registered): {cfg['challenger']} − CE in ROUGE-L of greedy "
                     f"replies vs the teacher's, {e.seeds} seed(s), t interval over seed "
                     f"means: {_interval(p['effect'])}; smallest effect worth detecting "
                     f"{cfg['smallest_effect']:g}" + (f"; minimum detectable effect "
                                                      f"{e.mde:.4f}" if e.seeds > 1 else "")
                     + ".")
        lines.append(f"Verdict: {p['verdict']}.")
    if not doc.get("complete"):
        lines.append(f"(Incomplete: {sum('test' in r for r in doc['runs'].values())} runs "
                     f"scored on test so far; the study resumes from this file.)")
    return "\n".join(lines) or "(no runs scored yet)"


def format_report(doc: dict, summary: dict | None = None) -> str:
    """The report as Markdown, every figure from the results file; `summary`: summarize(doc)
    when the caller has it."""
    cfg, s = doc["config"], summary or summarize(doc)
    metrics = [*PROMPT_METRICS, *BPB]
    labels = {**PROMPT_METRICS, **BPB}
    lines = [headline(doc, s)]
    if s["table"]:
        seeds = max(int(r[PRIMARY][2]) for r in s["table"].values())
        lines += ["", f"Test split, {seeds} seed(s) (mean ± std over seeds); the student "
                  f"writes at most {doc['data'].get('student_max_new_tokens')} tokens "
                  f"(the byte budget of {cfg['max_new_tokens']} teacher tokens):", "",
                  "| arm | lr | " + " | ".join(labels[m] for m in metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        if "floor" in s:
            lines.append("| start (moved + healed) | – | " + " | ".join(
                f"{s['floor'][m]:.4f}" for m in metrics) + " |")
        for arm, row in s["table"].items():
            lines.append(f"| {arm} | {doc['best_lr'][arm]:g} | "
                         + " | ".join(_cell(row[m]) for m in metrics) + " |")
        start = doc["student"].get("test")
        if start:
            t = {m: start["bpb"][m]["teacher_bits_per_byte"] for m in BPB}
            lines.append("| teacher (ceiling) | – | 1.0000 | – | – | – | – | "
                         f"{t['teacher']:.4f} | {t['human']:.4f} |")
    if s["paired"]:
        lines += ["", "Arm − CE, paired on the same seed (and prompt); mean [95 % interval]:",
                  "", "| arm − CE | " + " | ".join(labels[m] for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for arm, row in s["paired"].items():
            lines.append(f"| {arm} | " + " | ".join(_interval(row[m]) for m in metrics) + " |")
    if doc.get("best_lr"):
        lines += ["", "Learning-rate grid (validation ROUGE-L vs the teacher, seed 0):", "",
                  grid_table({**doc, "student": {}})]
        edges = grid_edges(doc)
        if edges:
            lines += ["", edges]
    st = doc.get("stages", {})
    if st:
        total = sum(st.values())
        lines += ["", "| stage | seconds |", "|---|---|"] + [
            f"| {k} {STAGES.get(k, '')} | {v:,.0f} |" for k, v in sorted(st.items())] + [
            f"| **total** | **{total:,.0f}** ({total / 3600:.2f} h) |"]
    return "\n".join(lines)


def load_results(path: str) -> dict:
    """A results file of this recipe, or one line saying why it is not one."""
    return study.Results.load(path, DESIGN, "crosstok-study")
