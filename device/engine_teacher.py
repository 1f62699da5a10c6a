"""A teacher that runs in an inference engine (ONNX Runtime or TensorRT) instead of torch, and
`make_teacher`, which picks the next increment's teacher: torch (fieldlearn.device.teacher)
or an engine, whichever the backend option and this machine allow.

After each increment the student's top (trainable blocks + head) is exported as the
teacher graph z -> (logits, features) (fieldlearn.export.onnx.export_teacher) and loaded
into an engine; that engine is the next increment's teacher. Its Grad-CAM is built in
closed form from `features` and the head weight, so no backward pass runs through it.

    teacher = EngineTeacher(student, "onnxruntime")
    out = teacher(z)            # z [B, C_k, H/s, W/s] -> TeacherOutput(logits [B, K], features [B, C, h, w])
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from fieldlearn.device.model import Student
from fieldlearn.device.teacher import Teacher, TeacherOutput, TorchTeacher
from fieldlearn.runtime.errors import UserError

ENGINE_BACKENDS = ("onnxruntime", "tensorrt")


class EngineTeacher:
    """Teacher protocol on an engine. The student is snapshotted at construction: training
    it afterwards changes neither the engine nor `head_weight`.

    work_dir: where teacher.onnx (and the TensorRT engine) go; a temp dir removed with the
    teacher when None. batch_size: the TensorRT profile's optimum and maximum batch
    (larger batches are run in chunks).
    threads: ONNX Runtime intra-op threads (0: its default).
    """

    def __init__(self, student: Student, backend: str = "onnxruntime", *, work_dir: str | Path | None = None,
                 batch_size: int = 64, threads: int = 0):
        from fieldlearn.export.onnx import export_teacher  # noqa: PLC0415

        if backend not in ENGINE_BACKENDS:
            raise UserError(f"--teacher-backend {backend}: not an engine backend (choose {', '.join(ENGINE_BACKENDS)})")
        self.backend = backend
        self.max_batch = batch_size if backend == "tensorrt" else None   # ONNX Runtime takes any batch
        self.head_weight = student.head.weight.detach().clone()          # [K_old, C]
        if work_dir is None:
            work_dir = tempfile.mkdtemp(prefix="fieldlearn-teacher-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, work_dir, True)
        self.work_dir = Path(work_dir)
        self.onnx_path = export_teacher(student, self.work_dir / "teacher.onnx")
        if backend == "tensorrt":
            from fieldlearn.export.tensorrt import build_engine  # noqa: PLC0415
            from fieldlearn.runtime.engines import TrtEngine  # noqa: PLC0415

            engine_path = build_engine(self.onnx_path, self.work_dir / "teacher.engine",
                                       min_batch=1, opt_batch=batch_size, max_batch=batch_size)
            device = (self.head_weight.device.index or 0) if self.head_weight.is_cuda else 0
            self.engine = TrtEngine(engine_path, device=device)
        else:
            from fieldlearn.runtime.engines import OrtEngine  # noqa: PLC0415

            self.engine = OrtEngine(self.onnx_path, threads=threads)

    def __call__(self, z: torch.Tensor) -> TeacherOutput:
        if self.engine is None:
            raise RuntimeError("teacher used after close()")
        z = z.detach()
        if self.max_batch is None or len(z) <= self.max_batch:
            out = self.engine(z)           # torch in -> torch out, on z's device
            return TeacherOutput(logits=out["logits"], features=out["features"])
        parts = [self(chunk) for chunk in z.split(self.max_batch)]   # beyond the TensorRT profile
        return TeacherOutput(logits=torch.cat([p.logits for p in parts]),
                             features=torch.cat([p.features for p in parts]))

    def close(self) -> None:
        """Free the engine (session, arena, device buffers) and its files now, not at garbage collection."""
        if self.engine is not None:
            from fieldlearn.runtime.heap import trim_heap  # noqa: PLC0415

            self.engine.close()
            self.engine = None
            trim_heap()   # the session's arena goes back to the OS, not only to malloc
        cleanup = getattr(self, "_cleanup", None)
        if cleanup is not None:
            cleanup()

    def __repr__(self) -> str:
        return f"EngineTeacher({self.backend}, {self.onnx_path})"


TEACHER_BACKENDS = ("tensorrt", "onnxruntime", "torch")    # what "auto" tries, fastest first


def pick_backend(device: torch.device) -> str:
    """What "auto" gives a student on `device`: fieldlearn.runtime.backends.pick_backend over
    TensorRT > ONNX Runtime (with its CUDA provider for a student on CUDA) > torch."""
    return _pick("auto", device)


def _pick(backend: str, device: torch.device) -> str:
    from fieldlearn.runtime.backends import pick_backend as choose  # noqa: PLC0415

    return choose(backend, TEACHER_BACKENDS, device=str(device), option="--teacher-backend")


def make_teacher(student: Student, backend: str = "torch", **engine_options) -> Teacher:
    """The teacher for the next increment, on the requested backend.

    "auto": TensorRT (CUDA + tensorrt importable) > ONNX Runtime > torch (see
    pick_backend); "torch", "onnxruntime", "tensorrt" force one, with a UserError saying
    why when it cannot run here. engine_options (work_dir, batch_size, threads) go to
    EngineTeacher.
    """
    backend = _pick(backend, student.head.weight.device)      # UserError: unknown, or why it cannot run here
    if backend == "torch":
        return TorchTeacher(student)
    return EngineTeacher(student, backend, **engine_options)
