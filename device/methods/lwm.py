"""Learning without Memorizing (Dhar et al., CVPR 2019): LC + beta * LD + gamma * LAD."""

from fieldlearn.device import losses
from fieldlearn.device.methods.base import Batch, Method


class LwM(Method):
    name = "lwm"
    uses_teacher_logits = True
    uses_teacher_maps = True

    def terms(self, batch: Batch):
        c = self.cfg
        return {
            "lc": losses.lc(batch.logits, batch.labels, batch.n_old, c.lc_span),
            "ld": c.beta * losses.ld(batch.logits[:, : batch.n_old], batch.teacher_logits, c.ld, c.temperature),
            "lad": c.gamma * losses.lad(batch.feats, batch.head_weight, batch.teacher_class, batch.teacher_map),
        }
