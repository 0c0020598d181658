"""Files a recipe writes whole: to a temporary name, then renamed into place, so that a kill
at any moment leaves the old file or the new one, never half of it."""

from __future__ import annotations

import json
import os


def write_json(path: str, doc: dict) -> None:
    """`doc` as indented JSON at `path` (replacing it)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def write_jsonl_once(path: str, rows) -> str:
    """`rows` as JSON Lines at `path`, unless it exists already (a resumed recipe keeps the
    file it wrote); returns `path`."""
    if not os.path.exists(path):
        with open(f"{path}.tmp", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(f"{path}.tmp", path)
    return path
