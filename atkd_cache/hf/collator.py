"""Rows of the `datasets` view (hf/dataset.py) -> one training micro-batch, built by the same
`collate` as `train-student`'s loader, plus `labels` for the model's own cross-entropy."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from atkd_cache.cache.reader import CachedSequence
from atkd_cache.errors import UserError
from atkd_cache.hf.dataset import IGNORE_INDEX
from atkd_cache.train.loader import collate, collate_aligned

# Columns a Trainer must not drop before the collator sees them (signature columns).
TEACHER_COLUMNS = (
    "seq_index", "labels", "target_logprob", "entropy", "uncertainty", "hard",
    "topk_ids", "topk_logprobs", "sample_sizes", "sample_ids", "sample_counts",
)


def row_sequence(row: dict) -> CachedSequence:
    """A dataset row back as the reader's CachedSequence (supervised = labels[1:] != -100)."""
    def get(name, dtype):
        return np.asarray(row[name], dtype=dtype) if name in row else None

    labels = get("labels", np.int64)
    return CachedSequence(
        seq_id=-1,
        index=int(row.get("seq_index", -1)),
        input_ids=get("input_ids", np.int64),
        supervised=labels[1:] != IGNORE_INDEX,
        target_logprob=get("target_logprob", np.float32),
        entropy=get("entropy", np.float32),
        uncertainty=get("uncertainty", np.float32),
        hard=get("hard", bool),
        topk_ids=get("topk_ids", np.int64),
        topk_logprobs=get("topk_logprobs", np.float32),
        sample_sizes=get("sample_sizes", np.int64),
        sample_ids=get("sample_ids", np.int64),
        sample_counts=get("sample_counts", np.int64),
    )


def _teacher_view(row: dict, prefix: str) -> dict:
    """A row as seen by another teacher: its tokens and labels, that teacher's columns."""
    view = {k: row[k] for k in ("seq_index", "input_ids", "labels") if k in row}
    view.update({k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)})
    return view


@dataclass
class KDCollator:
    """Pads (or, with `pack`, concatenates) a list of rows into the loader's micro-batch:
    input_ids, attention_mask (or position_ids), `rows` (the flat [B * T] positions whose
    next token is supervised, in the teacher rows' order), `group_offsets` (each sequence's
    rows), the teacher tensors, and `labels` [B, T] (-100 on padding and unsupervised
    tokens) so that `num_items_in_batch` and plain CE work as in any causal-LM Trainer."""

    pack: bool = False
    # a student of another tokenizer: the cache's text re-tokenized and cut into chunks
    # (train/align.py; build it with `cross_tokenizer_collator`)
    aligner: object = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """The micro-batch of `features` (rows of the datasets view)."""
        lacking = [c for c in ("input_ids", "labels", "target_logprob", "hard")
                   if c not in features[0]]
        if lacking or not ({"topk_ids", "sample_ids"} & set(features[0])):
            raise UserError(
                f"KDCollator got rows without the cache's columns {lacking or ['topk_ids']}: "
                "a Trainer dropped them as unused; use atkd_cache.hf.KDTrainer (or "
                "KDLossMixin), or TrainingArguments(remove_unused_columns=False)")
        seqs = [row_sequence(f) for f in features]
        others = []
        for i in itertools.count(1):  # several teachers: columns teacher{i}_<name>
            prefix = f"teacher{i}_"
            if prefix + "target_logprob" not in features[0]:
                break
            others.append([row_sequence(_teacher_view(f, prefix)) for f in features])
        if self.aligner is not None:
            if others:
                raise UserError("a student of another tokenizer trains on one teacher's "
                                "cache: drop the other teachers' columns")
            batch = collate_aligned(seqs, [self.aligner.align(s) for s in seqs], self.pack,
                                    self.aligner.vocab_map)
        else:
            batch = collate(seqs, self.pack, tuple(others))
        labels = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.int64)
        flat = labels.view(-1)  # the token at row r + 1 is the label of position r
        flat[batch["rows"] + 1] = batch["target_ids"]
        batch["labels"] = labels
        return batch


def cross_tokenizer_collator(cache: str, tokenizer, pack: bool = False,
                             student_chat_template: bool = False) -> KDCollator:
    """A KDCollator for a student whose tokenizer differs from the cache's teacher's: each
    row's text (from the tokenizer stored in `cache`) is re-tokenized by `tokenizer` (after
    rendering the chat with the student's own template when `student_chat_template`) and cut
    into byte-aligned chunks; train with LossConfig(cross_tokenizer="alm" | "uld" | "gold")."""
    from atkd_cache.cache.reader import open_cache
    from atkd_cache.train.align import cache_aligner

    return KDCollator(pack=pack, aligner=cache_aligner(open_cache(cache), tokenizer,
                                                       chat_template=student_chat_template))
