"""Reads a cache: the card, the manifest, sequences by index, and batches of sequences.

Works on a local path or any fsspec URL zarr can open (file://, memory://, s3:// ...).
Only shards listed in the manifest are read. Shards are loaded whole (they are the unit of
I/O and of compression) and the most recent one is kept for random access.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from atkd_cache.cache.schema import (
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    SHARDS_GROUP,
    CacheCard,
    SequenceRecord,
    arrays_for,
)
from atkd_cache.errors import UserError


@dataclass
class CachedSequence(SequenceRecord):
    """One sequence read from a cache; `index` is its position in cache order."""

    index: int = 0


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _is_url(path: str) -> bool:
    return "://" in path


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """The manifest of the cache at a path or fsspec URL (empty when nothing is committed)."""
    path = str(path)
    url = _join(path, MANIFEST_FILE)
    try:
        if _is_url(path):
            import fsspec

            with fsspec.open(url, "rb") as f:
                return pq.read_table(f)
        return pq.read_table(url)
    except FileNotFoundError:
        return MANIFEST_SCHEMA.empty_table()


class Cache:
    """An opened cache. `open_cache` is the way to get one."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not _is_url(self.path) and not os.path.isdir(self.path):
            raise UserError(f"{self.path} does not exist or is not a folder: give a cache path")
        try:
            self.root = zarr.open_group(self.path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
            msg = f"{self.path} is not an atkd-cache cache (no Zarr root group)"
            raise UserError(msg) from None
        self.card = CacheCard.from_attrs(dict(self.root.attrs), where=self.path)
        self.manifest = read_manifest(self.path)
        rows = self.manifest.to_pylist()
        self.shard_rows = rows
        self._starts = [r["first_sequence"] for r in rows]
        self.num_sequences = sum(r["num_sequences"] for r in rows)
        self.num_tokens = sum(r["num_tokens"] for r in rows)
        self.num_positions = sum(r["num_positions"] for r in rows)
        self.num_supervised = sum(r["num_supervised"] for r in rows)
        self.num_hard = sum(r["num_hard"] for r in rows)
        self.num_bytes = sum(r["bytes"] for r in rows)
        self.array_names = arrays_for(self.card.mode)
        self._loaded: tuple[int, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.num_sequences

    def read_shard(
        self, shard: int, names: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Some or all arrays of one shard, decoded (zarr verifies the crc32c on read)."""
        group = self.root[SHARDS_GROUP][self.shard_rows[shard]["shard"]]
        return {name: group[name][...] for name in names or self.array_names}

    def shard_arrays(self, shard: int) -> dict[str, np.ndarray]:
        """All arrays of one shard; the most recent shard is kept for random access."""
        if self._loaded is None or self._loaded[0] != shard:
            self._loaded = (shard, self.read_shard(shard))
        return self._loaded[1]

    def sequence_in(self, arrays: dict, shard: int, local: int) -> CachedSequence:
        """Sequence `local` of a shard whose decoded arrays are given (views, no copies)."""
        t0, t1 = arrays["token_offsets"][local : local + 2]
        s0, s1 = arrays["sup_offsets"][local : local + 2]
        p0, p1 = t0 - local, t1 - local - 1  # each sequence has n - 1 positions
        per_position = {"topk_ids", "topk_logprobs", "sample_sizes"}
        extra = {name: arrays[name][s0:s1] for name in per_position if name in arrays}
        if "sample_offsets" in arrays:
            e0, e1 = arrays["sample_offsets"][local : local + 2]
            extra.update(sample_ids=arrays["sample_ids"][e0:e1],
                         sample_counts=arrays["sample_counts"][e0:e1])
        return CachedSequence(
            index=self.shard_rows[shard]["first_sequence"] + local,
            seq_id=int(arrays["seq_ids"][local]),
            input_ids=arrays["input_ids"][t0:t1],
            supervised=arrays["supervised"][p0:p1],
            target_logprob=arrays["target_logprob"][s0:s1],
            entropy=arrays["entropy"][s0:s1],
            uncertainty=arrays["uncertainty"][s0:s1],
            hard=arrays["hard"][s0:s1],
            **extra,
        )

    def __getitem__(self, index: int) -> CachedSequence:
        """Random access by sequence index (0 .. len - 1, in cache order)."""
        if index < 0:
            index += self.num_sequences
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} out of range (cache has {self.num_sequences})")
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        return self.sequence_in(self.shard_arrays(shard), shard, local)

    def __iter__(self) -> Iterator[CachedSequence]:
        """All sequences in cache order, one shard in memory at a time."""
        for shard, row in enumerate(self.shard_rows):
            arrays = self.shard_arrays(shard)
            for local in range(row["num_sequences"]):
                yield self.sequence_in(arrays, shard, local)

    def batches(self, batch_size: int) -> Iterator[list[CachedSequence]]:
        """Consecutive lists of `batch_size` sequences (the last may be shorter)."""
        batch: list[CachedSequence] = []
        for seq in self:
            batch.append(seq)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def column(self, name: str) -> np.ndarray:
        """One array concatenated over every shard (e.g. "uncertainty" for summaries)."""
        parts = [
            self.root[SHARDS_GROUP][row["shard"]][name][...] for row in self.shard_rows
        ]
        return np.concatenate(parts) if parts else np.zeros(0)


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a cache at a local path or fsspec URL for reading."""
    return Cache(path)
