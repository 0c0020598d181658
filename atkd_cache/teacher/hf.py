"""Hugging Face transformers teacher: a padded forward pass, then the fused extraction."""

from __future__ import annotations

import numpy as np
import torch

from atkd_cache.data import TokenizedSequence
from atkd_cache.teacher.extract import position_stats


@torch.inference_mode()
def teacher_outputs(
    model, seqs: list[TokenizedSequence], k: int, pad_id: int = 0
) -> list[dict[str, np.ndarray]]:
    """Run the teacher on a batch of sequences (right-padded) and return, per sequence, the
    float32 top-k ids/log-probs, target log-prob, entropy and uncertainty of every supervised
    position, in increasing position order."""
    device = next(model.parameters()).device
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    sup = torch.zeros((len(seqs), width), dtype=torch.bool)  # at position t (predicts t + 1)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[b, :n] = torch.from_numpy(s.input_ids)
        attention[b, :n] = 1
        sup[b, : n - 1] = torch.from_numpy(s.supervised)
    ids, attention, sup = ids.to(device), attention.to(device), sup.to(device)
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    targets = torch.roll(ids, -1, dims=1)[sup]
    rows = torch.nonzero(sup.reshape(-1)).squeeze(1)  # flat (b, t) rows; no logits copy
    stats = position_stats(logits, targets, k, rows=rows)
    del logits
    counts = sup.sum(1).tolist()
    fields = {
        "topk_ids": stats.topk_ids,
        "topk_logprobs": stats.topk_logprobs,
        "target_logprob": stats.target_logprob,
        "entropy": stats.entropy,
        "uncertainty": stats.uncertainty,
    }
    host = {name: t.cpu().numpy() for name, t in fields.items()}
    out, lo = [], 0
    for c in counts:
        out.append({name: a[lo : lo + c] for name, a in host.items()})
        lo += c
    return out
