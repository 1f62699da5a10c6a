"""Learning without Memorizing (Dhar et al., CVPR 2019): LC + beta * LD + gamma * LAD."""

from fieldlearn.device.methods.base import Batch, Method


class LwM(Method):
    name = "lwm"
    uses_teacher_logits = True
    uses_teacher_maps = True

    def terms(self, batch: Batch):
        return {"lc": self.lc(batch), "ld": self.ld(batch), "lad": self.lad(batch)}
