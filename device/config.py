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
    dropout: float = 0.0               # before the trained head; 0.0 > 0.2 on validation (benchmarks/README.md)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # The classifier that predicts (fieldlearn.device.classifier): "linear" = the trained
    # head (the paper's LwM); "ncm" = cosine nearest-class-mean, "analytic" = ridge head,
    # "lda" = linear discriminant analysis with equal priors, all solved from class
    # statistics kept as model state. lda counts each class once however many images it
    # had, so a class learned from a few dozen photos next to a base of thousands is still
    # predicted (the ridge head weighs images, not classes). They read `features`: the
    # pooled last conv map of the frozen ImageNet top ("frozen"), of the trained top
    # ("student"), or both side by side ("concat").
    classifier: Literal["linear", "ncm", "analytic", "lda"] = "lda"
    features: Literal["frozen", "student", "concat"] = "concat"
    ridge: float = 0.1                 # analytic head: relative ridge; 0 = chosen by GCV (slower)
    # lda head: weight of the scaled identity the pooled covariance is shrunk towards; the
    # covariance of a few hundred images in 2560 dimensions is singular without it. The
    # default is the field protocol's validation choice (a full base, a few dozen images per
    # new class: benchmarks/README.md#the-field-scenario-issue-21); a balanced base of
    # 160 images per class chose more shrinkage.
    shrink: float = 0.35


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
    lr: float = 0.003                  # increments of methods that train: 0.003 > 0.02 on validation (lwm+analytic 77.3 vs 57.0, fmnist-demo; 0.02 diverges: benchmarks/README.md)
    base_lr: float = 0.01              # 0.01 > 0.003, 0.03, 0.05 on validation (benchmarks/README.md)
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
    # What an increment trains. "none": the top stays as the base step left it and the new
    # classes are learned by their statistics alone; on validation it beat every method that
    # trains the top on new-class images only (LwM included: benchmarks/README.md), so it is
    # the default. "lwm" is the paper's learner.
    method: str = "none"
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


# ---------------------------------------------------------------------------- valid values
# What each field accepts, checked by fieldlearn.device.validate wherever a config comes
# from (the command line, a saved state's meta.json, a benchmark preset) before any work
# starts. Literal and bool fields declare their choices by their type; every other field
# must have an entry here (tests/device/test_validate.py fails on a field without one).

@dataclass(frozen=True)
class Valid:
    """Numbers (each element of a tuple) in [lo, hi], an end excluded when lo_open/hi_open;
    text: one of `choices`, or matching `pattern` (described by `text`)."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    text: str = ""


VALID: dict[type, dict[str, Valid]] = {
    ModelConfig: {
        "width": Valid(0.1, 4.0),
        "input_size": Valid(16, 1024),
        "freeze_blocks": Valid(0, 18),              # MobileNetV2 has 19 feature blocks; keep one to train
        "dropout": Valid(0.0, 1.0, hi_open=True),
        "mean": Valid(0.0, 1.0),
        "std": Valid(0.0, 1.0, lo_open=True),
        "ridge": Valid(0.0, 1e6),                   # 0: chosen by generalised cross-validation
        "shrink": Valid(0.0, 1.0, lo_open=True),    # 1: the covariance is a scaled identity
    },
    LossConfig: {
        "beta": Valid(0.0, 100.0),
        "gamma": Valid(0.0, 100.0),
        "temperature": Valid(0.0, 100.0, lo_open=True),
    },
    TrainConfig: {
        "epochs": Valid(1, 10_000),
        "base_epochs": Valid(1, 10_000),
        "batch_size": Valid(2, 4096),               # BatchNorm trains on 2 images at least
        "lr": Valid(0.0, 1000.0, lo_open=True),
        "base_lr": Valid(0.0, 1000.0, lo_open=True),
        "momentum": Valid(0.0, 1.0, hi_open=True),
        "weight_decay": Valid(0.0, 1.0),
        "seed": Valid(0, 2**32 - 1),
        "device": Valid(pattern=r"cpu|cuda(:[0-9]{1,2})?", text="cpu, cuda or cuda:N"),
        "num_threads": Valid(0, 1024),
        "max_grad_norm": Valid(0.0, 1e6),
        "drift_shrink": Valid(0.0, 1e6),
        "increment_blocks": Valid(-1, 18),          # -1: every block of the top
    },
    RunConfig: {
        "method": Valid(choices=("finetune", "lwf_mc", "lwm", "lc_lad", "none")),   # = fieldlearn.device.methods.METHODS
    },
}
