"""The class-incremental protocol (fieldlearn.device.protocol) on real data: what the demo
and the accuracy benchmark run, and the product's central promise, that learning pays."""

import pytest
import torch

from fieldlearn.field.demo import DEMO_CONFIG
from fieldlearn.device.data import class_order, incremental_split
from fieldlearn.device.protocol import Order, default_row, parse_row


@pytest.mark.slow
def test_the_default_learner_clearly_beats_not_learning(fashion):
    """If this fails, a user gets more from the pretrained network with one mean per class
    (ncm: nothing trained) than from fieldlearn's default learner: the product does not pay.
    Fashion-MNIST, 4 base classes + 2 steps of 2, 100 training images per class."""
    import copy

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


def test_cached_features_score_what_running_the_student_scores():
    """Rows whose features are fixed after step 0 are scored from features computed once
    (the benchmark's speed-up at 128 px). If this fails, the cache scores a different model
    than the one the student is: a stale head, wrong rows of the split, or a row whose
    features do change being cached. Tiny random-init network, generated images."""
    from fieldlearn.device.data import ImageSet
    from fieldlearn.device.protocol import fixed_features
    from tests.conftest import tiny_config

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(12)                           # 6 classes x 12 images
    base = torch.randint(0, 256, (6, 3, 32, 32), generator=g).float()
    noise = torch.randint(-40, 40, (len(labels), 3, 32, 32), generator=g).float()
    images = (base[labels] + noise).clamp(0, 255).to(torch.uint8)
    names = [f"c{i}" for i in range(6)]
    train = ImageSet(images[::2].clone(), labels[::2].clone(), names)
    test = ImageSet(images[1::2].clone(), labels[1::2].clone(), names)
    cfg = tiny_config()
    cfg.model.classifier = "analytic"
    cfg.model.features = "concat"
    groups = incremental_split(list(range(6)), 2, 2)
    row = parse_row("none+analytic")            # base-trained top, then statistics only
    assert fixed_features(row) and fixed_features(parse_row("ncm"))
    results = []
    for cache in (True, False):
        o = Order(cfg, train, test, test, groups, log=lambda _: None)
        o.cache_features = cache
        results.append(o.run(row, {}))
    assert results[0].test.rows == results[1].test.rows and results[0].val.rows == results[1].val.rows
    assert not fixed_features(parse_row("lwm+analytic")) and not fixed_features(parse_row("lwm"))
    assert not fixed_features(parse_row("joint+lda"))           # it retrains the top every step


def test_row_settings_are_chosen_per_protocol(monkeypatch):
    """If this fails, a setting chosen on one protocol's validation leaks into another's rows,
    or a protocol that chose nothing loses the carried ("*") choices."""
    from fieldlearn.device import protocol
    from fieldlearn.device.protocol import parse_row, row_settings

    monkeypatch.setattr(protocol, "CHOSEN", {"*": {"lwm": {"lr": 0.003}, "lwm+lda": {"gamma": 2.0}},
                                             "cifar128": {"lwm": {"lr": 0.01, "lc_span": "new"}}})
    lwm, stats = parse_row("lwm"), parse_row("lwm+lda")
    assert row_settings(lwm, "cifar128") == {"lr": 0.01, "lc_span": "new"}     # replaces, does not merge
    assert row_settings(lwm, "fmnist-demo") == row_settings(lwm) == {"lr": 0.003}
    assert row_settings(stats, "cifar128") == {"gamma": 2.0}                  # the protocol has no lwm+lda
    assert row_settings(parse_row("lwm+ncm")) == {}                           # a stats row never takes the linear one's
