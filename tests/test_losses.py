"""Sparse losses against the dense float64 references: exact at k = V, identities, edge
cases, gradients, extreme logits."""

from __future__ import annotations

import pytest
import torch
from reference import DENSE, decompose, dense_atkd, dense_kd

from atkd_cache.losses import LossConfig, SparseTeacher, bucketize, kd_loss
from atkd_cache.losses.kd import target_split

BASES = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]


def make_case(n=12, v=40, k=None, seed=0, dtype=torch.float64, scale=3.0):
    """Student logits, dense teacher log-probs, and the sparse teacher with top-k."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher_logp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, -1)
    targets = torch.randint(0, v, (n,), generator=g)
    k = k or v
    top = teacher_logp.topk(k, -1)
    hard = torch.rand(n, generator=g) < 0.5
    sparse = SparseTeacher(
        topk_ids=top.indices, topk_logprobs=top.values, target_ids=targets,
        target_logprob=teacher_logp.gather(1, targets[:, None]).squeeze(1),
        hard=hard, uncertainty=-torch.expm1(teacher_logp.gather(1, targets[:, None]).squeeze(1)),
    )
    return logits, teacher_logp, targets, sparse


def value_and_grad(fn, logits):
    x = logits.clone().requires_grad_(True)
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_k_equals_v_matches_dense_kd(base, tail):
    logits, tlp, targets, sparse = make_case()
    cfg = LossConfig(loss="kd", base=base, tail=tail)
    v1, g1 = value_and_grad(lambda x: kd_loss(x, sparse, cfg).loss, logits)
    v2, g2 = value_and_grad(lambda x: dense_kd(x, tlp, base), logits)
    torch.testing.assert_close(v1, v2, atol=1e-6, rtol=0)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("base", BASES)
def test_k_equals_v_matches_dense_atkd(base):
    logits, tlp, targets, sparse = make_case(seed=1)
    cfg = LossConfig(loss="atkd", base=base)
    v1, g1 = value_and_grad(lambda x: kd_loss(x, sparse, cfg).loss, logits)
    v2, g2 = value_and_grad(lambda x: dense_atkd(x, tlp, targets, sparse.hard, base)[0], logits)
    torch.testing.assert_close(v1, v2, atol=1e-6, rtol=0)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


def test_jsd_beta_endpoints_are_forward_and_reverse_kl():
    logits, tlp, _, sparse = make_case(seed=2)
    for beta, base in ((0.0, "fkl"), (1.0, "rkl")):
        a = kd_loss(logits, sparse, LossConfig(loss="kd", base="jsd", beta=beta)).loss
        b = kd_loss(logits, sparse, LossConfig(loss="kd", base=base)).loss
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_kl_identity_dense_and_bucketed():
    logits, tlp, targets, _ = make_case(seed=3)
    p, q = tlp.exp(), torch.softmax(logits, -1)
    bp, bq, ph, qh = decompose(p, q, targets)
    pg = p.gather(1, targets[:, None]).squeeze(1)
    kl = DENSE["fkl"]
    torch.testing.assert_close(kl(p, q), kl(bp, bq) + (1 - pg) * kl(ph, qh))
    # bucketed, with k < V and targets inside and outside the top-k
    _, _, _, sparse = make_case(seed=3, k=5)
    pair = bucketize(logits, sparse.topk_ids, sparse.topk_logprobs, sparse.target_ids,
                     sparse.target_logprob)
    binary, rest = target_split(pair)
    from atkd_cache.losses.divergences import fkl

    full = fkl(pair.teacher, pair.student, pair.valid)
    p_g = pair.teacher[:, 0].exp()
    tkd = fkl(binary.teacher, binary.student, binary.valid)
    parts = tkd + (1 - p_g) * fkl(rest.teacher, rest.student, rest.valid)
    torch.testing.assert_close(full, parts, atol=1e-12, rtol=0)
    # bucketing is a lower bound of the full KL (log-sum inequality)
    assert (full <= DENSE["fkl"](p, q) + 1e-12).all()
    inside = (sparse.topk_ids == sparse.target_ids[:, None]).any(1)
    assert inside.any() and (~inside).any()


def test_student_tail_is_exact_when_tiny():
    # the student puts ~1e-30 of its mass outside the support: 1 - sum would give 0 or noise
    logits = torch.full((1, 50), -80.0, dtype=torch.float32)
    logits[0, :3] = torch.tensor([0.0, -1.0, -2.0])
    pair = bucketize(logits, torch.tensor([[0, 1]]), torch.tensor([[-0.1, -2.5]]),
                     torch.tensor([2]), torch.tensor([-5.0]))
    lse = torch.logsumexp(logits.double(), -1)
    expected = torch.logsumexp(logits[0, 3:].double(), -1) - lse
    assert abs(pair.student[0, -1].item() - expected.item()) < 1e-4
    assert pair.student[0, -1].item() < -70


def test_atkd_edge_cases():
    logits, tlp, targets, sparse = make_case(n=6, seed=4)
    cfg = LossConfig()
    base = kd_loss(logits, sparse, cfg)
    _, tkd, dkd = dense_atkd(logits, tlp, targets, sparse.hard)
    # all easy: alpha * mean(DKD); all hard: (1 - alpha) * mean(TKD + DKD)
    sparse.hard = torch.zeros(6, dtype=torch.bool)
    torch.testing.assert_close(kd_loss(logits, sparse, cfg).loss, 0.2 * dkd.mean())
    sparse.hard = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(kd_loss(logits, sparse, cfg).loss, 0.8 * (tkd + dkd).mean())
    out = kd_loss(logits, sparse, cfg)
    assert out.parts["easy_tokens"] == 0 and out.parts["dkd_easy"] == 0  # empty group -> 0
    # one token
    one = SparseTeacher(*(t[:1] for t in (sparse.topk_ids, sparse.topk_logprobs,
                                          sparse.target_ids, sparse.target_logprob, sparse.hard)))
    torch.testing.assert_close(kd_loss(logits[:1], one, cfg).loss, 0.8 * (tkd + dkd)[0])
    # masked rows count nowhere: same as dropping them
    mask = torch.tensor([True, False, True, True, False, True])
    sub = SparseTeacher(*(t[mask] for t in (sparse.topk_ids, sparse.topk_logprobs,
                                            sparse.target_ids, sparse.target_logprob, sparse.hard)))
    torch.testing.assert_close(kd_loss(logits, sparse, cfg, row_mask=mask).loss,
                               kd_loss(logits[mask], sub, cfg).loss)
    assert torch.isfinite(base.loss)


def test_teacher_certain_target_gives_finite_loss_and_no_dkd():
    logits, tlp, targets, sparse = make_case(n=4, v=30, k=4, seed=5)
    sparse.target_ids = sparse.topk_ids[:, 0].clone()
    sparse.target_logprob = torch.tensor([0.0, -1e-12, -1e-6, -0.5], dtype=torch.float64)
    sparse.topk_logprobs[:, 0] = sparse.target_logprob
    sparse.topk_logprobs[:, 1:] = torch.tensor([-30.0, -31.0, -32.0], dtype=torch.float64)
    sparse.topk_logprobs[0, 1:] = float("-inf")  # row 0: all teacher mass on the target
    x = logits.clone().requires_grad_(True)
    out = kd_loss(x, sparse, LossConfig(hard_ratio=0.5, split="batch"))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    binary, rest = target_split(bucketize(logits, sparse.topk_ids, sparse.topk_logprobs,
                                          sparse.target_ids, sparse.target_logprob))
    from atkd_cache.losses.divergences import fkl

    assert fkl(rest.teacher, rest.student, rest.valid)[0] == 0.0  # p_g = 1: no non-target part


def test_batch_split_reproduces_torch_median_rule():
    logits, tlp, targets, sparse = make_case(n=9, seed=6)
    out = kd_loss(logits, sparse, LossConfig(split="batch", hard_ratio=0.5))
    unc = -torch.expm1(sparse.target_logprob)
    official = unc >= torch.median(unc)
    assert out.parts["hard_tokens"] == official.sum()
    sparse.hard = official
    torch.testing.assert_close(out.loss, kd_loss(logits, sparse, LossConfig()).loss)
    seq = kd_loss(logits, sparse, LossConfig(split="sequence", hard_ratio=0.5),
                  group_offsets=[0, 9])
    torch.testing.assert_close(seq.loss, out.loss)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_gradcheck_sparse(base, tail):
    logits, _, _, sparse = make_case(n=4, v=12, k=3, seed=7)
    cfg = LossConfig(loss="atkd", base=base, tail=tail, split="batch", ce_weight=0.3,
                     chunk_rows=3)
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, sparse, cfg).loss, (logits.clone().requires_grad_(True),)
    )


def test_chunking_does_not_change_results():
    logits, _, _, sparse = make_case(n=10, v=50, k=6, seed=8)
    a, ga = value_and_grad(lambda x: kd_loss(x, sparse, LossConfig(chunk_rows=1)).loss, logits)
    b, gb = value_and_grad(lambda x: kd_loss(x, sparse, LossConfig()).loss, logits)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", BASES)
def test_extreme_logits_stay_finite(dtype, base):
    logits, _, _, sparse = make_case(n=8, v=64, k=8, seed=9)
    extreme = torch.full((8, 64), -1e4 if dtype != torch.float16 else -6e4)
    extreme[:, ::7] = 1e4 if dtype != torch.float16 else 6e4
    extreme[3] = 0.0
    x = extreme.to(dtype).requires_grad_(True)
    sparse.topk_logprobs = sparse.topk_logprobs.to(torch.float16).float()
    sparse.target_logprob = sparse.target_logprob.float()
    for loss in ("atkd", "kd"):
        out = kd_loss(x, sparse, LossConfig(loss=loss, base=base, ce_weight=0.1))
        (g,) = torch.autograd.grad(out.loss, x)
        assert torch.isfinite(out.loss) and torch.isfinite(g.float()).all()
        assert g.dtype == dtype


def test_low_precision_logits_agree_with_fp32():
    logits, _, _, sparse = make_case(n=16, v=100, k=8, seed=10, dtype=torch.float32)
    ref = kd_loss(logits, sparse, LossConfig()).loss
    for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float16, 5e-3)):
        got = kd_loss(logits.to(dtype), sparse, LossConfig()).loss
        assert abs(got.item() - ref.item()) < tol * max(1.0, abs(ref.item()))


def test_temperature_at_k_equals_v_is_exact_tempering():
    logits, tlp, targets, sparse = make_case(seed=11)
    tau = 2.0
    tempered = torch.log_softmax(tlp / tau, -1)
    got = kd_loss(logits, sparse, LossConfig(loss="kd", temperature=tau)).loss
    torch.testing.assert_close(got, dense_kd(logits, tempered), atol=1e-6, rtol=0)


def test_ce_loss_and_ce_weight():
    logits, tlp, targets, sparse = make_case(seed=12)
    ce = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(kd_loss(logits, sparse, LossConfig(loss="ce")).loss, ce)
    kd = kd_loss(logits, sparse, LossConfig(loss="kd")).loss
    both = kd_loss(logits, sparse, LossConfig(loss="kd", ce_weight=0.5)).loss
    torch.testing.assert_close(both, kd + 0.5 * ce)


@pytest.mark.parametrize("loss", ["kd", "atkd"])
def test_rounded_topk_summing_to_one_keeps_reverse_kl_finite(loss):
    """A confident teacher's rounded top-k can sum to >= 1: the cached tail is then empty,
    and reverse KL over a zero teacher mass is inf (NaN gradients, then NaN weights: seen in
    the study). The empty tail takes no part; the value equals the dense formula over the
    support."""
    logits, _, _, sparse = make_case(n=6, v=30, k=4, seed=7)
    sparse.target_ids = sparse.topk_ids[:, 0].clone()
    rounded = torch.tensor([-0.0004, -8.5, -9.0, -9.5], dtype=torch.float64)  # sum(p) > 1
    sparse.topk_logprobs[:] = rounded
    sparse.target_logprob = rounded[0].expand(6).clone()
    x = logits.clone().requires_grad_(True)
    out = kd_loss(x, sparse, LossConfig(loss=loss, base="rkl"))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    if loss == "kd":  # dense reverse KL over the 4 ids (the empty tail left out)
        qs = torch.softmax(logits, -1).gather(1, sparse.topk_ids)
        p = rounded.exp().expand(6, 4)
        want = (qs * (qs.log() - p.log())).sum(1)
        assert out.loss.item() == pytest.approx(want.mean().item(), rel=1e-6)
