"""The per-token reverse-KL estimator of on-policy distillation (docs/losses.md §8).

The cache holds replies the *student* wrote (the behaviour policy mu: the checkpoint that
sampled them) and the teacher's log-prob p of each sampled token; nothing of the teacher's
distribution beyond it is needed. For one reply y_1..y_T and the student q being trained:

    d_t   = log q(y_t | y_<t) - log p(y_t | y_<t)           the per-token term (detached)
    G_t   = sum_{s >= t} gamma^(s - t) d_s                  its discounted return
    rho   = prod_t q(y_t) / mu(y_t)  ("sequence")  or  rho_t = q(y_t) / mu(y_t)  ("token");
            1 when the replies are the current student's own (no behaviour log-probs)
    loss  = (1/N) sum_rows sg(rho G_t) log q(y_t)           N = supervised rows

Its gradient is the policy-gradient estimator whose "advantage" is -G_t (tinker-cookbook's
on-policy distillation, with discount gamma; theirs is 0). What it estimates, checked by
exact enumeration over every reply of a tiny vocabulary (tests/test_onpolicy.py):
  gamma = 1, ratio "sequence":  E_mu[grad] = grad of the sequence-level reverse KL
                                sum_y q(y) log q(y)/p(y) (past terms have zero-mean scores,
                                so the return from t on is enough): exact, also off-policy;
  gamma = 0:                    the gradient of sum_t E_{y<t}[KL(q(.|y<t) || p(.|y<t))]
                                with the prefix distribution held fixed: not the sequence
                                KL's gradient (it ignores how a token changes later states);
  ratio "token":                does not correct a stale prefix distribution: biased when
                                mu differs from q at earlier positions.
So the default is gamma = 1 with the sequence ratio; gamma < 1 trades that bias for less
variance. The value logged is the mean of rho d_t (a per-token reverse-KL estimate).
"""

from __future__ import annotations

import torch

RATIOS = ("sequence", "token")


def _row_groups(group_offsets, n: int, device) -> torch.Tensor:
    """The sequence index of every row from offsets [S + 1]."""
    offsets = torch.as_tensor(group_offsets, device=device, dtype=torch.long)
    if offsets[0] != 0 or offsets[-1] != n:
        raise ValueError(f"group_offsets must run from 0 to the row count {n}")
    return torch.repeat_interleave(torch.arange(len(offsets) - 1, device=device),
                                   offsets.diff())


def discounted_returns(d: torch.Tensor, group_offsets, discount: float) -> torch.Tensor:
    """G_t = sum_{s >= t, same sequence} discount^(s - t) d_s, for rows in sequence order.
    The replies are laid out as rows of a [S, T] table (zeros after a reply's end, which add
    nothing) and the recursion G_t = d_t + discount G_{t+1} runs over T, all replies at once."""
    if len(d) == 0:
        return d.clone()
    offsets = torch.as_tensor(group_offsets, dtype=torch.long, device=d.device)
    seq = _row_groups(offsets, len(d), d.device)
    pos = torch.arange(len(d), device=d.device) - offsets[seq]
    table = torch.zeros(len(offsets) - 1, int(pos.max()) + 1, dtype=d.dtype, device=d.device)
    table[seq, pos] = d
    acc = torch.zeros(table.shape[0], dtype=d.dtype, device=d.device)
    for t in range(table.shape[1] - 1, -1, -1):
        acc = table[:, t] + discount * acc
        table[:, t] = acc
    return table[seq, pos]


def rkl_token_weights(
    student_logprob: torch.Tensor, teacher_logprob: torch.Tensor, group_offsets,
    discount: float = 1.0, behaviour_logprob: torch.Tensor | None = None,
    ratio: str = "sequence",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho * G_t per row, rho * d_t per row), both detached: the weight of each row's
    log q(y_t) in the loss, and the per-token reverse-KL terms (module docstring)."""
    if ratio not in RATIOS:
        raise ValueError(f"ratio must be one of {', '.join(RATIOS)}, got {ratio!r}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    lq = student_logprob.detach().double()
    d = lq - teacher_logprob.detach().double()
    rho = torch.ones_like(d)
    if behaviour_logprob is not None:
        log_ratio = lq - behaviour_logprob.detach().double()
        if ratio == "sequence":
            seq = _row_groups(group_offsets, len(d), d.device)
            total = torch.zeros(int(seq.max()) + 1 if len(seq) else 0, dtype=d.dtype,
                                device=d.device).index_add_(0, seq, log_ratio)
            log_ratio = total[seq]
        rho = log_ratio.exp()
    returns = discounted_returns(d, group_offsets, discount)
    return rho * returns, rho * d


def rkl_tokens_loss(
    student_logprob: torch.Tensor, teacher_logprob: torch.Tensor, group_offsets,
    discount: float = 1.0, behaviour_logprob: torch.Tensor | None = None,
    ratio: str = "sequence",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-token reverse-KL estimate) for N rows: student_logprob [N] = log q(y_t)
    with its graph, teacher_logprob [N] = the cache's target log-probs, group_offsets
    [S + 1] the replies' row ranges, behaviour_logprob [N] = log mu(y_t) if the replies
    came from another checkpoint."""
    weights, terms = rkl_token_weights(student_logprob, teacher_logprob, group_offsets,
                                       discount, behaviour_logprob, ratio)
    n = max(1, student_logprob.shape[0])
    loss = (weights.to(student_logprob.dtype) * student_logprob).sum() / n
    return loss, terms.sum() / n
