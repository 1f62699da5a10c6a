"""fieldlearn init: train the base model (step 0) from a dataset into a new state dir
(fieldlearn.field.increment.learn_base)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldlearn.cli.flags import add_config_arguments, config_from_args, option
from fieldlearn.device.config import Valid
from fieldlearn.device.data import MIN_IMAGES
from fieldlearn.field.increment import learn_base


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
    learn_base(args.state, args.data, config_from_args(args), classes=args.classes, order_seed=args.order_seed,
               per_class=args.per_class, export=args.export, force=args.force)
    return 0
