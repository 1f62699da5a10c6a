"""fieldlearn learn: add the classes of an ImageFolder directory to a state (one increment).

Only the new classes' images are read; the state holds no data of the classes it knows.
The new version is written completely and then made current; on any error the current
model is untouched.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldlearn.device.cli_config import add_config_arguments, config_from_args
from fieldlearn.device.commands.common import log, setup_torch
from fieldlearn.device.config import RunConfig, Valid
from fieldlearn.device.data import MIN_IMAGES, ImageSet, load_image_folder, open_dataset, report_unknown_classes
from fieldlearn.device.learner import evaluate, learn_increment
from fieldlearn.device.commands.export import export_writer
from fieldlearn.device.publish import publish
from fieldlearn.device.state import LoadedState, load_state
from fieldlearn.device.validate import option
from fieldlearn.runtime.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, help="ImageFolder root: one sub-folder of images per new class")
    p.add_argument("--state", required=True, type=Path, help="state directory (from fieldlearn init)")
    p.add_argument("--val-fraction", type=option(float, Valid(0.0, 1.0, hi_open=True)), default=0.1,
                   help="share of the new images held out to measure new-class accuracy (default 0.1)")
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


def learn_new_classes(state_dir: Path, state: LoadedState, new: ImageSet, cfg: RunConfig, *,
                      val_fraction: float = 0.1, eval_data: str | None = None, where: Path | None = None,
                      export: bool = False, export_images: list[str] | None = None,
                      extra_entry: dict[str, Any] | None = None) -> Increment:
    """One increment: `new` (labels 0..n_new-1, its own class names) learned on top of
    `state`, evaluated on a held-out share of `new` (and on `eval_data`), saved as the next
    version of `state_dir` and made current. `state.student` is trained in place.

    export: the version is published together with its checked model.onnx + labels.txt
    (+ engine where TensorRT is present), or not at all (fieldlearn watch). Images are only
    read into memory; nothing of them is written to the state.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    check_class_names(new.class_names, state.classes, where if where is not None else Path("."))
    n_old, n_new = len(state.classes), len(new.class_names)
    classes = state.classes + new.class_names
    data = ImageSet(new.images, new.labels + n_old, classes)
    train, val = data.split(val_fraction, seed=cfg.train.seed) if val_fraction > 0 else (data, None)
    if val_fraction > 0:
        log(f"held out {len(val)} of {len(data)} images (--val-fraction {val_fraction:g}, rounded per class)"
            + ("; too few images to hold any out: new-class accuracy is not measured" if not len(val) else ""))
    log(f"learning {n_new} new classes ({len(train)} images) on top of {n_old} with {cfg.method}")
    student = state.student.to(cfg.train.device)   # load_state reads onto the CPU
    t0 = time.perf_counter()
    report = learn_increment(student, train, n_new, cfg, step=state.step + 1)
    seconds = time.perf_counter() - t0
    entry = {"step": state.step + 1, "method": cfg.method, "new_classes": new.class_names,
             "n_images": len(train), "seconds": round(seconds, 2), "phases": report.seconds,
             "loss_terms": report.loss_terms, "teacher_backend": report.teacher_backend, **(extra_entry or {})}
    groups = [list(range(n_old)), list(range(n_old, n_old + n_new))]
    if val is not None and len(val):
        acc, _ = evaluate(student, val, groups, cfg)
        entry["new_class_val_accuracy"] = acc
        entry["n_val_images"] = len(val)
        log(f"held-out accuracy on the new classes (among all {len(classes)}): {100 * acc:.1f}%")
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
    cfg = config_from_args(args, base=state.config, source=str(state.version_dir / "meta.json"))
    setup_torch(cfg)
    new = load_image_folder(args.images, cfg.model.input_size, min_images=MIN_IMAGES)
    learn_new_classes(args.state, state, new, cfg, val_fraction=args.val_fraction, eval_data=args.eval_data,
                      where=args.images, export=args.export)
    return 0
