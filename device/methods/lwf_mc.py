"""LwF-MC: LC + beta * LD (distillation of the base-class logits)."""

from fieldlearn.device import losses
from fieldlearn.device.methods.base import Batch, Method


class LwFMC(Method):
    name = "lwf_mc"
    uses_teacher_logits = True

    def terms(self, batch: Batch):
        c = self.cfg
        return {
            "lc": losses.lc(batch.logits, batch.labels, batch.n_old, c.lc_span),
            "ld": c.beta * losses.ld(batch.logits[:, : batch.n_old], batch.teacher_logits, c.ld, c.temperature),
        }
