"""Where fieldlearn keeps things, the one owner of every name and path on disk: the state
directory's layout (and the only writer of its `current` pointer), the inbox's markers,
and the default places of the state, the inbox and the cache.

    STATE/
      current                 text: the name of the served version, e.g. "0003"
      .current.*.tmp          a pointer being replaced (removed on the next start)
      lock                    who writes the state now (fieldlearn.store.versions.state_lock)
      versions/0003/          one immutable version
        model.safetensors     weights
        meta.json             classes in order, config, step, history, metrics, versions
        model.onnx, labels.txt, model.engine (+ model.engine.json)
                              the export (engine where TensorRT is present)
        .export-*             an export being staged (removed on the next start)
        fleet-ledger.safetensors
                              a fleet hub's version: which device contributions it holds
                              (fieldlearn.fleet.merge), so that each is counted once
      versions/.tmp-*         a version being written or discarded (removed on the next start)
      versions/0004/.pending  renamed into place, `current` not yet switched to it: removed
                              on the next start if its writer died before the switch
      fleet-status.json       fieldlearn fleet join: the fleet's version this device took last
      watch-journal.json      fieldlearn watch: the increment in progress (names only)
      watch-status.json       fieldlearn watch: what the daemon is doing
      .watch.lock             fieldlearn watch: one daemon per state (flock)

    INBOX/
      <class>/ ... .done      a class folder, complete once `.done` is written (last)
      .rejected/<class>/.reason
                              a folder that could not be learned, and why

Standard library only: the inference side (classify) reads a state with it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fieldlearn.runtime.atomic import write_text
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import read_text

# ------------------------------------------------------------------------- names

CURRENT = "current"
VERSIONS = "versions"
VERSION_RE = re.compile(r"^[0-9]{4,9}$")
WEIGHTS = "model.safetensors"
META = "meta.json"
ONNX_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
ENGINE_FILE = "model.engine"   # + model.engine.json: what it was built for (runtime.tensorrt)
PENDING = ".pending"
FLEET_STATUS = "fleet-status.json"          # a device: the fleet's version it took last (fleet join)
FLEET_LEDGER = "fleet-ledger.safetensors"   # a fleet hub's version: the contributions it holds
LOCK = "lock"
TMP_PREFIX = ".tmp-"           # versions/.tmp-*: a version being written or discarded
EXPORT_PREFIX = ".export-"     # versions/NNNN/.export-*: an export being staged
JOURNAL = "watch-journal.json"
STATUS = "watch-status.json"
WATCH_LOCK = ".watch.lock"
DONE = ".done"                 # INBOX/<class>/.done: the folder is complete
REJECTED = ".rejected"         # INBOX/.rejected/: folders (and files) that were not learned
REASON = ".reason"             # INBOX/.rejected/<class>/.reason: why


# ------------------------------------------------------------------------- the state dir

def versions_dir(state_dir: Path) -> Path:
    return Path(state_dir) / VERSIONS


def version_dir(state_dir: Path, name: str) -> Path:
    return versions_dir(state_dir) / name


def current_file(state_dir: Path) -> Path:
    return Path(state_dir) / CURRENT


def has_current(state_dir: Path) -> bool:
    """A `current` pointer is there (a regular file; whether it is usable is another matter)."""
    return current_file(state_dir).is_file()


def current_version_name(state_dir: Path) -> str:
    pointer = current_file(state_dir)
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


def switch_current(state_dir: Path, name: str) -> None:
    """Make version `name` current: `current` replaced atomically (the only writer of it)."""
    write_text(current_file(state_dir), name + "\n")


def held_versions(state_dir: Path) -> list[str]:
    """Every version directory name under versions/, oldest first (pending ones included)."""
    vd = versions_dir(state_dir)
    if not vd.is_dir():
        return []
    return sorted((p.name for p in vd.iterdir() if VERSION_RE.match(p.name) and p.is_dir()), key=int)


def version_names(state_dir: Path, pending: bool = True) -> list[str]:
    """Published versions, oldest first. pending=False leaves out a version that was renamed
    into place but never switched to (its writer died in between; the next writer removes it)."""
    names = held_versions(state_dir)
    if not pending:
        try:
            cur = current_version_name(state_dir)
        except UserError:
            cur = None
        names = [n for n in names if n == cur or not (version_dir(state_dir, n) / PENDING).exists()]
    return names


def next_version_name(state_dir: Path) -> str:
    """The name the next version gets: one more than the highest name taken under versions/."""
    taken = [int(p.name) for p in versions_dir(state_dir).iterdir() if VERSION_RE.match(p.name)]
    return f"{(max(taken) if taken else 0) + 1:04d}"


def _recovery(state_dir: Path) -> str:
    """What to do when `current` is unusable: with versions present, rolling back to one
    (never `init`, which would start a new base model over the learned ones)."""
    try:
        names = held_versions(state_dir)
    except OSError:
        names = []
    if not names:
        return f"{state_dir} holds no model yet (run fieldlearn init)"
    return (f"{state_dir} has versions {names[0]}..{names[-1]}; make one current with: fieldlearn rollback "
            f"--state {state_dir} --to {int(names[-1])} (fieldlearn history lists them)")


def current_version_dir(state_dir: Path) -> Path:
    name = current_version_name(state_dir)
    d = version_dir(state_dir, name)
    if not d.is_dir():
        raise UserError(f"{current_file(state_dir)}: points to missing version {name}; {_recovery(state_dir)}")
    return d


# ------------------------------------------------------------------------- default places

def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share"))


def default_place(what: str) -> Path:
    """The default state dir or inbox ('state', 'inbox'): $FIELDLEARN_STATE / $FIELDLEARN_INBOX,
    else ~/.local/share/fieldlearn/<what> (XDG_DATA_HOME honoured)."""
    env = os.environ.get(f"FIELDLEARN_{what.upper()}")
    if env:
        return Path(env).expanduser()
    return _data_home() / "fieldlearn" / what


def cache_dir() -> Path:
    """$FIELDLEARN_CACHE, else ~/.cache/fieldlearn: TensorRT engines for ad-hoc models,
    ONNX Runtime's TensorRT cache, the fused kernel's compiled images."""
    root = os.environ.get("FIELDLEARN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fieldlearn")
    return Path(root)
