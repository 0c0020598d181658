"""Hugging Face transformers teacher: a padded forward pass, then the fused extraction."""

from __future__ import annotations

import numpy as np
import torch

from atkd_cache.data import TokenizedSequence
from atkd_cache.teacher.extract import position_stats


def pad_batch(
    seqs: list[TokenizedSequence], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], attention mask [B, T], and the supervised mask [B, T] at
    position t (predicting t + 1)."""
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    sup = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[b, :n] = torch.from_numpy(s.input_ids)
        attention[b, :n] = 1
        sup[b, : n - 1] = torch.from_numpy(s.supervised)
    return ids, attention, sup


@torch.inference_mode()
def teacher_outputs(
    model, seqs: list[TokenizedSequence], k: int, pad_id: int = 0
) -> list[dict[str, np.ndarray]]:
    """Run the teacher on a batch of sequences (right-padded) and return, per sequence, the
    float32 top-k ids/log-probs, target log-prob, entropy and uncertainty of every supervised
    position, in increasing position order."""
    device = next(model.parameters()).device
    ids, attention, sup = (t.to(device) for t in pad_batch(seqs, pad_id))
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    targets = torch.roll(ids, -1, dims=1)[sup]
    rows = torch.nonzero(sup.reshape(-1)).squeeze(1)  # flat (b, t) rows; no logits copy
    stats = position_stats(logits, targets, k, rows=rows)
    del logits
    counts = sup.sum(1).tolist()
    host = {name: t.cpu().numpy() for name, t in vars(stats).items()}
    out, lo = [], 0
    for c in counts:
        out.append({name: a[lo : lo + c] for name, a in host.items()})
        lo += c
    return out
