"""fieldlearn.export.deploy and `fieldlearn export`: a checked model.onnx + labels.txt in the current version dir."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from fieldlearn.cli.main import main
from fieldlearn.export.deploy import export_state, export_writer
from fieldlearn.device.config import ModelConfig, RunConfig
from fieldlearn.device.model import Student
from fieldlearn.runtime.cuda import tensorrt_unavailable_reason
from fieldlearn.runtime.engines import OrtEngine, ParityError
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.metadata import read_labels, read_metadata

CLASSES = ["apple", "pear", "plum"]


def loaded_state(version_dir) -> SimpleNamespace:
    """What fieldlearn.store.state.load_state returns (the fields export relies on)."""
    cfg = RunConfig(model=ModelConfig(pretrained=False, width=0.5, input_size=64, freeze_blocks=14, classifier="linear"))
    torch.manual_seed(0)
    student = Student(cfg.model, len(CLASSES))
    bns = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:                                  # warm BatchNorm: a fresh net outputs constants
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        student(torch.randn(16, 3, 64, 64))
    version_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(student=student.eval(), classes=list(CLASSES), config=cfg, step=2, version_dir=version_dir)


def photos(tmp_path, n=3):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + i * 10, 50, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_export_state_writes_checked_files(tmp_path):
    """If this fails, `fieldlearn export` leaves no usable model in the version dir."""
    state = loaded_state(tmp_path / "state" / "versions" / "0002")
    report = export_state(state, engine=False, images=photos(tmp_path))
    vdir = state.version_dir
    assert report.onnx_path == vdir / "model.onnx" and report.labels_path == vdir / "labels.txt"
    assert read_labels(vdir / "labels.txt") == CLASSES
    meta = read_metadata(vdir / "model.onnx")
    assert meta["classes"] == CLASSES and meta["step"] == 2 and meta["state_version"] == "0002"
    assert set(report.parity) == {"onnxruntime, random x4", "onnxruntime, 3 images"}
    assert all(e < 1e-3 for errs in report.parity.values() for e in errs.values())
    assert report.engine_path is None and "--no-engine" in report.engine_note
    assert sorted(p.name for p in vdir.iterdir()) == ["labels.txt", "model.onnx"]   # no temp dir left
    assert OrtEngine(vdir / "model.onnx")(np.zeros((2, 3, 64, 64), np.float32))["output_0"].shape == (2, 3)


def test_failed_parity_writes_nothing(tmp_path, monkeypatch):
    """If this fails, a model that does not match torch can land in the version dir."""
    import fieldlearn.export.deploy as deploy_mod

    state = loaded_state(tmp_path / "v")

    def broken_parity(*a, **k):
        raise ParityError("output_0 0.5 > 0.001")

    monkeypatch.setattr(deploy_mod, "check_parity", broken_parity)
    with pytest.raises(ParityError):
        export_state(state, engine=False)
    assert list(state.version_dir.iterdir()) == []


def test_forced_engine_without_tensorrt_is_a_user_error(tmp_path):
    """If this fails, --engine on a machine without TensorRT fails late or silently."""
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT is present here")
    with pytest.raises(UserError, match="--engine"):
        export_state(loaded_state(tmp_path / "v"), engine=True)


def test_cli_export_then_classify(tmp_path, capsys):
    """If this fails, the two commands do not fit together on a real state dir: export
    into the current version, classify --state finds and runs it."""
    from fieldlearn.store.state import save_version

    state = loaded_state(tmp_path / "scratch")
    vdir = save_version(tmp_path / "state", state.student, CLASSES, state.config, step=2, history=[])
    assert main(["export", "--state", str(tmp_path / "state"), "--no-engine"]) == 0
    out = capsys.readouterr().out
    assert str(vdir / "model.onnx") in out and "parity vs torch (onnxruntime, random x4)" in out
    assert read_metadata(vdir / "model.onnx")["state_version"] == vdir.name
    assert main(["classify", *photos(tmp_path, 2), "--state", str(tmp_path / "state"), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and {ln.split()[-1] for ln in lines[1:4]} == set(CLASSES)


def test_save_version_publishes_with_its_export(tmp_path):
    """If this fails, the learner cannot publish a version together with its checked ONNX
    (save_version's writers run in the unpublished temp dir)."""
    from fieldlearn.store.state import load_state, save_version

    state = loaded_state(tmp_path / "scratch")
    vdir = save_version(tmp_path / "state", state.student, CLASSES, state.config, step=5, history=[],
                        writers=[export_writer(state.student, CLASSES, 5, engine=False)])
    assert {"model.onnx", "labels.txt"} <= {p.name for p in vdir.iterdir()}
    assert not [p for p in vdir.iterdir() if p.name.startswith(".")]
    assert read_metadata(vdir / "model.onnx")["step"] == 5 and load_state(tmp_path / "state").step == 5


def test_meta_json_and_model_onnx_name_the_same_fieldlearn_version(tmp_path):
    """If this fails, a version's meta.json and its model.onnx disagree about which fieldlearn
    wrote them (two version sources): both must be the package metadata's version."""
    import json
    from importlib.metadata import version

    from fieldlearn.store.state import save_version

    state = loaded_state(tmp_path / "scratch")
    vdir = save_version(tmp_path / "state", state.student, CLASSES, state.config, step=1, history=[],
                        writers=[export_writer(state.student, CLASSES, 1, engine=False)])
    onnx_meta = read_metadata(vdir / "model.onnx")
    assert json.loads((vdir / "meta.json").read_text())["fieldlearn_version"] == version("fieldlearn")
    assert onnx_meta["fieldlearn_version"] == version("fieldlearn")


def test_a_net_that_answers_the_same_for_every_input_is_still_exported(tmp_path):
    """An untrained or collapsed net gives nothing for parity to compare; that must not stop
    init/learn from publishing (it used to escape as a traceback). A real disagreement still
    raises ParityError (test above)."""
    import torch

    from fieldlearn.export.deploy import export_student
    from fieldlearn.device.model import build_student
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    student = build_student(tiny_config().model, 3).eval()
    with torch.no_grad():
        student.head.weight.zero_()          # constant logits whatever the image
    report = export_student(student, ["a", "b", "c"], 0, tmp_path)
    assert report.onnx_path.is_file() and report.notes and "parity not checked" in report.notes[0]
