"""The frozen teacher M(t-1), behind a small interface so that an inference engine
(ONNX Runtime, TensorRT; fieldlearn.runtime) can stand in for the torch model.

A teacher maps the trunk output z (the frozen blocks are shared by teacher and student,
so they run once) to its base-class logits and last conv feature map, with no gradient.
It also exposes its head weight so the learner builds the teacher's Grad-CAM in closed
form (fieldlearn.device.attention.gradcam): no backward pass through the teacher.

This module owns the interface (Teacher, TeacherOutput), the torch teacher and the targets
the losses take from a teacher; fieldlearn.device.engine_teacher runs one in an engine and
picks which one an increment gets (make_teacher).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch

from fieldlearn.device.losses import teacher_maps
from fieldlearn.device.model import Student


@dataclass
class TeacherOutput:
    logits: torch.Tensor    # [B, K_old]
    features: torch.Tensor  # [B, C, h, w]


class Teacher(Protocol):
    head_weight: torch.Tensor  # [K_old, C]
    backend: str

    def __call__(self, z: torch.Tensor) -> TeacherOutput: ...

    def close(self) -> None:
        """Free the model or engine; head_weight stays. Calling the teacher after is an error."""


@dataclass
class TeacherTargets:
    """What the losses need from the teacher, per image: computed once per step."""
    logits: torch.Tensor   # [N, K_old] float32
    b: torch.Tensor        # [N] long: the teacher's top-1 base class
    q_t: torch.Tensor      # [N, h*w] float32: its L2-normalised Grad-CAM of class b

    def select(self, idx: torch.Tensor) -> "TeacherTargets":
        return TeacherTargets(self.logits[idx], self.b[idx], self.q_t[idx])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.logits, self.b, self.q_t


@torch.no_grad()
def teacher_targets(teacher: Teacher, z: torch.Tensor, batch: int = 128) -> TeacherTargets:
    """Run the teacher over z [N, ...] in chunks of `batch`: logits, b and q_t for every row."""
    logits, bs, qs = [], [], []
    for i in range(0, len(z), batch):
        out = teacher(z[i: i + batch])
        b, q = teacher_maps(out.features, teacher.head_weight, out.logits)
        logits.append(out.logits.float())
        bs.append(b)
        qs.append(q)
    return TeacherTargets(torch.cat(logits), torch.cat(bs), torch.cat(qs))


class TorchTeacher:
    """A frozen deep copy of the student, eval mode, no grad."""

    backend = "torch"

    def __init__(self, student: Student):
        # The teacher needs the trained part only: the classifier's statistics, solved head
        # and frozen ImageNet top (tens of MB) are not copied.
        skip = {id(m): None for m in (student.stats, student.classifier, student.frozen_top) if m is not None}
        self.model = copy.deepcopy(student, memo=skip).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.head_weight = self.model.head.weight.detach()

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> TeacherOutput:
        if self.model is None:
            raise RuntimeError("teacher used after close()")
        feats, logits = self.model.forward_top(z)
        return TeacherOutput(logits=logits, features=feats)

    def close(self) -> None:
        from fieldlearn.runtime.heap import trim_heap  # noqa: PLC0415

        self.model = None
        trim_heap()   # its weights' pages go back to the OS, not only to malloc
