"""One small interface for "a way to learn an increment" (after FACIL's approach base).

A method turns one batch's student outputs (and the teacher's, when it uses one) into
named loss terms; the learner sums them, logs them, and does everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fieldlearn.device import losses
from fieldlearn.device.config import LossConfig


@dataclass
class Batch:
    labels: torch.Tensor               # [B] global class indices
    n_old: int                         # classes the teacher knows
    feats: torch.Tensor                # [B, C, h, w] student last conv map (in the graph)
    logits: torch.Tensor               # [B, K_old + K_new] student logits (in the graph)
    head_weight: torch.Tensor          # [K, C] student head weight (Parameter)
    teacher_logits: torch.Tensor | None = None  # [B, K_old]
    teacher_class: torch.Tensor | None = None   # [B] teacher's top-1 base class b
    teacher_map: torch.Tensor | None = None     # [B, h*w] teacher's normalised Grad-CAM of b


class Method:
    name: str = ""
    uses_teacher_logits: bool = False
    uses_teacher_maps: bool = False
    stores_data: bool = False          # only the benchmark's `joint` upper bound does
    trains: bool = True                # False: the increment trains nothing (method "none")

    def __init__(self, loss: LossConfig):
        self.cfg = loss

    @property
    def uses_teacher(self) -> bool:
        return self.uses_teacher_logits or self.uses_teacher_maps

    def terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # The three terms, weighted as configured, for the methods to combine.
    def lc(self, batch: Batch) -> torch.Tensor:
        return losses.lc(batch.logits, batch.labels, batch.n_old, self.cfg.lc_span)

    def ld(self, batch: Batch) -> torch.Tensor:
        c = self.cfg
        return c.beta * losses.ld(batch.logits[:, : batch.n_old], batch.teacher_logits, c.ld, c.temperature)

    def lad(self, batch: Batch) -> torch.Tensor:
        return self.cfg.gamma * losses.lad(batch.feats, batch.head_weight, batch.teacher_class, batch.teacher_map)
