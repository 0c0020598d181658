"""On-policy rounds against the study's off-policy KD: the registered comparison of
docs/on-policy.md (issue 31).

The study's setup (atkd_cache/recipes/study.py: the fp32 SmolLM2 teacher, the chitchat
splits, the KJV-healed student, greedy test replies against the teacher's) with four arms
that each see the same number of replies once:
    offpolicy-kd             the teacher's sampled replies to the training prompts (the
                             study's KD arm: one epoch, cosine to 0 with 3 % warm-up)
    onpolicy-kd              `rounds` on-policy rounds from the healed student
                             (atkd_cache/recipes/on_policy.py), KD over the teacher's top-k
                             at the student's own states
    onpolicy-rkl             the same rounds with the per-token reverse-KL estimator
    offpolicy-then-onpolicy  the teacher's replies to the first half of the prompts, then
                             rounds on the second half (Qwen3's order)
The on-policy rounds train at a constant rate (the loop's schedule); every arm searches the
same lr grid on validation (seed 0) and runs every seed at its choice. The primary
comparison (onpolicy-kd − offpolicy-kd, ROUGE-L to the teacher's greedy replies) runs first,
so a stopped run still has it.

    atkd-cache on-policy-study [--workdir runs/on-policy-study] [--smoke] ...

Stages: 1 teacher, 2 data, 3 caches, 4 student (+ floor and ceiling), 5 primary arms' grid
and seeds, 6 the other arms' grid and seeds, 7 report. Every stage resumes.
"""

from __future__ import annotations

import json
import os

import numpy as np

from atkd_cache import assets
from atkd_cache.cache import open_cache
from atkd_cache.data import DataSpec, load_rows
from atkd_cache.dump import DumpConfig, dump_teacher
from atkd_cache.errors import UserError
from atkd_cache.losses.kd import LossConfig
from atkd_cache.recipes import study
from atkd_cache.recipes.files import write_jsonl_once
from atkd_cache.recipes.on_policy import OnPolicyConfig, run_on_policy
from atkd_cache.recipes.stats import Paired, seed_interval
from atkd_cache.recipes.study_config import ON_POLICY_ARMS, OnPolicyStudyConfig
from atkd_cache.recipes.study_report import (
    PRIMARY,
    _interval,
    _runs,
    grid_edges,
    grid_table,
    run_value,
    summarize,
    tables,
)
from atkd_cache.train.evaluate import reply_shape, stop_ids

DESIGN = "on-policy-1"
DOCS_BLOCK = ("docs/on-policy.md", "on-policy", "report")  # `--report FILE --docs`
README_BLOCK = ("README.md", "on-policy", "headline")  # ... and this one with headline()
STAGES = {"1": "teacher", "2": "data", "3": "caches", "4": "student (healing + floor and "
          "ceiling scores)", "5": "primary arms (grid + seeds)", "6": "other arms (grid + "
          "seeds)", "7": "report"}


def check(cfg: OnPolicyStudyConfig) -> None:
    """Refuse, in one line, a design whose arms would not see the same replies."""
    unknown = [a for a in cfg.arms if a not in ON_POLICY_ARMS]
    if unknown:
        raise UserError(f"unknown arm {unknown[0]!r}: arms {', '.join(ON_POLICY_ARMS)}")
    if cfg.baseline not in cfg.arms or cfg.challenger not in cfg.arms:
        raise UserError(f"the comparison needs its baseline {cfg.baseline} and challenger "
                        f"{cfg.challenger} among --arms")
    offpolicy = cfg.train_prompts * cfg.responses
    onpolicy = cfg.rounds * cfg.prompts_per_round * cfg.rollouts
    if offpolicy != onpolicy:
        raise UserError(f"unequal budgets: the off-policy arm sees {offpolicy} replies "
                        f"(--train-prompts x --responses), the rounds {onpolicy} (--rounds x "
                        f"--prompts-per-round x --rollouts): make them equal")
    if "offpolicy-then-onpolicy" in cfg.arms and (cfg.rounds < 2 or cfg.responses
                                                  != cfg.rollouts):
        raise UserError("offpolicy-then-onpolicy splits the budget in half: it needs --rounds "
                        "≥ 2 and --responses equal to --rollouts")


def half_prompts(cfg: OnPolicyStudyConfig) -> int:
    """offpolicy-then-onpolicy: the teacher's replies to this many prompts, then rounds on
    the rest (rounds // 2 rounds' worth each side, so the budget stays equal)."""
    return (cfg.rounds // 2) * cfg.prompts_per_round


def split_data(cfg: OnPolicyStudyConfig, data: dict[str, str]) -> dict[str, str]:
    """The training prompts' second half as its own file (the mixed arm's rounds)."""
    rows = load_rows(DataSpec(source=data["train-teacher"], messages_field="messages"))
    rest = [{"messages": r["messages"]} for r in rows][half_prompts(cfg):]
    path = os.path.join(cfg.workdir, "data", f"train-teacher-rest-{len(rest)}.jsonl")
    return {**data, "train-rest": write_jsonl_once(path, rest)}


def half_cache(cfg: OnPolicyStudyConfig, teacher: str, data: dict[str, str]) -> str:
    """The teacher's sampled replies to the first half of the prompts (the same seeds as the
    main training cache, so the same replies)."""
    out = os.path.join(cfg.workdir, "caches", f"train-teacher-half-{half_prompts(cfg)}")
    spec = DataSpec(source=data["train-teacher"], messages_field="messages",
                    max_length=cfg.prompt_tokens + cfg.max_new_tokens, limit=half_prompts(cfg))
    dump_teacher(DumpConfig(model=teacher, data=spec, output=out, top_k=cfg.top_k,
                            batch_tokens=4096, batch_size=None, progress=False, generate=True,
                            num_responses=cfg.responses, gen_temperature=cfg.temperature,
                            max_new_tokens=cfg.max_new_tokens, seed=0), log=lambda m: None)
    return out


def _summary(folder: str) -> dict:
    path = os.path.join(folder, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_folder(cfg: OnPolicyStudyConfig, arm: str, lr: float, seed: int) -> str:
    """Where an on-policy arm's run writes its rounds."""
    return os.path.join(cfg.workdir, "runs", "teacher", arm, f"lr{lr:g}-seed{seed}")


def arm_rounds(cfg: OnPolicyStudyConfig, arm: str) -> int:
    """How many on-policy rounds an arm runs (the mixed arm: the second half's)."""
    return cfg.rounds - cfg.rounds // 2 if arm == "offpolicy-then-onpolicy" else cfg.rounds


def sample_stats(folder: str, rounds: int, stops: set[int]) -> dict[str, dict]:
    """Per round of an on-policy run folder, read from the round's two caches: what the
    student wrote (mean reply tokens; the share of replies ending in a stop id) and the
    reverse KL of its samples, Σ_t log p_s(y_t) − log p_t(y_t) over a reply (the behaviour
    log-probs of the rollout cache, the teacher's of the scoring cache), mean per reply and
    per token. Round r's samples are student r−1's: the policy before that round trained.
    Also the median gradient norm (before clipping) of the round's training steps.
    A diagnostic, not part of the registration."""
    out = {}
    for r in range(1, rounds + 1):
        at = os.path.join(folder, f"round-{r:03d}")
        behaviour = {s.seq_id: s for s in open_cache(os.path.join(at, "rollouts"))}
        gaps, replies = [], []
        for t in open_cache(os.path.join(at, "teacher")):
            s = behaviour[t.seq_id]
            if not np.array_equal(s.input_ids, t.input_ids):
                raise UserError(f"{at}: the teacher's cache and the rollouts differ in "
                                f"sequence {t.seq_id}: the round folder is damaged")
            gaps.append(s.target_logprob.astype(np.float64) - t.target_logprob)
            replies.append(t.target_ids.tolist())
        shape = reply_shape(replies, stops)
        with open(os.path.join(at, "train", "metrics.jsonl")) as f:
            norms = [json.loads(line)["grad_norm"] for line in f if line.strip()]
        out[str(r)] = {"replies": len(gaps), "grad_norm_median": float(np.median(norms)),
                       "reply_tokens": float(np.mean(shape["reply_tokens"])),
                       "stopped": float(np.mean(shape["stopped"])),
                       "rkl_per_reply": float(np.mean([g.sum() for g in gaps])),
                       "rkl_per_token": float(np.concatenate(gaps).mean())}
    return out


def add_sample_stats(cfg: OnPolicyStudyConfig, doc: dict, stops: set[int]) -> None:
    """Fill in `sample_stats` for the on-policy runs of `doc` that lack it and whose run
    folder is still on disk (a run folder from another checkout is not)."""
    for key, run in doc["runs"].items():
        arm = key.split("/")[1]
        if arm == "offpolicy-kd" or "samples" in run:
            continue
        if os.path.exists(os.path.join(run["out"], "model")):  # (the last round's student)
            run["samples"] = sample_stats(run_folder(cfg, arm, run["lr"], run["seed"]),
                                          arm_rounds(cfg, arm), stops)


def train_rounds(cfg: OnPolicyStudyConfig, arm: str, lr: float, seed: int, student: str,
                 teacher: str, data: dict[str, str], caches: dict[str, str]) -> dict:
    """One on-policy arm's run (`atkd-cache on-policy` in its own folder); what it spent:
    student updates, tokens trained on, replies, teacher tokens scored."""
    out = run_folder(cfg, arm, lr, seed)
    mixed = arm == "offpolicy-then-onpolicy"
    rounds = arm_rounds(cfg, arm)
    op = OnPolicyConfig(
        student=student, teacher=teacher, data=data["train-rest" if mixed else "train-teacher"],
        output=out, rounds=rounds, prompts_per_round=cfg.prompts_per_round,
        messages_field="messages", max_length=cfg.prompt_tokens + cfg.max_new_tokens,
        num_responses=cfg.rollouts, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.rollout_temperature, top_k=cfg.top_k, dtype="fp32",
        loss=LossConfig(**ON_POLICY_ARMS[arm]), lr=lr, batch_tokens=cfg.batch_tokens,
        checkpoint_every=50, seed=seed, start_cache=caches["train-half"] if mixed else None,
        progress=False)
    res = run_on_policy(op, log=lambda m: None)
    trained = [_summary(os.path.join(out, f"round-{r:03d}", "train"))
               for r in range(0 if mixed else 1, rounds + 1)]
    done = [res["rounds"][str(r)] for r in range(1, rounds + 1)]
    offpolicy = open_cache(caches["train-half"]) if mixed else None
    return {"out": os.path.dirname(done[-1]["student"]),
            "steps": sum(t.get("steps", 0) for t in trained),
            "tokens": sum(t.get("tokens_seen", 0) for t in trained),
            "replies": sum(d["replies"] for d in done) + (len(offpolicy) if offpolicy else 0),
            "teacher_tokens_scored": sum(d["teacher_tokens_scored"] for d in done)
            + (offpolicy.num_supervised if offpolicy else 0),
            "rounds": {r: res["rounds"][str(r)]["seconds"] for r in range(1, rounds + 1)},
            "loss": ON_POLICY_ARMS[arm], "lr": lr, "seed": seed}


def train_offpolicy(cfg: OnPolicyStudyConfig, lr: float, seed: int, student: str,
                    caches: dict[str, str]) -> dict:
    """The study's KD arm on the teacher's replies (its own folder name: runs/teacher/kd)."""
    run = study.train_arm(cfg, "teacher", "kd", lr, seed, student, caches)
    train_cache = open_cache(caches["train-teacher"])
    return {**run, "loss": ON_POLICY_ARMS["offpolicy-kd"], "replies": len(train_cache),
            "teacher_tokens_scored": train_cache.num_supervised}


def run_on_policy_study(cfg: OnPolicyStudyConfig, log=print) -> dict:
    """Run (or continue) every stage; returns the results document."""
    from atkd_cache.models import load_tokenizer

    check(cfg)
    os.makedirs(cfg.workdir, exist_ok=True)
    results = study.Results(cfg.results or os.path.join(cfg.workdir, "results.json"), cfg,
                            design=DESIGN)
    stage = study.StageClock(results, 7, log)

    stage(1, "teacher: SmolLM2-135M-Instruct (GGUF -> HF folder, once)")
    teacher = assets.smollm2_folder(os.path.join(cfg.workdir, "assets"), dtype="fp32")
    tokenizer = load_tokenizer(teacher)
    stage(2, "data: the study's chitchat splits")
    data = split_data(cfg, study.write_data(cfg, tokenizer))
    stage(3, "caches: the study's, and the teacher's replies to the first half of the prompts")
    caches = study.build_caches(cfg, teacher, data, log)
    if "offpolicy-then-onpolicy" in cfg.arms:
        caches["train-half"] = half_cache(cfg, teacher, data)
    evals = {split: study.eval_set(data[split], caches[f"{split}-teacher"], tokenizer)
             for split in ("val", "test")}
    results.doc["data"] = {"test_prompts": len(evals["test"].prompts),
                           "val_prompts": len(evals["val"].prompts)}
    stage(4, f"student: {cfg.layers} of 30 layers, healed by KD on KJV verses")
    student = study.build_student(cfg, teacher, caches, results, log)
    loaded = {}

    def teacher_model():
        if "m" not in loaded:
            loaded["m"] = study._load(teacher)
        return loaded["m"]

    def trainer(setting: str, arm: str, lr: float, seed: int) -> dict:
        if arm == "offpolicy-kd":
            return train_offpolicy(cfg, lr, seed, student, caches)
        # (offpolicy-then-onpolicy: its off-policy half is round 0, on caches["train-half"])
        run = train_rounds(cfg, arm, lr, seed, student, teacher, data, caches)
        return {**run, "samples": sample_stats(run_folder(cfg, arm, lr, seed),
                                               arm_rounds(cfg, arm),
                                               stop_ids(teacher_model(), tokenizer))}

    st = study.Stage(cfg, student, caches, evals, results, tokenizer, teacher_model, log,
                     trainer=trainer)
    study.baselines(st)
    primary = [cfg.baseline, cfg.challenger]
    stage(5, f"primary arms {primary}: lr {cfg.lrs} on validation (seed {cfg.seeds[0]}), "
             f"then seeds {cfg.seeds} on test")
    study.grid_then_seeds(st, primary)
    others = [a for a in cfg.arms if a not in primary]
    stage(6, f"other arms {others}: the same grid and seeds")
    study.grid_then_seeds(st, others)
    stage(7, "report")
    add_sample_stats(cfg, results.doc, stop_ids(teacher_model(), tokenizer))
    stage(None)
    log(results.finish(format_report, os.path.join(cfg.workdir, "on-policy-report.md")))
    return results.doc


# ---------------------------------------------------------------------------------- report


def budget_table(doc: dict) -> str:
    """What each arm spent at its chosen lr, mean over seeds: replies, student updates,
    tokens trained on, teacher tokens scored."""
    lines = ["| arm | replies | student updates | tokens trained on | teacher tokens scored |",
             "|---|---|---|---|---|"]
    for arm in doc["config"]["arms"]:
        lr = doc.get("best_lr", {}).get(arm)
        runs = [doc["runs"][k] for k in doc["runs"]
                if lr is not None and k.startswith(f"teacher/{arm}/lr{lr:g}/") and
                "test" in doc["runs"][k]]
        if runs:
            cells = [np.mean([r.get(k) or 0 for r in runs]) for k in
                     ("replies", "steps", "tokens", "teacher_tokens_scored")]
            lines.append(f"| {arm} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
    return "\n".join(lines)


def samples_table(doc: dict) -> str:
    """Each on-policy arm's samples round by round, per seed at its chosen lr, for the runs
    whose round folders were read (sample_stats)."""
    lines = ["| arm | seed | round | replies stopped | reply tokens | reverse KL per reply "
             "(nats) | per token | median grad norm in its training |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in doc["config"]["arms"]:
        lr = doc.get("best_lr", {}).get(arm)
        for seed in doc["config"]["seeds"]:
            run = doc["runs"].get(f"teacher/{arm}/lr{lr:g}/seed{seed}") if lr else None
            for rnd, v in sorted((run or {}).get("samples", {}).items(), key=lambda x: int(x[0])):
                lines.append(f"| {arm} | {seed} | {rnd} | {v['stopped']:.3f} | "
                             f"{v['reply_tokens']:.1f} | {v['rkl_per_reply']:.1f} | "
                             f"{v['rkl_per_token']:.3f} | {v['grad_norm_median']:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def headline(doc: dict, summary: dict | None = None) -> str:
    """The gate, the primary comparison (bootstrap and t over seed means), the verdict;
    `summary`: summarize(doc) when the caller has it."""
    summary = summary or summarize(doc)
    cfg = doc["config"]
    lines = []
    gate = summary.get("headroom")
    if gate:
        lines.append(f"Headroom gate: off-policy KD cut the test KL to the teacher by "
                     f"{gate['kd_kl_cut']:.3f} nats from the start (needed ≥ "
                     f"{gate['needed']:g}): " + ("passed." if gate["passed"] else
                                                 "FAILED — no headroom."))
    p = summary.get("primary")
    if not p:
        return "\n".join(lines + ["(the primary arms are not scored on test yet)"])
    e = p["effect"]
    base, chal = _runs(doc, "teacher", cfg["baseline"]), _runs(doc, "teacher", cfg["challenger"])
    seeds = sorted(set(base) & set(chal))
    t = seed_interval([run_value(chal[s], PRIMARY) - run_value(base[s], PRIMARY)
                       for s in seeds])
    lines.append(f"Primary (registered): {cfg['challenger']} − {cfg['baseline']} in ROUGE-L of "
                 f"greedy replies vs the teacher's, {e['seeds']} seed(s) x {e['prompts']} test "
                 f"prompts: {_interval(e)} (bootstrap over seeds and prompts)"
                 + (f"; t interval over the {t.seeds} seed means [{t.low:+.4f}, {t.high:+.4f}]"
                    f", minimum detectable effect {t.mde:.4f}" if t.seeds > 1 else "")
                 + f"; smallest effect worth detecting {p['smallest']:g}.")
    words = p["verdict"]
    if 1 < len(seeds) < 5:  # the registration: the verdict from the t interval under 5 seeds
        from atkd_cache.recipes.stats import verdict
        from atkd_cache.recipes.study_report import VERDICT_WORDS

        better, worse = VERDICT_WORDS[(cfg["baseline"], cfg["challenger"])]
        words = verdict(Paired(**t.to_json()), cfg["smallest_effect"], better, worse)
        words += f" — from the t interval over {len(seeds)} seed means, as registered"
    lines.append(f"Verdict: {words}.")
    if not doc.get("complete"):
        done = sum("test" in r for r in doc["runs"].values())
        lines.append(f"(Incomplete: {done} runs scored on test so far; the comparison resumes "
                     f"from this file.)")
    return "\n".join(lines)


def format_report(doc: dict, summary: dict | None = None) -> str:
    """The comparison's report as Markdown, every figure from the results file; `summary`:
    summarize(doc) when the caller has it."""
    summary = summary or summarize(doc)
    st = doc.get("stages", {})
    times = ["| stage | seconds |", "|---|---|"] + [
        f"| {k} {STAGES.get(k, '')} | {v:,.0f} |" for k, v in sorted(st.items())]
    total = sum(st.values())
    times.append(f"| **total** | **{total:,.0f}** ({total / 3600:.2f} h) |")
    grid = ""
    if doc.get("best_lr"):
        grid = ("Learning-rate grid (validation ROUGE-L vs the teacher, seed 0):\n\n"
                + "\n\n".join(p for p in (grid_table(doc), grid_edges(doc)) if p))
    samples = samples_table(doc)
    if samples:
        samples = ("What the students wrote in each round (not registered: a diagnostic read "
                   "from the rounds' caches; round r's samples are the policy's before round r "
                   "trained; the reverse KL is Σ_t log p_s(y_t) − log p_t(y_t) over a sampled "
                   "reply, the quantity `rkl-tokens` minimises, in expectation; the gradient "
                   "norms are before clipping at the trainer's default of 1):\n\n" + samples)
    parts = [headline(doc, summary), tables(doc, summary),
             "What each arm spent (its chosen lr, mean over seeds):\n\n" + budget_table(doc),
             grid, samples, "\n".join(times)]
    return "\n\n".join(p for p in parts if p)


def load_results(path: str) -> dict:
    """A results file of this recipe, or one line saying why it is not one."""
    return study.Results.load(path, DESIGN, "on-policy-study")
