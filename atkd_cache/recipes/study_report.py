"""The study's report, printed from its results file by code (never retyped): the headroom
gate, ATKD − KD paired per prompt and seed (atkd_cache/stats.py), the power the run
achieved, the verdict in the registered words, tables with the teacher (ceiling) and the
starting student (floor), an example prompt, a plot; and the first design's tables.

    atkd-cache study-report docs/study_results.json [--docs]

`--docs` rewrites the generated blocks of docs/study.md and README.md (between
`<!-- study:NAME -->` and `<!-- /study:NAME -->`); tests/test_study.py checks they match.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from atkd_cache.errors import UserError, first_line
from atkd_cache.recipes.stats import T_975, Paired, paired_bootstrap, seed_interval, verdict

# per-prompt metrics (higher is better for the first three; the reply's shape is descriptive:
# its length, whether it ended with EOS within the budget, its distinct 3-gram share).
# Results files written before the shape metrics existed have only reply_tokens of them.
PROMPT_METRICS = {"rouge_teacher": "ROUGE-L vs teacher", "teacher_logprob": "teacher log-prob",
                  "rouge_human": "ROUGE-L vs human", "reply_tokens": "reply tokens",
                  "stopped": "stop rate", "distinct_3": "distinct 3-grams"}
# per-run metrics on a test cache: (cache, metric) -> (label, higher is better)
CACHE_METRICS = {("teacher", "kl_to_teacher"): ("KL", False),
                 ("teacher", "kl_easy"): ("KL easy", False),
                 ("teacher", "kl_hard"): ("KL hard", False),
                 ("teacher", "nll"): ("NLL", False),
                 ("teacher", "top1_agreement"): ("top-1 agr.", True),
                 ("teacher", "ece"): ("ECE", False),
                 ("human", "nll"): ("human NLL", False)}
PRIMARY = "rouge_teacher"
# (baseline, challenger) -> the registered words for each direction
VERDICT_WORDS = {("kd", "atkd"): ("ATKD better than KD", "ATKD worse than KD"),
                 ("offpolicy-kd", "onpolicy-kd"): ("on-policy KD better than off-policy KD",
                                                   "on-policy KD worse than off-policy KD")}


def _seeds(doc: dict, setting: str) -> list[int]:
    return doc["config"]["seeds" if setting == "teacher" else "human_seeds"]


def _runs(doc: dict, setting: str, arm: str) -> dict[int, dict]:
    """seed -> test scores of the arm's runs at its chosen lr (the finished ones)."""
    lr = doc.get("best_lr", {}).get(arm)
    out = {}
    for seed in _seeds(doc, setting):
        run = doc["runs"].get(f"{setting}/{arm}/lr{lr:g}/seed{seed}") if lr else None
        if run and "test" in run:
            out[seed] = run["test"]
    return out


def prompt_metrics(doc: dict) -> list[str]:
    """The per-prompt metrics this results file has (the teacher's scores list them all)."""
    have = doc["teacher"].get("test", {}).get("per_prompt")
    return [m for m in PROMPT_METRICS if have is None or m in have]


def primary_seed_interval(doc: dict, setting: str) -> Paired | None:
    """ATKD − KD on the primary metric as a t interval over a setting's seed means (with
    few seeds the honest interval: stats.py; one seed: no spread); None when no seed has
    both arms."""
    at, kd = _runs(doc, setting, "atkd"), _runs(doc, setting, "kd")
    seeds = sorted(set(at) & set(kd))
    if not seeds:
        return None
    return seed_interval([run_value(at[s], PRIMARY) - run_value(kd[s], PRIMARY)
                          for s in seeds])


def run_value(scores: dict, metric) -> float:
    """One run's value of a metric: the mean over prompts, or the cache metric."""
    if isinstance(metric, tuple):
        return float(scores[metric[0]][metric[1]])
    values = np.asarray(scores["per_prompt"][metric], dtype=np.float64)
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def baseline_arms(doc: dict) -> tuple[str, str]:
    """(baseline, challenger) of the primary comparison: KD and ATKD in the study; the
    on-policy comparison names its own in its config."""
    cfg = doc["config"]
    return cfg.get("baseline", "kd"), cfg.get("challenger", "atkd")


def summarize(doc: dict) -> dict:
    """Per setting: each arm's mean ± std over seeds of every metric, each arm − the
    baseline (KD) paired (per-prompt metrics: seeds x prompts bootstrap; cache metrics: seeds
    only), the floor and ceiling rows; the headroom gate and the primary verdict."""
    cfg = doc["config"]
    base, challenger = baseline_arms(doc)
    metrics = (*prompt_metrics(doc), *CACHE_METRICS)
    out = {"settings": {}}
    for setting in cfg["settings"]:
        table, paired = {}, {}
        runs = {arm: _runs(doc, setting, arm) for arm in cfg["arms"]}
        for arm, by_seed in runs.items():
            if by_seed:
                table[arm] = {_name(m): _mean_std([run_value(s, m) for s in by_seed.values()])
                              for m in metrics}
        for arm, by_seed in runs.items():
            common = sorted(set(by_seed) & set(runs.get(base, {})))
            if arm == base or not common:
                continue
            paired[arm] = {}
            for m in metrics:
                if isinstance(m, tuple):  # one number per seed: a t interval over seeds
                    p = seed_interval([run_value(by_seed[s], m) - run_value(runs[base][s], m)
                                       for s in common])
                else:
                    p = paired_bootstrap([np.subtract(by_seed[s]["per_prompt"][m],
                                                      runs[base][s]["per_prompt"][m])
                                          for s in common])
                paired[arm][_name(m)] = p.to_json()
        out["settings"][setting] = {"table": table, "paired_vs_kd": paired}
    start, teacher = doc["student"].get("test"), doc["teacher"].get("test")
    if start:
        out["floor"] = {_name(m): run_value(start, m) for m in metrics}
    if teacher:
        out["ceiling"] = {**{m: float(np.nanmean(teacher["per_prompt"][m]))
                             for m in prompt_metrics(doc)},
                          **{_name(m): float(teacher[m[0]][m[1]]) for m in CACHE_METRICS}}
    main = out["settings"].get("teacher", {})
    kd = main.get("table", {}).get(base)
    if start and kd:
        cut = out["floor"]["teacher.kl_to_teacher"] - kd["teacher.kl_to_teacher"][0]
        out["headroom"] = {"kd_kl_cut": cut, "needed": cfg["headroom_kl"],
                           "passed": cut >= cfg["headroom_kl"]}
    effect = main.get("paired_vs_kd", {}).get(challenger, {}).get(PRIMARY)
    if effect:
        out["primary"] = {"effect": effect, "smallest": cfg["smallest_effect"],
                          "verdict": primary_verdict(out, Paired(**effect), cfg)}
    return out


def primary_verdict(summary: dict, effect: Paired, cfg: dict) -> str:
    """The registered wording, refused a direction when the gate failed."""
    gate = summary.get("headroom", {})
    better, worse = VERDICT_WORDS[(cfg.get("baseline", "kd"), cfg.get("challenger", "atkd"))]
    words = verdict(effect, cfg["smallest_effect"], better, worse)
    if gate and not gate["passed"]:
        return (f"no headroom: KD cut the test KL by only {gate['kd_kl_cut']:.3f} nats "
                f"(< {gate['needed']:g}), so this run cannot test the claim; {words}")
    if effect.seeds < 2:
        return (f"1 seed: no verdict (the registered design needs ≥ 5; this interval covers "
                f"the prompts of one seed, not how seeds vary) — on this seed alone: {words}")
    return words


def _name(metric) -> str:
    return ".".join(metric) if isinstance(metric, tuple) else metric


def _label(name: str) -> str:
    if name in PROMPT_METRICS:
        return PROMPT_METRICS[name]
    return CACHE_METRICS[tuple(name.split("."))][0]


def _mean_std(values: list[float]) -> list[float]:
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return [mean, std, len(values)]


def _cell(ms: list[float]) -> str:
    if ms[2] < 2:
        return f"{ms[0]:.4f}"
    if ms[1] == 0:  # (e.g. every reply ran to the token limit on every seed)
        return f"{ms[0]:.4f} (no spread)"
    return f"{ms[0]:.4f} ± {ms[1]:.4f}"


def _interval(p: dict) -> str:
    if p["seeds"] < 2 and p["prompts"] < 2:
        return f"{p['mean']:+.4f} (1 seed: no interval)"
    if p["high"] == p["low"]:
        return f"{p['mean']:+.4f} (every pair equal: no interval)"
    return f"{p['mean']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]"


def headline(doc: dict, summary: dict) -> str:
    """The gate, the primary result with its power, and the verdict: a few lines."""
    lines = []
    gate = summary.get("headroom")
    if gate:
        lines.append(f"Headroom gate: KD cut the test KL to the teacher by "
                     f"{gate['kd_kl_cut']:.3f} nats from the start (needed ≥ {gate['needed']:g}): "
                     + ("passed." if gate["passed"] else "FAILED — no headroom."))
    p = summary.get("primary")
    if p:
        e = p["effect"]
        lines.append(f"Primary (registered): ATKD − KD in ROUGE-L of greedy replies vs the "
                     f"teacher's, {e['seeds']} seed(s) x {e['prompts']} test prompts: "
                     f"{_interval(e)}; smallest effect worth detecting {p['smallest']:g}; "
                     f"minimum detectable effect achieved {e['mde']:.4f} (80 % power).")
        lines.append(f"Verdict: {p['verdict']}.")
    second = summary["settings"].get("human", {}).get("paired_vs_kd", {}).get("atkd", {})
    if PRIMARY in second:  # secondary: the registration's verdict is the main setting's
        e = second[PRIMARY]
        t = primary_seed_interval(doc, "human")
        line = (f"Second setting (human training replies; secondary, no verdict registered): "
                f"ATKD − KD in the same metric, {e['seeds']} seed(s) x {e['prompts']} test "
                f"prompts: {_interval(e)}")
        if t is not None and t.seeds > 1:  # few seeds: the t interval is the honest one
            settled = t.low > 0 or t.high < 0
            line += (f" (bootstrap); t interval over the {t.seeds} seed means "
                     f"[{t.low:+.4f}, {t.high:+.4f}]: "
                     + ("established" if settled else "not established"))
        lines.append(line + ".")
    if not doc.get("complete"):
        done = sum("test" in r for r in doc["runs"].values())
        lines.append(f"(Incomplete: {done} runs scored on test so far; the study resumes "
                     f"from this file.)")
    return "\n".join(lines) if lines else "(no runs scored yet)"


def tables(doc: dict, summary: dict) -> str:
    """Per setting: floor, ceiling and every arm on every metric; arm − KD paired."""
    names = [*prompt_metrics(doc), *(_name(m) for m in CACHE_METRICS)]
    base = baseline_arms(doc)[0]
    versus = "KD" if base == "kd" else base
    out = []
    for setting, s in summary["settings"].items():
        if not s["table"]:
            continue
        seeds = max(int(r[names[0]][2]) for r in s["table"].values())
        title = ("teacher-written responses (main)" if setting == "teacher"
                 else "human responses (second setting)")
        out += [f"**Trained on {title}**, test split, {seeds} seed(s) (mean ± std over seeds):",
                "", "| arm | lr | " + " | ".join(_label(n) for n in names) + " |",
                "|---|---|" + "---|" * len(names)]
        if "floor" in summary:
            out.append("| start (healed student) | – | " + " | ".join(
                f"{summary['floor'][n]:.4f}" for n in names) + " |")
        for arm, row in s["table"].items():
            out.append(f"| {arm} | {doc['best_lr'][arm]:g} | "
                       + " | ".join(_cell(row[n]) for n in names) + " |")
        if "ceiling" in summary:
            c = summary["ceiling"]
            out.append("| teacher (ceiling) | – | " + " | ".join(
                f"{c[n]:.4f}" for n in names) + " |")
        if s["paired_vs_kd"]:
            out += ["", f"Arm − {versus}, paired on the same seed (and prompt); mean [95 % "
                    "interval]: the per-prompt metrics by a bootstrap over seeds and prompts, "
                    "the cache metrics by a t interval over seeds:", "",
                    f"| arm − {versus} | " + " | ".join(_label(n) for n in names) + " |",
                    "|---|" + "---|" * len(names)]
            for arm, row in s["paired_vs_kd"].items():
                out.append(f"| {arm} | " + " | ".join(_interval(row[n]) for n in names) + " |")
        out.append("")
    return "\n".join(out)


def example(doc: dict) -> str:
    """The first test prompt (not chosen) with the teacher's, the start's, each arm's seed-0
    reply and the human reply."""
    t = doc["teacher"].get("test")
    if not t:
        return ""
    cfg = doc["config"]
    lines = ["Test prompt 1 (the first, not chosen), its last turns:", "", "```text",
             _tail(t["prompts"][0]), "```", "",
             "| who | reply |", "|---|---|",
             f"| human (the data) | {_md(t['human_examples'][0])} |",
             f"| teacher | {_md(t['examples'][0])} |"]
    if doc["student"].get("test"):
        lines.append(f"| start | {_md(doc['student']['test']['examples'][0])} |")
    for arm in cfg["arms"]:
        runs = _runs(doc, "teacher", arm)
        if cfg["seeds"][0] in runs:
            lines.append(f"| {arm} | {_md(runs[cfg['seeds'][0]]['examples'][0])} |")
    return "\n".join(lines)


def _tail(prompt: str, keep: int = 3) -> str:
    turns = prompt.split("<|im_start|>")
    return "<|im_start|>".join([""] + turns[-keep:]).strip() if len(turns) > keep else prompt


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " / ") or "(empty)"


def grid_table(doc: dict) -> str:
    """Validation ROUGE-L vs the teacher of every arm x lr (seed 0), and the choice."""
    cfg = doc["config"]
    lrs = doc.get("lrs_searched", cfg["lrs"])
    lines = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for arm in cfg["arms"]:
        cells = []
        for lr in lrs:
            run = doc["runs"].get(f"teacher/{arm}/lr{lr:g}/seed{cfg['seeds'][0]}", {})
            cells.append(f"{np.mean(run['val']['per_prompt'][PRIMARY]):.4f}" if "val" in run
                         else "–")
        chosen = doc.get("best_lr", {}).get(arm)
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {chosen:g} |" if chosen else
                     f"| {arm} | " + " | ".join(cells) + " | – |")
    start = doc["student"].get("val")
    if start:
        lines.append(f"\nThe start (healed student) on validation: ROUGE-L vs teacher "
                     f"{np.mean(start['per_prompt'][PRIMARY]):.4f}, KL to the teacher "
                     f"{start['teacher']['kl_to_teacher']:.4f}.")
    return "\n".join(lines)


def wall_times(doc: dict) -> str:
    """Seconds per stage as the results file records them."""
    names = {"1": "teacher", "2": "data", "3": "caches", "4": "student (healing + floor and "
             "ceiling scores)", "5": "grid", "6": "seeds", "7": "human setting", "8": "report"}
    st = doc.get("stages", {})
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {k} {names.get(k, '')} | {v:,.0f} |" for k, v in sorted(st.items())]
    total = sum(st.values())
    lines.append(f"| **total** | **{total:,.0f}** ({total / 3600:.2f} h) |")
    if doc.get("stages_note"):  # the file says where its stage times are not the timer's
        lines.append(f"\n*Stage times: {doc['stages_note']}*")
    return "\n".join(lines)


# ---------------------------------------------------------------- the result in words


def capped(scores: dict, cap: int) -> np.ndarray:
    """Per prompt: did the greedy reply run to the token cap without an EOS? From the
    `stopped` record where the file has it; else (files before it) reply_tokens == cap,
    which also counts a reply whose EOS was exactly its cap-th token."""
    pp = scores["per_prompt"]
    if "stopped" in pp:
        return np.asarray(pp["stopped"]) == 0
    return np.asarray(pp["reply_tokens"]) >= cap


def _span(p: Paired | dict) -> str:
    p = p if isinstance(p, dict) else p.to_json()
    return f"{p['mean']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]"


def stopping(doc: dict) -> dict:
    """The stopping failure behind ATKD − KD (main setting), from the per-prompt records:
    replies run to the cap per arm and seed, the share of the primary deficit that comes
    from pairs where the teacher and KD stopped but ATKD ran to the cap, and ATKD − KD on
    the pairs where both ended the same way (both stopped or both ran to the cap)."""
    cap = doc["config"]["max_new_tokens"]
    teacher = doc["teacher"]["test"]
    runs = {arm: _runs(doc, "teacher", arm) for arm in doc["config"]["arms"]}
    out = {"cap": cap, "prompts": len(teacher["per_prompt"][PRIMARY]),
           "teacher_capped": int(capped(teacher, cap).sum()),
           "capped": {arm: [int(capped(r, cap).sum()) for r in by.values()]
                      for arm, by in runs.items() if by}}
    seeds = sorted(set(runs.get("atkd", {})) & set(runs.get("kd", {})))
    if not seeds:
        return out
    at, kd = runs["atkd"], runs["kd"]
    diff = np.array([np.subtract(at[s]["per_prompt"][PRIMARY], kd[s]["per_prompt"][PRIMARY])
                     for s in seeds])
    a_cap = np.array([capped(at[s], cap) for s in seeds])
    k_cap = np.array([capped(kd[s], cap) for s in seeds])
    t_cap = np.broadcast_to(capped(teacher, cap), a_cap.shape)
    cell = ~t_cap & ~k_cap & a_cap
    same = a_cap == k_cap
    out.update(pairs=int(diff.size), total=float(diff.mean()), cell_pairs=int(cell.sum()),
               cell_mean=float(diff[cell].mean()) if cell.any() else float("nan"),
               cell_share=float(diff[cell].sum() / diff.sum()) if diff.sum() else float("nan"),
               same_pairs=int(same.sum()),
               same=paired_bootstrap(np.where(same, diff, np.nan)).to_json())
    return out


def _range(values: list[int]) -> str:
    return f"{min(values)}–{max(values)}" if min(values) != max(values) else f"{values[0]}"


def reading(doc: dict) -> str:
    """docs/study.md's "Reading it", every number printed from the results file and every
    direction worded from its sign."""
    summary = summarize(doc)
    cfg = doc["config"]
    main = summary["settings"].get("teacher", {})
    table, paired = main.get("table", {}), main.get("paired_vs_kd", {})
    if "kd" not in table or "atkd" not in paired or "floor" not in summary:
        return "(the main setting's KD and ATKD runs are not all scored yet)"
    smallest, best = cfg["smallest_effect"], doc["best_lr"]
    heal = doc["student"].get("heal", {})
    out = []
    gate = summary["headroom"]
    out.append(
        f"- **The setup has headroom.** The student is {cfg['layers']} of the teacher's 30 "
        f"layers, healed by KD on {heal.get('tokens', 0):,} tokens of KJV scripture laid out as "
        f"chat turns (its replies to chitchat are scripture: see the example above). KD cut "
        f"its test KL to the teacher by {gate['kd_kl_cut']:.2f} nats (the gate asks "
        f"{gate['needed']:g}), and ROUGE-L against the teacher went from "
        f"{summary['floor'][PRIMARY]:.3f} to {table['kd'][PRIMARY][0]:.3f}: the arms had room "
        f"to differ.")
    e = Paired(**paired["atkd"][PRIMARY])
    t = primary_seed_interval(doc, "teacher")
    direction = "behind" if e.mean < 0 else "ahead of"
    near = max(abs(e.low), abs(e.high)) if e.low * e.high < 0 else min(abs(e.low), abs(e.high))
    beyond = ("the whole interval lies beyond the smallest effect worth detecting"
              if near > smallest else
              f"its near end ({near:.4f} from 0) lies inside the smallest effect worth "
              f"detecting ({smallest:g}), so the data do not establish a difference that large")
    out.append(
        f"- **On the registered primary metric ATKD is {direction} KD**: {_span(e)} "
        f"(bootstrap over {e.seeds} seeds × {e.prompts} prompts); the point estimate is "
        f"{abs(e.mean) / smallest:.1f} × the registered smallest effect, but {beyond}. "
        f"A t interval over the {t.seeds} seed means gives {_span(t)}. The run's minimum "
        f"detectable effect was {e.mde:.4f}, so it could not have resolved a "
        f"{smallest:g} difference either way.")
    st = stopping(doc)
    if "cell_pairs" in st:
        arms = "; ".join(f"{arm} {_range(v)}" for arm, v in st["capped"].items())
        mean_capped = {arm: float(np.mean(v)) for arm, v in st["capped"].items()}
        more = [arm for arm, v in mean_capped.items() if v > st["teacher_capped"]]
        most = max(mean_capped, key=mean_capped.get)
        same = st["same"]
        out.append(
            f"- **What drives it: replies that do not stop.** Greedy replies that ran to the "
            f"{st['cap']}-token cap without an EOS, of {st['prompts']} test prompts per seed: "
            f"the teacher {st['teacher_capped']}; {arms}. On the {st['cell_pairs']} of "
            f"{st['pairs']} prompt × seed pairs where the teacher and KD stopped but ATKD ran "
            f"to the cap, ATKD − KD is {st['cell_mean']:+.4f}, "
            f"{100 * st['cell_share']:.0f} % of the whole {st['total']:+.4f}. On the "
            f"{st['same_pairs']} pairs where ATKD and KD ended the same way (both stopped, or "
            f"both ran to the cap), it is {_span(same)}"
            + (", an interval that includes 0." if same["low"] < 0 < same["high"] else ".")
            + f" Arms that ran to the cap more often than the teacher (mean over seeds): "
            f"{', '.join(more) or 'none'}; {most} most often.")
    kl = {m: paired["atkd"][f"teacher.{m}"] for m in ("kl_easy", "kl_hard")}
    grid = []
    for lr in doc.get("lrs_searched", cfg["lrs"]):
        runs = [doc["runs"].get(f"teacher/{arm}/lr{lr:g}/seed{cfg['seeds'][0]}", {})
                for arm in ("atkd", "kd")]
        if all("val" in r for r in runs):
            grid.append({m: runs[0]["val"]["teacher"][m] - runs[1]["val"]["teacher"][m]
                         for m in ("kl_hard", "kl_easy")})
    if grid:
        below = sum(g["kl_hard"] < 0 for g in grid)
        easy_above = sum(g["kl_easy"] > 0 for g in grid)
        out.append(
            f"- **Hard tokens: the rate, not the weighting.** On test ATKD's KL to the teacher "
            f"is {'above' if kl['kl_easy']['mean'] > 0 else 'below'} KD's on easy tokens "
            f"({_span(kl['kl_easy'])}) and {'above' if kl['kl_hard']['mean'] > 0 else 'below'}"
            f" on hard ones ({_span(kl['kl_hard'])}), but the two ran at different learning "
            f"rates (ATKD {best['atkd']:g}, KD {best['kd']:g}). At matched rates on validation "
            f"(seed 0), ATKD's hard-token KL is below KD's at {below} of {len(grid)} rates ("
            + ", ".join(f"{g['kl_hard']:+.3f}" for g in grid)
            + f") and its easy-token KL above at {easy_above} of {len(grid)}: the weighting "
            f"moves fit towards the hard tokens as the paper describes; the test-set "
            f"difference comes with the rate each arm chose.")
    lp, tok = paired["atkd"]["teacher_logprob"], paired["atkd"]["reply_tokens"]
    out.append(
        f"- **The teacher rates ATKD's replies {'more' if lp['mean'] > 0 else 'less'} probable"
        f" per token** ({_span(lp)} nats vs KD) while ROUGE-L against its replies is lower; "
        f"ATKD's replies are {'longer' if tok['mean'] > 0 else 'shorter'} ("
        f"{table['atkd']['reply_tokens'][0]:.1f} tokens against KD's "
        f"{table['kd']['reply_tokens'][0]:.1f} and the teacher's "
        f"{summary['ceiling']['reply_tokens']:.1f}). Repetitive text is cheap per token for a "
        f"language model, so this secondary metric rewards not stopping.")
    lower = [a for a in table if a != "atkd" and best[a] > best["atkd"]]
    out.append(
        f"- **ATKD chose {'a lower' if lower else 'no lower'} learning rate on validation** "
        f"than {', '.join(lower) or 'the other arms'} (the grid is above). Every arm had the "
        f"same search, so this is part of the comparison; but one seed on "
        f"{cfg['val_prompts']} validation prompts is a noisy judge at the size of the arms' "
        f"gap (ATKD's validation curve over the rates is not monotone), and a different "
        f"choice could have narrowed it. A grid scored over several seeds would be the fix; "
        f"it was not run (it would be a second search after seeing this one).")
    if "sft" in paired:
        sp = paired["sft"]
        worse = [_label(f"teacher.{m}") for m, up in (("kl_to_teacher", False),
                 ("kl_easy", False), ("kl_hard", False), ("nll", False),
                 ("top1_agreement", True)) if (sp[f"teacher.{m}"]["mean"] > 0) != up]
        out.append(
            f"- **SFT on the teacher's sampled replies**: SFT − KD on the primary metric "
            f"{_span(sp[PRIMARY])}; behind KD on {len(worse)} of 5 per-token distances to the "
            f"teacher ({', '.join(worse) or 'none'}), as expected from one sampled token "
            f"where KD sees the teacher's top-{cfg['top_k']}.")
    human = summary["settings"].get("human", {})
    hp = human.get("paired_vs_kd", {}).get("atkd", {})
    if PRIMARY in hp:
        ht = primary_seed_interval(doc, "human")
        same_sign = (ht.mean < 0) == (e.mean < 0)
        settled = ht.low > 0 or ht.high < 0
        htab = human["table"]
        farther = [a for a in htab if htab[a][PRIMARY][0] < table[a][PRIMARY][0]]
        lp_up = [f"{a} ({htab[a]['teacher_logprob'][0]:.3f} vs "
                 f"{table[a]['teacher_logprob'][0]:.3f})" for a in htab
                 if htab[a]["teacher_logprob"][0] > table[a]["teacher_logprob"][0]]
        low_rouge = min(htab, key=lambda a: htab[a][PRIMARY][0])
        low_nll = min(htab, key=lambda a: htab[a]["human.nll"][0])
        out.append(
            f"- **The second setting (human training replies, {ht.seeds} seeds)**: ATKD − KD "
            f"on the primary metric is {_span(hp[PRIMARY])} by the two-way bootstrap, but "
            f"with {ht.seeds} seeds most of the variance is between seeds, where a bootstrap "
            f"over so few seeds is not conservative; a t interval over the {ht.seeds} seed "
            f"means is {_span(ht)}. "
            + ("Same sign as the main setting, " if same_sign else "The other sign, ")
            + ("and established." if settled else "not established.")
            + f" Lower ROUGE-L against the teacher than in the main setting: "
            f"{', '.join(farther) or 'no arm'}"
            + (f"; a higher teacher log-prob there: {', '.join(lp_up)}" if lp_up else "")
            + f". Lowest ROUGE-L against the teacher: {low_rouge}; lowest NLL of the human "
            f"test replies: {low_nll}.")
    return "\n".join(out)


def words(doc: dict) -> str:
    """README's verdict in words, printed from the results file."""
    summary = summarize(doc)
    p = summary.get("primary")
    if not p:
        return "(the study has not scored its primary comparison yet)"
    e, smallest = Paired(**p["effect"]), p["smallest"]
    if e.high < 0 or e.low > 0:
        side = "behind" if e.high < 0 else "ahead of"
        size = (f"with the whole interval beyond the smallest effect worth detecting "
                f"({smallest:g})" if min(abs(e.low), abs(e.high)) > smallest else
                f"with a point estimate {abs(e.mean) / smallest:.1f} × the smallest effect "
                f"worth detecting ({smallest:g}) and the interval's near end "
                f"({e.high if e.high < 0 else e.low:+.4f}) inside it")
        head = f"on this setup ATKD came out *{side}* KD on the registered metric, {size}"
        head += (". That is the opposite of the paper's direction and the same as an "
                 "independent study at larger scale, SE-KD (Tavor et al. 2026, arXiv "
                 "2602.01395: Qwen3-8B → 1.7B, ATKD slightly behind forward KL)"
                 if e.high < 0 else ". That is the paper's direction")
    else:
        head = "on this setup the registered metric did not separate ATKD from KD"
    st = stopping(doc)
    mech = ""
    if "cell_share" in st:
        much = "Most" if st["cell_share"] > 0.5 else "Part"
        mech = (f" {much} of the gap is a stopping failure: {100 * st['cell_share']:.0f} % of it "
                f"comes from prompts where the teacher and KD stopped but ATKD's reply ran to "
                f"the {st['cap']}-token cap; where both ended the same way the difference is "
                f"{_span(st['same'])}.")
    layers = doc["config"]["layers"]
    return (f"In words: {head}.{mech} One small teacher, one chitchat task, a {layers}-layer "
            f"student healed on scripture, CPU-sized runs with a noisy "
            f"learning-rate choice: a finding about this setup, not a refutation of the paper "
            f"(docs/study.md lists the limits and reads the second setting).")


def format_report(doc: dict) -> str:
    """The whole report as Markdown."""
    summary = summarize(doc)
    parts = [headline(doc, summary), tables(doc, summary), example(doc),
             "Learning-rate grid (validation ROUGE-L vs the teacher, seed 0):\n\n"
             + grid_table(doc) if doc.get("best_lr") else "", wall_times(doc)]
    return "\n\n".join(p for p in parts if p)


def plot(doc: dict, output: str) -> str | None:
    """Arm − KD on every metric (main setting) with 95 % intervals, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = summarize(doc)["settings"].get("teacher", {}).get("paired_vs_kd", {})
    if not paired:
        return None
    names = list(next(iter(paired.values())))
    fig, axes = plt.subplots(2, math.ceil(len(names) / 2), figsize=(18, 6))
    for ax, name in zip(axes.flat, names, strict=False):
        arms = list(paired)
        mean = [paired[a][name]["mean"] for a in arms]
        err = [[m - paired[a][name]["low"] for a, m in zip(arms, mean, strict=True)],
               [paired[a][name]["high"] - m for a, m in zip(arms, mean, strict=True)]]
        ax.errorbar(mean, range(len(arms)), xerr=err, fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        if name == PRIMARY:
            s = doc["config"]["smallest_effect"]
            ax.axvspan(-s, s, color="green", alpha=0.1, label="± smallest effect")
            ax.legend(fontsize=7)
        ax.set_yticks(range(len(arms)), arms, fontsize=8)
        ax.set_title(f"{_label(name)}: arm − KD", fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def write_report(doc: dict, workdir: str) -> str:
    """study.md and study.png in the study's folder; returns the Markdown."""
    text = format_report(doc)
    with open(os.path.join(workdir, "study.md"), "w") as f:
        f.write(text + "\n")
    plot(doc, os.path.join(workdir, "study.png"))
    return text


# ------------------------------------------------------------------- the first design

V1_METRICS = ("nll", "top1_agreement", "ece", "rouge_l", "nll_easy", "nll_hard", "kl_easy",
              "kl_hard")


def v1_tables(doc: dict) -> str:
    """The first design's test table (mean ± std over seeds) and arm − KD with 95 % t
    intervals over seeds, from study_v1_results.json."""
    cfg, best = doc["config"], doc["summary"]["best_lr"]
    per = {a: [doc["runs"][f"{a}/lr{best[a]:g}/seed{s}"]["test"] for s in cfg["seeds"]]
           for a in cfg["arms"]}
    head = "| " + " | ".join(V1_METRICS) + " |"
    lines = ["| arm | lr " + head, "|---|---|" + "---|" * len(V1_METRICS)]
    for arm, runs in per.items():
        cells = [f"{np.mean([r[m] for r in runs]):.3f} ± {np.std([r[m] for r in runs], ddof=1):.3f}"
                 for m in V1_METRICS]
        lines.append(f"| {arm} | {best[arm]:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Arm − KD on the same seed, mean [95 % t interval over {len(cfg['seeds'])} "
              "seeds]:", "", "| arm − KD " + head, "|---|" + "---|" * len(V1_METRICS)]
    t = T_975[len(cfg["seeds"]) - 1]
    for arm, runs in per.items():
        if arm == "kd":
            continue
        cells = []
        for m in V1_METRICS:
            d = np.array([a[m] - k[m] for a, k in zip(runs, per["kd"], strict=True)])
            half = t * d.std(ddof=1) / math.sqrt(len(d))
            cells.append(f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def v1_movement(doc: dict) -> str:
    """How far the first design's task stage moved the student, beside ATKD − KD."""
    best = doc["summary"]["best_lr"]
    start = doc["student"]["test"]["healed"]
    kd = [doc["runs"][f"kd/lr{best['kd']:g}/seed{s}"]["test"] for s in doc["config"]["seeds"]]
    at = [doc["runs"][f"atkd/lr{best['atkd']:g}/seed{s}"]["test"] for s in doc["config"]["seeds"]]

    def mean(runs, m):
        return float(np.mean([r[m] for r in runs]))

    return (f"KD moved the start's test NLL by {mean(kd, 'nll') - start['nll']:+.3f} and its "
            f"KL to the teacher by {mean(kd, 'kl_to_teacher') - start['kl_to_teacher']:+.3f} "
            f"nats; ATKD − KD was {mean(at, 'nll') - mean(kd, 'nll'):+.3f} on NLL and "
            f"{mean(at, 'kl_to_teacher') - mean(kd, 'kl_to_teacher'):+.3f} on KL.")


# ----------------------------------------------------------------------------- docs

def load_results(path: str) -> dict:
    """A results file of the second design, or one line saying why it is not one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable results file ({first_line(e)})") from None
    if not isinstance(doc, dict) or doc.get("design") != 2:
        raise UserError(f"{path}: not a results file of the study's second design (the one "
                        f"`atkd-cache study` writes); the first design's is printed with "
                        f"--v1")
    return doc


def blocks(results: str, results_v1: str | None = None,
           demo: str | None = None) -> dict[str, str]:
    """The generated blocks of docs/study.md and README.md, by name."""
    doc = load_results(results)
    summary = summarize(doc)
    out = {"headline": headline(doc, summary), "report": format_report(doc),
           "reading": reading(doc), "words": words(doc)}
    if results_v1 and os.path.exists(results_v1):
        with open(results_v1) as f:
            v1 = json.load(f)
        out["v1"] = v1_movement(v1) + "\n\n" + v1_tables(v1)
    if demo:
        if os.path.exists(demo):
            out["demo"] = format_report(load_results(demo))
        else:
            out["demo"] = (f"(no docs/{os.path.basename(demo)} yet: run scripts/demo, then "
                           f"copy its runs/demo/results.json there)")
    return out


def fill(text: str, generated: dict[str, str], tag: str = "study") -> str:
    """Replace each `<!-- TAG:NAME -->...<!-- /TAG:NAME -->` block of text."""
    for name, body in generated.items():
        text = re.sub(rf"(<!-- {tag}:{name} -->\n)(?:.*?\n)?(<!-- /{tag}:{name} -->)",
                      lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text, flags=re.S)
    return text


def grid_edges(doc: dict) -> str:
    """A note on the arms whose lr was chosen at an end of the grid ("" when none)."""
    lrs = doc["config"]["lrs"]
    edge = [f"{arm} ({lr:g}, the grid's {'smallest' if lr == min(lrs) else 'largest'})"
            for arm, lr in doc.get("best_lr", {}).items() if lr in (min(lrs), max(lrs))]
    return ("Chosen at the grid's edge: " + ", ".join(edge) + ". Their best lr may lie "
            "outside the grid; the registration searched these lrs only, the same for every "
            "arm.") if edge else ""


def block(text: str, tag: str, name: str) -> str | None:
    """The body of text's `<!-- TAG:NAME -->` block (None when it has none)."""
    m = re.search(rf"<!-- {tag}:{name} -->\n(.*?)\n<!-- /{tag}:{name} -->", text, re.S)
    return m.group(1) if m else None


def filled_page(page: str, tag: str, name: str, body: str) -> str:
    """A docs page's text with one generated block rewritten (the block must exist)."""
    try:
        with open(page) as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"{page}: cannot read it ({first_line(e)}): run from the repository's "
                        f"root") from None
    if block(text, tag, name) is None:
        raise UserError(f"{page} has no <!-- {tag}:{name} --> block to fill")
    return fill(text, {name: body}, tag)


def registered_report(recipe, results: str | None, docs: bool) -> str:
    """A registered run's report (`recipe`: its module, with summarize, format_report,
    headline, load_results, DOCS_BLOCK and README_BLOCK) printed from a results file; with
    `docs`, also written into its docs block, and its headline into the README's block (both
    pages are read and checked before either is written)."""
    if not results:
        raise UserError("--docs writes the report of a results file: give --report RESULTS")
    doc = recipe.load_results(results)
    summary = recipe.summarize(doc)  # the bootstraps, once for the report and the headline
    text = recipe.format_report(doc, summary)
    if docs:
        pages = [(recipe.DOCS_BLOCK[0], filled_page(*recipe.DOCS_BLOCK, text)),
                 (recipe.README_BLOCK[0], filled_page(*recipe.README_BLOCK,
                                                      recipe.headline(doc, summary)))]
        for page, filled in pages:
            with open(page, "w") as f:
                f.write(filled)
    return text


def write_docs(results: str, v1: str, demo: str, docs: str = "docs",
               readme: str = "README.md") -> str:
    """Rewrite the generated blocks of docs/study.md and README.md and docs/study.png from
    the results files; returns the report."""
    generated = blocks(results, v1, demo)
    for path in (os.path.join(docs, "study.md"), readme):
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(fill(text, generated))
    plot(load_results(results), os.path.join(docs, "study.png"))
    return generated["report"]
