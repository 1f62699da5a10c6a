"""Engines behave like a model and agree with each other on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from fieldlearn.export.onnx import export_onnx
from fieldlearn.runtime.cuda import tensorrt_unavailable_reason
from fieldlearn.runtime.engines import OrtEngine, ParityError, TorchEngine, best_engine, cross_validate
from fieldlearn.runtime.errors import UserError

NO_TRT = tensorrt_unavailable_reason()


class TwoHeads(nn.Module):
    """A small conv net with two outputs, like the teacher graph: (logits, features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        feats = self.body(x)                      # [B, 16, 8, 8]
        return self.head(feats.mean((2, 3))), feats


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = TwoHeads().eval()
    path = export_onnx(model, tmp_path_factory.mktemp("m") / "m.onnx", (1, 3, 16, 16),
                       metadata={"note": "test"}, output_names=["logits", "features"])
    return model, path


def batch(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_onnxruntime_and_torch_engines_agree(exported):
    """If this fails, the ONNX file and the torch module compute different things."""
    model, path = exported
    ort_engine, torch_engine = OrtEngine(path, threads=1), TorchEngine(model, ["logits", "features"])
    errors = cross_validate(ort_engine, torch_engine, batch(), rtol=1e-5)
    assert set(errors) == {"logits", "features"}


def test_numpy_in_numpy_out_torch_in_torch_out(exported):
    """If this fails, the learner's teacher path (torch) or classify (numpy) gets the wrong type."""
    model, path = exported
    engine = OrtEngine(path, threads=1)
    out = engine(batch(3))
    assert list(out) == ["logits", "features"]
    assert isinstance(out["logits"], np.ndarray) and out["logits"].shape == (3, 5)
    out_t = engine(torch.from_numpy(batch(3)))
    assert isinstance(out_t["features"], torch.Tensor) and out_t["features"].shape == (3, 16, 8, 8)
    np.testing.assert_allclose(out_t["logits"].numpy(), out["logits"], rtol=1e-6)
    assert engine({"input_0": batch(2)})["logits"].shape == (2, 5)      # named inputs work too
    with pytest.raises(ValueError, match="input_0"):
        engine({"x": batch(2)})


def test_onnxruntime_does_not_spin(exported):
    """If this fails, ORT's idle threads spin and steal the cores torch trains on."""
    _, path = exported
    engine = OrtEngine(path, threads=1)
    so = engine.session.get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1


def test_cross_validate_reports_a_mismatch(exported):
    """If this fails, cross_validate cannot tell two different models apart."""
    model, path = exported
    other = TwoHeads().eval()
    with torch.no_grad():
        other.head.bias.add_(0.5)
    with pytest.raises(ParityError, match="logits"):
        cross_validate(OrtEngine(path, threads=1), TorchEngine(other, ["logits", "features"]), batch(), rtol=1e-3)


def test_best_engine_without_tensorrt_is_onnxruntime(exported):
    """If this fails, classify picks an engine that cannot run here, or hides why."""
    if NO_TRT is None:
        pytest.skip("TensorRT is present: best_engine picks it")
    _, path = exported
    assert best_engine(path).backend == "onnxruntime"
    with pytest.raises(UserError, match="--backend tensorrt"):
        best_engine(path, prefer="tensorrt")
    with pytest.raises(UserError, match="unknown"):
        best_engine(path, prefer="cuda")


def test_unloadable_model_is_a_user_error(tmp_path):
    """If this fails, a corrupt model.onnx gives a traceback instead of a message naming it."""
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="model.onnx"):
        OrtEngine(bad)
