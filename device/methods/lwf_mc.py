"""LwF-MC: LC + beta * LD (distillation of the base-class logits)."""

from fieldlearn.device.methods.base import Batch, Method


class LwFMC(Method):
    name = "lwf_mc"
    uses_teacher_logits = True

    def terms(self, batch: Batch):
        return {"lc": self.lc(batch), "ld": self.ld(batch)}
