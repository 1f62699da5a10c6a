"""`fieldlearn watch`: class folders arrive in an inbox, get learned, and leave no trace of
their images in the state; a daemon killed mid-increment loses nothing when restarted.

Real CIFAR-100 images written as PNG and JPEG folders; a tiny net (tests/conftest.py) whose
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
from fieldlearn.device import watch as W
from fieldlearn.device.data import to_input
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import current_version_dir, current_version_name
from fieldlearn.runtime.metadata import read_labels, read_metadata
from tests.conftest import ROOT, tiny_config, write_image_folder

BASE = [0, 1, 2]        # CIFAR-100 classes of the base model
NEW = [3, 4]            # the classes that arrive in the inbox (one PNG folder, one JPEG folder)
PER_CLASS = 24
FAST = ["--epochs", "1", "--num-threads", "1"]


@pytest.fixture(scope="module")
def base_state(tmp_path_factory, cifar_train):
    """A state dir with version 0001: the tiny net trained on 3 classes."""
    from fieldlearn.device.learner import train_base
    from fieldlearn.device.model import build_student
    from fieldlearn.device.state import save_version

    torch.set_num_threads(1)
    cfg = tiny_config()
    base = cifar_train.reorder(BASE).select([0, 1, 2], 40, seed=0)
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
    uint8), the CIFAR source pixels, and the normalised float32 input rows."""
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


def test_watch_learns_arriving_classes_serves_them_and_keeps_no_image(base_state, tmp_path, cifar_train, capsys):
    """If this fails, the field loop does not do its one job: folders that arrive become
    classes of the served model, their images leave the inbox and never reach the state."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, cifar_train)
    found = needles(inbox, cifar_train)
    keep_one = tmp_path / "probe.png"                     # a new-class image, for classify afterwards
    shutil.copy(sorted((inbox / new[0]).glob("*.png"))[0], keep_one)
    write_image_folder(inbox, cifar_train, [5], 3)        # still being copied: no .done, must stay
    waiting = cifar_train.class_names[5]
    clash = cifar_train.class_names[BASE[0]]              # a class the model knows: rejected, kept
    write_image_folder(inbox, cifar_train, [BASE[0]], 2)
    (inbox / clash / W.DONE).touch()

    assert main(["watch", str(inbox), "--state", str(state), "--once", *FAST]) == 0
    out = capsys.readouterr().out

    base_classes = [cifar_train.class_names[c] for c in BASE]
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
    assert status["state"] == "idle" and status["current_version"] == "0002" and status["pid"] == os.getpid()
    assert status["classes"] == base_classes + new and status["waiting"] == [waiting]
    assert status["last_increment"]["new_classes"] == new
    for event in ("claimed", "learning", "published", "cleaned", "rejected"):
        assert f"watch {event}:" in out, out
    assert_no_image_bytes(state, found)


def test_keep_images_moves_them_out_and_must_be_outside_the_state(base_state, tmp_path, cifar_train):
    """If this fails, --keep-images loses images or lets them into the state dir."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, cifar_train)
    before = snapshot(inbox)
    assert main(["watch", str(inbox), "--state", str(state), "--keep-images", str(state / "kept"), "--once"]) == 2
    assert snapshot(inbox) == before and current_version_name(state) == "0001"

    keep = tmp_path / "kept"
    assert main(["watch", str(inbox), "--state", str(state), "--keep-images", str(keep), "--once", *FAST]) == 0
    assert read_labels(current_version_dir(state) / "labels.txt")[-2:] == new
    moved = {str(p.relative_to(keep / "0002")): p.read_bytes() for p in sorted(keep.rglob("*")) if p.is_file()}
    assert moved == {k: v for k, v in before.items() if not k.endswith(W.DONE)}
    assert list(inbox.iterdir()) == []


def test_killed_mid_increment_then_restarted_loses_nothing(base_state, tmp_path, cifar_train):
    """If this fails, a power cut or SIGKILL during learning loses the arrived images, serves
    a half-written model, or learns the classes twice."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, cifar_train)
    before = snapshot(inbox)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "fieldlearn.cli.main", "watch", str(inbox), "--state",
                               str(state), "--poll", "0.2", "--epochs", "200", "--num-threads", "1"],
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


def test_stopped_after_publishing_only_finishes_the_cleanup(base_state, tmp_path, cifar_train, monkeypatch):
    """If this fails, a stop between switching `current` and deleting the images makes the
    next start learn the same classes again (a second version) or leave them in the inbox."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, cifar_train)
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


def test_a_failing_increment_is_retried_then_set_aside(base_state, tmp_path, cifar_train, monkeypatch):
    """If this fails, one bad folder can crash-loop the daemon forever (or get deleted)."""
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    new = fill_inbox(inbox, cifar_train)
    import fieldlearn.device.commands.learn as learn_mod

    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(learn_mod, "learn_new_classes", boom)
    for attempt in range(1, W.MAX_ATTEMPTS + 1):
        assert main(["watch", str(inbox), "--state", str(state), "--once"]) == 1
        assert (inbox / W.REJECTED).exists() == (attempt == W.MAX_ATTEMPTS)
    assert current_version_name(state) == "0001" and not (state / W.JOURNAL).exists()
    for n in new:
        assert "simulated failure" in (inbox / W.REJECTED / n / W.REASON).read_text()
        assert len(W.image_files(inbox / W.REJECTED / n)) == PER_CLASS


def test_scan_takes_done_or_quiet_folders_only(tmp_path):
    """If this fails, the daemon learns a folder that is still being copied."""
    inbox = tmp_path / "inbox"
    for name in ("a", "b", "c", ".hidden", "empty"):
        (inbox / name).mkdir(parents=True)
    for name in ("a", "b", "c"):
        (inbox / name / "x.jpg").write_bytes(b"x")
    (inbox / "a" / W.DONE).touch()
    (inbox / "c" / ".part.jpg").write_bytes(b"x")
    old = time.time() - 600
    for p in [inbox / "b", inbox / "b" / "x.jpg", inbox / "empty"]:
        os.utime(p, (old, old))
    assert W.scan(inbox) == (["a"], ["b", "c", "empty"])
    assert W.scan(inbox, quiet_seconds=300) == (["a", "b"], ["c", "empty"])
    assert W.image_files(inbox / "c") == ["x.jpg"]


def test_refuses_overlapping_dirs_and_a_second_daemon(base_state, tmp_path):
    """If this fails, two daemons (or a state inside the inbox) can corrupt each other's work."""
    state = fresh_state(base_state, tmp_path)
    with pytest.raises(UserError, match="must not contain"):
        W.Watcher(state / "inbox", state)
    with pytest.raises(UserError, match="holds no model"):
        W.Watcher(tmp_path / "inbox", tmp_path / "nothing")
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


def test_unusable_options_fail_at_start_not_per_increment(base_state, tmp_path, cifar_train, capsys):
    """If this fails, a daemon started with --device cuda on a GPU-less box would fail every
    increment and end by setting the user's folders aside."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is usable here")
    state = fresh_state(base_state, tmp_path)
    inbox = tmp_path / "inbox"
    fill_inbox(inbox, cifar_train)
    before = snapshot(inbox)
    assert main(["watch", str(inbox), "--state", str(state), "--once", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert snapshot(inbox) == before and not (state / W.JOURNAL).exists()
