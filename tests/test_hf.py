"""The Hugging Face integration on real caches and real models: the datasets view delivers
every supervised position once per epoch across ranks x workers, its collator equals the
loader's collation, `KDTrainer` gives the same steps as `train-student` (ATKD and KD), a
LoRA student trains and reloads, TRL's SFTTrainer takes the mixin, and torchrun runs it on 2
processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atkd_cache import tiny
from atkd_cache.cache.reader import open_cache
from atkd_cache.hf import KDCollator, KDTrainer, cache_dataset
from atkd_cache.losses.kd import LossConfig
from atkd_cache.train.loader import LoaderConfig, collate
from atkd_cache.train.trainer import TrainConfig, train
from conftest import dump

SEQ_LEN = 24  # every sequence truncated to this: train-student's micro-batches are then B rows


@pytest.fixture(scope="module")
def hf(assets, tmp_path_factory):
    """A 4-shard cache of 32 prompt/response pairs of equal length; a random Llama student."""
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


def training_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=3, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, train_sampling_strategy="sequential",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


def student(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_collator_is_the_loaders_collation(hf):
    cache = open_cache(hf["cache"])
    rows = list(cache_dataset(hf["cache"]))
    assert [r["seq_index"] for r in rows] == list(range(len(cache)))
    for pack in (False, True):
        mine = KDCollator(pack=pack)(rows[3:7])
        theirs = collate([cache[i] for i in range(3, 7)], pack)
        for key, value in theirs.items():
            assert torch.equal(mine[key], value), key
        # labels: exactly the supervised next tokens, where the model's shift scores them
        flat = mine["labels"].view(-1)
        assert torch.equal(torch.nonzero(flat != -100).view(-1), mine["rows"] + 1)
        assert torch.equal(flat[mine["rows"] + 1], mine["target_ids"])


def test_streaming_view_covers_each_position_once_across_ranks_and_workers(hf):
    from datasets.distributed import split_dataset_by_node
    from torch.utils.data import DataLoader

    cache = open_cache(hf["cache"])
    assert len(cache.shard_rows) >= 4
    seen = []
    for rank in range(2):
        part = split_dataset_by_node(
            cache_dataset(hf["cache"], shuffle_buffer=5, seed=1), rank=rank, world_size=2)
        loader = DataLoader(part, batch_size=3, num_workers=2, collate_fn=KDCollator())
        for batch in loader:
            for i, seq in enumerate(batch["seq_index"].tolist()):
                lo, hi = batch["group_offsets"][i : i + 2].tolist()
                width = batch["input_ids"].shape[1]
                seen += [(seq, int(r) - i * width) for r in batch["rows"][lo:hi]]
    expected = [(s.index, int(p)) for s in cache for p in np.flatnonzero(s.supervised)]
    assert len(seen) == len(expected) == sum(r["num_supervised"] for r in cache.shard_rows)
    assert sorted(seen) == sorted(expected)


def test_map_style_view_matches_streaming(hf, tmp_path):
    stream = list(cache_dataset(hf["cache"]))
    table = cache_dataset(hf["cache"], streaming=False, cache_dir=str(tmp_path))
    assert len(table) == len(stream)
    for a, b in zip(table.with_format("numpy"), stream, strict=True):
        for key in b:
            assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key


@pytest.mark.parametrize("loss", ["atkd", "kd"])
def test_trainer_matches_train_student(hf, tmp_path, loss):
    """Same cache, student, micro-batches and settings: same per-step losses and weights."""
    loss_cfg = LossConfig(loss=loss, ce_weight=0.1 if loss == "kd" else 0.0)
    cfg = TrainConfig(
        cache=hf["cache"], student=hf["student"], output=str(tmp_path / "ts"), loss=loss_cfg,
        loader=LoaderConfig(batch_tokens=2 * SEQ_LEN, shuffle=False, num_workers=0),
        lr=1e-3, min_lr_ratio=1.0, grad_accum=2, max_steps=3, precision="fp32",
        device="cpu", log_sequences=True, progress=False, tensorboard=False,
    )
    train(cfg, log=lambda m: None)
    steps = [json.loads(x) for x in open(tmp_path / "ts" / "metrics.jsonl")]
    order = [i for x in open(tmp_path / "ts" / "sequences-rank0.jsonl")
             for i in json.loads(x)["seq_index"]]
    assert len(order) == 3 * 2 * 2

    dataset = cache_dataset(hf["cache"], streaming=False, cache_dir=str(tmp_path / "hfc"))
    trainer = KDTrainer(model=student(hf["student"]), args=training_args(tmp_path / "hf"),
                        loss=loss_cfg, train_dataset=dataset.select(order),
                        data_collator=KDCollator())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for mine, theirs in zip(logged, steps, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        parts = [k for k in theirs if f"kd/{k}" in mine]
        assert {"tkd_hard", "dkd_easy"} <= set(parts) if loss == "atkd" else {"fkl", "ce"}
        for key in parts:
            assert mine[f"kd/{key}"] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    theirs = load_file(str(tmp_path / "ts" / "model" / "model.safetensors"))
    mine = trainer.model.state_dict()
    before = student(hf["student"]).state_dict()
    for name, value in theirs.items():
        assert torch.allclose(mine[name], value, atol=1e-5, rtol=0), name
    assert (theirs["lm_head.weight"] - before["lm_head.weight"]).abs().max() > 1e-4  # trained
