"""Writes a cache: whole shards made visible atomically, a Parquet manifest, one writer at a time.

Commit protocol for shard i (a kill -9 at any point leaves a readable, resumable cache):
  1. write every array of the shard into CACHE/.tmp/shard-i.<pid>/ and fsync it;
  2. rename it to CACHE/shards/shard-i/ (atomic on one filesystem);
  3. write the manifest with the new row to a temp file, fsync, rename over manifest.parquet.
Readers only see shards listed in the manifest. A shard directory that exists but is not in
the manifest (killed between 2 and 3) is an orphan: the next writer deletes and rewrites it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from atkd_cache.cache.reader import read_manifest
from atkd_cache.cache.schema import (
    CHUNK_ROWS,
    LOCK_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    SHARDS_GROUP,
    TMP_DIR,
    CacheCard,
    SequenceRecord,
    array_codecs,
    array_dtypes,
    array_filters,
    arrays_for,
    round_for_encoding,
)
from atkd_cache.errors import UserError


def shard_name(index: int) -> str:
    """Directory name of shard `index`."""
    return f"shard-{index:06d}"


def array_sha256(values: np.ndarray) -> str:
    """Checksum of an array's decoded contents (C order, little-endian as stored)."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class CacheWriter:
    """The single writer of a local cache directory. Use as a context manager.

    Opening creates the cache (or checks that an existing one has the same card), takes the
    lock, and removes leftovers of an interrupted run. `committed` lists what is already done.
    """

    def __init__(self, path: str | os.PathLike, card: CacheCard):
        self.root = Path(path)
        self.card = card
        self.dtypes = array_dtypes(card.logits_width, card.logprob_dtype)
        self._lock_fd: int | None = None
        self.committed: list[dict] = []

    # -- opening -------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Create or re-open the cache for appending."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write the cache at {self.root}: {e.strerror}") from None
        if not (self.root / "zarr.json").exists() and any(
            p.name not in (LOCK_FILE, TMP_DIR, SHARDS_GROUP) for p in self.root.iterdir()
        ):
            raise UserError(
                f"{self.root} exists and is not an atkd-cache cache: choose an empty or new folder"
            )
        self._take_lock()
        try:
            self._open_locked()
        except BaseException:
            self.close()
            raise

    def _open_locked(self) -> None:
        if (self.root / "zarr.json").exists():
            attrs = dict(zarr.open_group(str(self.root), mode="r").attrs)
            existing = CacheCard.from_attrs(attrs, where=str(self.root))
            diff = existing.first_difference(self.card)
            if diff is not None:
                key, old, new = diff
                raise UserError(
                    f"{self.root} was made with a different configuration: {key} is {old!r} in "
                    f"the cache but {new!r} now; use another output folder or the same settings"
                )
            self.card = existing  # keep the original creation time
        else:
            self._create_root()
        self.committed = read_manifest(self.root).to_pylist()
        self._remove_leftovers()

    def _create_root(self) -> None:
        # The root zarr.json (holding the card) is what makes a folder a cache, so it is
        # written last and renamed into place: a kill never leaves a card without `shards/`.
        zarr.open_group(str(self.root / SHARDS_GROUP), mode="a")
        staging = self.root / TMP_DIR / "root"
        shutil.rmtree(staging, ignore_errors=True)
        zarr.open_group(str(staging), mode="w", attributes=self.card.to_attrs())
        os.replace(staging / "zarr.json", self.root / "zarr.json")

    def _take_lock(self) -> None:
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"{self.root} is being written by {holder}: wait for it to finish or use "
                f"another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._lock_fd = fd

    def _remove_leftovers(self) -> None:
        shutil.rmtree(self.root / TMP_DIR, ignore_errors=True)
        listed = {row["shard"] for row in self.committed}
        for d in (self.root / SHARDS_GROUP).iterdir():
            if d.is_dir() and d.name not in listed:
                shutil.rmtree(d)  # orphan of a run killed between rename and manifest

    def close(self) -> None:
        """Release the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing -------------------------------------------------------------------------
    @property
    def num_committed_sequences(self) -> int:
        """How many sequences (in cache order) are committed."""
        return sum(row["num_sequences"] for row in self.committed)

    def write_shard(self, records: list[SequenceRecord], first_sequence: int) -> dict:
        """Write one whole shard of consecutive sequences and commit it. Returns its row."""
        if not records:
            raise ValueError("a shard needs at least one sequence")
        if first_sequence != self.num_committed_sequences:
            raise ValueError(
                f"shard starts at sequence {first_sequence}, expected "
                f"{self.num_committed_sequences}"
            )
        index = len(self.committed)
        name = shard_name(index)
        arrays = self._concatenate(records)
        tmp = self.root / TMP_DIR / f"{name}.{os.getpid()}"
        tmp.parent.mkdir(exist_ok=True)
        group = zarr.open_group(str(tmp), mode="w", attributes={"shard_index": index})
        sums = {}
        for key, values in arrays.items():
            chunks = (min(CHUNK_ROWS, max(1, values.shape[0])),) + values.shape[1:]
            arr = group.create_array(
                key, shape=values.shape, dtype=values.dtype, chunks=chunks,
                filters=array_filters(key, values.dtype, self.card.encoding),
                compressors=array_codecs(key, values.dtype), fill_value=0,
            )
            arr[...] = values
            sums[f"sha256_{key}"] = array_sha256(values)
        _fsync_tree(tmp)
        final = self.root / SHARDS_GROUP / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        row = {
            "shard": name,
            "index": index,
            "first_sequence": first_sequence,
            "num_sequences": len(records),
            "first_seq_id": int(arrays["seq_ids"][0]),
            "num_tokens": int(arrays["input_ids"].shape[0]),
            "num_positions": int(arrays["supervised"].shape[0]),
            "num_supervised": int(arrays["target_logprob"].shape[0]),
            "num_hard": int(arrays["hard"].sum()),
            "bytes": _dir_bytes(final),
            **sums,
        }
        self._write_manifest(self.committed + [row])
        self.committed.append(row)
        return row

    def _concatenate(self, records: list[SequenceRecord]) -> dict[str, np.ndarray]:
        """The shard's arrays, as readers will decode them (lossy encodings applied)."""
        k = self.card.top_k
        lengths = np.array([len(r.input_ids) for r in records], dtype=np.int64)
        sup_counts = np.array([len(r.target_logprob) for r in records], dtype=np.int64)
        for r in records:
            m = int(r.supervised.sum())
            if len(r.supervised) != len(r.input_ids) - 1 or len(r.target_logprob) != m:
                raise ValueError(f"sequence {r.seq_id}: inconsistent record lengths")
        out = {
            "seq_ids": np.array([r.seq_id for r in records], dtype=np.int64),
            "token_offsets": np.concatenate([[0], np.cumsum(lengths)]),
            "sup_offsets": np.concatenate([[0], np.cumsum(sup_counts)]),
        }
        if self.card.mode == "sampled":
            entries = [len(r.sample_ids) for r in records]
            out["sample_offsets"] = np.concatenate([[0], np.cumsum(entries)]).astype(np.int64)
        for key in arrays_for(self.card.mode):
            if key in out:
                continue
            parts = [getattr(r, key) for r in records]
            if key.startswith("topk_"):
                parts = [p.reshape(-1, k) for p in parts]
            values = np.concatenate(parts).astype(self.dtypes[key], copy=False)
            out[key] = round_for_encoding(key, values, self.card.encoding)
        return out

    def _write_manifest(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        tmp = self.root / TMP_DIR / f"{MANIFEST_FILE}.{os.getpid()}"
        tmp.parent.mkdir(exist_ok=True)
        pq.write_table(table, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.root / MANIFEST_FILE)
