"""No training in increments: the features stay as the base step left them, and the new
classes are learned by their statistics alone (a classifier solved from class statistics,
ModelConfig.classifier ncm or analytic; with the linear head nothing would learn).
First-session adaptation (Panos et al., ICCV 2023) is this with the analytic head."""

from fieldlearn.device.methods.base import Batch, Method


class NoTraining(Method):
    name = "none"
    trains = False

    def terms(self, batch: Batch):
        raise RuntimeError("method 'none' has no loss terms: the learner does not train with it")
