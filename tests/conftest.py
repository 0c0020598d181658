"""Shared fixtures: a tiny BPE tokenizer and random Llama/GPT-2 teachers saved to temp folders,
loaded back through `from_pretrained` like real models, plus small jsonl datasets."""

from __future__ import annotations

import os

import pytest

# The real teacher de-quantized from its GGUF once per checkout, for every test (and both
# suites) that needs it as a plain folder: the conversion takes ~40 s on these CPUs.
SHARED_ASSETS = os.environ.get("ATKD_TEST_ASSETS", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "test-assets"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Paths of the tiny tokenizer+Llama teacher, a GPT-2 teacher, and the datasets."""
    from transformers import AutoTokenizer

    from atkd_cache import tiny

    root = tmp_path_factory.mktemp("assets")
    llama = str(root / "llama")
    tiny.build_tokenizer(llama)
    vocab = len(AutoTokenizer.from_pretrained(llama))
    tiny.build_model(llama, vocab, arch="llama")
    gpt2 = str(root / "gpt2")
    tiny.build_tokenizer(gpt2)
    tiny.build_model(gpt2, vocab, arch="gpt2")
    data = tiny.write_datasets(str(root / "data"), n=24)
    return {"llama": llama, "gpt2": gpt2, "vocab": vocab, **data}


def dump(assets, out, shape="text", model="llama", **overrides):
    """Run the library's dump_teacher on one of the tiny datasets; returns the summary."""
    from atkd_cache.data import DataSpec
    from atkd_cache.dump import DumpConfig, dump_teacher

    fields = {
        "text": {"text_field": "text"},
        "prompt_response": {"prompt_field": "prompt", "response_field": "response"},
        "chat": {"messages_field": "messages"},
    }[shape]
    data_keys = {"max_length", "limit", "template", "split"}
    spec = DataSpec(
        source=assets[shape], **fields, **{k: v for k, v in overrides.items() if k in data_keys}
    )
    cfg = {k: v for k, v in overrides.items() if k not in data_keys}
    cfg.setdefault("dtype", "fp32")
    cfg.setdefault("top_k", 8)
    cfg.setdefault("progress", False)
    cfg.setdefault("shard_positions", 200)
    return dump_teacher(
        DumpConfig(model=assets[model], data=spec, output=str(out), **cfg), log=lambda m: None
    )


SEQ_LEN = 24  # hf_cache's sequences are all this long: train-student's micro-batches are B rows


@pytest.fixture(scope="session")
def hf_cache(assets, tmp_path_factory):
    """A cache (>= 4 shards) of 32 prompt/response pairs of equal length; a random Llama
    student with the teacher's tokenizer."""
    import json

    from atkd_cache import tiny

    root = tmp_path_factory.mktemp("hf")
    # Prompts of 1-7 words before long responses: every sequence is cut to SEQ_LEN tokens,
    # and the supervised (response) positions per sequence vary, so micro-batches differ in
    # size and their token weighting matters.
    sents = tiny.synthetic_sentences(32 * 6, seed=3)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": " ".join(sents[6 * i].split()[: 1 + i % 7]),
        "response": " ".join(sents[6 * i + 1: 6 * i + 6])}) + "\n" for i in range(32)))
    cache = root / "cache"
    dump({**assets, "prompt_response": str(data)}, cache, shape="prompt_response",
         max_length=SEQ_LEN, shard_positions=120)
    student = str(root / "student")  # another random Llama with the teacher's tokenizer
    tiny.build_tokenizer(student)
    tiny.build_model(student, assets["vocab"], arch="llama", seed=1)
    return {"cache": str(cache), "student": student, "root": root}


def shared_smollm2() -> str:
    """SmolLM2-135M-Instruct as an fp32 HF folder under SHARED_ASSETS (written once, whole:
    assets.smollm2_folder renames it into place)."""
    from atkd_cache import assets

    os.makedirs(SHARED_ASSETS, exist_ok=True)
    return assets.smollm2_folder(SHARED_ASSETS, dtype="fp32")


def rescore(model, seq, **kw) -> dict:
    """A plain teacher-forced pass of `model` over a cached sequence (the HF scoring path):
    the reference a generated or on-policy cache is checked against."""
    import numpy as np

    from atkd_cache.data import TokenizedSequence
    from atkd_cache.teacher.hf import teacher_outputs

    ids = seq.input_ids.astype(np.int64)  # stored as uint16
    return teacher_outputs(model, [TokenizedSequence(seq.seq_id, ids, seq.supervised)],
                           pad_id=0, **kw)[0]
