"""The LAD op: its PyTorch reference and the dispatcher in front of the fused kernel.

The fused kernel itself is tested in test_cuda_attention.py; the Grad-CAM oracle elsewhere.
"""

from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

ad = importlib.import_module("fieldlearn.device.ops.attention_distill")
ops_pkg = importlib.import_module("fieldlearn.device.ops")


def _inputs(B=3, C=5, h=3, w=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(B, C, h, w, generator=g, dtype=dtype)
    ws = torch.randn(B, C, generator=g, dtype=dtype)
    qt = F.normalize(torch.randn(B, h * w, generator=g, dtype=torch.float64).relu(), dim=1).to(dtype)
    return feat, ws, qt


def test_ref_gradcheck_float64():
    """If this fails, the reference's gradient (what every kernel is compared with) is wrong."""
    feat, ws, qt = _inputs()
    feat.requires_grad_(True)
    ws.requires_grad_(True)
    assert torch.autograd.gradcheck(ad.attention_distill_ref, (feat, ws, qt), eps=1e-6, atol=1e-7)


def test_ref_gradcheck_float64_with_teacher_map_gradient():
    """q_t is normally a constant, but the reference must stay differentiable in it too."""
    feat, ws, qt = _inputs(B=2, C=4, h=2, w=3, seed=1)
    for t in (feat, ws, qt):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(ad.attention_distill_ref, (feat, ws, qt), eps=1e-6, atol=1e-7)


def test_ref_known_value():
    """One sample worked by hand: c = [4, 1], q = c / sqrt(17), q_t = [1, 0]."""
    feat = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])      # [1, 2, 1, 2]
    ws = torch.tensor([[1.0, 1.0]])
    qt = torch.tensor([[1.0, 0.0]])
    want = abs(4 / math.sqrt(17) - 1) + 1 / math.sqrt(17)
    assert ad.attention_distill_ref(feat, ws, qt).item() == pytest.approx(want, rel=1e-6)


def test_ref_batch_mean():
    """LAD is the mean over samples of per-sample L1 distances, not their sum."""
    feat, ws, qt = _inputs(B=4, dtype=torch.float32)
    per = torch.stack([ad.attention_distill_ref(feat[i:i + 1], ws[i:i + 1], qt[i:i + 1]) for i in range(4)])
    assert ad.attention_distill_ref(feat, ws, qt).item() == pytest.approx(per.mean().item(), rel=1e-6)


def test_ref_all_zero_map_has_finite_loss_and_zero_gradient():
    """A map that ReLU zeroes everywhere must not divide by zero: loss = sum |q_t|, gradient 0."""
    feat, ws, qt = _inputs(dtype=torch.float32)
    feat = feat.abs().requires_grad_(True)
    ws = (-ws.abs()).requires_grad_(True)
    loss = ad.attention_distill_ref(feat, ws, qt)
    loss.backward()
    assert loss.item() == pytest.approx(qt.abs().sum(1).mean().item(), rel=1e-6)
    assert feat.grad.abs().max() == 0 and ws.grad.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ref_accumulates_in_float32(dtype):
    """Half-precision features must give a float32 loss (accumulated in float32), float64 stays float64."""
    feat, ws, qt = _inputs(dtype=dtype)
    assert ad.attention_distill_ref(feat, ws, qt).dtype == torch.float32
    f64 = _inputs(dtype=torch.float64)
    assert ad.attention_distill_ref(*f64).dtype == torch.float64


@pytest.mark.parametrize("bad, match", [
    (lambda f, w, q: (f[0], w, q), r"feat_s must be \[B, C, h, w\]"),
    (lambda f, w, q: (f, w[:, :-1], q), r"w_s must be \[B, C\]"),
    (lambda f, w, q: (f, w[:-1], q), r"w_s must be \[B, C\]"),
    (lambda f, w, q: (f, w, q[:, :-1]), r"q_t must be \[B, h\*w\]"),
    (lambda f, w, q: (f, w, q.reshape(q.shape[0], 3, -1)), r"q_t must be \[B, h\*w\]"),
])
def test_shape_errors_name_the_expected_shape(bad, match):
    feat, ws, qt = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        ad.attention_distill(*bad(feat, ws, qt))


class _FakeCuda(torch.Tensor):
    """CPU tensor that claims to be on CUDA: drives the dispatcher's CUDA branch on a CPU."""

    @property
    def is_cuda(self):
        return True


def _spy_module(monkeypatch, available=True):
    """Replace fieldlearn.device.ops.cuda_attention (and the Function that launches its kernels)
    with a spy that records kernel calls."""
    calls = []

    class Fn:
        @staticmethod
        def apply(f, w, q):
            calls.append(f.shape)
            return ad.attention_distill_ref(f, w, q) * 0 + 123.0

    spy = types.SimpleNamespace(available=lambda: available)
    monkeypatch.setitem(sys.modules, "fieldlearn.device.ops.cuda_attention", spy)
    monkeypatch.setattr(ops_pkg, "cuda_attention", spy, raising=False)
    monkeypatch.setattr(ad, "AttentionDistillFn", Fn)   # the Function sits beside the dispatcher
    return calls


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    """CPU tensors must never reach the kernel module (it must not even be imported for them)."""
    poison = types.ModuleType("poison")
    poison.__getattr__ = lambda name: (_ for _ in ()).throw(AssertionError(f"touched cuda_attention.{name}"))
    monkeypatch.setitem(sys.modules, "fieldlearn.device.ops.cuda_attention", poison)
    monkeypatch.setattr(ops_pkg, "cuda_attention", poison, raising=False)
    feat, ws, qt = _inputs(dtype=torch.float32)
    assert torch.equal(ad.attention_distill(feat, ws, qt), ad.attention_distill_ref(feat, ws, qt))


def test_dispatcher_sends_cuda_tensors_to_the_kernel(monkeypatch):
    monkeypatch.delenv("FIELDLEARN_FORCE_REF", raising=False)
    calls = _spy_module(monkeypatch)
    feat, ws, qt = _inputs(dtype=torch.float32)
    assert ad.attention_distill(feat.as_subclass(_FakeCuda), ws, qt).item() == 123.0
    assert len(calls) == 1


def test_dispatcher_falls_back_when_kernel_unavailable(monkeypatch):
    monkeypatch.delenv("FIELDLEARN_FORCE_REF", raising=False)
    calls = _spy_module(monkeypatch, available=False)
    feat, ws, qt = _inputs(dtype=torch.float32)
    out = ad.attention_distill(feat.as_subclass(_FakeCuda), ws, qt)
    assert calls == [] and out.item() == pytest.approx(ad.attention_distill_ref(feat, ws, qt).item())


@pytest.mark.parametrize("value, forced", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_force_ref_env_is_respected(monkeypatch, value, forced):
    """FIELDLEARN_FORCE_REF=1 must keep CUDA tensors on the reference (debugging switch)."""
    monkeypatch.setenv("FIELDLEARN_FORCE_REF", value)
    calls = _spy_module(monkeypatch)
    feat, ws, qt = _inputs(dtype=torch.float32)
    ad.attention_distill(feat.as_subclass(_FakeCuda), ws, qt)
    assert ad.force_ref() is forced
    assert (calls == []) is forced
