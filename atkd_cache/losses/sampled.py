"""Per-position loss terms against a *sampled* teacher (docs/losses.md §6).

A sampled cache holds, per position, S draws from the teacher's full distribution p at
temperature 1 as unique ids j with counts c_j (sum c_j = S), plus the exact log p(target),
the exact entropy H(p) and the target g. With empirical weights w_j = c_j / S (E[w_j] = p_j):

    forward KL   KL(p || q) = -H(p) - sum_j p_j log q_j  ~  -H(p) - sum_j w_j log q_j
                 (unbiased value and gradient; exact when w = p)
    TKD          KL([p_g, 1-p_g] || [q_g, 1-q_g])   exact: p_g is cached, q is the full softmax
    DKD          KL(p^ || q^) over the non-target ids  ~  -H(p^) - sum_{j != g} w^_j log q^_j
                 with w^ = the non-target draws renormalised (self-normalised: consistent, bias
                 O(1/S)), q^_j = q_j / (1 - q_g), and H(p^) exact from the chain rule
                 H(p) = h(p_g) + (1 - p_g) H(p^), h the binary entropy. A position whose draws
                 all hit the target has no DKD estimate: its DKD is 0.
The student side reuses the support log-prob function of the top-k path: columns are
(target, sampled ids); padding columns repeat the target and are invalid.
"""

from __future__ import annotations

import torch

from atkd_cache.losses.bucket import student_support_logprobs


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (-inf at x = 0)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def _student_columns(logits, sample_ids, sample_counts, target_ids, chunk_rows):
    ids = torch.cat([target_ids[:, None], sample_ids], dim=1).long()
    counts = sample_counts.to(torch.float64)
    nontarget = (counts > 0) & (sample_ids != target_ids[:, None])
    valid = torch.cat([torch.ones_like(nontarget[:, :1]), nontarget], dim=1)
    ids = torch.where(valid, ids, target_ids[:, None].long())  # contract: repeat a valid id
    lq, lq_tail = student_support_logprobs(logits, ids, valid, chunk_rows)
    return lq, lq_tail, counts, nontarget


def sampled_terms(
    logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprob: torch.Tensor,
    entropy: torch.Tensor,
    want: str,
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row terms [N] for `want` = "ce" | "fkl" | "atkd": always "ce" (= -log q(target));
    "fkl" the forward-KL estimate; "tkd" and "dkd" for ATKD."""
    lq, lq_tail, counts, nontarget = _student_columns(
        logits, sample_ids, sample_counts, target_ids, chunk_rows
    )
    work = lq.dtype
    out = {"ce": -lq[:, 0]}
    if want == "ce":
        return out
    total = counts.sum(1).clamp(min=1.0)
    lq_rest = lq[:, 1:]
    zero = torch.zeros((), dtype=work, device=lq.device)
    if want == "fkl":
        on_target = (counts * (sample_ids == target_ids[:, None])).sum(1)
        w = torch.where(nontarget, counts / total[:, None], 0.0).to(work)
        cross = (on_target / total).to(work) * lq[:, 0] + torch.where(nontarget, w * lq_rest,
                                                                      zero).sum(1)
        out["fkl"] = -entropy.to(work) - cross
        return out
    # ATKD parts
    lp_g = target_logprob.to(torch.float64)
    rest_g = -torch.expm1(lp_g)  # 1 - p_g
    log_rest_p = log1mexp(lp_g)
    log_rest_q = torch.logsumexp(
        torch.cat([torch.where(nontarget, lq_rest, float("-inf")), lq_tail[:, None]], dim=1),
        dim=1,
    )
    p_g = torch.exp(lp_g)
    has_rest = rest_g > 0
    tkd = p_g.to(work) * (lp_g.to(work) - lq[:, 0]) + torch.where(
        has_rest, rest_g.to(work) * (log_rest_p.to(work) - log_rest_q), zero
    )
    c_rest = torch.where(nontarget, counts, 0.0)
    n_rest = c_rest.sum(1)
    w_hat = (c_rest / n_rest.clamp(min=1.0)[:, None]).to(work)
    cross = torch.where(nontarget, w_hat * (lq_rest - log_rest_q[:, None]), zero).sum(1)
    # H(p^) = (H(p) - h(p_g)) / (1 - p_g); only a value (no gradient flows through it)
    h_g = -p_g * lp_g - torch.where(has_rest, rest_g * log_rest_p, 0.0)
    h_rest = ((entropy.double() - h_g) / rest_g.clamp(min=1e-300)).clamp(min=0.0)
    dkd = torch.where(n_rest > 0, -h_rest.to(work) - cross, zero)
    out.update(tkd=tkd, dkd=dkd)
    return out
