"""Kill `fieldlearn learn` / `export` / `prune` / `rollback` at every file-system event, not a sample.

Used by tests/store/test_crash.py (every event of each command) and benchmarks/crash.py
(`--every-event`: the same, plus a real SIGKILLed child per event as a cross-check).

How one child gives every kill. A SIGKILL at event K leaves on disk exactly what the run had
written when it reached event K (the calls before K done, K and later not; data a Python
buffer held back is lost in both cases, since the copy reads what the kernel has). So the
child runs the ordinary CLI once, with crash_harness.FsEvents' hooks, and at every event,
before the call runs, copies the state dir: copy K is the disk of a kill at event K. Copies
the disk already had at an earlier event are not made twice (same bytes, same checks). The
child then exits, so the lock in every copy names a process that is gone, as after a kill.

Torn writes. A kill (or power cut) in the middle of a write leaves part of a file. For every
file the run opened for writing in the state (temp files, the version's files, the lock, and
`current` itself should a bug ever write it in place), the first copy in which it holds data
is also made torn: that file cut to half its length.

What each copy must show (`check_copy`):
  - a reader that takes no lock (classify, history) sees a state that loads, whose `current`
    names a complete version with consistent classes (ONNX metadata and labels.txt too), and
    whose listed versions are complete;
  - after the next start (the state lock taken and released, as every writing command does)
    the whole tree (names, bytes, permissions) is exactly the one before the run ("old") or
    the one the uninterrupted run left ("new"); prune may stop between two versions ("between":
    each version there or gone, whole), export between two files ("between": a subset of its
    new files, each whole, model.onnx, which marks a version exported, always last).
Across the sweep: both "old" and "new" occur, and at least one torn write is recovered.
A re-run of the command succeeds on one copy of each outcome other than "old" (every copy of
an outcome is the same tree, so one stands for all; an "old" copy is, byte for byte, the tree
the uninterrupted run started from and succeeded on; a learn that published has nothing to redo).

The child also records the order of fsync / rename / replace (fsync by the path its fd is
open on): a SIGKILL keeps the page cache, so no kill can show a missing fsync; `order_problems`
checks it instead. Every rename or replace must be followed by an fsync of the directory it
moved into (before a later move into another directory: `current` only once the version is
durable), and a move that publishes (into a name that is not a temp name) must come after an
fsync of every file and directory it moves, each since it was opened for writing.
"""

from __future__ import annotations

import atexit
import builtins
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.store.crash_harness import ROOT, FsEvents

SWEPT = ("learn", "export", "prune", "rollback")
TEMP_MARKS = (".tmp-", ".export-")


def is_temp(path: str) -> bool:
    """A name a reader never takes for a published file: versions/.tmp-*, .export-*, .NAME.*.tmp."""
    return any(part.startswith(TEMP_MARKS) or (part.startswith(".") and part.endswith(".tmp"))
               for part in Path(path).parts)


# ---------------------------------------------------------------------------- child side

class EventCopies(FsEvents):
    """FsEvents that never kills: at every event it copies the state dir to OUT/NNN (and OUT/NNNt
    torn), and records the detail of fsync / rename / replace / writes for the order check."""

    def __init__(self, state: Path, out: Path):
        super().__init__(state)
        self.out = Path(out)
        self.busy = False
        self.detail: tuple | None = None       # set by the outer wrappers, taken by the next event
        self.log: list[dict] = []              # one record per event
        self.copies: dict[str, str] = {}       # copy name -> the copy it equals ("" where made)
        self.last_files: dict[str, tuple] = {}
        self._same = ""
        self.written: list[str] = []           # files opened for writing, oldest first
        self.writes: list[dict] = []           # {n, path, ino} of each open for writing
        self.torn_done: set[str] = set()
        self.copy_seconds = 0.0

    def event(self, path=None, what: str = "") -> None:
        if self.busy:
            return
        n = self.n
        super().event(path, what)
        detail, self.detail = self.detail, None
        if self.n == n:
            return
        self.busy = True
        try:
            rec = {"n": self.n, "what": self.trace[-1]}
            if detail:
                rec["op"] = list(detail)
            self.log.append(rec)
            self._copy(f"{self.n:03d}")
        finally:
            self.busy = False

    def _files(self) -> dict[str, tuple]:
        """relative path -> (mode, inode, size, mtime_ns) of everything in the state: what tells
        two disks apart (a write changes size or mtime, a replace the inode; no content is read)."""
        out = {}
        for p in sorted(Path(self.state).rglob("*")):
            st = p.lstat()
            out[str(p.relative_to(self.state))] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    def _copy(self, name: str) -> None:
        t0 = time.perf_counter()
        try:
            self._copy_now(name)
        finally:
            self.copy_seconds += time.perf_counter() - t0

    def _copy_now(self, name: str) -> None:
        files = self._files()
        if files == self.last_files:
            self.copies[name] = self._same
        else:
            self._copy_tree(self.out / name, files)
            self.copies[name], self.last_files, self._same = "", files, name
        for f in self.written:              # torn: the first copy in which a written file holds data
            if f in self.torn_done or not os.path.isfile(f) or os.path.getsize(f) < 2:
                continue
            self.torn_done.add(f)
            torn = self.out / f"{name}t"
            self._copy_tree(torn, files, fresh=os.path.relpath(f, self.state))
            with open(torn / os.path.relpath(f, self.state), "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            self.copies[f"{name}t"] = ""
            self.log.append({"n": self.n, "what": f"torn {os.path.relpath(f, self.state)}", "torn": f"{name}t"})

    def _copy_tree(self, dest: Path, files: dict[str, tuple], fresh: str = "") -> None:
        """The state as it is now, at dest. A file unchanged since the last copy is a hard link to
        it (copies are only ever cleaned up, renamed or replaced, never written in place),
        except `fresh`, which is copied (it is about to be torn)."""
        dest.mkdir(parents=True)
        dirs = []
        for rel, (mode, *_rest) in files.items():
            src, dst = Path(self.state) / rel, dest / rel
            if stat.S_ISDIR(mode):
                dst.mkdir()
                dirs.append((src, dst))
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(src), dst)
            elif self.last_files.get(rel) == files[rel] and rel != fresh:
                os.link(self.out / self._same / rel, dst)
            else:
                shutil.copy2(src, dst)
        for src, dst in reversed(dirs + [(Path(self.state), dest)]):
            shutil.copystat(src, dst)

    def _wrote(self, path, fd: int | None = None) -> None:
        """A file opened (or written by safetensors) for writing at the event just counted."""
        try:
            p = os.path.realpath(os.fspath(path))
            ino = os.fstat(fd).st_ino if fd is not None else os.stat(p).st_ino
        except (TypeError, OSError):
            return
        if p.startswith(self.state):
            self.writes.append({"n": self.n, "path": p, "ino": ino})
            if p not in self.written:
                self.written.append(p)

    def _tree_inodes(self, src) -> list[tuple[str, int]]:
        src = os.fspath(src)
        out = [(".", os.lstat(src).st_ino)]
        if os.path.isdir(src) and not os.path.islink(src):
            for d, dirs, files in os.walk(src):
                out += [(os.path.relpath(os.path.join(d, n), src), os.lstat(os.path.join(d, n)).st_ino)
                        for n in dirs + files]
        return out

    def install(self, tensors: bool = True) -> "EventCopies":
        super().install(tensors)
        real = {name: getattr(os, name) for name in ("fsync", "rename", "replace", "open")}

        def fsync(fd):
            if not self.busy:
                self.detail = ("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")), os.fstat(fd).st_ino)
            return real["fsync"](fd)

        def mover(kind):
            def move(src, dst, *a, **k):
                if not self.busy and self._inside(dst):
                    self.busy = True
                    try:
                        moved = self._tree_inodes(src)
                    finally:
                        self.busy = False
                    self.detail = (kind, os.path.realpath(src), os.path.realpath(dst), moved)
                return real[kind](src, dst, *a, **k)
            return move

        def os_open(path, flags, *a, **k):
            fd = real["open"](path, flags, *a, **k)
            if not self.busy and flags & (os.O_WRONLY | os.O_RDWR):
                self._wrote(path, fd)
            return fd

        real_open = builtins.open

        def py_open(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            if not self.busy and isinstance(file, (str, bytes, Path)) and any(c in mode for c in "wax+"):
                self._wrote(file, f.fileno())
            return f

        for owner, name, new in ((os, "fsync", fsync), (os, "rename", mover("rename")), (os, "replace", mover("replace")),
                                 (os, "open", os_open), (builtins, "open", py_open), (io, "open", py_open)):
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, new)
        st = sys.modules.get("safetensors.torch")
        for owner in [m for m in (st, sys.modules.get("fieldlearn.store.state")) if m is not None]:
            inner = owner.save_file

            def save_file(tensors, filename, *a, _inner=inner, **k):
                out = _inner(tensors, filename, *a, **k)
                self._wrote(filename)
                return out

            self._saved.append((owner, "save_file", inner))
            owner.save_file = save_file
        return self


def child_main() -> None:
    """`python -c '...child_main()' STATE OUT -- fieldlearn args`: the run, a copy at every event,
    OUT/trace.json with the events, the copies and the exit code."""
    t0 = time.perf_counter()
    state, out = Path(sys.argv[1]), Path(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    hooks = EventCopies(state, out).install(tensors=argv[0] in ("init", "learn", "export", "watch"))
    result = {"rc": None}

    def write_trace():
        hooks.busy = True
        (out / "trace.json").write_text(json.dumps({"rc": result["rc"], "events": hooks.log, "copies": hooks.copies,
                                                    "writes": hooks.writes,
                                                    "copy_seconds": hooks.copy_seconds,
                                                    "seconds": time.perf_counter() - t0}))

    atexit.register(write_trace)
    from fieldlearn.cli.main import main  # noqa: PLC0415

    result["rc"] = main(argv)
    sys.exit(result["rc"])


CHILD = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.store.crash_sweep import child_main; child_main()"


# ---------------------------------------------------------------------------- the parent's side

_SHA: dict[tuple, str] = {}   # (relative path, size, mtime_ns) -> sha256: copies keep mtimes, so each file is read once


def tree(root: Path) -> dict[str, tuple]:
    """relative path -> (permission bits, kind, sha256 or link target) of everything under root."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if stat.S_ISREG(st.st_mode):
            key = (rel, st.st_size, st.st_mtime_ns)
            if key not in _SHA:
                _SHA[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            out[rel] = (stat.S_IMODE(st.st_mode), "file", _SHA[key])
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = (stat.S_IMODE(st.st_mode), "dir", "")
        else:
            out[rel] = (stat.S_IMODE(st.st_mode), "other", os.readlink(p) if stat.S_ISLNK(st.st_mode) else "")
    return out


@dataclass
class Sweep:
    command: str
    events: int = 0                 # file-system events of the uninterrupted run
    copies: int = 0                 # distinct disks checked (torn ones included)
    torn: int = 0
    torn_recovered: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)   # per event (and torn copy)
    problems: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)          # fsync-order problems
    reruns: dict[str, int] = field(default_factory=dict)    # outcome -> exit code of the re-run
    trace: list[dict] = field(default_factory=list)
    child_seconds: tuple[float, float] = (0.0, 0.0)         # the run, of which copying

    def line(self) -> str:
        return (f"{self.command}: {self.events} events ({self.copies} distinct disks), outcomes {self.outcomes}, "
                f"{self.torn_recovered}/{self.torn} torn writes recovered, {len(self.problems)} problems, "
                f"{len(self.order)} fsync-order problems, re-runs {self.reruns}")


def add_versions(state: Path) -> Path:
    """Versions 0002 and 0003 on top of an init state, written by save_version from the loaded
    current one as an increment writes them, without an export: 0003 is current and not
    exported, so that export has something to add, rollback somewhere to go and prune
    --keep 1 two versions to remove."""
    from fieldlearn.store.state import load_state, save_version  # noqa: PLC0415

    st = load_state(state)
    for step in (1, 2):
        save_version(state, st.student, st.classes, st.config, step, st.history)
    return state


def argv_of(command: str, state: Path, new_folder: Path | None = None) -> list[str]:
    """The swept command line (LEARN_ARGS: the crash harness's tiny increment, with its export)."""
    from tests.store.crash_harness import LEARN_ARGS  # noqa: PLC0415

    head = {"learn": ["learn", str(new_folder), *LEARN_ARGS], "export": ["export", "--no-engine"],
            "prune": ["prune", "--keep", "1"], "rollback": ["rollback"]}[command]
    return [*head, "--state", str(state)]


def run_child(state: Path, out: Path, argv: list[str], env: dict[str, str]) -> dict:
    out.mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", CHILD, str(state), str(out), "--", *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    trace_file = out / "trace.json"
    if r.returncode != 0 or not trace_file.is_file():
        raise AssertionError(f"uninterrupted fieldlearn {argv[0]} exited {r.returncode}: {r.stderr[-2000:]}")
    return json.loads(trace_file.read_text())


def _reader_problems(copy: Path) -> list[str]:
    """What a reader that takes no lock (classify, history) would trip over right after the kill."""
    from fieldlearn.store.state import load_state  # noqa: PLC0415
    from fieldlearn.store.versions import version_problem  # noqa: PLC0415
    from fieldlearn.runtime.errors import UserError  # noqa: PLC0415
    from fieldlearn.runtime.layout import version_names  # noqa: PLC0415
    from fieldlearn.runtime.metadata import read_labels, read_metadata  # noqa: PLC0415

    try:
        st = load_state(copy)
    except UserError as e:
        return [f"the state does not load: {e}"]
    out = []
    if st.student.num_classes != len(st.classes):
        out.append(f"current: a head of {st.student.num_classes} for {len(st.classes)} classes")
    for name in version_names(copy, pending=False):
        problem = version_problem(copy / "versions" / name)
        if problem:
            out.append(f"listed version {name} is incomplete: {problem}")
    onnx, labels = st.version_dir / "model.onnx", st.version_dir / "labels.txt"
    try:
        if onnx.is_file() and read_metadata(onnx).get("classes") != st.classes:
            out.append("model.onnx names other classes than meta.json")
        if labels.is_file() and read_labels(labels) != st.classes:
            out.append("labels.txt names other classes than meta.json")
    except UserError as e:
        out.append(str(e))
    return out


def next_start(copy: Path) -> None:
    """What every writing command does first: take the state lock (a dead owner's lock and the
    leftovers of an interrupted run are removed), then release it."""
    from fieldlearn.store.versions import state_lock  # noqa: PLC0415

    with state_lock(copy, "crash sweep"):
        pass


def outcome_of(command: str, after: dict, old: dict, new: dict) -> str | None:
    """"old", "new", "between" (see the module docstring) or None: a tree that is none of them."""
    if after == old:
        return "old"
    if after == new:
        return "new"
    if command == "prune":   # some of the versions it removes gone, each whole; all else as before
        def version(k: str) -> str | None:
            parts = k.split("/")
            return parts[1] if len(parts) >= 2 and parts[0] == "versions" else None

        gone = {version(k) for k in set(old) - set(new)} - {None}
        if set(after) <= set(old) and all(after[k] == old[k] for k in after) \
                and all(k in after for k in old if version(k) not in gone) \
                and all(len({k in after for k in old if version(k) == g}) == 1 for g in gone):
            return "between"
    if command == "export":  # a subset of the new files, each whole; model.onnx last
        added = set(after) - set(old)
        if set(old) <= set(after) and all(after[k] == old[k] for k in old) and added < set(new) - set(old) \
                and all(after[k] == new[k] for k in added) and not any(k.endswith("/model.onnx") for k in added):
            return "between"
    return None


def _diff(after: dict, want: dict) -> str:
    extra = sorted(set(after) - set(want))
    missing = sorted(set(want) - set(after))
    changed = sorted(k for k in set(after) & set(want) if after[k] != want[k])
    return f"extra {extra[:4]}, missing {missing[:4]}, changed {changed[:4]}"


def check_copy(command: str, copy: Path, old: dict, new: dict, seen: dict | None = None) -> tuple[str | None, list[str]]:
    """(outcome, problems) of one copy. seen: reader problems by what a reader reads (every
    name but the lock and temp names), so that a disk the reader cannot tell apart loads once."""
    seen = {} if seen is None else seen
    key = frozenset((k, v) for k, v in tree(copy).items() if k != "lock" and not is_temp(k))
    if key not in seen:
        seen[key] = _reader_problems(copy)
    problems = list(seen[key])
    next_start(copy)
    after = tree(copy)
    outcome = outcome_of(command, after, old, new)
    if outcome is None:
        problems.append(f"after the next start the state is neither the old one ({_diff(after, old)}) "
                        f"nor the new one ({_diff(after, new)})")
    return outcome, problems


def order_problems(trace: dict, state: Path) -> list[str]:
    """The fsync order of one uninterrupted run (see the module docstring)."""
    state = os.path.realpath(state)
    rel = lambda p: os.path.normpath(os.path.join("STATE", os.path.relpath(p, state)))   # noqa: E731
    ops = [(e["n"], e["op"]) for e in trace["events"] if "op" in e]
    fsyncs = [(n, op[1], op[2]) for n, op in ops if op[0] == "fsync"]
    moves = [(n, op) for n, op in ops if op[0] in ("rename", "replace")]
    end = max([e["n"] for e in trace["events"]], default=0) + 1
    out = []
    for m, (n, (kind, src, dst, moved)) in enumerate(moves):
        what = f"{kind} {rel(src)} -> {rel(dst)}"
        parent = os.path.dirname(dst)
        limit = next((k for k, op in moves[m + 1:] if os.path.dirname(op[2]) != parent), end)
        if not any(n < j < limit and p == parent for j, p, _ in fsyncs):
            out.append(f"{what}: {rel(parent)} not fsynced after it" +
                       (" (before the next move into another directory)" if limit < end else ""))
        if is_temp(rel(dst)):
            continue                  # a move out of the namespace (prune) or inside a temp dir
        for name, ino in moved:
            since = max([w["n"] for w in trace["writes"] if w["ino"] == ino and w["n"] < n], default=0)
            if not any(since < j < n and i == ino for j, _, i in fsyncs):
                out.append(f"{what}: {rel(os.path.join(src, name))} (moved) not fsynced before it"
                           + (" (since it was written)" if since else ""))
    return out


def sweep(command: str, state: Path, argv: list[str], work: Path, env: dict[str, str], rerun: bool = True) -> Sweep:
    """Every event of `fieldlearn ARGV` on `state` (left as it was): the uninterrupted run in a
    child that copies the disk at each event, then the checks on every copy."""
    from fieldlearn.cli.main import main  # noqa: PLC0415

    res = Sweep(command)
    old = tree(state)
    run_state = work / "run" / "state"
    shutil.copytree(state, run_state, symlinks=True)
    argv = [str(run_state) if a == str(state) else a for a in argv]
    copies = work / "copies"
    trace = run_child(run_state, copies, argv, env)
    new = tree(run_state)
    res.child_seconds = (trace["seconds"], trace["copy_seconds"])
    res.events, res.trace = sum(1 for e in trace["events"] if "torn" not in e), trace["events"]
    res.order = order_problems(trace, run_state)
    torn = {e["torn"] for e in trace["events"] if "torn" in e}
    outcome_of_copy: dict[str, str | None] = {}
    seen: dict = {}
    example: dict[str, Path] = {}
    for name, same in trace["copies"].items():
        if same:
            outcome_of_copy[name] = outcome_of_copy[same]
        else:
            res.copies += 1
            outcome, problems = check_copy(command, copies / name, old, new, seen)
            outcome_of_copy[name] = outcome
            res.problems += [f"kill at event {name}: {p}" for p in problems]
            if outcome is not None:
                example.setdefault(outcome, copies / name)
            if name in torn:
                res.torn += 1
                res.torn_recovered += outcome is not None and not problems
        key = outcome_of_copy[name] or "neither"
        res.outcomes[key] = res.outcomes.get(key, 0) + 1
    if rerun:
        for outcome, copy in sorted(example.items()):
            if outcome == "old" or (command == "learn" and outcome == "new"):
                continue              # old: the very tree the uninterrupted run started from; learned: nothing to redo
            res.reruns[outcome] = main([str(copy) if a == str(run_state) else a for a in argv])
    return res


def real_kills(command: str, state: Path, argv: list[str], work: Path, env: dict[str, str], events: int,
               log=print) -> Sweep:
    """The cross-check of the copies: for K = 1..events, a fresh child on a fresh copy of `state`
    SIGKILLs itself at event K (crash_harness.FsEvents), and the disk it leaves gets the same
    checks. A learn's new version differs from the sweep's in its timings, so a learn that
    published is checked by crash_harness.check_state instead (current is a complete version
    with the run's classes and step, every earlier version byte for byte) and by the next start
    leaving nothing behind."""
    import signal  # noqa: PLC0415

    from tests.store.crash_harness import CHILD as KILLED_CHILD  # noqa: PLC0415
    from tests.store.crash_harness import Before, check_state, leftovers  # noqa: PLC0415

    res = Sweep(command, events=events)
    old = tree(state)
    before = Before.of(state)
    run_state = work / "run" / "state"
    shutil.copytree(state, run_state, symlinks=True)
    mapped = [str(run_state) if a == str(state) else a for a in argv]
    subprocess.run([sys.executable, "-c", KILLED_CHILD, str(run_state), "0", "0", "--", *mapped], cwd=ROOT, env=env,
                   capture_output=True, timeout=600, check=True)
    new = tree(run_state)
    new_classes = list(load_meta_classes(run_state))[len(before.classes):] if command == "learn" else []
    seen: dict = {}
    for k in range(1, events + 1):
        copy = work / f"{k:03d}" / "state"
        shutil.copytree(state, copy, symlinks=True)
        mapped = [str(copy) if a == str(state) else a for a in argv]
        r = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(copy), str(k), "0", "--", *mapped], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != -signal.SIGKILL:
            res.problems.append(f"real kill at event {k}: the child exited {r.returncode}, not killed: {r.stderr[-300:]}")
        outcome, problems = check_copy(command, copy, old, new, seen)
        if outcome is None and command == "learn":
            corrupt, lost, cur = check_state(copy, before, new_classes)
            if cur == "new" and not corrupt and not lost and not leftovers(copy):
                outcome, problems = "new", [p for p in problems if not p.startswith("after the next start")]
        res.copies += 1
        res.outcomes[outcome or "neither"] = res.outcomes.get(outcome or "neither", 0) + 1
        res.problems += [f"real kill at event {k}: {p}" for p in problems]
        log(f"  {command} real kill at event {k}/{events}: {outcome or 'neither'}" + (f"; PROBLEMS {problems}" if problems else ""))
        shutil.rmtree(work / f"{k:03d}", ignore_errors=True)
    return res


def load_meta_classes(state: Path) -> list[str]:
    from fieldlearn.store.versions import read_meta  # noqa: PLC0415
    from fieldlearn.runtime.layout import current_version_dir  # noqa: PLC0415

    return read_meta(current_version_dir(state))["classes"]
