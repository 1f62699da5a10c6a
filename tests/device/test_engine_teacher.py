"""The ONNX Runtime teacher gives the torch teacher's outputs, LAD, LD and gradients."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fieldlearn.device.attention import gradcam_normalized
from fieldlearn.device.config import ModelConfig
from fieldlearn.device.engine_teacher import EngineTeacher, make_teacher
from fieldlearn.device.model import Student
from fieldlearn.device.ops import attention_distill_ref
from fieldlearn.device.teacher import TorchTeacher
from fieldlearn.runtime.cuda import tensorrt_unavailable_reason
from fieldlearn.runtime.errors import UserError

CFG = ModelConfig(pretrained=False, width=0.5, input_size=64, freeze_blocks=14)
N_OLD, N_NEW = 4, 2


def warmed_student(seed: int = 0) -> Student:
    """Random student with BatchNorm statistics from data (a fresh one outputs ~constants)."""
    torch.manual_seed(seed)
    s = Student(CFG, N_OLD)
    bns = [m for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        s(torch.randn(16, 3, CFG.input_size, CFG.input_size))
    for m in bns:
        m.momentum = 0.1
    return s.eval()


@pytest.fixture(scope="module")
def setup():
    student = warmed_student()
    z = student.encode(torch.randn(8, 3, CFG.input_size, CFG.input_size,
                                   generator=torch.Generator().manual_seed(1)))   # [8, 48, 4, 4]
    return student, z, TorchTeacher(student), EngineTeacher(student, "onnxruntime", threads=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_onnxruntime_teacher_outputs_match_torch(setup):
    """If this fails, the exported teacher graph is not the frozen student."""
    _, z, torch_t, ort_t = setup
    a, b = ort_t(z), torch_t(z)
    assert isinstance(a.logits, torch.Tensor) and not a.logits.requires_grad
    assert a.logits.shape == b.logits.shape == (8, N_OLD) and a.features.shape == b.features.shape
    assert rel(a.logits, b.logits) < 1e-4 and rel(a.features, b.features) < 1e-4
    assert torch.equal(ort_t.head_weight, torch_t.head_weight)
    assert ort_t.backend == "onnxruntime"


def lwm_losses(student: Student, z: torch.Tensor, teacher) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """LAD and LD of one LwM step against `teacher`, and the gradients of their sum."""
    student.zero_grad(set_to_none=True)
    feats, logits = student.forward_top(z)                          # [B, C, h, w], [B, K_old + K_new]
    t = teacher(z)
    b = t.logits.argmax(1)                                          # teacher's top base class
    q_t = gradcam_normalized(t.features, teacher.head_weight, b)    # [B, h*w]
    lad = attention_distill_ref(feats, student.head.weight[b], q_t)
    ld = F.binary_cross_entropy_with_logits(logits[:, :N_OLD], torch.sigmoid(t.logits))
    (lad + ld).backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return lad.detach(), ld.detach(), grads


def test_lwm_step_losses_and_gradients_match(setup):
    """If this fails, training with the ONNX Runtime teacher is not the same LwM as with
    the torch teacher (the teacher path changes the losses, not just their speed)."""
    student, z, torch_t, ort_t = setup
    learner = copy.deepcopy(student)
    learner.widen(N_NEW)
    torch.manual_seed(2)
    with torch.no_grad():               # a student some way into the increment, not the teacher's twin
        for p in learner.top.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p))
    learner.eval()                      # no dropout: both runs see the same student
    lad_t, ld_t, g_t = lwm_losses(learner, z, torch_t)
    lad_o, ld_o, g_o = lwm_losses(learner, z, ort_t)
    assert lad_t > 0.01 and ld_t > 0.01                              # the losses are not trivially 0
    assert abs(float(lad_o - lad_t)) <= 1e-4 * float(lad_t)
    assert abs(float(ld_o - ld_t)) <= 1e-5 * float(ld_t)
    assert g_t.keys() == g_o.keys() and len(g_t) > 0
    for name in g_t:
        assert rel(g_o[name], g_t[name]) < 1e-3, name


def test_teacher_is_a_snapshot(setup):
    """If this fails, training the student afterwards changes the teacher it distils from."""
    student, z, _, _ = setup
    s = copy.deepcopy(student)
    teacher = EngineTeacher(s, "onnxruntime", threads=1)
    before, w = teacher(z), teacher.head_weight.clone()
    with torch.no_grad():
        for p in s.parameters():
            p.mul_(1.5)
    s.widen(N_NEW)
    after = teacher(z)
    assert torch.equal(before.logits, after.logits) and torch.equal(teacher.head_weight, w)


def test_work_dir_is_removed_with_the_teacher(setup):
    """If this fails, every increment leaves a teacher.onnx behind in /tmp."""
    student = setup[0]
    teacher = EngineTeacher(student, "onnxruntime", threads=1)
    work = teacher.work_dir
    assert (work / "teacher.onnx").is_file()
    del teacher
    gc.collect()
    assert not work.exists()


def test_make_teacher_backends(setup):
    """If this fails, --teacher-backend picks the wrong engine or fails without a reason."""
    student = setup[0]
    assert isinstance(make_teacher(student, "torch"), TorchTeacher)
    assert make_teacher(student, "onnxruntime", threads=1).backend == "onnxruntime"
    with pytest.raises(UserError, match="unknown"):
        make_teacher(student, "tvm")
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT is present here: auto picks it")
    assert make_teacher(student, "auto", threads=1).backend == "onnxruntime"   # CPU student, no TensorRT
    with pytest.raises(UserError, match="--teacher-backend tensorrt"):
        make_teacher(student, "tensorrt")


def test_close_frees_the_session_and_files(setup):
    """If this fails, a closed teacher keeps its ONNX Runtime session (and its arena) or its files."""
    student, z, _, _ = setup
    teacher = EngineTeacher(student, "onnxruntime", threads=1)
    teacher(z)
    work = teacher.work_dir
    teacher.close()
    assert teacher.engine is None and not work.exists()
    assert teacher.head_weight.shape == (N_OLD, student.head.in_features)   # the closed-form Grad-CAM still has it
    with pytest.raises(RuntimeError, match="after close"):
        teacher(z)
    teacher.close()   # twice is harmless
