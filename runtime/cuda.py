"""CUDA and TensorRT probes that work with or without torch.

We use NVIDIA's cuda-python (`cuda.bindings`, binary wheels, imports on a machine with no
GPU or driver) rather than pycuda, whose sdist does not build without the CUDA headers and
a libcuda stub. When torch is already imported its view of CUDA is used instead, so the
learner never loads a second runtime binding for nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any


def cudart() -> ModuleType:
    """cuda-python's runtime API module (>= 12.6 layout, then the older `cuda.cudart`)."""
    try:
        from cuda.bindings import runtime  # noqa: PLC0415
    except ImportError:
        try:
            from cuda import cudart as runtime  # noqa: PLC0415 - cuda-python < 12.6 (JetPack 5)
        except ImportError:
            raise ImportError("cuda-python is not installed: pip install 'cuda-python>=12' "
                              "(or install torch with CUDA)") from None
    return runtime


def check(result: tuple) -> Any:
    """cuda-python calls return (error, *values): raise on error, return the value(s)."""
    err, *values = result
    rt = cudart()
    if err != rt.cudaError_t.cudaSuccess:
        _, text = rt.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {err}: {text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    """Number of usable CUDA devices; 0 without a GPU, a driver or any binding."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        return int(check(cudart().cudaGetDeviceCount()))
    except Exception:  # noqa: BLE001 - no binding, no driver (DynamicLibNotFoundError), no device
        return 0


def device_description(index: int = 0) -> tuple[str, tuple[int, int]]:
    """(device name, (major, minor) compute capability) of CUDA device `index`."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))
    props = check(cudart().cudaGetDeviceProperties(index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), (int(props.major), int(props.minor))


def import_tensorrt() -> ModuleType:
    from fieldlearn.runtime.errors import UserError  # noqa: PLC0415

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise UserError(f"TensorRT backend unavailable: {reason}")
    return importlib.import_module("tensorrt")


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can run here (tensorrt imports and a CUDA device exists), else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return ("the tensorrt Python package is not installed (on a Jetson it comes with JetPack: "
                "apt install python3-libnvinfer)")
    try:
        importlib.import_module("tensorrt")
    except Exception as e:  # noqa: BLE001 - e.g. a missing libnvinfer / libnvonnxparser
        return f"import tensorrt failed: {type(e).__name__}: {e}"
    if device_count() == 0:
        return "no CUDA device is visible"
    return None
