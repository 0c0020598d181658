"""The on-policy reverse-KL estimator (losses/onpolicy.py) by exact enumeration: tabular
autoregressive student, teacher and behaviour policies over a 3-token vocabulary and replies
of 3 tokens, every one of the 27 replies weighted by its exact probability (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from atkd_cache.losses.kd import LossConfig, SparseTeacher, kd_loss
from atkd_cache.losses.onpolicy import discounted_returns, rkl_token_weights, rkl_tokens_loss

V, T = 3, 3
PREFIXES = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
INDEX = {p: i for i, p in enumerate(PREFIXES)}
REPLIES = list(itertools.product(range(V), repeat=T))


def table(seed: int, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64) * scale)


def token_logprobs(logits: torch.Tensor, reply) -> torch.Tensor:
    """log pi(y_t | y_<t) for t = 1..T of one reply under a tabular policy."""
    lp = torch.log_softmax(logits, -1)
    return torch.stack([lp[INDEX[tuple(reply[:t])], reply[t]] for t in range(T)])


def seq_prob(logits: torch.Tensor, reply) -> torch.Tensor:
    return token_logprobs(logits, reply).sum().exp()


def exact_reverse_kl_grad(theta, teacher) -> torch.Tensor:
    theta = theta.clone().requires_grad_()
    kl = sum(seq_prob(theta, y) * (token_logprobs(theta, y).sum()
                                   - token_logprobs(teacher, y).sum()) for y in REPLIES)
    (g,) = torch.autograd.grad(kl, theta)
    return g


def frozen_prefix_kl_grad(theta, teacher) -> torch.Tensor:
    """grad of sum_t sum_{y<t} sg(q(y<t)) KL(q(.|y<t) || p(.|y<t))."""
    theta = theta.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for prefix in PREFIXES:
        weight = (token_logprobs(theta.detach(), list(prefix) + [0] * (T - len(prefix)))
                  [: len(prefix)].sum().exp())
        lq = torch.log_softmax(theta[INDEX[prefix]], -1)
        lp = torch.log_softmax(teacher[INDEX[prefix]], -1)
        total = total + weight * (lq.exp() * (lq - lp)).sum()
    (g,) = torch.autograd.grad(total, theta)
    return g


def estimator_expected_grad(theta, teacher, discount, behaviour=None, ratio="sequence"):
    """sum over replies of mu(y) * grad of the estimator's loss on y (times its T rows)."""
    theta = theta.clone().requires_grad_()
    sampler = behaviour if behaviour is not None else theta.detach()
    total = torch.zeros((), dtype=torch.float64)
    for y in REPLIES:
        lq = token_logprobs(theta, y)
        loss, _ = rkl_tokens_loss(
            lq, token_logprobs(teacher, y), [0, T], discount,
            None if behaviour is None else token_logprobs(behaviour, y), ratio)
        total = total + seq_prob(sampler, y) * loss * T
    (g,) = torch.autograd.grad(total, theta)
    return g


def cosine(a, b) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def policies():
    return {"student": table(0), "teacher": table(1), "behaviour": table(2)}


def test_discount_one_is_the_exact_sequence_reverse_kl_gradient(policies):
    exact = exact_reverse_kl_grad(policies["student"], policies["teacher"])
    got = estimator_expected_grad(policies["student"], policies["teacher"], 1.0)
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)


def test_discount_zero_is_the_frozen_prefix_kl_gradient_and_biased(policies):
    exact = exact_reverse_kl_grad(policies["student"], policies["teacher"])
    frozen = frozen_prefix_kl_grad(policies["student"], policies["teacher"])
    got = estimator_expected_grad(policies["student"], policies["teacher"], 0.0)
    torch.testing.assert_close(got, frozen, rtol=1e-10, atol=1e-12)
    assert (got - exact).norm() > 0.05 * exact.norm()  # not the sequence KL's gradient
    assert cosine(got, exact) < 0.999


def test_sequence_ratio_corrects_a_stale_sampler_and_the_token_ratio_does_not(policies):
    s, t, b = policies["student"], policies["teacher"], policies["behaviour"]
    exact = exact_reverse_kl_grad(s, t)
    weighted = estimator_expected_grad(s, t, 1.0, behaviour=b, ratio="sequence")
    torch.testing.assert_close(weighted, exact, rtol=1e-10, atol=1e-12)
    per_token = estimator_expected_grad(s, t, 1.0, behaviour=b, ratio="token")
    assert (per_token - exact).norm() > 0.05 * exact.norm()
    # with the behaviour equal to the student every ratio is 1: the on-policy estimator
    same = estimator_expected_grad(s, t, 1.0, behaviour=s.clone(), ratio="token")
    torch.testing.assert_close(same, exact, rtol=1e-10, atol=1e-12)


def test_returns_and_weights_against_a_plain_loop():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(7, generator=g, dtype=torch.float64)
    offsets = [0, 3, 4, 7]
    for gamma in (0.0, 0.5, 1.0):
        want = []
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            for t in range(lo, hi):
                want.append(sum(gamma ** (s - t) * float(d[s]) for s in range(t, hi)))
        torch.testing.assert_close(discounted_returns(d, offsets, gamma),
                                   torch.tensor(want, dtype=torch.float64))
    lq, lp, mu = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3))
    w, terms = rkl_token_weights(lq, lp, offsets, 1.0, mu, "sequence")
    seq_ratio = [sum(float(lq[s] - mu[s]) for s in range(lo, hi))
                 for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]
    rho = torch.tensor([seq_ratio[i] for i, n in enumerate((3, 1, 3)) for _ in range(n)],
                       dtype=torch.float64).exp()
    torch.testing.assert_close(terms, rho * (lq - lp))
    torch.testing.assert_close(w, rho * discounted_returns(lq - lp, offsets, 1.0))
    with pytest.raises(ValueError, match="discount must be in"):
        rkl_token_weights(lq, lp, offsets, 1.5)
    with pytest.raises(ValueError, match="ratio must be one of"):
        rkl_token_weights(lq, lp, offsets, 1.0, mu, "prefix")


def test_kd_loss_rkl_tokens_equals_the_estimator_on_logits():
    """`LossConfig(loss="rkl-tokens")` through kd_loss (and the fused head): the estimator on
    the student's log-prob of each cached target; value and gradient."""
    from atkd_cache.losses.fused import fused_kd_loss

    g = torch.Generator().manual_seed(5)
    n, v, h = 9, 11, 6
    offsets = torch.tensor([0, 4, 9])
    target = torch.randint(v, (n,), generator=g)
    teacher = SparseTeacher(topk_ids=torch.randint(v, (n, 3), generator=g),
                            topk_logprobs=torch.randn(n, 3, generator=g).double() - 2,
                            target_ids=target,
                            target_logprob=torch.randn(n, generator=g).double() - 1,
                            hard=torch.zeros(n, dtype=torch.bool))
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    cfg = LossConfig(loss="rkl-tokens", discount=0.7)
    logits = hidden @ weight.T
    lq = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
    want, rkl = rkl_tokens_loss(lq, teacher.target_logprob, offsets, 0.7)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = kd_loss(hidden @ weight.T, teacher, cfg, group_offsets=offsets)
    torch.testing.assert_close(got.loss, want)
    torch.testing.assert_close(got.parts["rkl_tokens"], rkl)
    for fn in (lambda: got.loss, lambda: fused_kd_loss(hidden, weight, teacher, cfg,
                                                       group_offsets=offsets).loss):
        grads = torch.autograd.grad(fn(), (hidden, weight))
        for a, b in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(a, b)
