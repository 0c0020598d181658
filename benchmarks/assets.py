"""Real offline assets for benchmarks (DESIGN §6), from atkd_cache.assets: the SmolLM2-135M-
Instruct teacher (GGUF, converted once to a bf16 HF folder) and chitchat conversations."""

from __future__ import annotations

import numpy as np

from atkd_cache.assets import chitchat_texts, smollm2_gguf
from atkd_cache.assets import smollm2_folder as _folder
from atkd_cache.data import TokenizedSequence

__all__ = ["chitchat_sequences", "chitchat_texts", "smollm2_folder", "smollm2_gguf"]


def smollm2_folder(workdir: str) -> str:
    """The teacher as a bf16 HF folder under `workdir` (what the recorded benchmarks used)."""
    return _folder(workdir, dtype="bf16")


def chitchat_sequences(tokenizer, tokens: int, max_length: int) -> list[TokenizedSequence]:
    """Chitchat conversations as plain-text sequences (every position supervised), cut at
    `max_length`, until `tokens` tokens are collected."""
    out, total = [], 0
    for i, text in enumerate(chitchat_texts()):
        ids = tokenizer(text)["input_ids"][:max_length]
        if len(ids) < 2:
            continue
        out.append(TokenizedSequence(i, np.asarray(ids), np.ones(len(ids) - 1, dtype=bool)))
        total += len(ids)
        if total >= tokens:
            break
    return out
