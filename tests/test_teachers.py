"""Several teachers joined into one (losses/teachers.py) against plain dense references:
the mixture at k = V, one or identical teachers, confident and route-by-hard row by row,
the tail approximation's bound, a sampled teacher, and the fused head."""

from __future__ import annotations

import math

import pytest
import torch
from reference import dense_atkd, dense_kd

from atkd_cache.losses import LossConfig, SparseTeacher, fused_kd_loss, kd_loss
from atkd_cache.losses.kd import row_terms
from atkd_cache.losses.teachers import join_teachers, normalise_weights

BASES = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]
OFFSETS = [0, 5, 12, 20]  # three "sequences" of rows


def teacher_logps(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 3, -1)


def dense_labels(p_target, offsets, rho=0.5):
    """The dump's rule, written plainly: per sequence, hard = UNC >= the sorted UNC at
    floor((m - 1)(1 - rho))."""
    unc = [1 - float(x) for x in p_target]
    out = []
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        seq = unc[lo:hi]
        t = sorted(seq)[math.floor((len(seq) - 1) * (1 - rho))]
        out += [u >= t for u in seq]
    return torch.tensor(out)


def sparse_of(tlp, targets, k, dtype=torch.float64):
    top = tlp.topk(k, -1)
    lp_g = tlp.gather(1, targets[:, None])[:, 0].to(dtype)
    return SparseTeacher(
        topk_ids=top.indices, topk_logprobs=top.values.to(dtype), target_ids=targets,
        target_logprob=lp_g, hard=dense_labels(lp_g.exp(), OFFSETS),
        uncertainty=-torch.expm1(lp_g),
    )


def case(n=20, v=30, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    return logits, targets


def value_and_grad(fn, logits):
    x = logits.clone().requires_grad_(True)
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


def test_weights_are_normalised_and_checked():
    assert normalise_weights(None, 4) == [0.25] * 4
    assert normalise_weights([1, 3], 2) == [0.25, 0.75]
    with pytest.raises(ValueError, match="3 teacher weights for 2 caches"):
        normalise_weights([1, 1, 1], 2)
    with pytest.raises(ValueError, match=">= 0"):
        normalise_weights([1, -1], 2)


@pytest.mark.parametrize("base", BASES)
def test_mixture_at_k_equals_v_is_the_dense_mixture(base):
    logits, targets = case()
    v = logits.shape[1]
    a, b = teacher_logps(20, v, 1), teacher_logps(20, v, 2)
    w = [0.3, 0.7]
    mixed = torch.log(w[0] * a.exp() + w[1] * b.exp())
    joined = join_teachers([sparse_of(a, targets, v), sparse_of(b, targets, v)], w,
                           "mixture", group_offsets=OFFSETS)
    p_g = mixed.gather(1, targets[:, None])[:, 0].exp()
    assert torch.equal(joined.hard, dense_labels(p_g, OFFSETS))
    for cfg, dense in (
        (LossConfig(loss="kd", base=base), lambda x: dense_kd(x, mixed, base)),
        (LossConfig(loss="atkd", base=base),
         lambda x: dense_atkd(x, mixed, targets, joined.hard, base)[0]),
    ):
        v1, g1 = value_and_grad(lambda x, cfg=cfg: kd_loss(x, joined, cfg).loss, logits)
        v2, g2 = value_and_grad(dense, logits)
        torch.testing.assert_close(v1, v2, atol=1e-10, rtol=0)
        torch.testing.assert_close(g1, g2, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mix", ["mixture", "confident", "route-by-hard"])
@pytest.mark.parametrize("loss,base", [("kd", b) for b in BASES] + [("atkd", "fkl"),
                                                                    ("atkd", "rkl")])
def test_one_or_identical_teachers_give_todays_loss_exactly(mix, loss, base):
    logits, targets = case(seed=3)
    single = sparse_of(teacher_logps(20, 30, 4), targets, k=8, dtype=torch.float32)
    cfg = LossConfig(loss=loss, base=base)
    v0, g0 = value_and_grad(lambda x: kd_loss(x, single, cfg).loss, logits)
    for teachers in ([single], [single, single], [single, single, single]):
        joined = join_teachers(teachers, None, mix, group_offsets=OFFSETS)
        assert torch.equal(joined.hard, single.hard)
        v1, g1 = value_and_grad(lambda x, j=joined: kd_loss(x, j, cfg).loss, logits)
        assert torch.equal(v0, v1) and torch.equal(g0, g1)


def test_confident_takes_each_rows_most_confident_teacher():
    logits, targets = case(seed=5)
    teachers = [sparse_of(teacher_logps(20, 30, s), targets, k=k, dtype=torch.float32)
                for s, k in ((6, 5), (7, 9))]
    joined = join_teachers(teachers, None, "confident", group_offsets=OFFSETS)
    best = torch.stack([t.target_logprob for t in teachers]).argmax(0)
    assert 0 < int(best.sum()) < 20  # both teachers win some rows
    for base in ("fkl", "rkl"):
        cfg = LossConfig(loss="kd", base=base)
        got = row_terms(logits, joined, cfg)[base]
        each = [row_terms(logits, t, cfg)[base] for t in teachers]
        want = torch.where(best == 0, each[0], each[1])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(joined.target_logprob,
                       torch.stack([t.target_logprob for t in teachers]).amax(0))


def test_route_by_hard_mixes_easy_rows_and_routes_hard_ones():
    logits, targets = case(seed=8)
    teachers = [sparse_of(teacher_logps(20, 30, s), targets, k=30) for s in (9, 10)]
    w = [0.6, 0.4]
    routed = join_teachers(teachers, w, "route-by-hard", group_offsets=OFFSETS)
    mixture = join_teachers(teachers, w, "mixture", group_offsets=OFFSETS)
    confident = join_teachers(teachers, w, "confident", group_offsets=OFFSETS)
    assert torch.equal(routed.hard, mixture.hard)  # the split is the mixture's
    cfg = LossConfig(loss="kd", base="fkl")
    terms = [row_terms(logits, t, cfg)["fkl"] for t in (routed, mixture, confident)]
    want = torch.where(routed.hard, terms[2], terms[1])
    torch.testing.assert_close(terms[0], want, atol=1e-10, rtol=0)
    assert not torch.allclose(terms[1], terms[2])


def test_tail_approximation_stays_within_its_bound():
    v, n = 50, 20
    logits, targets = case(n=n, seed=11)
    logits = logits[:, :1].repeat(1, v)  # unused here: only the teacher side is checked
    a, b = teacher_logps(n, v, 12), teacher_logps(n, v, 13)
    ta, tb = sparse_of(a, targets, 6), sparse_of(b, targets, 6)
    joined = join_teachers([ta, tb], [0.5, 0.5], "mixture", group_offsets=OFFSETS)
    exact = 0.5 * a.exp() + 0.5 * b.exp()
    for row in range(n):
        ids = set(joined.topk_ids[row].tolist()) | {int(targets[row])}
        valid = joined.topk_ids[row] != targets[row]
        got = joined.topk_logprobs[row][valid].double().exp().sum() + joined.target_logprob[
            row].double().exp()
        want = exact[row, sorted(ids)].sum()  # the exact mixture's mass on the support
        moved = want - got
        bound = 0.0
        for t, dense in ((ta, a), (tb, b)):
            own = set(t.topk_ids[row].tolist()) | {int(targets[row])}
            missing = len(ids - own)
            r = 1 - dense[row, sorted(own)].exp().sum()
            bound += 0.5 * min(float(r), missing * float(t.topk_logprobs[row, -1].exp()))
        assert -1e-6 <= float(moved) <= bound + 1e-6


def test_sampled_teacher_with_exact_counts_joins_as_its_distribution():
    """Counts proportional to p on every id: the self-normalised estimate is p itself."""
    n, v = 20, 12
    logits, targets = case(n=n, v=v, seed=14)
    dense_a = teacher_logps(n, v, 15)
    probs_b = torch.softmax(torch.randint(0, 4, (n, v), generator=torch.Generator()
                                          .manual_seed(16)).double(), -1)
    counts = (probs_b * 1000).round()
    probs_b = counts / counts.sum(1, keepdim=True)
    lp_g = probs_b.gather(1, targets[:, None])[:, 0].log()
    sampled = SparseTeacher(
        topk_ids=None, topk_logprobs=None, target_ids=targets, target_logprob=lp_g,
        hard=dense_labels(lp_g.exp(), OFFSETS), entropy=-(probs_b * probs_b.log()).sum(1),
        sample_ids=torch.arange(v).repeat(n, 1), sample_counts=counts,
    )
    joined = join_teachers([sparse_of(dense_a, targets, v), sampled], [0.5, 0.5], "mixture",
                           group_offsets=OFFSETS)
    mixed = torch.log(0.5 * dense_a.exp() + 0.5 * probs_b)
    v1, g1 = value_and_grad(lambda x: kd_loss(x, joined, LossConfig(loss="kd")).loss, logits)
    v2, g2 = value_and_grad(lambda x: dense_kd(x, mixed, "fkl"), logits)
    torch.testing.assert_close(v1, v2, atol=1e-10, rtol=0)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=0)


def test_fused_head_takes_the_joined_teacher():
    n, h, v = 20, 8, 30
    g = torch.Generator().manual_seed(17)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    _, targets = case(n=n, v=v, seed=18)
    teachers = [sparse_of(teacher_logps(n, v, s), targets, k) for s, k in ((19, 4), (20, 7))]
    joined = join_teachers(teachers, [0.5, 0.5], "mixture", group_offsets=OFFSETS)
    cfg = LossConfig(loss="atkd")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused_kd_loss(h1, w1, joined, cfg, chunk_rows=7).loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kd_loss(h2 @ w2.T, joined, cfg).loss.backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-10, rtol=0)
