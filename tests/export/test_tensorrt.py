"""TensorRT engine builder and engine.

The real tests need `tensorrt` and a CUDA GPU and skip with the reason elsewhere (no
TensorRT can be installed on the dev/CI machines). The fake-module tests run everywhere:
they drive build_engine through stand-ins that have only the documented 8.6 / 10.x
Python API (the 10.x one lacks what 10.x deprecated), to catch a call to an API that
does not exist in one of the two versions, and they check the cache key.
"""

from __future__ import annotations

import importlib.machinery
import json
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import fieldlearn.export.tensorrt as trt_build
import fieldlearn.runtime.cuda as rcuda
from fieldlearn.runtime.cuda import tensorrt_unavailable_reason
from fieldlearn.runtime.errors import UserError

REASON = tensorrt_unavailable_reason()


# ------------------------------------------------------------------ real TensorRT (Jetson / GPU box)

@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT unavailable: {REASON}")
def test_engine_matches_onnxruntime_and_is_cached(tmp_path):
    """If this fails, the TensorRT engine computes something else than the ONNX model, or
    is rebuilt on every run."""
    from fieldlearn.export.onnx import export_onnx
    from fieldlearn.runtime.engines import OrtEngine, TrtEngine, cross_validate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    onnx_path = export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32), metadata={}, output_names=["output_0"])
    engine_path = trt_build.build_engine(onnx_path, tmp_path / "m.engine", opt_batch=4, max_batch=8)
    mtime = engine_path.stat().st_mtime_ns
    assert trt_build.build_engine(onnx_path, tmp_path / "m.engine", opt_batch=4, max_batch=8).stat().st_mtime_ns == mtime
    trt_engine = TrtEngine(engine_path)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    cross_validate(trt_engine, OrtEngine(onnx_path), x, rtol=2e-2)
    out = trt_engine(torch.from_numpy(x).cuda())
    assert out["output_0"].is_cuda                       # CUDA in -> stays on the GPU


@pytest.mark.skipif(REASON is None, reason="TensorRT is present here")
def test_missing_tensorrt_is_a_user_error(tmp_path):
    """If this fails, `fieldlearn export --engine` on a machine without TensorRT crashes
    with an ImportError instead of saying what is missing."""
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert not trt_build.tensorrt_available()
    with pytest.raises(UserError, match="TensorRT backend unavailable"):
        trt_build.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")


# ------------------------------------------------------------------ fake tensorrt modules

def fake_tensorrt(version: str, calls: list, parse_ok: bool = True) -> types.ModuleType:
    """A `tensorrt` module with only the documented Python API used to build an engine."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class MemoryPoolType:
        WORKSPACE = 0

    class BuilderFlag:
        FP16 = 0

    class Input:
        name, shape = "input_0", (-1, 3, 64, 64)

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return Input()

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse(self, data):
            calls.append(("parse", len(data)))
            return parse_ok

        def get_error(self, i):
            return "Unsupported ONNX op: Foo"

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("profile", name, lo, opt, hi))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_profile",))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build",))
            return b"ENGINE"

    if major < 10:   # 10.x deprecates these: code must not need them there
        Builder.platform_has_fast_fp16 = True

        class NetworkDefinitionCreationFlag:
            EXPLICIT_BATCH = 0

        trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    for cls in (Logger, MemoryPoolType, BuilderFlag, OnnxParser, Builder):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Install a fake tensorrt on a pretend Jetson Orin; returns (install(version), onnx path, calls)."""
    calls: list = []
    monkeypatch.setattr(rcuda, "device_count", lambda: 1)
    monkeypatch.setattr(rcuda, "device_description", lambda i=0: ("Orin", (8, 7)))
    monkeypatch.setattr(trt_build, "device_description", lambda i=0: ("Orin", (8, 7)))
    monkeypatch.setenv("FIELDLEARN_CACHE", str(tmp_path / "cache"))

    def install(version: str, parse_ok: bool = True):
        monkeypatch.setitem(__import__("sys").modules, "tensorrt", fake_tensorrt(version, calls, parse_ok))

    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"pretend onnx")
    return install, onnx_path, calls


@pytest.mark.parametrize("version,flags", [("8.6.1", 1), ("10.3.0", 0)])
def test_build_uses_each_versions_api(fake, tmp_path, version, flags):
    """If this fails, the builder calls an API that TensorRT 8.6 or 10.x does not have,
    or builds without FP16 / with the wrong batch profile on a Jetson."""
    install, onnx_path, calls = fake
    install(version)
    assert trt_build.tensorrt_available()
    path = trt_build.build_engine(onnx_path, tmp_path / "model.engine", opt_batch=16, max_batch=32)
    assert path.read_bytes() == b"ENGINE"
    assert ("create_network", flags) in calls
    assert ("flag", 0) in calls                                    # FP16 on an sm_87 Orin
    assert ("profile", "input_0", (1, 3, 64, 64), (16, 3, 64, 64), (32, 3, 64, 64)) in calls
    record = json.loads((tmp_path / "model.engine.json").read_text())
    assert record["identity"]["tensorrt"] == version and record["identity"]["compute_capability"] == "8.7"
    assert record["identity"]["device"] == "Orin" and len(record["identity"]["onnx_sha256"]) == 64


def test_engine_cache_key(fake, tmp_path):
    """If this fails, a stale engine (other ONNX, TensorRT version or build options) is
    reused, or a current one is rebuilt for nothing."""
    install, onnx_path, calls = fake
    install("10.3.0")
    engine = tmp_path / "model.engine"

    def builds(**opts) -> int:
        before = sum(c == ("build",) for c in calls)
        trt_build.build_engine(onnx_path, engine, **opts)
        return sum(c == ("build",) for c in calls) - before

    assert builds() == 1
    assert builds() == 0                                           # same everything: reused
    assert builds(max_batch=128) == 1                              # other profile
    onnx_path.write_bytes(b"another model")
    assert builds(max_batch=128) == 1                              # other ONNX
    install("10.4.0")
    assert builds(max_batch=128) == 1                              # other TensorRT
    default = trt_build.build_engine(onnx_path, None, max_batch=128)
    assert default.parent == tmp_path / "cache" / "engines" and default.suffix == ".engine"


def test_parser_errors_name_the_file(fake):
    """If this fails, an ONNX op TensorRT cannot parse gives no hint of which file/op."""
    install, onnx_path, _ = fake
    install("10.3.0", parse_ok=False)
    with pytest.raises(UserError, match=r"model\.onnx.*Unsupported ONNX op: Foo"):
        trt_build.build_engine(onnx_path)
