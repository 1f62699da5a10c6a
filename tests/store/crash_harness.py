"""Kill `fieldlearn learn` / `export` / `watch --once` with SIGKILL at random points, check the state.

Used by tests/store/test_crash.py (6 kills) and benchmarks/crash.py (50 kills).

Three kinds of kill point, all a real SIGKILL of a real child process:
  - "event": the child runs the ordinary CLI with file-system hooks installed (os.open,
    open, rename, replace, fsync, unlink, mkdir, rmdir, safetensors' save_file); once the
    command touches the state dir, every such call on it is an event, and the child SIGKILLs
    itself at event K (K drawn from 1..N, N counted on an uninterrupted run). This lands
    kills inside the few milliseconds in which files are written and renamed. Some learn
    kills ("torn") land half-way through writing the weights: the file is truncated to half
    its length before the kill, as a kill in the middle of that write would leave it.
  - "switch": an event between the new version's rename into versions/ and the replace of
    `current` (inclusive): the version is complete but never made current. None of the 32
    kills of the first field trial landed there; this kind always does.
  - "timed": the parent SIGKILLs the child after a random delay in (0, duration of the last
    complete run): anywhere, import and training included.

The daemon (`fieldlearn watch INBOX --once`) runs under the same kills. After each, the next
start (a complete `watch --once`) must finish the increment: the class learned exactly once
(no second history entry), its images gone from the inbox, nothing set aside as rejected
(an interruption is never a failed try), no journal left.

After each kill (checks in `check_state`): the state loads; `current` names a complete
version (weights and meta readable, classes consistent) that is either the one current
before the run or the one the run was making; every version that existed before is still
there, byte for byte; an exported model in the current version names the same classes. Then
the next start (taking the state lock, as every writing command does) must remove the dead
run's stale lock and leftovers, and a re-run of the command must succeed.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import random
import shutil  # noqa: F401 - before the hooks: shutil picks its rmtree at import (os.open in
#                 os.supports_dir_fd), and a hooked os.open would give the child another rmtree
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDER_CLASSES_PER_STEP = 1
IMAGES_PER_CLASS = 10
# A net whose outputs depend on its input (export's parity check refuses a constant one):
# nothing frozen, BatchNorm statistics warmed by a few epochs.
INIT_ARGS = ["--width", "0.35", "--variant", "cifar", "--input-size", "32", "--no-pretrained",
             "--freeze-blocks", "0", "--base-epochs", "6", "--epochs", "1", "--batch-size", "8",
             "--no-progress", "--num-threads", "1"]
LEARN_ARGS = ["--no-progress", "--num-threads", "1", "--batch-size", "8"]   # method none: no --epochs to give
EXPORT_ARGS = ["--no-engine"]
WATCH_ARGS = ["--once", "--settle-seconds", "0", *LEARN_ARGS]
COMMANDS = ("learn", "export", "watch")


# ---------------------------------------------------------------------------- child side

class FsEvents:
    """Counts file-system calls on `state` once the command has touched it; SIGKILLs at event `kill_at`."""

    def __init__(self, state: Path, kill_at: int = 0, tear: bool = False):
        self.state = os.path.realpath(state)
        self.kill_at, self.tear = kill_at, tear
        self.armed, self.n = False, 0
        self.trace: list[str] = []   # what each event was (for reports)
        self._saved: list[tuple[object, str, object]] = []

    def _inside(self, path) -> bool:
        try:
            p = os.fspath(path)
        except TypeError:
            return False
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        return os.path.realpath(p).startswith(self.state)

    def event(self, path=None, what: str = "") -> None:
        """Counts calls on the state: paths inside it, fd-only calls (fsync) and names relative
        to a dir fd (rmtree); library reads elsewhere (entry points, caches) are not events."""
        inside = path is not None and self._inside(path)
        if not self.armed and inside:
            self.armed = True
        elsewhere = isinstance(path, (str, bytes, Path)) and os.path.isabs(path) and not inside
        if self.armed and not elsewhere:
            self.n += 1
            self.trace.append(f"{what} {os.path.basename(os.fspath(path)) if isinstance(path, (str, Path)) else ''}")
            if self.n == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def _wrap(self, owner, name: str, path_arg: bool = True) -> None:
        orig = getattr(owner, name)

        def wrapper(*a, **k):
            self.event(a[0] if path_arg and a else None, name)
            return orig(*a, **k)

        self._saved.append((owner, name, orig))
        setattr(owner, name, wrapper)

    def install(self, tensors: bool = True) -> "FsEvents":
        """tensors=False: no hook on safetensors' save_file, so that a command which writes no
        weights (prune, rollback) runs without importing torch."""
        for name in ("open", "rename", "replace", "unlink", "mkdir", "rmdir"):
            self._wrap(os, name)
        self._wrap(os, "fsync", path_arg=False)
        self._wrap(builtins, "open")
        self._wrap(io, "open")
        if not tensors:
            return self
        import safetensors.torch as st  # noqa: PLC0415

        orig_save = st.save_file

        def save_file(tensors, filename, *a, **k):
            self.event(filename, "save_file")
            out = orig_save(tensors, filename, *a, **k)
            if self.tear and self.n + 1 == self.kill_at:   # a kill in the middle of this write
                with open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)
            self.event(filename, "save_file done")
            return out

        for owner in [st] + [m for m in (sys.modules.get("fieldlearn.store.state"),) if m is not None]:
            self._saved.append((owner, "save_file", getattr(owner, "save_file")))
            owner.save_file = save_file
        return self

    def uninstall(self) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()


def child_main() -> None:
    """Entry of the killed child: `python -c '...child_main()' STATE KILL_AT TEAR -- fieldlearn args`."""
    state, kill_at, tear = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    argv = sys.argv[sys.argv.index("--") + 1:]
    hooks = FsEvents(Path(state), kill_at, tear).install(tensors=argv[0] in ("init", "learn", "export", "watch"))
    if os.environ.get("FL_CRASH_TRACE"):   # kill_at 0: write what the events were, for reports
        import atexit  # noqa: PLC0415

        atexit.register(lambda: Path(os.environ["FL_CRASH_TRACE"]).write_text("\n".join(hooks.trace)))
    from fieldlearn.cli.main import main  # noqa: PLC0415

    sys.exit(main(argv))


CHILD = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.store.crash_harness import child_main; child_main()"


# ---------------------------------------------------------------------------- checks

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot_versions(state: Path) -> dict[str, dict[str, str]]:
    """version -> {file: sha256} of every complete published version."""
    from fieldlearn.store.versions import version_problem  # noqa: PLC0415
    from fieldlearn.runtime.layout import version_names  # noqa: PLC0415

    out = {}
    for name in version_names(state):
        vdir = state / "versions" / name
        if version_problem(vdir) is None:
            out[name] = {p.name: _sha(p) for p in sorted(vdir.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return out


def leftovers(state: Path) -> list[str]:
    found = [p for p in (state / "versions").iterdir() if p.name.startswith(".")]
    found += [q for p in (state / "versions").iterdir() if p.is_dir() and not p.name.startswith(".")
              for q in p.iterdir() if q.name.startswith(".")]
    found += list(state.glob(".current.*"))
    return sorted(str(p.relative_to(state)) for p in found)


@dataclass
class Before:
    current: str
    classes: list[str]
    step: int
    versions: dict[str, dict[str, str]]

    @classmethod
    def of(cls, state: Path) -> "Before":
        from fieldlearn.store.versions import read_meta  # noqa: PLC0415
        from fieldlearn.runtime.layout import current_version_name  # noqa: PLC0415

        cur = current_version_name(state)
        meta = read_meta(state / "versions" / cur)
        return cls(cur, list(meta["classes"]), int(meta["step"]), snapshot_versions(state))


def check_state(state: Path, before: Before, new_classes: list[str]) -> tuple[list[str], list[str], str]:
    """(corrupt, lost, outcome) after a run that started from `before` and would add
    `new_classes` (none for export). outcome: "old" or "new" (which version is current)."""
    from fieldlearn.store.state import load_state  # noqa: PLC0415
    from fieldlearn.store.versions import version_problem  # noqa: PLC0415
    from fieldlearn.runtime.errors import UserError  # noqa: PLC0415
    from fieldlearn.runtime.metadata import read_labels, read_metadata  # noqa: PLC0415

    corrupt, lost = [], []
    try:
        st = load_state(state)
    except UserError as e:
        return [f"state does not load: {e}"], lost, "?"
    cur = st.version_dir.name
    problem = version_problem(st.version_dir)
    if problem:
        corrupt.append(f"current {cur} incomplete: {problem}")
    if st.student.num_classes != len(st.classes):
        corrupt.append(f"current {cur}: head of {st.student.num_classes} for {len(st.classes)} classes")
    if cur == before.current:
        outcome = "old"
        if st.classes != before.classes:
            corrupt.append(f"current {cur} changed its classes")
    else:
        outcome = "new"
        if cur in before.versions:
            lost.append(f"current moved to {cur}, an older version, not the run's new one")
        elif not new_classes:
            corrupt.append(f"export published a new version {cur}")
        elif st.classes != before.classes + new_classes or st.step != before.step + 1:
            corrupt.append(f"new current {cur}: classes/step {st.classes[-3:]}/{st.step} are not the run's")
    onnx = st.version_dir / "model.onnx"
    if onnx.is_file():
        try:
            if read_metadata(onnx).get("classes") != st.classes:
                corrupt.append(f"{onnx}: classes differ from meta.json")
        except UserError as e:
            corrupt.append(str(e))
    labels = st.version_dir / "labels.txt"
    if labels.is_file() and read_labels(labels) != st.classes:
        corrupt.append(f"{labels}: classes differ from meta.json")
    for name, files in before.versions.items():
        vdir = state / "versions" / name
        if not vdir.is_dir():
            lost.append(f"version {name} disappeared")
            continue
        for f in ("model.safetensors", "meta.json"):   # exports may be rewritten (same model, new file)
            if not (vdir / f).is_file() or _sha(vdir / f) != files.get(f):
                lost.append(f"version {name}: {f} changed")
    return corrupt, lost, outcome


# ---------------------------------------------------------------------------- the run

@dataclass
class Tally:
    kills: int = 0
    completed: int = 0
    corrupt: int = 0
    lost: int = 0
    leftovers_seen: int = 0      # kills after which a leftover was there to clean
    leftovers_kept: int = 0
    reruns_failed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.kills} kills, {self.corrupt} corrupt, {self.lost} lost"


class Harness:
    """One state dir under `work`, new class folders from CIFAR-100 `test` images."""

    def __init__(self, work: Path, cifar_test, seed: int = 0, log=print):
        from tests.conftest import write_image_folder  # noqa: PLC0415

        self.work, self.data, self.rng, self.log = Path(work), cifar_test, random.Random(seed), log
        self.write_image_folder = write_image_folder
        # Children get their own TMPDIR: a killed learn leaves its teacher temp dir there, not in /tmp.
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TMPDIR": str(self.work / "tmp")}
        self.state = self.work / "state"
        self.next_class = 0
        self.n_events = {c: 0 for c in COMMANDS}
        self.torn_at: dict[str, int] = {}          # event right after the weights are written
        self.switch_window: dict[str, tuple[int, int]] = {}   # events from the version's rename to current's replace
        self.seconds = {c: 6.0 for c in COMMANDS}
        self.inbox = self.work / "inbox"
        self.folder_i = 0

    def _classes(self, n: int) -> list[int]:
        out = list(range(self.next_class, self.next_class + n))
        self.next_class += n
        if self.next_class > len(self.data.class_names):
            raise RuntimeError("ran out of CIFAR-100 classes; re-init the state")
        return out

    def new_folder(self, command: str = "learn") -> tuple[Path | None, list[str]]:
        """The images of the next class(es): an ImageFolder for learn, a `.done` folder in the inbox for watch."""
        if command == "export":
            return None, []
        self.folder_i += 1
        ids = self._classes(FOLDER_CLASSES_PER_STEP)
        names = [self.data.class_names[c] for c in ids]
        if command == "watch":
            self.write_image_folder(self.inbox, self.data, ids, IMAGES_PER_CLASS)
            for n in names:
                (self.inbox / n / ".done").touch()
            return self.inbox, names
        root = self.write_image_folder(self.work / f"new{self.folder_i:03d}", self.data, ids, IMAGES_PER_CLASS)
        return root, names

    def init(self, n_base: int = 3) -> None:
        """`fieldlearn init --data <ImageFolder>` (in this process: the state is not what is tested)."""
        from fieldlearn.cli.main import main  # noqa: PLC0415

        ids = self._classes(n_base)
        base = self.write_image_folder(self.work / "base" / "train", self.data, ids, IMAGES_PER_CLASS)
        self.write_image_folder(self.work / "base" / "test", self.data, ids, 5)
        rc = main(["init", "--data", str(base.parent), "--state", str(self.state), *INIT_ARGS])
        assert rc == 0, f"fieldlearn init failed ({rc})"

    def argv(self, command: str, folder: Path | None) -> list[str]:
        if command == "learn":
            return ["learn", str(folder), "--state", str(self.state), *LEARN_ARGS]
        if command == "watch":
            return ["watch", str(self.inbox), "--state", str(self.state), *WATCH_ARGS]
        return ["export", "--state", str(self.state), *EXPORT_ARGS]

    def count_events(self, command: str) -> int:
        """Run the command to completion in this process with the hooks counting: N events.
        (Completed runs are increments like any other.)"""
        from fieldlearn.cli.main import main  # noqa: PLC0415

        folder, new = self.new_folder(command)
        hooks = FsEvents(self.state).install()
        t0 = time.perf_counter()
        try:
            rc = main(self.argv(command, folder))
        finally:
            hooks.uninstall()
        assert rc == 0, f"uninterrupted fieldlearn {command} failed ({rc})"
        self.n_events[command] = hooks.n
        done = [i + 1 for i, t in enumerate(hooks.trace) if t.startswith("save_file done")]
        if done:
            self.torn_at[command] = done[0]
        renamed = [i + 1 for i, t in enumerate(hooks.trace) if t.startswith("rename .tmp-")]
        if renamed:
            switched = [i + 1 for i, t in enumerate(hooks.trace) if i + 1 > renamed[0] and t.startswith("replace .current")]
            self.switch_window[command] = (renamed[0] + 1, switched[0])
        self.log(f"  {command}: {hooks.n} file-system events in an uninterrupted run ({time.perf_counter() - t0:.1f} s)")
        return hooks.n

    def kill_once(self, command: str, kind: str, tally: Tally) -> None:
        """One child run of `command`, killed by `kind` ("event" or "timed"), then the checks,
        the next start and a re-run."""
        folder, new = self.new_folder(command)
        before = Before.of(self.state)
        k, tear, delay = 0, False, None
        if kind == "switch":
            k = self.rng.randint(*self.switch_window[command])
        elif kind == "event":
            k = self.rng.randint(1, max(1, self.n_events[command]))
            if command in self.torn_at and self.rng.random() < 0.2:
                k, tear = self.torn_at[command], True   # killed half-way through writing the weights
        else:
            delay = self.rng.uniform(0.05, self.seconds[command])
        cmd = [sys.executable, "-c", CHILD, str(self.state), str(k), "1" if tear else "0", "--",
               *self.argv(command, folder)]
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if delay is not None:
            try:
                child.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=600)
        rc = child.returncode
        where = f"{command} {kind} " + (f"event {k}/{self.n_events[command]}{' torn' if tear else ''}" if kind != "timed"
                                        else f"at {delay:.2f} s")
        if rc == -signal.SIGKILL:
            tally.kills += 1
            tally.kinds[f"{command} {kind}"] = tally.kinds.get(f"{command} {kind}", 0) + 1
        elif rc == 0:
            tally.completed += 1
            self.seconds[command] = time.perf_counter() - t0
        else:
            tally.problems.append(f"{where}: exit {rc}: {err.decode(errors='replace').strip()[-300:]}")
            tally.reruns_failed += 1
        corrupt, lost, outcome = check_state(self.state, before, new)
        tally.outcomes[outcome] = tally.outcomes.get(outcome, 0) + 1
        tally.corrupt += bool(corrupt)
        tally.lost += bool(lost)
        tally.problems += [f"{where}: {p}" for p in corrupt + lost]
        left = leftovers(self.state)
        tally.leftovers_seen += bool(left)
        # The next start: what every writing command does first (stale lock, leftovers).
        from fieldlearn.store.versions import state_lock  # noqa: PLC0415

        with state_lock(self.state, "crash harness"):
            pass
        still = leftovers(self.state)
        if still or (self.state / "lock").exists():
            tally.leftovers_kept += 1
            tally.problems.append(f"{where}: next start left {still}")
        if kind == "switch" and rc == -signal.SIGKILL:
            from fieldlearn.runtime.layout import version_names  # noqa: PLC0415

            if outcome != "old" or version_names(self.state) != sorted(before.versions, key=int):
                tally.lost += 1
                tally.problems.append(f"{where}: after the next start current is the {outcome} version and the "
                                      f"versions are {version_names(self.state)} (expected {sorted(before.versions)})")
        self.log(f"  {where}: {'killed' if rc == -signal.SIGKILL else f'exit {rc}'}, current is the {outcome} "
                 f"version, {len(left)} leftover(s) removed" + (f"; PROBLEMS {corrupt + lost}" if corrupt or lost else ""))
        if command == "watch":
            self.rerun(command, folder, tally)   # the daemon's next start finishes (or redoes) the increment
            self.check_watch(before, new, where, tally)
        elif rc == -signal.SIGKILL and (command == "export" or outcome == "old"):
            self.rerun(command, folder, tally)   # (a learn killed after publishing has nothing to redo)

    def check_watch(self, before: "Before", new: list[str], where: str, tally: Tally) -> None:
        """After a killed `watch --once` and its next start: the class learned exactly once,
        its images gone from the inbox, nothing rejected, no journal."""
        from fieldlearn.store.versions import read_meta  # noqa: PLC0415
        from fieldlearn.runtime.layout import current_version_dir  # noqa: PLC0415

        meta = read_meta(current_version_dir(self.state))
        learned = [c for h in meta.get("history", []) for c in h.get("new_classes", [])]
        problems = []
        if meta["classes"] != before.classes + new or any(learned.count(c) != 1 for c in new):
            problems.append(f"classes {meta['classes'][-3:]}, history {learned[-3:]}: not {new} exactly once")
        left = [p.name for p in self.inbox.iterdir()] if self.inbox.is_dir() else []
        if left:
            problems.append(f"inbox still holds {left}" + (" (a class was rejected: an interruption counted as a try)"
                                                           if ".rejected" in left else ""))
        if (self.state / "watch-journal.json").exists():
            problems.append("journal left after the next start")
        if problems:
            tally.lost += 1
            tally.problems += [f"{where}: {p}" for p in problems]

    def rerun(self, command: str, folder: Path | None, tally: Tally) -> None:
        """The killed run again, in this process, to completion."""
        from fieldlearn.cli.main import main  # noqa: PLC0415

        if main(self.argv(command, folder)) != 0:
            tally.reruns_failed += 1
            tally.problems.append(f"re-run of fieldlearn {command} failed")


def run(work: Path, cifar_test, kills: int, seed: int = 0, timed_share: float = 0.3, switch_share: float = 0.2,
        log=print) -> Tally:
    """At least `kills` SIGKILLs cycling learn, export, watch; the first learn and watch kills
    land between rename and switch, later ones with probability `switch_share`. Re-inits the
    state when the CIFAR classes run out. Returns the tally."""
    rng = random.Random(seed)
    tally = Tally()
    h = None
    attempts = 0
    switched: set[str] = set()
    while tally.kills < kills and attempts < kills * 3:
        if h is None or h.next_class + FOLDER_CLASSES_PER_STEP * 4 > len(cifar_test.class_names):
            h = Harness(Path(work) / f"s{attempts:03d}", cifar_test, seed=rng.randrange(1 << 30), log=log)
            h.init()
            for command in COMMANDS:
                h.count_events(command)
        command = COMMANDS[attempts % len(COMMANDS)]
        r = rng.random()
        if command != "export" and (command not in switched or r < switch_share):
            kind = "switch"
            switched.add(command)
        else:
            kind = "timed" if r < timed_share else "event"
        h.kill_once(command, kind, tally)
        attempts += 1
    for command in ("learn", "export"):          # a final uninterrupted run of each
        folder, _ = h.new_folder(command)
        h.rerun(command, folder, tally)
    if leftovers(h.state):
        tally.leftovers_kept += 1
    return tally


def summary(t: Tally) -> str:
    return json.dumps({"kills": t.kills, "by_kind": t.kinds, "completed_runs": t.completed, "current_after_kill": t.outcomes,
                       "corrupt": t.corrupt, "lost": t.lost, "kills_leaving_leftovers": t.leftovers_seen,
                       "leftovers_kept": t.leftovers_kept,
                       "reruns_failed": t.reruns_failed})
