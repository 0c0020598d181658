"""Several teachers' caches of the same data on real caches and models: the loader reads them
in lock-step (same shard plan or not), two copies of one cache train to exactly the weights
of one, the refusals, the datasets view and KDTrainer, evaluate per teacher, and the
map-style view's damaged-cache error."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atkd_cache import tiny
from atkd_cache.cache.reader import Cache, open_cache
from atkd_cache.cli.main import main
from atkd_cache.errors import UserError
from atkd_cache.hf import KDCollator, KDTrainer, cache_dataset
from atkd_cache.losses.kd import LossConfig
from atkd_cache.train.evaluate import cache_metrics
from atkd_cache.train.loader import AlignedReader, CacheDataset, LoaderConfig, collate
from atkd_cache.train.trainer import TrainConfig, train
from conftest import SEQ_LEN, dump


@pytest.fixture(scope="module")
def caches(assets, hf_cache, tmp_path_factory):
    """hf_cache's cache (teacher A: top-8, fp16) and, over the same data, teacher B's top-4
    float32 cache with the same shard plan, its sampled cache with another plan, plus caches
    of other data and of another tokenizer."""
    root = tmp_path_factory.mktemp("multi")
    data = str(hf_cache["root"] / "pairs.jsonl")
    teacher_b = str(root / "teacher_b_model")  # another random Llama, the same tokenizer
    tiny.build_tokenizer(teacher_b)
    tiny.build_model(teacher_b, assets["vocab"], arch="llama", seed=5)
    other_tok = str(root / "other_tok_model")
    tiny.build_tokenizer(other_tok, vocab_size=280, seed=9)
    tiny.build_model(other_tok, 280, arch="llama", seed=6)
    where = {**assets, "prompt_response": data, "b": teacher_b, "other": other_tok}
    out = {"a": hf_cache["cache"], "student": hf_cache["student"], "root": root}
    for name, model, extra in (
        ("b", "b", {"top_k": 4, "logprob_dtype": "float32", "shard_positions": 120}),
        ("b_sampled", "b", {"mode": "sampled", "num_samples": 16, "shard_positions": 50}),
        ("fewer", "b", {"limit": 20, "shard_positions": 120}),
        ("other_tok", "other", {"shard_positions": 120}),
    ):
        dump(where, root / name, shape="prompt_response", model=model, max_length=SEQ_LEN,
             **extra)
        out[name] = str(root / name)
    return out


def test_loader_reads_every_cache_in_lock_step(caches, monkeypatch):
    a, b, c = (open_cache(caches[k]) for k in ("a", "b", "b_sampled"))
    assert AlignedReader(b, a, [], 0).same_plan and not AlignedReader(c, a, [], 0).same_plan
    assert len(c.shard_rows) > len(a.shard_rows) > 1
    dataset = CacheDataset([caches["a"], caches["b"], caches["b_sampled"]],
                           LoaderConfig(batch_tokens=3 * SEQ_LEN, num_workers=0, seed=3))
    reads: dict = {}
    real_read = Cache.read_shard

    def counting(self, shard, names=None):
        if names is None and all(self is not x for x in (a, b, c)):  # the loader's reads
            reads[self.path, shard] = reads.get((self.path, shard), 0) + 1
        return real_read(self, shard, names)

    monkeypatch.setattr(Cache, "read_shard", counting)
    seen = 0
    for batch in dataset:
        index = batch["seq_index"].tolist()
        want = collate([a[i] for i in index], False, ([b[i] for i in index],
                                                      [c[i] for i in index]))
        assert set(batch) - {"slot"} == set(want)
        for key, value in want.items():
            assert torch.equal(batch[key], value), key
        assert "teacher1.topk_ids" in batch and "teacher2.sample_ids" in batch
        seen += len(index)
    assert seen == len(a) == 32
    for path, cache in ((caches["a"], a), (caches["b"], b), (caches["b_sampled"], c)):
        # the loader read every shard of every cache once in the epoch
        assert [reads.get((path, s)) for s in range(len(cache.shard_rows))] == [1] * len(
            cache.shard_rows), path


def run(caches, out, cache, **loss):
    cfg = TrainConfig(
        cache=cache, student=caches["student"], output=str(out),
        loss=LossConfig(**loss), loader=LoaderConfig(batch_tokens=4 * SEQ_LEN, num_workers=0),
        lr=1e-3, max_steps=3, precision="fp32", device="cpu", progress=False,
        tensorboard=False,
    )
    return train(cfg, log=lambda m: None)


@pytest.mark.parametrize("mix", ["mixture", "confident", "route-by-hard"])
def test_two_copies_of_one_cache_train_to_its_weights_exactly(caches, tmp_path, mix):
    one = run(caches, tmp_path / "one", caches["a"], loss="atkd")
    two = run(caches, tmp_path / "two", [caches["a"], caches["a"]], loss="atkd", mix=mix)
    assert one["weights_sha256"] == two["weights_sha256"]
    both = run(caches, tmp_path / "ab", [caches["a"], caches["b"]], loss="atkd", mix=mix)
    assert both["weights_sha256"] != one["weights_sha256"]  # teacher B takes part
    record = json.loads((tmp_path / "ab" / "run.json").read_text())
    assert [c["top_k"] for c in record["cache_cards"]] == [8, 4]


def cli_train(caches, out, *args):
    return CliRunner().invoke(main, [
        "train-student", "--student", caches["student"], "-o", str(out), "--max-steps", "1",
        "--batch-tokens", "96", "--num-workers", "0", "--no-progress", "--no-tensorboard",
        *args])


def test_refusals_name_what_differs(caches, tmp_path):
    a = ["--cache", caches["a"]]
    cases = [
        ([*a, "--cache", caches["fewer"]], "hold different data (data fingerprint"),
        ([*a, "--cache", caches["other_tok"]], "were made with different tokenizers"),
        ([*a, "--cache", caches["b"], "--teacher-weights", "1,2,3"],
         "--teacher-weights: 3 teacher weights for 2 caches"),
        ([*a, "--cache", caches["b"], "--teacher-weights", "1;2"],
         "give numbers separated by commas"),
        ([*a, "--teacher-weights", "1"], "--teacher-weights weighs several teachers"),
        ([*a, "--cache", caches["b_sampled"], "--base", "rkl", "--loss", "kd"],
         "is a sampled cache: a sampled cache supports forward KL only"),
    ]
    for i, (args, message) in enumerate(cases):
        r = cli_train(caches, tmp_path / f"r{i}", *args)
        assert r.exit_code == 2 and message in r.output, r.output
        assert "Traceback" not in r.output and not (tmp_path / f"r{i}" / "model").exists()


def test_partial_cache_is_refused_unless_allowed_and_covered(caches, assets, tmp_path):
    half = tmp_path / "half"  # rank 0 of a 2-rank dump: some shards committed
    data = open_cache(caches["a"]).card.data_source
    dump({**assets, "prompt_response": data}, half, shape="prompt_response",
         max_length=SEQ_LEN, shard_positions=120, rank=0, world_size=2)
    assert open_cache(half).status == "partial"
    r = cli_train(caches, tmp_path / "r1", "--cache", caches["a"], "--cache", str(half))
    assert r.exit_code == 2 and "--allow-partial" in r.output, r.output
    r = cli_train(caches, tmp_path / "r2", "--cache", caches["a"], "--cache", str(half),
                  "--allow-partial")
    assert r.exit_code == 2 and "has not committed sequence" in r.output, r.output
    r = cli_train(caches, tmp_path / "r3", "--cache", str(half), "--cache", caches["a"],
                  "--allow-partial")
    assert r.exit_code == 0, r.output


def test_mixture_trains_and_evaluate_reports_each_teacher(caches, tmp_path):
    r = cli_train(caches, tmp_path / "run", "--cache", caches["a"], "--cache",
                  caches["b_sampled"], "--teacher-weights", "0.7,0.3", "--mix", "mixture")
    assert r.exit_code == 0, r.output
    model = tiny_model(tmp_path / "run" / "model")
    joined = cache_metrics(model, [caches["a"], caches["b"]], limit=None)
    alone = [cache_metrics(model, caches[k]) for k in ("a", "b")]
    for row, single, path in zip(joined["per_teacher"], alone, (caches["a"], caches["b"]),
                                 strict=True):
        assert row["cache"] == path
        assert row["student_kl_to_teacher"] == pytest.approx(
            single["student"]["kl_to_teacher"], rel=1e-6)
        assert row["student_top1_agreement"] == pytest.approx(
            single["student"]["top1_agreement"], rel=1e-6)
        assert row["teacher_nll"] == pytest.approx(single["teacher"]["nll"], rel=1e-6)
    kls = [row["student_kl_to_teacher"] for row in joined["per_teacher"]]
    assert joined["student"]["kl_to_teacher"] != pytest.approx(kls[0])
    r = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "run" / "model"),
                                  "--cache", caches["a"], "--cache", caches["b"],
                                  "--device", "cpu"])
    assert r.exit_code == 0 and f"teacher 1 ({caches['b']}): student KL" in r.output, r.output


def tiny_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def test_datasets_view_and_kd_trainer_take_several_caches(caches, tmp_path):
    from transformers import TrainingArguments

    paths = [caches["a"], caches["b_sampled"]]
    rows = list(cache_dataset(paths))
    c = open_cache(caches["b_sampled"])
    assert len(rows) == len(c)
    for row in rows[:5]:
        seq = c[row["seq_index"]]
        assert np.array_equal(row["teacher1_sample_ids"], seq.sample_ids)
        assert np.allclose(row["teacher1_target_logprob"], seq.target_logprob)
    a = open_cache(caches["a"])
    batch = KDCollator()(rows[:3])
    index = [r["seq_index"] for r in rows[:3]]
    want = collate([a[i] for i in index], False, ([c[i] for i in index],))
    for key, value in want.items():
        assert torch.equal(batch[key], value), key

    order = list(range(8))
    cfg = TrainConfig(
        cache=paths, student=caches["student"], output=str(tmp_path / "ts"),
        loss=LossConfig(loss="kd", mix="confident"),
        loader=LoaderConfig(batch_tokens=2 * SEQ_LEN, shuffle=False, num_workers=0),
        lr=1e-3, min_lr_ratio=1.0, max_steps=4, precision="fp32", device="cpu",
        log_sequences=True, progress=False, tensorboard=False,
    )
    train(cfg, log=lambda m: None)
    steps = [json.loads(x) for x in open(tmp_path / "ts" / "metrics.jsonl")]
    order = [i for x in open(tmp_path / "ts" / "sequences-rank0.jsonl")
             for i in json.loads(x)["seq_index"]]
    dataset = cache_dataset(paths, streaming=False, cache_dir=str(tmp_path / "hfc"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, max_steps=4,
        learning_rate=1e-3, lr_scheduler_type="constant", adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
        weight_decay=0.0, warmup_steps=0)
    trainer = KDTrainer(model=tiny_model(caches["student"]), args=args,
                        loss=LossConfig(loss="kd", mix="confident"),
                        train_dataset=dataset.select(order), data_collator=KDCollator())
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([s["loss"] for s in steps], rel=1e-5)


def test_map_style_view_of_a_damaged_cache_says_what_is_wrong(caches, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(caches["a"], damaged)
    chunk = damaged.joinpath("shards", "shard-000001", "topk_logprobs", "c", "0", "0")
    os.remove(chunk)
    with pytest.raises(UserError) as e:
        cache_dataset(str(damaged), streaming=False, cache_dir=str(tmp_path / "hfc"))
    assert "shard-000001/topk_logprobs" in str(e.value)
    assert "An error occurred while generating the dataset" not in str(e.value)


def test_workers_and_a_damaged_second_cache(caches, tmp_path):
    """Two loader workers read both caches (each worker opens its own); a chunk missing in
    the second cache stops the run with one line naming it."""
    args = ["--num-workers", "2", "--max-steps", "2"]
    one = cli_train(caches, tmp_path / "one", "--cache", caches["a"], *args)
    two = cli_train(caches, tmp_path / "two", "--cache", caches["a"], "--cache", caches["a"],
                    *args)
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    digests = [json.loads((tmp_path / r / "summary.json").read_text())["weights_sha256"]
               for r in ("one", "two")]
    assert digests[0] == digests[1]
    damaged = tmp_path / "damaged"
    shutil.copytree(caches["b"], damaged)
    os.remove(damaged.joinpath("shards", "shard-000001", "topk_logprobs", "c", "0", "0"))
    r = cli_train(caches, tmp_path / "r", "--cache", caches["a"], "--cache", str(damaged),
                  "--epochs", "1", "--max-steps", "1000")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "shard-000001/topk_logprobs: differs from its sha256" in r.output
    assert not (tmp_path / "r" / "model").exists()
