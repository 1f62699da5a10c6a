"""ONNX export: stable names, self-describing metadata, dynamic batch, parity with torch."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn

from fieldlearn.device.config import ModelConfig
from fieldlearn.device.model import Student
from fieldlearn.export.onnx import (ClassifierGraph, TeacherGraph, check_parity, export_classifier, export_onnx,
                                    export_teacher)
from fieldlearn.runtime.engines import OrtEngine, ParityError
from fieldlearn.runtime.metadata import model_info, read_labels, read_metadata

CFG = ModelConfig(pretrained=False, width=0.5, input_size=64, freeze_blocks=14, classifier="linear")
STATS_CFG = ModelConfig(pretrained=False, width=0.5, input_size=64, freeze_blocks=14, classifier="analytic",
                        features="concat")
CLASSES = ["cat", "dog", "fox", "owl"]


def warmed_student(cfg: ModelConfig = CFG, num_classes: int = len(CLASSES), seed: int = 0) -> Student:
    """A random student whose BatchNorm statistics come from data: its eval-mode outputs
    depend on the input (a fresh one outputs its head bias whatever the image)."""
    torch.manual_seed(seed)
    s = Student(cfg, num_classes)
    bns = [m for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the warm-up batches
        m.train()
    with torch.no_grad():
        s(torch.randn(16, 3, cfg.input_size, cfg.input_size))
    for m in bns:
        m.momentum = 0.1
    return s.eval()


def x(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, CFG.input_size, CFG.input_size, generator=torch.Generator().manual_seed(seed))


def test_classifier_has_jetson_names_dynamic_batch_and_metadata(tmp_path):
    """If this fails, jetson-inference / classify cannot load the file or name its classes."""
    path = export_classifier(warmed_student(), tmp_path, classes=CLASSES, step=3)
    assert path == tmp_path / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input_0"]
    assert [o.name for o in model.graph.output] == ["output_0"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert model.opset_import[0].version == 17

    meta = read_metadata(path)
    assert meta["classes"] == CLASSES and meta["step"] == 3 and meta["input_size"] == 64
    assert meta["mean"] == list(CFG.mean) and meta["std"] == list(CFG.std)
    assert meta["fieldlearn_version"] and meta["graph"] == "classifier"
    info = model_info(path)
    assert info.classes == CLASSES and info.input_size == 64
    assert read_labels(tmp_path / "labels.txt") == CLASSES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt", "model.onnx"]  # no temp files left


def test_onnxruntime_matches_torch_for_any_batch(tmp_path):
    """If this fails, the exported graph computes something else than the student (or its
    batch axis is fixed)."""
    student = warmed_student()
    path = export_classifier(student, tmp_path, classes=CLASSES, step=0)
    engine = OrtEngine(path, threads=1)
    for b in (1, 3, 9):
        assert engine(x(b).numpy())["output_0"].shape == (b, len(CLASSES))
    errors = check_parity(ClassifierGraph(student), path, x(6), rtol=1e-4)
    assert errors["output_0"] < 1e-4


def test_parity_check_catches_a_different_model(tmp_path):
    """If this fails, the parity check passes whatever is in the file."""
    student = warmed_student()
    path = export_classifier(student, tmp_path, classes=CLASSES, step=0)
    with torch.no_grad():
        student.top[-1][0].weight.mul_(1.01)  # 1% change in the last conv
    with pytest.raises(ParityError, match="relative error"):
        check_parity(ClassifierGraph(student), path, x(4), rtol=1e-4)


def test_parity_check_refuses_an_untrained_net(tmp_path):
    """If this fails, parity on a fresh eval-mode net (constant outputs) would pass
    trivially and prove nothing."""
    torch.manual_seed(0)
    fresh = Student(CFG, len(CLASSES)).eval()
    path = export_classifier(fresh, tmp_path, classes=CLASSES, step=0)
    with pytest.raises(ParityError, match="same for every input"):
        check_parity(ClassifierGraph(fresh), path, x(4), rtol=1e-3)


def test_teacher_graph_gives_logits_and_features_from_z(tmp_path):
    """If this fails, the teacher engine cannot stand in for the torch teacher."""
    student = warmed_student()
    path = export_teacher(student, tmp_path / "teacher.onnx", step=2)
    engine = OrtEngine(path, threads=1)
    assert engine.input_names == ["z"] and engine.output_names == ["logits", "features"]
    z = student.encode(x(5))                                       # [5, 48, 4, 4]
    out = engine(z)
    assert isinstance(out["logits"], torch.Tensor)                 # torch in -> torch out
    assert tuple(out["features"].shape) == (5, 1280, 2, 2)
    errors = check_parity(TeacherGraph(student), path, z, rtol=1e-4)
    assert set(errors) == {"logits", "features"}
    assert read_metadata(path)["graph"] == "teacher"


def test_export_restores_each_modules_train_flag(tmp_path):
    """If this fails, exporting mid-training would unfreeze BatchNorm (model.train(True)
    undoes freeze_bn) or leave dropout off."""
    student = warmed_student().train()
    student.freeze_bn()
    before = {name: m.training for name, m in student.named_modules()}
    export_classifier(student, tmp_path, classes=CLASSES, step=0)
    assert {name: m.training for name, m in student.named_modules()} == before


def test_failed_export_leaves_the_old_file(tmp_path):
    """If this fails, a crash or error during export can leave a truncated model.onnx."""
    student = warmed_student()
    path = export_classifier(student, tmp_path, classes=CLASSES, step=0)
    old = path.read_bytes()

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(Broken(), path, (1, 3, 8, 8), metadata={}, output_names=["output_0"])
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt", "model.onnx"]


def test_class_names_must_match_the_head(tmp_path):
    """If this fails, a model could ship with labels for the wrong outputs."""
    with pytest.raises(ValueError, match="class names"):
        export_classifier(warmed_student(), tmp_path, classes=CLASSES[:2], step=0)


def _fitted(cfg: ModelConfig) -> Student:
    """A warmed student whose head is solved from class statistics of random images."""
    from fieldlearn.device.config import RunConfig, TrainConfig
    from fieldlearn.device.data import ImageSet
    from fieldlearn.device.learner import fit_classifier

    student = warmed_student(cfg)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (24, 3, 64, 64), dtype=torch.uint8, generator=g)
    run = RunConfig(model=cfg, train=TrainConfig(progress=False, trunk_backend="torch"))
    fit_classifier(student, ImageSet(images, torch.arange(24) % 4, CLASSES), list(range(4)), run)
    return student.eval()


@pytest.mark.parametrize("classifier", ["analytic", "ncm", "lda"])
def test_a_head_solved_from_statistics_is_a_plain_layer_of_the_onnx_model(tmp_path, classifier):
    """If this fails, model.onnx serves the trained linear head (or nothing sensible) instead
    of the classifier the learner chose, and classify / TensorRT / jetson-inference would
    not get the model that was evaluated."""
    cfg = ModelConfig(**{**STATS_CFG.__dict__, "classifier": classifier})
    student = _fitted(cfg)
    path = export_classifier(student, tmp_path, classes=CLASSES, step=1)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"Gemm"} <= ops or {"MatMul"} <= ops
    errors = check_parity(ClassifierGraph(student), path, x(5), rtol=1e-4)
    assert errors["output_0"] < 1e-4
    out = OrtEngine(path, threads=1)(x(5).numpy())["output_0"]
    with torch.no_grad():
        solved = student.predict(x(5))[1]
        trained = student(x(5))[1]
    assert torch.allclose(torch.from_numpy(out), solved, atol=1e-4 * float(solved.abs().max()))
    assert not torch.allclose(solved, trained, atol=1e-3), "the solved head, not the trained one, is exported"


def test_the_exported_head_carries_the_calibration_temperature():
    """If this fails, model.onnx and classify serve the uncalibrated head: the solved head must be
    loaded divided by the temperature the statistics carry (and that temperature was fitted)."""
    from fieldlearn.device.classifier import solve_head

    cfg = ModelConfig(**{**STATS_CFG.__dict__, "classifier": "lda"})
    student = _fitted(cfg)
    t = student.stats.temperature
    w, b, _ = solve_head(student.stats, "lda", shrink=student.stats.shrink(cfg.shrink))
    assert t != 1.0
    assert torch.allclose(student.classifier.weight.double(), w / t, rtol=1e-4, atol=1e-6)
    assert torch.allclose(student.classifier.bias.double(), b / t, rtol=1e-4, atol=1e-6)
