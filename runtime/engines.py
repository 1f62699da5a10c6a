"""Inference engines that behave like a model: call with a batch, get named outputs.

    engine(x) -> {"output_0": logits, ...}            x: numpy array or torch tensor
    engine({"z": z}) -> {"logits": ..., "features": ...}

Given numpy, an engine returns numpy arrays; given a torch tensor, it returns torch
tensors on the input's device (TrtEngine keeps CUDA inputs and outputs on the GPU).

    TorchEngine  an nn.Module whose forward returns the outputs in order (tests, fallback)
    OrtEngine    onnxruntime; spinning threads off so it does not starve a trainer
    TrtEngine    a serialised TensorRT engine (fieldlearn.export.tensorrt builds it)

`best_engine(onnx_path)` picks TensorRT > ONNX Runtime. `cross_validate(a, b, inputs)`
compares any two engines on the same inputs. torch, onnxruntime and tensorrt are each
imported only by the engine that needs them: classify runs with onnxruntime + numpy.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fieldlearn.runtime.errors import UserError

Batch = Any  # np.ndarray | torch.Tensor


def _torch_tensor_type():
    torch = sys.modules.get("torch")  # a torch tensor can only exist if torch is imported
    return None if torch is None else torch.Tensor


def is_torch(x: Any) -> bool:
    t = _torch_tensor_type()
    return t is not None and isinstance(x, t)


def to_numpy(x: Batch, dtype: np.dtype | type = np.float32) -> np.ndarray:
    if is_torch(x):
        x = x.detach().cpu()
        x = (x.float() if x.dtype == sys.modules["torch"].bfloat16 else x).numpy()  # numpy has no bfloat16
    return np.ascontiguousarray(x, dtype=dtype)


class Engine:
    """Base: named inputs/outputs and the numpy/torch conversion around `_run`."""

    backend = "?"
    input_names: list[str]
    output_names: list[str]

    def __call__(self, x: Batch | Mapping[str, Batch]) -> dict[str, Batch]:
        feeds = dict(x) if isinstance(x, Mapping) else {self.input_names[0]: x}
        unknown = set(feeds) - set(self.input_names)
        if unknown or len(feeds) != len(self.input_names):
            raise ValueError(f"{self.backend} engine takes inputs {self.input_names}, got {sorted(feeds)}")
        return self._run(feeds)

    def _run(self, feeds: dict[str, Batch]) -> dict[str, Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Free the model, session or engine now (calling the engine after is an error)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.input_names} -> {self.output_names})"


class TorchEngine(Engine):
    """An nn.Module as an engine. The module is put in eval mode; its forward returns one
    tensor or a tuple in the order of `output_names`."""

    backend = "torch"

    def __init__(self, module, output_names: Sequence[str], input_names: Sequence[str] = ("input_0",)):
        self.module = module.eval()
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def _run(self, feeds: dict[str, Batch]) -> dict[str, Batch]:
        import torch  # noqa: PLC0415

        if self.module is None:
            raise RuntimeError("torch engine used after close()")
        want_torch = any(is_torch(v) for v in feeds.values())
        param = next(self.module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        args = [torch.as_tensor(feeds[n]).to(device) for n in self.input_names]
        with torch.inference_mode():
            outs = self.module(*args)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        if len(outs) != len(self.output_names):
            raise ValueError(f"module returned {len(outs)} outputs, expected {self.output_names}")
        if want_torch:
            return dict(zip(self.output_names, outs))
        return {n: o.detach().cpu().numpy() for n, o in zip(self.output_names, outs)}

    def close(self) -> None:
        self.module = None


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}


def ort_providers() -> list[Any]:
    """Execution providers, best first: CUDA where onnxruntime-gpu sees it, CPU always.

    onnxruntime-gpu lists TensorrtExecutionProvider even where libnvinfer is missing (it
    then logs an error per session), so that one is only used where `tensorrt` imports;
    it keeps its engines in the fieldlearn cache dir so they are built once.
    """
    import onnxruntime as ort  # noqa: PLC0415

    available = set(ort.get_available_providers())
    providers: list[Any] = []
    if "TensorrtExecutionProvider" in available:
        from fieldlearn.runtime.cuda import tensorrt_unavailable_reason  # noqa: PLC0415
        from fieldlearn.runtime.layout import cache_dir  # noqa: PLC0415

        if tensorrt_unavailable_reason() is None:
            cache = cache_dir() / "ort-trt"
            cache.mkdir(parents=True, exist_ok=True)
            providers.append(("TensorrtExecutionProvider", {
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_fp16_enable": True}))
    if "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


class OrtEngine(Engine):
    """onnxruntime InferenceSession as an engine.

    onnx_path: the model file, or the model itself as bytes (kept in memory only).
    threads: intra-op threads (0: onnxruntime's default, one per physical core). Spinning
    is disabled for both thread pools and inter-op parallelism is off, so between calls
    the engine's threads sleep instead of burning the cores that torch is training on.
    arena: onnxruntime's CPU memory arena; off, a session keeps no activations between
    calls (the learner's trunk pass: hundreds of MB at 128 px otherwise).
    """

    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path | bytes, *, threads: int = 0, providers: Sequence[Any] | None = None,
                 arena: bool = True):
        import onnxruntime as ort  # noqa: PLC0415

        in_memory = isinstance(onnx_path, bytes)
        self.path = Path("<onnx in memory>") if in_memory else Path(onnx_path)
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = arena
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3  # errors only: no per-session warnings on stderr
        try:
            self.session = ort.InferenceSession(onnx_path if in_memory else str(self.path), sess_options=so,
                                                providers=list(providers) if providers else ort_providers())
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise UserError(f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = {i.name: _ORT_DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def close(self) -> None:
        self.session = None   # the session owns its arena and thread pools: freed with it

    def _run(self, feeds: dict[str, Batch]) -> dict[str, Batch]:
        if self.session is None:
            raise RuntimeError(f"{self.path}: onnxruntime engine used after close()")
        ref = next((v for v in feeds.values() if is_torch(v)), None)
        outs = self.session.run(self.output_names, {n: to_numpy(v, self._dtypes[n]) for n, v in feeds.items()})
        if ref is None:
            return dict(zip(self.output_names, outs))
        import torch  # noqa: PLC0415 - already imported: the input is a torch tensor

        return {n: torch.from_numpy(o).to(ref.device) for n, o in zip(self.output_names, outs)}


class TrtEngine(Engine):
    """A serialised TensorRT engine (8.6 or 10.x; only the name-based tensor API that both
    share is used: set_input_shape / set_tensor_address / execute_async_v3).

    With torch (CUDA) importable, I/O buffers are torch CUDA tensors on the current stream,
    so a CUDA input's outputs never leave the GPU. Without torch, buffers are cuda-python
    allocations reused across calls, and numpy arrays go in and come out.
    """

    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, *, device: int = 0):
        from fieldlearn.runtime.cuda import import_tensorrt  # noqa: PLC0415

        trt = import_tensorrt()
        self.path = Path(engine_path)
        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.path}: TensorRT {trt.__version__} cannot deserialise it "
                            "(built by another TensorRT version or for another GPU? delete it to rebuild)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._torch = _torch_with_cuda()
        self._buffers: dict[str, tuple[int, int]] = {}  # cuda-python path: name -> (pointer, bytes)
        self._stream = None
        if self._torch is None:
            from fieldlearn.runtime import cuda  # noqa: PLC0415

            self._cudart = cuda.cudart()
            self._check = cuda.check
            self._check(self._cudart.cudaSetDevice(device))
            self._stream = self._check(self._cudart.cudaStreamCreate())

    def _set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise ValueError(f"{self.path}: input {name} shape {shape} is outside the engine's "
                             "optimisation profile (rebuild with a larger max batch)")

    def _run(self, feeds: dict[str, Batch]) -> dict[str, Batch]:
        if self.context is None:
            raise RuntimeError(f"{self.path}: TensorRT engine used after close()")
        if self._torch is not None:
            return self._run_torch(feeds)
        return self._run_cudart(feeds)

    def _run_torch(self, feeds: dict[str, Batch]) -> dict[str, Batch]:
        torch = self._torch
        dev = torch.device("cuda", self.device)
        ref = next((v for v in feeds.values() if is_torch(v)), None)
        tdtype = {n: torch.from_numpy(np.empty(0, d)).dtype for n, d in self._dtypes.items()}
        keep = {}  # inputs must live until the stream has run
        for n, v in feeds.items():
            t = torch.as_tensor(v).to(dev, tdtype[n]).contiguous()
            keep[n] = t
            self._set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
        outs = {}
        for n in self.output_names:
            outs[n] = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=tdtype[n], device=dev)
            self.context.set_tensor_address(n, outs[n].data_ptr())
        stream = torch.cuda.current_stream(dev)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        if ref is not None:
            return {n: o.to(ref.device) for n, o in outs.items()}   # no copy when ref is on this GPU
        return {n: o.cpu().numpy() for n, o in outs.items()}       # .cpu() waits for the stream

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._check(self._cudart.cudaFree(ptr))
            ptr = int(self._check(self._cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _run_cudart(self, feeds: dict[str, Batch]) -> dict[str, Batch]:
        rt, check, stream = self._cudart, self._check, self._stream
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = {n: to_numpy(v, self._dtypes[n]) for n, v in feeds.items()}
        for n, arr in hosts.items():
            ptr = self._buffer(n, arr.nbytes)
            check(rt.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, stream))
            self._set_input_shape(n, arr.shape)
            self.context.set_tensor_address(n, ptr)
        outs = {}
        for n in self.output_names:
            outs[n] = np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n])
            self.context.set_tensor_address(n, self._buffer(n, outs[n].nbytes))
        if not self.context.execute_async_v3(int(stream)):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        for n, arr in outs.items():
            check(rt.cudaMemcpyAsync(arr.ctypes.data, self._buffers[n][0], arr.nbytes, d2h, stream))
        check(rt.cudaStreamSynchronize(stream))
        return outs

    def close(self) -> None:
        if self._torch is None:
            for ptr, _ in self._buffers.values():
                self._cudart.cudaFree(ptr)
            self._buffers.clear()
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
                self._stream = None
        self.context = self.engine = None   # context before engine, as TensorRT requires

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _torch_with_cuda():
    """torch if it is importable and sees a GPU, else None (an inference-only device)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


BACKENDS = ("auto", "onnxruntime", "tensorrt")


def best_engine(onnx_path: str | Path, prefer: str = "auto", *, threads: int = 0,
                max_batch: int = 32) -> Engine:
    """The fastest engine for an ONNX file: TensorRT (engine built once and cached, see
    fieldlearn.export.tensorrt) > ONNX Runtime. `prefer` forces one; UserError if it
    cannot run here. There is no torch fallback: torch cannot run an ONNX file."""
    from fieldlearn.runtime.backends import pick_backend  # noqa: PLC0415

    onnx_path = Path(onnx_path)
    if pick_backend(prefer, ("tensorrt", "onnxruntime")) == "tensorrt":
        from fieldlearn.export.tensorrt import build_engine, engine_is_current  # noqa: PLC0415

        beside = onnx_path.with_suffix(".engine")
        opts = {"min_batch": 1, "opt_batch": max_batch, "max_batch": max_batch}
        path = beside if engine_is_current(onnx_path, beside) else build_engine(onnx_path, None, **opts)
        return TrtEngine(path)
    return OrtEngine(onnx_path, threads=threads)


class ParityError(UserError, AssertionError):
    """Two engines disagree on the same inputs by more than the tolerance."""


class DegenerateReference(ParityError):
    """The reference output is ~0 or the same for every input: nothing to compare."""


def relative_error(a: Batch, b: Batch) -> float:
    """max |a - b| / max |b|: scale-free, so it means the same for logits and features."""
    a, b = to_numpy(a, np.float64), to_numpy(b, np.float64)
    if a.shape != b.shape:
        raise ParityError(f"shape {a.shape} vs {b.shape}")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    if not np.isfinite(diff):
        return float("inf")
    return diff / max(scale, 1e-30)


def cross_validate(a: Engine, b: Engine, inputs: Batch | Mapping[str, Batch], rtol: float = 1e-3,
                   min_scale: float = 1e-6) -> dict[str, float]:
    """Run both engines on the same inputs; {output name: relative error of a against b}.

    Raises ParityError when an output differs by more than rtol, and also when b's output
    cannot make the check meaningful: all ~0 (|b| < min_scale), or, for a batch of several
    inputs, the same for every input (an untrained MobileNetV2 in eval mode outputs its
    head bias whatever the image, so any exporter would "pass")."""
    out_a, out_b = a(inputs), b(inputs)
    if list(out_a) != list(out_b):
        raise ParityError(f"{a.backend} outputs {list(out_a)} vs {b.backend} outputs {list(out_b)}")
    errors = {}
    for name in out_b:
        ref = to_numpy(out_b[name], np.float64)
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        if scale < min_scale:
            raise DegenerateReference(f"{name}: reference output max |x| = {scale:.3g} is too small to compare "
                              "(untrained or collapsed net?)")
        if ref.ndim and ref.shape[0] > 1:
            spread = float(np.max(np.abs(ref - ref.mean(axis=0))))
            if spread < max(min_scale, 1e-5 * scale):
                raise DegenerateReference(f"{name}: reference output is the same for every input (spread {spread:.3g}): "
                                  "nothing to compare (untrained net? warm its BatchNorm or use real images)")
        errors[name] = relative_error(out_a[name], out_b[name])
    bad = {n: e for n, e in errors.items() if not e <= rtol}
    if bad:
        raise ParityError(f"{a.backend} vs {b.backend}: relative error "
                          + ", ".join(f"{n} {e:.3g}" for n, e in bad.items()) + f" > {rtol:g}")
    return errors
