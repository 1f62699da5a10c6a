"""fieldlearn demo: a short class-incremental run on real data, LwM next to fine-tuning and
what not learning gives (fieldlearn.field.demo). Prints the table; writes results.json,
results.md and accuracy.png into --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldlearn.cli.flags import add_config_arguments, config_from_args, option
from fieldlearn.cli.commands.common import log
from fieldlearn.device.config import Valid
from fieldlearn.device.data import MAX_IMAGES, MIN_IMAGES
from fieldlearn.field.demo import DEMO_CONFIG, run_demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="fashion-mnist (default where installed), cifar100, or an ImageFolder root with train/ and test/")
    p.add_argument("--base", type=option(int, Valid(1, 10_000)), default=4, help="base classes (default 4)")
    p.add_argument("--steps", type=option(int, Valid(0, 10_000)), default=3, help="increments (default 3)")
    p.add_argument("--per-class", type=option(int, Valid(MIN_IMAGES, MAX_IMAGES)), default=200,
                   help="training images per class (default 200)")
    p.add_argument("--test-per-class", type=option(int, Valid(1, MAX_IMAGES)), default=200,
                   help="test images per class (default 200)")
    p.add_argument("--order-seed", type=option(int, Valid(0, 2**32 - 1)), default=1993)
    p.add_argument("--methods", default=None,
                   help="comma-separated rows (fieldlearn bench accuracy --help); default: ncm, analytic, lda "
                        "(no training), the default learner, lwm+lda, lwf_mc+lda, finetune+lda (every block "
                        "trains, statistics head), lwm (the paper's linear head)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="output directory (default runs/demo, which git ignores in a checkout)")
    add_config_arguments(p, run_fields=("teacher_backend",))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, base=DEMO_CONFIG)
    table, seconds = run_demo(cfg, args.data, args.out, base=args.base, steps=args.steps, per_class=args.per_class,
                              test_per_class=args.test_per_class, order_seed=args.order_seed, methods=args.methods,
                              log=log)
    log("")
    log("accuracy (%) on all classes seen so far, after each step:")
    log(table)
    log(f"\n{seconds:.0f} s in all; wrote {args.out}/results.json, results.md, accuracy.png")
    return 0
