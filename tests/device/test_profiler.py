"""Memory profiler and planner: checkpointing, analytic estimate vs measurement, budgets, plans."""

from __future__ import annotations

import copy
import pytest
import torch

from tests.conftest import tiny_config


def _step(student, z, labels):
    feats, logits = student.forward_top(z)
    loss = torch.nn.functional.cross_entropy(logits, labels) + feats.square().mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_checkpointing_changes_neither_gradients_nor_bn_statistics(frozen_bn):
    """Checkpointed top blocks must give the same loss, the same gradients and the same
    BatchNorm running statistics (recomputation must not update them a second time);
    otherwise TrainConfig.checkpoint_top would change what is learned."""
    from fieldlearn.device.model import build_student

    cfg = tiny_config()
    torch.manual_seed(0)
    a = build_student(cfg.model, 7)
    a.dropout.p = 0.0
    a.train()
    if frozen_bn:
        a.freeze_bn()
    b = copy.deepcopy(a)
    b.checkpoint_top = True
    z = a.encode(torch.randn(6, 3, 32, 32))
    labels = torch.randint(0, 7, (6,))
    la, lb = _step(a, z, labels), _step(b, z, labels)
    assert torch.equal(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-7, msg=n)
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(ba, bb), f"{n} differs after a checkpointed step"


def test_learner_trains_with_checkpointing(tmp_path):
    """TrainConfig.checkpoint_top reaches the model through the learner and trains."""
    from fieldlearn.device.data import ImageSet
    from fieldlearn.device.learner import train_step
    from fieldlearn.device.methods import make_method
    from fieldlearn.device.model import build_student

    cfg = tiny_config(checkpoint_top=True)
    student = build_student(cfg.model, 3)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.arange(20) % 3, ["a", "b", "c"])
    report = train_step(student, make_method("finetune", cfg.loss), data, n_old=0, epochs=1, cfg=cfg)
    assert student.checkpoint_top is True
    assert all(torch.isfinite(torch.tensor(v)) for v in report.loss_terms.values())
