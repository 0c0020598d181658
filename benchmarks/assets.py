"""Real offline assets for benchmarks (DESIGN §6), from atkd_cache.assets: the SmolLM2-135M-
Instruct teacher (GGUF, converted once to a bf16 HF folder) and chitchat conversations."""

from __future__ import annotations

from atkd_cache.assets import chitchat_texts, smollm2_gguf
from atkd_cache.assets import smollm2_folder as _folder

__all__ = ["chitchat_texts", "smollm2_folder", "smollm2_gguf"]


def smollm2_folder(workdir: str) -> str:
    """The teacher as a bf16 HF folder under `workdir` (what the recorded benchmarks used)."""
    return _folder(workdir, dtype="bf16")
