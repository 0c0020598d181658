"""Divergences D(P, Q) between teacher P and student Q given as log-probs over columns.

Every function takes lp, lq [N, C] (log-probs, -inf allowed where a mass is 0) and a column
mask [N, C], and returns [N]. Masked columns and zero-mass terms contribute exactly 0 and
no NaN gradient (inputs are sanitised before any arithmetic).

  fkl   KL(P || Q)                                     forward KL
  rkl   KL(Q || P)                                     reverse KL
  jsd   beta KL(P || M) + (1-beta) KL(Q || M),  M = beta P + (1-beta) Q
        (TRL GKD's generalised JSD; beta = 0 is KL(P||Q), beta = 1 is KL(Q||P))
  tvd   1/2 sum |P - Q|
  skl   KL(P || a P + (1-a) Q)                          skew forward KL (DistiLLM)
  srkl  KL(Q || a Q + (1-a) P)                          skew reverse KL (DistiLLM)
"""

from __future__ import annotations

import math

import torch

from atkd_cache.losses.names import BASES


def kl(lp: torch.Tensor, lq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) over masked-in columns with p_i > 0."""
    live = mask & (lp > float("-inf"))
    lp_s = torch.where(live, lp, 0.0)
    lq_s = torch.where(live, lq, 0.0)
    return torch.where(live, lp_s.exp() * (lp_s - lq_s), 0.0).sum(-1)


def log_mix(la: torch.Tensor, lb: torch.Tensor, mask: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) for 0 < w < 1, in log space; masked columns are set to 0 first,
    since logaddexp(-inf, -inf) has a NaN gradient."""
    la = torch.where(mask, la, 0.0)
    lb = torch.where(mask, lb, 0.0)
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def fkl(lp, lq, mask, **_):
    """Forward KL(P || Q)."""
    return kl(lp, lq, mask)


def rkl(lp, lq, mask, **_):
    """Reverse KL(Q || P)."""
    return kl(lq, lp, mask)


def jsd(lp, lq, mask, beta: float = 0.5, **_):
    """Generalised Jensen-Shannon divergence as TRL's GKD defines it."""
    if beta == 0.0:
        return kl(lp, lq, mask)
    if beta == 1.0:
        return kl(lq, lp, mask)
    lm = log_mix(lp, lq, mask, beta)
    return beta * kl(lp, lm, mask) + (1.0 - beta) * kl(lq, lm, mask)


def tvd(lp, lq, mask, **_):
    """Total variation distance 1/2 sum |p - q|."""
    p = torch.where(mask, lp, float("-inf")).exp()
    q = torch.where(mask, lq, float("-inf")).exp()
    return 0.5 * (p - q).abs().sum(-1)


def skl(lp, lq, mask, skew: float = 0.1, **_):
    """Skew forward KL(P || a P + (1 - a) Q)."""
    return kl(lp, log_mix(lp, lq, mask, skew), mask)


def srkl(lp, lq, mask, skew: float = 0.1, **_):
    """Skew reverse KL(Q || a Q + (1 - a) P)."""
    return kl(lq, log_mix(lq, lp, mask, skew), mask)


DIVERGENCES = {"fkl": fkl, "rkl": rkl, "jsd": jsd, "tvd": tvd, "skl": skl, "srkl": srkl}
assert tuple(DIVERGENCES) == BASES  # the CLI's choices come from names.BASES


def divergence(name: str, lp, lq, mask, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """D_name(P, Q) per row."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name](lp, lq, mask, beta=beta, skew=skew)
