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

import torch

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
    lt = (teacher_ll / temperature).to(ls.dtype)
    s_t = lt.exp()
    per_chunk = -(s_t * ls + (1 - s_t) * log1mexp(ls))
    return per_chunk.mean() if per_chunk.numel() else ls.sum() * 0
