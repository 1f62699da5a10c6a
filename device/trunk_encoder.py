"""The frozen trunk in ONNX Runtime: the learner's encode pass, several times faster on a CPU.

    enc = trunk_encoder(student, cfg)      # a callable x [B, 3, S, S] -> z [B, C_k, h', w']
    z = enc(x)

The trunk never trains, so running it in an inference engine changes nothing but speed:
on the project's 2-core CPU ONNX Runtime runs MobileNetV2's first 14 blocks at 128 px
several times faster than torch eager (docs/COST.md). TrainConfig.trunk_backend picks it:
"torch" (eager, the default on CUDA), "onnxruntime", or "auto" (ONNX Runtime on a CPU
where it is installed, torch otherwise).

The session is made for one pass and dropped after it, with ONNX Runtime's memory arena
off: an arena would keep the trunk's largest activations (hundreds of MB at 128 px)
for as long as the session lives. The exported graph is kept on the student (a few MB)
and made again only if the trunk's weights or the input size change.
"""

from __future__ import annotations

import io
import warnings
from typing import Callable

import torch
import torch.nn as nn

TRUNK_BACKENDS = ("auto", "torch", "onnxruntime")


def resolve(backend: str, device: str) -> str:
    """The backend the encode pass really uses for `backend` on `device`."""
    if backend not in TRUNK_BACKENDS:
        from fieldlearn.runtime.errors import UserError  # noqa: PLC0415

        raise UserError(f"--trunk-backend {backend}: unknown (choose {', '.join(TRUNK_BACKENDS)})")
    if backend == "torch" or not str(device).startswith("cpu"):
        return "torch"
    try:
        import onnxruntime  # noqa: F401, PLC0415
    except ImportError:
        if backend == "onnxruntime":
            from fieldlearn.runtime.errors import UserError  # noqa: PLC0415

            raise UserError("--trunk-backend onnxruntime: onnxruntime is not installed (pip install onnxruntime)") from None
        return "torch"
    return "onnxruntime"


class _Trunk(nn.Module):
    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x):
        return self.trunk(x)


def _fingerprint(student, size: int) -> tuple:
    return (size, tuple((p.data_ptr(), p._version) for p in student.trunk.parameters()),
            tuple((b.data_ptr(), b._version) for b in student.trunk.buffers()))


def trunk_onnx(student, size: int) -> bytes:
    """The trunk as ONNX (x [B, 3, size, size] -> z), cached on the student."""
    key = _fingerprint(student, size)
    cached = getattr(student, "_trunk_onnx", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    was = [(m, m.training) for m in student.trunk.modules()]
    student.trunk.eval()
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Trunk(student.trunk), (torch.zeros(1, 3, size, size),), buf, dynamo=False,
                              opset_version=17, input_names=["x"], output_names=["z"],
                              dynamic_axes={"x": {0: "batch"}, "z": {0: "batch"}}, do_constant_folding=True)
    finally:
        for m, flag in was:
            m.training = flag
    data = buf.getvalue()
    student._trunk_onnx = (key, data)
    return data


class OrtTrunk:
    """One ONNX Runtime session of the trunk: call with normalised x (torch), get z (torch)."""

    def __init__(self, student, size: int, threads: int | None = None):
        import onnxruntime as ort  # noqa: PLC0415

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads if threads is not None else torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_cpu_mem_arena = False
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(trunk_onnx(student, size), sess_options=so,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        (z,) = self.session.run(["z"], {"x": x.numpy()})
        return torch.from_numpy(z)


def trunk_encoder(student, cfg) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> z for this config: student.encode (torch) or an OrtTrunk session."""
    if len(student.trunk) == 0 or resolve(cfg.train.trunk_backend, cfg.train.device) == "torch":
        return student.encode
    return OrtTrunk(student, cfg.model.input_size)
