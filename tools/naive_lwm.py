"""The naive LwM baseline that `fieldlearn bench cost` and the profiler's harness measure
against ours: LC + beta*LD + gamma*LAD computed the textbook way, with forward hooks on the
last conv block of the student and of a PyTorch copy of the teacher, a second teacher
forward on every batch, and Grad-CAM by autograd.grad (create_graph=True for the student,
so LAD's gradient flows through a double backward). Tooling only: the product never
imports it.
"""

from __future__ import annotations

import copy

import torch

from fieldlearn.device.attention import gradcam_of_graph, l2_normalize
from fieldlearn.device.config import RunConfig
from fieldlearn.device.methods import Batch, make_method
from fieldlearn.device.model import Student


class NaiveLwM:
    """LC + beta * LD + gamma * LAD computed the textbook way, for the cost baseline.

    Given its best case: the teacher's hooked feature map is cut from the teacher's graph
    (a leaf), so its Grad-CAM backward runs through the head only, not the whole teacher.
    """

    def __init__(self, student: Student, cfg: RunConfig, from_pixels: bool = False):
        self.student = student
        self.cfg = cfg
        self.from_pixels = from_pixels
        self.teacher = copy.deepcopy(student).eval()            # a second PyTorch model
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.head_weight = self.teacher.head.weight             # what a Teacher exposes
        self._acts: dict[str, torch.Tensor] = {}
        self.student.top[-1].register_forward_hook(self._save("student"))
        self.teacher.top[-1].register_forward_hook(self._save("teacher", leaf=True))
        self.labels = None
        self.n_old = 0
        self.method = make_method("lwm", cfg.loss)

    def _save(self, name: str, leaf: bool = False):
        def hook(module, inputs, output):
            if leaf:
                output = output.detach().requires_grad_(True)
            self._acts[name] = output
            return output
        return hook

    def bind(self, labels: torch.Tensor, n_old: int) -> None:
        self.labels, self.n_old = labels, n_old

    def _forward(self, model: Student, x: torch.Tensor) -> torch.Tensor:
        return model(x)[1] if self.from_pixels else model.forward_top(x)[1]

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg.loss
        with torch.enable_grad():                                   # teacher: forward + Grad-CAM each batch
            logits_t = self._forward(self.teacher, x)               # [B, K_old]
            feats_t = self._acts["teacher"]                         # [B, C, h, w]
            b = logits_t.argmax(1)
            q_t = _gradcam(logits_t, feats_t, b, create_graph=False).detach()
        logits_t = logits_t.detach()
        logits = self._forward(self.student, x)                     # [B, K]
        feats = self._acts["student"]
        q_s = _gradcam(logits, feats, b, create_graph=True)         # differentiable: double backward
        lad = (q_s - q_t).abs().sum(1).mean()
        # LC and LD as LwM computes them (every LC span and LD form); only LAD is done the naive way
        batch = Batch(labels=self.labels, n_old=self.n_old, feats=feats, logits=logits,
                      head_weight=self.student.head.weight,
                      teacher_logits=logits_t)
        return self.method.lc(batch) + self.method.ld(batch) + c.gamma * lad


def _gradcam(logits: torch.Tensor, feats: torch.Tensor, classes: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Selvaraju et al. by autograd (fieldlearn.device.attention.gradcam_of_graph), L2-normalised.
    [B, K], [B, C, h, w], [B] -> [B, h*w]."""
    return l2_normalize(gradcam_of_graph(logits, feats, classes, create_graph))
