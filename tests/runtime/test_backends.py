"""One chooser picks every backend (fieldlearn.runtime.backends.pick_backend): the model's
engine (classify), the teacher and the trunk. If a test here fails, a caller picks for
itself again, and "auto" can mean different things in different places."""

from __future__ import annotations

import pytest

from fieldlearn.runtime import backends
from fieldlearn.runtime.errors import UserError


def _only(monkeypatch, *here: str) -> None:
    monkeypatch.setattr(backends, "unavailable_reason", lambda b: None if b in here else f"no {b} here")


def test_auto_takes_the_first_backend_that_runs_and_a_named_one_or_says_why(monkeypatch):
    _only(monkeypatch, "onnxruntime", "torch")
    assert backends.pick_backend("auto") == "onnxruntime"
    assert backends.pick_backend("torch") == "torch"
    with pytest.raises(UserError, match=r"^--x tensorrt: no tensorrt here$"):
        backends.pick_backend("tensorrt", option="--x")
    with pytest.raises(UserError, match=r"unknown \(choose auto, onnxruntime\)"):
        backends.pick_backend("torch", ("onnxruntime",))
    _only(monkeypatch)
    with pytest.raises(UserError, match="no backend can run here"):
        backends.pick_backend("auto", ("tensorrt", "onnxruntime"))


def test_the_model_engine_asks_the_one_chooser(monkeypatch, tmp_path):
    from fieldlearn.runtime import engines

    asked = []

    def refuse(prefer, order=backends.BACKENDS, device="cpu", option="--backend"):
        asked.append((prefer, tuple(order)))
        raise UserError("stop")

    monkeypatch.setattr(backends, "pick_backend", refuse)
    with pytest.raises(UserError, match="stop"):
        engines.best_engine(tmp_path / "model.onnx", "auto")
    assert asked == [("auto", ("tensorrt", "onnxruntime"))]


def test_engine_teacher_and_trunk_ask_the_one_chooser(monkeypatch):
    pytest.importorskip("torch")
    from fieldlearn.device import engine_teacher, trunk_encoder

    asked = []
    monkeypatch.setattr(backends, "pick_backend", lambda prefer, order=backends.BACKENDS, device="cpu",
                        option="--backend": asked.append((prefer, tuple(order), option)) or order[-1])
    assert engine_teacher.pick_backend("cpu") == "torch"
    assert trunk_encoder.resolve("auto", "cpu") == "torch"
    assert asked == [("auto", ("tensorrt", "onnxruntime", "torch"), "--teacher-backend"),
                     ("auto", ("onnxruntime", "torch"), "--trunk-backend")]
