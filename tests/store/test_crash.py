"""Crash safety: SIGKILL `fieldlearn learn`, `export` and the `watch` daemon at random points.

The harness (tests/store/crash_harness.py) kills real child processes, at random
file-system events of the write path and at random times; benchmarks/crash.py runs the
same with 50 kills. tests/store/crash_sweep.py kills learn, export, prune and rollback at
every file-system event (copies of the disk at each event of one run) and checks the fsync
order of what they publish. Disk full is provoked with RLIMIT_FSIZE (and a small tmpfs where this
machine lets us mount one).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_image_folder
from tests.store.crash_harness import LEARN_ARGS, ROOT, Harness, leftovers, run, summary
from tests.store.crash_sweep import SWEPT, add_versions, argv_of, sweep


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_sigkill_at_random_points_never_corrupts_or_loses_the_model(tmp_path, gen_test):
    """If this fails, a power cut or OOM kill during an increment, an export or the daemon's
    increment can leave the device without a loadable model, a half-written version that later
    runs trip over, a version renamed but never switched to that shows up twice in history
    (killed between rename and switch), or a daemon that loses, duplicates or rejects a class."""
    lines = []      # 4 kills: learn and watch between rename and switch, export and learn at random points
    t = run(tmp_path, gen_test, kills=4, seed=1, timed_share=0.2, log=lines.append)
    report = summary(t) + "\n" + "\n".join(lines) + "\n" + "\n".join(t.problems)
    assert t.kills >= 4 and t.kinds.get("learn switch") and t.kinds.get("watch switch"), report
    assert (t.corrupt, t.lost, t.leftovers_kept, t.reruns_failed) == (0, 0, 0, 0), report


def _fsize_limited(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _cli(argv, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fieldlearn.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def exportable_state(tmp_path_factory, gen_test):
    """A state from `fieldlearn init` on an ImageFolder of generated images (tests/synthetic.py)."""
    h = Harness(tmp_path_factory.mktemp("crash"), gen_test, log=lambda _: None)
    h.init()
    return h


def _copy(h: Harness, dest: Path) -> Path:
    shutil.copytree(h.state, dest, symlinks=True)
    return dest


def test_disk_full_learn_is_one_line_and_keeps_the_current_model(tmp_path, exportable_state, gen_test):
    """If this fails, a full disk (here: a 200 kB file-size limit on the `fieldlearn learn`
    process, so its 1.7 MB weights cannot be written) crashes with a traceback or damages
    the served model."""
    state = _copy(exportable_state, tmp_path / "state")
    new = write_image_folder(tmp_path / "new", gen_test, [50], 6)
    before = tree_hash(state)
    r = _cli(["learn", str(new), "--state", str(state), *LEARN_ARGS],
             preexec_fn=_fsize_limited(200_000))   # (method none: no teacher ONNX written to TMPDIR first)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err[0] == (f"fieldlearn learn: error: {state}: no new version written (File too large); "
                      "the current version is unchanged"), err
    assert tree_hash(state) == before and leftovers(state) == []


@pytest.mark.parametrize("command", ["learn", "export"])
def test_disk_full_on_a_small_tmpfs(tmp_path, exportable_state, gen_test, capsys, command):
    """If this fails, a really full file system (ENOSPC: a tmpfs with room for the state and
    600 kB more, less than a new version or ONNX) is not a clean one-line error, or the
    served model is damaged. (In this process: the limit is the mount's, not the process's.)"""
    from fieldlearn.cli.main import main

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    used = sum(p.stat().st_size for p in exportable_state.state.rglob("*") if p.is_file())
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + 600_000},mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        state = _copy(exportable_state, mnt / "state")
        new = write_image_folder(tmp_path / "new", gen_test, [51], 6)
        before = tree_hash(state)
        argv = (["learn", str(new), "--state", str(state), *LEARN_ARGS] if command == "learn"
                else ["export", "--state", str(state), "--no-engine"])
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith(f"fieldlearn {command}: error: {state}: ") and "No space left on device" in err[0], err
        assert err[0].endswith("the current version is unchanged" if command == "learn"
                               else "the current version 0001 is unchanged"), err
        assert tree_hash(state) == before and leftovers(state) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)




# ---------------------------------------------------------------- every event, not a sample

@pytest.fixture(scope="module")
def three_versions(exportable_state, tmp_path_factory):
    """The init state plus versions 0002 and 0003, 0003 current and not exported (crash_sweep.add_versions)."""
    return add_versions(_copy(exportable_state, tmp_path_factory.mktemp("sweep") / "state"))


# What shows that the run reached its publish window: the move that publishes.
PUBLISHES = {"learn": "replace .current", "export": "replace model.onnx", "prune": "rename 0002",
             "rollback": "replace .current"}


@pytest.mark.slow
@pytest.mark.parametrize("command", SWEPT)
def test_a_kill_at_every_file_system_event_leaves_the_old_or_the_new_state(tmp_path, three_versions, gen_test,
                                                                           exportable_state, command):
    """If this fails, there is a point in `fieldlearn learn`, `export`, `prune` or `rollback`
    where a kill (or a write cut half-way) leaves a state that does not load, a `current` on an
    incomplete version, a listed version that is incomplete, or, after the next start, anything
    other than the state before the run or the one the run makes: a half-written file
    published, a leftover the next start misses, an old version changed. Or a publishing
    rename, or `current`'s replace, is not preceded by an fsync of what it moves and followed
    by one of its directory (a power cut could publish what never reached the disk; no kill
    can show it). Every event is checked, not a sample (tests/store/crash_sweep.py)."""
    folder = write_image_folder(tmp_path / "new", gen_test, [60], 10) if command == "learn" else None
    res = sweep(command, three_versions, argv_of(command, three_versions, folder), tmp_path / "sweep",
                exportable_state.env)
    report = res.line() + "\n" + "\n".join(res.problems[:20] + res.order)
    assert res.problems == [] and res.order == [], report
    assert any(e["what"].startswith(PUBLISHES[command]) for e in res.trace), \
        "the run never reached its publish window:\n" + "\n".join(e["what"] for e in res.trace)
    assert res.outcomes.get("old") and res.outcomes.get("new") and not res.outcomes.get("neither"), report
    assert res.torn >= 1 and res.torn_recovered == res.torn, report
    assert all(rc == 0 for rc in res.reruns.values()), report
