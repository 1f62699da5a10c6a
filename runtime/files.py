"""Open only regular files, and never block doing it.

Every file fieldlearn reads from a user (images, a state's meta.json, weights, `current`,
the lock, ONNX models, the watch journal, a benchmark's settings) goes through
`open_regular`: `stat` first (a FIFO, a device, a socket or a directory is refused by its
kind before any `open`), then `open(O_NONBLOCK)` and `fstat` of what was opened (so a file
swapped for a FIFO in between is refused too, and opening a FIFO never waits for a writer).
A camera pipe named `x.jpg` therefore costs one line, not a hang.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


class NotRegularFile(OSError):
    """The path exists but is not a regular file (strerror says what it is)."""

    def __init__(self, path: str | Path, kind: str):
        super().__init__(errno.EINVAL, f"is {kind}, not a regular file", str(path))
        self.kind = kind


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def why_not_regular(path: str | Path) -> str | None:
    """None for a regular file (symlinks followed); else a short reason: 'is a FIFO ...',
    'is a symlink loop', 'is a dangling symlink', 'is missing', 'cannot be read (...)'."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is a dangling symlink" if os.path.islink(path) else "is missing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop"
        return f"cannot be read ({e.strerror})"
    return None if stat.S_ISREG(st.st_mode) else f"is {kind_of(st.st_mode)}, not a regular file"


def open_regular(path: str | Path) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (symlinks followed).
    NotRegularFile when it is anything else; the usual OSError (FileNotFoundError,
    PermissionError, ELOOP, ...) when it cannot be opened. Never blocks."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, kind_of(st.st_mode))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, kind_of(st.st_mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path) -> bytes:
    with open_regular(path) as f:
        return f.read()


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


__all__ = ["NotRegularFile", "open_regular", "read_bytes", "read_text", "why_not_regular", "kind_of"]
