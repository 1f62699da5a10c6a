"""Where things are in a state directory (shared by the learner and the inference side).

    STATE/
      current                 text: the name of the served version, e.g. "0003"
      versions/0003/          one immutable version
        model.safetensors     weights
        meta.json             classes in order, config, step, history, metrics, versions
        model.onnx, labels.txt, model.engine   (export; engine where TensorRT is present)
      versions/.tmp-*         a version being written (removed on the next start)
      versions/0004/.pending  renamed into place, `current` not yet switched to it: removed
                              on the next start if its writer died before the switch
"""

from __future__ import annotations

import re
from pathlib import Path

from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import read_text

VERSION_RE = re.compile(r"^[0-9]{4,9}$")
PENDING = ".pending"


def versions_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "versions"


def current_version_name(state_dir: Path) -> str:
    pointer = Path(state_dir) / "current"
    if not Path(state_dir).is_dir():
        raise UserError(f"{state_dir}: no such state directory")
    try:
        name = read_text(pointer).strip()
    except FileNotFoundError:
        raise UserError(f"{pointer}: missing; {_recovery(state_dir)}") from None
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise UserError(f"{pointer}: unreadable ({why}); {_recovery(state_dir)}") from None
    if not VERSION_RE.match(name):
        raise UserError(f"{pointer}: does not name a version ({name[:40]!r}); {_recovery(state_dir)}")
    return name


def _recovery(state_dir: Path) -> str:
    """What to do when `current` is unusable: with versions present, rolling back to one
    (never `init`, which would start a new base model over the learned ones)."""
    try:
        names = sorted((p.name for p in versions_dir(state_dir).iterdir() if VERSION_RE.match(p.name) and p.is_dir()),
                       key=int)
    except OSError:
        names = []
    if not names:
        return f"{state_dir} holds no model yet (run fieldlearn init)"
    return (f"{state_dir} has versions {names[0]}..{names[-1]}; make one current with: fieldlearn rollback "
            f"--state {state_dir} --to {int(names[-1])} (fieldlearn history lists them)")


def current_version_dir(state_dir: Path) -> Path:
    name = current_version_name(state_dir)
    d = versions_dir(state_dir) / name
    if not d.is_dir():
        raise UserError(f"{Path(state_dir) / 'current'}: points to missing version {name}; {_recovery(state_dir)}")
    return d
