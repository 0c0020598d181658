"""Easy/hard token split by teacher uncertainty (DESIGN §3.3).

The official ATKD code thresholds a micro-batch's UNC = 1 - p_teacher(target) at
`torch.median` (the lower median for an even count): easy = UNC < t, hard = UNC >= t.
Generalised to a hard ratio rho: sort UNC ascending as u_0..u_{n-1}, t = u_{floor((n-1)(1-rho))}.
rho = 0.5 gives exactly torch.median's element. Ties at the threshold all go to "hard", so the
hard fraction can exceed rho when many tokens share the threshold value.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def threshold_index(n: int, hard_ratio: float) -> int:
    """Index into the ascending-sorted UNC values that serves as the hard threshold."""
    if not 0.0 <= hard_ratio <= 1.0:
        raise ValueError(f"hard ratio must be in [0, 1], got {hard_ratio}")
    return int(math.floor((n - 1) * (1.0 - hard_ratio)))


def hard_labels_np(uncertainty: np.ndarray, hard_ratio: float) -> np.ndarray:
    """Hard labels for one scope (e.g. one sequence's supervised positions), numpy version."""
    n = uncertainty.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    if hard_ratio == 0.0:
        return np.zeros(n, dtype=bool)
    t = np.partition(uncertainty, threshold_index(n, hard_ratio))[threshold_index(n, hard_ratio)]
    return uncertainty >= t


def hard_labels(uncertainty: torch.Tensor, hard_ratio: float) -> torch.Tensor:
    """Hard labels for one scope, torch version (same rule as `hard_labels_np`)."""
    n = uncertainty.shape[0]
    if n == 0 or hard_ratio == 0.0:
        return torch.zeros(n, dtype=torch.bool, device=uncertainty.device)
    # kthvalue returns one of the input values, so the comparison below is exact.
    t = torch.kthvalue(uncertainty.detach(), threshold_index(n, hard_ratio) + 1).values
    return uncertainty >= t


def hard_labels_grouped(
    uncertainty: torch.Tensor, group_offsets: torch.Tensor | list[int], hard_ratio: float
) -> torch.Tensor:
    """Apply the rule separately to each group [off[i], off[i+1]) (e.g. each sequence)."""
    out = torch.zeros(uncertainty.shape[0], dtype=torch.bool, device=uncertainty.device)
    offs = [int(o) for o in group_offsets]
    for lo, hi in zip(offs[:-1], offs[1:], strict=True):
        out[lo:hi] = hard_labels(uncertainty[lo:hi], hard_ratio)
    return out
