"""`info` and `verify`: summaries of a cache and a full integrity check."""

from __future__ import annotations

import numpy as np

from atkd_cache.cache.reader import Cache
from atkd_cache.cache.schema import SHARDS_GROUP
from atkd_cache.cache.writer import array_sha256
from atkd_cache.errors import first_line


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
    }


def verify_cache(cache: Cache) -> list[str]:
    """Re-read every array of every committed shard; return the problems found (empty = ok).

    Checks, per shard: the shard exists; each array decodes (zarr checks each chunk's
    crc32c); its sha256 equals the manifest's; the offsets and counts agree with the manifest.
    """
    problems = []
    shards = cache.root[SHARDS_GROUP]
    for row in cache.shard_rows:
        name = row["shard"]
        try:
            group = shards[name]
        except KeyError:
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        arrays = {}
        for key in cache.array_names:
            try:
                arrays[key] = group[key][...]
            except KeyError:
                problems.append(f"{name}/{key}: array missing")
                continue
            except Exception as e:  # zarr raises ValueError on a crc32c mismatch
                problems.append(f"{name}/{key}: unreadable ({first_line(e)})")
                continue
            if array_sha256(arrays[key]) != row[f"sha256_{key}"]:
                problems.append(f"{name}/{key}: sha256 differs from the manifest")
        if len(arrays) == len(cache.array_names):
            problems += _check_counts(name, row, arrays, cache.card.num_samples)
    return problems


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

