"""The version store: history, rollback, prune, the state lock, permissions, leftovers."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fieldlearn.cli.main import main
from fieldlearn.device import names as naming
from fieldlearn.store import versions as store
from fieldlearn.device.model import build_student
from fieldlearn.store.state import load_state, save_version
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import version_names
from tests.conftest import ROOT, tiny_config, write_image_folder


def make_state(root: Path, versions: int = 3) -> Path:
    """`versions` versions of a tiny model: 2 classes, then one more per version."""
    cfg = tiny_config()
    torch.manual_seed(0)
    s = build_student(cfg.model, 2)
    classes = ["apple", "pear"]
    hist = [{"step": 0, "method": "base", "new_classes": classes, "test_accuracy": 0.5}]
    save_version(root, s, classes, cfg, 0, hist)
    for i in range(1, versions):
        s.widen(1)
        classes = classes + [f"c{i}"]
        hist = hist + [{"step": i, "method": "lwm", "new_classes": [f"c{i}"], "new_class_val_accuracy": 0.25 * i}]
        save_version(root, s, classes, cfg, i, hist)
    return root


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return make_state(tmp_path_factory.mktemp("store") / "state")


@pytest.fixture
def state(three, tmp_path):
    return Path(shutil.copytree(three, tmp_path / "state"))


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def current(state: Path) -> str:
    return (state / "current").read_text().strip()


# ---------------------------------------------------------------------------- history / rollback / prune

def test_history_lists_versions_with_classes_and_accuracies(state, capsys):
    """If this fails, a user cannot see which version to roll back to."""
    rc, out, _ = run(capsys, "history", "--state", state, "--json")
    rows = json.loads(out)
    assert rc == 0 and [r["version"] for r in rows] == ["0001", "0002", "0003"]
    assert [r["classes"] for r in rows] == [2, 3, 4] and [r["current"] for r in rows] == [False, False, True]
    assert rows[0]["accuracy"] == {"test_accuracy": 0.5} and rows[2]["accuracy"] == {"new_class_val_accuracy": 0.5}
    assert all(r["problem"] is None for r in rows)
    rc, out, _ = run(capsys, "history", "--state", state)
    assert rc == 0 and len(out.splitlines()) == 5 and out.splitlines()[3].startswith("*")


def test_history_marks_a_broken_version_without_failing(state, capsys):
    (state / "versions" / "0002" / "model.safetensors").write_bytes(b"\0" * 10)
    rc, out, _ = run(capsys, "history", "--state", state, "--json")
    rows = json.loads(out)
    assert rc == 0 and rows[1]["problem"] and "model.safetensors" in rows[1]["problem"]


def test_rollback_switches_current_back_and_forth(state, capsys):
    """If this fails, a bad increment cannot be undone in the field."""
    rc, out, _ = run(capsys, "rollback", "--state", state)
    assert rc == 0 and current(state) == "0002" and "0003 -> 0002" in out
    assert load_state(state).classes == ["apple", "pear", "c1"]
    assert run(capsys, "rollback", "--state", state)[0] == 0 and current(state) == "0001"
    rc, _, err = run(capsys, "rollback", "--state", state)
    assert rc == 2 and "no complete version older than the current 0001" in err
    assert run(capsys, "rollback", "--state", state, "--to", "3")[0] == 0 and current(state) == "0003"
    rc, _, err = run(capsys, "rollback", "--state", state, "--to", "9")
    assert rc == 2 and "--to 9: no such version" in err and current(state) == "0003"


def test_rollback_skips_and_refuses_incomplete_versions(state, capsys):
    """If this fails, rollback makes a damaged version current (the device then serves nothing)."""
    (state / "versions" / "0002" / "meta.json").write_text("{")
    assert run(capsys, "rollback", "--state", state)[0] == 0 and current(state) == "0001"
    rc, _, err = run(capsys, "rollback", "--state", state, "--to", "2")
    assert rc == 2 and "version 0002 is not complete" in err and current(state) == "0001"


def test_rollback_to_repairs_a_damaged_current_pointer(state, capsys):
    """If this fails, a damaged `current` leaves the user no command to serve a model again."""
    (state / "current").write_text("garbage\n")
    rc, _, err = run(capsys, "rollback", "--state", state)
    assert rc == 2 and "--to N" in err
    rc, out, _ = run(capsys, "rollback", "--state", state, "--to", "2")
    assert rc == 0 and "(unreadable) -> 0002" in out and load_state(state).classes == ["apple", "pear", "c1"]


def test_prune_keeps_the_newest_and_always_the_current(state, capsys):
    """If this fails, pruning deletes the model being served (after a rollback it is not the newest)."""
    run(capsys, "rollback", "--state", state, "--to", "1")
    rc, out, _ = run(capsys, "prune", "--state", state, "--keep", "1")
    assert rc == 0 and "0002" in out
    assert version_names(state) == ["0001", "0003"] and current(state) == "0001"
    assert load_state(state).classes == ["apple", "pear"]
    rc, _, err = run(capsys, "prune", "--state", state, "--keep", "0")
    assert rc == 2 and "--keep: must be an integer >= 1, got 0" in err and version_names(state) == ["0001", "0003"]


def test_new_versions_after_prune_and_rollback_get_fresh_numbers(state):
    """If this fails, a pruned version's number is reused and history becomes ambiguous."""
    store.rollback(state, 1)
    store.prune(state, 1)                      # keeps 0003 (newest) and 0001 (current)
    st = load_state(state)
    st.student.widen(1)
    v = save_version(state, st.student, st.classes + ["z"], st.config, st.step + 1, st.history)
    assert v.name == "0004"


# ---------------------------------------------------------------------------- the lock

def lock_file(state: Path, **fields) -> Path:
    owner = store._me("fieldlearn learn")
    d = {**owner.__dict__, **fields}
    (state / "lock").write_text(json.dumps(d))
    return state / "lock"


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_owner_refuses_other_writers_with_one_line(state, capsys):
    """If this fails, two commands write the same state at once."""
    with store.state_lock(state, "fieldlearn learn"):
        lock = json.loads((state / "lock").read_text())
        assert lock["pid"] == os.getpid() and lock["hostname"] == socket.gethostname()
        assert stat.S_IMODE((state / "lock").stat().st_mode) == 0o600
        for argv in (["prune", "--keep", "1"], ["rollback"], ["export", "--no-engine"]):
            rc, _, err = run(capsys, *argv, "--state", state)
            assert rc == 2 and len(err.strip().splitlines()) == 1, err
            assert f"in use by fieldlearn learn (pid {os.getpid()} on {socket.gethostname()}" in err
    assert not (state / "lock").exists() and current(state) == "0003"


@pytest.mark.parametrize("why", ["dead pid", "reused pid", "rebooted", "unreadable"])
def test_a_stale_lock_is_recovered(state, capsys, why):
    """If this fails, a power cut or kill during a run blocks the device until someone
    deletes the lock by hand."""
    if why == "dead pid":
        lock_file(state, pid=dead_pid())
    elif why == "reused pid":
        lock_file(state, proc_start=12345)     # our pid, but not our process's start time
    elif why == "rebooted":
        lock_file(state, boot_id="00000000-0000-0000-0000-000000000000")
    else:
        (state / "lock").write_bytes(b"")
    rc, out, err = run(capsys, "rollback", "--state", state)
    assert rc == 0 and current(state) == "0002", err
    assert "removed the stale lock" in err and not (state / "lock").exists()


def test_checking_a_live_owner_leaves_it_running(state, capsys):
    """If this fails, asking whether the lock's owner is alive signals it (os.kill with a
    real signal instead of 0): a second command would hang up or kill the running learn."""
    holder = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        lock_file(state, pid=holder.pid, proc_start=store._proc_stat(holder.pid)[1])
        rc, _, err = run(capsys, "rollback", "--state", state)
        assert rc == 2 and f"pid {holder.pid}" in err and current(state) == "0003"
        time.sleep(0.2)
        assert holder.poll() is None, "the lock's owner was signalled"
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_but_unreaped_owner_is_stale(state, capsys):
    """If this fails, a learn that was killed while its parent (a shell, a supervisor) has
    not yet reaped it keeps the state locked: a zombie still answers os.kill(pid, 0)."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while (store._proc_stat(zombie.pid) or ("?",))[0] != "Z" and time.time() < deadline:
            time.sleep(0.05)                       # exited, and not reaped: no poll() or wait() here
        lock_file(state, pid=zombie.pid, proc_start=store._proc_stat(zombie.pid)[1])
        rc, _, err = run(capsys, "rollback", "--state", state)
        assert rc == 0 and "removed the stale lock" in err and current(state) == "0002", err
    finally:
        zombie.wait()


def test_a_lock_from_another_host_is_respected(state, capsys):
    """If this fails, a state on shared storage can be written from two machines at once."""
    lock_file(state, hostname="other-jetson", pid=1)
    rc, _, err = run(capsys, "rollback", "--state", state)
    assert rc == 2 and "other-jetson" in err and f"delete {state / 'lock'}" in err and current(state) == "0003"


def test_concurrent_cli_runs_are_refused_and_a_killed_owner_is_recovered(state, tmp_path, gen_test, capsys):
    """If this fails, `fieldlearn rollback` (or prune, export) runs while `fieldlearn learn`
    is writing the same state, or a SIGKILLed learn blocks the state for good."""
    new = write_image_folder(tmp_path / "new", gen_test, [40], 40)
    child = subprocess.Popen([sys.executable, "-m", "fieldlearn.cli", "learn", str(new), "--state", str(state),
                              "--no-progress", "--epochs", "400", "--no-export", "--teacher-backend", "torch"],
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (state / "lock").exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        owner = store.read_lock(state)
        assert owner is not None and owner.pid == child.pid, child.stderr.read() if child.poll() is not None else ""
        rc, _, err = run(capsys, "rollback", "--state", state)
        assert rc == 2 and f"in use by fieldlearn learn (pid {child.pid}" in err and current(state) == "0003"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    rc, _, err = run(capsys, "rollback", "--state", state)
    assert rc == 0 and "removed the stale lock of fieldlearn learn" in err and current(state) == "0002"


def test_leftovers_of_an_interrupted_run_are_removed_on_the_next_start(state, capsys):
    """If this fails, half-written versions and export work dirs pile up after crashes."""
    junk = [state / "versions" / ".tmp-abc123", state / "versions" / ".tmp-discard-0002-77",
            state / "versions" / "0003" / ".export-xyz"]
    for d in junk:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    files = [state / ".current.k2j3.tmp", state / "versions" / "0003" / ".model.onnx.ab12.tmp"]
    for f in files:
        f.write_bytes(b"x")
    rc, _, err = run(capsys, "prune", "--state", state, "--keep", "10")
    assert rc == 0 and "removed 5 leftover(s)" in err
    assert not any(p.exists() for p in junk + files)
    assert version_names(state) == ["0001", "0002", "0003"]


def test_an_unfinished_publish_is_discarded_unless_it_became_current(state, capsys):
    """If this fails, a version whose publish was cut short (its .pending marker still there)
    survives as a valid version after a crash, or the current version, switched to just
    before the crash, is thrown away."""
    (state / "versions" / "0002" / ".pending").write_bytes(b"")   # cut short before the switch
    (state / "versions" / "0003" / ".pending").write_bytes(b"")   # cut short after it: current
    rc, _, err = run(capsys, "prune", "--state", state, "--keep", "10")
    assert rc == 0, err
    assert version_names(state) == ["0001", "0003"] and current(state) == "0003"
    assert not (state / "versions" / "0003" / ".pending").exists()


def test_history_takes_no_lock_and_removes_nothing(state, capsys):
    """If this fails, a read-only look at the state deletes a running writer's work."""
    with store.state_lock(state, "fieldlearn learn"):
        (state / "versions" / ".tmp-inflight").mkdir()      # the lock holder's version in progress
        assert run(capsys, "history", "--state", state)[0] == 0
        assert (state / "versions" / ".tmp-inflight").is_dir()


# ---------------------------------------------------------------------------- permissions, disk full

def test_state_is_owner_only(tmp_path):
    """If this fails, other users on the device can read the model and its class names."""
    old = os.umask(0o022)
    try:
        root = make_state(tmp_path / "state", versions=1)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    assert modes == {".": 0o700, "current": 0o600, "versions": 0o700, "versions/0001": 0o700,
                     "versions/0001/model.safetensors": 0o600, "versions/0001/meta.json": 0o600}


def test_init_refused_leaves_no_state_dir_behind(tmp_path, capsys):
    """If this fails, a failed `fieldlearn init` leaves an empty state dir that looks initialised."""
    rc, _, err = run(capsys, "init", "--data", tmp_path / "nothing", "--state", tmp_path / "state")
    assert rc == 2 and not (tmp_path / "state").exists()


def test_only_init_creates_a_state_dir_and_an_unused_one_goes_again(tmp_path):
    """If this fails, `init` cannot start in a new folder, a mistyped --state of any other
    command creates a folder instead of saying there is none, or an init that saved nothing
    leaves an empty state dir behind."""
    new = tmp_path / "a" / "state"
    with store.state_lock(new, "fieldlearn init", create=True):
        assert new.is_dir() and stat.S_IMODE(new.stat().st_mode) == 0o700
    assert not new.exists()
    with pytest.raises(UserError, match="no such state directory"):
        with store.state_lock(tmp_path / "typo", "fieldlearn rollback"):
            pass
    assert not (tmp_path / "typo").exists()


def test_disk_full_while_switching_current_unpublishes_the_version(state, monkeypatch):
    """If this fails, a version that never became current stays behind looking like one that did."""
    import fieldlearn.store.state as st_mod

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(st_mod, "switch_current", full)
    s = load_state(state)
    with pytest.raises(UserError, match="No space left on device"):
        save_version(state, s.student, s.classes, s.config, s.step + 1, s.history)
    assert version_names(state) == ["0001", "0002", "0003"] and current(state) == "0003"
    assert not [p for p in (state / "versions").iterdir() if p.name.startswith(".")]


def test_disk_full_is_recognised_through_wrappers():
    from safetensors import SafetensorError

    assert store.disk_full_reason(OSError(errno.ENOSPC, "x")) == os.strerror(errno.ENOSPC)
    assert store.disk_full_reason(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"))
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as e:
            raise RuntimeError("export failed") from e
    except RuntimeError as e:
        assert store.disk_full_reason(e) == os.strerror(errno.EDQUOT)
    assert store.disk_full_reason(OSError(errno.EACCES, "x")) is None


def test_a_read_only_state_dir_is_one_line(state, capsys, monkeypatch):
    """If this fails, a state on a read-only mount (or another user's) gives a traceback."""
    real_open = os.open

    def ro_open(path, flags, *a, **k):     # what a read-only mount answers (root ignores mode bits)
        if str(path).endswith("/lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    rc, _, err = run(capsys, "rollback", "--state", state)
    monkeypatch.undo()
    assert rc == 2 and f"{state / 'lock'}: cannot create the state lock (Read-only file system)" in err
    assert current(state) == "0003"


# ------------------------------------------------------------------ class names and meta.json, unit level

@pytest.mark.parametrize("name, why", [
    ("", "blank"), ("   ", "blank"), (" cat", "leading or trailing"), ("cat ", "leading or trailing"),
    (".", "relative path"), ("..", "relative path"), ("a/b", "separator"), ("a\\b", "separator"),
    ("x" * (naming.MAX_CLASS_NAME + 1), "longer than"), ("bell\x07", "U+0007"), ("rtl\u202eexe", "U+202E"),
    ("line\u2028sep", "U+2028"), ("bad\udcffbyte", "U+DCFF"), ("priv\ue000", "U+E000"), (3, "not text")])
def test_each_kind_of_bad_class_name_is_named(name, why):
    """If this fails, a class name that could act as a path, hide text (bidi controls, line
    separators), stand for undecodable bytes or carry edge spaces gets into labels.txt."""
    assert why in naming.class_name_problem(name)
    with pytest.raises(UserError, match=f"^here: class name .*{re.escape(why)}"):
        naming.check_class_names(["ok", name], "here")


@pytest.mark.parametrize("name", ["café", "猫", "🐱 cat", "tulip-red_2", "x" * naming.MAX_CLASS_NAME, "a.b"])
def test_ordinary_unicode_class_names_pass(name):
    """If this fails, names a user can type are refused."""
    assert naming.class_name_problem(name) is None
    naming.check_class_names([name, "other"], "here")


@pytest.mark.parametrize("names, says", [(["a", "b", "a"], "'a' appears twice$"),
                                          (["caf\u00e9", "cafe\u0301"], "appears twice \\(as 'café'\\)")])
def test_a_class_name_given_twice_is_refused(names, says):
    """If this fails, one class becomes two head rows that print the same."""
    with pytest.raises(UserError, match=says):
        naming.check_class_names(names, "here")


@pytest.mark.parametrize("damage, says", [
    ({"format": "2"}, "is not a fieldlearn state format"), ({"format": True}, "is not a fieldlearn state format"),
    ({"format": 0}, "is not a fieldlearn state format"), ({"format": store.FORMAT + 1}, "upgrade fieldlearn"),
    ({"step": -1}, "'step' is not"), ({"step": "1"}, "'step' is not"), ({"step": False}, "'step' is not"),
    ({"classes": "ab"}, "'classes' is not a list"), ({"num_classes": 3}, "num_classes 3 but 2 class names"),
    ({"classes": ["a", "a"], "num_classes": 2}, "appears twice")])
def test_read_meta_refuses_each_inconsistency_naming_the_file(tmp_path, damage, says):
    """If this fails, a hand-edited or foreign meta.json is read as a state (and fails later
    in a traceback, or loads the wrong classes) instead of a one-line error naming it."""
    good = {"format": store.FORMAT, "classes": ["a", "b"], "num_classes": 2, "step": 0}
    (tmp_path / "meta.json").write_text(json.dumps(good))
    assert store.read_meta(tmp_path)["classes"] == ["a", "b"]
    (tmp_path / "meta.json").write_text(json.dumps({**good, **damage}))
    with pytest.raises(UserError, match=f"meta.json: .*{says}"):
        store.read_meta(tmp_path)
