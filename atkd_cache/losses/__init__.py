"""KD losses over a cached sparse teacher: ATKD and its baselines (docs/losses.md)."""

from atkd_cache.losses.bucket import BucketedPair, bucketize, student_support_logprobs
from atkd_cache.losses.divergences import DIVERGENCES, divergence
from atkd_cache.losses.kd import LossConfig, LossOutput, SparseTeacher, kd_loss

__all__ = [
    "DIVERGENCES",
    "BucketedPair",
    "LossConfig",
    "LossOutput",
    "SparseTeacher",
    "bucketize",
    "divergence",
    "kd_loss",
    "student_support_logprobs",
]
