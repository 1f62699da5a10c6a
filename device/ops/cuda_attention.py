"""The fused Grad-CAM + LAD kernels' launcher: NVRTC compile, disk cache and launch with
cuda-python. The op itself (reference, autograd Function, dispatcher) is
fieldlearn.device.ops.attention_distill, which imports this module only once a CUDA tensor
arrives; nothing here imports it back.

The source is device/csrc/attention_distill.cu (plain CUDA C, extern "C" kernels). At first
use it is compiled with NVRTC (`cuda.bindings.nvrtc`) for the compute capability of the
tensors' device, the image is cached on disk under $FIELDLEARN_CACHE/kernels (default
~/.cache/fieldlearn/kernels), keyed by (source + options sha256, arch, NVRTC version) and
written atomically, then loaded and launched with `cuda.bindings.driver` on torch's current
stream. Nothing here needs a GPU until a kernel is launched: `compile_cubin("sm_87")` and
`ptxas_report("sm_90")` run on any machine with NVRTC (CI, deploy.sh pre-compilation).

The host side is split so that it can be exercised without a GPU:

    KernelBackend(launcher)   launch geometry, workspaces, argument packing (the kernel contract)
      CudaLauncher            -> cuLaunchKernel (the real thing)
      (tests)                 -> the same .cu run by a CPU emulator, same packed arguments
    (attention_distill.TorchKernelBackend: the same contract in plain torch)

`use_backend(...)` swaps the backend that AttentionDistillFn calls (tests, self-check).

Kernel contract (all float32 except the feature map and the head rows):
    forward(feat [B,C,h,w], w [B,C], qt [B,HW] f32) -> loss [], cam [B,HW] (pre-ReLU),
        stats [B,2] = (||relu(cam)||_2 unclamped, S = sum_j q_j sign(q_j - qt_j)), loss_b [B]
    backward(feat, w, qt, cam, stats, g []) -> dfeat [B,C,h,w] (feat dtype), dw [B,C] (w dtype)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fieldlearn.device.attention import EPS
from fieldlearn.runtime.atomic import atomic_write_bytes
from fieldlearn.runtime.layout import cache_dir as runtime_cache_dir

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "attention_distill.cu"
BLOCK = 256                     # threads per block of the partial/backward kernels (FL_BLOCK)
ITEMS_BWD = 8                   # FL_ITEMS_BWD in the source
NVRTC_OPTIONS = ("-std=c++17", f"-DFL_BLOCK={BLOCK}", "-lineinfo")

_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# (feature dtype, head-row dtype) pairs compiled in the source (FL_AD_TYPED_KERNELS); any
# other head-row dtype is cast to float32 on the host.
_PAIRS = (("f32", "f32"), ("f16", "f16"), ("f16", "f32"), ("bf16", "bf16"), ("bf16", "f32"))
_ITEMS_FWD = {"f32": 8, "f16": 16, "bf16": 16}   # fl_items_fwd<T> = 32 / sizeof(T)
_MAX_SAMPLE = 1 << 30           # in-sample offsets are int in the kernels


def head_dtype(feat_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """dtype the head rows are given to the kernel in (others are cast to float32)."""
    return w_dtype if (_TAGS[feat_dtype], _TAGS.get(w_dtype)) in _PAIRS else torch.float32


def kernel_names() -> list[str]:
    """Every extern "C" kernel the source defines."""
    names = ["fl_ad_fwd_finish", "fl_ad_fwd_mean"]
    for tf, tw in _PAIRS:
        names += [f"fl_ad_fwd_partial_{tf}_{tw}", f"fl_ad_bwd_{tf}_{tw}"]
    return names


def install_hint() -> str:
    major = (torch.version.cuda or "12").split(".")[0]
    return (f'pip install "cuda-python[all]=={major}.*"  (cuda-python with NVRTC for CUDA {major}; '
            f"on a Jetson NVRTC comes with JetPack's CUDA toolkit), or set FIELDLEARN_FORCE_REF=1 "
            f"to use the PyTorch reference")


# ----------------------------------------------------------------------------- NVRTC

def _nvrtc():
    try:
        from cuda.bindings import nvrtc  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"fieldlearn's fused attention kernel needs cuda-python: {install_hint()}") from e
    return nvrtc


def _check_nvrtc(err, what: str) -> None:
    nvrtc = _nvrtc()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library cuda-python loads; RuntimeError naming the install
    command when cuda-python or libnvrtc is missing."""
    nvrtc = _nvrtc()
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # cuda-pathfinder raises when libnvrtc.so cannot be found
        raise RuntimeError(f"NVRTC could not be loaded ({e}): {install_hint()}") from e
    _check_nvrtc(err, "nvrtcVersion")
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
def supported_archs() -> tuple[int, ...]:
    """Compute capabilities (e.g. 87, 90) this NVRTC can generate code for."""
    nvrtc_version()
    nvrtc = _nvrtc()
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    _check_nvrtc(err, "nvrtcGetSupportedArchs")
    return tuple(int(a) for a in archs)


def _arch_number(arch: str) -> int:
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)", arch)
    if not m:
        raise ValueError(f"arch must look like 'sm_87' or 'compute_87', got {arch!r}")
    return int(m.group(1))


def source_text() -> str:
    return SOURCE.read_text()


def _compile(arch: str, extra: Sequence[str] = ()) -> tuple[bytes, str]:
    """Compile the source for `arch` ('sm_XX' -> cubin, 'compute_XX' -> PTX). Returns (image, log)."""
    nvrtc = _nvrtc()
    num = _arch_number(arch)
    if num not in supported_archs():
        major, minor = nvrtc_version()
        hint = (" Xavier (sm_72) needs the NVRTC of JetPack 5's CUDA 11.4 toolkit."
                if num < min(supported_archs()) else "")
        raise RuntimeError(f"NVRTC {major}.{minor} cannot generate code for {arch} "
                           f"(supported: {', '.join(map(str, supported_archs()))}).{hint}")
    err, prog = nvrtc.nvrtcCreateProgram(source_text().encode(), b"attention_distill.cu", 0, [], [])
    _check_nvrtc(err, "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in (*NVRTC_OPTIONS, f"--gpu-architecture={arch}", *extra)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        # Output buffers must be mutable: NVRTC writes into them, and `b" " * 1` is CPython's
        # shared one-byte bytes object (writing a NUL into it broke every later b" " in the
        # process, e.g. torch.load's unpickler).
        log = bytearray(size)
        nvrtc.nvrtcGetProgramLog(prog, log)
        log_text = bytes(log).rstrip(b"\0 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC failed to compile {SOURCE.name} for {arch}:\n{log_text}")
        if arch.startswith("sm_"):
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            _check_nvrtc(err, "nvrtcGetCUBINSize")
            image = bytearray(size)
            (err,) = nvrtc.nvrtcGetCUBIN(prog, image)
            _check_nvrtc(err, "nvrtcGetCUBIN")
        else:
            err, size = nvrtc.nvrtcGetPTXSize(prog)
            _check_nvrtc(err, "nvrtcGetPTXSize")
            image = bytearray(size)
            (err,) = nvrtc.nvrtcGetPTX(prog, image)
            _check_nvrtc(err, "nvrtcGetPTX")
        return bytes(image), log_text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_cubin(arch: str) -> bytes:
    """Cubin for `arch` (e.g. 'sm_87' for Jetson Orin, 'sm_90' for H100/H200). No GPU needed."""
    if not arch.startswith("sm_"):
        arch = f"sm_{_arch_number(arch)}"
    return _compile(arch)[0]


def ptxas_report(arch: str) -> dict[str, dict[str, int]]:
    """Per kernel: registers, spill_stores, spill_loads, stack_frame, smem (bytes), from ptxas -v
    run inside NVRTC (no nvcc needed)."""
    _, log = _compile(arch if arch.startswith("sm_") else f"sm_{_arch_number(arch)}", ("--ptxas-options=-v",))
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    report: dict[str, dict[str, int]] = {}
    cur: dict[str, int] | None = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = report.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return report


# ----------------------------------------------------------------------------- disk cache

def cache_dir() -> Path:
    """The kernels' folder in fieldlearn's cache ($FIELDLEARN_CACHE, else ~/.cache/fieldlearn)."""
    return runtime_cache_dir() / "kernels"


def cache_key(arch: str) -> str:
    h = hashlib.sha256(source_text().encode())
    h.update("\0".join(NVRTC_OPTIONS).encode())
    major, minor = nvrtc_version()
    ext = "cubin" if arch.startswith("sm_") else "ptx"
    return f"attention_distill-{h.hexdigest()[:24]}-{arch}-nvrtc{major}.{minor}.{ext}"


def _image_ok(arch: str, image: bytes) -> bool:
    return image.startswith(b"\x7fELF") if arch.startswith("sm_") else b".entry" in image


def kernel_image(arch: str) -> bytes:
    """Cubin ('sm_XX') or PTX ('compute_XX') from the disk cache, compiled and stored on a miss."""
    path = cache_dir() / cache_key(arch)
    try:
        image = path.read_bytes()
        if _image_ok(arch, image):
            return image
    except OSError:
        pass
    image = _compile(arch)[0]
    try:  # atomic: a concurrent reader sees the old file or the whole new one
        atomic_write_bytes(path, image)
    except OSError:
        pass  # read-only home: compile every run, still correct
    return image


def precompile(arch: str) -> Path:
    """Fill the disk cache for `arch` (deploy.sh calls this before the first training run)."""
    kernel_image(arch)
    return cache_dir() / cache_key(arch)


def arch_for(capability: tuple[int, int]) -> str:
    """'sm_XY' for a compute capability NVRTC knows; otherwise PTX for the newest arch below it
    (the driver JIT-compiles it)."""
    cc = capability[0] * 10 + capability[1]
    archs = supported_archs()
    if cc in archs:
        return f"sm_{cc}"
    lower = [a for a in archs if a <= cc]
    if lower:
        return f"compute_{max(lower)}"
    major, minor = nvrtc_version()
    raise RuntimeError(
        f"NVRTC {major}.{minor} cannot target compute capability {capability[0]}.{capability[1]} "
        f"(oldest it supports: sm_{min(archs)}). Jetson Xavier (sm_72) needs JetPack 5's CUDA 11.4 "
        f"NVRTC with cuda-python 11.8; or set FIELDLEARN_FORCE_REF=1.")


# ----------------------------------------------------------------------------- launch geometry

def plan(B: int, C: int, HW: int, items: int, num_sms: int, block: int = BLOCK,
         blocks_per_sm: int = 8, waves: int = 2) -> tuple[int, int]:
    """(nsplit, cpb): each sample's C channels go to nsplit blocks of cpb channels (the last
    one shorter). cpb is a whole number of rounds (KR * items channels) so no lane idles, and
    there are enough blocks for about `waves` waves of the GPU."""
    tj = min(HW, block)
    unit = (block // tj) * items
    units = -(-C // unit)
    want = max(1, -(-num_sms * blocks_per_sm * waves // B))
    nsplit = min(units, want)
    cpb = -(-units // nsplit) * unit
    return -(-C // cpb), cpb


def finish_block(HW: int) -> int:
    return min(BLOCK, 32 * -(-HW // 32))


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@dataclass
class Launch:
    name: str
    grid: int
    block: int
    args: tuple  # ctypes values, in the kernel's parameter order


class CudaLauncher:
    """Loads the module once per device (primary context) and launches on torch's stream."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver  # noqa: PLC0415
        except ImportError as e:
            raise RuntimeError(f"fieldlearn's fused attention kernel needs cuda-python: {install_hint()}") from e
        self.driver = driver
        try:
            err = driver.cuInit(0)[0]
        except Exception as e:  # cuda-pathfinder: no libcuda.so (no driver)
            raise RuntimeError(f"the CUDA driver library could not be loaded: {e}") from e
        self._check(err, "cuInit")
        self._modules: dict[int, tuple[Any, Any, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def _check(self, err, what: str) -> None:
        d = self.driver
        if err != d.CUresult.CUDA_SUCCESS:
            _, msg = d.cuGetErrorString(err)
            raise RuntimeError(f"{what} failed: {err} ({msg.decode() if msg else '?'})")

    def num_sms(self, device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def _module(self, index: int):
        mod = self._modules.get(index)
        if mod is not None:
            return mod
        with self._lock:
            if index in self._modules:
                return self._modules[index]
            d = self.driver
            arch = arch_for(torch.cuda.get_device_capability(index))
            image = kernel_image(arch)
            if not arch.startswith("sm_"):
                image = image.rstrip(b"\0") + b"\0"
            err, dev = d.cuDeviceGet(index)
            self._check(err, "cuDeviceGet")
            err, ctx = d.cuDevicePrimaryCtxRetain(dev)
            self._check(err, "cuDevicePrimaryCtxRetain")
            self._make_current(ctx)
            err, module = d.cuModuleLoadData(image)
            if err != d.CUresult.CUDA_SUCCESS and arch.startswith("sm_"):
                # a damaged cache entry, or a cubin this driver cannot load: compile afresh
                image = _compile(arch)[0]
                err, module = d.cuModuleLoadData(image)
            self._check(err, f"cuModuleLoadData({arch})")
            funcs = {}
            for name in kernel_names():
                err, fn = d.cuModuleGetFunction(module, name.encode())
                self._check(err, f"cuModuleGetFunction({name})")
                funcs[name] = fn
            self._modules[index] = (ctx, module, funcs)
            return self._modules[index]

    def _make_current(self, ctx) -> None:
        d = self.driver
        err, cur = d.cuCtxGetCurrent()
        self._check(err, "cuCtxGetCurrent")
        if int(cur) != int(ctx):
            self._check(d.cuCtxSetCurrent(ctx)[0], "cuCtxSetCurrent")

    def run(self, device: torch.device, launches: Sequence[Launch]) -> None:
        d = self.driver
        index = device.index if device.index is not None else torch.cuda.current_device()
        guard = torch.cuda.device(index) if torch.cuda.current_device() != index else contextlib.nullcontext()
        with guard:
            ctx, _, funcs = self._module(index)
            self._make_current(ctx)       # autograd's worker threads may not have it yet
            stream = d.CUstream(torch.cuda.current_stream(index).cuda_stream)
            for ln in launches:
                params = (ctypes.c_void_p * len(ln.args))(*[ctypes.addressof(a) for a in ln.args])
                (err,) = d.cuLaunchKernel(funcs[ln.name], ln.grid, 1, 1, ln.block, 1, 1, 0, stream,
                                          ctypes.addressof(params), 0)
                self._check(err, f"cuLaunchKernel({ln.name}, grid={ln.grid}, block={ln.block})")


@dataclass
class FwdOut:
    loss: torch.Tensor     # []       float32
    cam: torch.Tensor      # [B, HW]  float32, pre-ReLU
    stats: torch.Tensor    # [B, 2]   float32: (unclamped norm, S)
    loss_b: torch.Tensor   # [B]      float32


class KernelBackend:
    """Host side of the fused kernels: geometry, workspaces and argument packing.

    `launcher` runs a list of Launch records on a device (CudaLauncher; the tests' emulator).
    Optional `out`/`workspace` tensors let the self-check NaN-poison every buffer first.
    """

    name = "cuda"

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher

    def supports(self, feat: torch.Tensor, w: torch.Tensor, qt: torch.Tensor) -> bool:
        return (feat.dtype in _TAGS and feat.numel() > 0
                and feat.shape[1] * feat.shape[2] * feat.shape[3] <= _MAX_SAMPLE)

    def head_dtype(self, feat_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
        return head_dtype(feat_dtype, w_dtype)

    def workspace_numel(self, feat: torch.Tensor) -> int:
        """float32 elements of the forward's partial-sum workspace."""
        B, C, HW, nsplit, _ = self._geometry(feat, _ITEMS_FWD[_TAGS[feat.dtype]])
        return B * nsplit * HW

    def _geometry(self, feat: torch.Tensor, items: int) -> tuple[int, int, int, int, int]:
        B, C, h, w = feat.shape
        HW = h * w
        nsplit, cpb = plan(B, C, HW, items, self.launcher.num_sms(feat.device))
        return B, C, HW, nsplit, cpb

    def forward(self, feat: torch.Tensor, w: torch.Tensor, qt: torch.Tensor,
                out: FwdOut | None = None, workspace: torch.Tensor | None = None) -> FwdOut:
        tf, tw = _TAGS[feat.dtype], _TAGS[w.dtype]
        B, C, HW, nsplit, cpb = self._geometry(feat, _ITEMS_FWD[tf])
        f32 = dict(device=feat.device, dtype=torch.float32)
        if out is None:
            out = FwdOut(torch.empty((), **f32), torch.empty(B, HW, **f32),
                         torch.empty(B, 2, **f32), torch.empty(B, **f32))
        part = workspace if workspace is not None else torch.empty(B * nsplit * HW, **f32)
        assert part.numel() >= B * nsplit * HW
        i, fl = ctypes.c_int, ctypes.c_float
        self.launcher.run(feat.device, [
            Launch(f"fl_ad_fwd_partial_{tf}_{tw}", B * nsplit, BLOCK,
                   (_ptr(feat), _ptr(w), _ptr(part), i(C), i(HW), i(nsplit), i(cpb))),
            Launch("fl_ad_fwd_finish", B, finish_block(HW),
                   (_ptr(part), _ptr(qt), _ptr(out.cam), _ptr(out.stats), _ptr(out.loss_b),
                    i(HW), i(nsplit), fl(EPS))),
            Launch("fl_ad_fwd_mean", 1, BLOCK, (_ptr(out.loss_b), _ptr(out.loss), i(B))),
        ])
        return out

    def backward(self, feat: torch.Tensor, w: torch.Tensor, qt: torch.Tensor, cam: torch.Tensor,
                 stats: torch.Tensor, grad: torch.Tensor,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tf, tw = _TAGS[feat.dtype], _TAGS[w.dtype]
        B, C, HW, nsplit, cpb = self._geometry(feat, ITEMS_BWD)
        dfeat, dw = out if out is not None else (torch.empty_like(feat), torch.empty_like(w))
        g = grad.detach().to(device=feat.device, dtype=torch.float32).reshape(1).contiguous()
        i = ctypes.c_int
        self.launcher.run(feat.device, [
            Launch(f"fl_ad_bwd_{tf}_{tw}", B * nsplit, BLOCK,
                   (_ptr(feat), _ptr(w), _ptr(cam), _ptr(qt), _ptr(stats), _ptr(g), _ptr(dfeat), _ptr(dw),
                    i(B), i(C), i(HW), i(nsplit), i(cpb), ctypes.c_float(EPS))),
        ])
        return dfeat, dw


# ----------------------------------------------------------------------------- backend choice

_backend: Any = None
_backend_lock = threading.Lock()


def get_backend() -> Any:
    """The backend AttentionDistillFn uses: the CUDA kernels unless `use_backend` says otherwise."""
    global _backend
    if _backend is None:
        with _backend_lock:
            if _backend is None:
                _backend = KernelBackend(CudaLauncher())
    return _backend


@contextlib.contextmanager
def use_backend(backend: Any) -> Iterator[Any]:
    """Temporarily route AttentionDistillFn through `backend` (tests, self-check)."""
    global _backend
    prev = _backend
    _backend = backend
    try:
        yield backend
    finally:
        _backend = prev


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True where a CUDA device is present (then a missing cuda-python/NVRTC is an error that
    names the install command, not a silent fallback). False on CPU-only machines."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - broken driver installs
        return False
