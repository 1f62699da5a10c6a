"""The fused Grad-CAM + LAD kernel (device/csrc/attention_distill.cu) and its host module.

Without a GPU the kernel source is still checked three ways:
  * NVRTC compiles it for sm_87 (Jetson Orin) and sm_90 (H100/H200), and ptxas reports no
    spills and no local memory (also through nvcc -Xptxas -v for sm_87);
  * a CPU emulator (tests/device/cuda_emulator.cpp: fibers for threads, real barriers and
    warp shuffles) runs the unchanged source, launched by the real host code
    (KernelBackend: geometry, workspaces, argument packing), against float64 attention_distill_ref;
  * the autograd.Function runs with the pure-torch kernel contract (TorchKernelBackend).
GPU tests run the real kernels and skip with a reason where torch.cuda.is_available() is False.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import math
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ca = importlib.import_module("fieldlearn.device.ops.cuda_attention")
sc = importlib.import_module("fieldlearn.tools.selfcheck")
from fieldlearn.device.ops.attention_distill import (  # noqa: E402
    AttentionDistillFn, TorchKernelBackend, attention_distill, attention_distill_ref)

HERE = Path(__file__).resolve().parent
EMULATOR_SRC = HERE / "cuda_emulator.cpp"


def _nvrtc_reason() -> str | None:
    try:
        ca.nvrtc_version()
        return None
    except Exception as e:  # noqa: BLE001
        return f"NVRTC not available: {e}"


NVRTC_SKIP = _nvrtc_reason()
needs_nvrtc = pytest.mark.skipif(NVRTC_SKIP is not None, reason=NVRTC_SKIP or "")
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
CXX = shutil.which("g++") or shutil.which("c++")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="torch.cuda.is_available() is False: no CUDA device here")


# ----------------------------------------------------------------------------- NVRTC / ptxas

@pytest.fixture(scope="module")
def nvrtc_builds():
    """One NVRTC compile per arch, with ptxas -v: (cubin, per-kernel report)."""
    out = {}
    for arch in ("sm_87", "sm_90"):
        image, log = ca._compile(arch, ("--ptxas-options=-v",))
        out[arch] = (image, ca.parse_ptxas_log(log))
    return out


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_nvrtc_compiles_every_kernel(nvrtc_builds, arch):
    """If this fails, the kernel would not build at first use on a Jetson Orin / H100."""
    image, report = nvrtc_builds[arch]
    assert image.startswith(b"\x7fELF")
    for name in ca.kernel_names():
        assert name.encode() in image, f"{name} missing from the {arch} cubin"
    assert set(report) == set(ca.kernel_names())


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_ptxas_no_spills_no_local_memory(nvrtc_builds, arch):
    """Spills or a stack frame put per-thread data in local memory (DRAM): the kernels are
    bandwidth-bound and must not add traffic. <= 64 registers keeps 4 blocks of 256 per SM."""
    _, report = nvrtc_builds[arch]
    for name, r in report.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (arch, name, r)
        assert r["stack_frame"] == 0, (arch, name, r)
        assert r["registers"] <= 64, (arch, name, r)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_nvcc_ptxas_sm87_no_spills_no_lmem(tmp_path):
    """Same check through the toolkit's nvcc, with ptxas' own spill / local-memory warnings."""
    proc = subprocess.run(
        [NVCC, "-arch=sm_87", "-cubin", f"-DFL_BLOCK={ca.BLOCK}", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage",
         "-o", str(tmp_path / "k.cubin"), str(ca.SOURCE)],
        capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert not re.search(r"warning", log, re.I), log
    report = ca.parse_ptxas_log(log)
    assert set(report) == set(ca.kernel_names()), log
    for name, r in report.items():
        assert r["spill_stores"] == r["spill_loads"] == r["stack_frame"] == 0, (name, r)


@needs_nvrtc
def test_arch_choice():
    """sm_XY cubins where NVRTC knows the arch, PTX below an unknown newer one, a clear error
    naming JetPack 5 for Xavier (sm_72), which CUDA 13 cannot target."""
    assert ca.arch_for((9, 0)) == "sm_90"
    assert ca.arch_for((8, 7)) == "sm_87"
    newest = max(ca.supported_archs())
    assert ca.arch_for((newest // 10 + 1, 9)) == f"compute_{newest}"
    if 72 not in ca.supported_archs():
        with pytest.raises(RuntimeError, match="JetPack 5"):
            ca.arch_for((7, 2))
        with pytest.raises(RuntimeError, match="sm_72"):
            ca.compile_cubin("sm_72")


def test_kernel_image_cache(tmp_path, monkeypatch):
    """Compiled once, then read from disk; the file name carries source hash, arch and NVRTC
    version; a damaged file is recompiled; writes are atomic (no temp files left behind)."""
    monkeypatch.setenv("FIELDLEARN_CACHE", str(tmp_path))
    monkeypatch.setattr(ca, "nvrtc_version", lambda: (13, 0))
    compiles = []

    def fake_compile(arch, extra=()):
        compiles.append(arch)
        return b"\x7fELF fake cubin for " + arch.encode(), ""

    monkeypatch.setattr(ca, "_compile", fake_compile)
    img = ca.kernel_image("sm_87")
    assert img.startswith(b"\x7fELF") and compiles == ["sm_87"]
    files = list((tmp_path / "kernels").iterdir())
    assert [f.name for f in files] == [ca.cache_key("sm_87")]
    digest = hashlib.sha256(ca.source_text().encode() + "\0".join(ca.NVRTC_OPTIONS).encode()).hexdigest()[:24]
    assert ca.cache_key("sm_87") == f"attention_distill-{digest}-sm_87-nvrtc13.0.cubin"
    assert ca.kernel_image("sm_87") == img and compiles == ["sm_87"]          # hit
    files[0].write_bytes(b"garbage")
    assert ca.kernel_image("sm_87") == img and compiles == ["sm_87", "sm_87"]  # damaged -> recompiled
    ca.kernel_image("sm_90")
    assert sorted(f.name for f in (tmp_path / "kernels").iterdir()) == sorted(
        [ca.cache_key("sm_87"), ca.cache_key("sm_90")])


def test_missing_cuda_python_names_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(RuntimeError, match=r"pip install \"cuda-python\[all\]==\d+\.\*\""):
        ca.CudaLauncher()
    with pytest.raises(RuntimeError, match="FIELDLEARN_FORCE_REF"):
        ca._nvrtc()


def test_available_is_false_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert ca.available() is False


def test_plan_covers_channels():
    """Every channel lands in exactly one block; blocks are whole rounds; small batches split
    more (enough blocks to fill the GPU), big batches less (smaller workspace)."""
    for B in (1, 7, 64, 256):
        for C in (1, 9, 320, 1280, 1283):
            for HW in (1, 16, 49, 196, 256, 300, 4096):
                for items in (8, 16):
                    nsplit, cpb = ca.plan(B, C, HW, items, num_sms=132)
                    unit = (ca.BLOCK // min(HW, ca.BLOCK)) * items
                    assert cpb % unit == 0 and (nsplit - 1) * cpb < C <= nsplit * cpb
    assert ca.plan(1, 1280, 49, 8, 132)[0] > ca.plan(256, 1280, 49, 8, 132)[0]


# ----------------------------------------------------------------------------- CPU emulator

@pytest.fixture(scope="session")
def emulator():
    if CXX is None:
        pytest.skip("no C++ compiler for the CPU emulator")
    h = hashlib.sha256(EMULATOR_SRC.read_bytes() + ca.SOURCE.read_bytes()).hexdigest()[:16]
    lib_path = Path(tempfile.gettempdir()) / f"fieldlearn-cuda-emulator-{h}.so"
    if not lib_path.exists():
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([CXX, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                               f"-DFL_BLOCK={ca.BLOCK}", "-o", str(tmp), str(EMULATOR_SRC)],
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.fl_emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p]
    lib.fl_emu_half_to_float.restype = ctypes.c_float
    lib.fl_emu_half_to_float.argtypes = [ctypes.c_ushort]
    lib.fl_emu_float_to_half.restype = ctypes.c_ushort
    lib.fl_emu_float_to_half.argtypes = [ctypes.c_float]
    lib.fl_emu_float_to_bf16.restype = ctypes.c_ushort
    lib.fl_emu_float_to_bf16.argtypes = [ctypes.c_float]
    assert lib.fl_emu_kernel_count() == len(ca.kernel_names())
    return lib


class EmuLauncher:
    """Launcher for KernelBackend that runs the kernels in the CPU emulator (CPU tensors)."""

    def __init__(self, lib, sms: int = 1):
        self.lib, self.sms, self.launches = lib, sms, []

    def num_sms(self, device):
        return self.sms

    def run(self, device, launches):
        for ln in launches:
            assert ln.block % 32 == 0 and ln.block <= 1024 and ln.grid >= 1, ln
            params = (ctypes.c_void_p * len(ln.args))(*[ctypes.addressof(a) for a in ln.args])
            rc = self.lib.fl_emu_launch(ln.name.encode(), ln.grid, ln.block, ctypes.addressof(params))
            assert rc == 0, f"emulated {ln.name} failed with code {rc} (1 unknown, 2 block, 3 deadlock)"
            self.launches.append((ln.name, ln.grid, ln.block))


def _emu_backend(lib, sms=1):
    return ca.KernelBackend(EmuLauncher(lib, sms))


def _fn_with(backend):
    def public(f, w, q):
        with ca.use_backend(backend):
            return AttentionDistillFn.apply(f, w, q)
    return public


EMU_CASES = [
    # (B, C, h, w), feature dtype, head dtype, SMs the geometry plans for
    ((2, 20, 4, 4), torch.float32, torch.float32, 1),       # hw 16: 16 channel lanes per block
    ((3, 37, 7, 7), torch.float16, torch.float16, 2),       # hw 49, ragged channel rounds
    ((3, 37, 7, 7), torch.float16, torch.float32, 2),       # autocast: fp16 features, fp32 head
    ((2, 50, 14, 14), torch.float32, torch.float32, 4),     # hw 196: one lane, 60 idle threads, 7 splits
    ((2, 13, 10, 30), torch.bfloat16, torch.bfloat16, 1),   # hw 300 > block: two position tiles
    ((2, 11, 16, 16), torch.bfloat16, torch.float32, 1),    # hw == block
    ((1, 9, 1, 1), torch.float32, torch.float32, 1),        # hw 1: 256 channel lanes
    ((2, 24, 1, 130), torch.float32, torch.float32, 3),     # hw 130: one lane, 126 idle threads
    ((5, 70, 8, 8), torch.float32, torch.float32, 8),       # hw 64, many splits
]


@pytest.mark.parametrize("shape, dtype, w_dtype, sms", EMU_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{sc._NAMES[c[1]]}-{sc._NAMES[c[2]]}" for c in EMU_CASES])
def test_emulated_kernels_match_float64_reference(emulator, shape, dtype, w_dtype, sms):
    """The real kernel source, launched by the real host code: loss and both gradients within
    per-dtype tolerance of float64, NaN-poisoned outputs and workspace fully overwritten, and
    the autograd.Function path bitwise equal to the direct launch (the self-check's parity_case)."""
    B, C, h, w = shape
    feat, ws, qt = sc.make_inputs(B, C, h * w, dtype, w_dtype, seed=sum(shape))
    if (h, w) != (int(math.isqrt(h * w)),) * 2:
        feat = feat.reshape(B, C, h, w)
    backend = _emu_backend(emulator, sms)
    row = sc.parity_case(backend, feat, ws, qt, public=_fn_with(backend))
    assert row["ok"], row


def test_emulated_batch_mean_over_more_samples_than_threads(emulator):
    """fl_ad_fwd_mean strides over B > 256 samples in a fixed order."""
    loss_b = torch.rand(1000, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    out = torch.full((), math.nan)
    EmuLauncher(emulator).run("cpu", [ca.Launch("fl_ad_fwd_mean", 1, ca.BLOCK, (
        ctypes.c_void_p(loss_b.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(1000)))])
    assert out.item() == pytest.approx(loss_b.double().mean().item(), rel=1e-6)


def test_emulated_saved_state_matches_contract(emulator):
    """cam (pre-ReLU), the unclamped norm and S = sum q sign(q - qt) are what the backward reads."""
    feat, ws, qt = sc.make_inputs(3, 40, 49, torch.float32, seed=3)
    out = _emu_backend(emulator, 2).forward(feat, ws, qt)
    want = TorchKernelBackend().forward(feat.double(), ws.double(), qt.double())
    assert sc.relerr(out.cam, want.cam) < 1e-6
    assert sc.relerr(out.stats[:, 0], want.stats[:, 0]) < 1e-6
    assert sc.relerr(out.stats[:, 1], want.stats[:, 1]) < 1e-5
    assert sc.relerr(out.loss_b, want.loss_b) < 1e-6


@pytest.mark.parametrize("hw, cpb", [(49, 1), (49, 3), (49, 41), (300, 5), (16, 7), (196, 9)])
def test_emulated_kernels_any_channel_split(emulator, monkeypatch, hw, cpb):
    """The kernels must be right for any channels-per-block, not only the planner's choice."""
    C = 23
    monkeypatch.setattr(ca, "plan", lambda B, C_, HW, items, num_sms, **k: (-(-C_ // cpb), cpb))
    h, w = (7, 7) if hw == 49 else (1, hw)
    feat, ws, qt = sc.make_inputs(1, C, hw, torch.float32, seed=cpb)
    backend = _emu_backend(emulator)
    row = sc.parity_case(backend, feat.reshape(1, C, h, w), ws, qt, public=_fn_with(backend))
    assert row["ok"], row


def _guarded(t: torch.Tensor, guard: int = 257):
    """t's values in the middle of a NaN-filled buffer: (view, whole buffer)."""
    full = torch.full((t.numel() + 2 * guard,), math.nan, dtype=t.dtype)
    view = full[guard:guard + t.numel()].view(t.shape)
    view.copy_(t)
    return view, full


def _guards_intact(full: torch.Tensor, n: int, guard: int = 257) -> bool:
    return bool(torch.isnan(full[:guard].float()).all() and torch.isnan(full[guard + n:].float()).all())


@pytest.mark.parametrize("hw", [49, 300])
def test_emulated_kernels_stay_in_bounds(emulator, hw):
    """No write outside any output or workspace, no read outside any input (inputs sit between
    NaN guards, so a stray read would turn the results NaN)."""
    B, C = 3, 29
    feat, ws, qt = sc.make_inputs(B, C, hw, torch.float16, seed=hw)
    feat = feat.reshape(B, C, 1, hw)
    backend = _emu_backend(emulator, 2)
    (f, _), (w, _), (q, _) = _guarded(feat), _guarded(ws), _guarded(qt)
    bufs = dict(loss=_guarded(torch.zeros(())), cam=_guarded(torch.zeros(B, hw)), stats=_guarded(torch.zeros(B, 2)),
                loss_b=_guarded(torch.zeros(B)), ws=_guarded(torch.zeros(backend.workspace_numel(feat))),
                dfeat=_guarded(torch.zeros_like(feat)), dw=_guarded(torch.zeros_like(ws)))
    out = ca.FwdOut(bufs["loss"][0], bufs["cam"][0], bufs["stats"][0], bufs["loss_b"][0])
    backend.forward(f, w, q, out=out, workspace=bufs["ws"][0])
    backend.backward(f, w, q, out.cam, out.stats, torch.tensor(1.0), out=(bufs["dfeat"][0], bufs["dw"][0]))
    for name, (view, full) in bufs.items():
        assert torch.isfinite(view.float()).all(), name
        assert _guards_intact(full, view.numel()), f"write outside {name}"


def _fenced(t: torch.Tensor):
    """A copy of t whose last byte is followed by an unreadable page: (tensor, keep-alive)."""
    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    total = -(-nbytes // page) * page + page
    buf = mmap.mmap(-1, total)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base + total - page), ctypes.c_size_t(page), 0) == 0   # PROT_NONE
    view = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=total - page - nbytes).view(t.shape)
    view.copy_(t)
    return view, buf


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses mprotect")
@pytest.mark.parametrize("dtype, hw", [(torch.float32, 49), (torch.float16, 300), (torch.bfloat16, 16)])
def test_emulated_kernels_never_read_past_inputs(emulator, dtype, hw):
    """Each input ends right before an unreadable page, with a channel count that leaves the
    last round ragged. A segfault here means a kernel reads past the end of an input (on a
    GPU: an illegal address, or garbage from the next allocation)."""
    B, C = 2, 37
    feat, ws, qt = sc.make_inputs(B, C, hw, dtype, seed=hw)
    feat = feat.reshape(B, C, 1, hw)
    backend = _emu_backend(emulator)
    keep = []
    def fence(t):
        v, b = _fenced(t)
        keep.append(b)
        return v
    f, w, q = fence(feat), fence(ws), fence(qt)
    out = backend.forward(f, w, q)
    cam, stats = fence(out.cam), fence(out.stats)
    dfeat, dw = backend.backward(f, w, q, cam, stats, fence(torch.tensor(1.0)))
    want = sc.ref64(feat, ws, qt)
    assert sc.relerr(out.loss, want[0]) < 1e-5 and sc.relerr(dfeat, want[1]) <= sc.TOL_GRAD[dtype]


def test_emulated_corner_maps(emulator):
    """All-zero map: loss = mean sum |q_t| and zero gradients. A map whose norm is below eps
    (clamped): the clamp passes no gradient, exactly as the reference."""
    backend = _emu_backend(emulator)
    fn = _fn_with(backend)
    feat, ws, qt = sc.make_inputs(3, 16, 16, torch.float32, seed=5)
    for f_, w_ in ((feat, -ws.abs()), sc.below_eps(feat, ws)):
        f1, w1 = f_.clone().requires_grad_(), w_.clone().requires_grad_()
        f2, w2 = f_.clone().requires_grad_(), w_.clone().requires_grad_()
        l1, l2 = fn(f1, w1, qt), attention_distill_ref(f2, w2, qt)
        l1.backward()
        l2.backward()
        assert sc.relerr(l1, l2) < 1e-6
        assert sc.relerr(f1.grad, f2.grad) < 1e-5 and sc.relerr(w1.grad, w2.grad) < 1e-5
    assert l1.item() > 0 and f1.grad.abs().max() > 0          # the clamped case is not trivial
    q = torch.einsum("bc,bcj->bj", w_, f_.flatten(2)).relu() / 1e-12
    assert q.max() > 0.1                                       # ... and q is O(1): S would show


def test_emulated_kernels_deterministic(emulator):
    """Same inputs, different prior contents of the outputs: bit-identical results."""
    (row,) = sc.determinism_check(_emu_backend(emulator, 3), "cpu", B=3, C=40, hw=49,
                                  dtypes=(torch.float32,), runs=2)
    assert row["ok"], row


def test_function_through_emulated_kernels(emulator):
    """AttentionDistillFn with the emulated kernels: non-contiguous features, an fp16 head row
    with fp32 features (cast to fp32 for the kernel, gradient cast back), a q_t that requires
    grad, and float64 input (which the kernels do not take: routed to the reference)."""
    backend = _emu_backend(emulator, 2)
    fn = _fn_with(backend)
    feat, ws, qt = sc.make_inputs(3, 24, 49, torch.float32, seed=11)
    feat_nc = feat.transpose(2, 3).contiguous().transpose(2, 3)
    ws16 = ws.half()
    f1, w1, q1 = feat_nc.clone().requires_grad_(), ws16.clone().requires_grad_(), qt.clone().requires_grad_()
    f2, w2, q2 = feat_nc.clone().requires_grad_(), ws16.clone().requires_grad_(), qt.clone().requires_grad_()
    l1 = fn(f1, w1, q1)
    l1.backward()
    l2 = attention_distill_ref(f2, w2, q2)
    l2.backward()
    assert w1.grad.dtype == torch.float16 and f1.grad.dtype == torch.float32
    assert sc.relerr(l1, l2) < 1e-6
    assert sc.relerr(f1.grad, f2.grad) < 1e-5 and sc.relerr(w1.grad, w2.grad) < 2e-3
    assert sc.relerr(q1.grad, q2.grad) == 0
    n = len(backend.launcher.launches)
    l64 = fn(feat.double(), ws.double(), qt.double())
    assert len(backend.launcher.launches) == n and l64.dtype == torch.float64


def test_software_half_bf16_conversions_match_torch(emulator):
    """The conversions the source falls back to without PTX cvt (pre-Ampere bf16 store; the
    emulator) round exactly as torch does."""
    lib = emulator
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    want = bits.float()
    got = torch.tensor([lib.fl_emu_half_to_float(i) for i in range(1 << 16)], dtype=torch.float32)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])

    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(4000, generator=g) * torch.exp2(torch.randint(-30, 20, (4000,), generator=g).float()),
        want[~torch.isnan(want)][::7] * (1 + 2.0 ** -11),        # halfway points between halves
        want[~torch.isnan(want)][::7],
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 6e-8, 3e-8, 2.98e-8, math.inf, -math.inf]),
    ])
    half = torch.tensor([lib.fl_emu_float_to_half(float(v)) for v in x], dtype=torch.int32)
    assert torch.equal(half.to(torch.int16), x.half().view(torch.int16).to(torch.int32).to(torch.int16))
    bf = torch.tensor([lib.fl_emu_float_to_bf16(float(v)) for v in x], dtype=torch.int32)
    assert torch.equal(bf.to(torch.int16), x.bfloat16().view(torch.int16))
    assert lib.fl_emu_float_to_half(math.nan) & 0x7C00 == 0x7C00 and lib.fl_emu_float_to_half(math.nan) & 0x3FF
    assert lib.fl_emu_float_to_bf16(math.nan) & 0x7F80 == 0x7F80 and lib.fl_emu_float_to_bf16(math.nan) & 0x7F


# ----------------------------------------------------------------------------- CPU plumbing

def test_function_gradcheck_with_torch_kernel_contract():
    """gradcheck of AttentionDistillFn with the kernel's analytic backward (the S = q.sign
    shortcut, the ReLU mask, the clamp) written out in torch: the formulas the .cu implements."""
    feat, ws, qt = sc.make_inputs(3, 6, 12, torch.float64, seed=2)
    feat = feat.reshape(3, 6, 3, 4).requires_grad_(True)
    ws = ws.requires_grad_(True)
    with ca.use_backend(TorchKernelBackend()):
        assert torch.autograd.gradcheck(AttentionDistillFn.apply, (feat, ws, qt), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_function_plumbing_matches_reference(dtype):
    """Forward value, gradient values and dtypes through the Function equal the reference's."""
    feat, ws, qt = sc.make_inputs(5, 24, 49, dtype, seed=4)
    f1, w1 = feat.clone().requires_grad_(), ws.clone().requires_grad_()
    f2, w2 = feat.clone().requires_grad_(), ws.clone().requires_grad_()
    with ca.use_backend(TorchKernelBackend()):
        l1 = AttentionDistillFn.apply(f1, w1, qt)
        l1.backward()
    l2 = attention_distill_ref(f2, w2, qt)
    l2.backward()
    assert l1.dtype == l2.dtype == torch.float32
    assert f1.grad.dtype == dtype and w1.grad.dtype == dtype
    assert sc.relerr(l1, l2) < 1e-6
    assert sc.relerr(f1.grad, f2.grad) <= sc.TOL_GRAD[dtype] and sc.relerr(w1.grad, w2.grad) <= sc.TOL_GRAD[dtype]


def test_function_rejects_mixed_devices():
    feat, ws, qt = sc.make_inputs(2, 8, 16, torch.float32)
    with ca.use_backend(TorchKernelBackend()), pytest.raises(ValueError, match="one device"):
        AttentionDistillFn.apply(feat, ws, qt.to("meta"))


# ----------------------------------------------------------------------------- GPU

@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, C, hw", [(1, 320, 16), (7, 1280, 49), (64, 1280, 49), (5, 96, 300)])
def test_gpu_parity(dtype, B, C, hw):
    feat, ws, qt = sc.make_inputs(B, C, hw, dtype, device="cuda", seed=B + C + hw)
    if hw == 300:
        feat = feat.reshape(B, C, 10, 30)
    row = sc.parity_case(ca.get_backend(), feat, ws, qt)
    assert row["ok"], row


@gpu
@needs_gpu
def test_gpu_mixed_head_dtype_and_noncontiguous():
    feat, ws, qt = sc.make_inputs(16, 320, 49, torch.float16, torch.float32, device="cuda", seed=1)
    row = sc.parity_case(ca.get_backend(), feat, ws, qt)
    assert row["ok"], row
    f_cl = feat.to(memory_format=torch.channels_last).requires_grad_(True)
    f_c = feat.clone().requires_grad_(True)
    g1 = torch.autograd.grad(attention_distill(f_cl, ws, qt), f_cl)[0]
    g2 = torch.autograd.grad(attention_distill(f_c, ws, qt), f_c)[0]
    assert torch.equal(g1.contiguous(), g2)


@gpu
@needs_gpu
def test_gpu_deterministic():
    rows = sc.determinism_check(ca.get_backend(), "cuda", B=64, C=1280, hw=49)
    assert all(r["ok"] for r in rows), rows


@gpu
@needs_gpu
def test_gpu_runs_on_torchs_current_stream():
    """Launches must go to torch's current stream: work queued on a side stream before the op
    has to be visible to it, and its results to work queued after."""
    feat, ws, qt = sc.make_inputs(64, 1280, 49, torch.float32, device="cuda", seed=2)
    want = attention_distill(feat, ws, qt)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(5_000_000)
        f2 = feat * 1.0                       # produced on s, after a sleep
        got = attention_distill(f2, ws, qt)
        got2 = got.clone()
    torch.cuda.synchronize()
    assert torch.equal(got2, want)


@gpu
@needs_gpu
def test_gpu_cache_file_written(tmp_path, monkeypatch):
    monkeypatch.setenv("FIELDLEARN_CACHE", str(tmp_path))
    backend = ca.KernelBackend(ca.CudaLauncher())
    feat, ws, qt = sc.make_inputs(2, 64, 16, torch.float32, device="cuda")
    backend.forward(feat, ws, qt)
    torch.cuda.synchronize()
    arch = ca.arch_for(torch.cuda.get_device_capability())
    assert (tmp_path / "kernels" / ca.cache_key(arch)).exists()


def test_compiling_leaves_python_bytes_constants_intact():
    """NVRTC writes into its output buffers. Handing it `b" " * size` once wrote a NUL into
    CPython's shared one-byte b" " object, and every later b" " in the process (torch.load's
    unpickler among them) broke. If this fails, the buffers are immutable bytes again."""
    try:
        ca.nvrtc_version()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"NVRTC unavailable here: {e}")
    ca.compile_cubin("sm_87")
    assert b" " == bytes([32]) and b" " * 1 == bytes([32])
