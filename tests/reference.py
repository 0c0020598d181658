"""Plain dense float64 references, written straight from the formulas over the full vocabulary
(DESIGN §3-§4), sharing no code with atkd_cache.losses."""

from __future__ import annotations

import torch


def d_fkl(p, q):
    return (p * (torch.log(p) - torch.log(q))).nan_to_num().sum(-1)


def d_rkl(p, q):
    return d_fkl(q, p)


def d_jsd(p, q, beta=0.5):
    if beta == 0:
        return d_fkl(p, q)
    if beta == 1:
        return d_fkl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * d_fkl(p, m) + (1 - beta) * d_fkl(q, m)


def d_tvd(p, q):
    return 0.5 * (p - q).abs().sum(-1)


def d_skl(p, q, a=0.1):
    return d_fkl(p, a * p + (1 - a) * q)


def d_srkl(p, q, a=0.1):
    return d_fkl(q, a * q + (1 - a) * p)


DENSE = {"fkl": d_fkl, "rkl": d_rkl, "jsd": d_jsd, "tvd": d_tvd, "skl": d_skl, "srkl": d_srkl}


def decompose(p, q, g):
    """Binary target distributions and renormalised non-target distributions."""
    pg = p.gather(1, g[:, None])
    qg = q.gather(1, g[:, None])
    bp = torch.cat([pg, 1 - pg], 1)
    bq = torch.cat([qg, 1 - qg], 1)
    keep = torch.ones_like(p, dtype=torch.bool).scatter_(1, g[:, None], False)
    n, v = p.shape
    ph = p[keep].view(n, v - 1) / (1 - pg)
    qh = q[keep].view(n, v - 1) / (1 - qg)
    return bp, bq, ph, qh


def dense_atkd(logits, teacher_logp, targets, hard, base="fkl", alpha=0.2):
    """L = alpha mean_easy(DKD) + (1 - alpha) mean_hard(TKD + DKD), empty group -> 0."""
    p = teacher_logp.exp()
    q = torch.softmax(logits, -1)
    bp, bq, ph, qh = decompose(p, q, targets)
    tkd = DENSE[base](bp, bq)
    dkd = DENSE[base](ph, qh)
    easy = ~hard
    le = dkd[easy].mean() if easy.any() else torch.zeros((), dtype=logits.dtype)
    lh = (tkd + dkd)[hard].mean() if hard.any() else torch.zeros((), dtype=logits.dtype)
    return alpha * le + (1 - alpha) * lh, tkd, dkd


def dense_kd(logits, teacher_logp, base="fkl"):
    return DENSE[base](teacher_logp.exp(), torch.softmax(logits, -1)).mean()
