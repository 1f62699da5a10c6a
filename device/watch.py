"""The field loop behind `fieldlearn watch`: new classes arrive as folders, get learned, leave.

    INBOX/
      apple/              one folder per new class (from `fieldlearn capture`, a copy, ...)
        0001.jpg ...
        .done             written last: the folder is complete (or: quiet for --quiet-seconds)
      .rejected/apple/    a folder that could not be learned, with a `.reason` file
    STATE/
      current, versions/  the learner's state (fieldlearn.device.state); never any image
      watch-journal.json  the increment in progress: class folder and file NAMES, no data
      watch-status.json   what the daemon is doing (JSON; --status puts it elsewhere)
      .watch.lock         one daemon per state (flock; released when the process dies)

One increment, and where a stop (SIGTERM, SIGKILL, power loss) can land:

    scan -> claim (journal written) -> read images into memory -> LwM step -> evaluate on
    held-out new images -> ONNX export + parity check inside save_version's writers ->
    `current` switched (atomic) -> journal phase "cleanup" -> learned images deleted or
    moved to --keep-images -> journal removed

Stopped before `current` switched: the old model is still served, the inbox is untouched,
and the next start redoes the increment from the journal's folders. Stopped after: the
next start sees the classes in the current model and only finishes the cleanup. So no
image is lost and no class is learned twice. After MAX_ATTEMPTS failed tries the claimed
folders are moved to INBOX/.rejected/ (never deleted) so that a bad folder cannot stall
the loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from fieldlearn.device.atomic import write_text
from fieldlearn.device.data import IMAGE_EXTENSIONS
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import current_version_name

DONE = ".done"
REJECTED = ".rejected"
REASON = ".reason"
JOURNAL = "watch-journal.json"
STATUS = "watch-status.json"
LOCK = ".watch.lock"
MAX_ATTEMPTS = 3          # tries of one claimed increment before its folders are rejected
EXPORT_CHECK_IMAGES = 4   # real images (from the increment) in the export's parity check


class IncrementFailed(RuntimeError):
    """An increment raised; the event is logged and the journal decides what happens next."""


class Stopped(BaseException):
    """SIGTERM arrived (systemctl stop): leave at once; the journal makes this safe."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def image_files(folder: Path) -> list[str]:
    """Names of the image files of a class folder, sorted (hidden and partial files skipped)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file(follow_symlinks=False)
                  and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)


def last_change(folder: Path) -> float:
    """Latest mtime of the folder and everything directly in it."""
    latest = folder.stat().st_mtime
    for e in os.scandir(folder):
        try:
            latest = max(latest, e.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:   # removed while we looked: it just changed
            return time.time()
    return latest


def scan(inbox: Path, quiet_seconds: float = 0, now: float | None = None) -> tuple[list[str], list[str]]:
    """(ready, waiting) class folder names of INBOX. Ready: has `.done`, or (quiet_seconds > 0)
    holds images and nothing in it changed for quiet_seconds."""
    now = time.time() if now is None else now
    ready, waiting = [], []
    for e in sorted(os.scandir(inbox), key=lambda e: e.name):
        if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
            continue
        folder = Path(e.path)
        try:
            if (folder / DONE).exists():
                ready.append(e.name)
            elif quiet_seconds > 0 and image_files(folder) and now - last_change(folder) >= quiet_seconds:
                ready.append(e.name)
            else:
                waiting.append(e.name)
        except FileNotFoundError:   # vanished while scanning
            continue
    return ready, waiting


@dataclass
class Claim:
    """The journal: which class folders (and which files in them) one increment takes.
    Names only: the journal never holds image data."""
    inbox: str
    files: dict[str, list[str]]            # class folder name -> image file names
    base_version: str                      # the version the increment starts from
    attempts: int = 1
    phase: str = "learning"                # "learning" -> "cleanup"
    version: str | None = None             # the published version (phase "cleanup")
    started: str = field(default_factory=utc_now)

    @property
    def names(self) -> list[str]:
        return list(self.files)


def read_journal(state_dir: Path) -> Claim | None:
    path = Path(state_dir) / JOURNAL
    try:
        d = json.loads(path.read_text())
        return Claim(**d)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable journal ({type(e).__name__}: {e}); if no `fieldlearn watch` "
                        f"is running, delete it: the inbox folders are still there and will be learned again") from None


def write_journal(state_dir: Path, claim: Claim) -> None:
    write_text(Path(state_dir) / JOURNAL, json.dumps(asdict(claim), indent=1, sort_keys=True) + "\n")


def clear_journal(state_dir: Path) -> None:
    (Path(state_dir) / JOURNAL).unlink(missing_ok=True)


def move_file(src: Path, dest: Path) -> None:
    """rename, or copy + fsync + unlink across file systems; safe to repeat after a crash."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copy2(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        src.unlink()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class Watcher:
    """One daemon: `run()` calls `step()` whenever something may be ready; a step first
    finishes or redoes an increment that a stopped run left in the journal.

    cfg_args: the parsed command line (config options of learn: --epochs, --lr, ...);
    the rest of the config comes from the state's current version.
    """

    def __init__(self, inbox: Path, state_dir: Path, *, quiet_seconds: float = 0, keep_images: Path | None = None,
                 status_path: Path | None = None, val_fraction: float = 0.1, eval_data: str | None = None,
                 cfg_args: Any = None, log: Callable[[str], None] = print):
        self.inbox = Path(inbox).expanduser().resolve()
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.keep = Path(keep_images).expanduser().resolve() if keep_images is not None else None
        self.status_path = Path(status_path).expanduser() if status_path else self.state_dir / STATUS
        self.quiet_seconds = float(quiet_seconds)
        self.val_fraction = val_fraction
        self.eval_data = eval_data
        self.cfg_args = cfg_args
        self._log = log
        self._lock_fd: int | None = None
        self._written: dict[str, Any] | None = None
        self._busy: str | None = None
        self.status: dict[str, Any] = {"state": "starting", "pid": os.getpid(), "inbox": str(self.inbox),
                                       "state_dir": str(self.state_dir), "last_event": None,
                                       "last_event_time": None, "last_increment": None, "increments": 0}
        self._check_paths()

    # ------------------------------------------------------------------ set-up

    def _check_paths(self) -> None:
        if not (self.state_dir / "current").is_file():
            raise UserError(f"--state {self.state_dir}: holds no model yet (run fieldlearn init first)")
        if _inside(self.state_dir, self.inbox) or _inside(self.inbox, self.state_dir):
            raise UserError(f"INBOX {self.inbox} and --state {self.state_dir} must not contain each other")
        if self.keep is not None:
            if _inside(self.keep, self.state_dir) or _inside(self.state_dir, self.keep):
                raise UserError(f"--keep-images {self.keep}: must be outside the state dir {self.state_dir} "
                                "(the state never holds images)")
            if _inside(self.keep, self.inbox):
                raise UserError(f"--keep-images {self.keep}: must be outside INBOX {self.inbox}")
        if self.inbox.exists() and not self.inbox.is_dir():
            raise UserError(f"INBOX {self.inbox}: not a directory")
        self.inbox.mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """One watcher per state dir; the lock dies with the process (SIGKILL included)."""
        path = self.state_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = path.read_text().strip() or "?"
            raise UserError(f"--state {self.state_dir}: another fieldlearn watch is running on it (pid {other})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ events and status

    def event(self, what: str, text: str, **status: Any) -> None:
        """One log line per event, and the status file updated to match."""
        self._log(f"{utc_now()} watch {what}: {text}")
        self.status.update(status)
        self.status["last_event"] = f"{what}: {text}"
        self.status["last_event_time"] = utc_now()
        self.write_status()

    def write_status(self) -> None:
        """Rewrite the status file when something in it changed (not on every idle poll:
        a Jetson's eMMC should not be written every few seconds for nothing)."""
        try:
            name = current_version_name(self.state_dir)
            from fieldlearn.device.state import read_meta  # noqa: PLC0415

            classes = list(read_meta(self.state_dir / "versions" / name).get("classes", []))
        except UserError:
            name, classes = None, []
        try:
            ready, waiting = scan(self.inbox, self.quiet_seconds)
        except OSError:
            ready, waiting = [], []
        self.status.update(current_version=name, classes=classes, num_classes=len(classes), ready=ready,
                           waiting=waiting, pid=os.getpid())
        if self.status == self._written:
            return
        self._written = dict(self.status)
        try:
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.status_path, json.dumps({**self.status, "updated": utc_now()}, indent=1,
                                                    sort_keys=True) + "\n")
        except OSError as e:
            self._log(f"{utc_now()} watch warning: cannot write {self.status_path}: {e}")

    # ------------------------------------------------------------------ the loop

    def check_journal(self) -> None:
        """At start: an unfinished increment must belong to this inbox."""
        claim = read_journal(self.state_dir)
        if claim is not None and Path(claim.inbox) != self.inbox:
            raise UserError(f"{self.state_dir / JOURNAL}: an increment from INBOX {claim.inbox} is unfinished; "
                            f"run fieldlearn watch {claim.inbox} --state {self.state_dir} to finish it")

    def _finish_published(self, claim: Claim) -> bool:
        """A previous run was stopped after publishing `claim` (its classes are in the current
        model): only the clean-up is left. Returns False when the increment must be redone."""
        from fieldlearn.device.state import read_meta  # noqa: PLC0415

        current = current_version_name(self.state_dir)
        known = read_meta(self.state_dir / "versions" / current).get("classes", [])
        if not all(n in known for n in claim.names):
            return False
        claim.phase, claim.version = "cleanup", claim.version or current
        write_journal(self.state_dir, claim)
        self.event("recovered", f"{', '.join(claim.names)} had been learned into version {claim.version}; "
                                "finishing the clean-up", state="cleanup")
        self._dispose(claim)
        clear_journal(self.state_dir)
        self.event("cleaned", self._disposed_text(claim), state="idle", claimed=[])
        return True

    def _state_lock(self):
        """STATE/lock (fieldlearn.device.store) for one increment, so that learn, export,
        rollback and prune never interleave with it; not held while idle."""
        try:
            from fieldlearn.device.store import state_lock  # noqa: PLC0415
        except ImportError:                                # a store without the lock
            return contextlib.nullcontext()
        return state_lock(self.state_dir, "fieldlearn watch")

    def step(self) -> bool:
        """Learn what is ready as one increment. True if an increment was published."""
        if read_journal(self.state_dir) is None and not scan(self.inbox, self.quiet_seconds)[0]:
            self.status["state"] = "idle"
            self.write_status()
            return False
        try:
            with self._state_lock():
                self._busy = None
                return self._step_locked()
        except UserError as e:
            if type(e).__name__ != "StateLocked":
                raise
            if str(e) != self._busy:                   # one line per distinct owner, not per poll
                self._busy = str(e)
                self.event("waiting", f"{e}", state="waiting")
            return False

    def _step_locked(self) -> bool:
        claim = read_journal(self.state_dir)
        if claim is None:
            claim = self._claim()
            if claim is None:
                self.status["state"] = "idle"
                self.write_status()
                return False
        else:
            if self._finish_published(claim):
                return True
            self.event("recovered", f"the increment with {', '.join(claim.names)} (try {claim.attempts}) "
                                    "was stopped before it was published; redoing it", state="learning")
            claim.attempts += 1
            claim.files = {n: [f for f in fs if (self.inbox / n / f).is_file()] for n, fs in claim.files.items()}
            for n in [n for n, fs in claim.files.items() if not fs]:
                self.event("dropped", f"{n}: its claimed images are gone from the inbox")
                del claim.files[n]
            if not claim.files:
                clear_journal(self.state_dir)
                return False
            if claim.attempts > MAX_ATTEMPTS:
                self._reject_all(claim, f"{MAX_ATTEMPTS} tries failed; last: {self.status.get('last_error')}")
                return False
            write_journal(self.state_dir, claim)
        try:
            return self._learn(claim)
        except Stopped:
            claim.attempts -= 1                      # a stop is not the data's fault
            write_journal(self.state_dir, claim)
            self.event("stopped", f"increment with {', '.join(claim.names)} interrupted; it is redone on the "
                                  "next start", state="stopped")
            raise
        except KeyboardInterrupt:
            claim.attempts -= 1
            write_journal(self.state_dir, claim)
            self.event("stopped", "interrupted; the increment is redone on the next start", state="stopped")
            raise
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            self.status["last_error"] = msg
            if claim.attempts >= MAX_ATTEMPTS:
                self._reject_all(claim, f"{MAX_ATTEMPTS} tries failed; last: {msg}")
            self.event("error", f"increment with {', '.join(claim.names)} failed (try {claim.attempts} of "
                                f"{MAX_ATTEMPTS}): {msg}", state="error")
            raise IncrementFailed(msg) from e

    def run(self, once: bool = False, poll: float = 2.0) -> int:
        self.lock()
        try:
            self.event("started", f"watching {self.inbox} for class folders (ready on {DONE}"
                                  + (f" or {self.quiet_seconds:g} s quiet" if self.quiet_seconds > 0 else "")
                                  + f"); state {self.state_dir}", state="idle")
            self.check_journal()
            while True:
                published = self.step()
                if once:
                    return 0
                if not published:
                    time.sleep(poll)
        except Stopped:
            if self.status.get("state") != "stopped":
                self.event("stopped", "on request", state="stopped")
            return 0
        except KeyboardInterrupt:
            if self.status.get("state") != "stopped":
                self.event("stopped", "interrupted", state="stopped")
            raise
        except IncrementFailed as e:   # logged; exit non-zero so that systemd restarts a clean process
            traceback.print_exception(e.__cause__ or e, file=sys.stderr)
            return 1
        finally:
            self.unlock()

    # ------------------------------------------------------------------ parts of a step

    def _claim(self) -> Claim | None:
        from fieldlearn.device.commands.learn import check_class_names  # noqa: PLC0415
        from fieldlearn.device.state import read_meta  # noqa: PLC0415

        ready, _ = scan(self.inbox, self.quiet_seconds)
        if not ready:
            return None
        current = current_version_name(self.state_dir)
        known = list(read_meta(self.state_dir / "versions" / current).get("classes", []))
        files: dict[str, list[str]] = {}
        for name in ready:
            try:
                check_class_names([name], known, self.inbox)
            except UserError as e:
                self._reject(name, str(e))
                continue
            names = image_files(self.inbox / name)
            if not names:
                self._reject(name, f"{self.inbox / name}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
                continue
            files[name] = names
        if not files:
            return None
        claim = Claim(inbox=str(self.inbox), files=files, base_version=current)
        write_journal(self.state_dir, claim)
        n = sum(map(len, files.values()))
        self.event("claimed", f"{', '.join(files)} ({n} images) on top of version {current}",
                   state="learning", claimed=list(files))
        return claim

    def _read(self, claim: Claim, size: int):
        """The claimed images in memory (ImageSet, labels 0..n-1); classes with no readable
        image are rejected and dropped from the claim."""
        import numpy as np  # noqa: PLC0415
        import torch  # noqa: PLC0415

        from fieldlearn.device.data import ImageSet, read_image  # noqa: PLC0415

        images, labels, names = [], [], []
        for name in list(claim.files):
            got = [a for a in (read_image(self.inbox / name / f, size) for f in claim.files[name]) if a is not None]
            if not got:
                self._reject(name, f"{self.inbox / name}: none of its {len(claim.files[name])} files is a readable image")
                del claim.files[name]
                continue
            names.append(name)
            images.extend(got)
            labels.extend([len(names) - 1] * len(got))
        write_journal(self.state_dir, claim)
        if not names:
            return None
        return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), names)

    def _learn(self, claim: Claim) -> bool:
        from fieldlearn.device.cli_config import config_from_args  # noqa: PLC0415
        from fieldlearn.device.commands.common import setup_torch  # noqa: PLC0415
        from fieldlearn.device.commands.learn import learn_new_classes  # noqa: PLC0415
        from fieldlearn.device.state import load_state  # noqa: PLC0415

        t0 = time.perf_counter()
        state = load_state(self.state_dir)
        cfg = config_from_args(self.cfg_args, base=state.config) if self.cfg_args is not None else state.config
        if not hasattr(self.cfg_args, "train.progress"):
            cfg.train.progress = False               # no progress bars in a daemon's log
        setup_torch(cfg)
        data = self._read(claim, cfg.model.input_size)
        if data is None:
            clear_journal(self.state_dir)
            return False
        self.event("learning", f"{len(data.class_names)} classes, {len(data)} images, {cfg.method}",
                   state="learning", claimed=claim.names)
        check = [str(self.inbox / n / fs[0]) for n, fs in claim.files.items()][:EXPORT_CHECK_IMAGES]
        inc = learn_new_classes(self.state_dir, state, data, cfg, val_fraction=self.val_fraction,
                                eval_data=self.eval_data, where=self.inbox, export=True, export_images=check,
                                extra_entry={"source": "watch"})
        claim.phase, claim.version = "cleanup", inc.version_dir.name
        write_journal(self.state_dir, claim)
        acc = inc.entry.get("new_class_val_accuracy")
        summary = {"version": claim.version, "new_classes": claim.names, "n_images": len(data),
                   "new_class_val_accuracy": acc, "n_val_images": inc.entry.get("n_val_images", 0),
                   "seconds": round(time.perf_counter() - t0, 1), "time": utc_now()}
        self.event("published", f"version {claim.version}: {len(inc.classes)} classes (+{', '.join(claim.names)}), "
                                + (f"held-out accuracy on them {100 * acc:.1f}% "
                                   f"({summary['n_val_images']} images), " if acc is not None else "")
                                + "model.onnx checked and served", state="cleanup", last_increment=summary)
        self._dispose(claim)
        clear_journal(self.state_dir)
        self.status["increments"] = int(self.status.get("increments", 0)) + 1
        self.event("cleaned", self._disposed_text(claim), state="idle", claimed=[])
        return True

    def _dispose(self, claim: Claim) -> None:
        """Delete the learned images (or move them to KEEP/<version>/<class>/); idempotent."""
        for name, names in claim.files.items():
            src = self.inbox / name
            for f in names:
                p = src / f
                if not p.exists():
                    continue
                if self.keep is not None:
                    move_file(p, self.keep / str(claim.version) / name / f)
                else:
                    p.unlink()
            (src / DONE).unlink(missing_ok=True)
            try:
                src.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left = sorted(os.listdir(src))
                self.event("left", f"{src}: {len(left)} file(s) that were not part of the increment stay "
                                   f"({', '.join(left[:3])}{'...' if len(left) > 3 else ''})")

    def _disposed_text(self, claim: Claim) -> str:
        n = sum(map(len, claim.files.values()))
        where = f"moved to {self.keep / str(claim.version)}" if self.keep is not None else "deleted"
        return f"{n} learned images of {', '.join(claim.names)} {where}"

    def _reject(self, name: str, reason: str) -> None:
        src = self.inbox / name
        dest = self.inbox / REJECTED / name
        i = 1
        while dest.exists():
            i += 1
            dest = self.inbox / REJECTED / f"{name}.{i}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dest)
            (dest / REASON).write_text(reason + "\n")
        except FileNotFoundError:
            return
        self.event("rejected", f"{name} -> {dest} ({reason})")

    def _reject_all(self, claim: Claim, reason: str) -> None:
        for name in claim.names:
            self._reject(name, reason)
        clear_journal(self.state_dir)


def systemd_unit(inbox: Path, state_dir: Path, *, executable: list[str], extra_args: list[str] | None = None,
                 user: str | None = None, scope: str = "system") -> str:
    """A unit that runs the watcher and restarts it when it fails."""
    def q(arg: str) -> str:
        if any(c in arg for c in "\n\r\"\\"):
            raise UserError(f"{arg!r}: cannot be put in a systemd unit (quote, backslash or newline)")
        arg = arg.replace("%", "%%")
        return f'"{arg}"' if any(c.isspace() for c in arg) or not arg else arg

    cmd = [*executable, "watch", str(Path(inbox).expanduser().resolve()), "--state",
           str(Path(state_dir).expanduser().resolve()), *(extra_args or [])]
    lines = [
        "# generated by: fieldlearn watch --print-unit",
        "[Unit]",
        "Description=fieldlearn watch: learn new classes from an inbox folder and serve the updated model",
        "After=local-fs.target",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={' '.join(q(a) for a in cmd)}",
        "Restart=on-failure",
        "RestartSec=30",
        "# SIGTERM stops at once, even mid-increment: the journal redoes it on the next start",
        "TimeoutStopSec=60",
        "Environment=PYTHONUNBUFFERED=1",
        "# learning yields to the application that serves the model",
        "Nice=10",
        "IOSchedulingClass=idle",
    ]
    if scope == "system" and user:
        lines.append(f"User={user}")
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if scope == 'system' else 'default.target'}", ""]
    return "\n".join(lines)
