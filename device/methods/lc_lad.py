"""LC + gamma * LAD: the paper's ablation (attention distillation without LD)."""

from fieldlearn.device import losses
from fieldlearn.device.methods.base import Batch, Method


class LcLad(Method):
    name = "lc_lad"
    uses_teacher_maps = True

    def terms(self, batch: Batch):
        c = self.cfg
        return {
            "lc": losses.lc(batch.logits, batch.labels, batch.n_old, c.lc_span),
            "lad": c.gamma * losses.lad(batch.feats, batch.head_weight, batch.teacher_class, batch.teacher_map),
        }
