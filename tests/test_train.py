"""Students and the trainer in-process: layer-subset init, compatibility checks, logits at
rows (padded = packed = full forward), token-weighted accumulation against a dense reference,
a real training run and its outputs, and evaluation metrics against a direct computation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.errors import UserError
from atkd_cache.losses.kd import LossConfig
from atkd_cache.train.evaluate import cache_metrics, ece, format_table, plot_runs, rouge_l
from atkd_cache.train.loader import CacheDataset, LoaderConfig, make_loader
from atkd_cache.train.student import (
    RowLogits,
    check_compatible,
    check_ids,
    enable_checkpointing,
    init_student,
    parse_layers,
)
from atkd_cache.train.trainer import Dist, TrainConfig, accumulate_gradients, lr_at, train
from conftest import dump


@pytest.fixture(scope="module")
def setup(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cache = root / "cache"
    dump(assets, cache, shape="chat", shard_positions=80)
    student = str(root / "student")
    init_student(assets["llama"], "1", student)
    return {"cache": str(cache), "student": student, "root": root}


def test_parse_layers():
    assert parse_layers("3", 30) == [0, 14, 29]
    assert parse_layers("0,2,5", 6) == [0, 2, 5]
    for bad in ("0,0", "2,1", "7", "0,9", "x"):
        with pytest.raises(UserError):
            parse_layers(bad, 6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_student_keeps_chosen_layers(assets, tmp_path, arch):
    out = str(tmp_path / "s")
    assert init_student(assets[arch], "0,1", out) == [0, 1]  # all layers: same model
    teacher = AutoModelForCausalLM.from_pretrained(assets[arch])
    student = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 30, 41, 7]])
    assert torch.allclose(teacher(ids).logits, student(ids).logits, atol=1e-5)
    one = str(tmp_path / "one")
    assert init_student(assets[arch], "1,", one) == [1]  # a list: keep the second layer
    small = AutoModelForCausalLM.from_pretrained(one)
    assert small.config.num_hidden_layers == 1
    t_sd, s_sd = teacher.state_dict(), small.state_dict()
    for key, value in s_sd.items():
        src = key.replace(".0.", ".1.", 1) if (".layers.0." in key or ".h.0." in key) else key
        assert torch.equal(value, t_sd[src]), key
    with pytest.raises(UserError, match="already exists"):
        init_student(assets[arch], "1", one)
    assert init_student(assets[arch], "1", str(tmp_path / "first")) == [0]


def test_compatibility_errors(assets, setup, tmp_path):
    card = open_cache(setup["cache"]).card
    tok = AutoTokenizer.from_pretrained(setup["student"])
    check_compatible(card, tok, card.tokenizer_vocab_size, "s")  # same tokenizer: fine
    check_compatible(card, tok, card.tokenizer_vocab_size + 64, "s")  # padded vocab: fine
    with pytest.raises(UserError, match="vocabulary mismatch.*logits"):
        check_compatible(card, tok, card.tokenizer_vocab_size - 1, "s")
    other = str(tmp_path / "other")
    tiny.build_tokenizer(other, vocab_size=280, seed=1)
    with pytest.raises(UserError, match="tokenizer mismatch: student .* teacher"):
        check_compatible(card, AutoTokenizer.from_pretrained(other), 10_000, "s")
    with pytest.raises(UserError, match="token id 300"):
        check_ids(300, 300, "s")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_row_logits_padded_and_packed_match_full_forward(assets, setup, arch):
    model = AutoModelForCausalLM.from_pretrained(assets[arch]).eval()
    net = RowLogits(model)
    cache = open_cache(setup["cache"])
    for pack in (False, True):
        ds = CacheDataset(setup["cache"], LoaderConfig(batch_tokens=600, pack=pack,
                                                        num_workers=0))
        b = next(iter(make_loader(ds)))
        assert len(b["seq_index"]) > 1
        kwargs = {k: b[k] for k in ("attention_mask", "position_ids") if k in b}
        with torch.no_grad():
            got = net(b["input_ids"], b["rows"], **kwargs)
            offsets = b["group_offsets"].tolist()
            for j, index in enumerate(b["seq_index"].tolist()):
                seq = cache[index]
                full = model(torch.from_numpy(seq.input_ids.astype(np.int64))[None]).logits[0]
                want = full[:-1][torch.from_numpy(seq.supervised)]
                assert torch.allclose(got[offsets[j] : offsets[j + 1]], want, atol=1e-4), pack


def test_accumulation_weights_tokens_exactly(setup):
    """Two micro-batches with the CE loss give the gradient of the token mean over both."""
    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    net = RowLogits(model)
    ds = CacheDataset(setup["cache"], LoaderConfig(batch_tokens=300, num_workers=0))
    micro = list(make_loader(ds))[:2]
    assert micro[0]["rows"].numel() != micro[1]["rows"].numel()
    n_total = sum(b["rows"].numel() for b in micro)
    accumulate_gradients(net, micro, LossConfig(loss="ce"), Dist(), float(n_total))
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = torch.cat([net(b["input_ids"], b["rows"], attention_mask=b["attention_mask"])
                        for b in micro])
    target = torch.cat([b["target_ids"] for b in micro])
    F.cross_entropy(logits, target).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)


def test_lr_schedule():
    cfg = TrainConfig(cache="", student="", output="", lr=1.0, warmup_steps=4, min_lr_ratio=0.1,
                      max_steps=10)
    lrs = [lr_at(s, cfg, 10) for s in range(11)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    ratio = TrainConfig(cache="", student="", output="", lr=1.0, warmup_ratio=0.03,
                        min_lr_ratio=0.0, max_steps=100)  # the paper's 3 % warmup
    assert [lr_at(s, ratio, 100) for s in range(4)] == [1 / 3, 2 / 3, 1.0, pytest.approx(1.0)]
    assert lr_at(100, ratio, 100) == pytest.approx(0.0)


def test_training_run_outputs_and_learns(setup, tmp_path):
    out = str(tmp_path / "run")
    cfg = TrainConfig(
        cache=setup["cache"], student=setup["student"], output=out, epochs=3, lr=3e-3,
        loss=LossConfig(loss="atkd"), loader=LoaderConfig(batch_tokens=600, num_workers=1),
        progress=False, log_sequences=True,
    )
    summary = train(cfg, log=lambda m: None)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert summary["steps"] == len(records) == records[-1]["step"]
    last = records[-1]
    for key in ("loss", "ce", "lr", "grad_norm", "tokens_per_s", "tkd_hard", "dkd_easy",
                "padding"):
        assert key in last
    # (the tiny teacher is random, so only the KD loss, not CE on the data, must fall)
    mean = lambda e: np.mean([r["loss"] for r in records if r["epoch"] == e])  # noqa: E731
    assert mean(2) < 0.8 * mean(0)
    # every epoch used each sequence once (one rank: nothing is left over)
    n = len(open_cache(setup["cache"]))
    per_epoch: dict[int, list[int]] = {}
    for line in open(os.path.join(out, "sequences-rank0.jsonl")):
        rec = json.loads(line)
        per_epoch.setdefault(rec["epoch"], []).extend(rec["seq_index"])
    assert sorted(per_epoch) == [0, 1, 2]
    assert all(sorted(v) == list(range(n)) for v in per_epoch.values())
    # the saved student loads with transformers and is the trained one
    trained = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
    assert AutoTokenizer.from_pretrained(os.path.join(out, "model")) is not None
    before = cache_metrics(AutoModelForCausalLM.from_pretrained(setup["student"]),
                           setup["cache"])
    after = cache_metrics(trained, setup["cache"])
    assert after["student"]["kl_to_teacher"] < before["student"]["kl_to_teacher"]
    assert os.listdir(os.path.join(out, "tb"))
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["cache_card"]["tokenizer_fingerprint"] == open_cache(setup["cache"]).card \
        .tokenizer_fingerprint
    png = plot_runs([out], str(tmp_path / "curves.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000


def test_cache_metrics_match_direct_computation(setup):
    model = AutoModelForCausalLM.from_pretrained(setup["student"]).eval()
    got = cache_metrics(model, setup["cache"], batch_tokens=500)
    cache = open_cache(setup["cache"])
    nll, agree, correct, conf, t_nll, kl, hard = [], [], [], [], [], [], []
    with torch.no_grad():
        for seq in cache:
            logits = model(torch.from_numpy(seq.input_ids.astype(np.int64))[None]).logits[0]
            rows = torch.log_softmax(logits[:-1][torch.from_numpy(seq.supervised)].double(), -1)
            target = torch.from_numpy(seq.target_ids.astype(np.int64))
            nll += (-rows.gather(1, target[:, None])[:, 0]).tolist()
            pred = rows.argmax(-1)
            agree += (pred.numpy() == seq.topk_ids[:, 0]).tolist()
            correct += (pred == target).tolist()
            conf += rows.max(-1).values.exp().tolist()
            t_nll += (-seq.target_logprob.astype(np.float64)).tolist()
            hard += seq.hard.tolist()
            for j in range(len(target)):  # KL over top-k ∪ {target} + one tail bucket
                ids = list(dict.fromkeys([*seq.topk_ids[j].tolist(), int(target[j])]))
                lp = {int(i): float(v) for i, v in zip(seq.topk_ids[j], seq.topk_logprobs[j],
                                                       strict=True)}
                lp[int(target[j])] = float(seq.target_logprob[j])
                p = np.exp([lp[i] for i in ids])
                q = rows[j, ids].exp().numpy()
                p_tail, q_tail = max(1 - p.sum(), 0.0), max(1 - q.sum(), 1e-300)
                kl.append(float((p * (np.log(p) - np.log(q))).sum()
                                + (p_tail * np.log(p_tail / q_tail) if p_tail > 0 else 0.0)))
    s = got["student"]
    hard = np.array(hard, dtype=bool)
    assert 0 < hard.sum() < len(hard)
    assert s["kl_hard"] == pytest.approx(np.mean(np.array(kl)[hard]), rel=1e-3)
    assert s["kl_easy"] == pytest.approx(np.mean(np.array(kl)[~hard]), rel=1e-3)
    assert s["kl_to_teacher"] == pytest.approx(np.mean(kl), rel=1e-3)
    assert s["nll_hard"] == pytest.approx(np.mean(np.array(nll)[hard]), rel=1e-5)
    assert got["tokens"] == cache.num_supervised
    assert s["nll"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert s["top1_agreement"] == pytest.approx(np.mean(agree))
    assert s["accuracy"] == pytest.approx(np.mean(correct))
    assert s["ece"] == pytest.approx(ece(np.array(conf), np.array(correct)), abs=1e-5)
    assert got["teacher"]["nll"] == pytest.approx(np.mean(t_nll), rel=1e-5)
    assert got["teacher"]["top1_agreement"] == 1.0
    assert s["kl_to_teacher"] > 0
    table = format_table(got)
    assert "top1_agreement" in table and "student" in table.splitlines()[0]


def test_ece_reference():
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    # bins: 0.95 -> acc 0.5, |0.5 - 0.95| = 0.45; 0.55 -> acc 1, 0.45; each half the weight
    assert ece(conf, correct) == pytest.approx(0.45)
    assert ece(np.array([1.0]), np.array([True])) == 0.0


def test_rouge_l():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx(2 * 0.75 / 1.75)
    assert rouge_l(["dogs"], ["cats"]) == 0.0


def test_gradient_checkpointing_same_gradients(setup):
    ds = CacheDataset(setup["cache"], LoaderConfig(batch_tokens=400, num_workers=0))
    micro = list(make_loader(ds))[:2]
    n_total = float(sum(b["rows"].numel() for b in micro))
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(setup["student"]).train()
        if checkpointing:
            enable_checkpointing(model)
        accumulate_gradients(RowLogits(model), micro, LossConfig(), Dist(), n_total)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
