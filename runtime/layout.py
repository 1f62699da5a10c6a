"""Where a state dir keeps its models, and how files get there (atomically).

    STATE/current                      text file: the current version's name, e.g. "0003"
    STATE/versions/<name>/model.safetensors, meta.json   (written by fieldlearn.device.state)
    STATE/versions/<name>/model.onnx, labels.txt         (written by `fieldlearn export`)
    STATE/versions/<name>/model.engine                   (where TensorRT is present)

This module needs only the standard library so `fieldlearn classify --state DIR` can find
the exported model without importing the training code.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from fieldlearn.runtime.errors import UserError

CURRENT_FILE = "current"
VERSIONS_DIR = "versions"
ONNX_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
ENGINE_FILE = "model.engine"

# A plain version name: digits (the learner writes zero-padded step numbers, "0003").
# Anything else (a path, "..", whitespace inside) is refused so `current` cannot point
# outside STATE/versions.
_VERSION_NAME = re.compile(r"[0-9]{1,12}")


def is_version_name(name: str) -> bool:
    return _VERSION_NAME.fullmatch(name) is not None


def version_dir(state_dir: str | Path, name: str) -> Path:
    """STATE/versions/<name> for a valid version name (the directory may not exist yet)."""
    if not is_version_name(name):
        raise UserError(f"{name!r}: not a version name (expected digits such as 0003)")
    return Path(state_dir) / VERSIONS_DIR / name


def current_version_name(state_dir: str | Path) -> str:
    """The name stored in STATE/current (surrounding whitespace and newline stripped)."""
    state_dir = Path(state_dir)
    current = state_dir / CURRENT_FILE
    if not state_dir.is_dir():
        raise UserError(f"{state_dir}: no such state directory")
    try:
        name = current.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UserError(f"{current}: missing; {state_dir} is not a fieldlearn state dir (fieldlearn init creates one)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{current}: unreadable ({e})") from None
    if not is_version_name(name):
        raise UserError(f"{current}: holds {name[:40]!r}, not a version name (expected digits such as 0003)")
    return name


def current_version_dir(state_dir: str | Path) -> Path:
    """STATE/versions/<name of STATE/current>; UserError naming the file if anything is off."""
    name = current_version_name(state_dir)
    path = Path(state_dir) / VERSIONS_DIR / name
    if not path.is_dir():
        raise UserError(f"{Path(state_dir) / CURRENT_FILE}: names version {name}, but {path} does not exist")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename over `path`, fsync the dir:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; models and labels are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
