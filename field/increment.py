"""One step of the learner, from images to the published version: the pipelines that
`fieldlearn init`, `learn`, `eval` and the `watch` daemon run, so that each of them is a
call here and nothing else.

    learn_base(state_dir, data, cfg)           step 0: a base model on a labelled dataset
    open_increment(state_dir, overrides)       the current version + the config a step runs with
    learn_new_classes(state_dir, state, new, cfg)
                                               one increment: check the new classes, hold out a
                                               share, learn (fieldlearn.device.learner), score the
                                               held-out images, evaluate, publish with the export
    learn_folder(state_dir, folder, overrides) the same, from an ImageFolder (fieldlearn learn)
    evaluate_version(state_dir, data)          accuracy of the current version on the classes it knows

Every version is published through fieldlearn.store.publish (the gate), together with its
checked model.onnx (fieldlearn.export.deploy) unless the caller turns the export off.
Images are only read into memory; nothing of them is written to the state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fieldlearn.device.classifier import solve_head
from fieldlearn.device.config import RunConfig, StepOptions
from fieldlearn.device.data import (MIN_IMAGES, ImageSet, class_order, known_classes_of, load_image_folder,
                                    open_dataset)
from fieldlearn.device.distributed import DdpStep, barrier, process_group, world_from_env
from fieldlearn.device.learner import (classifier_features, evaluate, fold_in, learn_increment, predict_logits,
                                       setup_torch, train_base)
from fieldlearn.device.model import build_student
from fieldlearn.store.publish import publish
from fieldlearn.store.state import LoadedState, load_state
from fieldlearn.device.names import check_new_class_names
from fieldlearn.device.validate import ConfigOverrides, check_field
from fieldlearn.export.deploy import export_writer
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import META, current_file, version_names

say: Callable[[str], None] = functools.partial(print, flush=True)


# ---------------------------------------------------------------------------- step 0

def learn_base(state_dir: Path, data: str, cfg: RunConfig, *, classes: int | None = None,
               order_seed: int | None = None, per_class: int | None = None, export: bool = True,
               force: bool = False, log: Callable[[str], None] = say) -> Path | None:
    """Train the base model (step 0) on `classes` classes of dataset `data` (in the order of
    `order_seed`), evaluate it on the test split where there is one, and publish it as a
    new version of `state_dir`. Refuses a state that already holds versions unless `force`.

    Under torchrun (WORLD_SIZE > 1; fieldlearn.device.distributed) the ranks train the
    step together and rank 0 alone evaluates, publishes and returns the version dir; the
    other ranks wait for it and return None."""
    kwargs = dict(classes=classes, order_seed=order_seed, per_class=per_class, export=export, force=force)
    world = world_from_env()
    if world is None:
        return _learn_base(state_dir, data, cfg, log=log, **kwargs)
    setup_torch(cfg)
    with process_group(world, cfg.train.device):
        if world.main:
            log(f"distributed base training: {world.size} processes (torchrun, DistributedDataParallel)")
        else:   # quiet: rank 0 speaks for the job
            cfg, log = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False)), _silent
        vd = _learn_base(state_dir, data, cfg, log=log, ddp=DdpStep(world), **kwargs)
        barrier()
    return vd


def _silent(line: str) -> None:
    pass


def _learn_base(state_dir: Path, data: str, cfg: RunConfig, *, classes: int | None, order_seed: int | None,
                per_class: int | None, export: bool, force: bool, log: Callable[[str], None],
                ddp: DdpStep | None = None) -> Path | None:
    setup_torch(cfg)
    held = version_names(state_dir)
    if (held or current_file(state_dir).exists()) and not force:
        raise UserError(f"--state {state_dir}: already holds versions ({', '.join(held[-3:]) or 'current'}); use "
                        "fieldlearn learn to add classes, fieldlearn rollback --to N to serve one of them, or "
                        "--force to start a new base model next to them")
    train = open_dataset(data, "train", cfg.model.input_size, min_images=MIN_IMAGES)
    n = len(train.class_names) if classes is None else classes
    if not 1 <= n <= len(train.class_names):
        raise UserError(f"--classes {n}: the dataset has {len(train.class_names)} classes")
    order = class_order(len(train.class_names), order_seed)[:n]
    train = train.reorder(order).select(list(range(n)), per_class, seed=cfg.train.seed)
    log(f"base training: {n} classes, {len(train)} images")
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg.model, n).to(cfg.train.device)
    t0 = time.perf_counter()
    report = train_base(student, train, cfg, ddp=ddp)
    seconds = time.perf_counter() - t0
    if ddp is not None and not ddp.world.main:
        return None                       # rank 0 evaluates and publishes the same model
    entry = {"step": 0, "method": "base", "new_classes": train.class_names, "n_images": len(train),
             "seconds": round(seconds, 2), "loss_terms": report.loss_terms}
    try:
        test = open_dataset(data, "test", cfg.model.input_size).reorder(order)
        acc, _ = evaluate(student, test, [list(range(n))], cfg)
        entry["test_accuracy"] = acc
        log(f"base accuracy on the test split: {100 * acc:.1f}%")
    except UserError as e:
        log(f"no test split evaluated ({e})")
    writers = [export_writer(student, train.class_names, 0)] if export else []
    vd = publish(state_dir, student, train.class_names, cfg, step=0, history=[entry], report=report,
                 epochs=cfg.train.base_epochs, writers=writers)
    log(f"saved {vd} ({seconds:.1f} s)")
    return vd


# ---------------------------------------------------------------------------- an increment

def step_config(base: RunConfig, overrides: ConfigOverrides | None, source: str | None = None) -> RunConfig:
    """The config a step runs with: `base` (a version's saved config) with the caller's
    overrides (e.g. the options given on the command line) on top, validated, and torch set
    up for it (threads, device)."""
    cfg = overrides.apply(base, source=source) if overrides is not None else base
    setup_torch(cfg)
    return cfg


def open_increment(state_dir: Path, overrides: ConfigOverrides | None = None) -> tuple[LoadedState, RunConfig]:
    """The current version of `state_dir` (loaded on the CPU) and the config its next step
    runs with (step_config). What `fieldlearn learn` and the watch daemon start from."""
    state = load_state(state_dir)
    return state, step_config(state.config, overrides, source=str(state.version_dir / META))


@dataclass
class Increment:
    """What one increment produced: the published version dir and its history entry."""
    version_dir: Path
    entry: dict[str, Any]
    classes: list[str]


# How far under the nearest-class-mean's held-out accuracy a head may fall before the step
# report warns: the images then say more than the head makes of them.
BELOW_NCM_MARGIN = 0.10


@dataclass
class NewClassCheck:
    """How the step went on held-out images of the new classes (predicted among all classes)."""
    accuracy: float            # share predicted as their own class
    taken_for_old: float       # share predicted as one of the classes known before the step
    n_images: int
    chance: float              # 1 / number of classes
    # the same images under cosine nearest-class-mean over the same features and statistics
    # (what the images give with no solved head); None for a trained linear head
    ncm_accuracy: float | None = None

    @property
    def weak(self) -> bool:
        return self.accuracy < 2 * self.chance

    @property
    def below_ncm(self) -> bool:
        """Below the nearest class mean by more than BELOW_NCM_MARGIN and than the sampling
        noise of a share of n_images (1.5 x its largest standard deviation, 0.5 / sqrt(n)):
        one image of 8 is 12.5 points, no ground for a warning."""
        if self.ncm_accuracy is None:
            return False
        margin = max(BELOW_NCM_MARGIN, 0.75 / max(self.n_images, 1) ** 0.5)
        return self.accuracy < self.ncm_accuracy - margin

    def line(self) -> str:
        return (f"held-out accuracy on the new classes (among all {round(1 / self.chance)}): "
                f"{100 * self.accuracy:.1f}% of {self.n_images} images; {100 * self.taken_for_old:.1f}% taken for "
                f"a class known before")

    def warnings(self) -> list[str]:
        out = []
        if self.below_ncm:
            out.append(f"warning: the nearest class mean gets {100 * self.ncm_accuracy:.1f}% of the same held-out "
                       f"images: the head makes far less of the new classes than their images give (a ridge head "
                       f"does this next to a large base: init --classifier lda, the default, counts each class "
                       f"once), and --min-new-accuracy refuses such a version")
        if self.weak:
            out.append(f"warning: that is under twice chance ({200 * self.chance:.1f}%): the new classes are hardly "
                       "recognised; more or clearer images help, and --min-new-accuracy refuses such a version")
        return out


@torch.no_grad()
def check_new_classes(student, val: ImageSet, n_old: int, cfg: RunConfig) -> NewClassCheck:
    ncm = None
    if student.stats is None:
        pred = predict_logits(student, val.images, cfg).argmax(1).cpu()      # [N]
    else:                     # the features once, for the deployed head and the nearest class mean
        w, b, _ = solve_head(student.stats, "ncm")                            # [K, D], [K]
        x = classifier_features(student, val, cfg).to(w.device)               # [N, D], in memory only
        pred = student.classifier(x.to(student.classifier.weight.dtype)).argmax(1).cpu()
        ncm = float(((x @ w.T + b).argmax(1).cpu() == val.labels).float().mean())
    return NewClassCheck(accuracy=float((pred == val.labels).float().mean()),
                         taken_for_old=float((pred < n_old).float().mean()), n_images=len(val),
                         chance=1.0 / student.num_classes, ncm_accuracy=ncm)


def hold_out(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """(learn, held out): `fraction` of each class held out (rounded to the nearest whole
    number of images), never leaving a class fewer than MIN_IMAGES to learn from."""
    if fraction <= 0:
        return data, None
    counts = torch.bincount(data.labels, minlength=len(data.class_names))
    idx = torch.arange(len(data))
    keep, out = [], []
    g = torch.Generator().manual_seed(seed)
    for c in range(len(data.class_names)):
        rows = idx[data.labels == c][torch.randperm(int(counts[c]), generator=g)]
        n_out = max(0, min(math.floor(fraction * len(rows) + 0.5), len(rows) - MIN_IMAGES))   # halves up
        out.append(rows[:n_out])
        keep.append(rows[n_out:])
    k, o = torch.cat(keep).sort().values, torch.cat(out).sort().values
    learn = ImageSet(data.images[k], data.labels[k], data.class_names)
    return learn, (ImageSet(data.images[o], data.labels[o], data.class_names) if len(o) else None)


def learn_new_classes(state_dir: Path, state: LoadedState, new: ImageSet, cfg: RunConfig, *,
                      val_fraction: float = StepOptions.val_fraction, eval_data: str | None = None, where: Path | None = None,
                      export: bool = False, export_images: list[str] | None = None,
                      extra_entry: dict[str, Any] | None = None,
                      min_new_accuracy: float | None = None, log: Callable[[str], None] = say) -> Increment:
    """One increment: `new` (labels 0..n_new-1, its own class names) learned on top of
    `state`, checked on a held-out share of `new` (and evaluated on `eval_data`), saved as the
    next version of `state_dir` and made current. `state.student` is trained in place.

    min_new_accuracy (0..1): refuse (UserError, nothing saved) when the held-out accuracy on
    the new classes is below it. export: the version is published together with its checked
    model.onnx + labels.txt (+ engine where TensorRT is present), or not at all (fieldlearn
    watch). Images are only read into memory; nothing of them is written to the state.
    """
    why = check_field(StepOptions, "val_fraction", val_fraction)
    if why:
        raise UserError(f"--val-fraction {val_fraction}: {why}")
    where = where if where is not None else Path(".")
    check_new_class_names(new.class_names, state.classes, where)
    counts = torch.bincount(new.labels, minlength=len(new.class_names))
    for name, n in zip(new.class_names, counts.tolist()):
        if n < MIN_IMAGES:
            raise UserError(f"{where / name}: {n} readable image(s); a class needs at least {MIN_IMAGES}")
    n_old, n_new = len(state.classes), len(new.class_names)
    classes = state.classes + new.class_names
    data = ImageSet(new.images, new.labels + n_old, classes)
    train, val = hold_out(data, val_fraction, cfg.train.seed)
    if val_fraction > 0:
        log(f"held out {len(val) if val else 0} of {len(data)} images (--val-fraction {val_fraction:g}, rounded per "
            f"class, at least {MIN_IMAGES} per class kept to learn from)"
            + ("; too few images to hold any out: new-class accuracy is not measured" if val is None else ""))
    log(f"learning {n_new} new classes ({len(train)} images) on top of {n_old} with {cfg.method}")
    student = state.student.to(cfg.train.device)   # load_state reads onto the CPU
    t0 = time.perf_counter()
    report = learn_increment(student, train, n_new, cfg, step=state.step + 1)
    seconds = time.perf_counter() - t0
    entry = {"step": state.step + 1, "method": cfg.method, "classifier": cfg.model.classifier,
             "new_classes": new.class_names, "n_images": len(train), "seconds": round(seconds, 2),
             "phases": report.seconds, "loss_terms": report.loss_terms, "teacher_backend": report.teacher_backend,
             "n_val_images": 0, **report.classifier, **(extra_entry or {})}
    if val is not None:
        check = check_new_classes(student, val, n_old, cfg)
        entry.update(new_class_val_accuracy=check.accuracy, new_class_taken_for_old=check.taken_for_old,
                     n_val_images=check.n_images,
                     **({"new_class_val_ncm_accuracy": check.ncm_accuracy} if check.ncm_accuracy is not None else {}))
        log(check.line())
        if min_new_accuracy is not None and check.accuracy < min_new_accuracy:
            raise UserError(f"--min-new-accuracy {100 * min_new_accuracy:g}: held-out accuracy on the new classes "
                            f"is {100 * check.accuracy:.1f}%; the version was not published (current is unchanged)")
        for line in check.warnings():
            log(line)
        added = fold_in(student, val, cfg)
        if added:
            log(f"the {added} held-out images were then added to their classes' statistics")
        elif added == 0:
            log(f"the {len(val)} held-out images were not added to the statistics: fewer than {MIN_IMAGES} "
                "images are never folded in at once (no stored sum may be one image's feature)")
    elif min_new_accuracy is not None:
        raise UserError(f"--min-new-accuracy: no held-out images to measure it on (each class keeps {MIN_IMAGES} "
                        "to learn from: give more images, or a larger --val-fraction)")
    else:
        log("no held-out images (classes this small keep all of them to learn from): new-class accuracy not measured")
    if eval_data:
        test, known = known_classes_of(eval_data, "test", classes, cfg.model.input_size, f"--eval {eval_data}")
        acc, _ = evaluate(student, test, [list(range(n_old)), list(range(n_old, n_old + n_new))], cfg)
        entry["eval_accuracy"] = acc
        log(f"accuracy on {eval_data} ({len(known)} known classes): {100 * acc:.1f}%")
    writers = [export_writer(student, classes, state.step + 1, images=export_images)] if export else []
    vd = publish(state_dir, student, classes, cfg, step=state.step + 1, history=state.history + [entry],
                 report=report, epochs=cfg.train.epochs, writers=writers)
    log(f"saved {vd} ({seconds:.1f} s; phases: " +
        ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()) + ")")
    return Increment(version_dir=vd, entry=entry, classes=classes)


def learn_folder(state_dir: Path, folder: Path, overrides: ConfigOverrides | None = None, **kwargs: Any) -> Increment:
    """`fieldlearn learn`: the classes of an ImageFolder (one sub-folder per new class) learned
    as one increment on top of the current version (open_increment, learn_new_classes)."""
    state, cfg = open_increment(state_dir, overrides)
    new = load_image_folder(folder, cfg.model.input_size, min_images=MIN_IMAGES)
    return learn_new_classes(state_dir, state, new, cfg, where=folder, **kwargs)


# ---------------------------------------------------------------------------- evaluation

def evaluate_version(state_dir: Path, data: str, split: str = "test") -> dict[str, Any]:
    """Accuracy of the current version on the classes of dataset `data` it knows, in all and
    per step (the classes each step added)."""
    state = load_state(state_dir)
    setup_torch(state.config)
    test, known = known_classes_of(data, split, state.classes, state.config.model.input_size, f"--data {data}")
    groups, start = [], 0
    for h in state.history:
        n = len(h["new_classes"])
        groups.append(list(range(start, start + n)))
        start += n
    acc, per = evaluate(state.student, test, groups, state.config)
    return {"version": state.version_dir.name, "step": state.step, "classes_evaluated": len(known),
            "classes_known": len(state.classes), "images": len(test), "accuracy": acc,
            "per_step": [{"step": h["step"], "classes": len(g), "accuracy": a}
                         for h, g, a in zip(state.history, groups, per)]}


__all__ = ["Increment", "NewClassCheck", "check_new_classes", "evaluate_version", "hold_out",
           "learn_base", "learn_folder", "learn_new_classes", "open_increment", "step_config"]
