"""KD losses over a cached sparse teacher: ATKD and its baselines (docs/losses.md).

The names below load on first use (PEP 562), so that `atkd_cache.losses.names` can be read
without importing torch."""

from importlib import import_module

_WHERE = {
    "BucketedPair": "bucket",
    "bucketize": "bucket",
    "student_support_logprobs": "bucket",
    "DIVERGENCES": "divergences",
    "divergence": "divergences",
    "LossConfig": "kd",
    "LossOutput": "kd",
    "SparseTeacher": "kd",
    "kd_loss": "kd",
    "fused_kd_loss": "fused",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"atkd_cache.losses.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'atkd_cache.losses' has no attribute {name!r}")
