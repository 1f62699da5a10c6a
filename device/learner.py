"""The class-incremental loop: base training (step 0) and one increment (step t).

One increment, as data flows:
    new-class images (uint8, in memory) -> frozen trunk, once per image -> z     [N, C_k, H', W']
    teacher(z) once per image -> logits [N, K_old], b [N], q_t [N, h*w]           (no grad)
    for each epoch, batch: student.forward_top(z) -> (A, logits) -> method terms -> backward -> step
    -> evaluate on all seen classes -> the student becomes the next teacher

With a frozen trunk the inputs are fixed for the whole step, so the trunk and the teacher
run once per image instead of once per image per epoch. Those activations live in memory
only and are dropped when the step ends; nothing here writes to disk. With
freeze_blocks=0 (nothing frozen) batches are built from pixels with a random flip, and
the teacher runs on each batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from fieldlearn.device.classifier import (LdaParts, TooFewImages, check_counts, crossfit_temperature, fit_drift, phi,
                                         solve_head, vote_shrink)
from fieldlearn.device.config import RunConfig, TrainConfig
from fieldlearn.device.data import ImageSet, to_input
from fieldlearn.device.engine_teacher import make_teacher
from fieldlearn.device.methods import Batch, Method, make_method
from fieldlearn.device.model import Student
from fieldlearn.device.teacher import Teacher, TeacherTargets, teacher_targets
from fieldlearn.device.trunk_encoder import trunk_encoder
from fieldlearn.runtime.errors import UserError

if TYPE_CHECKING:
    from fieldlearn.device.distributed import DdpStep

EVAL_BATCH = 128


class TrainingDiverged(UserError):
    """The loss became NaN/Inf: the step is aborted and nothing is saved."""


@dataclass
class StepReport:
    step: int
    method: str
    n_old: int
    n_new: int
    n_images: int
    loss_terms: dict[str, float] = field(default_factory=dict)   # mean of each term over the last epoch
    seconds: dict[str, float] = field(default_factory=dict)      # per phase
    teacher_backend: str = ""
    classifier: dict[str, float] = field(default_factory=dict)    # e.g. the ridge value the head was solved with
    optimizer_steps: list[int] = field(default_factory=list)   # per epoch (fieldlearn.store.publish checks it)
    # True when the step learns by class statistics alone, by design (method "none", or a
    # classifier that reads only the frozen ImageNet top): no optimiser step is expected.
    statistics_only: bool = False


def setup_torch(cfg: RunConfig) -> None:
    """torch as the config asks before a step runs: its thread count, and a UserError naming
    --device when the CUDA device it names is not there."""
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.train.device}: CUDA is not available on this machine")
    index = cfg.train.device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {cfg.train.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def _inputs(student: Student, images: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    m = cfg.model
    return to_input(images, m.input_size, m.mean, m.std).to(cfg.train.device)


def chunk_size(cfg: RunConfig) -> int:
    """Images per forward outside the training loop (encode, teacher targets, evaluation):
    the training batch size, at most EVAL_BATCH. The frozen trunk's early maps are the
    largest tensors of an increment (at 128 px, batch 128: ~0.5 GB), so this pass follows
    the batch size a user lowers to fit a memory budget (fieldlearn profile)."""
    return max(1, min(EVAL_BATCH, cfg.train.batch_size))


@torch.no_grad()
def encode(student: Student, images: torch.Tensor, cfg: RunConfig, batch: int | None = None) -> torch.Tensor:
    """Frozen trunk over uint8 images [N, 3, S, S] -> z [N, C_k, H', W'] (in memory)."""
    student.trunk.eval()
    batch = batch or chunk_size(cfg)
    run = trunk_encoder(student, cfg)          # torch, or the trunk in ONNX Runtime (TrainConfig.trunk_backend)
    out = [run(_inputs(student, images[i: i + batch], cfg)) for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def _uses_cache(cfg: RunConfig) -> bool:
    return cfg.model.freeze_blocks > 0


# ---------------------------------------------------------------------------- one batch
# The pieces of train_step's loop body, apart so that the profiler and the cost benchmark
# (fieldlearn.tools.profile.harness) time and measure this very step, not a copy of it.

def make_optimizer(params: list[torch.nn.Parameter], tc: TrainConfig, lr: float | None = None) -> torch.optim.SGD:
    """The step's optimiser over the trainable parameters (lr: tc.lr unless given)."""
    return torch.optim.SGD(params, lr=tc.lr if lr is None else lr, momentum=tc.momentum,
                           weight_decay=tc.weight_decay)


def train_mode(student: Student, tc: TrainConfig, step: int) -> None:
    """The student as an epoch trains it: train mode, BatchNorm frozen in increments when asked."""
    student.train()
    if step > 0 and tc.freeze_bn_in_increments:
        student.freeze_bn()


def batch_terms(student: Student, method: Method, z: torch.Tensor, labels: torch.Tensor, n_old: int,
                targets: TeacherTargets | None,
                forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> dict[str, torch.Tensor]:
    """One batch forward: z (cached trunk output [B, C_k, H', W'], or normalised pixels)
    through the trainable top -> the method's loss terms (targets: the teacher's logits,
    class and Grad-CAM map for the batch, or None). forward: student.forward_top unless
    given (under torchrun, the same through DistributedDataParallel)."""
    feats, logits = (forward or student.forward_top)(z)
    batch = Batch(labels=labels, n_old=n_old, feats=feats, logits=logits, head_weight=student.head.weight,
                  teacher_logits=targets.logits if targets else None,
                  teacher_class=targets.b if targets else None,
                  teacher_map=targets.q_t if targets else None)
    return method.terms(batch)


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor,
                   max_grad_norm: float) -> None:
    """zero_grad -> backward -> clip (max_grad_norm > 0) -> step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()


def train_step(student: Student, method: Method, data: ImageSet, n_old: int, epochs: int,
               cfg: RunConfig, teacher: Teacher | None = None, step: int = 0,
               lr: float | None = None, z: torch.Tensor | None = None,
               release_teacher: bool = False, ddp: DdpStep | None = None) -> StepReport:
    """Train `student` in place on `data` (labels are global indices) with `method`.

    n_old: classes the teacher knows (0 for the base step). The student's head must
    already have n_old + n_new rows. z: the frozen trunk's output for data.images, when
    the caller already has it (the accuracy benchmark encodes once for all methods).
    release_teacher: close the teacher as soon as it is no longer needed (with a cached
    trunk: once its targets are computed, before the first batch), so its model or
    engine is not resident while the step trains. Only for a teacher the caller made for
    this step. ddp (under torchrun; fieldlearn.device.distributed): train on this rank's
    share of data, with the gradients averaged over the ranks.
    """
    tc = cfg.train
    if len(data) == 0:
        raise UserError("no training images for this step")
    if z is not None and len(z) != len(data):
        raise ValueError(f"z has {len(z)} rows for {len(data)} images")
    if ddp is not None:
        rows = ddp.shard(len(data), tc.seed + 1000 * step)                   # [ceil(N / ranks)]
        data, z = data.subset(rows), (z[rows] if z is not None else None)
    if method.uses_teacher and teacher is None:
        raise ValueError(f"method {method.name} needs a teacher")
    torch.manual_seed(tc.seed + 1000 * step)
    gen = torch.Generator().manual_seed(tc.seed + 1000 * step)
    report = StepReport(step=step, method=method.name, n_old=n_old, n_new=student.num_classes - n_old,
                        n_images=len(data), teacher_backend=getattr(teacher, "backend", ""))
    labels = data.labels.to(tc.device)
    cached = _uses_cache(cfg)

    t0 = time.perf_counter()
    z_all = (z if z is not None else encode(student, data.images, cfg)) if cached else None
    report.seconds["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    targets = None
    if cached and teacher is not None and method.uses_teacher:
        targets = teacher_targets(teacher, z_all, chunk_size(cfg))   # [N, K_old], [N], [N, h*w]
        if release_teacher:
            teacher.close()
            teacher = None
    report.seconds["teacher"] = time.perf_counter() - t0

    params = student.trainable_parameters()
    student.checkpoint_top = tc.checkpoint_top   # activation checkpointing of the trainable blocks
    lr = tc.lr if lr is None else lr
    opt = make_optimizer(params, tc, lr)
    forward = ddp.wrap(student) if ddp is not None else None
    n = len(data)
    per_epoch = max(1, math.ceil(n / tc.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * per_epoch))
    t0 = time.perf_counter()
    teacher_seconds = 0.0
    for epoch in _progress(range(epochs), tc.progress, f"step {step} {method.name}"):
        train_mode(student, tc, step)
        sums: dict[str, float] = {}
        report.optimizer_steps.append(0)
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, tc.batch_size):
            idx = perm[i: i + tc.batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # BatchNorm in train mode needs more than one sample
            if cached:
                z = z_all[idx]
                tgt = targets.select(idx) if targets is not None else None
            else:
                imgs = data.images[idx]
                if tc.augment:
                    flip = torch.rand(len(idx), generator=gen) < 0.5
                    imgs = torch.where(flip[:, None, None, None], imgs.flip(-1), imgs)
                z = _inputs(student, imgs, cfg)
                tgt = None
                if teacher is not None and method.uses_teacher:
                    tt = time.perf_counter()
                    tgt = teacher_targets(teacher, z, EVAL_BATCH)
                    teacher_seconds += time.perf_counter() - tt
            terms = batch_terms(student, method, z, labels[idx], n_old, tgt, forward)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step}, epoch {epoch}, batch {i // tc.batch_size} "
                    f"(learning rate {lr} too high?); nothing was saved")
            optimizer_step(opt, params, loss, tc.max_grad_norm)
            sched.step()
            report.optimizer_steps[-1] += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
        report.loss_terms = {k: v / n for k, v in sums.items()}
    report.seconds["train"] = time.perf_counter() - t0 - teacher_seconds
    report.seconds["teacher"] += teacher_seconds
    if ddp is not None:
        report.loss_terms = ddp.finish(report.loss_terms)
    del z_all, targets  # the step's activations go with the step
    if release_teacher and teacher is not None:
        teacher.close()
    student.eval()
    return report


def _z_chunks(student: Student, data: ImageSet, cfg: RunConfig, z: torch.Tensor | None):
    """(start, z chunk) over data: from the cached trunk output z, or run the trunk."""
    step = chunk_size(cfg)
    run = trunk_encoder(student, cfg) if z is None else None
    for i in range(0, len(data), step):
        yield i, (z[i: i + step] if z is not None else run(_inputs(student, data.images[i: i + step], cfg)))


@torch.no_grad()
def classifier_features(student: Student, data: ImageSet, cfg: RunConfig, z: torch.Tensor | None = None,
                        own_top_only: bool = False) -> torch.Tensor:
    """phi [N, D] of data under the current model (eval mode), in memory only; with
    own_top_only, the trained top's block alone ([N, C]: what drift compensation follows)."""
    student.eval()
    out = []
    for _, zi in _z_chunks(student, data, cfg, z):
        if own_top_only:
            out.append(phi(None, student.top(zi).mean((2, 3))).double())
        else:
            out.append(student.features(zi).double())
    return torch.cat(out)


def carry_statistics(student: Student, before: torch.Tensor, after: torch.Tensor, shrink: float) -> None:
    """Drift compensation: move the old classes' statistics along the trained top's drift,
    estimated from new images only (before/after [N, C]: the top's block of phi on the
    same images under the teacher and the student)."""
    t_top = fit_drift(before, after, shrink)                                 # [C+1, C+1]
    dim, c = student.stats.dim, before.shape[1]
    t = torch.eye(dim + 1, dtype=torch.float64, device=t_top.device)
    lo = dim - c                                                             # the top's block is last in phi
    t[lo:dim, lo:dim] = t_top[:c, :c]
    t[lo:dim, dim] = t_top[:c, c]
    student.stats.transform(t)


CALIB_SHARE = 0.1   # of the base images, held out of the base training to calibrate on


# The most images of one class a step scores left out (temperature, shrink votes). Scoring
# all of a class's images exactly costs a factorisation of their number cubed per shrink
# value: Fashion-MNIST's 6,000 a class made the frozen lda row's base step take minutes.
LOO_ROWS = 500


def per_class_draw(labels: torch.Tensor, count: Callable[[int], int], seed: int) -> torch.Tensor:
    """labels [N] -> [N] bool: count(n) images of each class of n, drawn at random (seeded;
    classes in label order, one permutation each)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten().cpu()
        out[rows[torch.randperm(len(rows), generator=g)[:count(len(rows))]]] = True
    return out


def calibration_rows(data: ImageSet, seed: int) -> torch.Tensor:
    """[N] bool: CALIB_SHARE of each class's images (at least one), which the base training
    does not see, so that the head's temperature is fitted on features that were not
    trained on them (features of training images are more confident than the field's)."""
    return per_class_draw(data.labels, lambda n: max(1, round(CALIB_SHARE * n)) if n > 1 else 0, seed)


def fit_classifier(student: Student, data: ImageSet, classes: list[int], cfg: RunConfig,
                   z: torch.Tensor | None = None, calib: torch.Tensor | None = None) -> dict[str, float]:
    """Fold `classes` (their images: data) into the class statistics and solve the head.
    Returns the step report's classifier entry: the relative ridge used (0 for ncm or a
    trained head) and, with statistics, the feature dimensions the fold left out
    (classifier.shared_dims) and the calibration temperature. The images leave no trace
    but the sums. calib [N] bool: the images whose features did not train on them, which
    fit this step's temperature (None: all of them; none: the temperature stays)."""
    if student.stats is None:
        return {"ridge": 0.0}
    try:
        check_counts(torch.bincount(data.labels.cpu(), minlength=student.num_classes)[classes], classes)
    except TooFewImages as e:
        raise UserError(str(e)) from None
    dev = student.stats.gram.device
    x, y = classifier_features(student, data, cfg, z).to(dev), data.labels.to(dev)   # [N, D], [N]
    student.stats.add(x, y)
    m = cfg.model
    rows = calib.to(dev) if calib is not None else torch.ones(len(y), dtype=torch.bool, device=dev)
    idx = rows.nonzero().flatten()                                     # a class of thousands: a sample scores alike
    rows[idx[~per_class_draw(y[idx].cpu(), lambda n: LOO_ROWS, cfg.train.seed).to(dev)]] = False
    scored = None
    mu = student.stats.means() if m.classifier == "lda" else None   # [K, D] once a step: they do not depend on the shrink
    if m.classifier == "lda" and m.shrink == 0 and rows.any():
        scored = vote_shrink(student.stats, x[rows], y[rows], mu)   # the shrink: chosen by these images, left out
    shrink = student.stats.shrink(m.shrink)
    parts = LdaParts(student.stats, shrink, mu) if m.classifier == "lda" else None   # one factorisation for both
    w, b, lam = solve_head(student.stats, m.classifier, m.ridge, shrink, parts)   # calibrating leaves the statistics as they are
    t_hat = (crossfit_temperature(student.stats, x[rows], y[rows], m.classifier, lam, shrink, seed=cfg.train.seed,
                                  parts=parts, loo=scored[shrink] if scored else None) if rows.any() else None)
    if t_hat is not None:          # the step's own images, scored by heads solved without them
        student.stats.calibrate(t_hat, len(classes), student.num_classes, m.temperature_recency)
    del x
    _load_head(student, w, b)
    return {"ridge": lam, "masked_dims": student.stats.masked_dims, **({"shrink": shrink} if parts else {}),
            "temperature": student.stats.temperature, **({"step_temperature": t_hat} if t_hat is not None else {})}


def fold_in(student: Student, data: ImageSet, cfg: RunConfig) -> int | None:
    """Add more images of known classes to their statistics and solve the head again
    (e.g. held-out images after they were scored). -> how many images the statistics
    counted: fewer than MIN_IMAGES share no dimension, the count included
    (classifier.shared_dims), so they add nothing; None when the head is not solved from
    statistics."""
    if student.stats is None:
        return None
    dev = student.stats.gram.device
    before = float(student.stats.counts.sum())
    student.stats.add(classifier_features(student, data, cfg).to(dev), data.labels.to(dev))
    solve_classifier(student, cfg)
    return round(float(student.stats.counts.sum()) - before)


def solve_classifier(student: Student, cfg: RunConfig) -> float:
    """Solve the statistics head and load it (_load_head). -> the ridge used."""
    m = cfg.model
    w, b, lam = solve_head(student.stats, m.classifier, m.ridge, student.stats.shrink(m.shrink))
    _load_head(student, w, b)
    return lam


def _load_head(student: Student, w: torch.Tensor, b: torch.Tensor) -> None:
    """Load a solved head (w [K, D], b [K]) divided by the calibration temperature."""
    t = student.stats.temperature
    student.set_classifier((w / t).float(), (b / t).float())


def _encoded(student: Student, data: ImageSet, cfg: RunConfig, z: torch.Tensor | None) -> torch.Tensor | None:
    """The frozen trunk's output for data, computed once per step (None without a cached trunk)."""
    if not _uses_cache(cfg):
        return None
    return z if z is not None else encode(student, data.images, cfg)


def train_base(student: Student, data: ImageSet, cfg: RunConfig, z: torch.Tensor | None = None,
               ddp: DdpStep | None = None) -> StepReport:
    """Step 0: LC over the base classes, then the base classes' statistics (stats heads).
    ddp (under torchrun): each rank trains on its share of the images; the statistics are
    formed on every rank over all of them, as in one process."""
    method = make_method("finetune", cfg.loss)
    z = _encoded(student, data, cfg, z)
    if student.stats is not None and cfg.model.features == "frozen":
        # The classifier reads only the frozen ImageNet top: training would change nothing
        # that predicts. This is the pretrained network with a head of class statistics.
        report = StepReport(step=0, method="none", n_old=0, n_new=student.num_classes, n_images=len(data),
                            statistics_only=True)
        calib = None
    else:
        calib = calibration_rows(data, cfg.train.seed) if student.stats is not None else None
        fit = ~calib if calib is not None else torch.ones(len(data), dtype=torch.bool)
        report = train_step(student, method, data.subset(fit), n_old=0, epochs=cfg.train.base_epochs, cfg=cfg,
                            teacher=None, step=0, lr=cfg.train.base_lr, z=z[fit] if z is not None else None,
                            ddp=ddp)
        report.n_images = len(data)
    t0 = time.perf_counter()
    report.classifier.update(fit_classifier(student, data, list(range(student.num_classes)), cfg, z, calib))
    report.seconds["classifier"] = time.perf_counter() - t0
    return report


def learn_increment(student: Student, data: ImageSet, n_new: int, cfg: RunConfig, step: int,
                    method: str | None = None, teacher: Teacher | None = None,
                    z: torch.Tensor | None = None) -> StepReport:
    """Step t: the current student becomes the frozen teacher, a copy with a widened head
    learns the n_new classes from `data` (new-class images only; labels are global indices
    >= the number of classes already known). `student` is modified in place.
    """
    m = make_method(method or cfg.method, cfg.loss)
    n_old = student.num_classes
    bad = data.labels[(data.labels < n_old) | (data.labels >= n_old + n_new)]
    if bad.numel():
        raise UserError(f"increment data has label {int(bad[0])} outside the new classes {n_old}..{n_old + n_new - 1}")
    t_encode = time.perf_counter()
    z = _encoded(student, data, cfg, z)
    encode_s = time.perf_counter() - t_encode
    # The old classes' statistics follow the trained top when it moves (it does not when the
    # classifier reads only the frozen ImageNet top, or nothing trains).
    if not m.trains and student.stats is None:
        raise UserError(f"--method {m.name} trains nothing: it needs a classifier solved from class statistics "
                        "(--classifier ncm or analytic)")
    follow = (m.trains and student.stats is not None and cfg.model.features != "frozen"
              and cfg.train.drift == "linear")
    before = classifier_features(student, data, cfg, z, own_top_only=True) if follow else None
    own_teacher = teacher is None and m.uses_teacher
    if own_teacher:
        teacher = make_teacher(student, cfg.teacher_backend, batch_size=EVAL_BATCH)
    torch.manual_seed(cfg.train.seed + 1000 * step)  # the new head rows' init is part of the run's seed
    student.widen(n_new, cfg.train.new_head_init)
    if m.trains:
        student.train_only_last(cfg.train.increment_blocks)
        try:
            report = train_step(student, m, data, n_old=n_old, epochs=cfg.train.epochs, cfg=cfg, teacher=teacher,
                                step=step, z=z, release_teacher=own_teacher)
        finally:
            student.train_only_last(-1)
    else:
        report = StepReport(step=step, method=m.name, n_old=n_old, n_new=n_new, n_images=len(data),
                            statistics_only=True)
    report.seconds["encode"] = encode_s + report.seconds.get("encode", 0.0)   # the trunk ran here, once
    t0 = time.perf_counter()
    if follow:
        carry_statistics(student, before, classifier_features(student, data, cfg, z, own_top_only=True),
                         cfg.train.drift_shrink)
    # features the step trained on its own images are no ground for a temperature: it stays
    calib = torch.zeros(len(data), dtype=torch.bool) if m.trains and cfg.model.features != "frozen" else None
    report.classifier.update(fit_classifier(student, data, list(range(n_old, n_old + n_new)), cfg, z, calib))
    report.seconds["classifier"] = time.perf_counter() - t0
    return report


@torch.no_grad()
def predict_logits(student: Student, images: torch.Tensor, cfg: RunConfig,
                   z: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images [N, 3, S, S] (or precomputed trunk output z) -> logits [N, K]."""
    student.eval()
    out = []
    step = chunk_size(cfg)
    run = trunk_encoder(student, cfg) if z is None else None
    for i in range(0, len(images) if z is None else len(z), step):
        zi = z[i: i + step] if z is not None else run(_inputs(student, images[i: i + step], cfg))
        out.append(student.predict_top(zi)[1].float())
    return torch.cat(out) if out else torch.zeros(0, student.num_classes)


def evaluate(student: Student, data: ImageSet, groups: list[list[int]], cfg: RunConfig,
             z: torch.Tensor | None = None) -> tuple[float, list[float]]:
    """Accuracy over every class the student knows, overall and per class group.

    data.labels are global indices < student.num_classes; groups[g] lists the classes of step g.
    """
    return score(predict_logits(student, data.images, cfg, z).argmax(1).cpu(), data.labels, groups)


def score(pred: torch.Tensor, labels: torch.Tensor, groups: list[list[int]]) -> tuple[float, list[float]]:
    """pred, labels [N] class indices -> (accuracy, accuracy per class group)."""
    correct = pred == labels
    acc = float(correct.float().mean()) if len(correct) else float("nan")
    per = []
    for g in groups:
        mask = torch.isin(labels, torch.tensor(g))
        per.append(float(correct[mask].float().mean()) if mask.any() else float("nan"))
    return acc, per
