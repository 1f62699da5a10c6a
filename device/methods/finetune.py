"""Fine-tuning: LC alone (the lower bound; forgets)."""

from fieldlearn.device.methods.base import Batch, Method


class FineTune(Method):
    name = "finetune"

    def terms(self, batch: Batch):
        return {"lc": self.lc(batch)}
