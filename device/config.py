"""Typed configuration for every part of the learner. The CLI is built from these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    arch: Literal["mobilenet_v2"] = "mobilenet_v2"
    width: float = 1.0
    # "cifar": first conv and first stride-2 block use stride 1 (total stride 8), so a
    # 32x32 input keeps a 4x4 last map. "imagenet": torchvision's stock strides (32).
    variant: Literal["imagenet", "cifar"] = "imagenet"
    input_size: int = 128
    pretrained: bool = True            # ImageNet weights from the installed weights package
    freeze_blocks: int = 14            # first k of the 19 feature blocks are frozen (TinyTL-style)
    dropout: float = 0.2
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # The classifier that predicts (fieldlearn.device.classifier): "linear" = the trained
    # head (the paper's LwM); "ncm" = cosine nearest-class-mean, "analytic" = ridge head,
    # both solved from class statistics kept as model state. They read `features`: the
    # pooled last conv map of the frozen ImageNet top ("frozen"), of the trained top
    # ("student"), or both side by side ("concat").
    classifier: Literal["linear", "ncm", "analytic"] = "analytic"
    features: Literal["frozen", "student", "concat"] = "concat"
    ridge: float = 0.1                 # analytic head: relative ridge; 0 = chosen by GCV (slower)


@dataclass
class LossConfig:
    # LC: cross-entropy over all seen classes, or only over the classes of this increment.
    lc_span: Literal["all", "new"] = "new"
    # LD: "bce" = full binary cross-entropy between sigmoid(teacher) and sigmoid(student)
    # on base-class logits (LwF-MC); "kd" = softmax KD with temperature.
    # Defaults chosen on validation by `fieldlearn bench accuracy --sweep` (benchmarks/README.md):
    # with lc_span "new", KD beat BCE and beta 0.5 beat 1 and 2, for LwF-MC and LwM alike.
    ld: Literal["bce", "kd"] = "kd"
    beta: float = 0.5
    gamma: float = 1.0
    temperature: float = 2.0


@dataclass
class TrainConfig:
    epochs: int = 6
    base_epochs: int = 8
    batch_size: int = 64
    lr: float = 0.02                   # 0.02 > 0.01 > 0.005 on validation for every method (README)
    base_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Freeze BatchNorm statistics of the trainable blocks during increments: new-class
    # data alone would otherwise drag them away from what the old classes need.
    freeze_bn_in_increments: bool = True
    augment: bool = True               # random horizontal flip
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0               # 0: leave torch's default
    progress: bool = True
    max_grad_norm: float = 10.0
    # Recompute the trainable blocks' activations during backward (torch.utils.checkpoint,
    # one segment per block) instead of keeping them: less memory, about one more forward
    # of the top per step. `fieldlearn profile` turns it on when a budget needs it.
    checkpoint_top: bool = False
    # Where the frozen trunk runs for the encode and evaluation passes (it never trains):
    # "auto" = ONNX Runtime on a CPU where it is installed (several times faster than torch
    # eager there; docs/COST.md), torch otherwise. fieldlearn.device.trunk_encoder.
    trunk_backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    # How the new classes' head rows start: "scaled" (random directions at the old rows'
    # norm, the old rows' mean bias) or "default" (torch's nn.Linear init).
    new_head_init: Literal["scaled", "default"] = "scaled"
    # Statistics heads (ModelConfig.classifier ncm/analytic) when an increment trains the top:
    # "linear" carries the old classes' statistics through an affine map of the top's
    # features fitted on the new images before/after the step, shrunk towards the identity
    # by drift_shrink (fieldlearn.device.classifier.fit_drift); "none" leaves them as formed.
    drift: Literal["none", "linear"] = "linear"
    drift_shrink: float = 1.0
    # How many of the top's blocks (from the last) train in increments; -1: all of them.
    # The head always trains. Fewer blocks: less drift of the old classes' features.
    increment_blocks: int = -1


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: str = "lwm"
    teacher_backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        def build(klass, values):
            names = {f.name: f for f in dataclasses.fields(klass)}
            unknown = set(values) - set(names)
            if unknown:
                raise ValueError(f"unknown {klass.__name__} field(s): {', '.join(sorted(unknown))}")
            kwargs = {}
            for k, v in values.items():
                sub = _SUB.get((klass, k))
                if sub is not None:
                    kwargs[k] = build(sub, v)
                elif isinstance(v, list):
                    kwargs[k] = tuple(v)
                else:
                    kwargs[k] = v
            return klass(**kwargs)

        return build(cls, d)


_SUB = {(RunConfig, "model"): ModelConfig, (RunConfig, "loss"): LossConfig, (RunConfig, "train"): TrainConfig}
