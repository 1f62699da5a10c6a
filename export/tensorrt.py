"""TensorRT engine from an exported ONNX file, written against the 8.6 and 10.x Python APIs.

    build_engine(onnx_path, engine_path)  ->  engine_path (built, or reused from the cache)

Kept thin on purpose: TensorRT cannot be installed on the dev/CI machines, so this file
is exercised on a Jetson (JetPack 6: TensorRT 10.3; JetPack 5: 8.5/8.6). The APIs used
exist in both 8.6 and 10.x except where marked "8.x/10.x":

    Builder.create_network, OnnxParser.parse, create_builder_config,
    config.set_memory_pool_limit(WORKSPACE, bytes)   (8.4+; max_workspace_size is gone in 10)
    create_optimization_profile + set_shape(min/opt/max batch) + add_optimization_profile
    builder.build_serialized_network                 (build_engine is gone in 10)

An engine is only valid for the TensorRT version and GPU that built it, so each one has a
sidecar `<engine>.json` recording (ONNX sha256, TensorRT version, device name, compute
capability, build options); `build_engine` reuses the file only when all of them match.
Without an explicit path, engines go to the cache dir keyed by a hash of that record.

No torch import here: an inference-only device builds and runs engines without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fieldlearn.runtime.cuda import device_description, import_tensorrt, tensorrt_unavailable_reason
from fieldlearn.runtime.atomic import atomic_write_bytes
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import cache_dir


def tensorrt_available() -> bool:
    """True when `tensorrt` imports and a CUDA device is visible."""
    return tensorrt_unavailable_reason() is None


def build_options(*, min_batch: int = 1, opt_batch: int = 64, max_batch: int = 64, fp16: bool | None = None,
                  workspace_bytes: int = 1 << 30) -> dict[str, Any]:
    """Build settings (they are part of the cache key). fp16=None: where the GPU is fast at it."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    return {"min_batch": int(min_batch), "opt_batch": int(opt_batch), "max_batch": int(max_batch),
            "fp16": fp16, "workspace_bytes": int(workspace_bytes)}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_identity(onnx_path: str | Path, trt_version: str | None = None) -> dict[str, Any]:
    """What an engine is only valid for: this ONNX file, this TensorRT, this GPU."""
    if trt_version is None:
        trt_version = import_tensorrt().__version__
    name, cc = device_description(0)
    return {"onnx_sha256": file_sha256(onnx_path), "tensorrt": trt_version, "device": name,
            "compute_capability": f"{cc[0]}.{cc[1]}"}


def _sidecar(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def engine_is_current(onnx_path: str | Path, engine_path: str | Path, options: dict[str, Any] | None = None) -> bool:
    """The engine file exists and its sidecar matches this ONNX, TensorRT and GPU (and the
    build options, when given)."""
    engine_path = Path(engine_path)
    if not engine_path.is_file() or not _sidecar(engine_path).is_file():
        return False
    try:
        recorded = json.loads(_sidecar(engine_path).read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("identity") != engine_identity(onnx_path):
        return False
    return options is None or recorded.get("options") == options


def cached_engine_path(onnx_path: str | Path, options: dict[str, Any]) -> Path:
    record = json.dumps({"identity": engine_identity(onnx_path), "options": options}, sort_keys=True)
    return cache_dir() / "engines" / f"{hashlib.sha256(record.encode()).hexdigest()[:32]}.engine"


def build_engine(onnx_path: str | Path, engine_path: str | Path | None = None, **options: Any) -> Path:
    """Serialised TensorRT engine for `onnx_path` (dynamic batch axis), reused when current.

    options: see build_options (min/opt/max batch of the optimisation profile, fp16, workspace).
    """
    trt = import_tensorrt()  # UserError naming what is missing
    onnx_path = Path(onnx_path)
    opts = build_options(**options)
    engine_path = Path(engine_path) if engine_path is not None else cached_engine_path(onnx_path, opts)
    if engine_is_current(onnx_path, engine_path, opts):
        return engine_path
    serialized = _build_serialized(trt, onnx_path, opts)
    atomic_write_bytes(engine_path, bytes(serialized))
    record = {"identity": engine_identity(onnx_path, trt.__version__), "options": opts}
    atomic_write_bytes(_sidecar(engine_path), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return engine_path


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _use_fp16(trt, builder, requested: bool | None) -> bool:
    if requested is not None:
        return requested
    if _major(trt) < 10:
        return bool(builder.platform_has_fast_fp16)
    # 8.x/10.x: platform_has_fast_fp16 is deprecated in 10.x ("query CUDA directly"):
    # fast FP16 is sm_53 and sm_60/62 (Jetson TX1/TX2), and every GPU from sm_70 on.
    _, cc = device_description(0)
    return cc in ((5, 3), (6, 0), (6, 2)) or cc >= (7, 0)


def _build_serialized(trt, onnx_path: Path, opts: dict[str, Any]):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 8.x/10.x: explicit batch must be asked for in 8.x; in 10.x it is the only mode and
    # the flag is deprecated.
    flags = 0 if _major(trt) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"{onnx_path}: TensorRT's ONNX parser failed: {'; '.join(errors) or 'no detail'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts["workspace_bytes"])
    # 8.x/10.x: BuilderFlag.FP16 is deprecated in late 10.x (strongly typed networks), so
    # only set where it still exists.
    if _use_fp16(trt, builder, opts["fp16"]) and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise UserError(f"{onnx_path}: input {tensor.name} has dynamic axes other than the batch: {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, (opts["min_batch"], *rest), (opts["opt_batch"], *rest), (opts["max_batch"], *rest))
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    return serialized
