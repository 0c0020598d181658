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

The streaming view has one `datasets` shard per cache shard, so `datasets` splits the cache
across DataLoader workers and ranks (`split_dataset_by_node`, or accelerate under a Trainer)
by whole shards, each read once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from atkd_cache.cache.reader import CachedSequence, open_cache

IGNORE_INDEX = -100  # transformers' "not a label"


def features(mode: str, top_k: int):
    """The `datasets.Features` of a cache's rows (`mode` "topk" or "sampled")."""
    from datasets import Array2D, Features, List, Value

    cols = {
        "seq_index": Value("int64"),
        "input_ids": List(Value("int32")),
        "attention_mask": List(Value("int8")),
        "labels": List(Value("int64")),
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
    return Features(cols)


def labels_of(seq) -> np.ndarray:
    """[n] transformers labels: the token where position t - 1 predicts a supervised one."""
    labels = np.full(len(seq.input_ids), IGNORE_INDEX, dtype=np.int64)
    labels[1:][seq.supervised] = seq.target_ids
    return labels


def sequence_row(seq: CachedSequence) -> dict[str, np.ndarray | int]:
    """One cached sequence as a dataset row (the columns in the module docstring)."""
    row = {
        "seq_index": seq.index,
        "input_ids": seq.input_ids.astype(np.int32),
        "attention_mask": np.ones(len(seq.input_ids), dtype=np.int8),
        "labels": labels_of(seq),
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


def _rows(path: str, shards: list[int], check: bool, identity: str = "") -> Iterator[dict]:
    """The rows of some shards of a cache, in cache order. `identity` is unused here: it is
    part of `datasets`' cache key, so a changed cache at the same path is not served stale."""
    cache = open_cache(path, check=check)
    for shard in shards:
        arrays = cache.read_shard(shard)
        for local in range(cache.shard_rows[shard]["num_sequences"]):
            yield sequence_row(cache.sequence_in(arrays, shard, local))


def cache_dataset(
    path: str,
    streaming: bool = True,
    shuffle_buffer: int = 0,
    seed: int = 0,
    check: bool = True,
    cache_dir: str | None = None,
):
    """A cache (local path or fsspec URL) as a `datasets` dataset of one row per sequence.

    streaming=True: an `IterableDataset` read shard by shard (nothing is copied), with one
    `datasets` shard per cache shard; `shuffle_buffer` > 0 shuffles the shard order by `seed`
    and the rows through a buffer of that many sequences (`set_epoch` reshuffles).
    streaming=False: a map-style `Dataset`, decoded once into Arrow files under `cache_dir`
    (the `datasets` cache by default) — for caches that fit on disk twice over.
    `check` compares every shard with the manifest's sha256 as it is read."""
    import datasets

    cache = open_cache(path, check=check)
    card = cache.card
    kwargs = {"path": str(path), "shards": list(range(len(cache.shard_rows))), "check": check}
    feats = features(card.mode, card.top_k)
    if streaming:
        ds = datasets.IterableDataset.from_generator(_rows, features=feats, gen_kwargs=kwargs)
        return ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else ds
    # The identity (content fingerprint + committed shards) keys datasets' own cache.
    kwargs["identity"] = f"{card.identity}/{len(cache.shard_rows)}"
    ds = datasets.Dataset.from_generator(
        _rows, features=feats, gen_kwargs=kwargs, cache_dir=cache_dir
    )
    return ds.shuffle(seed=seed) if shuffle_buffer else ds
