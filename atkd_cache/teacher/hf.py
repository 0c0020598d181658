"""Hugging Face transformers teacher: a padded forward pass, then the fused extraction."""

from __future__ import annotations

import numpy as np
import torch

from atkd_cache.data import TokenizedSequence
from atkd_cache.teacher.extract import position_stats, unique_counts


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


def uniforms_seed(seed: int, seq_id: int) -> int:
    """The seed of one sequence's sampled-mode uniforms."""
    return (seed * 1_000_003 + seq_id) % (2**63)


def left_pad(prompts: list, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T] and attention mask [B, T] of token-id lists or arrays (what
    `generate` takes: every row's last token is its last real one)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    return ids, mask


def sequence_uniforms(seq_id: int, positions: int, num_samples: int, seed: int) -> torch.Tensor:
    """The uniforms [positions, num_samples] behind one sequence's samples: a generator of
    its own per (seed, seq_id), so samples do not depend on batching, order or ranks. (The
    generator fills row by row: drawing one row per generation step gives the same values.)"""
    gen = torch.Generator().manual_seed(uniforms_seed(seed, seq_id))
    return torch.rand(positions, num_samples, generator=gen, dtype=torch.float64)


def split_samples(draws: np.ndarray) -> dict[str, np.ndarray]:
    """One sequence's draws [m, S] -> the cache's sample arrays (unique ids and counts)."""
    sizes, ids, counts = unique_counts(draws)
    return {"sample_sizes": sizes, "sample_ids": ids, "sample_counts": counts}


@torch.inference_mode()
def teacher_outputs(
    model,
    seqs: list[TokenizedSequence],
    k: int,
    pad_id: int = 0,
    num_samples: int = 0,
    sample_seed: int = 0,
    keep_draws: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Run the teacher on a batch of sequences (right-padded) and return, per sequence, the
    float32 target log-prob, entropy and uncertainty of every supervised position (in
    increasing position order), with the top-k ids/log-probs (k > 0) or, when num_samples > 0,
    the unique ids drawn from the teacher and their counts (sampled mode); `keep_draws`
    returns the raw draws [m, num_samples] instead (benchmarks)."""
    device = next(model.parameters()).device
    ids, attention, sup = (t.to(device) for t in pad_batch(seqs, pad_id))
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    targets = torch.roll(ids, -1, dims=1)[sup]
    rows = torch.nonzero(sup.reshape(-1)).squeeze(1)  # flat (b, t) rows; no logits copy
    counts = sup.sum(1).tolist()
    uniforms = None
    if num_samples:
        uniforms = torch.cat([
            sequence_uniforms(s.seq_id, c, num_samples, sample_seed)
            for s, c in zip(seqs, counts, strict=True)
        ]).to(device)
    stats = position_stats(logits, targets, k, rows=rows, uniforms=uniforms)
    del logits
    host = {name: t.cpu().numpy() for name, t in vars(stats).items() if t is not None}
    draws = host.pop("draws", None)
    if k == 0:
        del host["topk_ids"], host["topk_logprobs"]
    out, lo = [], 0
    for c in counts:
        one = {name: a[lo : lo + c] for name, a in host.items()}
        if draws is not None and keep_draws:
            one["draws"] = draws[lo : lo + c]
        elif draws is not None:
            one.update(split_samples(draws[lo : lo + c]))
        out.append(one)
        lo += c
    return out
