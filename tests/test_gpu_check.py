"""benchmarks/gpu_check.py --smoke: the prepared GPU check runs end to end at toy sizes on the
CPU (the same code the device runs) and writes a complete report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_writes_every_measurement(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["device"] == "cpu"
    # toy sizes: timings are overheads and noise, so only their presence is checked
    assert report["teacher_pass"]["ratio"] > 0 and report["teacher_pass"]["tokens_per_s"] > 0
    step = report["train_step"]
    assert set(step) >= {"ce", "atkd-fused", "atkd", "online-kd"} and step["ce"]["x_ce"] == 1
    assert all(step[v]["seconds"] > 0 for v in ("ce", "atkd-fused", "atkd", "online-kd"))
    assert report["loader"]["tokens"] == 2 * 2 * 31  # every supervised position, once
    gen = report["generation"]
    assert gen["capture"]["seconds"] > 0 and gen["plain"]["seconds"] > 0 and gen["ratio"] > 0
    assert set(report["head_and_loss"]) == {"512", "1024"}
    assert set(report["joined_teachers"]) == {"mixture", "confident", "route-by-hard"}
    assert all(row["seconds"] > 0 for row in report["joined_teachers"].values())
    round_ = report["on_policy_round"]
    assert round_["reply_tokens"] == 2 * 4  # every reply runs its 4 tokens (no EOS)
    assert round_["rollout_seconds"] > 0 and round_["scoring_seconds"] > 0
    assert round_["train_kd"]["seconds"] > 0 and round_["train_rkl-tokens"]["seconds"] > 0
    agree = report["bf16_vs_fp32"]
    assert agree["loss_rel"] < 1e-2 and agree["grad_hidden_rel"] < 5e-2
    assert agree["grad_weight_rel"] < 5e-2
