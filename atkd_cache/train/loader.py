"""Streams a cache into training micro-batches: an IterableDataset over whole shards.

The order of one epoch is a pure function of (seed, epoch, shard lengths, layout), so a run
can be replayed exactly from a checkpoint:
1. shards are shuffled by (seed, epoch) and dealt to *slots* (one per rank x DataLoader
   worker), each to the slot with the fewest supervised positions so far: every slot owns
   whole shards and the ranks' loads differ by less than one shard;
2. a slot walks its shards in order, each shard's sequences in a seeded permutation, through
   a shuffle buffer of `shuffle_buffer` sequences;
3. every `group_size` sequences out of the buffer are sorted by length and cut into
   micro-batches of at most `batch_tokens` tokens (padded B x T, or packed into one row),
   and those micro-batches are emitted in a shuffled order.
Only the shards a slot is drawing from are held in memory, and the teacher stays sparse
(top-k rows) all the way to the device.

Resuming: a `Cursor` records the epoch, how many micro-batches each slot delivered, and which
sequences were consumed. With the same layout (ranks x workers) and settings the slots
replay their plans and skip what was delivered (exact); with another layout the epoch's plan
is rebuilt over the sequences not yet consumed (each is still seen once per epoch).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from atkd_cache.cache.join import same_sequence
from atkd_cache.cache.reader import Cache, CachedSequence, open_cache
from atkd_cache.errors import UserError
from atkd_cache.losses.bucket import support_columns

# (shard index, sequence index inside the shard, number of tokens)
SeqRef = tuple[int, int, int]


@dataclass
class LoaderConfig:
    """How sequences become micro-batches."""

    batch_tokens: int = 8192  # padded tokens (B x T) per micro-batch, or the packed length
    pack: bool = False  # pack sequences into one row (block-diagonal attention)
    shuffle: bool = True
    shuffle_buffer: int = 1024  # sequences
    group_size: int = 256  # sequences sorted by length together
    num_workers: int = 1
    prefetch: int = 2  # micro-batches per worker
    read_ahead: int = 1  # shards decoded ahead per worker, on a thread (remote caches)
    seed: int = 0
    # compare every shard with the manifest's sha256s as it is loaded (cache/reader.py)
    verify_reads: bool = True

    def check(self) -> None:
        """Raise ValueError on a setting that cannot work."""
        for name in ("batch_tokens", "shuffle_buffer", "group_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0, got {self.read_ahead}")


@dataclass
class Cursor:
    """Position of a run inside its data, saved in checkpoints.

    `slot_batches[s]` micro-batches of slot s were trained on, in the plan filtered by
    `base_consumed` (None: unfiltered); `consumed` marks every sequence trained on in this
    epoch, whatever the layout."""

    epoch: int = 0
    world_size: int = 1
    num_workers: int = 1
    slot_batches: list[int] = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)  # loader_settings() it ran with
    consumed: np.ndarray | None = None  # [num_sequences] bool
    base_consumed: np.ndarray | None = None


def loader_settings(cfg: LoaderConfig) -> dict:
    """The settings that decide the data order (replay needs them unchanged)."""
    ignored = ("num_workers", "prefetch", "read_ahead", "verify_reads")
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}


def slot_count(world_size: int, num_workers: int) -> int:
    """Slots = ranks x DataLoader workers (a worker-less loader is one slot per rank)."""
    return world_size * max(1, num_workers)


def assign_shards(
    shard_weights: list[int], slots: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """Deal shards (in a seeded order) to slots, each to the currently lightest slot."""
    order = np.arange(len(shard_weights))
    if shuffle:
        order = np.random.default_rng([seed, epoch, 0]).permutation(len(shard_weights))
    loads = [0] * slots
    owned: list[list[int]] = [[] for _ in range(slots)]
    for shard in order.tolist():
        lightest = loads.index(min(loads))
        owned[lightest].append(shard)
        loads[lightest] += shard_weights[shard]
    return owned


def _shuffle_buffer(items: Iterator[SeqRef], size: int, rng) -> Iterator[SeqRef]:
    buffer: list[SeqRef] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)).tolist():
        yield buffer[j]


def cut_batches(group: list[SeqRef], batch_tokens: int, pack: bool) -> list[list[SeqRef]]:
    """Sort by length, then cut into batches: padded B x max_len (or packed sum of lengths)
    at most `batch_tokens`; a longer sequence becomes a batch of its own."""
    batches: list[list[SeqRef]] = []
    current: list[SeqRef] = []
    used = 0
    for ref in sorted(group, key=lambda r: r[2]):
        n = ref[2]
        size = used + n if pack else (len(current) + 1) * n
        if current and size > batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(ref)
        used += n
    if current:
        batches.append(current)
    return batches


def plan_slot(
    shards: list[int],
    lengths_of,
    cfg: LoaderConfig,
    epoch: int,
    slot: int,
    exclude: np.ndarray | None = None,
    first_sequence: list[int] | None = None,
    on_shard=None,
) -> Iterator[list[SeqRef]]:
    """The micro-batches (lists of sequence refs) one slot delivers in one epoch.

    `lengths_of(shard)` gives the shard's token count per sequence; sequences whose global
    index (first_sequence[shard] + local) is set in `exclude` are left out; `on_shard(shard,
    count)` is told how many sequences of a shard the plan will use."""
    rng = np.random.default_rng([cfg.seed, epoch, slot + 1])

    def sequences() -> Iterator[SeqRef]:
        for shard in shards:
            lengths = lengths_of(shard)
            locals_ = np.arange(len(lengths))
            if cfg.shuffle:
                locals_ = np.random.default_rng([cfg.seed, epoch, 0, shard]).permutation(
                    len(lengths)
                )
            if exclude is not None:
                locals_ = locals_[~exclude[first_sequence[shard] + locals_]]
            if on_shard is not None:
                on_shard(shard, len(locals_))
            for local in locals_.tolist():
                yield shard, local, int(lengths[local])

    stream = sequences()
    if cfg.shuffle:
        stream = _shuffle_buffer(stream, cfg.shuffle_buffer, rng)
    group: list[SeqRef] = []
    for ref in stream:
        group.append(ref)
        if len(group) == cfg.group_size:
            yield from _emit(group, cfg, rng)
            group = []
    if group:
        yield from _emit(group, cfg, rng)


def _emit(group: list[SeqRef], cfg: LoaderConfig, rng) -> list[list[SeqRef]]:
    batches = cut_batches(group, cfg.batch_tokens, cfg.pack)
    if cfg.shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    return batches


def pad_samples(
    sizes: np.ndarray, ids: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat per-position sample entries -> [N, max size] ids (int32) and counts (int16),
    padded with id 0 and count 0."""
    sizes = sizes.astype(np.int64)
    n, width = sizes.shape[0], int(sizes.max()) if sizes.size else 1
    row = np.repeat(np.arange(n), sizes)
    col = np.arange(ids.shape[0]) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    out_ids = np.zeros((n, width), dtype=np.int32)
    out_counts = np.zeros((n, width), dtype=np.int16)
    out_ids[row, col] = ids
    out_counts[row, col] = counts
    return out_ids, out_counts


def teacher_arrays(seqs: list[CachedSequence], prefix: str = "") -> dict[str, torch.Tensor]:
    """One teacher's rows of a micro-batch (the sequences' supervised positions in order),
    as tensors named `prefix + name`."""
    sampled = seqs[0].sample_ids is not None
    names = ("target_logprob", "uncertainty", "entropy", "hard")
    names += ("sample_sizes", "sample_ids", "sample_counts") if sampled else (
        "topk_ids", "topk_logprobs")
    cat = {name: np.concatenate([getattr(s, name) for s in seqs]) for name in names}
    out = {name: torch.from_numpy(cat[name]) for name in names[:4]}
    if sampled:
        ids, draws = pad_samples(cat["sample_sizes"], cat["sample_ids"], cat["sample_counts"])
        out.update(sample_ids=torch.from_numpy(ids), sample_counts=torch.from_numpy(draws))
    else:
        out.update(topk_ids=torch.from_numpy(cat["topk_ids"].astype(np.int32)),
                   topk_logprobs=torch.from_numpy(cat["topk_logprobs"]))
    return {prefix + name: value for name, value in out.items()}


def collate(
    seqs: list[CachedSequence], pack: bool, others: tuple[list[CachedSequence], ...] = ()
) -> dict[str, torch.Tensor]:
    """Build one micro-batch from sequences read from a cache.

    `rows` indexes the flattened [B * T] positions whose next token is supervised, in the
    same order as the teacher arrays; `group_offsets` delimits each sequence's rows.
    `others`: the same sequences read from more caches (several teachers); teacher i's
    arrays are named "teacher{i}.<name>" (i = 1, 2, ...)."""
    layout, starts = token_layout([s.input_ids for s in seqs], pack)
    rows_of = [
        start + np.flatnonzero(s.supervised) for start, s in zip(starts, seqs, strict=True)
    ]
    counts = [len(r) for r in rows_of]
    batch = {
        **layout,
        "rows": torch.from_numpy(np.concatenate(rows_of).astype(np.int64)),
        "group_offsets": torch.from_numpy(np.cumsum([0, *counts]).astype(np.int64)),
        "seq_index": torch.tensor([s.index for s in seqs], dtype=torch.int64),
        "target_ids": torch.from_numpy(
            np.concatenate([s.target_ids for s in seqs]).astype(np.int64)),
        "real_tokens": torch.tensor(sum(len(s.input_ids) for s in seqs)),
        **teacher_arrays(seqs),
    }
    max_id = int(layout["input_ids"].max())
    for i, more in enumerate(others, start=1):  # the same sequences, another teacher each
        batch.update(teacher_arrays(more, prefix=f"teacher{i}."))
    for key, value in batch.items():
        if key.endswith(("topk_ids", "sample_ids")) and value.numel():
            max_id = max(max_id, int(value.max()))
    batch["max_id"] = torch.tensor(max_id)
    return batch


def token_layout(token_arrays: list[np.ndarray], pack: bool
                 ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Sequences' tokens as a micro-batch's model input: padded rows [B, T] with an
    attention mask, or (pack) one row of them all with position ids restarting per sequence;
    and where each sequence starts in the flattened input (the base of its `rows`)."""
    lengths = [len(t) for t in token_arrays]
    if pack:
        layout = {"input_ids": np.concatenate(token_arrays)[None].astype(np.int64),
                  "position_ids": np.concatenate([np.arange(n) for n in lengths])[None]
                  .astype(np.int64)}
        starts = np.cumsum([0, *lengths[:-1]])
    else:
        width = max(lengths)
        layout = {"input_ids": np.zeros((len(lengths), width), dtype=np.int64),
                  "attention_mask": np.zeros((len(lengths), width), dtype=np.int64)}
        for b, t in enumerate(token_arrays):
            layout["input_ids"][b, : lengths[b]] = t
            layout["attention_mask"][b, : lengths[b]] = 1
        starts = np.arange(len(lengths)) * width
    return {k: torch.from_numpy(v) for k, v in layout.items()}, starts


def collate_aligned(seqs: list[CachedSequence], aligned: list, pack: bool,
                    vocab_map: np.ndarray) -> dict[str, torch.Tensor]:
    """A cross-tokenizer micro-batch (train/align.py): the student's own token ids as input
    (laid out as `collate` lays out the teacher's), `rows` = the student positions whose next
    token lies in a counted chunk, and the chunk arrays under "chunk." (losses/crosstok.py
    ChunkTeacher). The teacher's support where each chunk starts (bucket.support_columns:
    its target, then its top-k) is mapped to student ids by exact bytes (`vocab_map`, -1:
    none)."""
    layout, starts = token_layout([a.student_ids for a in aligned], pack)
    row_base = np.cumsum([0, *[len(a.rows) for a in aligned]])
    chunk_base = np.cumsum([0, *[len(a.teacher_ll) for a in aligned]])
    batch = {
        **layout,
        "rows": torch.from_numpy(np.concatenate(
            [s + a.rows for s, a in zip(starts, aligned, strict=True)]).astype(np.int64)),
        "group_offsets": torch.from_numpy(row_base.astype(np.int64)),
        "seq_index": torch.tensor([s.index for s in seqs], dtype=torch.int64),
        "target_ids": torch.from_numpy(np.concatenate([a.target_ids for a in aligned])),
        "real_tokens": torch.tensor(sum(len(a.student_ids) for a in aligned)),
        "max_id": torch.tensor(int(layout["input_ids"].max()) if layout["input_ids"].numel()
                               else 0),
        "chunk.chunk_of_row": torch.from_numpy(np.concatenate(
            [c + a.chunk_of_row for c, a in zip(chunk_base[:-1], aligned, strict=True)])),
        "chunk.teacher_ll": torch.from_numpy(np.concatenate([a.teacher_ll for a in aligned])),
        "chunk.first_row": torch.from_numpy(np.concatenate(
            [r + a.first_row for r, a in zip(row_base[:-1], aligned, strict=True)])),
        "chunk.bytes": torch.from_numpy(np.concatenate([a.chunk_bytes for a in aligned])),
        "chunk.offsets": torch.from_numpy(chunk_base.astype(np.int64)),
    }
    if seqs[0].topk_ids is not None:  # the teacher's support where each chunk starts
        def cat(pick) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(
                [pick(s, a) for s, a in zip(seqs, aligned, strict=True)]))

        ids, valid = support_columns(
            cat(lambda s, a: s.topk_ids[a.teacher_first].astype(np.int64)),
            cat(lambda s, a: a.teacher_first_id.astype(np.int64)))
        lp = torch.cat([cat(lambda s, a: s.target_logprob[a.teacher_first])[:, None].float(),
                        cat(lambda s, a: s.topk_logprobs[a.teacher_first]).float()], dim=1)
        batch["chunk.support_logprobs"] = lp
        batch["chunk.support_valid"] = valid
        batch["chunk.support_student_ids"] = torch.from_numpy(vocab_map[ids.numpy()])
    return batch


class ShardReadAhead:
    """Whole shards for one slot, `depth` of them decoded ahead on a background thread while
    the current one is consumed, so a remote cache (s3://, gs:// ...) does not starve the
    trainer. depth = 0 reads each shard when it is needed."""

    def __init__(self, cache: Cache, order: list[int], depth: int):
        self.cache, self.order, self.depth = cache, order, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead") if depth else None
        self.futures: dict[int, Future] = {}
        self.delivered: set[int] = set()

    def get(self, shard: int) -> dict[str, np.ndarray]:
        """The decoded arrays of a shard; starts reading the next `depth` ones not delivered
        yet (the shuffle buffer asks for shards out of order: one asked for already is held
        by the caller until it is done with it, and must not be read again)."""
        self.delivered.add(shard)
        if self.pool is None:
            return self.cache.read_shard(shard)
        future = self.futures.pop(shard, None) or self.pool.submit(self.cache.read_shard, shard)
        at = self.order.index(shard) if shard in self.order else len(self.order)
        ahead = [s for s in self.order[at + 1:] if s not in self.delivered][: self.depth]
        for nxt in ahead:
            if nxt not in self.futures:
                self.futures[nxt] = self.pool.submit(self.cache.read_shard, nxt)
        return future.result()

    def close(self) -> None:
        """Drop what was read ahead and stop the thread."""
        for future in self.futures.values():
            future.cancel()
        self.futures = {}
        if self.pool is not None:
            self.pool.shutdown(wait=False)


class AlignedReader:
    """Another cache's copy of the lead cache's sequences, by sequence index. With the same
    shard plan (the usual case: the same data and --shard-positions) shard s of the lead is
    shard s here: read ahead in the same order and dropped with it, so two caches cost what
    reading them one after the other costs. With another plan each sequence is found by its
    index, and a shard stays decoded until every lead shard it overlaps is released (each is
    then read once per epoch, as the lead's are)."""

    def __init__(self, cache: Cache, lead: Cache, order: list[int], depth: int):
        self.cache = cache
        spans = [(r["first_sequence"], r["first_sequence"] + r["num_sequences"])
                 for r in cache.shard_rows]
        lead_spans = [(r["first_sequence"], r["first_sequence"] + r["num_sequences"])
                      for r in lead.shard_rows]
        self.same_plan = spans == lead_spans
        self.starts = [a for a, _ in spans]
        # this slot's lead shards each of our shards overlaps (released one by one)
        self.waiting = {o: {s for s in order if lead_spans[s][0] < b and a < lead_spans[s][1]}
                        for o, (a, b) in enumerate(spans)}
        self.reader = ShardReadAhead(cache, order if self.same_plan else [],
                                     depth if self.same_plan else 0)
        self.loaded: dict[int, dict[str, np.ndarray]] = {}

    def sequence(self, index: int, lead_shard: int) -> CachedSequence:
        """Sequence `index` (global, in cache order) of this cache."""
        shard = lead_shard if self.same_plan else self._shard_of(index)
        if shard not in self.loaded:
            self.loaded[shard] = self.reader.get(shard)
        local = index - self.cache.shard_rows[shard]["first_sequence"]
        return self.cache.sequence_in(self.loaded[shard], shard, local)

    def _shard_of(self, index: int) -> int:
        shard = bisect.bisect_right(self.starts, index) - 1
        row = self.cache.shard_rows[shard] if shard >= 0 else None
        if row is None or index >= row["first_sequence"] + row["num_sequences"]:
            raise UserError(f"{self.cache.path} has not committed sequence {index}")
        return shard

    def release(self, lead_shard: int) -> None:
        """The lead is done with a shard: drop what only it needed."""
        if self.same_plan:
            self.loaded.pop(lead_shard, None)
            return
        for shard in list(self.loaded):
            self.waiting[shard].discard(lead_shard)
            if not self.waiting[shard]:
                self.loaded.pop(shard)

    def close(self) -> None:
        """Stop reading ahead."""
        self.reader.close()


class CacheDataset(IterableDataset):
    """Micro-batches of one rank's share of a cache for one epoch (`set_epoch` between
    epochs). Every DataLoader worker opens the cache itself, lazily: fsspec clients are not
    fork-safe. Batches carry `slot` and `seq_index` so the trainer can keep a `Cursor`.

    Several paths: caches of the same sequences by several teachers (cache/join.py). The
    first one's shards decide the plan; the others are read in lock-step and every sequence
    is compared with the first's; batches carry their teachers as "teacher{i}.<name>"."""

    def __init__(
        self,
        path: str | list[str] | tuple[str, ...],
        cfg: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        resume: Cursor | None = None,
        aligner=None,
    ):
        cfg.check()
        # a student of another tokenizer: each sequence is re-tokenized and cut into chunks
        # (train/align.py Aligner) before it is collated
        self.aligner = aligner
        self.paths = [path] if isinstance(path, str) else list(path)
        self.path, self.cfg = self.paths[0], cfg
        self.rank, self.world_size = rank, world_size
        self.epoch = resume.epoch if resume else 0
        self.resume = resume
        self._caches: list[Cache] | None = None

    @property
    def caches(self) -> list[Cache]:
        """The opened caches, the lead first (opened on first use, in whichever process
        uses them)."""
        if self._caches is None:
            self._caches = [open_cache(p, check=self.cfg.verify_reads) for p in self.paths]
        return self._caches

    @property
    def cache(self) -> Cache:
        """The lead cache: its shards decide the plan."""
        return self.caches[0]

    def __getstate__(self):  # never ship an opened store to a worker process
        state = dict(self.__dict__)
        state["_caches"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration delivers."""
        self.epoch = epoch

    @property
    def workers(self) -> int:
        """Slots per rank."""
        return max(1, self.cfg.num_workers)

    def resume_mode(self) -> str | None:
        """How the resume cursor applies to the current epoch: replay, filter or None."""
        r = self.resume
        if r is None or r.epoch != self.epoch:
            return None
        same = (r.world_size, r.num_workers, r.settings) == (
            self.world_size, self.workers, loader_settings(self.cfg)
        )
        return "replay" if same else "filter"

    def _rotation(self) -> int:
        """Which logical slot DataLoader worker 0 plays: the trainer took micro-batches from
        this rank's workers round-robin, so the next one is due from worker (taken mod n)."""
        if self.resume_mode() != "replay":
            return 0
        mine = self.resume.slot_batches[self.rank * self.workers : (self.rank + 1) * self.workers]
        return sum(mine) % self.workers

    def slot_plan(self, slot: int, on_shard=None) -> tuple[Iterator[list[SeqRef]], int]:
        """(the plan of one slot for the current epoch, how many of its micro-batches were
        already trained on and must be skipped). Reads only the shards' offsets."""
        cache = self.cache
        owned = self.owned_shards(slot)
        mode, skip, exclude = self.resume_mode(), 0, None
        if mode == "replay":
            skip, exclude = self.resume.slot_batches[slot], self.resume.base_consumed
        elif mode == "filter":
            exclude = self.resume.consumed

        def lengths_of(shard: int) -> np.ndarray:
            return np.diff(cache.read_shard(shard, ("token_offsets",))["token_offsets"])

        first = [row["first_sequence"] for row in cache.shard_rows]
        plan = plan_slot(owned, lengths_of, self.cfg, self.epoch, slot, exclude, first, on_shard)
        return plan, skip

    def owned_shards(self, slot: int) -> list[int]:
        """The shards one slot reads in the current epoch, in reading order."""
        weights = [row["num_supervised"] for row in self.cache.shard_rows]
        slots = slot_count(self.world_size, self.cfg.num_workers)
        return assign_shards(weights, slots, self.cfg.seed, self.epoch, self.cfg.shuffle)[slot]

    def base_consumed(self) -> np.ndarray | None:
        """The filter the current epoch's plan was built with (for the next cursor)."""
        mode = self.resume_mode()
        if mode == "replay":
            return self.resume.base_consumed
        if mode == "filter":
            return self.resume.consumed
        return None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches of this slot; a damaged shard ends the stream with {"error": line}
        (an exception raised in a DataLoader worker would reach the trainer as a traceback
        dump, and under DDP the other ranks must be told too: see `raise_on_error`)."""
        try:
            yield from self._batches()
        except UserError as e:
            yield {"error": str(e)}

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = self.rank * self.workers + (worker + self._rotation()) % self.workers
        cache = self.cache
        # A shard stays decoded until every sequence the plan takes from it was delivered.
        loaded: dict[int, dict[str, np.ndarray]] = {}
        pending: dict[int, int] = {}
        plan, skip = self.slot_plan(slot, on_shard=pending.__setitem__)
        owned = self.owned_shards(slot)
        reader = ShardReadAhead(cache, owned, self.cfg.read_ahead)
        aligned = [AlignedReader(c, cache, owned, self.cfg.read_ahead) for c in self.caches[1:]]
        try:
            for i, refs in enumerate(plan):
                if i >= skip:
                    seqs = []
                    for shard, local, _ in refs:
                        if shard not in loaded:
                            loaded[shard] = reader.get(shard)
                        seqs.append(cache.sequence_in(loaded[shard], shard, local))
                    others = tuple([a.sequence(s.index, ref[0]) for s, ref in zip(
                        seqs, refs, strict=True)] for a in aligned)
                    for a, more in zip(aligned, others, strict=True):
                        for s, m in zip(seqs, more, strict=True):
                            same_sequence(s, m, a.cache.path)
                    if self.aligner is not None:
                        batch = collate_aligned(seqs, [self.aligner.align(s) for s in seqs],
                                                self.cfg.pack, self.aligner.vocab_map)
                    else:
                        batch = collate(seqs, self.cfg.pack, others)
                    batch["slot"] = torch.tensor(slot)
                    yield batch
                for shard, _, _ in refs:
                    pending[shard] -= 1
                    if pending[shard] == 0:
                        loaded.pop(shard, None)
                        for a in aligned:
                            a.release(shard)
        finally:
            reader.close()
            for a in aligned:
                a.close()


def raise_on_error(batches) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of a loader, raising the UserError a worker reported in their place."""
    for batch in batches:
        if "error" in batch:
            raise UserError(batch["error"])
        yield batch


def plan_sizes(dataset: CacheDataset) -> list[int]:
    """Micro-batches each rank will deliver in the dataset's current epoch (no data read
    beyond the shards' offsets)."""
    per_rank = [0] * dataset.world_size
    for slot in range(slot_count(dataset.world_size, dataset.cfg.num_workers)):
        plan, skip = dataset.slot_plan(slot)
        per_rank[slot // dataset.workers] += sum(1 for _ in plan) - skip
    return per_rank


def make_loader(dataset: CacheDataset, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over already-collated micro-batches. It gets its own generator: by
    default each new iterator draws a seed from the global torch RNG, which would make the
    training run's RNG stream (dropout) depend on when epochs start and runs resume."""
    workers = dataset.cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=dataset.cfg.prefetch if workers else None,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(dataset.cfg.seed),
    )
