"""Fuzzing a real cache: flip single bytes at many offsets of every file (metadata, manifest,
card, completion record, chunks) and delete each file in turn. Every time, either `verify`
reports it, or what a reader decodes is identical to the original; a reader never returns
other data (it refuses with one line), and nothing ends in a traceback."""

from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner

from atkd_cache.cache import open_cache
from atkd_cache.cli.main import main
from atkd_cache.errors import UserError

MASKS = (0x01, 0x20, 0x80)  # a low bit (digits stay digits), letter case, the high bit
OFFSETS_PER_FILE = 6


def snapshot(path: str):
    """Everything a checked reader hands out, or the one-line error it refuses with."""
    try:
        cache = open_cache(path)
        arrays = [
            {k: v.tobytes() + str(v.dtype).encode() + str(v.shape).encode()
             for k, v in cache.read_shard(i).items()}
            for i in range(len(cache.shard_rows))
        ]
        return {"card": cache.attrs, "rows": cache.shard_rows, "status": cache.status,
                "arrays": arrays}
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return UserError


def verify_reports(path: str) -> bool:
    """Does `atkd-cache verify` report a problem (exit 1: problems listed; 2: the cache
    cannot be opened, one line), without a traceback?"""
    r = CliRunner().invoke(main, ["verify", path])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output and r.exit_code in (0, 1, 2), r.output
    if r.exit_code == 2:
        assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1
    return r.exit_code != 0


def offsets(size: int) -> list[int]:
    if size == 0:
        return []
    step = max(1, size // OFFSETS_PER_FILE)
    return sorted({0, size - 1, *range(step // 2, size, step)})


@pytest.fixture(scope="module")
def pristine(assets, tmp_path_factory):
    from conftest import dump

    path = tmp_path_factory.mktemp("fuzz") / "cache"
    dump(assets, path, limit=16, shard_positions=300)
    return str(path)


def test_every_byte_flip_and_deletion_is_reported_or_harmless(pristine, tmp_path):
    path = str(tmp_path / "c")
    shutil.copytree(pristine, path)
    original = snapshot(path)
    assert original is not UserError and original["status"] == "complete"
    assert len(original["arrays"]) == 2 and not verify_reports(path)
    files = sorted(os.path.relpath(os.path.join(d, f), path)
                   for d, _, names in os.walk(path) for f in names)
    counts = {"flips": 0, "deletions": 0, "reported": 0, "identical": 0, "refused": 0}
    harmless = []
    for rel in files:
        full = os.path.join(path, rel)
        data = open(full, "rb").read()
        trials = [("flip", at, MASKS[i % len(MASKS)]) for i, at in enumerate(offsets(len(data)))]
        for kind, at, mask in trials + [("delete", None, None)]:
            if kind == "flip":
                damaged = bytearray(data)
                damaged[at] ^= mask
                open(full, "wb").write(damaged)
                counts["flips"] += 1
            else:
                os.remove(full)
                counts["deletions"] += 1
            got = snapshot(path)
            reported = verify_reports(path)
            what = f"{kind} {rel} @ {at} ^ {mask}"
            # a reader hands out the committed data or refuses: never something else
            assert got is UserError or got == original, what
            assert reported or got == original, what
            counts["reported"] += reported
            counts["identical"] += got == original
            counts["refused"] += got is UserError
            if not reported:
                harmless.append(what)
            open(full, "wb").write(data)
    assert snapshot(path) == original
    print(f"\nfuzz: {len(files)} files, {counts}; not reported (data identical): {harmless}")
    # every chunk flip and every deletion of a data-bearing file must be caught, so most are
    assert counts["reported"] > 0.8 * (counts["flips"] + counts["deletions"])
