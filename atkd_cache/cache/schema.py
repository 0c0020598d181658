"""Cache format v1: the cache card and the per-shard arrays. docs/cache-format.md is the spec.

Layout of a cache directory (a Zarr v3 hierarchy plus one Parquet file):

    CACHE/zarr.json              root group; its attributes are the cache card
    CACHE/shards/zarr.json       group holding the committed shards
    CACHE/shards/shard-000000/   one Zarr group per shard (arrays below)
    CACHE/manifest.parquet       the committed shards, in order; readers trust only this
    CACHE/complete.json          written when every planned shard is committed
    CACHE/parts/                 per-writer manifests of a run in progress (cache/writer.py)
    CACHE/.lock*                 flocks held by writers while they run
    CACHE/.tmp/                  shards being written; never read
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numcodecs
import numpy as np
import pyarrow as pa
from zarr.codecs import BitRound, BloscCodec, BloscShuffle, Crc32cCodec

from atkd_cache.errors import UserError

FORMAT_NAME = "atkd-cache"
# Version 1: top-k caches, standard encoding. Version 2 adds sampled caches and the packed
# encoding; a cache that uses neither is still written as version 1 (old readers read it).
FORMAT_VERSION = 2
MODES = ("topk", "sampled")
ENCODINGS = ("standard", "packed")
MANIFEST_FILE = "manifest.parquet"
COMPLETE_FILE = "complete.json"
SHARDS_GROUP = "shards"
TMP_DIR = ".tmp"
PARTS_DIR = "parts"
LOCK_FILE = ".lock"
TOKENIZER_DIR = "tokenizer"  # the teacher tokenizer's files (card.text), written before the card

# Per-sequence arrays have one row per sequence (+1 for offsets); per-token arrays one row per
# token of every sequence; per-position arrays one row per *supervised* position; sample
# arrays one row per (supervised position, unique sampled id) (see docs).
SEQUENCE_ARRAYS = ("seq_ids", "token_offsets", "sup_offsets")
TOKEN_ARRAYS = ("input_ids",)
POSITION_MASK_ARRAYS = ("supervised",)
SUPERVISED_ARRAYS = ("target_logprob", "entropy", "uncertainty", "hard")
TOPK_ARRAYS = ("topk_ids", "topk_logprobs")  # per supervised position, [m, k]
SAMPLED_ARRAYS = ("sample_offsets", "sample_sizes", "sample_ids", "sample_counts")
MODE_ARRAYS = {"topk": TOPK_ARRAYS, "sampled": SAMPLED_ARRAYS}
ALL_ARRAYS = (
    SEQUENCE_ARRAYS + TOKEN_ARRAYS + POSITION_MASK_ARRAYS + SUPERVISED_ARRAYS + TOPK_ARRAYS
    + SAMPLED_ARRAYS
)
MAX_SAMPLES = 255  # counts are uint8


def arrays_for(mode: str) -> tuple[str, ...]:
    """The arrays every shard of a cache in this mode holds."""
    common = SEQUENCE_ARRAYS + TOKEN_ARRAYS + POSITION_MASK_ARRAYS + SUPERVISED_ARRAYS
    return common + MODE_ARRAYS[mode]

# One manifest row per committed shard, in order; sha256_<array> checksums the decoded array
# (null for arrays the cache's mode does not have), sha256_meta the shard's metadata files
# (cache/integrity.py; null in manifests written before it existed).
MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("index", pa.int64()),
        ("first_sequence", pa.int64()),
        ("num_sequences", pa.int64()),
        ("first_seq_id", pa.int64()),
        ("num_tokens", pa.int64()),
        ("num_positions", pa.int64()),
        ("num_supervised", pa.int64()),
        ("num_hard", pa.int64()),
        ("bytes", pa.int64()),
    ]
    + [(f"sha256_{name}", pa.string()) for name in ALL_ARRAYS]
    + [("sha256_meta", pa.string())]
)



# Rows per chunk along the first axis. One chunk of a k=64 shard is ~16 MiB decoded; big
# chunks compress better and are read whole by the streaming loader anyway.
CHUNK_ROWS = 131072


def ids_dtype(logits_width: int) -> np.dtype:
    """Smallest unsigned dtype holding every token id of a model with this logits width."""
    return np.dtype("<u2") if logits_width <= 2**16 else np.dtype("<u4")


def array_dtypes(logits_width: int, logprob_dtype: str) -> dict[str, np.dtype]:
    """The dtype of every shard array for a cache with these parameters."""
    ids = ids_dtype(logits_width)
    return {
        "seq_ids": np.dtype("<i8"),
        "token_offsets": np.dtype("<i8"),
        "sup_offsets": np.dtype("<i8"),
        "input_ids": ids,
        "supervised": np.dtype("bool"),
        "target_logprob": np.dtype("<f4"),
        "topk_ids": ids,
        "topk_logprobs": np.dtype(logprob_dtype).newbyteorder("<"),
        "entropy": np.dtype("<f4"),
        "uncertainty": np.dtype("<f4"),
        "hard": np.dtype("bool"),
        "sample_offsets": np.dtype("<i8"),
        "sample_sizes": np.dtype("u1"),
        "sample_ids": ids,
        "sample_counts": np.dtype("u1"),
    }


def array_codecs(name: str, dtype: np.dtype) -> list:
    """Compressors for one array: Blosc-zstd with a shuffle chosen per array, then crc32c.

    Chosen by measurement on a real SmolLM2 cache (benchmarks/bench_codecs.py,
    docs/benchmarks.md): byte shuffle wins on floats (37.7 vs 44.2 bytes/token for k=32
    log-probs), no shuffle on 16-bit token ids (48.0 vs 50.2), bit shuffle on booleans. zstd
    level 9 saves 3 % more at 15x the encode time: not worth it. 32-bit ids (V > 65,536) get
    byte shuffle: their two high bytes are nearly constant and compress to almost nothing.
    """
    if name in ("supervised", "hard"):
        shuffle = BloscShuffle.bitshuffle
    elif name in ("input_ids", "topk_ids", "sample_ids") and dtype.itemsize == 2:
        shuffle = BloscShuffle.noshuffle
    else:
        shuffle = BloscShuffle.shuffle
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]


# The packed encoding (chosen by benchmarks/bench_fidelity.py, docs/benchmarks.md): float
# mantissas rounded to PACKED_KEEPBITS bits (lossy; the writer rounds before checksumming,
# so checksums are of what readers decode). Ids stay as they are: delta-coding the sorted
# sampled ids compressed worse than plain ids (zstd finds the common tokens' repeats).
PACKED_KEEPBITS = {"target_logprob": 10, "entropy": 7, "uncertainty": 10, "topk_logprobs": 7}
# zarr warns that numcodecs filters are outside the Zarr v3 core spec; docs/cache-format.md
# says which ones a packed cache uses (zarr-python and numcodecs read them).
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")


def array_filters(name: str, encoding: str) -> list:
    """Array-to-array codecs applied before compression (none for the standard encoding)."""
    if encoding != "packed":
        return []
    if name in PACKED_KEEPBITS:
        return [BitRound(keepbits=PACKED_KEEPBITS[name])]
    return []


def round_for_encoding(name: str, values: np.ndarray, encoding: str) -> np.ndarray:
    """The values a reader will decode for this array (lossy filters applied, else as is)."""
    if encoding == "packed" and name in PACKED_KEEPBITS:
        rounded = numcodecs.BitRound(PACKED_KEEPBITS[name]).encode(values)
        return rounded.view(values.dtype).reshape(values.shape)
    return values


# Accepted JSON types of the card's fields, by their annotation (checked when a card is read).
_FIELD_TYPES = {
    "str": str, "str | None": (str, type(None)), "int": int, "int | None": (int, type(None)),
    "float": (int, float), "dict[str, str]": dict, "dict[str, Any]": dict,
    "list[float]": list,
}
# Two served teachers are the same teacher when their probe answers (teacher_probe) differ by
# at most this many nats at every position (teacher/server.py measures and explains it).
PROBE_TOLERANCE = 5e-3


@dataclass
class CacheCard:
    """What a cache is: everything needed to trust, reuse and reproduce it.

    Stored as the attributes of the root Zarr group. Two runs with equal cards (ignoring
    `created_at`) produce the same arrays, which is what resume relies on.
    """

    teacher_id: str
    teacher_revision: str | None
    teacher_weights_hash: str
    teacher_dtype: str
    tokenizer_fingerprint: str
    tokenizer_vocab_size: int
    logits_width: int
    top_k: int
    temperature: float
    data_source: str
    data_split: str | None
    data_shape: str  # "text" | "prompt_response" | "chat" | "ids" (given token ids)
    data_fields: dict[str, str]
    data_template: str | None
    data_limit: int | None
    data_fingerprint: str
    max_length: int | None
    label_rule: str
    hard_ratio: float
    backend: str
    # For each stored quantity: "exact", or "bound" when a backend cannot compute it exactly.
    exactness: dict[str, str]
    logprob_dtype: str
    shard_positions: int
    tool_version: str
    # "topk" (top-k ids + log-probs) | "sampled" (num_samples draws from the teacher per
    # position, seeded by (sample_seed, seq_id); unique ids + counts). top_k is 0 if sampled.
    mode: str = "topk"
    num_samples: int = 0
    sample_seed: int = 0
    encoding: str = "standard"  # "standard" | "packed" (see array_filters)
    # sha256 of what the cache holds (content_fingerprint); "" in caches made before it existed
    fingerprint: str = ""
    # shards in the dump's plan (0 in caches made before it was recorded): a cache whose
    # manifest lists fewer is partial
    planned_shards: int = 0
    # `dump-teacher --generate`: the generation settings (GenerationSpec.card(): num_responses,
    # temperature, top_p, max_new_tokens, greedy, seed, eos_token_ids); {} for a cache of
    # given sequences. A generated sequence's seq_id is prompt_row * num_responses + response.
    generation: dict[str, Any] = field(default_factory=dict)
    # `--backend server`: the served teacher's target log-probs of a fixed probe sequence
    # (teacher/server.py PROBE_TEXT), its numeric fingerprint: servers of another dtype or
    # build answer differently. Compared within PROBE_TOLERANCE; [] for the other backends.
    teacher_probe: list[float] = field(default_factory=list)
    # The text the teacher scored (cross-tokenizer students): {"tokenizer": folder under the
    # cache holding the teacher tokenizer's files, "files": {name: sha256}, "byte_level":
    # whether its tokens are exact bytes}. {} in caches made before it was stored. Not part
    # of the content fingerprint: tokenizer_fingerprint already says which tokenizer it is.
    text: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # Fields allowed to differ between a cache and a run that resumes it (planned_shards
    # follows from data_fingerprint and shard_positions, which must match; caches made
    # before it was recorded hold 0).
    VOLATILE = ("created_at", "planned_shards", "text")
    # Fields that do not change what a cache holds: where the data and teacher were read
    # from (their content is fingerprinted), storage layout, provenance.
    NOT_CONTENT = ("created_at", "fingerprint", "tool_version", "shard_positions",
                   "data_source", "data_split", "data_limit", "extra", "format_version",
                   "planned_shards", "text")

    def content_fingerprint(self) -> str:
        """sha256 over everything that decides the cache's arrays: teacher (weights hash, or
        id + revision for hub models), dtype, tokenizer, data content, parameters, encoding.
        Two caches with the same fingerprint hold the same teacher outputs for the same
        sequences (shard boundaries may differ)."""
        fields = {k: v for k, v in self.to_attrs().items() if k not in self.NOT_CONTENT}
        if fields["teacher_weights_hash"]:  # the same weights at another path are the same
            fields.pop("teacher_id")
            fields.pop("teacher_revision")
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    @property
    def identity(self) -> str:
        """The stored fingerprint, or the computed one for caches made before it existed."""
        return self.fingerprint or self.content_fingerprint()

    def to_attrs(self) -> dict[str, Any]:
        """The card as JSON-able Zarr attributes (no `generation` key for a cache of given
        sequences: its card stays what writers before --generate wrote)."""
        attrs = dataclasses.asdict(self)
        for key in ("generation", "teacher_probe", "text"):  # absent where unused: older cards stay
            if not attrs[key]:
                del attrs[key]
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str = "cache") -> CacheCard:
        """Parse root-group attributes; refuse non-caches and newer format versions."""
        if attrs.get("format") != FORMAT_NAME:
            raise UserError(f"{where} is not an atkd-cache cache (its root group has no card)")
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(
                f"{where} was written by a newer atkd-cache (format version {version}; this "
                f"version reads up to {FORMAT_VERSION}): upgrade atkd-cache"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in fields.items():
            if name not in attrs:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise UserError(f"{where}: the card (zarr.json) lacks the field {name!r}: "
                                    f"the cache is damaged; re-copy it or dump it again")
            elif not isinstance(attrs[name], _FIELD_TYPES[f.type]) or (
                isinstance(attrs[name], bool) and f.type.startswith(("int", "float"))
            ):
                raise UserError(f"{where}: the card (zarr.json) has {name} = {attrs[name]!r}, "
                                f"not of type {f.type}: the cache is damaged")
        card = cls(**{k: v for k, v in attrs.items() if k in fields})
        if card.mode not in MODES or card.encoding not in ENCODINGS:
            raise UserError(
                f"{where} has mode {card.mode!r} / encoding {card.encoding!r}, which this "
                f"atkd-cache does not know: upgrade atkd-cache"
            )
        return card

    @property
    def needed_version(self) -> int:
        """The oldest format version that can read this cache."""
        return 1 if (self.mode, self.encoding) == ("topk", "standard") else 2

    def first_difference(
        self, other: CacheCard, ignore: tuple[str, ...] = VOLATILE
    ) -> tuple[str, Any, Any] | None:
        """The first field (other than `ignore`d ones) where two cards differ, if any."""
        mine, theirs = self.to_attrs(), other.to_attrs()
        # the fingerprint follows from the other fields: name one of those if one differs
        keys = list(mine) + [k for k in theirs if k not in mine]
        for key in sorted(keys, key=lambda name: name == "fingerprint"):  # stable sort
            if key not in ignore and mine.get(key) != theirs.get(key):
                a, b = mine.get(key), theirs.get(key)
                if key == "teacher_probe" and probes_agree(a or [], b or []):
                    continue
                if key == "generation":
                    a, b = a or {}, b or {}
                    for sub in sorted(set(a) | set(b)):  # name the setting, not the dict
                        if a.get(sub) != b.get(sub):
                            return f"generation.{sub}", a.get(sub), b.get(sub)
                return key, a, b
        return None

    @property
    def generated(self) -> bool:
        """Were the sequences written by the teacher (dump-teacher --generate)?"""
        return bool(self.generation)


def probes_agree(a: list[float], b: list[float]) -> bool:
    """Do two served teachers' probe answers agree within PROBE_TOLERANCE?"""
    return len(a) == len(b) and all(
        abs(x - y) <= PROBE_TOLERANCE for x, y in zip(a, b, strict=True))


def probe_gap(a: list[float] | None, b: list[float] | None) -> str:
    """How two probe answers differ, in words."""
    a, b = a or [], b or []
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} probe positions"
    worst = max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
    return f"log-probs up to {worst:.3g} nats apart, more than {PROBE_TOLERANCE:g}"


@dataclass
class SequenceRecord:
    """The teacher's output for one sequence, ready to be stored.

    `supervised` has one entry per position t = 0..n-2 (does position t predict a supervised
    token x_{t+1}?); the per-position teacher arrays have one row per supervised position.
    """

    seq_id: int
    input_ids: np.ndarray  # [n]
    supervised: np.ndarray  # [n - 1] bool
    target_logprob: np.ndarray  # [m]
    entropy: np.ndarray  # [m]
    uncertainty: np.ndarray  # [m]
    hard: np.ndarray  # [m] bool
    # top-k mode
    topk_ids: np.ndarray | None = None  # [m, k]
    topk_logprobs: np.ndarray | None = None  # [m, k]
    # sampled mode: position i owns sample_sizes[i] consecutive entries of the flat arrays
    sample_sizes: np.ndarray | None = None  # [m] unique ids drawn at each position
    sample_ids: np.ndarray | None = None  # [u] ascending within a position
    sample_counts: np.ndarray | None = None  # [u] draws of each id (weights count / N)

    @property
    def target_ids(self) -> np.ndarray:
        """The actual next token of each supervised position."""
        return self.input_ids[1:][self.supervised]
