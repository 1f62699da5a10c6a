"""Typed configuration for every part of the learner: one owner per knob.

Each field declares, in one place, its default, what it accepts and its help
(`knob(default, help, valid)`: a dataclass field with metadata). The validator
(fieldlearn.device.validate, through VALID below) and the command line
(fieldlearn.cli.flags: `--field-name`, its help and default) are built from these
declarations; benchmark presets, per-row choices (fieldlearn.device.protocol.CHOSEN) and
sweep grids (fieldlearn.tools.bench_accuracy.SWEEP_STAGES) name a field, they do not
restate it. A default's comment says why it is the default; the scores behind a choice are
in benchmarks/README.md, where they are kept current.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------- valid values
# What a field accepts is checked by fieldlearn.device.validate wherever a config comes from
# (the command line, a saved state's meta.json, a benchmark preset) before any work starts.
# Literal and bool fields declare their choices by their type; every other field declares a
# Valid (tests/device/test_validate.py fails on a field without one).

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


def knob(default: Any, help: str, valid: Valid | None = None) -> Any:  # noqa: A002 - argparse's word
    """A config field: its default, its help (the CLI's) and, for a number or free text, the
    values it accepts."""
    metadata = {"help": help, **({"valid": valid} if valid is not None else {})}
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    arch: Literal["mobilenet_v2"] = knob("mobilenet_v2", "the network")
    width: float = knob(1.0, "MobileNetV2 width multiplier (ImageNet weights exist for 1.0 only)", Valid(0.1, 4.0))
    # "cifar" keeps a 4x4 last map for a 32x32 input, where the stock strides would leave 1x1.
    variant: Literal["imagenet", "cifar"] = knob(
        "imagenet", "strides: imagenet = torchvision's stock (total stride 32); cifar = the first conv and the "
                    "first stride-2 block use stride 1 (total stride 8, for 32x32 inputs)")
    # 160 won on the CIFAR-100 field protocol's validation: over 128 for the default row (2
    # class orders), over 224 for the frozen one (224 costs 2.5x 128 per image, 160 1.3-1.6x)
    # (benchmarks/README.md, "Input size and mirrored images")
    input_size: int = knob(160, "input images are resized to SIZE x SIZE pixels", Valid(16, 1024))
    pretrained: bool = knob(True, "start from the ImageNet weights of the installed weights package")
    # TinyTL-style: the early blocks are generic, and a frozen trunk runs once per image.
    freeze_blocks: int = knob(14, "the first K of MobileNetV2's 19 feature blocks are frozen",
                              Valid(0, 18))            # keep one block to train
    dropout: float = knob(0.0, "dropout before the trained head", Valid(0.0, 1.0, hi_open=True))
    mean: tuple[float, float, float] = knob(IMAGENET_MEAN, "per-channel normalisation mean (RGB)", Valid(0.0, 1.0))
    std: tuple[float, float, float] = knob(IMAGENET_STD, "per-channel normalisation std (RGB)",
                                           Valid(0.0, 1.0, lo_open=True))
    # lda counts each class once however many images it had, so a class learned from a few
    # dozen photos next to a base of thousands is still predicted (the ridge head weighs
    # images, not classes).
    classifier: Literal["linear", "ncm", "analytic", "lda"] = knob(
        "lda", "what predicts (fieldlearn.device.classifier): linear = the trained head (the paper's LwM); "
               "ncm = cosine nearest class mean; analytic = ridge head; lda = linear discriminant analysis "
               "with equal priors; the last three are solved from class statistics kept as model state")
    features: Literal["frozen", "student", "concat"] = knob(
        "concat", "what the statistics heads read: the pooled last conv map of the frozen ImageNet top "
                  "(frozen), of the trained top (student), or both side by side (concat)")
    ridge: float = knob(0.1, "analytic head: relative ridge; 0 = chosen by generalised cross-validation (slower)",
                        Valid(0.0, 1e6))
    # The covariance of a few hundred images in 2560 dimensions is singular without it, and a
    # class mean from a few dozen photos is noisy in the directions its inverse weighs most.
    # Which shrink is best depends on the protocol (0.8 on the field protocols' validation,
    # 0.2 on CIFAR-100 10 x 10's), so by default every step's own images choose it, left out
    # one at a time: benchmarks/README.md#the-field-scenario-issue-21.
    shrink: float = knob(0.0, "lda head: weight of the scaled identity the pooled covariance is shrunk "
                              "towards; 1 = the covariance is a scaled identity; 0 = chosen among "
                              "0.1-0.9 by the leave-one-out accuracy of every step's images",
                         Valid(0.0, 1.0))
    # Chosen on the field protocol's validation ECE (a full base, 25 images per new class;
    # benchmarks/README.md#the-field-scenario-issue-21): 0 gave 10.8 %, 6 gave 6.6 %.
    temperature_recency: float = knob(
        6.0, "statistics heads: a step's fitted temperature weighs (classes it added) x (classes known after "
             "it)^R in the stored one, so that the latest heads' calibration counts most; 0 = by classes "
             "added alone", Valid(0.0, 64.0))


@dataclass
class LossConfig:
    lc_span: Literal["all", "new"] = knob(
        "new", "LC: cross-entropy over all seen classes, or only over the classes of this increment")
    # With lc_span "new", KD beat BCE on validation for LwF-MC and LwM alike (benchmarks/README.md).
    ld: Literal["bce", "kd"] = knob(
        "kd", "LD: bce = binary cross-entropy between sigmoid(teacher) and sigmoid(student) on the "
              "base-class logits (LwF-MC); kd = softmax distillation with --temperature")
    beta: float = knob(0.5, "weight of LD, the distillation of the teacher's logits", Valid(0.0, 100.0))
    gamma: float = knob(1.0, "weight of LAD, the distillation of the teacher's Grad-CAM maps", Valid(0.0, 100.0))
    temperature: float = knob(2.0, "softmax temperature of LD kd", Valid(0.0, 100.0, lo_open=True))


@dataclass
class TrainConfig:
    epochs: int = knob(6, "epochs of an increment (methods that train)", Valid(1, 10_000))
    base_epochs: int = knob(8, "epochs of the base step (init)", Valid(1, 10_000))
    batch_size: int = knob(64, "images per optimiser step (and per pass of the frozen trunk, at most 128)",
                           Valid(2, 4096))     # BatchNorm trains on 2 images at least
    # Higher rates diverge on the base network's features (benchmarks/README.md).
    lr: float = knob(0.003, "learning rate of an increment (methods that train)", Valid(0.0, 1000.0, lo_open=True))
    base_lr: float = knob(0.01, "learning rate of the base step (init)", Valid(0.0, 1000.0, lo_open=True))
    momentum: float = knob(0.9, "SGD momentum", Valid(0.0, 1.0, hi_open=True))
    weight_decay: float = knob(5e-4, "SGD weight decay", Valid(0.0, 1.0))
    # New-class data alone would otherwise drag the statistics away from what the old classes need.
    freeze_bn_in_increments: bool = knob(True, "freeze the BatchNorm statistics of the trainable blocks in "
                                               "increments")
    augment: bool = knob(True, "random horizontal flip (when nothing is frozen)")
    seed: int = knob(0, "seed of every random choice (initialisation, order, hold-out, batches)", Valid(0, 2**32 - 1))
    device: str = knob("cpu", "torch device: cpu, cuda or cuda:N",
                       Valid(pattern=r"cpu|cuda(:[0-9]{1,2})?", text="cpu, cuda or cuda:N"))
    num_threads: int = knob(0, "torch threads; 0 = torch's default", Valid(0, 1024))
    progress: bool = knob(True, "progress bars")
    max_grad_norm: float = knob(10.0, "clip the gradient norm at this; 0 = no clipping", Valid(0.0, 1e6))
    # `fieldlearn profile` turns it on when a budget needs it.
    checkpoint_top: bool = knob(False, "recompute the trainable blocks' activations during backward "
                                       "(one segment per block) instead of keeping them: less memory, about "
                                       "one more forward of the top per step")
    # ONNX Runtime runs the trunk several times faster than torch eager on a CPU (docs/COST.md).
    trunk_backend: Literal["auto", "torch", "onnxruntime"] = knob(
        "auto", "where the frozen trunk runs for the encode and evaluation passes: auto = ONNX Runtime on a "
                "CPU where it is installed, torch otherwise")
    new_head_init: Literal["scaled", "default"] = knob(
        "scaled", "how the new classes' head rows start: scaled = random directions at the old rows' norm "
                  "and their mean bias; default = torch's nn.Linear init")
    drift: Literal["none", "linear"] = knob(
        "linear", "statistics heads, when an increment trains the top: linear = carry the old classes' "
                  "statistics through an affine map of the top's features fitted on the new images before "
                  "and after the step; none = leave them as formed")
    drift_shrink: float = knob(1.0, "drift linear: shrinkage of the fitted map towards the identity",
                               Valid(0.0, 1e6))
    # Fewer blocks: less drift of the old classes' features.
    increment_blocks: int = knob(-1, "how many of the top's blocks (from the last) train in increments; "
                                     "-1 = all of them (the head always trains)", Valid(-1, 18))


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # "none" is the default: on validation it beat every method that trains the top on
    # new-class images only, LwM included (benchmarks/README.md).
    method: str = knob("none", "what an increment trains: none = the top stays as the base step left it and "
                               "the new classes are learned by their statistics alone; lwm = the paper's "
                               "learner; lwf_mc, finetune, lc_lad = baselines",
                       Valid(choices=("finetune", "lwf_mc", "lwm", "lc_lad", "none")))  # = methods.METHODS
    teacher_backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = knob(
        "auto", "where the teacher runs: auto = TensorRT > ONNX Runtime > torch, whichever runs here")

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


@dataclass
class StepOptions:
    """How an increment is checked (fieldlearn learn, the watch daemon), not saved with the model."""
    val_fraction: float = knob(0.1, "share of the new images held out to measure new-class accuracy (rounded per "
                                    "class, each class keeps the minimum to learn from; held-out images join the "
                                    "class statistics after they are scored)", Valid(0.0, 1.0, hi_open=True))


_SUB = {(RunConfig, "model"): ModelConfig, (RunConfig, "loss"): LossConfig, (RunConfig, "train"): TrainConfig}


def help_of(klass: type, name: str) -> str:
    """The help a field declares ('' for one without)."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(klass) if f.name == name)


# The valid values each field declares, by class: what fieldlearn.device.validate reads.
VALID: dict[type, dict[str, Valid]] = {
    klass: {f.name: f.metadata["valid"] for f in dataclasses.fields(klass) if "valid" in f.metadata}
    for klass in (ModelConfig, LossConfig, TrainConfig, RunConfig, StepOptions)
}
