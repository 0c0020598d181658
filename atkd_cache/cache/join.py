"""Caches that can be read together, position by position: one student, several teachers.

Two caches join when they hold the same sequences with the same supervised positions
(`data_fingerprint`, computed over every stored sequence's tokens and mask) under the same
tokenizer. Their teachers may differ in size, k, mode (top-k or sampled), dtype and encoding.
A generated cache's `data_fingerprint` covers its prompts only: another teacher answering the
same prompts wrote other replies, so generated caches join only with caches of the same
replies (dump every teacher over the exported replies instead). The loader also compares
every sequence it reads (train/loader.py), so a mismatch that slips past the cards still
stops with one line.
"""

from __future__ import annotations

import hashlib

import numpy as np

from atkd_cache.cache.reader import Cache, CachedSequence
from atkd_cache.errors import UserError


def _differs(caches: list[Cache], field: str) -> Cache | None:
    first = getattr(caches[0].card, field)
    return next((c for c in caches[1:] if getattr(c.card, field) != first), None)


def check_joinable(caches: list[Cache], allow_partial: bool = False) -> None:
    """Refuse, in one line naming the caches and what differs, caches that cannot be read
    together (a single cache always can)."""
    if len(caches) < 2:
        return
    lead = caches[0]
    other = _differs(caches, "tokenizer_fingerprint")
    if other is not None:
        raise UserError(
            f"{other.path} and {lead.path} were made with different tokenizers "
            f"({other.card.tokenizer_fingerprint[:19]} vs {lead.card.tokenizer_fingerprint[:19]})"
            ": several teachers must share the student's tokenizer")
    generated = [c for c in caches if c.card.generated]
    if generated and (len(generated) < len(caches) or _differs(caches, "generation")
                      or _differs(caches, "teacher_weights_hash")):
        raise UserError(
            f"{generated[0].path} holds replies its teacher generated: another teacher's cache "
            f"holds other sequences. Export the replies (atkd-cache export --format responses) "
            f"and dump every teacher over that file")
    other = _differs(caches, "data_fingerprint")
    if other is not None:
        raise UserError(
            f"{other.path} and {lead.path} hold different data (data fingerprint "
            f"{other.card.data_fingerprint[:19]} vs {lead.card.data_fingerprint[:19]}): dump "
            f"every teacher over the same data, template and --max-length")
    for c in caches:
        if c.status == "partial" and not allow_partial:
            raise UserError(
                f"{c.path} is {c.status_line()}: let its dump finish, or pass --allow-partial "
                f"to train on the sequences every cache has committed")
    if allow_partial:
        for c in caches[1:]:
            missing = _uncovered(lead, c)
            if missing is not None:
                raise UserError(
                    f"{c.path} has not committed sequence {missing}, which {lead.path} holds: "
                    f"give first the cache with the fewest committed shards, or let the dumps "
                    f"finish")


def _uncovered(lead: Cache, other: Cache) -> int | None:
    """The first sequence index the lead holds and the other cache has not committed."""
    have = sorted((r["first_sequence"], r["first_sequence"] + r["num_sequences"])
                  for r in other.shard_rows)
    for row in lead.shard_rows:
        lo, hi = row["first_sequence"], row["first_sequence"] + row["num_sequences"]
        for a, b in have:
            if a <= lo < b:
                lo = b
        if lo < hi:
            return lo
    return None


def same_sequence(a: CachedSequence, b: CachedSequence, path: str) -> None:
    """Raise UserError unless two caches hold the same tokens and supervised positions."""
    if not (np.array_equal(a.input_ids, b.input_ids)
            and np.array_equal(a.supervised, b.supervised)):
        raise UserError(f"{path}: sequence {a.index} differs from the first cache's: the "
                        f"caches do not hold the same data; dump every teacher over the same "
                        f"sequences")


def joined_identity(caches: list[Cache]) -> str:
    """The fingerprint of what a run trains on: the cache's own for one cache, else a
    sha256 over the caches' fingerprints in the order given."""
    if len(caches) == 1:
        return caches[0].card.identity
    blob = "\n".join(c.card.identity for c in caches).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
