"""`info` and `verify`: summaries of a cache and a full integrity check."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np

from atkd_cache.cache.integrity import array_sha256, meta_sha256
from atkd_cache.cache.reader import Cache, DamagedCache
from atkd_cache.cache.schema import PARTS_DIR, SHARDS_GROUP, TMP_DIR
from atkd_cache.fingerprint import add_sequence


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    q = np.quantile(values.astype(np.float64), [0.1, 0.5, 0.9])
    return {
        "mean": float(values.mean(dtype=np.float64)),
        "p10": float(q[0]),
        "p50": float(q[1]),
        "p90": float(q[2]),
    }


def cache_info(cache: Cache) -> dict:
    """Card, counts, bytes/token, supervised and hard fractions, UNC and entropy summaries."""
    return {
        "path": cache.path,
        "status": cache.status_line(),
        "fingerprint": cache.card.identity,
        "card": cache.card.to_attrs(),
        "shards": len(cache.shard_rows),
        "sequences": cache.num_sequences,
        "tokens": cache.num_tokens,
        "positions": cache.num_positions,
        "supervised": cache.num_supervised,
        "bytes": cache.num_bytes,
        "bytes_per_supervised_token": cache.num_bytes / max(1, cache.num_supervised),
        "supervised_fraction": cache.num_supervised / max(1, cache.num_positions),
        "hard_fraction": cache.num_hard / max(1, cache.num_supervised),
        "uncertainty": _summary(cache.column("uncertainty")),
        "entropy": _summary(cache.column("entropy")),
        **(
            {"unique_samples_per_position": _summary(cache.column("sample_sizes"))}
            if cache.card.mode == "sampled" else {}
        ),
        **(_generated_info(cache) if cache.card.generated else {}),
    }


def _generated_info(cache: Cache) -> dict:
    """A generated cache's replies: how many ended without an EOS, and their lengths."""
    eos = np.asarray(cache.card.generation.get("eos_token_ids", []))
    truncated, lengths = 0, []
    for i in range(len(cache.shard_rows)):  # offsets are per shard
        a = cache.read_shard(i, ("input_ids", "token_offsets", "sup_offsets"))
        last = a["input_ids"][a["token_offsets"][1:] - 1]
        truncated += int((~np.isin(last, eos)).sum())
        lengths.append(np.diff(a["sup_offsets"]))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0)
    return {"truncated_responses": truncated, "response_tokens": _summary(lengths)}


def verify_cache(cache: Cache) -> list[str]:
    """Re-read every file of a cache; return the problems found (empty = ok).

    Open `cache` with check=False so that verify sees every problem instead of the first.
    Checks: what opening found (manifest and card digests, the completion record); the card's
    fingerprint recomputed from its fields; per shard, that it exists, each array decodes
    (zarr checks each chunk's crc32c) and equals the manifest's sha256, its metadata files
    equal `sha256_meta`, offsets and counts agree; for a complete cache, `data_fingerprint`
    recomputed from the stored sequences.
    """
    problems = list(cache.problems)
    card = cache.card
    if card.fingerprint and card.content_fingerprint() != card.fingerprint:
        problems.append("card: fingerprint does not match the card's content fields")
    digest = _DataDigest(cache) if cache.complete and not problems else None
    folders = set(cache.shard_folders())
    for i, row in enumerate(cache.shard_rows):
        name = row["shard"]
        if name not in folders:
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        arrays = {}
        for key in cache.array_names:
            try:
                arrays[key] = cache.decode_array(i, key)
            except DamagedCache as e:
                problems.append(e.problem)
                continue
            if array_sha256(arrays[key]) != row[f"sha256_{key}"]:
                problems.append(f"{name}/{key}: sha256 differs from the manifest")
        if len(arrays) < len(cache.array_names):
            continue
        if row["sha256_meta"] is not None:
            problems += _check_meta(cache, name, row["sha256_meta"])
        problems += _check_counts(name, row, arrays, card.num_samples)
        if digest is not None:
            digest.add(arrays)
    if digest is not None and not problems:
        problems += digest.problems()
    return problems


def leftovers(cache: Cache) -> list[str]:
    """What an interrupted or running dump left beside the committed cache (not problems)."""
    notes = []
    listed = {row["shard"] for row in cache.shard_rows}
    unlisted = [n for n in cache.shard_folders() if n not in listed]
    if unlisted:
        notes.append(f"{len(unlisted)} shard folder(s) not in the manifest ({unlisted[0]} ...): "
                     f"uncommitted work of a running or interrupted dump, ignored by readers")
    tmp = cache._listdir(TMP_DIR)
    if tmp:
        notes.append(f"{TMP_DIR}/ holds {len(tmp)} uncommitted file(s) or folder(s)")
    if cache.complete and cache.in_progress():
        notes.append(f"{PARTS_DIR}/ is left over from the finished dump")
    return notes


def _check_meta(cache: Cache, name: str, expected: str) -> list[str]:
    def read(rel: str) -> bytes:
        return cache.fs.cat_file(f"{cache.base}/{SHARDS_GROUP}/{name}/{rel}")

    try:
        actual = meta_sha256(read, cache.array_names)
    except FileNotFoundError:
        return [f"{name}: a metadata file (zarr.json) is missing"]
    if actual != expected:
        return [f"{name}: its metadata files (zarr.json) differ from the manifest's sha256_meta"]
    return []


class _DataDigest:
    """Recomputes the card's data_fingerprint (per part for a cache made by concat)."""

    def __init__(self, cache: Cache):
        parts = cache.card.extra.get("concat") if isinstance(cache.card.extra, dict) else None
        self.expected = cache.card.data_fingerprint
        # made by a concat that did not record the parts' digests: nothing to compare with
        self.skip = bool(parts) and not all(
            isinstance(p, dict) and "data_fingerprint" in p for p in parts)
        self.parts = [p["data_fingerprint"] for p in parts] if parts and not self.skip else []
        self.ends = list(itertools.accumulate(p["sequences"] for p in parts)) \
            if self.parts else []  # cache-order index just past each part
        self.seen, self.digests, self.current = 0, [], hashlib.sha256()
        # a generated cache's fingerprint is over its prompts (data.teacher_prompts): the
        # first reply to each prompt carries it, up to the reply's first token
        self.responses = int(cache.card.generation.get("num_responses", 0) or 0)

    def add(self, a: dict[str, np.ndarray]) -> None:
        """Feed one shard's sequences."""
        if self.skip:
            return
        offsets = a["token_offsets"]
        for i, seq_id in enumerate(a["seq_ids"].tolist()):
            t0, t1 = offsets[i], offsets[i + 1]
            ids, sup = a["input_ids"][t0:t1], a["supervised"][t0 - i : t1 - i - 1]
            if self.responses:
                if seq_id % self.responses == 0:
                    prompt = ids[: int(np.argmax(sup)) + 1]
                    add_sequence(self.current, seq_id // self.responses, prompt,
                                 np.zeros(len(prompt) - 1, dtype=bool))
            else:
                add_sequence(self.current, seq_id, ids, sup)
            self.seen += 1
            if len(self.digests) < len(self.ends) and self.seen == self.ends[len(self.digests)]:
                self.digests.append("sha256:" + self.current.hexdigest())
                self.current = hashlib.sha256()

    def problems(self) -> list[str]:
        """A problem when the recomputed fingerprint differs from the card's."""
        if self.skip:
            return []
        if self.parts:
            if self.digests != self.parts:
                return ["card: a part's data_fingerprint does not match its stored sequences"]
            actual = "sha256:" + hashlib.sha256("\n".join(self.parts).encode()).hexdigest()
        else:
            actual = "sha256:" + self.current.hexdigest()
        if actual != self.expected:
            return ["card: data_fingerprint does not match the stored sequences"]
        return []


def _check_counts(
    name: str, row: dict, a: dict[str, np.ndarray], num_samples: int
) -> list[str]:
    out = []
    s = row["num_sequences"]
    expect = {
        "seq_ids": s,
        "token_offsets": s + 1,
        "sup_offsets": s + 1,
        "input_ids": row["num_tokens"],
        "supervised": row["num_positions"],
        "target_logprob": row["num_supervised"],
    }
    for key, n in expect.items():
        if a[key].shape[0] != n:
            out.append(f"{name}/{key}: {a[key].shape[0]} rows, manifest says {n}")
    if a["token_offsets"][-1] != a["input_ids"].shape[0]:
        out.append(f"{name}/token_offsets: does not end at the token count")
    if a["sup_offsets"][-1] != a["supervised"].sum():
        out.append(f"{name}/sup_offsets: does not end at the supervised count")
    if int(a["hard"].sum()) != row["num_hard"]:
        out.append(f"{name}/hard: {int(a['hard'].sum())} hard, manifest says {row['num_hard']}")
    if "sample_ids" in a:
        out += _check_samples(name, row, a, num_samples)
    return out


def _check_samples(name: str, row: dict, a: dict[str, np.ndarray], num_samples: int) -> list[str]:
    """Sampled caches: sizes, offsets and counts agree (every position holds num_samples)."""
    out = []
    sizes = a["sample_sizes"].astype(np.int64)
    if sizes.shape[0] != row["num_supervised"]:
        out.append(f"{name}/sample_sizes: {sizes.shape[0]} rows, manifest says "
                   f"{row['num_supervised']}")
        return out
    if a["sample_offsets"].shape[0] != row["num_sequences"] + 1:
        out.append(f"{name}/sample_offsets: {a['sample_offsets'].shape[0]} rows, expected "
                   f"{row['num_sequences'] + 1}")
    total = int(sizes.sum())
    if a["sample_ids"].shape[0] != total or a["sample_counts"].shape[0] != total:
        out.append(f"{name}/sample_ids: {a['sample_ids'].shape[0]} entries, sample_sizes "
                   f"add up to {total}")
        return out
    if a["sample_offsets"][-1] != total:
        out.append(f"{name}/sample_offsets: does not end at the sample entry count")
    per_position = np.add.reduceat(a["sample_counts"].astype(np.int64),
                                   np.cumsum(sizes) - sizes) if total else np.zeros(0)
    if sizes.size and (sizes.min() < 1 or (per_position != num_samples).any()):
        out.append(f"{name}/sample_counts: some positions do not hold {num_samples} draws")
    return out

