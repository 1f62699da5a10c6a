"""Crash-safe file writes, the one implementation: every file fieldlearn writes for keeps
(a state's versions and `current`, the watch daemon's journal and status, exported models,
engines, the kernel cache, benchmark results) goes through here.

    atomic_write_bytes / write_text / write_json   temp file in the same directory, fsync,
                                                   rename over the target, fsync the directory
    fsync_file / fsync_dir / fsync_tree            make what is already written durable
                                                   (before a rename publishes it)

A reader, or a crash, sees the old file or the new one, never half of one. Files meant to
be read by others (models, labels, engines) are written 0644; what belongs to the user
alone (a state's pointer, journals, results) 0600 by default of `write_text`/`write_json`.
Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

PRIVATE = 0o600   # a state's files: weights and class names are the user's data


def fsync_file(path: str | Path) -> None:
    """fsync one file that is already written (opened read-only: no new data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory: its entries (a rename, a new file) survive a power loss."""
    fsync_file(path)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under root (before a rename publishes it)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_file(os.path.join(dirpath, f))
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temp file in the same directory, fsync, rename over `path`, fsync the dir:
    a reader (or a crash) sees the old file or the new one, never half of one.
    mode: the file's permissions (models and labels are meant to be read by others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str, mode: int = PRIVATE) -> None:
    """atomic_write_bytes of UTF-8 text, owner-only by default."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def write_json(path: str | Path, obj: Any, mode: int = PRIVATE) -> None:
    """obj as indented, key-sorted JSON with a final newline, written atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode=mode)


__all__ = ["PRIVATE", "atomic_write_bytes", "fsync_dir", "fsync_file", "fsync_tree", "write_json", "write_text"]
