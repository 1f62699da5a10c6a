"""The version store around state.py, without torch: meta checks, history, rollback, prune,
leftover cleanup, and the lock that every command which writes a state dir holds.

    STATE/lock      JSON {pid, hostname, boot_id, proc_start, started, command}: who holds it

Lock protocol. `state_lock` takes a short flock on the state directory itself (serialising
only the take-over step), then creates STATE/lock with O_CREAT|O_EXCL. A lock whose owner is
gone (same host, and the pid is dead, a zombie, reused by a process that started later, or the
machine rebooted since) is stale: it is removed and taken. A live owner, or one on another
host, makes the command fail with one line naming the owner. While holding the lock, a
command first removes what an interrupted run left (versions/.tmp-*, .current.*.tmp, export
work dirs), so a crash at any point costs nothing but the work in flight.

Disk full: an ENOSPC/EFBIG/EDQUOT escaping a command that holds the lock becomes one
UserError line; the writers publish by rename only after a complete write, so the current
version is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from fieldlearn.device.names import check_class_names
from fieldlearn.runtime.atomic import fsync_dir
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import NotRegularFile, open_regular
from fieldlearn.runtime.files import read_text as read_regular_text
from fieldlearn.runtime.layout import (CURRENT, EXPORT_PREFIX, LOCK, META, ONNX_FILE, ENGINE_FILE, PENDING, TMP_PREFIX,
                                       VERSION_RE, VERSIONS, WEIGHTS, current_version_name, switch_current,
                                       version_names, versions_dir)

FORMAT = 2  # bump when meta.json changes incompatibly (2: class statistics and a solved classifier head)
# ------------------------------------------------------------------------- reading versions

def read_meta(version_dir: Path) -> dict[str, Any]:
    """meta.json of a version, checked: a fieldlearn state of a format this version reads,
    with valid class names that agree with num_classes. UserError naming the file otherwise."""
    path = Path(version_dir) / META
    try:
        meta = json.loads(read_regular_text(path))
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror})") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise UserError(f"{path}: not a fieldlearn state")
    fmt = meta["format"]
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise UserError(f"{path}: format {fmt!r} is not a fieldlearn state format")
    if fmt > FORMAT:
        raise UserError(f"{path}: written by a newer fieldlearn ({meta.get('fieldlearn_version')}, "
                        f"format {fmt} > {FORMAT}); upgrade fieldlearn to read it")
    classes, n = meta.get("classes"), meta.get("num_classes")
    if not isinstance(classes, list):
        raise UserError(f"{path}: 'classes' is not a list")
    check_class_names(classes, path)
    if n != len(classes):
        raise UserError(f"{path}: num_classes {n!r} but {len(classes)} class names")
    if not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool) or meta["step"] < 0:
        raise UserError(f"{path}: 'step' is not an integer >= 0")
    if "config" in meta:
        check_saved_config(config_of(meta), path)
    return meta


def config_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The saved config, in today's fields. Format 1 predates the statistics classifiers:
    its model predicts with the trained head, and it may name options since removed."""
    cfg = meta["config"]
    if meta["format"] == 1:
        cfg = json.loads(json.dumps(cfg))
        cfg.setdefault("model", {}).update(classifier="linear", features="student")
        for gone in ("lc_calibration", "lc_margin"):
            cfg.get("loss", {}).pop(gone, None)
        if cfg.get("train", {}).get("new_head_init") == "random":
            cfg["train"]["new_head_init"] = "scaled"
    return cfg


def check_saved_config(d: Any, path: Path):
    """A meta.json's config, through the one validator (fieldlearn.device.validate): UserError
    naming the file and the field (`.../meta.json: config.train.epochs 0: must be ...`)."""
    from fieldlearn.device.config import RunConfig  # noqa: PLC0415 - torch-free
    from fieldlearn.device.validate import validate_config  # noqa: PLC0415

    try:
        cfg = RunConfig.from_dict(d)
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: bad config ({' '.join(str(e).split())[:160]})") from None
    return validate_config(cfg, source=str(path))


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, from its header alone (no torch)."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                return "header length beyond the end of the file"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "missing"
    except NotRegularFile as e:
        return e.strerror
    except (OSError, ValueError, RecursionError) as e:
        return f"unreadable header ({type(e).__name__})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            return f"tensor {k!r} has no data offsets"
    if 8 + n + end > size:
        return f"truncated ({size} bytes, tensors need {8 + n + end})"
    return None


def version_problem(version_dir: Path) -> str | None:
    """Why a version dir is not complete and loadable, or None (meta checked, weights' header
    and length checked; the weights themselves are checked against the architecture on load)."""
    try:
        read_meta(version_dir)
    except UserError as e:
        return str(e)
    why = safetensors_problem(Path(version_dir) / WEIGHTS)
    return f"{Path(version_dir) / WEIGHTS}: {why}" if why else None


def _accuracies(entry: dict) -> dict[str, float]:
    keys = ("test_accuracy", "new_class_val_accuracy", "eval_accuracy")
    return {k: entry[k] for k in keys if isinstance(entry.get(k), (int, float))}


def history(state_dir: Path) -> list[dict[str, Any]]:
    """One record per published version, oldest first: version, current, step, class counts,
    accuracies of the step that produced it, method, exports present, and 'problem' (None for
    a complete version)."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise UserError(f"{state_dir}: no such state directory")
    try:
        current = current_version_name(state_dir)
    except UserError:
        current = None
    out = []
    for name in version_names(state_dir, pending=False):
        vdir = versions_dir(state_dir) / name
        rec: dict[str, Any] = {"version": name, "current": name == current}
        problem = version_problem(vdir)
        if problem is None:
            meta = read_meta(vdir)
            steps = meta.get("history") or [{}]
            last = steps[-1] if isinstance(steps[-1], dict) else {}
            new = last.get("new_classes", [])
            rec.update(step=meta["step"], classes=meta["num_classes"],
                       new_classes=len(new) if isinstance(new, list) else None,
                       method=last.get("method"), accuracy=_accuracies(last),
                       fieldlearn_version=meta.get("fieldlearn_version"))
        rec["exported"] = (vdir / ONNX_FILE).is_file()
        rec["engine"] = (vdir / ENGINE_FILE).is_file()
        rec["created"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(vdir.stat().st_mtime))
        rec["problem"] = problem
        out.append(rec)
    return out


# ------------------------------------------------------------------------- switching and pruning

def _resolve(state_dir: Path, to: int | str) -> str:
    names = version_names(state_dir)
    try:
        n = int(to)
    except ValueError:
        raise UserError(f"--to {to}: not a version number") from None
    for name in names:
        if int(name) == n:
            return name
    raise UserError(f"--to {to}: no such version in {state_dir} (have {', '.join(names) or 'none'})")


def rollback(state_dir: Path, to: int | str | None = None) -> tuple[str | None, str]:
    """Make version `to` (default: the newest complete version older than the current one)
    current, atomically. Returns (previous current, new current). With `to`, this also
    repairs a damaged or missing `current` pointer (previous current: None). Hold state_lock."""
    state_dir = Path(state_dir)
    try:
        cur = current_version_name(state_dir)
    except UserError as e:
        if to is None:
            raise UserError(f"{e}; choose a version with --to N (see fieldlearn history)") from None
        cur = None
    if to is None:
        older = [n for n in version_names(state_dir) if int(n) < int(cur)]
        target = next((n for n in reversed(older) if version_problem(versions_dir(state_dir) / n) is None), None)
        if target is None:
            raise UserError(f"{state_dir}: no complete version older than the current {cur} to roll back to")
    else:
        target = _resolve(state_dir, to)
        problem = version_problem(versions_dir(state_dir) / target)
        if problem:
            raise UserError(f"--to {to}: version {target} is not complete ({problem})")
    if target != cur:
        switch_current(state_dir, target)
    return cur, target


def _discard(state_dir: Path, name: str) -> None:
    """Remove a version: an atomic rename out of the namespace first (a crash leaves a
    .tmp-* leftover, never a half-deleted version), then delete."""
    vd = versions_dir(state_dir)
    gone = vd / f"{TMP_PREFIX}discard-{name}-{os.getpid()}"
    os.rename(vd / name, gone)
    fsync_dir(vd)
    shutil.rmtree(gone, ignore_errors=True)


def prune(state_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions; the current one is always kept (on top of
    `keep` when it is older). Returns the removed names. Hold state_lock."""
    if keep < 1:
        raise UserError(f"--keep {keep}: must be at least 1")
    state_dir = Path(state_dir)
    cur = current_version_name(state_dir)
    names = version_names(state_dir)
    keep_set = set(names[-keep:]) | {cur}
    removed = [n for n in names if n not in keep_set]
    for n in removed:
        _discard(state_dir, n)
    return removed


# ------------------------------------------------------------------------- leftovers

def clean_leftovers(state_dir: Path) -> list[Path]:
    """Remove what an interrupted run left behind: versions/.tmp-* (a version being written or
    discarded), STATE/.current.*.tmp (a pointer being replaced), inside versions the export's
    .export-* work dirs and .NAME.*.tmp files, and a version still marked PENDING: renamed
    into place but never made current (killed between the rename and the `current` switch;
    the marker of the current version itself is just removed). Returns what was removed.
    Call it only while holding state_lock (it would delete a concurrent writer's work otherwise)."""
    state_dir = Path(state_dir)
    removed: list[Path] = []

    def rm(p: Path) -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)

    vd = versions_dir(state_dir)
    try:
        cur = current_version_name(state_dir)
    except UserError:
        cur = None
    if vd.is_dir():
        for p in list(vd.iterdir()):
            if p.name.startswith(TMP_PREFIX):
                rm(p)
            elif VERSION_RE.match(p.name) and p.is_dir() and (p / PENDING).exists():
                if p.name == cur:
                    rm(p / PENDING)
                else:
                    _discard(state_dir, p.name)
                    removed.append(p)
            elif VERSION_RE.match(p.name) and p.is_dir():
                for q in list(p.iterdir()):
                    if q.name.startswith(EXPORT_PREFIX) or (q.name.startswith(".") and q.name.endswith(".tmp")):
                        rm(q)
    for p in state_dir.glob(f".{CURRENT}.*.tmp"):   # runtime.atomic's temp name of the pointer
        rm(p)
    return removed


# ------------------------------------------------------------------------- the lock

@dataclass
class LockOwner:
    pid: int
    hostname: str
    boot_id: str
    proc_start: int | None   # /proc/<pid>/stat start time (clock ticks since boot): tells pid reuse
    started: float           # time.time() when taken
    command: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.command} (pid {self.pid} on {self.hostname}, since {when})"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of a process from /proc, or None where unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()   # after "pid (comm) ": field 3 onwards
    return fields[0], int(fields[19])            # state (field 3), starttime (field 22)


def _me(command: str) -> LockOwner:
    st = _proc_stat(os.getpid())
    return LockOwner(pid=os.getpid(), hostname=socket.gethostname(), boot_id=_boot_id(),
                     proc_start=st[1] if st else None, started=time.time(), command=command)


def read_lock(state_dir: Path) -> LockOwner | None:
    """The lock's owner, or None when there is no lock or it is unreadable (a writer that died
    between creating and filling it: the take-over flock makes that the only way)."""
    try:
        d = json.loads(read_regular_text(Path(state_dir) / LOCK))
        return LockOwner(pid=int(d["pid"]), hostname=str(d["hostname"]), boot_id=str(d.get("boot_id", "")),
                         proc_start=d.get("proc_start"), started=float(d["started"]), command=str(d["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def owner_alive(owner: LockOwner) -> bool:
    """False only when the owner is known to be gone; a lock from another host counts as live."""
    if owner.hostname != socket.gethostname():
        return True
    boot = _boot_id()
    if owner.boot_id and boot and owner.boot_id != boot:
        return False                     # the machine rebooted (power loss): nothing of it runs
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                             # exists, another user's
    st = _proc_stat(owner.pid)
    if st is None:
        return True
    state, start = st
    if state in ("Z", "X"):
        return False                     # killed, not yet reaped
    return owner.proc_start is None or start == owner.proc_start


class StateLocked(UserError):
    """Another fieldlearn command holds the state."""


class DiskFull(UserError):
    """A write failed for lack of space (ENOSPC, EFBIG, EDQUOT); nothing was published.
    Not the input's fault: fieldlearn watch retries it without counting a try."""


DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_OS_ERROR = re.compile(r"os error (\d+)")


def disk_full_reason(exc: BaseException) -> str | None:
    """'No space left on device' etc. when `exc` (or what it wraps) is a disk-full write error:
    OSError's errno (with the file, where known), or the 'os error N' that Rust writers
    (safetensors) put in their message."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return os.strerror(e.errno) + (f" (writing {e.filename})" if e.filename else "")
        for m in _OS_ERROR.finditer(str(e)):
            if int(m.group(1)) in DISK_FULL:
                return os.strerror(int(m.group(1)))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None


def _say(msg: str) -> None:
    print(f"fieldlearn: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def state_lock(state_dir: Path, command: str, create: bool = False) -> Iterator[LockOwner]:
    """Hold STATE/lock for the block; see the module docstring. create: make the state dir
    (0700) if absent, and remove it again on the way out if it is still empty."""
    state_dir = Path(state_dir)
    made = False
    if create and not state_dir.exists():
        try:
            state_dir.mkdir(parents=True, mode=0o700)
        except OSError as e:
            raise UserError(f"--state {state_dir}: cannot create it ({e.strerror})") from None
        made = True
    if not state_dir.is_dir():
        raise UserError(f"{state_dir}: no such state directory")
    me = _me(command)
    path = state_dir / LOCK
    stale = None
    dfd = os.open(state_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)     # only the take-over step; released below
        except OSError:
            pass                                # (no flock on this file system: O_EXCL alone)
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                owner = read_lock(state_dir)
                if owner is not None and owner_alive(owner):
                    hint = "" if owner.hostname == me.hostname else f"; if that machine is down, delete {path}"
                    raise StateLocked(f"{state_dir}: in use by {owner.describe()}; wait for it to finish{hint}") \
                        from None
                stale = owner or "an unreadable lock"
                path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise UserError(f"{path}: cannot create the state lock ({e.strerror}); "
                                f"fieldlearn needs write access to {state_dir}") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(me)))
                f.flush()
                os.fsync(f.fileno())
            os.fsync(dfd)
            break
    finally:
        os.close(dfd)                        # drops the flock
    try:
        if stale is not None:
            who = stale.describe() if isinstance(stale, LockOwner) else stale
            _say(f"removed the stale lock of {who}, which is no longer running")
        left = clean_leftovers(state_dir)
        if left:
            _say(f"removed {len(left)} leftover(s) of an interrupted run in {state_dir}")
        try:
            yield me
        except BaseException as e:
            reason = None if isinstance(e, UserError) else disk_full_reason(e)
            if reason is None:
                raise
            try:
                cur = f"the current version {current_version_name(state_dir)} is unchanged"
            except UserError:
                cur = "nothing was saved"
            clean_leftovers(state_dir)
            raise DiskFull(f"{state_dir}: {reason}; {cur}") from None
    finally:
        if read_lock(state_dir) == me:
            path.unlink(missing_ok=True)
        if made and not any(p for p in state_dir.iterdir() if p.name != VERSIONS) and \
                not any(versions_dir(state_dir).iterdir() if versions_dir(state_dir).is_dir() else []):
            shutil.rmtree(state_dir, ignore_errors=True)


__all__ = ["config_of", "FORMAT", "LockOwner", "StateLocked", "read_meta", "version_problem",
           "safetensors_problem", "history", "rollback", "prune", "clean_leftovers",
           "state_lock", "read_lock", "owner_alive",
           "disk_full_reason", "DiskFull", "check_saved_config"]
