"""Checks on output paths, made before any expensive work so that a bad path is one line."""

from __future__ import annotations

import os
import shutil
import tempfile

from atkd_cache.errors import UserError


def _nearest_existing(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def _probe_writable(folder: str, what: str, path: str) -> None:
    """Create and remove a temp folder in `folder` (os.access says yes to root even on
    read-only and special filesystems)."""
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".atkd-probe-", dir=folder))
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: {folder} is not writable "
                        f"({e.strerror or e})") from None


def check_output_folder(path: str, what: str) -> None:
    """`path` is, or can become, a writable folder (fsspec URLs are checked when written)."""
    if "://" in path and not path.startswith("file://"):
        return
    path = path.removeprefix("file://")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a folder: give a folder path")
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise UserError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    _probe_writable(existing, what, path)


def check_output_file(path: str, what: str) -> None:
    """`path` can be written as a file: not a folder, and its folder exists and is writable."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder: give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {what} {path}: folder {parent} does not exist")
    _probe_writable(parent, what, path)
