"""One training step of the learner, set up outside the learner so it can be timed and measured.

    StepHarness(spec).step()   one optimiser step of `spec.method` on one batch

The batch is what the learner's loop hands the model for a frozen trunk: z = trunk(x)
[B, C_k, h', w'] cut from the in-memory cache, the labels, and (for methods with a teacher)
the teacher's logits and Grad-CAM maps precomputed once per image, after which the
learner closes the teacher (release_teacher()). The step itself is the learner's own:
fieldlearn.device.learner's make_optimizer, train_mode, batch_terms (forward_top -> method
terms) and optimizer_step (zero_grad -> backward -> clip -> SGD step), the body of
train_step's loop. With freeze_blocks=0 the batch is normalised pixels and the teacher runs
on each batch, as in the learner.

`naive_lwm` (fieldlearn.tools.bench_cost.NaiveLwM) is the baseline the way public LwM
code computes the step; it is set up here too so that the profiler and the cost
benchmark measure every method with the same harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict

import torch

from fieldlearn.device import learner
from fieldlearn.device.config import RunConfig
from fieldlearn.device.methods import METHODS, make_method
from fieldlearn.device.model import build_student
from fieldlearn.device.teacher import TeacherTargets, teacher_targets

NAIVE = ("naive_lwm", "naive_lwm_pixels")


@dataclass
class StepSpec:
    """What to set up: a config, a method, and the increment's shape."""
    cfg: RunConfig
    method: str = "lwm"
    n_old: int = 50           # classes the teacher knows
    n_new: int = 10           # classes of the increment
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cfg"] = self.cfg.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StepSpec":
        return cls(**{**d, "cfg": RunConfig.from_dict(d["cfg"])})


def method_names() -> list[str]:
    return [*METHODS, *NAIVE]


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size] noise images (memory and speed do not depend on content)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8, device="cpu")


class StepHarness:
    """A student (with n_old + n_new outputs), its teacher (when the method has one), one
    batch and an optimiser, ready for `step()`.

    build=False leaves every part to the caller (the profiler builds them one by one to
    measure each). Attributes: student, teacher, method, opt, z (the batch input), labels,
    targets (teacher logits, b, q_t for the batch, or None).
    """

    def __init__(self, spec: StepSpec, device: str | None = None, build: bool = True):
        self.spec = spec
        cfg = spec.cfg
        self.device = torch.device(device or cfg.train.device)
        self.naive = spec.method in NAIVE
        self.method = None if self.naive else make_method(spec.method, cfg.loss)
        self.uses_teacher = self.naive or self.method.uses_teacher
        self.cached = cfg.model.freeze_blocks > 0 and spec.method != "naive_lwm_pixels"
        self.student = self.teacher = self.naive_step = self.opt = self.targets = None
        self.teacher_backend = "none"     # kept after release_teacher()
        if build:
            self.build_student()
            self.make_teacher()
            self.widen()
            images = random_images(cfg.train.batch_size, cfg.model.input_size, spec.seed)
            z = self.encode_images(images)
            self.set_batch(z, self.precompute(z))
            self.release_teacher()
            self.make_optimizer()

    # -- set-up in the order the learner does it: student, teacher, widen, encode, teacher
    #    targets, batch, optimiser. The profiler calls these one by one to measure each.

    def build_student(self) -> None:
        torch.manual_seed(self.spec.seed)
        self.student = build_student(self.spec.cfg.model, self.spec.n_old).to(self.device).eval()

    def make_teacher(self) -> None:
        if not self.uses_teacher:
            return
        if self.naive:
            from fieldlearn.tools.naive_lwm import NaiveLwM  # noqa: PLC0415

            self.naive_step = NaiveLwM(self.student, self.spec.cfg, from_pixels=not self.cached)
            self.teacher = self.naive_step.teacher
        else:
            from fieldlearn.device.engine_teacher import make_teacher  # noqa: PLC0415

            self.teacher = make_teacher(self.student, self.spec.cfg.teacher_backend, batch_size=learner.EVAL_BATCH)
        self.teacher_backend = "torch, per batch" if self.naive else getattr(self.teacher, "backend", "torch")

    def widen(self) -> None:
        torch.manual_seed(self.spec.seed + 1)
        self.student.widen(self.spec.n_new)
        self.student.checkpoint_top = self.spec.cfg.train.checkpoint_top

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> what the step's batch is cut from: z (cached trunk output, by the
        learner's own encode) or normalised pixels."""
        from fieldlearn.device.data import to_input  # noqa: PLC0415

        cfg = self.spec.cfg
        if self.cached:
            return learner.encode(self.student, images, cfg)
        return to_input(images, cfg.model.input_size, cfg.model.mean, cfg.model.std).to(self.device)

    def precompute(self, z: torch.Tensor) -> TeacherTargets | None:
        """The teacher's targets for every cached image (None where the step runs the teacher itself)."""
        if self.teacher is None or self.naive or not self.cached:
            return None
        return teacher_targets(self.teacher, z, learner.chunk_size(self.spec.cfg))

    def release_teacher(self) -> bool:
        """Close the teacher once its targets are precomputed, as the learner does
        (train_step's release_teacher). True if it was released."""
        if self.teacher is None or self.naive or not self.cached:
            return False
        self.teacher.close()
        self.teacher = None
        return True

    def set_batch(self, z_all: torch.Tensor, targets_all: TeacherTargets | None) -> None:
        """The first batch_size rows, gathered as the learner's loop does (z_all[idx])."""
        spec = self.spec
        idx = torch.arange(min(spec.cfg.train.batch_size, len(z_all)), device=z_all.device)
        self.z = z_all[idx]
        self.targets = None if targets_all is None else targets_all.select(idx)
        g = torch.Generator().manual_seed(spec.seed)
        labels = torch.randint(0, spec.n_new, (len(idx),), generator=g, device="cpu")
        self.labels = (spec.n_old + labels).to(self.device)

    def make_optimizer(self) -> None:
        tc = self.spec.cfg.train
        self.params = self.student.trainable_parameters()
        self.opt = learner.make_optimizer(self.params, tc)
        learner.train_mode(self.student, tc, step=1)          # an increment's epoch
        if self.naive_step is not None:
            self.naive_step.bind(self.labels, self.spec.n_old)

    def step(self) -> torch.Tensor:
        """One optimiser step, by the learner's own batch_terms and optimizer_step (the body
        of train_step's loop); returns the loss (detached, not synchronised)."""
        if self.naive_step is not None:
            loss = self.naive_step.loss(self.z)
        else:
            loss = self._loss()
        learner.optimizer_step(self.opt, self.params, loss, self.spec.cfg.train.max_grad_norm)
        return loss.detach()

    def _loss(self) -> torch.Tensor:
        z = self.z
        if not self.cached and self.teacher is not None:
            with torch.no_grad():      # learner without a frozen trunk: the teacher runs per batch
                self.targets = teacher_targets(self.teacher, self.student.encode(z), len(z))
        z = z if self.cached else self.student.encode(z)
        return sum(learner.batch_terms(self.student, self.method, z, self.labels, self.spec.n_old,
                                       self.targets).values())


class SavedBytes:
    """Bytes autograd saves for backward during `with saved.hooks(): h.step()`: each storage
    once, by its identity (a meta tensor of the analytic estimate has no address), the
    student's weights and buffers and the batch itself excluded. The one counter of the
    analytic estimate and the measurement."""

    def __init__(self, h: StepHarness):
        self.exclude = {_storage_key(t) for t in [*h.student.parameters(), *h.student.buffers(), h.z]}
        self.sizes: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            key = _storage_key(t)
        except (RuntimeError, NotImplementedError):   # tensor subclasses without storage
            return t
        if key not in self.exclude:
            self.sizes[key] = t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


__all__ = ["NAIVE", "SavedBytes", "StepSpec", "StepHarness", "random_images", "method_names"]
