"""Per-position teacher quantities from full-vocabulary logits (DESIGN §2), fused for speed.

For logits z (any dtype, upcast one chunk at a time to float32) and target ids g:
    lse          = logsumexp(z)                         (one max pass, one exp pass)
    topk         = top-k of z, log-probs z_topk - lse   (sorted, descending)
    target       = z_g - lse                            (exact, inside or outside the top-k)
    entropy      = log S - sum(e * (z - m)) / S         with m = max z, e = exp(z - m), S = sum e
                   (= lse - sum p z, computed on shifted logits so that it does not cancel)
    uncertainty  = 1 - p_g = -expm1(target)             (accurate when p_g -> 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows upcast to float32 at a time: bounds the extra memory to CHUNK_ROWS x V x 8 bytes.
CHUNK_ROWS = 256


@dataclass
class PositionStats:
    """Teacher quantities for N positions (all float32 except the ids)."""

    topk_ids: torch.Tensor  # [N, k] int64
    topk_logprobs: torch.Tensor  # [N, k]
    target_logprob: torch.Tensor  # [N]
    entropy: torch.Tensor  # [N]
    uncertainty: torch.Tensor  # [N]


@torch.inference_mode()
def position_stats(
    logits: torch.Tensor, targets: torch.Tensor, k: int, chunk_rows: int = CHUNK_ROWS
) -> PositionStats:
    """Compute the cached quantities for each row of `logits` [N, V] with targets [N]."""
    n = logits.shape[0]
    dev = logits.device
    out = PositionStats(
        topk_ids=torch.empty(n, k, dtype=torch.long, device=dev),
        topk_logprobs=torch.empty(n, k, dtype=torch.float32, device=dev),
        target_logprob=torch.empty(n, dtype=torch.float32, device=dev),
        entropy=torch.empty(n, dtype=torch.float32, device=dev),
        uncertainty=torch.empty(n, dtype=torch.float32, device=dev),
    )
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        z = logits[lo:hi].float()
        top_vals, top_ids = z.topk(k, dim=-1, sorted=True)
        target_z = z.gather(1, targets[lo:hi, None]).squeeze(1)
        m = top_vals[:, :1]  # the row max is the first top-k value
        z.sub_(m).clamp_(min=-1e30)  # shifted logits; -inf becomes a huge finite number
        e = torch.exp(z)
        s = e.sum(-1)
        log_s = torch.log(s)
        lse = m.squeeze(1) + log_s
        weighted = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # sum(e * (z - m))
        out.topk_ids[lo:hi] = top_ids
        out.topk_logprobs[lo:hi] = top_vals - lse[:, None]
        out.target_logprob[lo:hi] = target_z - lse
        out.entropy[lo:hi] = (log_s - weighted / s).clamp_(min=0.0)
    out.uncertainty = -torch.expm1(out.target_logprob)
    return out
