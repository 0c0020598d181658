"""Sampled caches: the sampler against the teacher's distribution, draws independent of
batching, the sampled losses against dense full-vocabulary references, the packed encoding,
loader batches and a training run on a sampled cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import dense_atkd
from transformers import AutoModelForCausalLM

from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import verify_cache
from atkd_cache.cache.schema import PACKED_KEEPBITS
from atkd_cache.data import TokenizedSequence
from atkd_cache.losses.kd import LossConfig, SparseTeacher, kd_loss
from atkd_cache.teacher.extract import position_stats, unique_counts
from atkd_cache.teacher.hf import teacher_outputs
from atkd_cache.train.loader import CacheDataset, LoaderConfig, make_loader
from atkd_cache.train.trainer import sparse_teacher
from conftest import dump


def test_draws_follow_the_teacher_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 2.5
    logits[1, 7] = float("-inf")  # an impossible token is never drawn
    n = 200_000
    uniforms = torch.rand(3, n, dtype=torch.float64)
    stats = position_stats(logits, torch.zeros(3, dtype=torch.long), 0, uniforms=uniforms)
    p = torch.softmax(logits.double(), -1)
    freq = torch.stack([torch.bincount(r, minlength=50) for r in stats.draws]).double() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all()
    assert freq[1, 7] == 0
    # the same uniforms give the same draws, whatever the chunking
    again = position_stats(logits, torch.zeros(3, dtype=torch.long), 0, uniforms=uniforms,
                           chunk_rows=1)
    assert torch.equal(stats.draws, again.draws)


def test_unique_counts():
    draws = np.array([[5, 3, 5, 5], [1, 1, 1, 1], [9, 2, 4, 2]])
    sizes, ids, counts = unique_counts(draws)
    assert sizes.tolist() == [2, 1, 3]
    assert ids.tolist() == [3, 5, 1, 2, 4, 9]
    assert counts.tolist() == [1, 3, 4, 2, 1, 1]


def test_samples_do_not_depend_on_batching(assets):
    model = AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()
    rng = np.random.default_rng(0)
    seqs = []
    for i, n in enumerate([9, 14, 5]):
        ids = rng.integers(3, 200, n)
        seqs.append(TokenizedSequence(seq_id=10 + i, input_ids=ids,
                                      supervised=np.ones(n - 1, dtype=bool)))
    together = teacher_outputs(model, seqs, 0, num_samples=40, sample_seed=3)
    alone = [teacher_outputs(model, [s], 0, num_samples=40, sample_seed=3)[0] for s in seqs]
    for a, b in zip(together, alone, strict=True):
        for key in ("sample_sizes", "sample_ids", "sample_counts"):
            assert np.array_equal(a[key], b[key])
        assert "topk_ids" not in a
        per_position = np.add.reduceat(a["sample_counts"], np.cumsum(a["sample_sizes"])
                                       - a["sample_sizes"])
        assert (per_position == 40).all()
    other_seed = teacher_outputs(model, seqs[:1], 0, num_samples=40, sample_seed=4)[0]
    assert not np.array_equal(other_seed["sample_ids"], together[0]["sample_ids"]) or \
        not np.array_equal(other_seed["sample_counts"], together[0]["sample_counts"])


def exact_case(n=10, v=8, draws=240, seed=0):
    """A sampled teacher whose p is defined as its draw counts / draws (so w = p exactly)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, v, generator=g) * 1.5, -1)
    counts = torch.stack([
        torch.bincount(torch.multinomial(r, draws, replacement=True, generator=g), minlength=v)
        for r in probs
    ])
    p = counts.double() / draws
    targets = torch.stack([torch.multinomial(r.float(), 1, generator=g)[0] for r in p])
    logp = torch.log(p)
    entropy = -(p * logp).nan_to_num().sum(1)
    width = int((counts > 0).sum(1).max())
    ids = torch.zeros(n, width, dtype=torch.long)
    kept = torch.zeros(n, width, dtype=torch.long)
    for i in range(n):
        nz = torch.nonzero(counts[i])[:, 0]
        ids[i, : len(nz)] = nz
        kept[i, : len(nz)] = counts[i, nz]
    teacher = SparseTeacher(
        topk_ids=None, topk_logprobs=None, target_ids=targets,
        target_logprob=logp.gather(1, targets[:, None])[:, 0].float(),
        hard=torch.arange(n) % 3 == 0, entropy=entropy.float(), sample_ids=ids,
        sample_counts=kept.to(torch.int16),
    )
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).requires_grad_()
    return teacher, logp, logits


def grad_of(loss, logits):
    (g,) = torch.autograd.grad(loss, logits)
    return g


def test_sampled_fkl_is_the_full_kl_when_draws_match_p():
    teacher, logp, logits = exact_case()
    out = kd_loss(logits, teacher, LossConfig(loss="kd", base="fkl"))
    q = torch.log_softmax(logits, -1)
    full = (logp.exp() * (logp - q)).nan_to_num().sum(1).mean()
    assert torch.allclose(out.loss, full, atol=1e-6)  # entropy was stored in float32
    assert torch.allclose(grad_of(out.loss, logits), grad_of(full, logits), atol=1e-12)


def test_sampled_atkd_is_the_dense_atkd_when_draws_match_p():
    teacher, logp, logits = exact_case(seed=1)
    out = kd_loss(logits, teacher, LossConfig(loss="atkd"))
    ref, tkd, dkd = dense_atkd(logits, logp, teacher.target_ids, teacher.hard)
    assert torch.allclose(out.loss, ref, atol=1e-5)
    assert torch.allclose(grad_of(out.loss, logits), grad_of(ref, logits), atol=1e-10)
    ce = kd_loss(logits, teacher, LossConfig(loss="ce")).loss
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits, teacher.target_ids))


def test_sampled_fkl_gradient_is_unbiased():
    """Averaged over many independent draw sets, the gradient is the full-KL gradient."""
    torch.manual_seed(0)
    n, v, s, reps = 4, 12, 20, 3000
    t_logits = torch.randn(n, v) * 2
    logp = torch.log_softmax(t_logits.double(), -1)
    logits = torch.randn(n, v, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    stats = position_stats(t_logits.repeat(reps, 1), targets.repeat(reps), 0,
                           uniforms=torch.rand(n * reps, s, dtype=torch.float64))
    draws = stats.draws.view(reps, n, s)
    counts = torch.zeros(reps, n, v).scatter_add_(2, draws, torch.ones(reps, n, s))
    ids = torch.arange(v).expand(reps * n, v)
    teacher = SparseTeacher(
        topk_ids=None, topk_logprobs=None, target_ids=targets.repeat(reps),
        target_logprob=logp.gather(1, targets[:, None])[:, 0].repeat(reps).float(),
        entropy=torch.zeros(n * reps), sample_ids=ids, sample_counts=counts.view(-1, v),
    )
    rows = logits.repeat(reps, 1)
    mean_grad = grad_of(kd_loss(rows, teacher, LossConfig(loss="kd")).loss, logits)
    q = torch.log_softmax(logits, -1)
    full = grad_of((logp.exp() * (logp - q)).sum(1).mean(), logits)
    # Monte-Carlo error of the mean gradient: ~ sqrt(p / (s reps)) / n
    assert (mean_grad - full).abs().max() < 4 * (1 / (s * reps)) ** 0.5 / n
    assert (full.abs().max() > 0.05)


def test_sampled_cache_rejects_other_divergences():
    teacher, _, logits = exact_case()
    with pytest.raises(ValueError, match="forward KL"):
        kd_loss(logits, teacher, LossConfig(loss="kd", base="jsd"))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(logits, teacher, LossConfig(loss="kd", temperature=2.0))


@pytest.fixture(scope="module")
def caches(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    out = {}
    for enc in ("standard", "packed"):
        dump(assets, root / enc, shape="chat", mode="sampled", num_samples=30, encoding=enc,
             shard_positions=120)
    dump(assets, root / "topk-packed", shape="chat", encoding="packed", shard_positions=120)
    dump(assets, root / "topk", shape="chat", shard_positions=120)
    for name in ("standard", "packed", "topk-packed", "topk"):
        out[name] = str(root / name)
    return out


def test_sampled_cache_round_trip_and_packed_encoding(caches):
    std, packed = open_cache(caches["standard"]), open_cache(caches["packed"])
    assert std.card.mode == "sampled" and std.card.top_k == 0 and std.card.num_samples == 30
    assert std.card.format_version == 2 and open_cache(caches["topk"]).card.format_version == 1
    assert verify_cache(std) == [] and verify_cache(packed) == []
    for a, b in zip(std, packed, strict=True):
        for key in ("input_ids", "sample_sizes", "sample_ids", "sample_counts", "hard"):
            assert np.array_equal(getattr(a, key), getattr(b, key))  # lossless parts
        for key, bits in PACKED_KEEPBITS.items():
            if key.startswith("topk"):
                continue
            x, y = getattr(a, key), getattr(b, key)
            assert np.allclose(x, y, rtol=2.0 ** -bits, atol=0)
        assert a.topk_ids is None
    assert packed.card.exactness["target_logprob"] == "rounded"
    # packed top-k: ids lossless, log-probs rounded to the kept mantissa bits
    tk, tkp = open_cache(caches["topk"]), open_cache(caches["topk-packed"])
    assert verify_cache(tkp) == []
    a, b = tk.column("topk_logprobs"), tkp.column("topk_logprobs")
    assert np.array_equal(tk.column("topk_ids"), tkp.column("topk_ids"))
    assert np.allclose(a, b, rtol=2.0 ** -PACKED_KEEPBITS["topk_logprobs"], atol=0)
    assert not np.array_equal(a, b)


def test_loader_batches_of_a_sampled_cache(caches):
    cache = open_cache(caches["packed"])
    loader = make_loader(CacheDataset(caches["packed"], LoaderConfig(
        batch_tokens=300, shuffle=False, num_workers=0)))
    seen = 0
    for batch in loader:
        t = sparse_teacher(batch, torch.device("cpu"))
        offsets = batch["group_offsets"].tolist()
        for j, index in enumerate(batch["seq_index"].tolist()):
            seq = cache[index]
            rows = slice(offsets[j], offsets[j + 1])
            sizes = seq.sample_sizes.astype(int)
            ids, counts = t.sample_ids[rows], t.sample_counts[rows]
            assert ((counts > 0).sum(1).numpy() == sizes).all()
            assert np.array_equal(ids[counts > 0].numpy(), seq.sample_ids)
            assert np.array_equal(counts[counts > 0].numpy(), seq.sample_counts)
            assert np.array_equal(t.entropy[rows].numpy(), seq.entropy)
            seen += 1
    assert seen == len(cache)


def test_training_on_a_sampled_cache_learns(caches, assets, tmp_path):
    import json
    import os

    from atkd_cache.errors import UserError
    from atkd_cache.train.evaluate import cache_metrics
    from atkd_cache.train.student import init_student
    from atkd_cache.train.trainer import TrainConfig, train

    student = str(tmp_path / "student")
    init_student(assets["llama"], "1", student)
    out = str(tmp_path / "run")
    cfg = TrainConfig(
        cache=caches["packed"], student=student, output=out, epochs=3, lr=3e-3,
        loss=LossConfig(loss="kd"), loader=LoaderConfig(batch_tokens=300, num_workers=0),
        progress=False, tensorboard=False,
    )
    train(cfg, log=lambda m: None)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    mean = lambda e: np.mean([r["loss"] for r in records if r["epoch"] == e])  # noqa: E731
    assert mean(2) < 0.8 * mean(0)
    before = cache_metrics(AutoModelForCausalLM.from_pretrained(student), caches["packed"])
    after = cache_metrics(AutoModelForCausalLM.from_pretrained(os.path.join(out, "model")),
                          caches["packed"])
    assert after["student"]["kl_to_teacher"] < before["student"]["kl_to_teacher"]
    cfg.output, cfg.loss = str(tmp_path / "bad"), LossConfig(loss="kd", base="tvd")
    with pytest.raises(UserError, match="sampled cache.*forward KL"):
        train(cfg, log=lambda m: None)


def test_bad_sampled_settings_are_one_line(assets, tmp_path):
    from click.testing import CliRunner

    from atkd_cache.cli.main import main

    base = ["dump-teacher", "--model", assets["llama"], "--data", assets["text"],
            "--text-field", "text", "-o", str(tmp_path / "c"), "--mode", "sampled"]
    for extra, message in ((["--num-samples", "300"], "--num-samples must be in 1..255"),
                           (["--backend", "vllm"], "use --backend hf")):
        r = CliRunner().invoke(main, base + extra)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
        assert not (tmp_path / "c").exists()
