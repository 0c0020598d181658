"""Several cached teachers of the same positions joined into one (docs/losses.md §7).

Teacher i holds, per position, the exact p_i(g) of the target g and p_i on its support A_i
(its top-k ids; for a sampled teacher, its drawn non-target ids carrying the self-normalised
estimate (1 - p_i(g)) c_j / sum_{l != g} c_l, the estimate its ATKD DKD uses). The rest of its
mass, r_i, lies on ids outside A_i: its tail. With per-position weights pi_i (sum 1) the
joined teacher is

    p(g) = sum_i pi_i p_i(g)                                  exact
    p(j) = sum_{i : j in A_i} pi_i p_i(j)    for j in the union of the A_i, j != g
    tail = sum_i pi_i r_i                    (what the bucket path computes as 1 - support)

The one approximation: teacher i's mass on an id that another teacher has in its support but
it has not is counted in the joined tail. That moves at most pi_i * min(r_i, m_i * p_i^(k))
per teacher into the tail (m_i such ids, p_i^(k) its smallest cached probability); with
k = V, or equal supports, the joined teacher is exactly the mixture.

The weights per `mix`:
    mixture        pi = the teacher weights, on every position;
    confident      pi one-hot on the teacher with the highest p_i(g) (the first on ties);
    route-by-hard  ATKD's split of the *mixture's* p(g) (per sequence, at the hard ratio)
                   routes each position: easy positions take the mixture, hard ones the
                   confident teacher.
The joined teacher is a top-k `SparseTeacher` whose easy/hard labels are ATKD's rule on its
own p(g) (route-by-hard: the routing split), so every loss, base and the fused head take it
unchanged. One teacher is returned as it is.
"""

from __future__ import annotations

import torch

from atkd_cache.losses.kd import SparseTeacher
from atkd_cache.losses.names import MIXES
from atkd_cache.losses.sampled import log1mexp
from atkd_cache.split import hard_labels_grouped

NEG_INF = float("-inf")


def normalise_weights(weights: list[float] | tuple[float, ...] | None, n: int) -> list[float]:
    """Teacher weights summing to 1 (uniform when None); ValueError on a wrong count or sign."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} teacher weights for {n} caches: give one per cache")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def teacher_support(t: SparseTeacher) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, c], log p [N, c] float64) of a teacher's non-target support; -inf marks a
    column that holds nothing (the target, padding, or a sampled row without draws off g)."""
    g = t.target_ids[:, None]
    if not t.sampled:
        lp = t.topk_logprobs.double()
        return t.topk_ids.long(), torch.where(t.topk_ids == g, NEG_INF, lp)
    ids = t.sample_ids.long()
    counts = t.sample_counts.double()
    off_target = (counts > 0) & (ids != g)
    counts = torch.where(off_target, counts, 0.0)
    total = counts.sum(1, keepdim=True)
    rest = log1mexp(t.target_logprob.double())[:, None]
    lp = rest + counts.log() - total.log()
    has = off_target & (total > 0)
    return torch.where(has, ids, g), torch.where(has, lp, NEG_INF)  # padding repeats g


def _weighted_logsumexp(lp: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """log sum_i pi_i exp(lp_i) over dim 0, shifted by the largest lp (not lp + log pi), so
    that equal lp_i with weights summing to 1 give back exactly lp; never above that max."""
    contributes = torch.isfinite(log_pi)
    top = torch.where(contributes, lp, NEG_INF).amax(0)
    shift = torch.where(torch.isfinite(top), top, 0.0)
    total = (torch.exp(lp - shift) * torch.exp(log_pi)).sum(0)
    return torch.minimum(shift + total.log(), top)


def _join_columns(ids, lp, log_pi, target_ids, lead_width):
    """Merge equal ids of the concatenated supports: ids/lp/log_pi [N, K] -> joined (ids,
    log p) [N, lead_width + E]. The lead teacher's columns keep their place (so one teacher,
    or identical ones, give back its own layout); the other teachers' new ids follow."""
    n, width = ids.shape
    sorted_ids, perm = torch.sort(ids, dim=1, stable=True)
    s_lp, s_log_pi = lp.gather(1, perm), log_pi.gather(1, perm)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = starts.long().cumsum(1) - 1  # group of each sorted column
    weighted = torch.isfinite(s_log_pi)
    top = torch.full((n, width), NEG_INF, dtype=lp.dtype, device=lp.device).scatter_reduce(
        1, group, torch.where(weighted, s_lp, NEG_INF), "amax")
    shift = torch.where(torch.isfinite(top), top, 0.0)
    terms = torch.where(weighted, torch.exp(s_lp - shift.gather(1, group) + s_log_pi), 0.0)
    total = torch.zeros_like(top).scatter_add(1, group, terms)
    mass = torch.minimum(shift + total.log(), top)  # [N, groups], -inf for no mass
    in_support = torch.zeros_like(top, dtype=torch.uint8).scatter_reduce(
        1, group, weighted.to(torch.uint8), "amax").bool()
    # each group's first column in the original order (the sort is stable) represents it
    rep = torch.zeros((n, width), dtype=torch.bool, device=ids.device)
    rep.scatter_(1, perm, starts)
    where_group = torch.empty_like(group).scatter_(1, perm, group)
    out_lp = mass.gather(1, where_group)
    keep = rep & in_support.gather(1, where_group) & (ids != target_ids[:, None])
    out_ids = torch.where(keep, ids, target_ids[:, None])  # a dropped column repeats g
    out_lp = torch.where(keep, out_lp, NEG_INF)
    lead_ids, lead_lp = out_ids[:, :lead_width], out_lp[:, :lead_width]
    extra_keep = keep[:, lead_width:]
    extra = int(extra_keep.sum(1).max()) if extra_keep.numel() else 0
    if extra == 0:
        return lead_ids, lead_lp
    order = torch.sort((~extra_keep).to(torch.int8), dim=1, stable=True).indices[:, :extra]
    return (torch.cat([lead_ids, out_ids[:, lead_width:].gather(1, order)], 1),
            torch.cat([lead_lp, out_lp[:, lead_width:].gather(1, order)], 1))


def _labels(target_logprob: torch.Tensor, hard_ratio: float, group_offsets) -> torch.Tensor:
    """ATKD's per-sequence rule on -log p(g), exactly as dump-teacher labels a cache."""
    score = -target_logprob.float()
    offsets = group_offsets if group_offsets is not None else [0, score.shape[0]]
    return hard_labels_grouped(score, offsets, hard_ratio)


def join_teachers(
    teachers: list[SparseTeacher],
    weights: list[float] | tuple[float, ...] | None = None,
    mix: str = "mixture",
    hard_ratio: float = 0.5,
    group_offsets: torch.Tensor | list[int] | None = None,
) -> SparseTeacher:
    """One teacher from several over the same rows (module docstring). `group_offsets`
    delimits the sequences for the easy/hard labels (None: the rows are one sequence)."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
    if len(teachers) == 1:
        return teachers[0]
    target_ids = teachers[0].target_ids
    for t in teachers[1:]:
        if not torch.equal(t.target_ids, target_ids):
            raise ValueError("the teachers' rows hold different target tokens: they are not "
                             "caches of the same sequences")
    pi = normalise_weights(weights, len(teachers))
    lp_g = torch.stack([t.target_logprob.double() for t in teachers])  # [T, N]
    log_w = torch.tensor(pi, dtype=torch.float64, device=lp_g.device).log()[:, None]
    log_w = log_w.expand_as(lp_g)
    mixture_g = _weighted_logsumexp(lp_g, log_w)
    best = lp_g.argmax(0)  # the first maximum on ties
    one_hot = torch.where(
        torch.arange(len(teachers), device=lp_g.device)[:, None] == best, 0.0, NEG_INF)
    routed = None
    if mix == "mixture":
        log_pi = log_w
    elif mix == "confident":
        log_pi = one_hot
    else:
        routed = _labels(mixture_g, hard_ratio, group_offsets)
        log_pi = torch.where(routed, one_hot, log_w)
    joined_g = mixture_g if mix == "mixture" else _weighted_logsumexp(lp_g, log_pi)
    supports = [teacher_support(t) for t in teachers]
    ids = torch.cat([s[0] for s in supports], 1)
    lp = torch.cat([s[1] for s in supports], 1)
    col_pi = torch.cat([log_pi[i][:, None].expand_as(s[1]) for i, s in enumerate(supports)], 1)
    join_ids, join_lp = _join_columns(ids, lp, col_pi, target_ids, supports[0][0].shape[1])
    dtype = teachers[0].target_logprob.dtype  # float32 from caches; float64 in tests
    for t in teachers[1:]:
        dtype = torch.promote_types(dtype, t.target_logprob.dtype)
    target_logprob = joined_g.to(dtype)
    hard = routed if routed is not None else _labels(target_logprob, hard_ratio, group_offsets)
    return SparseTeacher(
        topk_ids=join_ids, topk_logprobs=join_lp.to(dtype), target_ids=target_ids,
        target_logprob=target_logprob, hard=hard,
        uncertainty=-torch.expm1(target_logprob),
    )
