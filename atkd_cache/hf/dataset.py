"""A cache as a Hugging Face `datasets` dataset: one row per cached sequence.

Columns (a top-k cache; m = the sequence's supervised positions, n its tokens):

    seq_index       int64       the sequence's index in cache order
    input_ids       [n] int32
    attention_mask  [n] int8    all ones (rows are not padded)
    labels          [n] int64   input_ids where the token is supervised, else -100
    target_logprob, entropy, uncertainty  [m] float32,   hard  [m] bool
    topk_ids        [m, k] int32,   topk_logprobs  [m, k] float32

A sampled cache has sample_sizes [m], sample_ids and sample_counts [sum of sizes] instead of
the top-k columns. `labels` follows the transformers convention (the model shifts them: the
logits at position t are scored against labels[t + 1]), so a plain cross-entropy trainer
works unchanged; the teacher rows are in the order of the supervised positions, the row of
position t (predicting token t + 1) being the j-th where labels[t + 1] is the j-th label not
-100 — the alignment `train-student` uses (docs/cache-format.md).

Several caches of the same data (several teachers, cache/join.py): the first cache's columns
as above, then teacher i's as "teacher{i}_<name>" (i = 1, 2, ...; its target_logprob,
entropy, uncertainty, hard and top-k or sample columns); each row is checked to hold the same
tokens in every cache.

The streaming view has one `datasets` shard per cache shard, so `datasets` splits the cache
across DataLoader workers and ranks (`split_dataset_by_node`, or accelerate under a Trainer)
by whole shards, each read once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from atkd_cache.cache.join import check_joinable, joined_identity, same_sequence
from atkd_cache.cache.reader import CachedSequence, open_cache
from atkd_cache.errors import UserError
from atkd_cache.train.loader import AlignedReader
from atkd_cache.train.trainer import destroy_process_group_at_exit

IGNORE_INDEX = -100  # transformers' "not a label"


def features(mode: str, top_k: int, more: list[tuple[str, int]] = ()):
    """The `datasets.Features` of a cache's rows (`mode` "topk" or "sampled"); `more`:
    (mode, top_k) of further teachers' caches, whose columns are prefixed teacher{i}_."""
    from datasets import Features, Value

    cols = {
        "seq_index": Value("int64"),
        **_sequence_features(),
        **_teacher_features(mode, top_k),
    }
    for i, (m, k) in enumerate(more, start=1):
        cols.update({f"teacher{i}_{name}": f for name, f in _teacher_features(m, k).items()})
    return Features(cols)


def _sequence_features() -> dict:
    from datasets import List, Value

    return {"input_ids": List(Value("int32")), "attention_mask": List(Value("int8")),
            "labels": List(Value("int64"))}


def _teacher_features(mode: str, top_k: int) -> dict:
    from datasets import Array2D, List, Value

    cols = {
        "target_logprob": List(Value("float32")),
        "entropy": List(Value("float32")),
        "uncertainty": List(Value("float32")),
        "hard": List(Value("bool")),
    }
    if mode == "topk":
        cols["topk_ids"] = Array2D((None, top_k), "int32")
        cols["topk_logprobs"] = Array2D((None, top_k), "float32")
    else:
        cols.update(sample_sizes=List(Value("int32")), sample_ids=List(Value("int32")),
                    sample_counts=List(Value("int16")))
    return cols


def labels_of(seq) -> np.ndarray:
    """[n] transformers labels: the token where position t - 1 predicts a supervised one."""
    labels = np.full(len(seq.input_ids), IGNORE_INDEX, dtype=np.int64)
    labels[1:][seq.supervised] = seq.target_ids
    return labels


def sequence_row(seq: CachedSequence, others: list[CachedSequence] = ()
                 ) -> dict[str, np.ndarray | int]:
    """One cached sequence as a dataset row (the columns in the module docstring); `others`:
    the same sequence in further teachers' caches."""
    row = {
        "seq_index": seq.index,
        "input_ids": seq.input_ids.astype(np.int32),
        "attention_mask": np.ones(len(seq.input_ids), dtype=np.int8),
        "labels": labels_of(seq),
        **teacher_row(seq),
    }
    for i, other in enumerate(others, start=1):
        row.update({f"teacher{i}_{k}": v for k, v in teacher_row(other).items()})
    return row


def teacher_row(seq: CachedSequence) -> dict[str, np.ndarray]:
    """A sequence's teacher columns."""
    row = {
        "target_logprob": seq.target_logprob.astype(np.float32),
        "entropy": seq.entropy.astype(np.float32),
        "uncertainty": seq.uncertainty.astype(np.float32),
        "hard": seq.hard.astype(bool),
    }
    if seq.sample_ids is None:
        row.update(topk_ids=seq.topk_ids.astype(np.int32),
                   topk_logprobs=seq.topk_logprobs.astype(np.float32))
    else:
        row.update(sample_sizes=seq.sample_sizes.astype(np.int32),
                   sample_ids=seq.sample_ids.astype(np.int32),
                   sample_counts=seq.sample_counts.astype(np.int16))
    return row


def _rows(path: str | tuple[str, ...], shards: list[int], check: bool, identity: str = ""
          ) -> Iterator[dict]:
    """The rows of some shards of a cache (several: the first's shards, the same sequences
    read from the others), in cache order. `identity` is unused here: it is part of
    `datasets`' cache key, so a changed cache at the same path is not served stale."""
    paths = [path] if isinstance(path, str) else list(path)
    cache, *more = [open_cache(p, check=check) for p in paths]
    aligned = [AlignedReader(c, cache, shards, depth=0) for c in more]
    for shard in shards:
        arrays = cache.read_shard(shard)
        for local in range(cache.shard_rows[shard]["num_sequences"]):
            seq = cache.sequence_in(arrays, shard, local)
            others = [a.sequence(seq.index, shard) for a in aligned]
            for a, other in zip(aligned, others, strict=True):
                same_sequence(seq, other, a.cache.path)
            yield sequence_row(seq, others)
        for a in aligned:
            a.release(shard)


def cache_dataset(
    path: str | list[str],
    streaming: bool = True,
    shuffle_buffer: int = 0,
    seed: int = 0,
    check: bool = True,
    cache_dir: str | None = None,
):
    """A cache (local path or fsspec URL) as a `datasets` dataset of one row per sequence;
    a list of paths: several teachers' caches of the same data, one row per sequence with
    every teacher's columns (module docstring).

    streaming=True: an `IterableDataset` read shard by shard (nothing is copied), with one
    `datasets` shard per cache shard; `shuffle_buffer` > 0 shuffles the shard order by `seed`
    and the rows through a buffer of that many sequences (`set_epoch` reshuffles).
    streaming=False: a map-style `Dataset`, decoded once into Arrow files under `cache_dir`
    (the `datasets` cache by default) — for caches that fit on disk twice over.
    `check` compares every shard with the manifest's sha256 as it is read."""
    import datasets

    destroy_process_group_at_exit()  # a torchrun script's gloo group (train/trainer.py)
    paths = [str(path)] if isinstance(path, (str, os.PathLike)) else [str(p) for p in path]
    caches = [open_cache(p, check=check) for p in paths]
    check_joinable(caches)
    cache, card = caches[0], caches[0].card
    # a tuple: `datasets` shards its generator over the one list (the shards), not the paths
    kwargs = {"path": paths[0] if len(paths) == 1 else tuple(paths),
              "shards": list(range(len(cache.shard_rows))), "check": check}
    feats = features(card.mode, card.top_k, [(c.card.mode, c.card.top_k) for c in caches[1:]])
    if streaming:
        ds = datasets.IterableDataset.from_generator(_rows, features=feats, gen_kwargs=kwargs)
        return ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else ds
    # The identity (content fingerprint + committed shards) keys datasets' own cache.
    kwargs["identity"] = f"{joined_identity(caches)}/{len(cache.shard_rows)}"
    try:
        ds = datasets.Dataset.from_generator(
            _rows, features=feats, gen_kwargs=kwargs, cache_dir=cache_dir
        )
    except datasets.exceptions.DatasetGenerationError as e:
        raise _our_error(e) from None
    return ds.shuffle(seed=seed) if shuffle_buffer else ds


def _our_error(e: BaseException) -> BaseException:
    """The UserError (e.g. DamagedCache) that `datasets` wrapped in its generic
    DatasetGenerationError, so the user reads our one line, not "An error occurred while
    generating the dataset"; `e` itself if there is none."""
    seen = e
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e
