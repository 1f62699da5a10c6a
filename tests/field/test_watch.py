"""`fieldlearn watch`: class folders arrive in an inbox, get learned, and leave no trace of
their images in the state; a daemon killed mid-increment loses nothing when restarted.

Generated images (tests/synthetic.py) written as PNG and JPEG folders; a tiny net (tests/conftest.py) whose
base model has BatchNorm statistics of its base images, so the export's parity check
compares real outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from fieldlearn.cli.main import main
from fieldlearn.field import watch as W
from fieldlearn.device.data import to_input
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import current_version_dir, current_version_name
from fieldlearn.runtime.metadata import read_labels, read_metadata
from tests.conftest import ROOT, tiny_config, write_image_folder

BASE = [0, 1, 2]        # classes of the base model (generated data)
NEW = [3, 4]            # the classes that arrive in the inbox (one PNG folder, one JPEG folder)
PER_CLASS = 24
FAST = ["--epochs", "1", "--num-threads", "1", "--settle-seconds", "0"]


@pytest.fixture(scope="module")
def base_state(tmp_path_factory, gen_train):
    """A state dir with version 0001: the tiny net trained on 3 classes."""
    from fieldlearn.device.learner import train_base
    from fieldlearn.device.model import build_student
    from fieldlearn.store.state import save_version

    torch.set_num_threads(1)
    cfg = tiny_config()
    base = gen_train.reorder(BASE).select([0, 1, 2], 40, seed=0)
    torch.manual_seed(0)
    student = build_student(cfg.model, len(BASE))
    train_base(student, base, cfg)
    bns = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:   # the statistics a well-trained base would have (1 epoch leaves them near init)
        m.reset_running_stats()
        m.momentum = None
    student.train()
    with torch.no_grad():
        student(to_input(base.images, cfg.model.input_size, cfg.model.mean, cfg.model.std))
    student.eval()
    d = tmp_path_factory.mktemp("base") / "state"
    save_version(d, student, base.class_names, cfg, step=0, history=[{"step": 0, "method": "base"}])
    return d


def fresh_state(base_state, tmp_path) -> Path:
    d = tmp_path / "state"
    shutil.copytree(base_state, d)
    return d


def fill_inbox(inbox: Path, data, done: bool = True) -> list[str]:
    """Class NEW[0] as PNG, NEW[1] as JPEG, each with a .done marker. Returns the class names."""
    write_image_folder(inbox, data, [NEW[0]], PER_CLASS, fmt="png")
    write_image_folder(inbox, data, [NEW[1]], PER_CLASS, fmt="jpg")
    names = [data.class_names[c] for c in NEW]
    if done:
        for n in names:
            (inbox / n / W.DONE).touch()
    return names


def needles(inbox: Path, data) -> list[bytes]:
    """What would betray a stored image: each file's bytes, its decoded pixels (HWC and CHW
    uint8), the source pixels, and the normalised float32 input rows."""
    cfg = tiny_config()
    out = []
    for p in sorted(inbox.rglob("*")):
        if p.suffix.lower() not in (".png", ".jpg"):
            continue
        out.append(p.read_bytes())
        hwc = np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8)        # [32, 32, 3]
        chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))                      # [3, 32, 32]
        out += [hwc.tobytes(), chw.tobytes(), hwc[7].tobytes(), chw[1, 9].tobytes()]
        x = to_input(torch.from_numpy(chw)[None], cfg.model.input_size, cfg.model.mean, cfg.model.std)
        out.append(x[0, 0, 11].numpy().astype(np.float32).tobytes())          # one input row, 128 bytes
    labels = data.labels.numpy()
    for c in NEW:
        for idx in np.flatnonzero(labels == c)[:PER_CLASS]:
            a = data.images[idx].numpy()                                        # [3, 32, 32] source pixels
            out += [a.tobytes(), np.ascontiguousarray(a.transpose(1, 2, 0)).tobytes()]
    return out


def assert_no_image_bytes(state: Path, found: list[bytes]) -> None:
    files = [p for p in state.rglob("*") if p.is_file()]
    assert files
    for p in files:
        blob = p.read_bytes()
        for n in found:
            assert n not in blob, f"{p} holds image data ({len(n)} bytes of an inbox image)"


def snapshot(inbox: Path) -> dict[str, bytes]:
    return {str(p.relative_to(inbox)): p.read_bytes() for p in sorted(inbox.rglob("*")) if p.is_file()}


def test_watch_learns_arriving_classes_serves_them_and_keeps_no_image(base_state, tmp_path, gen_train, capsys):
    """If this fails, the field loop does not do its one job: folders that arrive become
    classes of the served model, their images leave the inbox and never reach the state."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, gen_train)
    found = needles(inbox, gen_train)
    keep_one = tmp_path / "probe.png"                     # a new-class image, for classify afterwards
    shutil.copy(sorted((inbox / new[0]).glob("*.png"))[0], keep_one)
    write_image_folder(inbox, gen_train, [5], 3)        # still being copied: no .done, must stay
    waiting = gen_train.class_names[5]
    clash = gen_train.class_names[BASE[0]]              # a class the model knows: rejected, kept
    write_image_folder(inbox, gen_train, [BASE[0]], W.MIN_IMAGES)
    (inbox / clash / W.DONE).touch()

    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    out = capsys.readouterr().out

    base_classes = [gen_train.class_names[c] for c in BASE]
    vdir = current_version_dir(state)
    assert vdir.name == "0002"
    assert read_labels(vdir / "labels.txt") == base_classes + new
    assert read_metadata(vdir / "model.onnx")["classes"] == base_classes + new
    meta = json.loads((vdir / "meta.json").read_text())
    entry = meta["history"][-1]
    assert entry["source"] == "watch" and entry["new_classes"] == new and entry["n_val_images"] >= 2
    assert "new_class_val_accuracy" in entry

    # the served model answers with the new labels
    assert main(["classify", str(keep_one), "--state", str(state), "--top-k", "5", "--json"]) == 0
    served = json.loads(capsys.readouterr().out)
    assert served["model"] == str(vdir / "model.onnx")
    assert {t["label"] for t in served["results"][0]["top"]} == set(base_classes + new)

    # the inbox: learned folders gone, the incomplete one untouched, the clash set aside with a reason
    assert not (inbox / new[0]).exists() and not (inbox / new[1]).exists()
    assert sorted(p.name for p in (inbox / waiting).iterdir()) == ["0000.png", "0001.png", "0002.png"]
    rejected = inbox / W.REJECTED / clash
    assert "already known" in (rejected / W.REASON).read_text() and (rejected / "0000.png").is_file()

    assert not (state / W.JOURNAL).exists()
    status = json.loads((state / W.STATUS).read_text())
    assert status["state"] == "stopped" and status["current_version"] == "0002" and status["pid"] == os.getpid()
    assert status["classes"] == base_classes + new and status["waiting"] == [waiting]
    assert status["last_increment"]["new_classes"] == new
    for event in ("claimed", "learning", "published", "cleaned", "rejected"):
        assert f"watch {event}:" in out, out
    assert_no_image_bytes(state, found)


def test_keep_images_moves_them_out_and_must_be_outside_the_state(base_state, tmp_path, gen_train):
    """If this fails, --keep-images loses images or lets them into the state dir."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, gen_train)
    before = snapshot(inbox)
    assert main(["watch", str(inbox), "--state", str(state), "--keep-images", str(state / "kept"), "--once"]) == 2
    assert snapshot(inbox) == before and current_version_name(state) == "0001"

    keep = tmp_path / "kept"
    assert main(["watch", str(inbox), "--state", str(state), "--keep-images", str(keep), "--once", *FAST]) == 0
    assert read_labels(current_version_dir(state) / "labels.txt")[-2:] == new
    moved = {str(p.relative_to(keep / "0002")): p.read_bytes() for p in sorted(keep.rglob("*")) if p.is_file()}
    assert moved == {k: v for k, v in before.items() if not k.endswith(W.DONE)}
    assert list(inbox.iterdir()) == []


def test_killed_mid_increment_then_restarted_loses_nothing(base_state, tmp_path, gen_train):
    """If this fails, a power cut or SIGKILL during learning loses the arrived images, serves
    a half-written model, or learns the classes twice."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, gen_train)
    before = snapshot(inbox)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "fieldlearn.cli.main", "watch", str(inbox), "--state",
                               str(state), "--poll", "0.2", "--epochs", "200", "--num-threads", "1",
                               "--settle-seconds", "0"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                status = json.loads((state / W.STATUS).read_text())
            except (FileNotFoundError, ValueError):
                status = {}
            if (status.get("last_event") or "").startswith("learning:"):
                break
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        else:
            pytest.fail("the daemon never started learning:\n" + (tmp_path / "daemon.log").read_text())
        time.sleep(1.0)                                    # well inside 200 epochs of training
        assert daemon.poll() is None, "the increment ended before the kill; make it longer"
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        log.close()

    # killed: the old model is still served, every image is still in the inbox, the journal names them
    assert current_version_name(state) == "0001"
    assert snapshot(inbox) == before
    journal = json.loads((state / W.JOURNAL).read_text())
    assert sorted(journal["files"]) == sorted(new) and journal["phase"] == "learning"
    assert all("." not in k or k.endswith((".png", ".jpg")) for fs in journal["files"].values() for k in fs)

    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    assert current_version_name(state) == "0002"
    assert read_labels(current_version_dir(state) / "labels.txt")[-2:] == new
    assert sorted(p.name for p in (state / "versions").iterdir()) == ["0001", "0002"]  # no half version left
    history = json.loads((state / "versions" / "0002" / "meta.json").read_text())["history"]
    assert [h["new_classes"] for h in history if h.get("source") == "watch"] == [new]
    assert history[-1]["n_images"] + history[-1]["n_val_images"] == 2 * PER_CLASS   # nothing lost
    assert list(inbox.iterdir()) == [] and not (state / W.JOURNAL).exists()


def test_stopped_after_publishing_only_finishes_the_cleanup(base_state, tmp_path, gen_train, monkeypatch):
    """If this fails, a stop between switching `current` and deleting the images makes the
    next start learn the same classes again (a second version) or leave them in the inbox."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, gen_train)
    real = W.Watcher._dispose
    calls = []

    def stop_once(self, claim):
        calls.append(claim.names)
        if len(calls) == 1:
            raise W.Stopped()                   # what SIGTERM does at this point
        return real(self, claim)

    monkeypatch.setattr(W.Watcher, "_dispose", stop_once)
    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    assert current_version_name(state) == "0002" and (inbox / new[0]).is_dir()
    assert json.loads((state / W.JOURNAL).read_text())["phase"] == "cleanup"

    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    assert calls == [new, new]
    assert sorted(p.name for p in (state / "versions").iterdir()) == ["0001", "0002"]
    assert list(inbox.iterdir()) == [] and not (state / W.JOURNAL).exists()


def test_a_class_that_fails_alone_is_set_aside_and_the_others_are_learned(base_state, tmp_path, gen_train,
                                                                           monkeypatch):
    """If this fails, one bad folder crash-loops the daemon, gets deleted, or takes a good
    class claimed in the same increment down with it. A failing increment of two classes is
    narrowed to one class at a time; only the class that fails on its own is set aside, after
    MAX_ATTEMPTS tries, and the good one is learned."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    bad, good = fill_inbox(inbox, gen_train)
    import fieldlearn.field.increment as learn_mod

    real = learn_mod.learn_new_classes

    def fails_with_bad(state_dir, st, data, *a, **k):
        if bad in data.class_names:
            raise RuntimeError("simulated failure")
        return real(state_dir, st, data, *a, **k)

    monkeypatch.setattr(learn_mod, "learn_new_classes", fails_with_bad)
    codes = [main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) for _ in range(W.MAX_ATTEMPTS + 2)]
    # try 1: both together fail (narrowed, counted against neither); tries 2..4: the bad one alone,
    # set aside at the 3rd; then the good one is learned
    assert codes == [1] * (W.MAX_ATTEMPTS + 1) + [0], codes
    assert current_version_name(state) == "0002" and not (state / W.JOURNAL).exists()
    assert read_labels(current_version_dir(state) / "labels.txt")[-1] == good
    assert "3 tries failed; last: RuntimeError: simulated failure" in (inbox / W.REJECTED / bad / W.REASON).read_text()
    assert len(W.image_files(inbox / W.REJECTED / bad)) == PER_CLASS
    assert sorted(p.name for p in inbox.iterdir()) == [W.REJECTED]


@pytest.mark.parametrize("interruption", ["stop", "disk full", "state locked", "state unreadable"])
def test_interruptions_are_never_counted_as_failed_tries(base_state, tmp_path, gen_train, monkeypatch, interruption):
    """If this fails, three power cuts, SIGTERMs or full disks during learning reject good
    data (docs/FIELD.md: stopping is safe at any moment and the next start redoes the
    increment). The journal's count of failed tries must stay 0, however many times."""
    from fieldlearn.store.versions import DiskFull, StateLocked

    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, gen_train)
    import fieldlearn.field.increment as learn_mod

    real = learn_mod.learn_new_classes
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) <= W.MAX_ATTEMPTS + 1:
            if interruption == "stop":
                raise W.Stopped()
            raise (DiskFull if interruption == "disk full" else StateLocked)(f"{state}: simulated {interruption}")
        return real(*a, **k)

    if interruption == "state unreadable":      # e.g. meta.json damaged while the daemon runs: not the data's fault
        real_load = learn_mod.load_state

        def interrupted(*a, **k):  # noqa: F811
            calls.append(1)
            if len(calls) <= W.MAX_ATTEMPTS + 1:
                raise UserError(f"{state}/versions/0001/meta.json: simulated damage")
            return real_load(*a, **k)
        monkeypatch.setattr(learn_mod, "load_state", interrupted)
    else:
        monkeypatch.setattr(learn_mod, "learn_new_classes", interrupted)
    for _ in range(W.MAX_ATTEMPTS + 1):
        rc = main(["watch", str(inbox), "--state", str(state), "--once", *FAST])
        assert rc == (0 if interruption in ("stop", "state locked") else 1)   # (a busy lock is a wait, not an error)
        journal = json.loads((state / W.JOURNAL).read_text())
        assert journal["failures"] == 0 and sorted(journal["files"]) == sorted(new), journal
        assert not (inbox / W.REJECTED).exists()
    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    assert read_labels(current_version_dir(state) / "labels.txt")[-2:] == new
    assert list(inbox.iterdir()) == []


def test_an_unreadable_image_sorting_first_costs_only_itself(base_state, tmp_path, gen_train, capsys):
    """If this fails, one broken file (sorting first, so the export check used to pick it)
    fails the increment, and after the retries rejects the good classes with it. It must be
    learned around, reported in one line, and set aside (not deleted) with a reason."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, gen_train)
    (inbox / new[0] / "0000-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (inbox / new[1] / "notes.txt").write_text("camera 3, afternoon")
    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    out = capsys.readouterr().out
    assert read_labels(current_version_dir(state) / "labels.txt")[-2:] == new
    skipped = [line for line in out.splitlines() if " watch skipped:" in line]
    assert len(skipped) == 1 and "skipped 2 of" in skipped[0] and "0000-broken.png" in skipped[0], out
    kept = {p.name: p for p in (inbox / W.REJECTED).iterdir()}
    assert sorted(kept) == [f"{new[0]}.unread-0002", f"{new[1]}.unread-0002"]
    assert (kept[f"{new[0]}.unread-0002"] / "0000-broken.png").read_bytes().endswith(b"garbage")
    assert "0000-broken.png: unreadable image" in (kept[f"{new[0]}.unread-0002"] / W.REASON).read_text()
    assert (kept[f"{new[1]}.unread-0002"] / "notes.txt").read_text() == "camera 3, afternoon"
    assert sorted(p.name for p in inbox.iterdir()) == [W.REJECTED]


def test_a_folder_that_breaks_the_class_name_rule_is_set_aside_before_learning(base_state, tmp_path, gen_train):
    """If this fails, the daemon learns a class whose name the state's own meta.json check then
    refuses (a bidi override hides the real text), and the state no longer loads. learn and
    watch apply the one class-name rule (fieldlearn.device.names.check_new_class_names)."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    write_image_folder(inbox, gen_train, [NEW[0]], W.MIN_IMAGES)
    bad = "tulip\u202egnp.exe"
    (inbox / gen_train.class_names[NEW[0]]).rename(inbox / bad)
    (inbox / bad / W.DONE).touch()
    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    assert current_version_name(state) == "0001", "nothing is learned from it"
    reason = (inbox / W.REJECTED / bad / W.REASON).read_text()
    assert repr(bad) in reason and "U+202E" in reason
    assert sorted(p.name for p in inbox.iterdir()) == [W.REJECTED]


def test_a_class_with_too_few_readable_images_is_set_aside_alone(base_state, tmp_path, gen_train):
    """If this fails, a class of 3 good images and 3 junk files is learned from 3 images, or
    rejects the other class of the increment with it."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, gen_train)
    small = gen_train.class_names[6]
    write_image_folder(inbox, gen_train, [6], 3)
    for i in range(3):
        (inbox / small / f"junk{i}.jpg").write_bytes(b"")
    (inbox / small / W.DONE).touch()
    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    assert read_labels(current_version_dir(state) / "labels.txt")[-2:] == new
    reason = (inbox / W.REJECTED / small / W.REASON).read_text()
    assert "3 readable images of 6 files; a new class needs at least 5" in reason, reason
    assert len(list((inbox / W.REJECTED / small).iterdir())) == 6 + 2      # nothing deleted (+ .done, .reason)


def test_folders_are_taken_only_when_settled_and_big_enough(base_state, tmp_path, gen_train, capsys):
    """If this fails, a folder whose `.done` was touched while the copy was still running is
    learned from its first image (and deleted under the copier), or a 2-image class is learned."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, gen_train)
    shutil.rmtree(inbox / new[1])
    for p in sorted((inbox / new[0]).glob("*.png"))[2:]:
        p.unlink()                                              # 2 images and .done
    argv = ["watch", str(inbox), "--state", str(state), "--once", "--epochs", "1", "--num-threads", "1"]
    assert main([*argv, "--settle-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert f"watch waiting: {inbox / new[0]}: 2 image files; a class needs at least {W.MIN_IMAGES}" in out, out
    assert current_version_name(state) == "0001" and not (inbox / W.REJECTED).exists()
    write_image_folder(inbox, gen_train, [NEW[0]], PER_CLASS)  # the copy goes on
    assert main([*argv, "--settle-seconds", "60"]) == 0       # just changed: not taken yet
    assert current_version_name(state) == "0001" and len(W.image_files(inbox / new[0])) == PER_CLASS
    status = json.loads((state / W.STATUS).read_text())
    assert status["waiting"] == [new[0]] and status["waiting_why"][new[0]].startswith("settling")
    old = time.time() - 120
    for p in [inbox / new[0], *(inbox / new[0]).iterdir()]:
        os.utime(p, (old, old))
    assert main([*argv, "--settle-seconds", "60"]) == 0
    assert read_labels(current_version_dir(state) / "labels.txt")[-1] == new[0]


def test_a_version_published_but_not_switched_to_is_not_a_second_history_entry(base_state, tmp_path, gen_train,
                                                                                capsys):
    """If this fails, a daemon killed between the version's rename and the `current` switch
    redoes the increment and `history` shows the same classes twice (the orphan and the redo)."""
    from fieldlearn.runtime.layout import PENDING

    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, gen_train)
    orphan = state / "versions" / "0002"                        # what the kill leaves: renamed, marked, not current
    shutil.copytree(state / "versions" / "0001", orphan)
    (orphan / PENDING).touch()
    assert main(["history", "--state", str(state), "--json"]) == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == ["0001"]
    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    capsys.readouterr()
    assert main(["history", "--state", str(state), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == ["0001", "0002"] and rows[-1]["current"] and rows[-1]["new_classes"] == 2
    assert not (state / "versions" / "0002" / PENDING).exists()


def _ro_bind(path: Path):
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({r.stderr.strip() or r.returncode})")
    r = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["umount", str(path)], check=False)
        pytest.skip(f"cannot remount read-only here ({r.stderr.strip() or r.returncode})")


def test_a_read_only_inbox_is_one_line_at_start(base_state, tmp_path, gen_train, capsys):
    """If this fails, a daemon on a read-only inbox publishes a version, then fails to remove
    the images, counts a failed try and crash-loops with a traceback at every restart."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, gen_train)
    _ro_bind(inbox)
    try:
        rc = main(["watch", str(inbox), "--state", str(state), "--once", *FAST])
    finally:
        subprocess.run(["umount", str(inbox)], check=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"INBOX {inbox.resolve()}: not writable (Read-only file system)" in err[0], err
    assert current_version_name(state) == "0001" and not (state / W.JOURNAL).exists()


def test_a_deleted_inbox_is_an_error_event_and_the_daemon_carries_on(base_state, tmp_path, gen_train):
    """If this fails, deleting the inbox under a running daemon kills it with a traceback while
    its status file still says `idle`; it must log an `error` event, say `error` in the status
    file, stay up, and learn again once the inbox is back."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "fieldlearn.cli.main", "watch", str(inbox), "--state",
                               str(state), "--poll", "0.2", *FAST], stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_for(pred, what: str, seconds: float = 120):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                status = json.loads((state / W.STATUS).read_text())
            except (FileNotFoundError, ValueError):
                status = {}
            if pred(status):
                return status
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        pytest.fail(f"never {what}:\n" + (tmp_path / "daemon.log").read_text())

    try:
        wait_for(lambda s: s.get("state") == "idle", "idle")
        shutil.rmtree(inbox)
        status = wait_for(lambda s: s.get("state") == "error", "reported the error")
        assert "gone" in status["error"] and status["pid"] == daemon.pid
        fill_inbox(inbox, gen_train)
        wait_for(lambda s: s.get("current_version") == "0002" and s.get("state") == "idle", "learned again")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in text and text.count("watch error:") == 1, text
    assert json.loads((state / W.STATUS).read_text())["state"] == "stopped"


def test_scan_takes_done_or_quiet_folders_only(tmp_path):
    """If this fails, the daemon learns a folder that is still being copied."""
    inbox = tmp_path / "inbox"
    for name in ("a", "b", "c", ".hidden", "empty"):
        (inbox / name).mkdir(parents=True)
    for name in ("a", "b", "c"):
        for i in range(W.MIN_IMAGES):
            (inbox / name / f"x{i}.jpg").write_bytes(b"x")
    (inbox / "a" / W.DONE).touch()
    (inbox / "c" / ".part.jpg").write_bytes(b"x")
    old = time.time() - 600
    for p in [inbox / "b", *(inbox / "b").iterdir(), inbox / "empty"]:
        os.utime(p, (old, old))
    assert W.scan(inbox) == (["a"], ["b", "c", "empty"])
    assert W.scan(inbox, quiet_seconds=300) == (["a", "b"], ["c", "empty"])
    assert W.image_files(inbox / "c") == [f"x{i}.jpg" for i in range(W.MIN_IMAGES)]
    assert W.scan(inbox, settle_seconds=300) == ([], ["a", "b", "c", "empty"])   # a's .done is fresh


def test_refuses_overlapping_dirs_and_a_second_daemon(base_state, tmp_path):
    """If this fails, two daemons (or a state inside the inbox) can corrupt each other's work."""
    state = fresh_state(base_state, tmp_path)
    with pytest.raises(UserError, match="must not contain"):
        W.Watcher(state / "inbox", state)
    with pytest.raises(UserError, match="no such state directory"):
        W.Watcher(tmp_path / "inbox", tmp_path / "nothing")
    (tmp_path / "empty-state").mkdir()
    with pytest.raises(UserError, match="holds no model yet"):
        W.Watcher(tmp_path / "inbox", tmp_path / "empty-state")
    a, b = W.Watcher(tmp_path / "inbox", state), W.Watcher(tmp_path / "inbox", state)
    a.lock()
    try:
        with pytest.raises(UserError, match=f"another fieldlearn watch .*pid {os.getpid()}"):
            b.lock()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


def test_print_unit_restarts_on_failure(base_state, tmp_path, capsys):
    """If this fails, the generated systemd unit does not run the watcher or does not restart it."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "in box"
    assert main(["watch", str(inbox), "--state", str(state), "--keep-images", str(tmp_path / "kept"),
                 "--quiet-seconds", "120", "--epochs", "3", "--print-unit"]) == 0
    unit = capsys.readouterr().out
    lines = unit.splitlines()
    assert "Restart=on-failure" in lines and "[Install]" in lines
    exec_line = next(line for line in lines if line.startswith("ExecStart="))
    assert f' watch "{inbox.resolve()}" --state {state.resolve()} ' in exec_line
    assert "--quiet-seconds 120" in exec_line and f"--keep-images {(tmp_path / 'kept').resolve()}" in exec_line
    assert "--epochs 3" in exec_line and "--print-unit" not in exec_line
    assert not (state / W.STATUS).exists()      # printing a unit starts nothing


def test_unusable_options_fail_at_start_not_per_increment(base_state, tmp_path, gen_train, capsys):
    """If this fails, a daemon started with --device cuda on a GPU-less box would fail every
    increment and end by setting the user's folders aside."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is usable here")
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, gen_train)
    before = snapshot(inbox)
    assert main(["watch", str(inbox), "--state", str(state), "--once", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert snapshot(inbox) == before and not (state / W.JOURNAL).exists()
