"""Losses across tokenizers (issue 32): chunk likelihood matching (ALM, Minixhofer, Vulić,
Ponti, arXiv 2503.20083). Teacher and student tokenize the same bytes differently; the
loader cuts both into chunks that cover the same bytes (train/align.py), and a chunk's
likelihood is the product of its realised tokens' probabilities on each side:

    l_T(c) = sum_{t in c} log p_T(y_t)      (the cache's target log-probs: exact)
    l_S(c) = sum_{u in c} log q(z_u)        (the student's log-probs of its own tokens)

ALM's default binarised f-divergence is the binary cross-entropy between the chunk
probabilities, each raised to 1/tau (tau scales the chunk log-likelihood, not the logits,
as tokenkit does):

    s_T = exp(l_T / tau),  s_S = exp(l_S / tau)
    alm(c) = -[s_T log s_S + (1 - s_T) log(1 - s_S)]

Its minimum over the student is the binary entropy of s_T, not 0. With one tokenizer every
chunk is one token and, at tau = 1, alm = ATKD's TKD (the binary KL between [p(g), 1 - p(g)]
and [q(g), 1 - q(g)]) plus the teacher's binary entropy: tests/test_crosstok.py checks that
identity against the single-tokenizer loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atkd_cache.losses.kd import LossOutput
from atkd_cache.losses.sampled import log1mexp


def chunk_sums(values: torch.Tensor, chunk_of: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Sum per-token values [N] into chunks: chunk_of [N] gives each token's chunk index."""
    out = torch.zeros(n_chunks, dtype=values.dtype, device=values.device)
    return out.index_add(0, chunk_of, values)


def alm_loss(student_ll: torch.Tensor, teacher_ll: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over chunks of the binary cross-entropy between exp(l_T / tau) and
    exp(l_S / tau) (module docstring); chunk log-likelihoods [C] (the student's with its
    graph). In log space: log(1 - s) is log1mexp(l / tau), exact near s -> 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ls = student_ll / temperature
    lt = (teacher_ll / temperature).to(ls.dtype).clamp(max=0.0)
    s_t = lt.exp()
    # A confident side rounds to probability 1: the teacher's (1 - s_T) = 0 takes no part
    # (not 0 x -inf), and the student's chunk probability is kept one float eps below 1 in
    # log(1 - s_S) (at exactly 1 the loss is +inf and its gradient NaN).
    eps = torch.finfo(ls.dtype).eps
    rest = torch.where(s_t < 1, (1 - s_t) * log1mexp(ls.clamp(max=-eps)), 0.0)
    per_chunk = -(s_t * ls + rest)
    return per_chunk.mean() if per_chunk.numel() else ls.sum() * 0


# ------------------------------------------ ULD and GOLD at each chunk's first position
#
# Where a chunk starts, teacher and student predict the same bytes from the same text, each
# over its own vocabulary. The cache holds the teacher's target (the token that starts the
# chunk) and top-k there; the teacher's support is (target, top-k) plus one tail bucket.


def _sorted_desc(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x, dim=-1, descending=True).values


def uld_terms(lq: torch.Tensor, lp_support: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al., arXiv 2402.12030) per chunk: the L1
    distance between the sorted probability vectors, the teacher's being its support's
    masses and the tail bucket (zeros beyond), the student's its whole distribution.
    lq [C, V] student log-probs; lp_support [C, S], valid [C, S] the teacher's. Past the
    teacher's S + 1 entries the distance is the student's remaining mass, 1 - its top S + 1."""
    p = torch.where(valid, lp_support.to(lq.dtype).exp(), 0.0)
    tail = (1.0 - p.sum(-1, keepdim=True)).clamp(min=0.0)
    pt = _sorted_desc(torch.cat([p, tail], dim=-1))
    q_top = torch.topk(lq.exp(), pt.shape[-1], dim=-1).values  # sorted, descending
    return (pt - q_top).abs().sum(-1) + (1.0 - q_top.sum(-1)).clamp(min=0.0)


def _first_occurrence(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask, with a column dropped when an earlier masked column of its row has its id (two
    teacher ids of the same bytes map to one student id: count its mass once)."""
    same = ids[:, :, None] == ids[:, None, :]  # [C, S, S]
    earlier = torch.tril(torch.ones_like(same[0]), diagonal=-1)  # [j, i]: i before j
    return mask & ~(same & earlier & mask[:, None, :]).any(-1)


def gold_terms(lq: torch.Tensor, lp_support: torch.Tensor, valid: torch.Tensor,
               student_ids: torch.Tensor, base: str = "fkl", **opts) -> torch.Tensor:
    """GOLD's hybrid per chunk (TRL's GOLD trainer, here over the cached top-k): the teacher
    support ids whose bytes are a student token (student_ids ≥ 0) are matched; the KD base
    over the matched columns plus one bucket each side for everything else (with every id
    matched: exactly the single-tokenizer KD over the bucketed top-k); plus the sorted L1
    distance between the u unmatched teacher masses and the student's u largest masses
    outside the matched ids."""
    from atkd_cache.losses.divergences import divergence

    work = lq.dtype
    matched = _first_occurrence(student_ids, valid & (student_ids >= 0))
    sid = student_ids.clamp(min=0)
    lp = lp_support.to(work)
    neg_inf = torch.tensor(float("-inf"), dtype=work, device=lq.device)
    lp_cols = torch.where(matched, lp, neg_inf)
    lq_cols = torch.where(matched, lq.gather(1, sid), neg_inf)
    hit = torch.zeros(lq.shape, dtype=torch.int32, device=lq.device)
    hit = hit.scatter_add(1, sid, matched.to(torch.int32)) > 0  # [C, V] matched student ids
    lq_rest = torch.logsumexp(lq.masked_fill(hit, float("-inf")), dim=-1)
    covered = torch.where(matched, lp.double().exp(), 0.0).sum(-1).clamp(max=1.0)
    lp_rest = torch.log1p(-covered).to(work)
    rest_valid = torch.isfinite(lq_rest) & torch.isfinite(lp_rest)
    kd = divergence(base, torch.cat([lp_cols, lp_rest[:, None]], 1),
                    torch.cat([lq_cols, lq_rest[:, None]], 1),
                    torch.cat([matched, rest_valid[:, None]], 1), **opts)
    unmatched = valid & ~matched & (student_ids < 0)
    n_u = unmatched.sum(-1, keepdim=True)
    p_u = _sorted_desc(torch.where(unmatched, lp.exp(), 0.0))
    q_u = torch.topk(lq.exp().masked_fill(hit, 0.0), p_u.shape[-1], dim=-1).values
    first_u = torch.arange(p_u.shape[-1], device=lq.device)[None, :] < n_u
    return kd + torch.where(first_u, (p_u - q_u).abs(), 0.0).sum(-1)


# ------------------------------------------------------------------------ one entry point


@dataclass
class ChunkTeacher:
    """What a cross-tokenizer micro-batch holds (train/align.py, loader.collate_aligned):
    per student row its next token and counted chunk; per chunk the teacher's chunk
    log-likelihood, the row its first student token is predicted at, and the teacher's
    support there (target + top-k, mapped to student ids; -1 = no student token has those
    bytes)."""

    target_ids: torch.Tensor  # [N] the student's next token at each row
    chunk_of_row: torch.Tensor  # [N]
    teacher_ll: torch.Tensor  # [C]
    first_row: torch.Tensor  # [C]
    support_logprobs: torch.Tensor | None = None  # [C, 1 + k]: target, top-k
    support_valid: torch.Tensor | None = None  # [C, 1 + k]: a top-k id equal to the target is not
    support_student_ids: torch.Tensor | None = None  # [C, 1 + k]


def chunk_terms(lq: torch.Tensor, teacher: ChunkTeacher, cfg,
                chunks: torch.Tensor | None = None) -> torch.Tensor:
    """The uld or gold term of each chunk (or of the chunk indices `chunks`) from the
    student's log-probs lq [C, V] at the chunks' first rows."""
    mode = cfg.cross_tokenizer
    if teacher.support_logprobs is None:
        raise ValueError(f"{mode} needs the teacher's top-k at each chunk (a top-k cache)")
    lp, valid, sids = teacher.support_logprobs, teacher.support_valid, teacher.support_student_ids
    if chunks is not None:
        lp, valid, sids = lp[chunks], valid[chunks], sids[chunks]
    if mode == "uld":
        return uld_terms(lq, lp, valid)
    return gold_terms(lq, lp, valid, sids, cfg.base, beta=cfg.beta, skew=cfg.skew)


def combine_chunks(target_lp: torch.Tensor, per_chunk: torch.Tensor | None,
                   teacher: ChunkTeacher, cfg) -> LossOutput:
    """The loss from what it depends on: each row's log-prob of its own next token [N], and
    for uld and gold each chunk's term [C] (None for alm and ce): the mean over counted
    chunks of the mode's term, plus cfg.ce_weight x the CE on the student's tokens."""
    n_chunks = int(teacher.teacher_ll.shape[0])
    ce = -target_lp.mean() if target_lp.numel() else target_lp.sum() * 0
    mode = cfg.cross_tokenizer
    if n_chunks == 0:
        term = target_lp.sum() * 0
    elif mode == "ce":
        term = ce
    elif mode == "alm":
        student_ll = chunk_sums(target_lp, teacher.chunk_of_row, n_chunks)
        term = alm_loss(student_ll, teacher.teacher_ll, cfg.chunk_temperature)
    else:
        term = per_chunk.mean()
    loss = term + cfg.ce_weight * ce if cfg.ce_weight and mode != "ce" else term
    parts = {mode: term.detach(), "ce": ce.detach(), "loss": loss.detach(),
             "tokens": torch.tensor(float(target_lp.numel())),
             "chunks": torch.tensor(float(n_chunks))}
    return LossOutput(loss=loss, parts=parts)


def needs_rows(cfg) -> bool:
    """Does the mode read the student's whole distribution at each chunk's first row?"""
    return cfg.cross_tokenizer in ("uld", "gold")


def crosstok_loss(logits: torch.Tensor, teacher: ChunkTeacher, cfg) -> LossOutput:
    """The cross-tokenizer loss (cfg.cross_tokenizer: alm | uld | gold | ce) over the student's
    rows [N, V]: the mean over counted chunks of the mode's term, plus cfg.ce_weight x the
    student's CE on its own tokens of those chunks (formulas: docs/losses.md section 9).
    losses/fused.py computes the same without the [N, V] logits."""
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(work)
    target_lp = z.gather(1, teacher.target_ids[:, None]).squeeze(1) - torch.logsumexp(z, -1)
    per_chunk = None
    if needs_rows(cfg) and teacher.teacher_ll.numel():
        per_chunk = chunk_terms(torch.log_softmax(z[teacher.first_row], dim=-1), teacher, cfg)
    return combine_chunks(target_lp, per_chunk, teacher, cfg)
