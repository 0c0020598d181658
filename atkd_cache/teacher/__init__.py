"""Teacher backends: turn batches of token ids into the per-position arrays of the cache.

Every backend is a `Teacher`: `score` runs it teacher-forced over given sequences (one dict
of per-position arrays per sequence, supervised positions only, in order); `generate` has it
write a reply per prompt and returns the finished sequences with the same arrays, captured
while generating. dump.py calls nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from atkd_cache.data import TokenizedSequence

Progress = Callable[[int], None] | None


@dataclass
class Teacher:
    """A loaded teacher behind the one interface dump.py uses."""

    score: Callable[[list[TokenizedSequence], Progress], list[dict[str, np.ndarray]]]
    generate: Callable[[list, Progress], list[tuple[TokenizedSequence, dict[str, np.ndarray]]]]
    logits_width: int
    revision: str | None = None
    max_length: int | None = None  # tokens the teacher takes in one sequence, if it says
    extra: dict | None = None  # what the card's `extra` records of it (a served teacher's engine)
    probe: list[float] | None = None  # a served teacher's numeric fingerprint (card.teacher_probe)
