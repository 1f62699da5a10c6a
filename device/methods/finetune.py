"""Fine-tuning: LC alone (the lower bound; forgets)."""

from fieldlearn.device import losses
from fieldlearn.device.methods.base import Batch, Method


class FineTune(Method):
    name = "finetune"

    def terms(self, batch: Batch):
        return {"lc": losses.lc(batch.logits, batch.labels, batch.n_old, self.cfg.lc_span)}
