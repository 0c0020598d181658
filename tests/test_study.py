"""The study (atkd_cache/recipes/study.py, second design) end to end at smoke size on the real
teacher and data, its report recomputed here from the raw per-prompt scores, and the docs'
generated blocks checked against the committed results files (figures printed by code)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from atkd_cache import assets
from atkd_cache.errors import UserError
from atkd_cache.recipes.stats import POWER_Z, Paired, verdict
from atkd_cache.recipes.study import run_key, run_study
from atkd_cache.recipes.study_config import SMOKE, StudyConfig
from atkd_cache.recipes.study_report import blocks, format_report, summarize

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_smoke_on_real_assets(tmp_path):
    from conftest import shared_smollm2

    cfg = StudyConfig(**{**SMOKE, "workdir": str(tmp_path)})
    shared = shared_smollm2()  # the study finds it where it would have written it
    (tmp_path / "assets").mkdir()
    os.symlink(shared, tmp_path / "assets" / os.path.basename(shared))
    lines: list[str] = []
    run_study(cfg, log=lines.append)
    doc = json.load(open(tmp_path / "results.json"))
    assert doc["complete"] and doc["design"] == 2

    # the student is pinned by its weights' hash, and was healed on KJV text, not chitchat
    healed = tmp_path / f"student-{cfg.layers}L-kjv-{cfg.heal_chats}" / "model"
    digest = hashlib.sha256(b"model.safetensors" + str(os.path.getsize(
        healed / "model.safetensors")).encode() + (healed / "model.safetensors").read_bytes())
    assert doc["student"]["weights_hash"] == "sha256:" + digest.hexdigest()
    heal = (tmp_path / "data" / f"heal-kjv-{cfg.heal_chats}.jsonl").read_text()
    assert "God" in heal and "<|im_start|>assistant" in heal

    n = doc["data"]["test_prompts"]
    from atkd_cache.models import eos_token_ids, load_tokenizer

    folder = assets.smollm2_folder(str(tmp_path / "assets"), dtype="fp32")  # the study's own
    eos = set(eos_token_ids(folder, load_tokenizer(folder)))
    assert n == cfg.test_prompts
    assert doc["teacher"]["test"]["per_prompt"]["rouge_teacher"] == [1.0] * n
    start = doc["student"]["test"]
    for setting, seeds in (("teacher", cfg.seeds), ("human", cfg.human_seeds)):
        for arm in cfg.arms:
            for seed in seeds:
                run = doc["runs"][run_key(setting, arm, cfg.lrs[0], seed)]
                assert not os.path.exists(os.path.join(run["out"], "checkpoints"))
                assert all(len(v) == n for v in run["test"]["per_prompt"].values())
                # every greedy reply's ids are kept, and its shape is recomputable from them
                ids, pp = run["test"]["reply_ids"], run["test"]["per_prompt"]
                assert len(ids) == n and pp["reply_tokens"] == [len(r) for r in ids]
                assert all(len(r) <= cfg.max_new_tokens for r in ids)
                assert pp["stopped"] == [float(len(r) > 0 and r[-1] in eos) for r in ids]
                if arm == "kd":  # distillation moved the student towards the teacher
                    assert (run["test"]["teacher"]["kl_to_teacher"]
                            < start["teacher"]["kl_to_teacher"]), (setting, seed)

    # the report, recomputed from the raw scores
    summary = summarize(doc)
    kd = [doc["runs"][run_key("teacher", "kd", cfg.lrs[0], s)]["test"] for s in cfg.seeds]
    at = [doc["runs"][run_key("teacher", "atkd", cfg.lrs[0], s)]["test"] for s in cfg.seeds]
    cut = start["teacher"]["kl_to_teacher"] - np.mean([r["teacher"]["kl_to_teacher"] for r in kd])
    gate = summary["headroom"]
    assert gate["kd_kl_cut"] == pytest.approx(cut) and gate["passed"] == (cut >= cfg.headroom_kl)
    diffs = np.array([np.subtract(a["per_prompt"]["rouge_teacher"],
                                  k["per_prompt"]["rouge_teacher"])
                      for a, k in zip(at, kd, strict=True)])
    effect = summary["primary"]["effect"]
    assert effect["mean"] == pytest.approx(diffs.mean())
    assert (effect["seeds"], effect["prompts"]) == diffs.shape
    assert effect["mde"] == pytest.approx(POWER_Z * effect["se"]) and effect["se"] > 0
    words = verdict(Paired(**effect), cfg.smallest_effect, "ATKD better than KD",
                    "ATKD worse than KD")
    assert summary["primary"]["verdict"].endswith(words)
    assert summary["primary"]["verdict"].startswith("no headroom") == (not gate["passed"])

    text = (tmp_path / "study.md").read_text()
    assert text == format_report(doc) + "\n"
    assert "Headroom gate: KD cut the test KL" in text
    assert f"minimum detectable effect achieved {effect['mde']:.4f}" in text
    assert "1 seed: no interval" in text  # the human setting has one seed
    assert "± nan" not in text and "± 0.0000" not in text
    assert not re.search(r"\[([+-]\d\.\d{4}), \1\]", text)  # no zero-width interval
    assert doc["teacher"]["test"]["examples"][0] in text.replace(" / ", "\n")
    assert os.path.getsize(tmp_path / "study.png") > 1000

    # seeds are data orders: seed 1 is not a copy of seed 0
    weights = [open(os.path.join(doc["runs"][run_key("teacher", "kd", cfg.lrs[0], s)]["out"],
                                 "model", "model.safetensors"), "rb").read() for s in cfg.seeds]
    assert weights[0] != weights[1]

    again: list[str] = []
    run_study(cfg, log=again.append)  # everything is done: nothing trains or scores again
    assert not any("ROUGE-L to teacher" in line for line in again)
    assert any("ROUGE-L to teacher" in line for line in lines)

    other = dataclasses.replace(cfg, test_prompts=cfg.test_prompts + 1)
    with pytest.raises(UserError, match="other study sizes"):
        run_study(other, log=lambda m: None)

    check_on_policy_study(tmp_path, doc)
    check_crosstok_study(tmp_path)
    doc["student"]["weights_hash"] = "sha256:" + "0" * 64  # made with another student
    (tmp_path / "results.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="is not the one"):
        run_study(cfg, log=lambda m: None)


def test_docs_blocks_are_printed_from_the_results_files():
    """Every generated block of docs/study.md and README.md equals what the report code
    prints from docs/study_results.json (and the first design's file): no figure retyped."""
    generated = blocks(*(str(ROOT / "docs" / f) for f in (
        "study_results.json", "study_v1_results.json", "demo_results.json")))
    found = 0
    for page in ("docs/study.md", "README.md"):
        text = (ROOT / page).read_text()
        for name, body in re.findall(r"<!-- study:(\w+) -->\n(.*?)\n<!-- /study:\1 -->", text,
                                     re.S):
            assert body == generated[name], f"{page}: block {name} is stale: run " \
                "`atkd-cache study-report docs/study_results.json --docs`"
            found += 1
    assert found >= 3


@pytest.mark.parametrize("recipe,results", [("crosstok_study", "crosstok_results.json"),
                                             ("on_policy_study", "on_policy_results.json")])
def test_registered_run_blocks_are_printed_from_their_results(recipe, results):
    """The cross-tokenizer and on-policy reports in the docs, and their headlines in the
    README, equal what the recipe's report code prints from the results file kept in docs/;
    a run not yet kept there leaves the block saying it is not finished (never a figure)."""
    import importlib

    from atkd_cache.recipes.study_report import block

    mod = importlib.import_module(f"atkd_cache.recipes.{recipe}")
    path = ROOT / "docs" / results
    for (page, tag, name), printer in ((mod.DOCS_BLOCK, mod.format_report),
                                       (mod.README_BLOCK, mod.headline)):
        body = block((ROOT / page).read_text(), tag, name)
        assert body is not None, f"{page} lost its {tag}:{name} block"
        if path.exists():
            assert body == printer(mod.load_results(str(path))), f"{page}: stale: run " \
                f"`atkd-cache {recipe.replace('_', '-')} --report {path} --docs`"
        else:
            assert body.startswith("(not finished") and not re.search(r"\d\.\d", body)


def test_the_study_reading_has_no_number_that_code_did_not_print():
    """docs/study.md's "Reading it": every sentence with a number is inside a generated
    block (printed from the results file); the words around the blocks hold no digit."""
    text = (ROOT / "docs" / "study.md").read_text()
    section = text[text.index("### Reading it"):text.index("![arm − KD on every metric]")]
    prose = re.sub(r"<!-- study:(\w+) -->\n.*?\n<!-- /study:\1 -->", "", section, flags=re.S)
    assert "<!-- study:reading -->" in section
    assert not re.search(r"\d", prose), re.findall(r".{30}\d.{30}", prose)


def test_reading_words_each_direction_from_its_sign():
    """The reading's claims follow the file: flipping ATKD's and KD's primary scores flips
    'behind' to 'ahead of', and the stopping counts are recomputed from the records."""
    import copy

    from atkd_cache.recipes.study_report import reading, stopping, words

    doc = json.loads((ROOT / "docs" / "study_results.json").read_text())
    st = stopping(doc)
    kd = doc["runs"]["teacher/kd/lr0.00045/seed0"]["test"]["per_prompt"]
    assert st["capped"]["kd"][0] == sum(n >= 48 for n in kd["reply_tokens"])
    assert st["teacher_capped"] == sum(
        n >= 48 for n in doc["teacher"]["test"]["per_prompt"]["reply_tokens"])
    assert "ATKD is behind KD" in reading(doc) and "*behind* KD" in words(doc)
    flipped = copy.deepcopy(doc)
    for seed in doc["config"]["seeds"]:
        a = flipped["runs"][f"teacher/atkd/lr0.00015/seed{seed}"]["test"]["per_prompt"]
        k = flipped["runs"][f"teacher/kd/lr0.00045/seed{seed}"]["test"]["per_prompt"]
        a["rouge_teacher"], k["rouge_teacher"] = k["rouge_teacher"], a["rouge_teacher"]
    assert "ATKD is ahead of KD" in reading(flipped) and "*ahead of* KD" in words(flipped)


def test_v1_figures_the_recomputation_corrected():
    """The first design's figures the issue's recomputation found misprinted, now printed
    by code: SFT NLL 4.723, KD hard-token KL 1.251, atkd-rkl ROUGE-L interval excluding 0."""
    v1 = blocks(str(ROOT / "docs" / "study_results.json"),
                str(ROOT / "docs" / "study_v1_results.json"))["v1"]
    assert "| sft | 5e-05 | 4.723 ± 0.002" in v1
    assert "1.251 ± 0.002 |" in v1.split("| kd |")[1].split("\n")[0]
    row = v1.split("| atkd-rkl |")[-1].split("\n")[0].split(" | ")
    rouge = [float(x) for x in re.findall(r"[+-]\d\.\d+", row[3])]
    assert rouge[2] < 0  # its interval's upper end is below 0
    assert math.isclose(rouge[0], -0.021, abs_tol=1e-3)


def test_presets_and_flags_build_the_config():
    """`atkd-cache study --demo/--smoke` and its flags: a flag beats the preset, an unset
    flag (None) keeps it, and the smoke size never works in the full study's folder."""
    from atkd_cache.recipes.study_config import DEMO, study_config

    assert study_config() == StudyConfig()
    demo = study_config("demo", seeds=[3], layers=None)
    assert demo.seeds == [3] and demo.layers == DEMO["layers"] and demo.workdir == "runs/demo"
    assert study_config("smoke").workdir == "runs/study-quick"
    assert study_config("demo+smoke").workdir == "runs/demo-quick"
    assert study_config("smoke", workdir="w").workdir == "w"
    assert study_config("smoke").arms == SMOKE["arms"] != StudyConfig().arms


def check_on_policy_study(workdir: Path, study_doc: dict) -> None:
    """The on-policy comparison (recipes/on_policy_study.py) at smoke size in the study's
    folder: it reuses the study's caches, student and KD runs, every arm sees the same
    replies, every round is scored by the one teacher, and the report is recomputed here."""
    from atkd_cache.cache import open_cache
    from atkd_cache.recipes.on_policy_study import (
        DESIGN,
        check,
        format_report,
        run_on_policy_study,
    )
    from atkd_cache.recipes.study_config import ON_POLICY_SMOKE, OnPolicyStudyConfig

    cfg = OnPolicyStudyConfig(**{**ON_POLICY_SMOKE, "workdir": str(workdir),
                                 "results": str(workdir / "on-policy.json")})
    lines: list[str] = []
    doc = run_on_policy_study(cfg, log=lines.append)
    assert doc["complete"] and doc["design"] == DESIGN
    assert doc["student"]["weights_hash"] == study_doc["student"]["weights_hash"]
    runs = {arm: doc["runs"][run_key("teacher", arm, cfg.lrs[0], 0)] for arm in cfg.arms}
    # the off-policy arm is the study's KD run (same cache, student, lr, seed): not re-trained
    assert runs["offpolicy-kd"]["out"] == study_doc["runs"][run_key(
        "teacher", "kd", cfg.lrs[0], 0)]["out"]
    budget = cfg.train_prompts * cfg.responses
    assert {arm: r["replies"] for arm, r in runs.items()} == {a: budget for a in cfg.arms}
    for arm in ("onpolicy-kd", "offpolicy-then-onpolicy"):
        folder = Path(runs[arm]["out"]).parents[1]  # .../lrX-seed0 (out = round-NNN/train)
        rounds = cfg.rounds // 2 if arm == "offpolicy-then-onpolicy" else cfg.rounds
        cards = [open_cache(str(folder / f"round-{r:03d}" / "teacher")).card
                 for r in range(1, rounds + 1)]
        assert [c.extra["on_policy"]["round"] for c in cards] == list(range(1, rounds + 1))
        assert len({c.teacher_weights_hash for c in cards}) == 1
        assert (folder / "round-000" / "train").exists() == (arm == "offpolicy-then-onpolicy")
        assert runs[arm]["teacher_tokens_scored"] == runs[arm]["tokens"]
        check_sample_stats(folder, runs[arm]["samples"], rounds)
    # the primary effect, recomputed from the per-prompt scores
    diff = np.subtract(runs["onpolicy-kd"]["test"]["per_prompt"]["rouge_teacher"],
                       runs["offpolicy-kd"]["test"]["per_prompt"]["rouge_teacher"])
    text = (workdir / "on-policy-report.md").read_text()
    assert text == format_report(doc) + "\n"
    assert f"onpolicy-kd − offpolicy-kd in ROUGE-L of greedy replies vs the teacher's, 1 " \
           f"seed(s) x {cfg.test_prompts} test prompts: {diff.mean():+.4f}" in text
    assert "1 seed: no verdict" in text
    again: list[str] = []
    run_on_policy_study(cfg, log=again.append)  # done: nothing trains or scores again
    assert not any("ROUGE-L to teacher" in line for line in again)
    with pytest.raises(UserError, match="unequal budgets"):
        check(dataclasses.replace(cfg, rounds=3))


@torch.no_grad()
def check_sample_stats(folder: Path, samples: dict, rounds: int) -> None:
    """The run's per-round sample statistics against a plain recomputation: the replies'
    lengths and endings from the round's rollouts.jsonl, the training's gradient norms from
    its metrics.jsonl, and the reverse KL of each reply from float64 forwards of the policy
    that wrote it and of the teacher."""
    from transformers import AutoModelForCausalLM

    assert sorted(samples, key=int) == [str(r) for r in range(1, rounds + 1)]
    run = json.loads((folder / "results.json").read_text())
    config = json.loads((folder / "on_policy.json").read_text())
    teacher = AutoModelForCausalLM.from_pretrained(config["teacher"]).double().eval()
    stops = {teacher.generation_config.eos_token_id} - {None}
    for r in range(1, rounds + 1):
        rows = [json.loads(line) for line in (folder / f"round-{r:03d}" /
                                              "rollouts.jsonl").open()]
        got = samples[str(r)]
        assert got["replies"] == len(rows)
        metrics = (folder / f"round-{r:03d}" / "train" / "metrics.jsonl").read_text()
        assert got["grad_norm_median"] == pytest.approx(np.median(
            [json.loads(line)["grad_norm"] for line in metrics.splitlines()]))
        assert got["reply_tokens"] == pytest.approx(np.mean([len(x["completion_ids"])
                                                             for x in rows]))
        assert got["stopped"] == pytest.approx(np.mean([x["completion_ids"][-1] in stops
                                                        for x in rows]))
        if r > 1:
            continue  # (one round's forwards are enough to pin the sums)
        policy = AutoModelForCausalLM.from_pretrained(run["rounds"]["0"]["student"])
        policy = policy.double().eval()
        sums = []
        for x in rows:
            ids = torch.tensor([x["prompt_ids"] + x["completion_ids"]])
            n = len(x["completion_ids"])
            targets = ids[0, -n:]
            lp = [m(ids).logits[0, -n - 1:-1].log_softmax(-1)[torch.arange(n), targets]
                  for m in (policy, teacher)]
            sums.append(float((lp[0] - lp[1]).sum()))
        assert got["rkl_per_reply"] == pytest.approx(np.mean(sums), abs=1e-3)
        assert got["rkl_per_token"] == pytest.approx(
            sum(sums) / sum(len(x["completion_ids"]) for x in rows), abs=1e-4)


def check_crosstok_study(workdir: Path) -> None:
    """The cross-tokenizer study (recipes/crosstok_study.py) at smoke size in the study's
    folder (its caches hold the teacher's text): a student of another tokenizer with the
    teacher's chat template, every arm trained and scored, CE moved the student, the report
    recomputed here."""
    from atkd_cache.fingerprint import tokenizer_fingerprint
    from atkd_cache.models import load_tokenizer
    from atkd_cache.recipes.crosstok_study import (
        DESIGN,
        format_report,
        headline,
        run_crosstok_study,
    )
    from atkd_cache.recipes.study_config import CROSSTOK_SMOKE, CrossTokStudyConfig

    cfg = CrossTokStudyConfig(**{**CROSSTOK_SMOKE, "workdir": str(workdir),
                                 "results": str(workdir / "crosstok.json")})
    doc = run_crosstok_study(cfg, log=lambda m: None)
    assert doc["complete"] and doc["design"] == DESIGN
    teacher = load_tokenizer(str(next((workdir / "assets").iterdir())))
    student = load_tokenizer(os.path.join(doc["runs"][run_key("teacher", "ce", cfg.lrs[0], 0)]
                                          ["out"], "model"))
    assert tokenizer_fingerprint(student) != tokenizer_fingerprint(teacher)
    assert len(student) < len(teacher) and student.chat_template == teacher.chat_template
    assert doc["data"]["student_max_new_tokens"] > cfg.max_new_tokens  # shorter tokens
    start = doc["student"]["test"]["bpb"]["teacher"]["bits_per_byte"]
    runs = {a: doc["runs"][run_key("teacher", a, cfg.lrs[0], 0)]["test"] for a in cfg.arms}
    assert runs["ce"]["bpb"]["teacher"]["bits_per_byte"] < start  # CE moved the student
    for arm, run in runs.items():
        assert math.isfinite(run["bpb"]["human"]["bits_per_byte"]), arm
        assert len(run["per_prompt"]["rouge_teacher"]) == cfg.test_prompts
    diff = np.mean(runs["alm"]["per_prompt"]["rouge_teacher"]) - np.mean(
        runs["ce"]["per_prompt"]["rouge_teacher"])
    text = (workdir / "crosstok-report.md").read_text()
    assert text == format_report(doc) + "\n"
    assert f"on this seed alm − CE is {diff:+.4f}" in text
    # `--report FILE --docs` writes that report into the docs' block, and nothing else
    from click.testing import CliRunner

    from atkd_cache.cli.main import main
    from atkd_cache.recipes.study_report import block

    page = workdir / "docs" / "training.md"
    before = (ROOT / "docs" / "training.md").read_text()
    cwd = os.getcwd()
    try:
        os.chdir(workdir)  # (the docs page is found from the working folder, the repo's root)
        r = CliRunner().invoke(main, ["crosstok-study", "--report", cfg.results, "--docs"])
        assert r.exit_code == 2 and "docs/training.md" in r.output  # no page here yet
        page.parent.mkdir()
        page.write_text(before)
        r = CliRunner().invoke(main, ["crosstok-study", "--report", cfg.results, "--docs"])
        assert r.exit_code == 2 and "README.md" in r.output  # its headline's page is missing
        assert page.read_text() == before  # ... so neither page was written
        readme, readme_before = workdir / "README.md", (ROOT / "README.md").read_text()
        readme.write_text(readme_before)
        r = CliRunner().invoke(main, ["crosstok-study", "--report", cfg.results, "--docs"])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    for path, text, name, printed in ((page, before, "report", format_report(doc)),
                                      (readme, readme_before, "headline", headline(doc))):
        after = path.read_text()
        assert block(after, "crosstok", name) == printed
        outside = rf"<!-- crosstok:{name} -->.*<!-- /crosstok:{name} -->"
        assert re.sub(outside, "", after, flags=re.S) == re.sub(outside, "", text, flags=re.S)
