"""The README's main command at its smallest size, on the real teacher and data (DESIGN §6):
SmolLM2-135M-Instruct -> caches -> layer-subset student -> KD and ATKD -> evaluation."""

from __future__ import annotations

import json
import os

import pytest

from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import verify_cache
from atkd_cache.pipeline import PipelineConfig, run_pipeline


@pytest.mark.slow
def test_smallest_pipeline_on_real_assets(tmp_path):
    cfg = PipelineConfig(workdir=str(tmp_path), train_conversations=16, heldout_conversations=4,
                         epochs=3, batch_tokens=1024, gen_prompts=2, max_new_tokens=8)
    lines: list[str] = []
    result = run_pipeline(cfg, log=lines.append)
    rows = result["rows"]
    assert set(rows) == {"teacher", "student before training", "student after KD",
                         "student after ATKD"}
    before = rows["student before training"]["nll"][0]
    assert rows["student after ATKD"]["nll"][0] < before
    assert rows["student after KD"]["nll"][0] < before
    assert rows["teacher"]["top1_agreement"][0] == 1.0
    assert rows["teacher"]["nll"][0] < before
    for name in ("cache-train-train-16", "cache-heldout-heldout-4"):
        cache = open_cache(tmp_path / name)
        assert len(cache) > 0 and verify_cache(cache) == []
        assert cache.card.logits_width == 49152
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert os.path.getsize(tmp_path / "curves.png") > 10_000
    assert "| student after ATKD |" in (tmp_path / "results.md").read_text()
