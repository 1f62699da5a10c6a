"""Crash safety: SIGKILL `fieldlearn learn`, `export` and the `watch` daemon at random points.

The harness (tests/device/crash_harness.py) kills real child processes, at random
file-system events of the write path and at random times; benchmarks/crash.py runs the
same with 50 kills. Disk full is provoked with RLIMIT_FSIZE (and a small tmpfs where this
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
from tests.device.crash_harness import LEARN_ARGS, ROOT, Harness, leftovers, run, summary


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_sigkill_at_random_points_never_corrupts_or_loses_the_model(tmp_path, gen_test):
    """If this fails, a power cut or OOM kill during an increment, an export or the daemon's
    increment can leave the device without a loadable model, a half-written version that later
    runs trip over, a version renamed but never switched to that shows up twice in history
    (killed between rename and switch), or a daemon that loses, duplicates or rejects a class."""
    lines = []
    t = run(tmp_path, gen_test, kills=6, seed=1, timed_share=0.2, log=lines.append)
    report = summary(t) + "\n" + "\n".join(lines) + "\n" + "\n".join(t.problems)
    assert t.kills >= 6 and t.kinds.get("learn switch") and t.kinds.get("watch switch"), report
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
    r = _cli(["learn", str(new), "--state", str(state), *LEARN_ARGS, "--teacher-backend", "torch"],
             preexec_fn=_fsize_limited(200_000))   # (torch teacher: no teacher ONNX written to TMPDIR first)
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


