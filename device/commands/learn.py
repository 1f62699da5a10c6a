"""fieldlearn learn: add the classes of an ImageFolder directory to a state (one increment).

Only the new classes' images are read; the state holds no data of the classes it knows.
The new version is written completely and then made current; on any error the current
model is untouched.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fieldlearn.device.cli_config import add_config_arguments, config_from_args
from fieldlearn.device.commands.common import log, setup_torch
from fieldlearn.device.config import RunConfig, Valid
from fieldlearn.device.data import MIN_IMAGES, ImageSet, load_image_folder, open_dataset, report_unknown_classes
from fieldlearn.device.learner import evaluate, fold_in, learn_increment, predict_logits
from fieldlearn.export.deploy import export_writer
from fieldlearn.device.publish import publish
from fieldlearn.device.state import LoadedState, load_state
from fieldlearn.device.validate import option
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import META


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, help="ImageFolder root: one sub-folder of images per new class")
    p.add_argument("--state", required=True, type=Path, help="state directory (from fieldlearn init)")
    p.add_argument("--val-fraction", type=option(float, Valid(0.0, 1.0, hi_open=True)), default=0.1,
                   help="share of the new images held out to measure new-class accuracy (default 0.1; rounded "
                        f"per class, each class keeps at least {MIN_IMAGES} to learn from; held-out images join "
                        "the class statistics after they are scored)")
    p.add_argument("--min-new-accuracy", type=option(float, Valid(0.0, 100.0)), default=None, metavar="PCT",
                   help="refuse to publish the version when the held-out accuracy on the new classes is below "
                        "PCT percent (default: publish, with a warning under twice chance)")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="write model.onnx + labels.txt into the new version (default: on)")
    p.add_argument("--eval", dest="eval_data", default=None,
                   help="optional labelled dataset (cifar100, fashion-mnist, ImageFolder) to evaluate all "
                        "known classes on after the step")
    add_config_arguments(p, sections=("loss", "train"))


def check_class_names(new: list[str], known: list[str], where: Path) -> None:
    clash = [n for n in new if n in known]
    if clash:
        raise UserError(f"{where / clash[0]}: class '{clash[0]}' is already known to the model")
    for n in new:
        if not n.strip() or n != n.strip() or any(ord(ch) < 32 for ch in n):
            raise UserError(f"{where / n}: class name must be non-blank printable text without edge spaces")


@dataclass
class Increment:
    """What one increment produced: the published version dir and its history entry."""
    version_dir: Path
    entry: dict[str, Any]
    classes: list[str]


@dataclass
class NewClassCheck:
    """How the step went on held-out images of the new classes (predicted among all classes)."""
    accuracy: float            # share predicted as their own class
    taken_for_old: float       # share predicted as one of the classes known before the step
    n_images: int
    chance: float              # 1 / number of classes

    @property
    def weak(self) -> bool:
        return self.accuracy < 2 * self.chance

    def line(self) -> str:
        return (f"held-out accuracy on the new classes (among all {round(1 / self.chance)}): "
                f"{100 * self.accuracy:.1f}% of {self.n_images} images; {100 * self.taken_for_old:.1f}% taken for "
                f"a class known before")


def check_new_classes(student, val: ImageSet, n_old: int, cfg: RunConfig) -> NewClassCheck:
    pred = predict_logits(student, val.images, cfg).argmax(1).cpu()          # [N]
    return NewClassCheck(accuracy=float((pred == val.labels).float().mean()),
                         taken_for_old=float((pred < n_old).float().mean()), n_images=len(val),
                         chance=1.0 / student.num_classes)


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
                      val_fraction: float = 0.1, eval_data: str | None = None, where: Path | None = None,
                      export: bool = False, export_images: list[str] | None = None,
                      extra_entry: dict[str, Any] | None = None,
                      min_new_accuracy: float | None = None) -> Increment:
    """One increment: `new` (labels 0..n_new-1, its own class names) learned on top of
    `state`, checked on a held-out share of `new` (and evaluated on `eval_data`), saved as the
    next version of `state_dir` and made current. `state.student` is trained in place.

    min_new_accuracy (0..1): refuse (UserError, nothing saved) when the held-out accuracy on
    the new classes is below it. export: the version is published together with its checked
    model.onnx + labels.txt (+ engine where TensorRT is present), or not at all (fieldlearn
    watch). Images are only read into memory; nothing of them is written to the state.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    where = where if where is not None else Path(".")
    check_class_names(new.class_names, state.classes, where)
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
    groups = [list(range(n_old)), list(range(n_old, n_old + n_new))]
    if val is not None:
        check = check_new_classes(student, val, n_old, cfg)
        entry.update(new_class_val_accuracy=check.accuracy, new_class_taken_for_old=check.taken_for_old,
                     n_val_images=check.n_images)
        log(check.line())
        if min_new_accuracy is not None and check.accuracy < min_new_accuracy:
            raise UserError(f"--min-new-accuracy {100 * min_new_accuracy:g}: held-out accuracy on the new classes "
                            f"is {100 * check.accuracy:.1f}%; the version was not published (current is unchanged)")
        if check.weak:
            log(f"warning: that is under twice chance ({200 * check.chance:.1f}%): the new classes are hardly "
                "recognised; more or clearer images help, and --min-new-accuracy refuses such a version")
        if fold_in(student, val, cfg):
            log(f"the {len(val)} held-out images were then added to their classes' statistics")
    elif min_new_accuracy is not None:
        raise UserError(f"--min-new-accuracy: no held-out images to measure it on (each class keeps {MIN_IMAGES} "
                        "to learn from: give more images, or a larger --val-fraction)")
    else:
        log("no held-out images (classes this small keep all of them to learn from): new-class accuracy not measured")
    if eval_data:
        test = open_dataset(eval_data, "test", cfg.model.input_size)
        known = [c for c in classes if c in test.class_names]
        if not known:
            raise UserError(f"--eval {eval_data}: shares no class name with the model")
        report_unknown_classes(test.class_names, classes, f"--eval {eval_data}")
        test = test.reorder([test.class_names.index(c) for c in known]).relabel(classes)
        acc, _ = evaluate(student, test, groups, cfg)
        entry["eval_accuracy"] = acc
        log(f"accuracy on {eval_data} ({len(known)} known classes): {100 * acc:.1f}%")
    writers = [export_writer(student, classes, state.step + 1, images=export_images)] if export else []
    vd = publish(state_dir, student, classes, cfg, step=state.step + 1, history=state.history + [entry],
                 report=report, epochs=cfg.train.epochs, writers=writers)
    log(f"saved {vd} ({seconds:.1f} s; phases: " +
        ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()) + ")")
    return Increment(version_dir=vd, entry=entry, classes=classes)


def run(args: argparse.Namespace) -> int:
    state = load_state(args.state)
    cfg = config_from_args(args, base=state.config, source=str(state.version_dir / META))
    setup_torch(cfg)
    new = load_image_folder(args.images, cfg.model.input_size, min_images=MIN_IMAGES)
    learn_new_classes(args.state, state, new, cfg, val_fraction=args.val_fraction, eval_data=args.eval_data,
                      where=args.images, export=args.export,
                      min_new_accuracy=None if args.min_new_accuracy is None else args.min_new_accuracy / 100)
    return 0
