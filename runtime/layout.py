"""Where things are in a state directory (shared by the learner and the inference side).

    STATE/
      current                 text: the name of the served version, e.g. "0003"
      versions/0003/          one immutable version
        model.safetensors     weights
        meta.json             classes in order, config, step, history, metrics, versions
        model.onnx, labels.txt, model.engine   (export; engine where TensorRT is present)
      versions/.tmp-*         a version being written (removed on the next start)
"""

from __future__ import annotations

import re
from pathlib import Path

from fieldlearn.runtime.errors import UserError

VERSION_RE = re.compile(r"^[0-9]{4,9}$")


def versions_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "versions"


def current_version_name(state_dir: Path) -> str:
    pointer = Path(state_dir) / "current"
    if not Path(state_dir).is_dir():
        raise UserError(f"{state_dir}: no such state directory")
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        raise UserError(f"{pointer}: missing; {state_dir} holds no model yet (run fieldlearn init)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{pointer}: unreadable ({type(e).__name__})") from None
    if not VERSION_RE.match(name):
        raise UserError(f"{pointer}: does not name a version ({name[:40]!r})")
    return name


def current_version_dir(state_dir: Path) -> Path:
    name = current_version_name(state_dir)
    d = versions_dir(state_dir) / name
    if not d.is_dir():
        raise UserError(f"{Path(state_dir) / 'current'}: points to missing version {name}")
    return d
