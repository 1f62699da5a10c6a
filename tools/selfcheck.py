"""One-call self-check of the fused attention-distillation kernel (issue 5).

    python -m fieldlearn.tools.selfcheck [--out FILE.json] [--quick] [--no-compile]

On a CUDA machine (H100/H200, Jetson Orin), in one call of a few minutes:
  1. parity: forward loss and both gradients of the fused kernels against attention_distill_ref
     in float64 on fresh inputs, for B in {1, 7, 64, 256} x C in {320, 1280} x h*w in
     {16, 49, 64, 196} x features fp32/fp16/bf16 (head rows of the same dtype; plus fp16/bf16
     features with fp32 head rows, as under autocast). Every output and the workspace are
     NaN-filled first and must be fully overwritten; the public dispatcher's result must equal
     the direct kernel result bit for bit;
  2. determinism: five runs bitwise equal;
  3. timing: CUDA-event medians of fused vs reference forward+backward. "device": GPU time
     alone (a queued sleep hides the host's launch work); "wall": per iteration of a loop,
     launch overhead included. Bandwidth floor = bytes that must move / measured
     device-to-device copy bandwidth, and the fused kernels' ratio to it;
  4. one LwM training step vs one fine-tune step (time, peak memory) on a small stand-in net;
  5. JSON to --out, a short table printed last. Exit status 1 when a check fails.

On a CPU-only machine it runs the CPU-side parts: the autograd.Function plumbing against the
reference through the dispatcher (TorchKernelBackend standing in for the kernels), NVRTC
compilation for sm_87 and sm_90 with a spill check, the training step on the CPU; and says
which GPU parts were skipped and why.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from fieldlearn.device.attention import class_map, l2_normalize
from fieldlearn.device.ops import cuda_attention
from fieldlearn.device.ops.attention_distill import TorchKernelBackend, attention_distill, attention_distill_ref

GRID_B = (1, 7, 64, 256)
GRID_C = (320, 1280)
GRID_HW = (16, 49, 64, 196)          # square maps: 4x4, 7x7, 8x8, 14x14
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# max |x - ref| / max |ref| against float64. The loss is float32 whatever the input dtype;
# gradients are rounded to the input dtype (fp16: 2^-11, bf16: 2^-8 relative).
TOL_LOSS = 2e-5
TOL_GRAD = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TARGET = dict(B=64, C=1280, hw=49)   # issue 5: >= 3x faster than _ref, within 2x of the floor

_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# ----------------------------------------------------------------------------- inputs

def make_inputs(B: int, C: int, hw: int, dtype: torch.dtype, w_dtype: torch.dtype | None = None,
                device: Any = "cpu", seed: int = 0, margin: float = 1e-3) -> tuple[torch.Tensor, ...]:
    """feat [B, C, h, w] (>= 0, like post-ReLU features), w [B, C], q_t [B, hw] float32, L2-normalised.

    Samples whose map has a near-tie are redrawn: |cam_j| < margin * rms(cam) (the ReLU mask
    could flip between float32 and float64) or |q_j - qt_j| < margin / 10 where not both are 0
    (sign() could flip). Exact ties are a property of L1 + ReLU, not of the kernel.
    """
    h = int(math.isqrt(hw))
    hh, ww = (h, h) if h * h == hw else (1, hw)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w_dtype = w_dtype or dtype

    def draw_feat(n):   # drawn on the CPU (same values on every machine), checked on `device`
        return torch.randn(n, C, hh, ww, generator=gen).abs().to(dtype).to(device)

    def draw_w(n):
        return torch.randn(n, C, generator=gen).to(w_dtype).to(device)

    def draw_qt(n):
        return F.normalize(torch.randn(n, hw, generator=gen).relu(), dim=1).to(device)

    feat, w, qt = draw_feat(B), draw_w(B), draw_qt(B)
    for _ in range(50):
        cam = class_map(feat.double(), w.double())                             # [B, hw]
        rms = cam.pow(2).mean(1, keepdim=True).sqrt()
        bad_c = (cam.abs() < margin * rms).any(1)
        r = cam.relu()
        q = l2_normalize(r)
        both_zero = (q == 0) & (qt == 0)
        bad_q = (((q - qt.double()).abs() < margin / 10) & ~both_zero).any(1)
        del cam, r, q
        n_c, n_q = int(bad_c.sum()), int(bad_q.sum())
        if not (n_c or n_q):
            break
        if n_c:
            feat[bad_c], w[bad_c] = draw_feat(n_c), draw_w(n_c)
        if n_q:
            qt[bad_q] = draw_qt(n_q)
    return feat, w, qt


def below_eps(feat: torch.Tensor, w: torch.Tensor, target: float = 3e-13) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale feat and w (by the same factor) so that every sample's ||relu(cam)|| is at most
    `target` < eps: the normalisation is clamped, yet q = r / eps stays O(1), so a gradient
    through the clamp (which must be zero) would show."""
    cam = class_map(feat.double(), w.double()).relu()
    s = math.sqrt(target / cam.norm(dim=1).max().item())
    return (feat.double() * s).to(feat.dtype), (w.double() * s).to(w.dtype)


def ref64(feat: torch.Tensor, w: torch.Tensor, qt: torch.Tensor, g: float = 1.0):
    """attention_distill_ref in float64 on the same (already rounded) inputs: (loss, dfeat, dw)."""
    f = feat.double().requires_grad_(True)
    ww = w.double().requires_grad_(True)
    loss = attention_distill_ref(f, ww, qt.double())
    df, dw = torch.autograd.grad(loss, (f, ww), grad_outputs=torch.tensor(g, dtype=torch.float64, device=loss.device))
    return loss.detach(), df, dw


def relerr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (absolute error where ref is all zero)."""
    x = x.detach().as_subclass(torch.Tensor).double()
    ref = ref.detach().as_subclass(torch.Tensor).double()
    err = (x - ref).abs().max().item() if x.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return err / scale if scale > 0 else err


# ----------------------------------------------------------------------------- CPU stand-in

class FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so that the dispatcher's CUDA branch
    (available() -> AttentionDistillFn) runs on a machine without a GPU."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


class CountingBackend(TorchKernelBackend):
    """TorchKernelBackend that counts its calls (proves the Function really ran)."""

    def __init__(self) -> None:
        self.calls = {"forward": 0, "backward": 0}

    def forward(self, *a, **k):
        self.calls["forward"] += 1
        return super().forward(*a, **k)

    def backward(self, *a, **k):
        self.calls["backward"] += 1
        return super().backward(*a, **k)


@contextlib.contextmanager
def cpu_stand_in(backend: Any) -> Iterator[Any]:
    """Route the dispatcher's CUDA branch to `backend` for FakeCuda tensors (CPU plumbing)."""
    saved = cuda_attention.available
    cuda_attention.available = lambda: True  # type: ignore[assignment]
    try:
        with cuda_attention.use_backend(backend):
            yield backend
    finally:
        cuda_attention.available = saved  # type: ignore[assignment]


def plumbing_check(seed: int = 0) -> list[dict[str, Any]]:
    """The public attention_distill, dispatched to AttentionDistillFn with the pure-torch kernel
    contract standing in for the kernels, against attention_distill_ref (same precision)."""
    cases: list[tuple[str, tuple[int, int, int], torch.dtype, torch.dtype | None]] = [
        ("fp32", (1, 32, 16), torch.float32, None),
        ("fp32", (7, 40, 49), torch.float32, None),
        ("fp32", (3, 24, 196), torch.float32, None),
        ("fp16", (7, 40, 49), torch.float16, None),
        ("bf16", (7, 40, 49), torch.bfloat16, None),
        ("fp16 features, fp32 head", (5, 24, 64), torch.float16, torch.float32),
        ("fp32 features, fp16 head", (5, 24, 64), torch.float32, torch.float16),
        ("non-contiguous features", (4, 24, 49), torch.float32, None),
        ("all-zero map", (3, 16, 16), torch.float32, None),
        ("map below eps", (3, 16, 16), torch.float32, None),
    ]
    rows = []
    for i, (name, (B, C, hw), dtype, w_dtype) in enumerate(cases):
        feat, w, qt = make_inputs(B, C, hw, dtype, w_dtype, seed=seed + i)
        if name == "non-contiguous features":
            feat = feat.transpose(2, 3).contiguous().transpose(2, 3)          # same values, strided
            assert not feat.is_contiguous()
        if name == "all-zero map":
            w = -w.abs()                                                       # cam <= 0 everywhere
        if name == "map below eps":
            feat, w = below_eps(feat, w)                                       # clamped norm
        backend = CountingBackend()
        f_in = feat.clone().as_subclass(FakeCuda).requires_grad_(True)
        w_in = w.clone().requires_grad_(True)
        with cpu_stand_in(backend):
            loss = attention_distill(f_in, w_in, qt)
            dfeat, dw = torch.autograd.grad(loss, (f_in, w_in))
        f_r = feat.clone().requires_grad_(True)
        w_r = w.clone().requires_grad_(True)
        loss_r = attention_distill_ref(f_r, w_r, qt)
        dfeat_r, dw_r = torch.autograd.grad(loss_r, (f_r, w_r))
        tol = TOL_GRAD[dtype] if w_dtype is None else max(TOL_GRAD[dtype], TOL_GRAD[w_dtype])
        row = dict(case=name, B=B, C=C, hw=hw, dtype=_NAMES[dtype], w_dtype=_NAMES[w_dtype or dtype],
                   routed=backend.calls == {"forward": 1, "backward": 1},
                   loss_rel=relerr(loss, loss_r), dfeat_rel=relerr(dfeat, dfeat_r), dw_rel=relerr(dw, dw_r),
                   dtypes_ok=dfeat.dtype == feat.dtype and dw.dtype == w.dtype)
        row["ok"] = bool(row["routed"] and row["dtypes_ok"] and row["loss_rel"] <= TOL_LOSS
                         and row["dfeat_rel"] <= tol and row["dw_rel"] <= tol
                         and (name != "all-zero map" or (dfeat.abs().max() == 0 and dw.abs().max() == 0)))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- NVRTC

def compile_check(archs: tuple[str, ...] = ("sm_87", "sm_90")) -> dict[str, Any]:
    try:
        cuda_attention.nvrtc_version()
    except Exception as e:  # noqa: BLE001 - report, do not crash the self-check
        return {"skipped": f"NVRTC unavailable: {e}"}
    out: dict[str, Any] = {"nvrtc": "%d.%d" % cuda_attention.nvrtc_version()}
    for arch in archs:
        t = time.perf_counter()
        try:
            rep = cuda_attention.ptxas_report(arch)
            spills = {k: v for k, v in rep.items()
                      if v.get("spill_stores", 0) or v.get("spill_loads", 0) or v.get("stack_frame", 0)}
            out[arch] = dict(ok=not spills and set(rep) >= set(cuda_attention.kernel_names()),
                             seconds=round(time.perf_counter() - t, 2),
                             max_registers=max(v.get("registers", 0) for v in rep.values()),
                             spills=spills, kernels=rep)
        except Exception as e:  # noqa: BLE001
            out[arch] = dict(ok=False, error=str(e))
    return out


# ----------------------------------------------------------------------------- GPU parts

def parity_case(backend: Any, feat: torch.Tensor, w: torch.Tensor, qt: torch.Tensor,
                public: Callable | None = None, g: float | None = None) -> dict[str, Any]:
    """Direct kernel run with every output and the workspace NaN-poisoned, against float64.

    g: upstream gradient (default B, so that per-sample gradients have the same scale at
    every B and fp16 gradients stay clear of fp16's subnormal range). `public` (default:
    the dispatcher attention_distill) must reproduce the direct result bit for bit.
    """
    B, C, h, ww = feat.shape
    hw = h * ww
    g = float(B) if g is None else g
    dev = feat.device
    nan = dict(device=dev, dtype=torch.float32)
    out = cuda_attention.FwdOut(torch.full((), math.nan, **nan), torch.full((B, hw), math.nan, **nan),
                                torch.full((B, 2), math.nan, **nan), torch.full((B,), math.nan, **nan))
    ws = torch.full((max(1, backend.workspace_numel(feat)),), math.nan, **nan)
    backend.forward(feat, w, qt, out=out, workspace=ws)
    dfeat = torch.full_like(feat, math.nan)
    dw = torch.full_like(w, math.nan)
    backend.backward(feat, w, qt, out.cam, out.stats, torch.tensor(g, **nan), out=(dfeat, dw))
    coverage = all(bool(torch.isfinite(t).all()) for t in (out.loss, out.cam, out.stats, out.loss_b, dfeat, dw))
    loss64, df64, dw64 = ref64(feat, w, qt, g)
    tol = max(TOL_GRAD[feat.dtype], TOL_GRAD.get(w.dtype, 0.0))
    row = dict(B=B, C=C, hw=hw, dtype=_NAMES[feat.dtype], w_dtype=_NAMES[w.dtype], coverage=coverage,
               loss_rel=relerr(out.loss, loss64), dfeat_rel=relerr(dfeat, df64), dw_rel=relerr(dw, dw64))
    public = public or attention_distill
    f_in = feat.detach().clone().requires_grad_(True)
    w_in = w.detach().clone().requires_grad_(True)
    loss_p = public(f_in, w_in, qt)
    df_p, dw_p = torch.autograd.grad(loss_p, (f_in, w_in), grad_outputs=torch.tensor(g, **nan))
    row["public_bitwise"] = bool(torch.equal(loss_p.detach(), out.loss) and torch.equal(df_p, dfeat)
                                 and torch.equal(dw_p, dw))
    row["ok"] = bool(coverage and row["public_bitwise"] and row["loss_rel"] <= TOL_LOSS
                     and row["dfeat_rel"] <= tol and row["dw_rel"] <= tol)
    return row


def parity_grid(backend: Any, device: Any, grid_b=GRID_B, grid_c=GRID_C, grid_hw=GRID_HW, dtypes=DTYPES,
                public: Callable | None = None, seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    i = 0
    for dtype in dtypes:
        for B in grid_b:
            for C in grid_c:
                for hw in grid_hw:
                    feat, w, qt = make_inputs(B, C, hw, dtype, device=device, seed=seed + i)
                    i += 1
                    row = _guard(parity_case, backend, feat, w, qt, public)
                    for k, v in dict(B=B, C=C, hw=hw, dtype=_NAMES[dtype]).items():
                        row.setdefault(k, v)        # an errored case still says which one it was
                    rows.append(row)
    # autocast's case: half-precision features, float32 head rows
    for dtype in (torch.float16, torch.bfloat16):
        if dtype not in dtypes:
            continue
        for B, C, hw in ((7, 320, 49), (grid_b[-1], grid_c[-1], grid_hw[-1])):
            feat, w, qt = make_inputs(B, C, hw, dtype, torch.float32, device=device, seed=seed + i)
            i += 1
            rows.append(_guard(parity_case, backend, feat, w, qt, public))
    return rows


def determinism_check(backend: Any, device: Any, B=64, C=1280, hw=49, dtypes=DTYPES, runs: int = 5,
                      seed: int = 1) -> list[dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        feat, w, qt = make_inputs(B, C, hw, dtype, device=device, seed=seed)
        g = torch.tensor(1.0, device=feat.device)
        first = None
        same = True
        for _ in range(runs):
            fo = backend.forward(feat, w, qt)
            df, dw = backend.backward(feat, w, qt, fo.cam, fo.stats, g)
            res = (fo.loss.clone(), fo.cam.clone(), fo.stats.clone(), df, dw)
            if first is None:
                first = res
            else:
                same = same and all(torch.equal(a, b) for a, b in zip(first, res))
        rows.append(dict(B=B, C=C, hw=hw, dtype=_NAMES[dtype], runs=runs, bitwise_equal=bool(same), ok=bool(same)))
    return rows


class Timer:
    """Median times in microseconds. On CUDA: events; 'device' queues a sleep first so that the
    host's launch work is hidden and only GPU time is measured. On the CPU: perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cycles_per_us = 0.0
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            s.record()
            torch.cuda._sleep(2_000_000)
            e.record()
            torch.cuda.synchronize()
            self.cycles_per_us = 2_000_000 / max(1e-3, s.elapsed_time(e) * 1e3)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def device_us(self, fn: Callable[[], Any], iters: int = 30, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        if not self.cuda:
            ts = []
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e6)
            return statistics.median(ts)
        t = time.perf_counter()                      # host time of one call: the sleep must cover it
        for _ in range(3):
            fn()
        host_us = (time.perf_counter() - t) / 3 * 1e6
        self.sync()
        cycles = int(max(50.0, 3 * host_us) * self.cycles_per_us)
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in evs:
            torch.cuda._sleep(cycles)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in evs)

    def wall_us(self, fn: Callable[[], Any], iters: int = 30, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        if not self.cuda:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t) / iters * 1e6
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) * 1e3 / iters


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    us = timer.device_us(lambda: y.copy_(x), iters=10, warmup=2)
    return 2 * nbytes / (us * 1e-6)


def timing_case(backend: Any, device: Any, B: int, C: int, hw: int, dtype: torch.dtype, timer: Timer,
                bandwidth: float, public: Callable | None = None, iters: int = 30) -> dict[str, Any]:
    public = public or attention_distill
    feat, w, qt = make_inputs(B, C, hw, dtype, device=device, seed=7)
    f_in = feat.clone().requires_grad_(True)
    w_in = w.clone().requires_grad_(True)

    def fused():
        return torch.autograd.grad(public(f_in, w_in, qt), (f_in, w_in))

    def ref():
        return torch.autograd.grad(attention_distill_ref(f_in, w_in, qt), (f_in, w_in))

    g = torch.tensor(1.0, device=feat.device)
    out = None

    def kernels():   # the launches alone, outputs preallocated
        nonlocal out
        fo = backend.forward(feat, w, qt)
        out = backend.backward(feat, w, qt, fo.cam, fo.stats, g, out=out)

    must_move = 3 * feat.numel() * feat.element_size() + 3 * w.numel() * w.element_size() + 2 * qt.numel() * 4
    row = dict(B=B, C=C, hw=hw, dtype=_NAMES[dtype])
    row["fused_device_us"] = timer.device_us(fused, iters)
    row["ref_device_us"] = timer.device_us(ref, iters)
    row["kernels_device_us"] = timer.device_us(kernels, iters)
    row["fused_wall_us"] = timer.wall_us(fused, iters)
    row["ref_wall_us"] = timer.wall_us(ref, iters)
    row["speedup_device"] = row["ref_device_us"] / row["fused_device_us"]
    row["speedup_wall"] = row["ref_wall_us"] / row["fused_wall_us"]
    row["bytes_must_move"] = must_move
    row["floor_us"] = must_move / bandwidth * 1e6
    row["ratio_to_floor"] = row["fused_device_us"] / row["floor_us"]
    row["kernels_ratio_to_floor"] = row["kernels_device_us"] / row["floor_us"]
    return row


# ----------------------------------------------------------------------------- training step

def train_step_report(device: Any, batch: int = 64, size: int = 128, n_old: int = 10, n_new: int = 10,
                      steps: int = 3) -> dict[str, Any]:
    """One LwM step (LC + LD + LAD, the fused op where the dispatcher picks it) vs one fine-tune
    step (LC only): the learner's own step (fieldlearn.tools.profile.harness.StepHarness:
    make_optimizer, train_mode, batch_terms, optimizer_step) on a MobileNetV2 student with
    random weights (no weights package needed) and noise images, its trunk frozen and cached
    as in the learner."""
    from fieldlearn.device.config import ModelConfig, RunConfig, TrainConfig  # noqa: PLC0415
    from fieldlearn.device.learner import batch_terms  # noqa: PLC0415
    from fieldlearn.tools.profile.harness import StepHarness, StepSpec  # noqa: PLC0415

    device = torch.device(device)
    cfg = RunConfig(model=ModelConfig(pretrained=False, input_size=size),
                    train=TrainConfig(batch_size=batch, device=str(device), progress=False))
    res: dict[str, Any] = dict(device=str(device), batch=batch, input=size, student="mobilenet_v2, random weights")
    for method in ("finetune", "lwm"):
        h = StepHarness(StepSpec(cfg, method, n_old=n_old, n_new=n_new), device=str(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = h.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        with torch.no_grad():
            parts = {k: float(v) for k, v in batch_terms(h.student, h.method, h.z, h.labels, n_old, h.targets).items()
                     if k != "lc"}
        grad = h.student.head.weight.grad
        res[method] = dict(ms=statistics.median(times[1:] or times), loss=float(loss), **parts,
                           peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None),
                           head_grad=float(grad.abs().sum()) if grad is not None else 0.0)
    res["ok"] = all(math.isfinite(res[m]["loss"]) and res[m]["head_grad"] > 0 for m in ("finetune", "lwm"))
    return res


# ----------------------------------------------------------------------------- driver

def _guard(fn: Callable, *a, **k) -> dict[str, Any]:
    try:
        return fn(*a, **k)
    except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
        return dict(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))


def gpu_skip_reason() -> str | None:
    if os.environ.get("FIELDLEARN_FORCE_REF", "") not in ("", "0"):
        return "FIELDLEARN_FORCE_REF is set: the fused kernels are disabled"
    if not torch.cuda.is_available():
        return (f"torch.cuda.is_available() is False (no CUDA device or driver here; torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda})")
    return None


def run(quick: bool = False, compile_archs: tuple[str, ...] = ("sm_87", "sm_90"), seed: int = 0) -> dict[str, Any]:
    t0 = time.perf_counter()
    rep: dict[str, Any] = dict(
        version=1, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
        host=platform.node(), machine=platform.machine())
    rep["plumbing"] = _guard_list(plumbing_check, seed)
    if compile_archs:
        rep["compile"] = compile_check(compile_archs)
    reason = gpu_skip_reason()
    rep["gpu"] = dict(ran=reason is None, skipped=reason)
    if reason is None:
        dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(dev)
        rep["device"] = dict(name=props.name, capability="%d.%d" % (props.major, props.minor),
                             sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        try:
            backend = cuda_attention.get_backend()
            rep["device"]["arch"] = cuda_attention.arch_for((props.major, props.minor))
            rep["device"]["ptxas"] = cuda_attention.ptxas_report(rep["device"]["arch"]) \
                if rep["device"]["arch"].startswith("sm_") else None
        except Exception as e:  # noqa: BLE001
            rep["gpu"]["error"] = f"{type(e).__name__}: {e}"
            backend = None
        if backend is not None:
            grid = dict(grid_b=(1, 64), grid_c=(1280,), grid_hw=(49, 196)) if quick else {}
            rep["parity"] = parity_grid(backend, dev, seed=seed, **grid)
            rep["determinism"] = _guard_list(determinism_check, backend, dev)
            timer = Timer(dev)
            bw = copy_bandwidth(dev, timer)
            rep["copy_bandwidth_GBps"] = bw / 1e9
            shapes = [(64, 1280, 49, torch.float32), (64, 1280, 49, torch.float16), (64, 1280, 49, torch.bfloat16),
                      (256, 1280, 196, torch.float32), (256, 1280, 196, torch.float16)]
            if quick:
                shapes = shapes[:2]
            rep["timing"] = [_guard(timing_case, backend, dev, B, C, hw, dt, timer, bw) for B, C, hw, dt in shapes]
        rep["train_step"] = _guard(train_step_report, "cuda")
    else:
        rep["train_step"] = _guard(train_step_report, "cpu", batch=8, size=64, steps=2)
    rep["ok"] = _overall_ok(rep)
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    return rep


def _guard_list(fn: Callable, *a, **k) -> list[dict[str, Any]]:
    r = _guard(fn, *a, **k)
    return r if isinstance(r, list) else [r]


def _overall_ok(rep: dict[str, Any]) -> bool:
    ok = all(r.get("ok") for r in rep.get("plumbing", []))
    comp = rep.get("compile", {})
    ok = ok and all(v.get("ok") for k, v in comp.items() if k.startswith("sm_"))
    ok = ok and "error" not in rep["gpu"]
    for key in ("parity", "determinism"):
        ok = ok and all(r.get("ok") for r in rep.get(key, []))
    ok = ok and all("error" not in r for r in rep.get("timing", []))
    ok = ok and bool(rep.get("train_step", {}).get("ok"))
    return bool(ok)


def _worst(rows: list[dict[str, Any]], key: str, dtype: str) -> float:
    vals = [r[key] for r in rows if r.get("dtype") == dtype and key in r]
    return max(vals) if vals else float("nan")


def table(rep: dict[str, Any]) -> str:
    lines = []
    dev = rep.get("device", {})
    lines.append(f"fieldlearn self-check  {rep['date']}  torch {rep['torch']}  "
                 + (f"{dev.get('name')} (sm_{dev.get('capability', '').replace('.', '')})" if dev else "no GPU"))
    pl = rep.get("plumbing", [])
    lines.append(f"plumbing (CPU, torch stand-in through the dispatcher): "
                 f"{sum(bool(r.get('ok')) for r in pl)}/{len(pl)} ok")
    comp = rep.get("compile")
    if comp:
        if "skipped" in comp:
            lines.append(f"NVRTC compile: skipped ({comp['skipped']})")
        for arch, v in comp.items():
            if arch.startswith("sm_"):
                lines.append(f"NVRTC {comp.get('nvrtc')} {arch}: " + (
                    f"ok, max {v['max_registers']} registers, no spills, {v['seconds']} s" if v.get("ok")
                    else f"FAILED {v.get('error') or v.get('spills')}"))
    if not rep["gpu"]["ran"]:
        lines.append(f"GPU parts SKIPPED: {rep['gpu']['skipped']}")
    if rep["gpu"].get("error"):
        lines.append(f"GPU ERROR: {rep['gpu']['error']}")
    par = rep.get("parity")
    if par:
        lines.append(f"parity vs float64 ref: {sum(bool(r.get('ok')) for r in par)}/{len(par)} ok, "
                     f"NaN-poisoned outputs fully covered: {all(r.get('coverage') for r in par)}")
        lines.append("  worst rel err   loss       dfeat      dw")
        for dt in ("fp32", "fp16", "bf16"):
            lines.append(f"  {dt:14s}  {_worst(par, 'loss_rel', dt):.2e}   {_worst(par, 'dfeat_rel', dt):.2e}"
                         f"   {_worst(par, 'dw_rel', dt):.2e}")
        for r in par:
            if not r.get("ok"):
                lines.append(f"  FAILED {r}")
    det = rep.get("determinism")
    if det:
        lines.append("determinism: " + ", ".join(f"{r.get('dtype')} {'bitwise' if r.get('ok') else 'DIFFERS'}"
                                                for r in det))
    tim = rep.get("timing")
    if tim:
        lines.append(f"timing (median us; copy bandwidth {rep['copy_bandwidth_GBps']:.0f} GB/s)")
        lines.append("  B    C     hw   dtype  fused   ref     speedup  kernels  floor   fused/floor  "
                     "wall: fused  ref")
        for r in tim:
            if "error" in r:
                lines.append(f"  ERROR {r['error']}")
                continue
            lines.append(f"  {r['B']:<4} {r['C']:<5} {r['hw']:<4} {r['dtype']:5s}  {r['fused_device_us']:6.1f}  "
                         f"{r['ref_device_us']:6.1f}  {r['speedup_device']:5.1f}x   {r['kernels_device_us']:6.1f}   "
                         f"{r['floor_us']:6.1f}  {r['ratio_to_floor']:5.2f}x       {r['fused_wall_us']:6.1f}  "
                         f"{r['ref_wall_us']:6.1f}")
    ts = rep.get("train_step", {})
    if "lwm" in ts:
        mem = (lambda m: f", peak {ts[m]['peak_mib']:.0f} MiB" if ts[m].get("peak_mib") is not None else "")
        lines.append(f"train step ({ts['device']}, {ts['student']}, batch {ts['batch']}): "
                     f"LwM {ts['lwm']['ms']:.1f} ms{mem('lwm')}; fine-tune {ts['finetune']['ms']:.1f} ms"
                     f"{mem('finetune')}")
    elif ts:
        lines.append(f"train step ERROR: {ts.get('error')}")
    lines.append(f"overall: {'OK' if rep['ok'] else 'FAILED'} in {rep['seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fieldlearn.tools.selfcheck", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the full report as JSON to this file")
    ap.add_argument("--quick", action="store_true", help="smaller parity grid and fewer timings")
    ap.add_argument("--no-compile", action="store_true", help="skip the NVRTC sm_87/sm_90 compile check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rep = run(quick=args.quick, compile_archs=() if args.no_compile else ("sm_87", "sm_90"), seed=args.seed)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1, default=str)
    print(table(rep))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
