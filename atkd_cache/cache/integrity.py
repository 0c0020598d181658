"""Checksums and fingerprints that cover every file of a cache, and the completion record.

What covers what (docs/cache-format.md, "Integrity"):
  chunks                  sha256 of each decoded array, in the manifest (`sha256_<array>`);
                          zarr also checks each chunk's crc32c when it decodes it
  arrays' zarr.json       sha256 of the shard's metadata files, in the manifest (`sha256_meta`)
  root zarr.json (card)   sha256 of the card, in the manifest's key-value metadata; the card's
                          `fingerprint` and `data_fingerprint` are also recomputed by verify
  manifest.parquet        sha256 of its own rows, in its key-value metadata
  complete.json           written when the dump finishes; its counts and the manifest's rows
                          digest must agree with the manifest
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from atkd_cache.cache.schema import MANIFEST_SCHEMA

# Key of the manifest's Parquet key-value metadata that holds its digests (a JSON object).
MANIFEST_META_KEY = b"atkd_cache"
# The counts complete.json records, summed over the manifest's rows.
COMPLETE_COUNTS = {
    "sequences": "num_sequences", "tokens": "num_tokens", "positions": "num_positions",
    "supervised": "num_supervised", "hard": "num_hard",
}


def canonical_json(value: Any) -> bytes:
    """The bytes a digest of a JSON value is taken over: keys sorted, no spaces, UTF-8.
    (A value JSON cannot hold, found only in a damaged file, is hashed as its repr.)"""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=repr).encode()


def card_sha256(attrs: dict) -> str:
    """Digest of the card exactly as stored (every field, also those outside the fingerprint)."""
    return hashlib.sha256(canonical_json(attrs)).hexdigest()


def rows_sha256(rows: list[dict]) -> str:
    """Digest of manifest rows (a list of column -> value objects, in order)."""
    return hashlib.sha256(canonical_json(rows)).hexdigest()


def array_sha256(values: np.ndarray) -> str:
    """Checksum of an array's decoded contents (C order, little-endian as stored)."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def meta_files(array_names: tuple[str, ...]) -> list[str]:
    """A shard's metadata files (paths inside the shard folder) in the order they are hashed."""
    return ["zarr.json"] + [f"{name}/zarr.json" for name in array_names]


def meta_sha256(read: Callable[[str], bytes], array_names: tuple[str, ...]) -> str:
    """sha256 over a shard's metadata files: for each, its path, a newline, its length in
    decimal, a newline, then its bytes. `read(relative path)` returns a file's bytes."""
    digest = hashlib.sha256()
    for rel in meta_files(array_names):
        data = read(rel)
        digest.update(f"{rel}\n{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def manifest_table(rows: list[dict], card_attrs: dict) -> pa.Table:
    """Manifest rows as a Parquet table whose metadata carries the rows' and the card's digest."""
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    meta = {"rows_sha256": rows_sha256(table.to_pylist()), "card_sha256": card_sha256(card_attrs)}
    return table.replace_schema_metadata({MANIFEST_META_KEY: canonical_json(meta)})


def manifest_digests(table: pa.Table) -> dict | None:
    """The digests a manifest carries, or None for one written before they existed."""
    raw = (table.schema.metadata or {}).get(MANIFEST_META_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def missing_columns(table: pa.Table, array_names: tuple[str, ...]) -> list[str]:
    """Columns a manifest must have (for a cache with these arrays) but does not."""
    needed = [f.name for f in MANIFEST_SCHEMA if not f.name.startswith("sha256_")]
    needed += [f"sha256_{name}" for name in array_names]
    return [name for name in needed if name not in table.column_names]


def manifest_problems(
    table: pa.Table, card_attrs: dict, array_names: tuple[str, ...], expect_digests: bool
) -> list[str]:
    """What is wrong with a manifest read from disk: columns, its own digest, the card's."""
    missing = missing_columns(table, array_names)
    if missing:
        return [f"manifest.parquet lacks column(s) {', '.join(missing)}"]
    meta = manifest_digests(table)
    if meta is None:
        return ["manifest.parquet carries no checksums"] if expect_digests else []
    rows = table.to_pylist()
    out = []
    if meta.get("rows_sha256") != rows_sha256(rows):
        out.append("manifest.parquet does not match its own checksum")
    if meta.get("card_sha256") != card_sha256(card_attrs):
        out.append("the card (zarr.json) differs from the one the manifest was written with")
    return out


def normalized_rows(table: pa.Table) -> list[dict]:
    """Manifest rows with every column of the current schema (None where a manifest written
    by an older version lacks one)."""
    return [{name: row.get(name) for name in MANIFEST_SCHEMA.names} for row in table.to_pylist()]


def complete_record(rows: list[dict]) -> dict:
    """What complete.json holds for a finished cache whose manifest has these rows."""
    record = {"complete": True, "shards": len(rows), "manifest_rows_sha256": rows_sha256(rows)}
    for key, column in COMPLETE_COUNTS.items():
        record[key] = sum(int(row[column]) for row in rows)
    return record


def complete_problems(record: Any, rows: list[dict]) -> list[str]:
    """How a complete.json disagrees with the manifest (empty: it describes these rows)."""
    if not isinstance(record, dict):
        return ["complete.json is not a JSON object"]
    expected = complete_record(rows)
    if record == expected:
        return []
    if set(record) != set(expected):
        return ["complete.json has unexpected or missing fields"]
    if record["shards"] != expected["shards"]:
        return [f"complete.json records {record['shards']} shards but the manifest lists "
                f"{expected['shards']}"]
    diffs = [k for k in expected if record[k] != expected[k]]
    return [f"complete.json disagrees with the manifest on {', '.join(diffs)}"]
