"""The frozen trunk in ONNX Runtime: the learner's encode pass, several times faster on a CPU.

    enc = trunk_encoder(student, cfg)      # a callable x [B, 3, S, S] -> z [B, C_k, h', w']
    z = enc(x)

The trunk never trains, so running it in an inference engine changes nothing but speed:
on the project's 2-core CPU ONNX Runtime runs MobileNetV2's first 14 blocks at 128 px
several times faster than torch eager (docs/COST.md). TrainConfig.trunk_backend picks it:
"torch" (eager, the default on CUDA), "onnxruntime", or "auto" (ONNX Runtime on a CPU
where it is installed, torch otherwise).

The export is fieldlearn.export.onnx's and the session fieldlearn.runtime.engines' (the same
code that exports and runs a model): the session is made for one pass and dropped after it,
with ONNX Runtime's memory arena off: an arena would keep the trunk's largest activations
(hundreds of MB at 128 px) for as long as the session lives. The exported graph is kept on
the student (a few MB) and made again only if the trunk's weights or the input size change.
"""

from __future__ import annotations

from typing import Callable

import torch

TRUNK_BACKENDS = ("auto", "torch", "onnxruntime")


def resolve(backend: str, device: str) -> str:
    """The backend the encode pass really uses for `backend` on `device` (chosen by
    fieldlearn.runtime.backends.pick_backend). The trunk's ONNX Runtime session is a CPU one,
    so a student on another device encodes in torch."""
    from fieldlearn.runtime.backends import pick_backend  # noqa: PLC0415
    from fieldlearn.runtime.errors import UserError  # noqa: PLC0415

    if backend not in TRUNK_BACKENDS:
        raise UserError(f"--trunk-backend {backend}: unknown (choose {', '.join(TRUNK_BACKENDS)})")
    if not str(device).startswith("cpu"):
        return "torch"
    return pick_backend(backend, ("onnxruntime", "torch"), device=device, option="--trunk-backend")


def _fingerprint(student, size: int) -> tuple:
    return (size, tuple((p.data_ptr(), p._version) for p in student.trunk.parameters()),
            tuple((b.data_ptr(), b._version) for b in student.trunk.buffers()))


def trunk_onnx(student, size: int) -> bytes:
    """The trunk as ONNX (x [B, 3, size, size] -> z), made by fieldlearn.export.onnx and
    cached on the student."""
    from fieldlearn.export.onnx import onnx_bytes  # noqa: PLC0415 - onnx: only for this backend

    key = _fingerprint(student, size)
    cached = getattr(student, "_trunk_onnx", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    data = onnx_bytes(student.trunk, (1, 3, size, size), metadata={"graph": "trunk"}, input_name="x",
                      output_names=["z"])
    student._trunk_onnx = (key, data)
    return data


def trunk_encoder(student, cfg) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> z for this config: student.encode (torch), or one pass of a CPU ONNX Runtime
    session of the trunk (fieldlearn.runtime.engines.OrtEngine, no memory arena)."""
    if len(student.trunk) == 0 or resolve(cfg.train.trunk_backend, cfg.train.device) == "torch":
        return student.encode
    from fieldlearn.runtime.engines import OrtEngine  # noqa: PLC0415

    engine = OrtEngine(trunk_onnx(student, cfg.model.input_size), threads=torch.get_num_threads(),
                       providers=["CPUExecutionProvider"], arena=False)
    return lambda x: engine(x)["z"]                 # [B, 3, S, S] -> [B, C_k, h', w']
