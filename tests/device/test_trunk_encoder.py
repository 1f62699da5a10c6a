"""The frozen trunk in ONNX Runtime (TrainConfig.trunk_backend) gives torch's z."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_config


def _student_with_real_statistics():
    """A tiny student whose BatchNorm statistics are not the init's (an untrained net in eval
    mode maps everything to nearly the same output, which would make any parity check pass)."""
    from fieldlearn.device.model import build_student

    cfg = tiny_config()
    torch.manual_seed(0)
    s = build_student(cfg.model, 4)
    for m in s.trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return cfg, s.eval()


def _images(n=40, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_onnxruntime_trunk_matches_torch():
    """encode() through ONNX Runtime must give torch's z to float32 rounding, or training
    on it is training on different data."""
    from fieldlearn.device.learner import encode

    cfg, s = _student_with_real_statistics()
    torch_cfg, ort_cfg = copy.deepcopy(cfg), copy.deepcopy(cfg)
    torch_cfg.train.trunk_backend, ort_cfg.train.trunk_backend = "torch", "onnxruntime"
    x = _images()
    zt, zo = encode(s, x, torch_cfg), encode(s, x, ort_cfg)
    assert zt.shape == zo.shape and zt.abs().max() > 0.1
    assert float((zt - zo).abs().max() / zt.abs().max()) < 1e-4
    assert zt.std(0).mean() > 1e-3          # the inputs really give different z


def test_evaluation_through_onnxruntime_trunk_predicts_like_torch():
    from fieldlearn.device.learner import predict_logits

    cfg, s = _student_with_real_statistics()
    torch_cfg, ort_cfg = copy.deepcopy(cfg), copy.deepcopy(cfg)
    torch_cfg.train.trunk_backend, ort_cfg.train.trunk_backend = "torch", "onnxruntime"
    x = _images()
    torch.testing.assert_close(predict_logits(s, x, ort_cfg), predict_logits(s, x, torch_cfg), rtol=1e-4, atol=1e-5)


def test_exported_trunk_follows_the_weights():
    """The ONNX graph is cached on the student: a change of the trunk's weights (a loaded
    state, another base model) must be seen, not served from the cache."""
    from fieldlearn.device.learner import encode

    cfg, s = _student_with_real_statistics()
    cfg.train.trunk_backend = "onnxruntime"
    x = _images(8)
    z1 = encode(s, x, cfg)
    with torch.no_grad():
        s.trunk[0][0].weight.mul_(2.0)
    z2 = encode(s, x, cfg)
    ref = copy.deepcopy(cfg)
    ref.train.trunk_backend = "torch"
    assert not torch.allclose(z1, z2)
    torch.testing.assert_close(z2, encode(s, x, ref), rtol=1e-4, atol=1e-5)


def test_auto_picks_onnxruntime_on_cpu_only():
    from fieldlearn.device.trunk_encoder import resolve
    from fieldlearn.runtime.errors import UserError

    assert resolve("auto", "cpu") == "onnxruntime"
    assert resolve("auto", "cuda:0") == "torch"
    assert resolve("torch", "cpu") == "torch"
    with pytest.raises(UserError):
        resolve("tensorrt", "cpu")
