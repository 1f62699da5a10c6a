"""Teacher targets and the teacher's lifetime within a step (fieldlearn.device.teacher)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from fieldlearn.device import learner
from fieldlearn.device.data import ImageSet
from fieldlearn.device.losses import teacher_maps
from fieldlearn.device.model import build_student
from fieldlearn.device.teacher import TorchTeacher, teacher_targets


def _student_and_data(n_old: int = 3, n_new: int = 2, per_class: int = 8):
    cfg = tiny_config()
    torch.manual_seed(0)
    student = build_student(cfg.model, n_old).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_new * per_class, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n_old, n_old + n_new).repeat_interleave(per_class)
    return cfg, student, ImageSet(images, labels, [f"c{i}" for i in range(n_old + n_new)])


def test_teacher_targets_match_one_forward_in_any_chunking():
    """If this fails, chunking the teacher pass changes the targets LD and LAD are trained on."""
    cfg, student, data = _student_and_data()
    z = learner.encode(student, data.images, cfg)
    teacher = TorchTeacher(student)
    out = teacher(z)
    b, q = teacher_maps(out.features, teacher.head_weight, out.logits)
    for chunk in (1, 5, 64):
        t = teacher_targets(teacher, z, chunk)
        assert torch.allclose(t.logits, out.logits, atol=1e-6) and torch.equal(t.b, b)
        assert torch.allclose(t.q_t, q, atol=1e-6)
    idx = torch.tensor([3, 0])
    sel = t.select(idx)
    assert torch.equal(sel.b, b[idx]) and sel.q_t.shape == (2, q.shape[1])


class _Spy(TorchTeacher):
    """A torch teacher that records when it is closed relative to the student's training."""

    def __init__(self, student, events):
        super().__init__(student)
        self.events = events

    def close(self):
        self.events.append("close")
        super().close()


@pytest.mark.parametrize("method", ["lwm", "lwf_mc"])
def test_learn_increment_closes_its_teacher_before_training(monkeypatch, method):
    """If this fails, the teacher's model or engine stays resident for the whole step (its
    memory adds to the training peak although, with a cached trunk, it is done before the first batch)."""
    cfg, student, data = _student_and_data()
    events: list[str] = []
    monkeypatch.setattr(learner, "make_teacher", lambda s, *a, **k: _Spy(s, events))
    forward_top = type(student).forward_top

    def spy_forward(self, z):
        if self.training and (not events or events[-1] != "train"):
            events.append("train")
        return forward_top(self, z)

    monkeypatch.setattr(type(student), "forward_top", spy_forward)
    learner.learn_increment(student, data, 2, cfg, step=1, method=method)
    assert events[:2] == ["close", "train"], events


def test_a_teacher_given_by_the_caller_is_not_closed():
    """If this fails, the learner frees a teacher its caller still owns (and may reuse)."""
    cfg, student, data = _student_and_data()
    teacher = TorchTeacher(student)
    learner.learn_increment(student, data, 2, cfg, step=1, method="lwm", teacher=teacher)
    assert teacher.model is not None
