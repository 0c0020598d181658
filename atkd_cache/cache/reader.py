"""Reads a cache: the card, the manifest, sequences by index, and batches of sequences.

Works on a local path or any fsspec URL (file://, memory://, s3:// ...) through one code
path. Only shards listed in the manifest are read. Shards are loaded whole (they are the
unit of I/O and of compression) and the most recent one is kept for random access.

With `check` (the default) a reader never hands out data that differs from what was
committed: opening checks the manifest's own checksum, the card's, and the completion
record (cache/integrity.py); loading a shard checks each array's sha256 against the
manifest, so a missing chunk (which zarr would fill with zeros) or a damaged one is one
clear error naming the cache, shard and array.
"""

from __future__ import annotations

import bisect
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from atkd_cache.cache.integrity import (
    array_sha256,
    complete_problems,
    manifest_problems,
    missing_columns,
    normalized_rows,
)
from atkd_cache.cache.schema import (
    COMPLETE_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    PARTS_DIR,
    SHARDS_GROUP,
    CacheCard,
    SequenceRecord,
    arrays_for,
)
from atkd_cache.errors import UserError, first_line


class DamagedCache(UserError):
    """A cache file that cannot be read or does not match its checksum; `problem` says which
    (e.g. "shard-000001/topk_logprobs: unreadable (...)")."""

    def __init__(self, path: str, problem: str = ""):
        self.problem = problem
        super().__init__(f"cache {path}: {problem}: the cache is damaged; re-copy it "
                         f"(`atkd-cache verify` lists every problem)" if problem else path)


@dataclass
class CachedSequence(SequenceRecord):
    """One sequence read from a cache; `index` is its position in cache order."""

    index: int = 0


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """The manifest of the cache at a path or fsspec URL (empty when nothing is committed).
    Data pages are checked against their CRCs; a damaged file is a UserError."""
    fs, base = fsspec.core.url_to_fs(str(path))
    where = _join(base, MANIFEST_FILE)
    try:
        # one GET (not ranged reads): a writer may replace the manifest meanwhile, and an
        # object store then fails the second read on the changed ETag
        data = fs.cat_file(where)
        table = pq.read_table(io.BytesIO(data), page_checksum_verification=True)
        table.column_names, table.to_pylist()  # a damaged file can fail only when decoded
        return table
    except FileNotFoundError:
        return MANIFEST_SCHEMA.empty_table()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(
            f"cache {path}: {MANIFEST_FILE} is unreadable ({first_line(e)}): the cache is "
            f"damaged; re-copy it (or re-run the dump that wrote it)"
        ) from None


class Cache:
    """An opened cache. `open_cache` is the way to get one.

    `status` is "complete" (complete.json agrees with the manifest), "partial" (a dump in
    progress or interrupted: fewer shards than planned) or "legacy" (written before
    completion was recorded). `problems` lists what opening found wrong (empty when sound).
    """

    def __init__(self, path: str | os.PathLike, check: bool = True):
        self.path = str(path)
        self.check = check
        self.fs, self.base = fsspec.core.url_to_fs(self.path)
        self.base = self.base.rstrip("/")
        if not self.fs.isdir(self.base):
            raise UserError(f"{self.path} does not exist or is not a folder: give a cache path")
        if not self.fs.exists(_join(self.base, "zarr.json")):
            raise UserError(f"{self.path} is not an atkd-cache cache (no zarr.json card)")
        try:
            self.root = zarr.open_group(self.path, mode="r")
            self.attrs = dict(self.root.attrs)
        except Exception as e:  # a damaged zarr.json fails in many ways (JSON, metadata)
            raise UserError(f"cache {self.path}: its card (zarr.json) is unreadable "
                            f"({first_line(e)}): the cache is damaged") from None
        self.card = CacheCard.from_attrs(self.attrs, where=self.path)
        self.array_names = arrays_for(self.card.mode)
        table = read_manifest(self.path)
        has_manifest = self.fs.exists(_join(self.base, MANIFEST_FILE))
        new_style = self.card.planned_shards > 0  # written with checksums and a plan
        self.problems = manifest_problems(table, self.attrs, self.array_names, new_style) \
            if has_manifest else []
        usable = has_manifest and not missing_columns(table, self.array_names)
        rows = normalized_rows(table) if usable else []
        self.status = self._completion(rows, has_manifest)
        self.manifest = table
        self.shard_rows = rows
        self._starts = [r["first_sequence"] for r in rows]
        self.num_sequences = sum(r["num_sequences"] for r in rows)
        self.num_tokens = sum(r["num_tokens"] for r in rows)
        self.num_positions = sum(r["num_positions"] for r in rows)
        self.num_supervised = sum(r["num_supervised"] for r in rows)
        self.num_hard = sum(r["num_hard"] for r in rows)
        self.num_bytes = sum(r["bytes"] for r in rows)
        self._loaded: tuple[int, dict[str, np.ndarray]] | None = None

    # -- what state the cache is in ------------------------------------------------------
    def _listdir(self, name: str) -> list[str]:
        where = _join(self.base, name)
        if not self.fs.isdir(where):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(where, detail=False)]

    def shard_folders(self) -> list[str]:
        """Names of the shard folders on disk (listed in the manifest or not)."""
        return sorted(n for n in self._listdir(SHARDS_GROUP) if n.startswith("shard-"))

    def in_progress(self) -> bool:
        """Are there part manifests, i.e. a dump running or interrupted?"""
        return any(n.endswith(".parquet") for n in self._listdir(PARTS_DIR))

    def _completion(self, rows: list[dict], has_manifest: bool) -> str:
        """complete / partial / legacy; adds to self.problems what contradicts the record."""
        planned = self.card.planned_shards
        where = _join(self.base, COMPLETE_FILE)
        if self.fs.exists(where):
            try:
                record = json.loads(self.fs.cat_file(where))
            except ValueError as e:
                self.problems.append(f"{COMPLETE_FILE} is unreadable ({first_line(e)})")
                return "complete"
            if not has_manifest:
                self.problems.append(f"{MANIFEST_FILE} is missing but {COMPLETE_FILE} says the "
                                     f"dump finished")
            elif not self.problems:
                self.problems += complete_problems(record, rows)
            if not self.problems and planned and len(rows) != planned:
                self.problems.append(f"the manifest lists {len(rows)} shards but the card "
                                     f"planned {planned}")
            return "complete"
        if self.in_progress():
            return "partial" if planned else "legacy"
        folders = [] if has_manifest else self.shard_folders()
        if folders:  # shards without a manifest never make a finished cache, legacy or not
            self.problems.append(f"{MANIFEST_FILE} is missing but shards/ holds {len(folders)} "
                                 f"shard folder(s)")
        if not planned:
            return "legacy"
        if len(rows) == planned:
            self.problems.append(f"{COMPLETE_FILE} is missing though the manifest lists every "
                                 f"planned shard")
        elif rows:
            self.problems.append(f"the manifest lists {len(rows)} shards of {planned} planned "
                                 f"and no dump is in progress (parts/ is gone): it lost rows")
        return "partial"

    @property
    def complete(self) -> bool:
        """Did the dump that wrote this cache finish (every planned shard committed)?"""
        return self.status == "complete"

    def status_line(self) -> str:
        """complete / partial (N of M shards) / legacy, in words."""
        n = len(self.shard_rows)
        if self.status == "complete":
            return f"complete ({n} shards)"
        if self.status == "partial":
            return f"partial ({n} of {self.card.planned_shards} shards committed)"
        return f"unknown ({n} shards; written before atkd-cache recorded completion)"

    def __len__(self) -> int:
        return self.num_sequences

    def decode_array(self, shard: int, key: str) -> np.ndarray:
        """One array of one shard, decoded (zarr checks each chunk's crc32c), unchecked."""
        name = self.shard_rows[shard]["shard"]
        try:
            return self.root[SHARDS_GROUP][name][key][...]
        except Exception as e:  # missing or damaged metadata / chunk: many error types
            raise DamagedCache(self.path, f"{name}/{key}: unreadable ({first_line(e)})") from None

    def read_shard(
        self, shard: int, names: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Some or all arrays of one shard, decoded and, with `check`, compared with the
        manifest's sha256: a missing chunk (zarr would fill it with zeros) or a damaged one
        is a DamagedCache error naming the cache, shard and array, never data."""
        row = self.shard_rows[shard]
        out = {}
        for key in names or self.array_names:
            out[key] = self.decode_array(shard, key)
            if self.check and array_sha256(out[key]) != row[f"sha256_{key}"]:
                raise DamagedCache(self.path, f"{row['shard']}/{key}: differs from its sha256 "
                                   f"in the manifest (a chunk is missing or damaged)")
        return out

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
        parts = [self.read_shard(i, (name,))[name] for i in range(len(self.shard_rows))]
        return np.concatenate(parts) if parts else np.zeros(0)


def open_cache(path: str | os.PathLike, check: bool = True) -> Cache:
    """Open a cache at a local path or fsspec URL for reading. With `check` (the default),
    a damaged manifest, card or completion record is a UserError here, and every shard is
    checked against the manifest's checksums when it is loaded; check=False skips both
    (for a cache verified already, or to inspect a damaged one)."""
    cache = Cache(path, check)
    if check and cache.problems:
        raise UserError(
            f"cache {cache.path}: {cache.problems[0]}: the cache is damaged or incomplete; "
            f"re-copy it or re-run the dump that wrote it (`atkd-cache verify` lists every "
            f"problem)"
        )
    return cache
