"""fieldlearn demo: the main job on an embedded default.

A short class-incremental run on real data that installs on a fresh machine
(Fashion-MNIST from Debian's `dataset-fashion-mnist`, or CIFAR-100 where present):
base training once, then the same increments learned by LwM and by its baselines,
each evaluated on all classes seen so far. Prints a table, writes results.json and
accuracy.png, and keeps LwM's final model as a state (weights only, no data).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fieldlearn.device.cli_config import add_config_arguments, config_from_args
from fieldlearn.device.commands.common import log, setup_torch, write_json
from fieldlearn.device.config import ModelConfig, RunConfig, TrainConfig, Valid
from fieldlearn.device.data import MAX_IMAGES, MIN_IMAGES, class_order, incremental_split, open_dataset
from fieldlearn.device.incremental import run_protocol
from fieldlearn.device.metrics import plot_accuracy
from fieldlearn.device.validate import option
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
    p.add_argument("--methods", default="finetune,lwf_mc,lwm", help="comma-separated (default finetune,lwf_mc,lwm)")
    p.add_argument("--out", type=Path, default=Path("fieldlearn-demo"), help="output directory")
    add_config_arguments(p, run_fields=("teacher_backend",))


def _default_data() -> str:
    from fieldlearn.device.data import CIFAR100_PLACES, FASHION_PLACES

    for spec, places in (("fashion-mnist", FASHION_PLACES), ("cifar100", CIFAR100_PLACES)):
        if any(Path(p).expanduser().exists() for p in places):
            return spec
    raise UserError("--data: no dataset found; install one: apt-get install dataset-fashion-mnist")


def format_table(result, class_names_order: list[str] | None = None) -> str:
    groups = result.groups
    seen = [sum(len(g) for g in groups[: t + 1]) for t in range(len(groups))]
    head = "| method | " + " | ".join(f"{n} cls" for n in seen) + " | avg incr. | forgetting |"
    sep = "|---" * (len(seen) + 3) + "|"
    rows = [head, sep]
    for name, run in result.runs.items():
        m = run.matrix
        rows.append(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in m.acc)
                    + f" | {100 * m.average_incremental:.1f} | {100 * m.forgetting:.1f} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, base=DEMO_CONFIG)
    setup_torch(cfg)
    spec = args.data or _default_data()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from fieldlearn.device.methods import METHODS  # noqa: PLC0415

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {args.methods}: choose from {', '.join(METHODS)}")
    train = open_dataset(spec, "train", cfg.model.input_size)
    test = open_dataset(spec, "test", cfg.model.input_size)
    order = class_order(len(train.class_names), args.order_seed)
    groups = incremental_split(list(range(len(order))), args.base, args.steps)
    used = sum(len(g) for g in groups)
    train = train.reorder(order).select(list(range(used)), args.per_class, seed=cfg.train.seed)
    test = test.reorder(order).select(list(range(used)), args.test_per_class, seed=cfg.train.seed)
    log(f"demo: {spec}, {args.base} base classes + {args.steps} steps of {len(groups[-1])}, "
        f"{len(train)} training images, methods {', '.join(methods)}")
    t0 = time.perf_counter()
    result = run_protocol(cfg, train, test, groups, methods, log=log)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    table = format_table(result)
    write_json(args.out / "results.json", {
        "data": spec, "groups": [[train.class_names[c] for c in g] for g in groups],
        "config": cfg.to_dict(), "seconds": seconds,
        "methods": {n: {**r.matrix.to_dict(), "seconds": r.seconds,
                        "step_seconds": [rep.seconds for rep in r.reports]} for n, r in result.runs.items()}})
    plot_accuracy({n: r.matrix for n, r in result.runs.items()}, args.out / "accuracy.png", title=f"{spec}")
    (args.out / "results.md").write_text(table + "\n")
    log("")
    log("accuracy (%) on all classes seen so far, after each step:")
    log(table)
    log(f"\n{seconds:.0f} s in all; wrote {args.out}/results.json, results.md, accuracy.png")
    return 0


