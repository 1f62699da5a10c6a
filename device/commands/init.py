"""fieldlearn init: train the base model (step 0) from a dataset into a new state dir."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fieldlearn.device.cli_config import add_config_arguments, config_from_args
from fieldlearn.device.commands.common import log, setup_torch
from fieldlearn.device.config import Valid
from fieldlearn.device.data import MIN_IMAGES, class_order, open_dataset
from fieldlearn.device.learner import evaluate, train_base
from fieldlearn.device.model import build_student
from fieldlearn.export.deploy import export_writer
from fieldlearn.device.publish import publish
from fieldlearn.device.validate import option
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import current_file, version_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="cifar100[:PATH], fashion-mnist[:PATH] or an ImageFolder root")
    p.add_argument("--state", required=True, type=Path, help="state directory to create")
    p.add_argument("--classes", type=option(int, Valid(1, None)), default=None,
                   help="number of base classes (default: all)")
    p.add_argument("--order-seed", type=option(int, Valid(0, 2**32 - 1)), default=None,
                   help="class order seed (default: dataset order)")
    p.add_argument("--per-class", type=option(int, Valid(MIN_IMAGES, None)), default=None,
                   help="at most this many training images per class")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="write model.onnx + labels.txt into the version (default: on)")
    p.add_argument("--force", action="store_true",
                   help="add a new base version even if the state has versions (they stay; see fieldlearn history)")
    add_config_arguments(p, run_fields=())


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    setup_torch(cfg)
    held = version_names(args.state)
    if (held or current_file(args.state).exists()) and not args.force:
        raise UserError(f"--state {args.state}: already holds versions ({', '.join(held[-3:]) or 'current'}); use "
                        "fieldlearn learn to add classes, fieldlearn rollback --to N to serve one of them, or "
                        "--force to start a new base model next to them")
    train = open_dataset(args.data, "train", cfg.model.input_size, min_images=MIN_IMAGES)
    n = len(train.class_names) if args.classes is None else args.classes
    if not 1 <= n <= len(train.class_names):
        raise UserError(f"--classes {n}: the dataset has {len(train.class_names)} classes")
    order = class_order(len(train.class_names), args.order_seed)[:n]
    train = train.reorder(order).select(list(range(n)), args.per_class, seed=cfg.train.seed)
    log(f"base training: {n} classes, {len(train)} images")
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg.model, n).to(cfg.train.device)
    t0 = time.perf_counter()
    report = train_base(student, train, cfg)
    seconds = time.perf_counter() - t0
    entry = {"step": 0, "method": "base", "new_classes": train.class_names, "n_images": len(train),
             "seconds": round(seconds, 2), "loss_terms": report.loss_terms}
    try:
        test = open_dataset(args.data, "test", cfg.model.input_size).reorder(order)
        acc, _ = evaluate(student, test, [list(range(n))], cfg)
        entry["test_accuracy"] = acc
        log(f"base accuracy on the test split: {100 * acc:.1f}%")
    except UserError as e:
        log(f"no test split evaluated ({e})")
    writers = [export_writer(student, train.class_names, 0)] if args.export else []
    vd = publish(args.state, student, train.class_names, cfg, step=0, history=[entry], report=report,
                 epochs=cfg.train.base_epochs, writers=writers)
    log(f"saved {vd} ({seconds:.1f} s)")
    return 0
