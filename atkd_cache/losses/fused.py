"""The LM head fused with the KD loss: the student's [N, V] logits never exist (docs/losses.md §6).

Every loss `kd_loss` offers is linear in its per-row terms with weights that depend on the
teacher only (kd.term_weights: the easy/hard split is the teacher's, the group sizes are
known before the student runs). So for N supervised rows with final hidden states h [N, H]
and an LM head W [V, H] (+ bias b), the loss and its gradients come one chunk of rows at a
time:

    z_c = h_c W^T (+ b)          (soft-capped like the model when it says so)
    terms_c = row_terms(z_c)     the same code as the unfused path (bucketed, sampled ...)
    g_c = d (sum_rows weight * terms_c) / d z_c
    dh_c = g_c W,   dW += g_c^T h_c,   db += sum_rows g_c

Peak extra memory is one chunk of logits and its gradient ([chunk, V] each) plus dW (the size
of W, which its .grad needs anyway; scaled in place in backward, never copied), instead of
[N, V] logits, their float32 copy and their gradient. As in Liger-Kernel's fused-linear
losses, the gradients are computed during the forward pass and only scaled in backward (the
loss is a scalar).

The cross-tokenizer losses (losses/crosstok.py) go through the same pass: they depend on
the student only through each row's log-prob of its own next token and each chunk's term at
its first row, so their derivatives there are taken first and the pass back-propagates the
loss's linearisation (fused_crosstok_loss).
"""

from __future__ import annotations

import dataclasses

import torch

from atkd_cache.losses.crosstok import ChunkTeacher, chunk_terms, combine_chunks, needs_rows
from atkd_cache.losses.kd import (
    LossConfig,
    LossOutput,
    SparseTeacher,
    combine,
    row_groups,
    row_terms,
    term_weights,
)

# Rows per chunk: enough for an efficient matmul (at least MIN_CHUNK_ROWS), otherwise about
# CHUNK_ELEMENTS logits (32 MiB in float32). Measured on these CPUs (benchmarks/bench_fused.py,
# V = 151,936, H = 576, N = 4,096): 55 rows 21.3 s / 789 MB extra, 256 rows 16.7 s / 810 MB,
# 512 rows 15.4 s / 1,260 MB; cross-entropy on full logits 23.0 s / 9,509 MB.
MIN_CHUNK_ROWS = 256
CHUNK_ELEMENTS = 1 << 23


def _rows_of(teacher: SparseTeacher, lo: int, hi: int) -> SparseTeacher:
    """The teacher rows lo..hi (every per-row tensor sliced)."""
    return dataclasses.replace(teacher, **{
        f.name: getattr(teacher, f.name)[lo:hi] for f in dataclasses.fields(teacher)
        if isinstance(getattr(teacher, f.name), torch.Tensor)
    })


def head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    """What the model's LM head computes from hidden states (Gemma-style soft-capping too)."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    return torch.tanh(z / softcap) * softcap if softcap else z


class _FusedHead(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None) -> (loss, per-row terms [N, T]).

    Non-tensor arguments: `objective(logits [n, V], lo, hi) -> (loss of rows lo..hi, their
    terms [n, T])` (a loss that is a sum over rows of terms of each row's logits alone), T,
    the soft-cap and the chunk rows. The second output is detached (for the logged parts)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, objective, n_terms, softcap, rows):
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
        terms = torch.zeros(n, n_terms, dtype=acc, device=hidden.device)
        loss = torch.zeros((), dtype=terms.dtype, device=hidden.device)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            h = hidden[lo:hi].detach()
            with torch.enable_grad():
                z = torch.nn.functional.linear(h, weight.detach(),
                                               None if bias is None else bias.detach())
                z = z.detach().requires_grad_()
                capped = torch.tanh(z / softcap) * softcap if softcap else z
                total, chunk = objective(capped, lo, hi)
                (g,) = torch.autograd.grad(total, z)
            g = g.to(grad_w.dtype)
            grad_h[lo:hi] = (g @ weight.to(g.dtype)).to(hidden.dtype)
            grad_w.addmm_(g.T, h.to(g.dtype))  # in place: no [V, H] temporary per chunk
            if grad_b is not None:
                grad_b += g.sum(0)
            loss += total.detach().to(loss.dtype)
            terms[lo:hi] = chunk.detach()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        ctx.used = False
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        # Scaled in place: a scaled copy of dW would double the peak memory of the head's
        # gradient. So this function can be differentiated once (no retain_graph reuse).
        if ctx.used:
            raise RuntimeError("the fused LM head + loss supports one backward pass per forward")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        for grad in (grad_h, grad_w, grad_b):
            if grad is not None:
                grad.mul_(grad_loss.to(grad.dtype))
        return grad_h, grad_w, grad_b, None, None, None, None


@torch.no_grad()
def target_logprobs(hidden, weight, bias, softcap, target_ids, rows: int) -> torch.Tensor:
    """log q(target) of every row, one chunk of logits at a time (no graph)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32 if hidden.dtype != torch.float64
                      else torch.float64, device=hidden.device)
    for lo in range(0, hidden.shape[0], rows):
        z = head_logits(hidden[lo:lo + rows], weight, bias, softcap).to(out.dtype)
        out[lo:lo + rows] = (z.gather(1, target_ids[lo:lo + rows, None])[:, 0]
                             - torch.logsumexp(z, dim=-1))
    return out


def fused_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: SparseTeacher,
    cfg: LossConfig | None = None,
    bias: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    group_offsets: torch.Tensor | list[int] | None = None,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> LossOutput:
    """`kd_loss(head_logits(hidden, weight, bias, softcap), teacher, cfg, ...)` without the
    [N, V] logits: same value and parts, same gradients for hidden, weight and bias."""
    cfg = cfg or LossConfig()
    cfg.check()
    n, v = hidden.shape[0], weight.shape[0]
    work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = chunk_rows or max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, v))
    lq = None
    if cfg.loss == "rkl-tokens":  # its row weights need log q(y_t) first: one pass, no grad
        lq = target_logprobs(hidden, weight, bias, softcap, teacher.target_ids, rows)
    groups = row_groups(teacher, cfg, n, work, row_mask, group_offsets, student_logprob=lq)
    weights = term_weights(groups, cfg)
    names = {"ce": ["ce"], "kd": ["ce", cfg.base], "atkd": ["ce", "tkd", "dkd"],
             "rkl-tokens": ["ce"]}[cfg.loss]

    def objective(logits, lo, hi):
        chunk = row_terms(logits, _rows_of(teacher, lo, hi), cfg)
        total = sum((weights[k][lo:hi] * chunk[k]).sum() for k in weights)
        return total, torch.stack([chunk[k] for k in names], 1)

    loss, terms = _FusedHead.apply(hidden, weight, bias, objective, len(names), softcap, rows)
    out = combine({k: terms[:, j] for j, k in enumerate(names)}, groups, cfg)
    # the value from the group means (as kd_loss reports it), the gradient from the fused pass
    out.loss = loss + (out.loss - loss).detach()
    return out


def fused_crosstok_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: ChunkTeacher,
    cfg: LossConfig,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> LossOutput:
    """`crosstok_loss(head_logits(hidden, weight, bias, softcap), teacher, cfg)` without the
    [N, V] logits: same value and parts, same gradients.

    The loss is a function of each row's log-prob of its own next token and (uld, gold) of
    each chunk's term at its first row (crosstok.combine_chunks). Its derivatives with
    respect to those are taken first, at their values (ALM's are not constant: one pass over
    the rows for the target log-probs, no graph); the fused pass then back-propagates the
    linear loss sum_rows a_row log q(y_row) + sum_chunks b_c term_c, whose gradient is the
    loss's own."""
    n, v = hidden.shape[0], weight.shape[0]
    work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = chunk_rows or max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, v))
    n_chunks = int(teacher.teacher_ll.shape[0])
    by_rows = needs_rows(cfg) and n_chunks > 0  # (chunk_terms refuses a teacher without top-k)
    # Only ALM's weights depend on the values; the others are linear in both inputs.
    if cfg.cross_tokenizer == "alm":
        lq = target_logprobs(hidden, weight, bias, softcap, teacher.target_ids, rows).to(work)
    else:
        lq = torch.zeros(n, dtype=work, device=hidden.device)
    lq = lq.requires_grad_()
    chunk_term = torch.zeros(n_chunks, dtype=work, device=hidden.device, requires_grad=True)
    with torch.enable_grad():
        first = combine_chunks(lq, chunk_term if by_rows else None, teacher, cfg)
        a, b = torch.autograd.grad(first.loss, [lq, chunk_term], allow_unused=True)
    a = torch.zeros_like(lq) if a is None else a.detach()
    b = torch.zeros_like(chunk_term) if b is None else b.detach()

    def objective(logits, lo, hi):
        z = logits.to(work)
        lse = torch.logsumexp(z, dim=-1)
        target = z.gather(1, teacher.target_ids[lo:hi, None])[:, 0] - lse
        total = (a[lo:hi] * target).sum()
        term = torch.zeros_like(target)
        if by_rows:
            here = ((teacher.first_row >= lo) & (teacher.first_row < hi)).nonzero()[:, 0]
            if here.numel():
                at = teacher.first_row[here] - lo
                t = chunk_terms(z[at] - lse[at, None], teacher, cfg, chunks=here)
                total = total + (b[here] * t).sum()
                term = term.index_put((at,), t)
        return total, torch.stack([target, term], 1)

    total, terms = _FusedHead.apply(hidden, weight, bias, objective, 2, softcap, rows)
    out = combine_chunks(terms[:, 0].to(work), terms[teacher.first_row, 1].to(work)
                         if by_rows else None, teacher, cfg)
    out.loss = total + (out.loss - total).detach()
    return out
