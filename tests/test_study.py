"""The study (atkd_cache/study.py) end to end at smoke size on the real teacher and data:
every stage runs, the student is a healed (pretrained) one, every arm's student moves
towards the teacher from that start, the results file is complete, and a re-run continues
from the results instead of training again."""

from __future__ import annotations

import json
import os

import pytest

from atkd_cache.study import ARMS, SMOKE, StudyConfig, run_study, train_arm


@pytest.mark.slow
def test_study_smoke_on_real_assets(tmp_path):
    cfg = StudyConfig(**{**SMOKE, "workdir": str(tmp_path)})
    lines: list[str] = []
    summary = run_study(cfg, log=lines.append)
    doc = json.load(open(tmp_path / "results.json"))

    student = doc["student"]["test"]  # healing made a language model of the cut network
    assert student["healed"]["nll"] < student["cut"]["nll"] - 3
    assert student["teacher"]["nll"] < student["healed"]["nll"]

    assert set(summary["table"]) == set(ARMS)
    start = student["healed"]
    for arm, spec in ARMS.items():
        run = doc["runs"][f"{arm}/lr{cfg.lrs[0]:g}/seed0"]
        assert run["steps"] > 0 and run["loss"] == spec and run["epochs"] == cfg.epochs
        assert not os.path.exists(os.path.join(run["out"], "checkpoints"))  # model/ only
        test = run["test"]
        assert {"nll", "top1_agreement", "ece", "rouge_l", "nll_easy", "nll_hard", "kl_easy",
                "kl_hard"} <= set(test)
        if spec.get("base") == "rkl":
            # Reverse KL is mode-seeking: it moves the student's top choice towards the
            # teacher's while the NLL of the reference tokens and the forward KL may rise
            # (measured at this size: rkl NLL 7.29 -> 8.04, forward KL 4.00 -> 4.22, top-1
            # agreement 0.058 -> 0.077; atkd-rkl 0.058 -> 0.123).
            assert test["top1_agreement"] > start["top1_agreement"], arm
        else:
            assert test["nll"] < start["nll"], arm
            assert test["kl_to_teacher"] < start["kl_to_teacher"], arm
    assert set(summary["paired_vs_kd"]) == {a for a in ARMS if a.startswith("atkd")}
    for name in ("study.md", "study.png", "easy_hard.png", "curves.png"):
        assert os.path.getsize(tmp_path / name) > 1000, name

    # A seed must change the run: the student has no dropout and one start, so the seed is
    # the data order (a pinned order once made seeds 1 and 2 copies of seed 0).
    student = tmp_path / f"student-{cfg.layers}L-healed-templated-{cfg.heal_conversations}"
    caches = {"train": str(tmp_path / f"cache-train-{cfg.train_conversations}")}
    other = train_arm(cfg, "kd", cfg.lrs[0], 1, str(student / "model"), caches)
    seed0 = doc["runs"][f"kd/lr{cfg.lrs[0]:g}/seed0"]["out"]
    weights = [open(os.path.join(out, "model", "model.safetensors"), "rb").read()
               for out in (seed0, other["out"])]
    assert weights[0] != weights[1]

    before = os.path.getmtime(tmp_path / "results.json")
    again: list[str] = []
    run_study(cfg, log=again.append)  # everything is done: nothing trains again
    assert not any(": val NLL" in line or "/seed0: test NLL" in line for line in again)
    assert any("/seed0: test NLL" in line for line in lines)
    assert os.path.getmtime(tmp_path / "results.json") >= before
