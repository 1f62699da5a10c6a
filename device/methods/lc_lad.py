"""LC + gamma * LAD: the paper's ablation (attention distillation without LD)."""

from fieldlearn.device.methods.base import Batch, Method


class LcLad(Method):
    name = "lc_lad"
    uses_teacher_maps = True

    def terms(self, batch: Batch):
        return {"lc": self.lc(batch), "lad": self.lad(batch)}
