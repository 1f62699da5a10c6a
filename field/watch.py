"""The field loop behind `fieldlearn watch`: new classes arrive as folders, get learned, leave.

    INBOX/
      apple/              one folder per new class (from `fieldlearn capture`, a copy, ...)
        0001.jpg ...
        .done             written last: the folder is complete (or: quiet for --quiet-seconds)
      .rejected/apple/    a folder that could not be learned (or the files of a learned class
                          that could not be read), with a `.reason` file
    STATE/
      current, versions/  the learner's state (fieldlearn.store.state); never any image
      watch-journal.json  the increment in progress: class folder and file NAMES, no data
      watch-status.json   what the daemon is doing (JSON; --status puts it elsewhere)
      .watch.lock         one daemon per state (flock; released when the process dies)

A folder is taken when it has `.done` (or, with --quiet-seconds, nothing changed in it for
that long), nothing in it changed for --settle-seconds, and it holds at least MIN_IMAGES
image files; until then it waits (one `waiting` line says why).

One increment, and where a stop (SIGTERM, SIGKILL, power loss) can land:

    scan -> claim (journal written) -> read images into memory -> LwM step -> evaluate on
    held-out new images -> ONNX export + parity check inside save_version's writers ->
    `current` switched (atomic) -> journal phase "cleanup" -> learned images deleted or
    moved to --keep-images -> journal removed

Stopped before `current` switched: the old model is still served, the inbox is untouched,
and the next start redoes the increment from the journal's folders. Stopped after: the
next start sees the classes in the current model and only finishes the cleanup. So no
image is lost and no class is learned twice.

The contract on errors: only a failure caused by the classes' own data counts as a failed
try (an unusable class folder, a step that diverges or fails its export check, an
unexpected error in the step). An interruption (signal, crash, power loss), a full disk,
an unwritable or vanished inbox or state, or the state lock held by another command is
never counted: it is logged as an `error` event, the status file says `error`, and the
daemon retries after a back-off, carrying on. A class with too few readable images is set
aside on its own; a failing increment of several classes is narrowed to one class at a
time, so only a class that fails alone MAX_ATTEMPTS times is moved to INBOX/.rejected/
(never deleted), and one bad folder never rejects the others.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from fieldlearn.device.data import MIN_IMAGES, SHOWN, Skips
from fieldlearn.device.config import StepOptions
from fieldlearn.device.validate import ConfigOverrides
from fieldlearn.runtime.atomic import fsync_file, write_text
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import read_text, why_not_regular
from fieldlearn.runtime.layout import (DONE, JOURNAL, META, REASON, REJECTED, STATUS, WATCH_LOCK, current_version_dir,
                                       current_version_name, has_current, version_dir)

MAX_ATTEMPTS = 3          # failed tries (caused by the data) of one class alone before it is set aside
EXPORT_CHECK_IMAGES = 4   # real images (from the increment) in the export's parity check
SETTLE_SECONDS = 10.0     # default: a folder must have been quiet this long before it is taken
MAX_BACKOFF = 60.0        # seconds between retries after an error that is not the data's fault


class Stopped(BaseException):
    """SIGTERM arrived (systemctl stop): leave at once; the journal makes this safe."""


class NotTheData(UserError):
    """The state or the configuration failed to load for an increment: retried, never a failed try."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _entries(folder: Path) -> list[os.DirEntry]:
    return sorted(os.scandir(folder), key=lambda e: e.name)


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()
    except OSError:
        return False


def image_files(folder: Path) -> list[str]:
    """Names of the files of a class folder that are offered to the decoder, sorted: every
    non-hidden entry that is not a folder (whatever its extension; FIFOs and broken links
    included, so that reading them reports them). Hidden names (`.done`, `.x.part`) are not."""
    try:
        entries = _entries(folder)
    except OSError:
        return []
    return [e.name for e in entries if not e.name.startswith(".") and not _is_dir(e)]


def count_images(folder: Path, names: list[str]) -> int:
    """How many of `names` are regular files (what MIN_IMAGES counts; a stat each, no read)."""
    return sum(why_not_regular(folder / n) is None for n in names)


def last_change(folder: Path) -> float:
    """Latest mtime of the folder and everything directly in it."""
    latest = folder.stat().st_mtime
    for e in os.scandir(folder):
        try:
            latest = max(latest, e.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:   # removed while we looked: it just changed
            return time.time()
    return latest


@dataclass
class Scan:
    ready: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)      # waiting folder -> why (when not just "no .done")
    skipped: dict[str, str] = field(default_factory=dict)  # inbox entry that is not a class folder -> what it is


def scan_inbox(inbox: Path, quiet_seconds: float = 0, settle_seconds: float = 0, now: float | None = None) -> Scan:
    """Which class folders of INBOX are ready. Ready: `.done` (or, quiet_seconds > 0, nothing
    changed for quiet_seconds), nothing changed for settle_seconds, and at least MIN_IMAGES
    regular files. FileNotFoundError when INBOX itself is gone."""
    now = time.time() if now is None else now
    out = Scan()
    for e in _entries(inbox):
        if e.name == REJECTED:
            continue
        if e.name.startswith(".") or not _is_dir(e):
            out.skipped[e.name] = "hidden" if e.name.startswith(".") else \
                (why_not_regular(e.path) or "a regular file").removeprefix("is ").split(",")[0]
            continue
        folder = Path(e.path)
        try:
            done = (folder / DONE).exists()
            quiet = now - last_change(folder)
            names = image_files(folder)
            n = count_images(folder, names) if names else 0
        except FileNotFoundError:   # vanished while scanning
            continue
        except OSError as err:
            out.waiting.append(e.name)
            out.why[e.name] = f"cannot be read ({err.strerror})"
            continue
        marked = done or (quiet_seconds > 0 and names and quiet >= quiet_seconds)
        if marked and quiet >= settle_seconds and n >= MIN_IMAGES:
            out.ready.append(e.name)
            continue
        out.waiting.append(e.name)
        if marked and n < MIN_IMAGES:
            out.why[e.name] = f"{n} image file{'s' if n != 1 else ''}; a class needs at least {MIN_IMAGES}"
        elif marked:   # (a fixed text: the status file is not rewritten on every poll)
            out.why[e.name] = f"settling: taken once nothing in it changed for {settle_seconds:g} s"
    return out


def scan(inbox: Path, quiet_seconds: float = 0, now: float | None = None,
         settle_seconds: float = 0) -> tuple[list[str], list[str]]:
    """(ready, waiting) class folder names of INBOX (scan_inbox)."""
    s = scan_inbox(inbox, quiet_seconds, settle_seconds, now)
    return s.ready, s.waiting


@dataclass
class Claim:
    """The journal: which class folders (and which files in them) one increment takes.
    Names only: the journal never holds image data."""
    inbox: str
    files: dict[str, list[str]]            # class folder name -> file names offered to the decoder
    base_version: str                      # the version the increment starts from
    failures: int = 0                      # failed tries caused by the data (never by a stop or the disk)
    phase: str = "learning"                # "learning" -> "cleanup"
    version: str | None = None             # the published version (phase "cleanup")
    started: str = field(default_factory=utc_now)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)   # class -> file -> why it was not learned

    @property
    def names(self) -> list[str]:
        return list(self.files)


def read_journal(state_dir: Path) -> Claim | None:
    path = Path(state_dir) / JOURNAL
    try:
        d = json.loads(read_text(path))
        d.pop("attempts", None)             # a journal of fieldlearn < 0.2 (tries counted stops too)
        return Claim(**d)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, UnicodeDecodeError, OSError) as e:
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
        fsync_file(tmp)
        os.replace(tmp, dest)
        src.unlink()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _shorten(names: list[str]) -> str:
    return ", ".join(repr(n)[1:-1] for n in names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


def is_environment(e: BaseException) -> bool:
    """True for an error that is not the classes' data's fault (a try is not counted): a full
    disk, the state lock held by another command, an OS error (permissions, a read-only or
    vanished inbox or state, I/O), memory. Image files that cannot be read never get here:
    the reader skips and reports them."""
    from fieldlearn.store.versions import DiskFull, StateLocked  # noqa: PLC0415

    return isinstance(e, (DiskFull, StateLocked, NotTheData, OSError, MemoryError))


def _probe_writable(folder: Path) -> str | None:
    """None if a file can be created and removed in `folder`, else why not (a real write:
    access() says yes to root on a read-only mount)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fieldlearn-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
        return None
    except OSError as e:
        return e.strerror or type(e).__name__


class Watcher:
    """One daemon: `run()` calls `step()` whenever something may be ready; a step first
    finishes or redoes an increment that a stopped run left in the journal.

    overrides: config fields set by the caller (fieldlearn watch: the options of learn given
    on its command line, --epochs, --lr, ...); the rest of the config comes from the state's
    current version.
    """

    def __init__(self, inbox: Path, state_dir: Path, *, quiet_seconds: float = 0, keep_images: Path | None = None,
                 status_path: Path | None = None, val_fraction: float = StepOptions.val_fraction, eval_data: str | None = None,
                 overrides: ConfigOverrides | None = None, log: Callable[[str], None] = print, settle_seconds: float = SETTLE_SECONDS):
        self.inbox = Path(inbox).expanduser().resolve()
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.keep = Path(keep_images).expanduser().resolve() if keep_images is not None else None
        self.status_path = Path(status_path).expanduser() if status_path else self.state_dir / STATUS
        self.quiet_seconds = float(quiet_seconds)
        self.settle_seconds = float(settle_seconds)
        self.val_fraction = val_fraction
        self.eval_data = eval_data
        self.overrides = overrides
        self._log = log
        self._lock_fd: int | None = None
        self._written: dict[str, Any] | None = None
        self._busy: str | None = None
        self._said: dict[str, str] = {}          # waiting/skipped notes already logged (once each)
        self._error: str | None = None           # the error being retried (logged once)
        self.failed = False                      # a try failed in this step (--once exits 1)
        self.status: dict[str, Any] = {"state": "starting", "pid": os.getpid(), "inbox": str(self.inbox),
                                       "state_dir": str(self.state_dir), "last_event": None,
                                       "last_event_time": None, "last_increment": None, "increments": 0,
                                       "error": None}
        self._check_paths()

    # ------------------------------------------------------------------ set-up

    def _check_paths(self) -> None:
        if not has_current(self.state_dir):
            current_version_name(self.state_dir)     # its message says what to do (rollback --to N, or init)
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
        try:
            self.inbox.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"INBOX {self.inbox}: cannot create it ({e.strerror})") from None

    def check_writable(self) -> None:
        """At start: the inbox (learned images are deleted or moved, bad folders set aside),
        the state dir (versions, journal, lock) and --keep-images must be writable; one line
        otherwise, before anything is claimed."""
        places = [("INBOX", self.inbox, "learned images are deleted or moved from it"),
                  ("--state", self.state_dir, "each increment writes a version and a journal there")]
        if self.keep is not None:
            try:
                self.keep.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--keep-images {self.keep}: cannot create it ({e.strerror})") from None
            places.append(("--keep-images", self.keep, "learned images are moved there"))
        for what, folder, why in places:
            problem = _probe_writable(folder)
            if problem:
                raise UserError(f"{what} {folder}: not writable ({problem}); fieldlearn watch needs write access: {why}")

    def check_config(self) -> None:
        """At start: fail (exit 2) on options that cannot work here, e.g. --device cuda without
        a GPU, rather than on every increment (which would end with the folders set aside).
        The config is checked as an increment will make it (increment.step_config)."""
        from fieldlearn.device.config import RunConfig  # noqa: PLC0415
        from fieldlearn.field.increment import step_config  # noqa: PLC0415
        from fieldlearn.store.versions import read_meta  # noqa: PLC0415

        vdir = current_version_dir(self.state_dir)
        meta = read_meta(vdir)
        try:
            base = RunConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.state_dir}: the current version's config is unreadable ({e})") from None
        step_config(base, self.overrides, source=str(vdir / META))

    def lock(self) -> None:
        """One watcher per state dir; the lock dies with the process (SIGKILL included)."""
        path = self.state_dir / WATCH_LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as e:
            raise UserError(f"{path}: cannot open the daemon lock ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{path}: not a regular file; remove it (it is the daemon's lock)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                other = read_text(path).strip() or "?"
            except OSError:
                other = "?"
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
        self._log(f"{utc_now()} watch {what}: {' '.join(text.split())}")
        self.status.update(status)
        self.status["last_event"] = f"{what}: {text}"
        self.status["last_event_time"] = utc_now()
        self.write_status()

    def note(self, key: str, what: str, text: str) -> None:
        """An event logged once for as long as it stays true (waiting folders, skipped entries)."""
        if self._said.get(key) != text:
            self._said[key] = text
            self.event(what, text)

    def write_status(self, scan_result: Scan | None = None) -> None:
        """Rewrite the status file when something in it changed (not on every idle poll:
        a Jetson's eMMC should not be written every few seconds for nothing)."""
        try:
            name = current_version_name(self.state_dir)
            from fieldlearn.store.versions import read_meta  # noqa: PLC0415

            classes = list(read_meta(version_dir(self.state_dir, name)).get("classes", []))
        except (UserError, OSError):
            name, classes = None, []
        if scan_result is None:
            try:
                scan_result = scan_inbox(self.inbox, self.quiet_seconds, self.settle_seconds)
            except OSError:
                scan_result = Scan()
        self.status.update(current_version=name, classes=classes, num_classes=len(classes), ready=scan_result.ready,
                           waiting=scan_result.waiting, waiting_why=scan_result.why, pid=os.getpid())
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
        from fieldlearn.store.versions import read_meta  # noqa: PLC0415

        current = current_version_name(self.state_dir)
        known = read_meta(version_dir(self.state_dir, current)).get("classes", [])
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
        """STATE/lock (fieldlearn.store.versions) for one increment, so that learn, export,
        rollback and prune never interleave with it; not held while idle."""
        from fieldlearn.store.versions import state_lock  # noqa: PLC0415

        return state_lock(self.state_dir, "fieldlearn watch")

    def _look(self) -> Scan:
        """Scan the inbox and say (once each) what waits and why, and what is not a class folder."""
        s = scan_inbox(self.inbox, self.quiet_seconds, self.settle_seconds)
        for name, why in s.why.items():
            if not why.startswith("settling"):
                self.note(f"wait:{name}", "waiting", f"{self.inbox / name}: {why}")
        if s.skipped:
            names = sorted(s.skipped)
            self.note("skipped", "skipped", f"INBOX {self.inbox}: {len(names)} entr{'ies' if len(names) != 1 else 'y'} "
                                            f"not taken as class folders ("
                      + ", ".join(f"{repr(n)[1:-1]}: {s.skipped[n]}" for n in names[:SHOWN])
                      + (", ..." if len(names) > SHOWN else "") + ")")
        return s

    def step(self) -> bool:
        """Learn what is ready as one increment. True if an increment was published."""
        self.failed = False
        s = self._look()
        if read_journal(self.state_dir) is None and not s.ready:
            self.status["state"] = "idle"
            self.write_status(s)
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
            self.event("recovered", f"the increment with {', '.join(claim.names)} was not published "
                                    f"({claim.failures} failed tr{'ies' if claim.failures != 1 else 'y'} so far); "
                                    "redoing it", state="learning")
            claim.files = {n: [f for f in fs if os.path.lexists(self.inbox / n / f)] for n, fs in claim.files.items()}
            for n in [n for n, fs in claim.files.items() if not fs]:
                self.event("dropped", f"{n}: its claimed files are gone from the inbox")
                del claim.files[n]
            if not claim.files:
                clear_journal(self.state_dir)
                return False
            write_journal(self.state_dir, claim)
        try:
            return self._learn(claim)
        except (Stopped, KeyboardInterrupt):
            self.event("stopped", f"increment with {', '.join(claim.names)} interrupted; it is redone on the "
                                  "next start (not counted as a failed try)", state="stopped")
            raise
        except Exception as e:   # noqa: BLE001 - classified below; the daemon carries on
            if is_environment(e) or claim.phase == "cleanup":
                raise                                  # run(): error event, back-off, no try counted
            self._failed_try(claim, e)
            return False

    def _failed_try(self, claim: Claim, e: Exception) -> None:
        """A failure of the increment itself (its data): count it against the claim; a claim
        of several classes is narrowed to its first class (the others stay in the inbox and are
        claimed after it), so a class is set aside only for failing on its own."""
        self.failed = True
        msg = f"{type(e).__name__}: {' '.join(str(e).split())}"
        if not isinstance(e, UserError):
            traceback.print_exception(e, file=sys.stderr)   # a bug, not bad input: keep the evidence
        self.status["last_error"] = msg
        if len(claim.files) > 1:
            first = claim.names[0]
            self.event("error", f"increment with {', '.join(claim.names)} failed: {msg}; trying {first} on its own "
                                "first, the others after it (not counted against any class)", state="error",
                       error=msg)
            claim.files = {first: claim.files[first]}
            claim.skipped = {k: v for k, v in claim.skipped.items() if k == first}
            claim.failures = 0
            write_journal(self.state_dir, claim)
            return
        claim.failures += 1
        self.event("error", f"increment with {claim.names[0]} failed (try {claim.failures} of {MAX_ATTEMPTS}): {msg}",
                   state="error", error=msg)
        if claim.failures >= MAX_ATTEMPTS:
            self._reject_all(claim, f"{MAX_ATTEMPTS} tries failed; last: {msg}")
        else:
            write_journal(self.state_dir, claim)

    def _trouble(self, e: BaseException) -> None:
        """An error that is not the data's: one `error` event per distinct message, status `error`."""
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {' '.join(str(e).split())}"
        if isinstance(e, FileNotFoundError) and not self.inbox.is_dir():
            msg = f"INBOX {self.inbox}: gone (deleted or unmounted?); waiting for it to come back"
        if msg != self._error:
            self._error = msg
            self.event("error", f"{msg} (not counted as a failed try; retrying)", state="error", error=msg)

    def run(self, once: bool = False, poll: float = 2.0) -> int:
        """The loop: exit 0 when stopped (SIGTERM), 1 with --once after a failure. Errors that
        are not the data's fault are retried with a back-off; the daemon does not exit on them."""
        self.check_writable()
        self.lock()
        failed, backoff = False, poll
        try:
            self.event("started", f"watching {self.inbox} for class folders (ready on {DONE}"
                                  + (f" or {self.quiet_seconds:g} s quiet" if self.quiet_seconds > 0 else "")
                                  + f", settled {self.settle_seconds:g} s, at least {MIN_IMAGES} images); "
                                    f"state {self.state_dir}", state="idle")
            self.check_journal()
            while True:
                try:
                    published = self.step()
                except (Stopped, KeyboardInterrupt):
                    raise
                except Exception as e:   # noqa: BLE001 - the daemon carries on; see _trouble
                    self._trouble(e)
                    if once:
                        return 1
                    time.sleep(backoff)
                    backoff = min(MAX_BACKOFF, backoff * 2)
                    continue
                if self._error is not None:
                    self._error = None
                    self.event("resumed", "the error is gone", state="idle", error=None)
                backoff = poll
                failed = failed or self.failed
                if once:
                    return 1 if failed else 0
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
        finally:
            if self.status.get("state") != "stopped":
                self.event("stopped", "exiting" + (f" after an error: {self._error}" if self._error else ""),
                           state="stopped")
            self.unlock()

    # ------------------------------------------------------------------ parts of a step

    def _claim(self) -> Claim | None:
        from fieldlearn.device.names import check_new_class_names  # noqa: PLC0415
        from fieldlearn.store.versions import read_meta  # noqa: PLC0415

        ready = scan_inbox(self.inbox, self.quiet_seconds, self.settle_seconds).ready
        if not ready:
            return None
        current = current_version_name(self.state_dir)
        known = list(read_meta(version_dir(self.state_dir, current)).get("classes", []))
        files: dict[str, list[str]] = {}
        for name in ready:
            try:
                check_new_class_names([name], known, self.inbox)
            except UserError as e:
                self._reject(name, str(e))
                continue
            names = image_files(self.inbox / name)
            if count_images(self.inbox / name, names) < MIN_IMAGES:   # changed since the scan
                continue
            files[name] = names
        if not files:
            return None
        claim = Claim(inbox=str(self.inbox), files=files, base_version=current)
        write_journal(self.state_dir, claim)
        n = sum(map(len, files.values()))
        self.event("claimed", f"{', '.join(files)} ({n} files) on top of version {current}",
                   state="learning", claimed=list(files))
        return claim

    def _read(self, claim: Claim, size: int):
        """The claimed images in memory (ImageSet, labels 0..n-1) and the paths of some read
        ones (for the export check). What cannot be read is recorded in claim.skipped and
        reported in one line; a class left with fewer than MIN_IMAGES readable images is set
        aside on its own (its folder to .rejected/), the others go on."""
        import numpy as np  # noqa: PLC0415
        import torch  # noqa: PLC0415

        from fieldlearn.device.data import ImageSet, try_read  # noqa: PLC0415

        images, labels, names, good = [], [], [], []
        skips = Skips(self.inbox)
        claim.skipped = {}
        for name in list(claim.files):
            got, first = [], None
            for f in claim.files[name]:
                a = try_read(self.inbox / name / f, size)
                if isinstance(a, tuple):
                    claim.skipped.setdefault(name, {})[f] = a[0] + (f" ({a[1]})" if a[1] else "")
                    skips.add(a[0], self.inbox / name / f, a[1])
                else:
                    got.append(a)
                    first = first or str(self.inbox / name / f)
            if len(got) < MIN_IMAGES:
                bad = claim.skipped.get(name, {})
                self._reject(name, f"{self.inbox / name}: {len(got)} readable image{'s' if len(got) != 1 else ''} of "
                                   f"{len(claim.files[name])} files; a new class needs at least {MIN_IMAGES}"
                                   + (f" (not read: {_shorten([f'{k}: {v}' for k, v in bad.items()])})" if bad else ""))
                del claim.files[name]
                claim.skipped.pop(name, None)
                continue
            names.append(name)
            if len(good) < EXPORT_CHECK_IMAGES:
                good.append(first)      # one image read here per class: the export's parity check uses real data
            images.extend(got)
            labels.extend([len(names) - 1] * len(got))
        if claim.skipped:
            total = sum(len(claim.files[n]) for n in claim.skipped)
            self.event("skipped", skips.line(total) + "; they are moved to "
                       f"{self.inbox / REJECTED}/<class>/ after the increment")
        if not names:
            clear_journal(self.state_dir)
            return None, []
        write_journal(self.state_dir, claim)
        return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), names), good

    def _learn(self, claim: Claim) -> bool:
        from fieldlearn.field import increment  # noqa: PLC0415 - torch: only once something is learned

        t0 = time.perf_counter()
        try:
            state, cfg = increment.open_increment(self.state_dir, self.overrides)   # as fieldlearn learn does
        except UserError as e:                       # a broken state is not the new classes' fault
            raise NotTheData(str(e)) from None
        if self.overrides is None or "train.progress" not in self.overrides:
            cfg.train.progress = False               # no progress bars in a daemon's log
        data, check = self._read(claim, cfg.model.input_size)
        if data is None:
            return False
        self.event("learning", f"{len(data.class_names)} classes, {len(data)} images, {cfg.method}",
                   state="learning", claimed=claim.names)
        inc = increment.learn_new_classes(self.state_dir, state, data, cfg, val_fraction=self.val_fraction,
                                          eval_data=self.eval_data, where=self.inbox, export=True,
                                          export_images=check, extra_entry={"source": "watch"})
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
        """Delete the learned images (or move them to KEEP/<version>/<class>/), move the files
        that could not be read to .rejected/<class>/ with a .reason; idempotent."""
        for name, names in claim.files.items():
            src = self.inbox / name
            bad = claim.skipped.get(name, {})
            for f in names:
                p = src / f
                if not os.path.lexists(p):
                    continue
                if f in bad:
                    move_file(p, self._rejected_dir(name, claim.version) / f)
                elif self.keep is not None:
                    move_file(p, self.keep / str(claim.version) / name / f)
                else:
                    p.unlink()
            if bad:
                dest = self._rejected_dir(name, claim.version)
                write_text(dest / REASON, f"not learned into version {claim.version} (the other images of {name} "
                                          "were):\n" + "".join(f"{k}: {v}\n" for k, v in bad.items()))
            (src / DONE).unlink(missing_ok=True)
            try:
                src.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left = sorted(os.listdir(src))
                self.event("left", f"{src}: {len(left)} file(s) that were not part of the increment stay "
                                   f"({_shorten(left)})")

    def _rejected_dir(self, name: str, version: str | None) -> Path:
        return self.inbox / REJECTED / f"{name}.unread-{version}"

    def _disposed_text(self, claim: Claim) -> str:
        n = sum(len(fs) - len(claim.skipped.get(k, {})) for k, fs in claim.files.items())
        where = f"moved to {self.keep / str(claim.version)}" if self.keep is not None else "deleted"
        unread = sum(map(len, claim.skipped.values()))
        return (f"{n} learned images of {', '.join(claim.names)} {where}"
                + (f"; {unread} unread file(s) moved to {self.inbox / REJECTED}" if unread else ""))

    def _reject(self, name: str, reason: str) -> None:
        src = self.inbox / name
        dest = self.inbox / REJECTED / name
        i = 1
        while os.path.lexists(dest):
            i += 1
            dest = self.inbox / REJECTED / f"{name}.{i}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            return
        write_text(dest / REASON, reason + "\n")
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
