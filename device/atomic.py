"""Crash-safe writes of the learner's state: fieldlearn.runtime.atomic's writes with the
state's private permissions, and fsync of a whole version directory before it is published."""

from __future__ import annotations

import os
from pathlib import Path

from fieldlearn.runtime.atomic import atomic_write_bytes, fsync_dir

__all__ = ["fsync_dir", "fsync_tree", "write_bytes", "write_text"]


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o600)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (before a rename publishes it)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
