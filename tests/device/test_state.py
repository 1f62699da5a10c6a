"""The state: atomic versions, and the promise that no training data is ever stored.

The audit trains real increments through the CLI with TMPDIR pointed into the test's
own folder, then reads every byte written under the state dir and the temp dir and
looks for the training images' pixels (raw uint8 rows, the normalised float32 input
rows) and the frozen-trunk features of those images (float32 and float16 rows).
"""

import os
import subprocess
import sys

import numpy as np
import torch

from fieldlearn.device.data import load_image_folder, to_input
from fieldlearn.device.model import build_student
from fieldlearn.device.state import load_state, save_version
from tests.conftest import tiny_config, write_image_folder


def _cli(*args, env):
    r = subprocess.run([sys.executable, "-m", "fieldlearn.cli", *args], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _needles(images: torch.Tensor, cfg, student=None) -> list[bytes]:
    """Byte strings that would betray stored pixels or features of these images."""
    out = []
    for img in images:
        a = img.numpy()                                     # [3, S, S] uint8
        out += [a[c, r].tobytes() for c in range(3) for r in (5, 17)]   # raw pixel rows
    x = to_input(images, cfg.model.input_size, cfg.model.mean, cfg.model.std)
    for row in x[:, :, 9].numpy():                          # [N, 3, W] normalised input rows
        out.append(row[1].astype(np.float32).tobytes())
    student = (student or build_student(cfg.model, 2)).eval()  # the run's frozen trunk
    with torch.no_grad():
        z = student.encode(x)                               # [N, C, h, w]
    for zi in z[:8]:
        out.append(zi[0, 1].numpy().astype(np.float32).tobytes())
        out.append(zi[0, 1].numpy().astype(np.float16).tobytes())
    return [n for n in out if len(set(n)) > 4]              # skip constant rows (padding-like)


def _all_files(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            yield os.path.join(dirpath, f)


def test_no_training_pixels_or_features_are_ever_written(tmp_path, cifar_test):
    base = write_image_folder(tmp_path / "base", cifar_test, [0, 1, 2], 12)
    new = write_image_folder(tmp_path / "new", cifar_test, [3, 4], 12)
    state, tmpdir = tmp_path / "state", tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    # The shipped kind of model (pretrained trunk, frozen, features cached in memory per step).
    _cli("init", "--data", str(base), "--state", str(state), "--base-epochs", "2", "--variant", "cifar",
         "--input-size", "32", "--freeze-blocks", "14", "--no-progress", "--batch-size", "8", env=env)
    _cli("learn", str(new), "--state", str(state), "--epochs", "1", "--no-progress", "--batch-size", "8",
         "--teacher-backend", "onnxruntime", env=env)

    st = load_state(state)
    imgs = torch.cat([load_image_folder(base, 32).images, load_image_folder(new, 32).images])
    needles = _needles(imgs, st.config, st.student)
    assert len(needles) > 100
    written = list(_all_files(state)) + list(_all_files(tmpdir))
    names = {os.path.basename(p) for p in written}
    # ".ses" is onnxruntime's session-id file in TMPDIR (a UUID); its bytes are scanned like the rest.
    assert names <= {"current", "model.safetensors", "meta.json", "model.onnx", "labels.txt", "lock", ".ses"}, names
    assert "model.onnx" in names, "every updated model is exported"
    for path in written:
        blob = open(path, "rb").read()
        for n in needles:
            assert n not in blob, f"{path} contains training pixels or features"


def test_audit_would_catch_a_stored_image(tmp_path, cifar_test):
    """The audit's needles really match stored pixels (else the test above proves nothing)."""
    cfg = tiny_config()
    imgs = cifar_test.images[:4]
    blob = imgs[2].numpy().tobytes()
    assert any(n in blob for n in _needles(imgs, cfg))
    x = to_input(imgs, 32, cfg.model.mean, cfg.model.std)
    assert any(n in x.numpy().astype(np.float32).tobytes() for n in _needles(imgs, cfg))


def test_versions_are_immutable_and_current_moves_atomically(tmp_path):
    cfg = tiny_config()
    s = build_student(cfg.model, 2)
    v1 = save_version(tmp_path, s, ["a", "b"], cfg, 0, [])
    s.widen(1)
    v2 = save_version(tmp_path, s, ["a", "b", "c"], cfg, 1, [])
    assert (v1.name, v2.name) == ("0001", "0002")
    assert (tmp_path / "current").read_text().strip() == "0002"
    assert load_state(tmp_path).classes == ["a", "b", "c"]
    assert (v1 / "model.safetensors").is_file()


def test_a_failing_writer_publishes_nothing(tmp_path):
    cfg = tiny_config()
    s = build_student(cfg.model, 2)
    save_version(tmp_path, s, ["a", "b"], cfg, 0, [])

    def boom(_):
        raise RuntimeError("export failed")

    try:
        save_version(tmp_path, s, ["a", "b"], cfg, 1, [], writers=[boom])
    except RuntimeError:
        pass
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["0001"]
    assert (tmp_path / "current").read_text().strip() == "0001"
