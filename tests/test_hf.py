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

from atkd_cache.cache.reader import open_cache
from atkd_cache.hf import KDCollator, KDTrainer, cache_dataset
from atkd_cache.losses.kd import LossConfig
from atkd_cache.train.loader import LoaderConfig, collate
from atkd_cache.train.trainer import TrainConfig, train
from conftest import SEQ_LEN


@pytest.fixture
def hf(hf_cache):
    return hf_cache


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


def test_collator_says_when_a_trainer_dropped_the_teacher_columns(hf):
    from transformers import Trainer

    from atkd_cache.errors import UserError

    dataset = cache_dataset(hf["cache"], streaming=False, cache_dir=str(hf["root"] / "hfc"))
    plain = Trainer(model=student(hf["student"]), args=training_args(hf["root"] / "plain"),
                    train_dataset=dataset, data_collator=KDCollator())
    with pytest.raises(UserError, match="a Trainer dropped them as unused; use atkd_cache"):
        plain.train()


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


def test_checkpoint_resume_gives_the_same_weights(hf, tmp_path):
    """Trainer checkpoints (save_steps) and resume_from_checkpoint: 4 steps in one go equal
    2 steps, a checkpoint, and 2 more in a new Trainer."""
    dataset = cache_dataset(hf["cache"], streaming=False, cache_dir=str(tmp_path / "hfc"))

    def run(out, steps, resume=None):
        args = training_args(out, max_steps=4, save_strategy="steps", save_steps=2)
        model = student(hf["student"])
        if resume:  # start elsewhere: only the checkpoint's weights can give the same end
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
        trainer = KDTrainer(model=model, args=args, loss=LossConfig(),
                            train_dataset=dataset, data_collator=KDCollator())
        if steps < 4:
            trainer.add_callback(_StopAt(steps))
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model.state_dict()

    whole = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    for name, value in whole.items():
        assert torch.allclose(resumed[name], value, atol=1e-6, rtol=0), name


class _StopAt:
    """A TrainerCallback stopping training after `steps` (as a kill would, after a save)."""

    def __new__(cls, steps):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= steps:
                    control.should_training_stop = True
                return control

        return Stop()


def test_lora_student_trains_saves_and_reloads(hf, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(student(hf["student"]), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = training_args(tmp_path / "lora", learning_rate=1e-2, activation_checkpointing=True)
    dataset = cache_dataset(hf["cache"], streaming=False, cache_dir=str(tmp_path / "hfc"))
    trainer = KDTrainer(model=model, args=args, loss=LossConfig(), train_dataset=dataset,
                        data_collator=KDCollator())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))
    model.save_pretrained(tmp_path / "adapter")
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at 0: it trained
    reloaded = PeftModel.from_pretrained(student(hf["student"]), tmp_path / "adapter").eval()
    batch = KDCollator()(list(dataset.select(range(2))))
    with torch.no_grad():
        want = model.eval()(input_ids=batch["input_ids"]).logits
        got = reloaded(input_ids=batch["input_ids"]).logits
        base = student(hf["student"])(input_ids=batch["input_ids"]).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(base, want, atol=1e-3)


def test_trl_sft_trainer_takes_the_mixin(hf, tmp_path):
    """KDLossMixin in front of TRL's SFTTrainer gives the same steps as KDTrainer."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from atkd_cache.hf import KDLossMixin

    class KDSFTTrainer(KDLossMixin, SFTTrainer):
        pass

    dataset = cache_dataset(hf["cache"], streaming=False, cache_dir=str(tmp_path / "hfc"))
    base = training_args(tmp_path / "plain").to_dict()
    base.update(output_dir=str(tmp_path / "trl"), dataset_kwargs={"skip_prepare_dataset": True},
                packing=False)
    keep = {k: v for k, v in base.items() if k in SFTConfig.__dataclass_fields__
            and not k.startswith("_") and k not in ("push_to_hub_token", "logging_dir")}
    sft = KDSFTTrainer(model=student(hf["student"]), args=SFTConfig(**keep),
                       processing_class=AutoTokenizer.from_pretrained(hf["student"]),
                       loss=LossConfig(), train_dataset=dataset, data_collator=KDCollator())
    sft.train()
    plain = KDTrainer(model=student(hf["student"]), args=training_args(tmp_path / "plain"),
                      loss=LossConfig(), train_dataset=dataset, data_collator=KDCollator())
    plain.train()
    a = [h["loss"] for h in sft.state.log_history if "loss" in h]
    b = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-5)


DDP_SCRIPT = """
import hashlib, json, sys
import torch
from transformers import AutoModelForCausalLM, TrainingArguments
from atkd_cache.hf import KDCollator, KDTrainer, cache_dataset
from atkd_cache.losses.kd import LossConfig

cache, student, out = sys.argv[1:4]
seen = []

class Recording(KDCollator):
    def __call__(self, features):
        seen.extend(int(f["seq_index"]) for f in features)
        return super().__call__(features)

args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=3,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, ddp_backend="gloo", disable_tqdm=True)
model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
trainer = KDTrainer(model=model, args=args, loss=LossConfig(), train_dataset=
                    cache_dataset(cache), data_collator=Recording())
trainer.train()
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in
                                 trainer.model.state_dict().values())).hexdigest()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
json.dump({"sha": digest, "seen": seen, "losses": losses},
          open(f"{out}/rank{args.process_index}.json", "w"))
"""


def test_torchrun_two_processes(hf, tmp_path):
    """KDTrainer under torchrun (2 CPU processes, gloo): each rank reads its own cache shards,
    the ranks end with identical weights, and the logged loss is the global one."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29561", str(script), hf["cache"], hf["student"], str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["sha"] == ranks[1]["sha"]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3
    assert ranks[0]["seen"] and ranks[1]["seen"]
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])  # disjoint cache shards
