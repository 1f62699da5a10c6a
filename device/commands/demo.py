"""fieldlearn demo: the main job on an embedded default.

A short class-incremental run on real data that installs on a fresh machine
(Fashion-MNIST from Debian's `dataset-fashion-mnist`, or CIFAR-100 where present): the
pretrained network with no training at all (ncm, analytic), fieldlearn's default learner,
and the paper's LwM and its baselines with their linear heads, from one shared base
network, through the same increments, each evaluated on all classes seen so far
(fieldlearn.device.protocol). Prints a table, writes results.json, results.md and
accuracy.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fieldlearn.device.cli_config import add_config_arguments, config_from_args
from fieldlearn.device.commands.common import log
from fieldlearn.device.config import ModelConfig, RunConfig, TrainConfig, Valid
from fieldlearn.device.learner import setup_torch
from fieldlearn.device.data import MAX_IMAGES, MIN_IMAGES, class_order, incremental_split, open_dataset
from fieldlearn.device.metrics import plot_accuracy
from fieldlearn.device.protocol import Order, default_row, parse_row, row_settings
from fieldlearn.device.validate import option
from fieldlearn.runtime.atomic import write_json
from fieldlearn.runtime.errors import UserError

DEMO_CONFIG = RunConfig(
    model=ModelConfig(variant="cifar", input_size=32, pretrained=True, freeze_blocks=14),
    train=TrainConfig(epochs=6, base_epochs=8, num_threads=0),
)


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
                   help="comma-separated rows (fieldlearn bench accuracy --help); default: ncm, analytic (no "
                        "training), the default learner, lwm, lwf_mc, finetune (the paper's linear head)")
    p.add_argument("--out", type=Path, default=Path("fieldlearn-demo"), help="output directory")
    add_config_arguments(p, run_fields=("teacher_backend",))


def _default_data() -> str:
    from fieldlearn.device.data import CIFAR100_PLACES, FASHION_PLACES

    for spec, places in (("fashion-mnist", FASHION_PLACES), ("cifar100", CIFAR100_PLACES)):
        if any(Path(p).expanduser().exists() for p in places):
            return spec
    raise UserError("--data: no dataset found; install one: apt-get install dataset-fashion-mnist")


def format_table(groups: list[list[int]], runs: dict) -> str:
    seen = [sum(len(g) for g in groups[: t + 1]) for t in range(len(groups))]
    head = "| method | " + " | ".join(f"{n} cls" for n in seen) + " | avg incr. | forgetting |"
    sep = "|---" * (len(seen) + 3) + "|"
    rows = [head, sep]
    for name, res in runs.items():
        m = res.test
        rows.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in m.acc)
                    + f" | {100 * m.average_incremental:.1f} | {100 * m.forgetting:.1f} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, base=DEMO_CONFIG)
    setup_torch(cfg)
    spec = args.data or _default_data()
    names = args.methods.split(",") if args.methods else ["ncm", "analytic", default_row(cfg), "lwm", "lwf_mc",
                                                          "finetune"]
    rows = [parse_row(n) for n in dict.fromkeys(n.strip() for n in names if n.strip())]
    if not rows:
        raise UserError(f"--methods {args.methods!r}: no rows given")
    train = open_dataset(spec, "train", cfg.model.input_size)
    test = open_dataset(spec, "test", cfg.model.input_size)
    order = class_order(len(train.class_names), args.order_seed)
    groups = incremental_split(list(range(len(order))), args.base, args.steps)
    used = sum(len(g) for g in groups)
    train = train.reorder(order).select(list(range(used)), args.per_class, seed=cfg.train.seed)
    test = test.reorder(order).select(list(range(used)), args.test_per_class, seed=cfg.train.seed)
    log(f"demo: {spec}, {args.base} base classes + {args.steps} steps of {len(groups[-1])}, "
        f"{len(train)} training images, rows {', '.join(r.name for r in rows)}")
    t0 = time.perf_counter()
    o = Order(cfg, train, None, test, groups, log=log)
    runs = {}
    for row in rows:
        runs[row.name] = res = o.run(row, {} if row.name == default_row(cfg) else row_settings(row))
        log(f"{row.name}: average incremental accuracy {100 * res.test.average_incremental:.1f}%, "
            f"last {100 * res.test.last:.1f}% [{res.seconds:.0f} s]")
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    table = format_table(groups, runs)
    write_json(args.out / "results.json", {
        "data": spec, "groups": [[train.class_names[c] for c in g] for g in groups],
        "config": cfg.to_dict(), "seconds": seconds, "default_learner": default_row(cfg),
        "methods": {n: {**r.test.to_dict(), "seconds": r.seconds, "settings": r.settings, "config": r.config}
                    for n, r in runs.items()}})
    plot_accuracy({n: r.test for n, r in runs.items()}, args.out / "accuracy.png", title=f"{spec}")
    (args.out / "results.md").write_text(table + "\n")
    log("")
    log("accuracy (%) on all classes seen so far, after each step (ncm, analytic: the pretrained network, "
        f"nothing trained; {default_row(cfg)}: fieldlearn's default):")
    log(table)
    log(f"\n{seconds:.0f} s in all; wrote {args.out}/results.json, results.md, accuracy.png")
    return 0
