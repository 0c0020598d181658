"""Teacher and student as distributions over a small support plus one tail bucket (DESIGN §4).

Columns of every bucketed row: 0 = the target y_t, 1..k = the teacher's top-k ids (a top-k
column equal to the target is marked invalid, so no id appears twice among valid columns),
k+1 = the tail (every other id). `valid` marks columns that take part.

The student side is a custom autograd function over the full logits: its forward computes,
one chunk of rows at a time in float32, log q on the support and log of the tail mass by a
masked sum of exp(z - max) over the non-support ids (never as 1 - sum); its backward
recomputes exp(z - max) per chunk and writes d loss / d logits directly. Nothing of size
[N, V] is kept between forward and backward except the logits themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atkd_cache.losses.names import TAILS

# float32 elements upcast at once (4 MiB): one reused, cache-resident buffer, so the loss
# streams the logits once per pass direction and adds no [N, V] allocation but the gradient.
CHUNK_ELEMENTS = 1 << 20


def _chunk_rows(n_cols: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, CHUNK_ELEMENTS // max(1, n_cols))


def _upcast_chunks(logits: torch.Tensor, rows: int, work: torch.dtype):
    """Yield (lo, hi, e): rows lo..hi of the logits copied into one reused `work` buffer."""
    n, v = logits.shape
    buf = torch.empty(min(n, rows), v, dtype=work, device=logits.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        e = buf[: hi - lo]
        e.copy_(logits[lo:hi])
        yield lo, hi, e


class _SupportLogProbs(torch.autograd.Function):
    """(logits [N, V], ids [N, S], valid [N, S]) -> (log q at ids [N, S], log q(tail) [N]).

    Contract: valid columns hold distinct ids; an invalid column repeats a valid column's id.
    The tail is every id not among the row's ids. All math in float32 (float64 if the logits
    are float64); outputs are float32/float64."""

    @staticmethod
    def forward(ctx, logits, ids, valid, chunk_rows):
        n, v = logits.shape
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lq = torch.empty(ids.shape, dtype=work, device=logits.device)
        lq_tail = torch.empty(n, dtype=work, device=logits.device)
        row_max = torch.empty(n, dtype=work, device=logits.device)
        log_sum = torch.empty(n, dtype=work, device=logits.device)
        log_tail = torch.empty(n, dtype=work, device=logits.device)
        rows = _chunk_rows(v, chunk_rows)
        for lo, hi, e in _upcast_chunks(logits, rows, work):
            m = e.amax(-1, keepdim=True).clamp_(min=torch.finfo(work).min)
            z_support = e.gather(1, ids[lo:hi]) - m
            e.sub_(m).exp_()
            s = e.sum(-1)
            e.scatter_(1, ids[lo:hi], 0.0)  # drop the support: what is left is the tail
            s_tail = e.sum(-1)
            row_max[lo:hi], log_sum[lo:hi], log_tail[lo:hi] = m.squeeze(1), s.log(), s_tail.log()
            lq[lo:hi] = z_support - log_sum[lo:hi, None]
            lq_tail[lo:hi] = log_tail[lo:hi] - log_sum[lo:hi]
        ctx.save_for_backward(logits, ids, valid, row_max, log_sum, log_tail)
        ctx.chunk_rows = rows
        return lq, lq_tail

    @staticmethod
    def backward(ctx, g_support, g_tail):
        logits, ids, valid, row_max, log_sum, log_tail = ctx.saved_tensors
        work = row_max.dtype
        grad = torch.empty_like(logits)
        g_support = g_support.to(work)
        g_tail = g_tail.to(work)
        # d log q_i / dz_j = [j = id_i] - q_j;  d log q_tail / dz_j = [j in tail] e_j/S_t - q_j
        total = g_support.sum(-1) + g_tail
        tail_coef = torch.where(torch.isfinite(log_tail), g_tail * torch.exp(-log_tail), 0.0)
        inv_s = torch.exp(-log_sum)
        for lo, hi, e in _upcast_chunks(logits, ctx.chunk_rows, work):
            e.sub_(row_max[lo:hi, None]).exp_()  # e_j = exp(z_j - max)
            e_support = e.gather(1, ids[lo:hi])
            coef = tail_coef[lo:hi] - total[lo:hi] * inv_s[lo:hi]
            correction = g_support[lo:hi] - torch.where(
                valid[lo:hi], tail_coef[lo:hi, None] * e_support, 0.0
            )
            e.mul_(coef[:, None]).scatter_add_(1, ids[lo:hi], correction)
            grad[lo:hi].copy_(e)
        return grad, None, None, None


def student_support_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log q at `ids` [N, S] and log q of the tail [N] (-inf when the tail is empty)."""
    return _SupportLogProbs.apply(logits, ids, valid, chunk_rows)


@dataclass
class BucketedPair:
    """Teacher and student log-probs over the same columns (target, top-k, tail)."""

    teacher: torch.Tensor  # [N, C] log p (-inf where the mass is 0)
    student: torch.Tensor  # [N, C] log q
    valid: torch.Tensor  # [N, C] bool


def support_columns(
    topk_ids: torch.Tensor, target_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, k+1] = (target, top-k) and validity (a top-k id equal to the target is invalid)."""
    ids = torch.cat([target_ids[:, None], topk_ids], dim=1).long()
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 1:] = topk_ids != target_ids[:, None]
    return ids, valid


def bucketize(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprob: torch.Tensor,
    tail: str = "bucket",
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> BucketedPair:
    """Bucketed teacher and student distributions for N positions.

    tail="bucket": columns (target, top-k, tail) with the tail's mass 1 - sum(support);
    tail="renorm": both renormalised over the support, no tail column.
    temperature tau != 1 re-tempers the teacher on the support: p_i^(1/tau), and the tail
    bucket treated as one token, r^(1/tau); then renormalised (an approximation, docs).
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be 'bucket' or 'renorm', got {tail!r}")
    ids, valid = support_columns(topk_ids, target_ids)
    lq_support, lq_tail = student_support_logprobs(logits, ids, valid, chunk_rows)
    work = lq_support.dtype
    neg_inf = torch.tensor(float("-inf"), dtype=work, device=logits.device)
    lp_support = torch.cat([target_logprob[:, None], topk_logprobs], dim=1).to(work)
    lp_support = torch.where(valid, lp_support, neg_inf)
    lq_support = torch.where(valid, lq_support, neg_inf)
    tail_exists = torch.isfinite(lq_tail)  # false when the support covers the vocabulary
    if tail == "bucket":
        covered = torch.exp(torch.logsumexp(lp_support.double(), dim=1)).clamp(max=1.0)
        lp_tail = torch.log1p(-covered).to(work)  # the teacher's cached tail: 1 - sum
        lp_tail = torch.where(tail_exists, lp_tail, neg_inf)
        # A softmax tail is never empty, but a confident teacher's rounded log-probs can sum
        # to 1: the tail column then takes no part (a zero teacher mass where the student has
        # some would make reverse KL and its gradient inf; forward KL ignores it anyway).
        tail_valid = tail_exists & torch.isfinite(lp_tail)
        teacher = torch.cat([lp_support, lp_tail[:, None]], dim=1)
        student = torch.cat([lq_support, lq_tail[:, None]], dim=1)
        valid = torch.cat([valid, tail_valid[:, None]], dim=1)
    else:
        teacher = lp_support - torch.logsumexp(lp_support, dim=1, keepdim=True)
        student = lq_support - torch.logsumexp(lq_support, dim=1, keepdim=True)
    if temperature != 1.0:
        teacher = teacher / temperature
        teacher = teacher - torch.logsumexp(teacher, dim=1, keepdim=True)
    return BucketedPair(teacher=teacher, student=student, valid=valid)
