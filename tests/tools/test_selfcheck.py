"""The one-call self-check (python -m fieldlearn.tools.selfcheck): its CPU-side parts, and
its GPU-side code paths run on the CPU with the pure-torch kernel contract standing in."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

sc = importlib.import_module("fieldlearn.tools.selfcheck")
ca = importlib.import_module("fieldlearn.device.ops.cuda_attention")
ad = importlib.import_module("fieldlearn.device.ops.attention_distill")

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_plumbing_goes_through_the_dispatcher_and_matches_reference():
    """If this fails, the autograd.Function (contiguity, dtype casts, saved state, gradient
    routing) disagrees with attention_distill_ref, or the dispatcher bypasses it."""
    rows = sc.plumbing_check()
    assert len(rows) >= 10
    for r in rows:
        assert r["routed"], r
        assert r["ok"], r


def test_make_inputs_avoids_ties():
    """Parity inputs must keep the ReLU mask and sign() away from their kinks, or float32 vs
    float64 differences would flip whole gradient columns and fail correct kernels."""
    feat, w, qt = sc.make_inputs(64, 320, 49, torch.float16, seed=3)
    cam = torch.einsum("bc,bcj->bj", w.double(), feat.double().flatten(2))
    rms = cam.pow(2).mean(1, keepdim=True).sqrt()
    assert (cam.abs() >= 1e-3 * rms).all()
    assert feat.dtype == w.dtype == torch.float16 and qt.dtype == torch.float32
    assert torch.allclose(qt.norm(dim=1), torch.ones(64))


def test_gpu_code_paths_with_a_cpu_stand_in():
    """parity_case / parity_grid / determinism / timing logic, run with TorchKernelBackend on
    the CPU so that the code the GPU run depends on is exercised here."""
    backend = ad.TorchKernelBackend()

    def public(f, w, q):
        with ca.use_backend(backend):
            return ad.AttentionDistillFn.apply(f, w, q)

    rows = sc.parity_grid(backend, "cpu", grid_b=(1, 3), grid_c=(16,), grid_hw=(16, 49), public=public)
    assert len(rows) == 3 * 2 * 2 + 2 * 2
    assert all(r["ok"] and r["coverage"] and r["public_bitwise"] for r in rows), [r for r in rows if not r["ok"]]
    det = sc.determinism_check(backend, "cpu", B=2, C=8, hw=16, runs=2)
    assert all(r["ok"] for r in det)
    timer = sc.Timer(torch.device("cpu"))
    row = sc.timing_case(backend, "cpu", 4, 32, 49, torch.float32, timer, bandwidth=1e10, public=public, iters=2)
    for k in ("fused_device_us", "ref_device_us", "kernels_device_us", "floor_us", "ratio_to_floor", "speedup_wall"):
        assert row[k] > 0, (k, row)
    assert row["bytes_must_move"] == 3 * 4 * 32 * 49 * 4 + 3 * 4 * 32 * 4 + 2 * 4 * 49 * 4


def test_parity_case_catches_a_wrong_kernel():
    """A backend that drops one output element must be reported (NaN coverage), and one with a
    wrong gradient must fail parity."""
    class Lazy(ad.TorchKernelBackend):
        def backward(self, feat, w, qt, cam, stats, grad, out=None):
            dfeat, dw = super().backward(feat, w, qt, cam, stats, grad, out=out)
            dfeat.view(-1)[-1] = float("nan")               # "forgot" the last element
            return dfeat, dw

    class Wrong(ad.TorchKernelBackend):
        def backward(self, feat, w, qt, cam, stats, grad, out=None):
            dfeat, dw = super().backward(feat, w, qt, cam, stats, grad, out=out)
            dw.mul_(1.01)
            return dfeat, dw

    feat, w, qt = sc.make_inputs(3, 16, 16, torch.float32)
    assert not sc.parity_case(Lazy(), feat, w, qt, public=_fn(Lazy()))["coverage"]
    row = sc.parity_case(Wrong(), feat, w, qt, public=_fn(Wrong()))
    assert not row["ok"] and row["dw_rel"] > 1e-3


def _fn(backend):
    def public(f, w, q):
        with ca.use_backend(backend):
            return ad.AttentionDistillFn.apply(f, w, q)
    return public


def test_train_step_report_times_the_learners_own_step(monkeypatch):
    """The self-check's training step is the learner's (one copy of the step): every timed
    step goes through fieldlearn.device.learner.optimizer_step, and LwM's terms are there."""
    from fieldlearn.device import learner

    calls = []
    real = learner.optimizer_step
    monkeypatch.setattr(learner, "optimizer_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    r = sc.train_step_report("cpu", batch=4, size=64, steps=2)   # 2 x 2 maps
    assert r["ok"], r
    assert len(calls) == 4                                   # 2 steps x (finetune, lwm)
    assert r["lwm"]["lad"] > 0 and r["lwm"]["ld"] > 0 and "lad" not in r["finetune"]


@no_gpu
def test_cli_cpu_only_says_gpu_parts_skipped(tmp_path):
    """The CPU-only run must pass its CPU parts, write JSON, and say clearly why the GPU parts
    did not run (the table is printed last)."""
    out = tmp_path / "sc.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FIELDLEARN_FORCE_REF", None)
    proc = subprocess.run([sys.executable, "-m", "fieldlearn.tools.selfcheck", "--out", str(out), "--no-compile"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["gpu"]["ran"] is False
    assert "torch.cuda.is_available() is False" in rep["gpu"]["skipped"]
    assert "parity" not in rep and "timing" not in rep
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("GPU parts SKIPPED: torch.cuda.is_available() is False") for line in lines)
    assert lines[-1].startswith("overall: OK")


def test_force_ref_skips_gpu_parts(monkeypatch):
    monkeypatch.setenv("FIELDLEARN_FORCE_REF", "1")
    assert "FIELDLEARN_FORCE_REF" in sc.gpu_skip_reason()


def test_table_renders_a_gpu_report():
    """The table must render every section of a GPU run's report (numbers made up)."""
    t = dict(B=64, C=1280, hw=49, dtype="fp32", fused_device_us=25.0, ref_device_us=120.0, kernels_device_us=22.0,
             fused_wall_us=60.0, ref_wall_us=400.0, speedup_device=4.8, speedup_wall=6.7, floor_us=17.0,
             ratio_to_floor=1.47, kernels_ratio_to_floor=1.3, bytes_must_move=1)
    p = dict(B=64, C=1280, hw=49, dtype="fp32", w_dtype="fp32", coverage=True, loss_rel=1e-7, dfeat_rel=1e-6,
             dw_rel=1e-6, public_bitwise=True, ok=True)
    rep = dict(date="d", torch="t", device=dict(name="NVIDIA H100", capability="9.0"), plumbing=[dict(ok=True)],
               gpu=dict(ran=True, skipped=None), parity=[p], determinism=[dict(dtype="fp32", ok=True)],
               copy_bandwidth_GBps=2900.0, timing=[t],
               train_step=dict(device="cuda", student="mobilenet_v2, random weights", batch=64,
                               lwm=dict(ms=5.0, peak_mib=300.0), finetune=dict(ms=4.0, peak_mib=280.0)),
               ok=True, seconds=12.0)
    text = sc.table(rep)
    assert "NVIDIA H100 (sm_90)" in text and "1/1 ok" in text and "1.47x" in text and "peak 300 MiB" in text
    assert text.splitlines()[-1] == "overall: OK in 12.0 s"
