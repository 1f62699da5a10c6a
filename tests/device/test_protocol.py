"""The class-incremental protocol (fieldlearn.device.protocol) on real data: what the demo
and the accuracy benchmark run, and the product's central promise, that learning pays."""

import pytest
import torch

from fieldlearn.device.demo import DEMO_CONFIG
from fieldlearn.device.data import class_order, incremental_split
from fieldlearn.device.protocol import Order, default_row, parse_row


@pytest.mark.slow
def test_the_default_learner_clearly_beats_not_learning(fashion):
    """If this fails, a user gets more from the pretrained network with one mean per class
    (ncm: nothing trained) than from fieldlearn's default learner: the product does not pay.
    Fashion-MNIST, 4 base classes + 2 steps of 2, 100 training images per class."""
    import copy

    torch.set_num_threads(2)
    train, test = fashion
    cfg = copy.deepcopy(DEMO_CONFIG)
    cfg.train.progress = False
    order = class_order(10, 1993)[:8]
    groups = incremental_split(list(range(8)), 4, 2)
    train = train.reorder(order).select(list(range(8)), 100, seed=0)
    test = test.reorder(order).select(list(range(8)), 100, seed=0)
    o = Order(cfg, train, None, test, groups, log=lambda _: None)
    ncm = o.run(parse_row("ncm"), {})
    learner = o.run(parse_row(default_row(cfg)), {})
    assert learner.test.last >= ncm.test.last + 0.05, (learner.test.acc, ncm.test.acc)
    assert learner.test.average_incremental >= ncm.test.average_incremental + 0.05
