"""Which backend runs a graph here: the one chooser for the model (fieldlearn classify), the
teacher of an increment and the frozen trunk's encode pass.

    unavailable_reason(backend)                  None if it can run here, else why not
    pick_backend(prefer, order, device, option)  "auto": the first of `order` that runs here
                                                 and suits `device`; a named one: it, or a
                                                 UserError naming `option` and why

Standard library only (tensorrt and onnxruntime are looked up, not needed): an
inference-only device runs it without torch.
"""

from __future__ import annotations

from typing import Sequence

from fieldlearn.runtime.errors import UserError

BACKENDS = ("tensorrt", "onnxruntime", "torch")      # the fastest first


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run on this machine, else one line saying why not."""
    if backend == "torch":
        return None
    if backend == "tensorrt":
        from fieldlearn.runtime.cuda import tensorrt_unavailable_reason  # noqa: PLC0415

        return tensorrt_unavailable_reason()
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401, PLC0415
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime)"
        return None
    return f"unknown backend {backend!r}"


def _suits(backend: str, device: str) -> bool:
    """Whether "auto" may take an available `backend` for work on `device`: for work on a
    CUDA device, ONNX Runtime only with its CUDA provider (a CPU session would be slower than
    torch on the GPU and move every batch to the host and back)."""
    if backend != "onnxruntime" or not str(device).startswith("cuda"):
        return True
    import onnxruntime as ort  # noqa: PLC0415

    return "CUDAExecutionProvider" in ort.get_available_providers()


def pick_backend(prefer: str, order: Sequence[str] = BACKENDS, device: str = "cpu", option: str = "--backend") -> str:
    """The backend to run with. prefer "auto": the first of `order` (fastest first) that can
    run here and suits `device`; UserError listing why none can when none does. A backend
    named in `order`: that one, or UserError `{option} {prefer}: why not`."""
    if prefer != "auto":
        if prefer not in order:
            raise UserError(f"{option} {prefer}: unknown (choose {', '.join(('auto', *order))})")
        reason = unavailable_reason(prefer)
        if reason is not None:
            raise UserError(f"{option} {prefer}: {reason}")
        return prefer
    why = []
    for backend in order:
        reason = unavailable_reason(backend)
        if reason is None and _suits(backend, device):
            return backend
        why.append(f"{backend}: {reason or f'not for {device}'}")
    raise UserError(f"{option} auto: no backend can run here ({'; '.join(why)})")


__all__ = ["BACKENDS", "pick_backend", "unavailable_reason"]
