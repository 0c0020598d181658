"""`atkd-cache concat`: join caches made with the same teacher, tokenizer and parameters from
different parts of the data into one cache.

Shards are not re-encoded: their array files are hard-linked (copied across filesystems) into
the new cache under new names, and their manifest rows (checksums included) carry over with
new indices and sequence offsets. The result is built in a sibling folder and renamed into
place at the end, so a kill never leaves a half-joined cache at the output path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import zarr

from atkd_cache.cache.inspect import verify_cache
from atkd_cache.cache.integrity import canonical_json, complete_record, manifest_table, meta_sha256
from atkd_cache.cache.reader import Cache, open_cache
from atkd_cache.cache.readme import README_FILE, render_readme
from atkd_cache.cache.schema import (
    COMPLETE_FILE,
    MANIFEST_FILE,
    SHARDS_GROUP,
    CacheCard,
    probe_gap,
)
from atkd_cache.cache.writer import dir_bytes, shard_name
from atkd_cache.errors import UserError
from atkd_cache.paths import check_output_folder

# Card fields that may differ between the parts: what data they were made from.
PART_FIELDS = ("data_source", "data_split", "data_limit", "data_fingerprint", "created_at",
               "fingerprint", "extra", "shard_positions", "tool_version", "planned_shards",
               "text")  # (the tokenizer itself is compared: tokenizer_fingerprint)


def _check_same_card(first: Cache, other: Cache) -> None:
    diff = first.card.first_difference(other.card, ignore=PART_FIELDS)
    if diff is not None:
        key, mine, theirs = diff
        if key == "teacher_probe":
            raise UserError(f"cannot join {other.path} to {first.path}: their served teachers "
                            f"compute differently (teacher_probe: {probe_gap(mine, theirs)})")
        raise UserError(
            f"cannot join {other.path} to {first.path}: {key} is {theirs!r} there but "
            f"{mine!r} in the first cache (concat joins caches made with the same card)"
        )


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of src under dst (copy when linking is not possible)."""
    for dirpath, _, files in os.walk(src):
        target = dst / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(os.path.join(dirpath, f), target / f)
            except OSError:
                shutil.copy2(os.path.join(dirpath, f), target / f)


def joined_card(caches: list[Cache]) -> CacheCard:
    """The card of the joined cache: the parts' card with the data fields combined."""
    first = caches[0].card
    data_fp = hashlib.sha256(
        "\n".join(c.card.data_fingerprint for c in caches).encode()
    ).hexdigest()
    card = replace(
        first,
        data_source=" + ".join(c.card.data_source for c in caches),
        data_limit=None,
        data_fingerprint="sha256:" + data_fp,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra={**first.extra, "concat": [
            {"path": c.path, "fingerprint": c.card.identity, "sequences": len(c),
             "data_fingerprint": c.card.data_fingerprint} for c in caches
        ]},
        planned_shards=sum(len(c.shard_rows) for c in caches),
        # its text when every part has one (the parts share the tokenizer: checked)
        text=first.text if all(c.card.text for c in caches) else {},
    )
    card.fingerprint = card.content_fingerprint()
    return card


def concat_caches(inputs: list[str], output: str) -> Cache:
    """Join complete local caches, in the order given, into a new cache at `output`."""
    if len(inputs) < 2:
        raise UserError("concat needs at least two caches")
    check_output_folder(output, "the joined cache at")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{output} exists and is not empty: choose a new output folder")
    caches = []
    for path in inputs:
        if "://" in path:
            raise UserError(f"{path}: concat joins local caches; copy remote ones first")
        cache = open_cache(path)
        if len(cache) == 0:
            raise UserError(f"{path} has no committed sequences")
        if cache.status == "partial":
            raise UserError(f"{path} is {cache.status_line()}: concat joins finished caches; "
                            f"let its dump finish first")
        problems = verify_cache(cache)  # every shard is read: never join damaged data
        if problems:
            raise UserError(f"{path} is damaged ({problems[0]}; {len(problems)} problem(s) in "
                            f"all): re-copy it or dump it again")
        caches.append(cache)
    for other in caches[1:]:
        _check_same_card(caches[0], other)
    card = joined_card(caches)

    staging = out.parent / f".{out.name}.concat-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    zarr.open_group(str(staging / SHARDS_GROUP), mode="w")
    rows, first_sequence = [], 0
    for cache in caches:
        for row in cache.shard_rows:
            index = len(rows)
            name = shard_name(index)
            src = Path(cache.path) / SHARDS_GROUP / row["shard"]
            _link_tree(src, staging / SHARDS_GROUP / name)
            meta = staging / SHARDS_GROUP / name / "zarr.json"
            doc = json.loads(meta.read_text())
            doc.setdefault("attributes", {})["shard_index"] = index
            meta.unlink()  # a hard link to the source's file: replace, never write through
            meta.write_text(json.dumps(doc, indent=2))
            shard_dir = staging / SHARDS_GROUP / name
            rows.append({
                **row, "shard": name, "index": index, "first_sequence": first_sequence,
                "bytes": dir_bytes(shard_dir),
                "sha256_meta": meta_sha256(lambda rel, d=shard_dir: (d / rel).read_bytes(),
                                           cache.array_names),
            })
            first_sequence += row["num_sequences"]
    if card.text:  # the joined cache keeps its text: the first part's tokenizer files
        shutil.copytree(Path(caches[0].path) / card.text["tokenizer"],
                        staging / card.text["tokenizer"])
    zarr.open_group(str(staging / ".root"), mode="w", attributes=card.to_attrs())
    os.replace(staging / ".root" / "zarr.json", staging / "zarr.json")
    shutil.rmtree(staging / ".root")
    stored = dict(zarr.open_group(str(staging), mode="r").attrs)
    pq.write_table(manifest_table(rows, stored), staging / MANIFEST_FILE,
                   write_page_checksum=True)
    (staging / README_FILE).write_text(render_readme(CacheCard.from_attrs(stored), rows))
    (staging / COMPLETE_FILE).write_bytes(canonical_json(complete_record(rows)))
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.rename(staging, out)
    return open_cache(out)
