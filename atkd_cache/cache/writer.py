"""Writes a cache: whole shards made visible atomically, a Parquet manifest, one writer per
shard slot (one process, or one per rank of a data-parallel teacher pass).

Commit protocol for shard i (a kill -9 at any point leaves a readable, resumable cache):
  1. write every array of the shard into CACHE/.tmp/shard-i.<pid>/ and fsync it;
  2. rename it to CACHE/shards/shard-i/ (atomic on one filesystem);
  3. add its row to the writer's own part manifest CACHE/parts/rank-R-of-W.parquet (temp file,
     fsync, rename);
  4. under a short lock, rewrite manifest.parquet as the longest run 0, 1, 2 ... of shards
     committed by any writer (temp file, fsync, rename).
Readers only see shards listed in manifest.parquet, so while ranks run they see a prefix of
the cache, and all of it once the last rank finishes. A shard directory that no manifest
lists (killed between 2 and 3) is an orphan: the writer that owns its slot deletes it.
Rank r of W owns shards i with i % W == r; it holds CACHE/.lock shared and its own rank
lock exclusively, so ranks run side by side while a single-process writer (which holds
CACHE/.lock exclusively) excludes them all. A rank re-run alone continues its own slice.

At an fsspec URL (s3://, gs://, memory:// ...) the same protocol runs without steps 1-2's
rename (object stores have none): a shard's objects are written in place and become part of
the cache when a manifest, put as one object, lists them. Object stores have no flock
either, so the steps that the merge lock orders on a local disk are made safe otherwise:
  - the card (zarr.json) of a new cache is left to rank 0 for up to CARD_WAIT_S, then
    created with an exclusive put (S3's If-None-Match): when two ranks both find no card,
    one put wins and the other rank adopts the stored card, so the manifests' card digest
    is always taken of the card that is there;
  - with several ranks, manifest.parquet is put only when it lists every planned shard (then
    every rank that puts it puts the same bytes): two ranks' rewrites of a prefix could land
    out of order, and a stale one landing after the cache was marked complete would leave
    it damaged. While ranks run, readers there see no shards; the part manifests resume.
Running two writers for the same rank slot there is the user's to avoid.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from atkd_cache.cache.integrity import (
    array_sha256,
    canonical_json,
    complete_record,
    manifest_table,
    meta_sha256,
)
from atkd_cache.cache.reader import read_manifest
from atkd_cache.cache.readme import README_FILE, render_readme
from atkd_cache.cache.schema import (
    CHUNK_ROWS,
    COMPLETE_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    PARTS_DIR,
    SHARDS_GROUP,
    TMP_DIR,
    TOKENIZER_DIR,
    CacheCard,
    SequenceRecord,
    array_codecs,
    array_dtypes,
    array_filters,
    arrays_for,
    probe_gap,
    round_for_encoding,
)
from atkd_cache.errors import UserError, first_line

# The file each writer touches to learn early whether it may write the folder; another
# rank's listing can see it.
PROBE_PREFIX = ".write-probe."
# How long a rank > 0 waits for rank 0 to create the card of a new cache on an object store.
CARD_WAIT_S = 60.0


def shard_name(index: int) -> str:
    """Directory name of shard `index`."""
    return f"shard-{index:06d}"


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _shard_index(name: str) -> int | None:
    """The index in a shard directory name (shard-000012 -> 12), or None."""
    prefix = "shard-"
    tail = name[len(prefix):]
    return int(tail) if name.startswith(prefix) and tail.isdigit() else None


def dir_bytes(path: Path) -> int:
    """Bytes of every file under a folder (a shard's manifest `bytes`)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _take_flock(path: Path, mode: int, blocking: bool = False) -> int | None:
    """An open fd holding flock `mode` on path, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_atomic(data: bytes, target: Path, tmp_dir: Path) -> None:
    """Write a file atomically: temp file, fsync, rename over target."""
    tmp_dir.mkdir(exist_ok=True)
    tmp = tmp_dir / f"{target.name}.{os.getpid()}"
    tmp.write_bytes(data)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)


def is_remote(path: str) -> bool:
    """Is this an fsspec URL other than file:// (a place without rename and flock)?"""
    return "://" in path and not path.startswith("file://")


def committed_prefix(rows: list[dict]) -> list[dict]:
    """The rows of shards 0, 1, 2 ... up to the first missing one, by index."""
    by_index = {row["index"]: row for row in rows}
    out = []
    while len(out) in by_index:
        out.append(by_index[len(out)])
    return out


class CacheWriter:
    """The writer of a local cache directory (or of rank `rank`'s slice of it). Use as a
    context manager.

    Opening creates the cache (or checks that an existing one has the same card), takes the
    locks, and removes leftovers of an interrupted run. `committed` lists every shard that
    any writer has committed, by index.
    """

    def __init__(
        self, path: str | os.PathLike, card: CacheCard, rank: int = 0, world_size: int = 1,
        tokenizer_files: dict[str, bytes] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.url = str(path)
        self.remote = is_remote(self.url)
        if self.remote:
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(self.url)
            self.base = self.base.rstrip("/")
        self.root = Path(self.url.removeprefix("file://"))  # local caches only
        self.card = card
        # the teacher tokenizer's files (name -> bytes), stored under tokenizer/ before the
        # card (whose `text` lists their sha256s) when the cache is created
        self.tokenizer_files = tokenizer_files or {}
        self.rank, self.world_size = rank, world_size
        self.dtypes = array_dtypes(card.logits_width, card.logprob_dtype)
        self._lock_fds: list[int] = []
        self.committed: list[dict] = []
        self._mine: list[dict] = []  # rows in this writer's part manifest

    @property
    def part_name(self) -> str:
        """File name of this writer's part manifest under parts/."""
        return f"rank-{self.rank:05d}-of-{self.world_size:05d}.parquet"

    def owns(self, index: int) -> bool:
        """Is shard `index` this writer's to write?"""
        return index % self.world_size == self.rank

    # -- where things are: a local folder, or a prefix of an fsspec filesystem ------------
    def _url(self, *parts: str) -> str:
        """A path (local) or URL (remote) under the cache, for zarr and readers."""
        if self.remote:
            return "/".join([self.url.rstrip("/"), *parts])
        return str(self.root.joinpath(*parts))

    def _exists(self, *parts: str) -> bool:
        if self.remote:
            return self.fs.exists("/".join([self.base, *parts]))
        return self.root.joinpath(*parts).exists()

    def _listdir(self, *parts: str) -> list[str]:
        """Names directly under a folder of the cache ([] if there is none)."""
        if self.remote:
            where = "/".join([self.base, *parts])
            if not self.fs.exists(where):
                return []
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(where, detail=False)]
        d = self.root.joinpath(*parts)
        return [p.name for p in d.iterdir()] if d.is_dir() else []

    def _rm(self, *parts: str) -> None:
        if self.remote:
            where = "/".join([self.base, *parts])
            try:
                self.fs.rm(where, recursive=True)
            except FileNotFoundError:  # never there, or another rank removed it first
                pass
        else:
            shutil.rmtree(self.root.joinpath(*parts), ignore_errors=True)

    def _read_parquet(self, *parts: str) -> list[dict]:
        where = "/".join(parts)
        try:
            # One read of the whole file, then parse: another rank may replace it meanwhile.
            # pq.read_table(path) opens the file twice (footer, then pages), so a rename
            # in between pairs the old footer with the new pages; on an object store the
            # ranged reads of fs.open fail on the changed ETag.
            return pq.read_table(io.BytesIO(self._read_bytes(*parts))).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UserError(f"{self.url}: {where} is unreadable ({first_line(e)}): delete it "
                            f"to re-compute the shards it lists") from None

    def _read_bytes(self, *parts: str) -> bytes:
        if self.remote:
            return self.fs.cat_file("/".join([self.base, *parts]))
        return self.root.joinpath(*parts).read_bytes()

    def _put_bytes(self, data: bytes, *parts: str) -> None:
        """Replace a file atomically (local: temp + fsync + rename; remote: one put)."""
        if self.remote:
            self.fs.pipe("/".join([self.base, *parts]), data)
        else:
            _write_atomic(data, self.root.joinpath(*parts), self.root / TMP_DIR)

    def _put_parquet(self, rows: list[dict], *parts: str) -> None:
        """Replace a manifest atomically, with its digests and page checksums."""
        buf = io.BytesIO()
        pq.write_table(manifest_table(rows, self.card_attrs), buf, write_page_checksum=True)
        self._put_bytes(buf.getvalue(), *parts)

    def _bytes(self, *parts: str) -> int:
        if self.remote:
            return int(self.fs.du("/".join([self.base, *parts])))
        return dir_bytes(self.root.joinpath(*parts))

    # -- opening -------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Create or re-open the cache for appending."""
        try:
            if self.remote:
                self.fs.makedirs(self.base, exist_ok=True)
            else:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f"{PROBE_PREFIX}{os.getpid()}"
                probe.touch()
                probe.unlink()
        except OSError as e:
            reason = e.strerror or str(e)
            raise UserError(f"cannot write the cache at {self.url}: {reason}") from None
        # One listing decides: another rank may put the card between two looks (an exists
        # check, then a listing that shows the new card as a stranger)
        allowed = (TMP_DIR, SHARDS_GROUP, PARTS_DIR, TOKENIZER_DIR)
        if self.remote:
            self.fs.invalidate_cache()
        names = self._listdir()
        if "zarr.json" not in names and any(
            name not in allowed and not name.startswith((LOCK_FILE, PROBE_PREFIX))
            for name in names
        ):
            raise UserError(
                f"{self.url} exists and is not an atkd-cache cache: choose an empty or new folder"
            )
        if not self.remote:
            self._take_locks()
        try:
            with self._merge_lock():
                self._open_locked()
        except BaseException:
            self.close()
            raise

    def _open_locked(self) -> None:
        # On an object store another rank may create the card between the check and the put
        # (or this client's listing may be stale): the exclusive put then fails and the
        # stored card is the one to keep, as when it was found here. Ranks > 0 first give
        # rank 0 a moment to create it, for stores whose put cannot be exclusive.
        if self.remote and self.rank > 0:
            deadline = time.monotonic() + CARD_WAIT_S
            while not self._exists("zarr.json") and time.monotonic() < deadline:
                time.sleep(0.5)
                self.fs.invalidate_cache()
        created = not self._exists("zarr.json") and self._create_root()
        self.card_attrs = self._stored_card()  # what the manifests' card digest is taken of
        if not created:
            self._adopt_card(self.card_attrs)
        mine = self._exists(PARTS_DIR, self.part_name)
        self._mine = self._read_parquet(PARTS_DIR, self.part_name) if mine else []
        self.committed = self._all_rows()
        self._remove_leftovers()
        if not mine and not self._exists(COMPLETE_FILE):
            # An (empty) part manifest from the start: it tells readers that a dump is in
            # progress or was interrupted, until the last writer marks the cache complete.
            if not self.remote:
                (self.root / PARTS_DIR).mkdir(exist_ok=True)
            self._put_parquet([], PARTS_DIR, self.part_name)

    def _adopt_card(self, stored: dict) -> None:
        """Check that the stored card matches this writer's, then keep the stored one."""
        existing = CacheCard.from_attrs(stored, where=self.url)
        diff = existing.first_difference(self.card)
        if diff is not None:
            key, old, new = diff
            if key == "teacher_probe":  # two lists of numbers: say what they mean
                raise UserError(
                    f"{self.url} was made by a served teacher that computes differently "
                    f"from this one (teacher_probe: {probe_gap(old, new)}): serve the "
                    f"cache's teacher as it was (weights, --dtype, build), or use another "
                    f"output folder")
            raise UserError(
                f"{self.url} was made with a different configuration: {key} is {old!r} in "
                f"the cache but {new!r} now; use another output folder or the same settings"
            )
        self.card = existing  # keep the original creation time

    def _stored_card(self) -> dict:
        """The card as stored in the root zarr.json."""
        try:
            return dict(zarr.open_group(self._url(), mode="r").attrs)
        except Exception as e:  # a damaged zarr.json fails in many ways
            raise UserError(f"{self.url}: its card (zarr.json) is unreadable ({first_line(e)}): "
                            f"the cache is damaged; use a new output folder") from None

    def _all_rows(self) -> list[dict]:
        """Rows committed by any writer: the manifest and every part manifest, by index."""
        if self.remote:  # other ranks' puts are not in this client's listing cache
            self.fs.invalidate_cache()
        # Parts before the manifest: a part can vanish after it is listed only when the last
        # writer has put the whole manifest and is removing parts/, and the manifest read
        # after it then lists everything.
        rows = {}
        for name in sorted(self._listdir(PARTS_DIR)):
            if name.endswith(".parquet"):
                try:
                    part = self._read_parquet(PARTS_DIR, name)
                except UserError:
                    if self._exists(PARTS_DIR, name):
                        raise
                    continue  # removed meanwhile (see above)
                rows.update({row["index"]: row for row in part})
        rows.update({row["index"]: row for row in read_manifest(self._url()).to_pylist()})
        return [rows[i] for i in sorted(rows)]

    def _create_root(self) -> bool:
        """Write the card and the empty shards group; False if another writer's card got
        there first (an object store, where ranks are not ordered by the merge lock)."""
        # The root zarr.json (holding the card) is what makes a folder a cache, so it is
        # written last and renamed into place: a kill never leaves a card without `shards/`.
        try:
            zarr.open_group(self._url(SHARDS_GROUP), mode="a")
        except zarr.errors.ContainsGroupError:
            # mode="a" is check-then-create: on an object store another rank can create the
            # group in between (seen with 2 ranks on S3); then it exists, which is the goal
            pass
        if not self.remote and self.tokenizer_files:
            (self.root / TOKENIZER_DIR).mkdir(exist_ok=True)
        for name, data in sorted(self.tokenizer_files.items()):
            self._put_bytes(data, TOKENIZER_DIR, name)
        with tempfile.TemporaryDirectory() as staging:
            zarr.open_group(staging, mode="w", attributes=self.card.to_attrs())
            card = Path(staging, "zarr.json").read_bytes()
        if not self.remote:  # temp file under .tmp/, fsync, rename: never half a card
            self._put_bytes(card, "zarr.json")
            return True
        try:
            self.fs.pipe_file(f"{self.base}/zarr.json", card, mode="create")
        except FileExistsError:
            return False
        return True

    def _take_locks(self) -> None:
        single = self.world_size == 1
        main = _take_flock(self.root / LOCK_FILE, fcntl.LOCK_EX if single else fcntl.LOCK_SH)
        if main is None:
            self._refuse(self.root / LOCK_FILE)
        self._lock_fds.append(main)
        if single:
            os.ftruncate(main, 0)
            os.write(main, f"pid {os.getpid()} on {os.uname().nodename}".encode())
            return
        rank_lock = self.root / f"{LOCK_FILE}.{self.part_name.removesuffix('.parquet')}"
        fd = _take_flock(rank_lock, fcntl.LOCK_EX)
        if fd is None:
            self._refuse(rank_lock)
        self._lock_fds.append(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())

    def _refuse(self, lock: Path) -> None:
        holder = lock.read_text(errors="replace").strip() or "another process (a data-parallel run)"
        self.close()
        raise UserError(
            f"{self.root} is being written by {holder}: wait for it to finish or use "
            f"another output folder"
        )

    @contextmanager
    def _merge_lock(self):
        """A short exclusive lock around reading and rewriting the shared manifest."""
        if self.remote:  # no flock there (see the module docstring)
            yield
            return
        fd = _take_flock(self.root / f"{LOCK_FILE}.merge", fcntl.LOCK_EX, blocking=True)
        try:
            yield
        finally:
            os.close(fd)

    def _remove_leftovers(self) -> None:
        tmp = self.root / TMP_DIR
        if self.remote:
            pass  # shards are written in place there: an unlisted one is an orphan below
        elif self.world_size == 1:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():  # other ranks may be writing there: only this rank's shards
            for d in tmp.iterdir():
                index = _shard_index(d.name.split(".")[0])
                if index is not None and self.owns(index):
                    shutil.rmtree(d, ignore_errors=True)
        listed = {row["shard"] for row in self.committed}
        for name in self._listdir(SHARDS_GROUP):
            index = _shard_index(name)
            if name not in listed and index is not None and self.owns(index):
                self._rm(SHARDS_GROUP, name)  # orphan of a run killed before its manifest

    def close(self) -> None:
        """Release the locks (clearing the holder's name from the exclusive ones)."""
        for i, fd in enumerate(self._lock_fds):
            if i > 0 or self.world_size == 1:
                os.ftruncate(fd, 0)
            os.close(fd)
        self._lock_fds = []

    # -- writing -------------------------------------------------------------------------
    @property
    def num_committed_sequences(self) -> int:
        """How many sequences (in cache order) are committed."""
        return sum(row["num_sequences"] for row in self.committed)

    def write_shard(
        self, records: list[SequenceRecord], first_sequence: int, index: int | None = None
    ) -> dict:
        """Write one whole shard of consecutive sequences and commit it. Returns its row.

        Without `index` the shard is appended after the committed ones; with it (a planned
        shard of a resumable or data-parallel run) it must be one this writer owns."""
        if not records:
            raise ValueError("a shard needs at least one sequence")
        if index is None:
            if first_sequence != self.num_committed_sequences:
                raise ValueError(
                    f"shard starts at sequence {first_sequence}, expected "
                    f"{self.num_committed_sequences}"
                )
            index = len(self.committed)
        if not self.owns(index) or any(r["index"] == index for r in self.committed):
            raise ValueError(f"shard {index} is not this writer's to write")
        name = shard_name(index)
        arrays = self._concatenate(records)
        if self.remote:  # written in place; visible only once a manifest lists it
            self._rm(SHARDS_GROUP, name)
            where = self._url(SHARDS_GROUP, name)
        else:
            tmp = self.root / TMP_DIR / f"{name}.{os.getpid()}"
            tmp.parent.mkdir(exist_ok=True)
            where = str(tmp)
        group = zarr.open_group(where, mode="w", attributes={"shard_index": index})
        sums = {}
        for key, values in arrays.items():
            chunks = (min(CHUNK_ROWS, max(1, values.shape[0])),) + values.shape[1:]
            arr = group.create_array(
                key, shape=values.shape, dtype=values.dtype, chunks=chunks,
                filters=array_filters(key, self.card.encoding),
                compressors=array_codecs(key, values.dtype), fill_value=0,
            )
            arr[...] = values
            sums[f"sha256_{key}"] = array_sha256(values)
        names = arrays_for(self.card.mode)
        if self.remote:
            sums["sha256_meta"] = meta_sha256(
                lambda rel: self._read_bytes(SHARDS_GROUP, name, *rel.split("/")), names)
        else:
            sums["sha256_meta"] = meta_sha256(lambda rel: (tmp / rel).read_bytes(), names)
        if not self.remote:
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
            "bytes": self._bytes(SHARDS_GROUP, name),
            **sums,
        }
        if not self.remote:
            (self.root / PARTS_DIR).mkdir(exist_ok=True)
        self._put_parquet(self._mine + [row], PARTS_DIR, self.part_name)
        self._mine.append(row)
        self._publish()
        return row

    def _publish(self) -> None:
        """Rewrite manifest.parquet as the committed prefix 0, 1, 2 ... of all writers."""
        with self._merge_lock():
            self.committed = self._all_rows()
            prefix = committed_prefix(self.committed)
            if self.remote and self.world_size > 1 and len(prefix) < self.card.planned_shards:
                return  # only the whole manifest is put there (see the module docstring)
            if len(prefix) > len(read_manifest(self._url())):
                self._put_parquet(prefix, MANIFEST_FILE)

    def finish(self, num_shards: int) -> bool:
        """After this writer's last shard: True if all `num_shards` shards are committed and
        listed in manifest.parquet (the per-writer part manifests are then removed)."""
        self._publish()
        prefix = committed_prefix(self.committed)
        if len(prefix) < num_shards:
            return False
        with self._merge_lock():
            # complete.json first, then parts/ goes: a kill in between leaves a complete
            # cache with a leftover folder, never a finished one that looks unfinished.
            rows = prefix[:num_shards]
            card = CacheCard.from_attrs(self.card_attrs, where=self.url)
            self._put_bytes(render_readme(card, rows).encode(), README_FILE)
            self._put_bytes(canonical_json(complete_record(rows)), COMPLETE_FILE)
            self._rm(PARTS_DIR)
        return True

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
