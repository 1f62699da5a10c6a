"""The demo: the main job on an embedded default, what `fieldlearn demo` runs.

    run_demo(cfg, data, out)      every row through the same increments -> the table, results files

A short class-incremental run on real data that installs on a fresh machine
(Fashion-MNIST from Debian's `dataset-fashion-mnist`, or CIFAR-100 where present): the
pretrained network with no training at all (ncm, analytic, lda), fieldlearn's default
learner, LwM, LwF-MC and fine-tuning training every block of the top with the statistics
head, and the paper's LwM with its linear head, from one shared base network, through the
same increments, each evaluated on all classes seen so far (fieldlearn.device.protocol).
Rows other than the default take the settings chosen on the demo protocol's validation
(protocol.CHOSEN["fmnist-demo"]). Prints a table with one line per group of rows, writes
results.json, results.md and accuracy.png.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

from fieldlearn.device.config import ModelConfig, RunConfig, TrainConfig
from fieldlearn.device.data import class_order, incremental_split, open_dataset
from fieldlearn.device.learner import setup_torch
from fieldlearn.device.metrics import plot_accuracy
from fieldlearn.device.protocol import Order, default_row, parse_row, row_settings
from fieldlearn.runtime.atomic import write_json
from fieldlearn.runtime.errors import UserError

DEMO_CONFIG = RunConfig(
    model=ModelConfig(variant="cifar", input_size=32, pretrained=True, freeze_blocks=14),
    train=TrainConfig(epochs=6, base_epochs=8, num_threads=0),
)


def _default_data() -> str:
    from fieldlearn.device.data import CIFAR100_PLACES, FASHION_PLACES

    for spec, places in (("fashion-mnist", FASHION_PLACES), ("cifar100", CIFAR100_PLACES)):
        if any(Path(p).expanduser().exists() for p in places):
            return spec
    raise UserError("--data: no dataset found; install one: apt-get install dataset-fashion-mnist")


DEMO_PROTOCOL = "fmnist-demo"   # the benchmark preset of the demo's protocol: its rows' chosen settings


def default_rows(cfg: RunConfig) -> list[str]:
    """No training; the default learner; LwM, LwF-MC and fine-tuning with every block of the top
    training and the head solved from statistics; the paper's LwM with its trained linear head."""
    head = cfg.model.classifier if cfg.model.classifier != "linear" else "lda"
    return ["ncm", "analytic", "lda", default_row(cfg), f"lwm+{head}", f"lwf_mc+{head}", f"finetune+{head}", "lwm"]


def legend(names: list[str], default: str) -> list[str]:
    """One line per group of rows present: what the group shows."""
    groups = [
        ([n for n in names if n in ("ncm", "analytic", "lda")],
         "the pretrained network, nothing trained: what a user gets for free"),
        ([n for n in names if n == default],
         "fieldlearn's default: the top trained once on the base classes, each new class learned as statistics"),
        ([n for n in names if "+" in n and n != default and not n.startswith(("none+", "joint"))],
         "every block of the top trains on the new images only, the head solved from statistics: the "
         "forgetting column shows what each distillation keeps of the old classes' features"),
        ([n for n in names if "+" not in n and n not in ("ncm", "analytic", "lda")],
         "the paper's trained linear head, at the settings chosen on this protocol's validation"),
    ]
    return [f"{', '.join(rows)}: {text}" for rows, text in groups if rows]


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


def run_demo(cfg: RunConfig, data: str | None, out: Path, *, base: int = 4, steps: int = 3, per_class: int = 200,
             test_per_class: int = 200, order_seed: int = 1993, methods: str | None = None,
             log: Callable[[str], None] = functools.partial(print, flush=True)) -> tuple[str, float]:
    """The rows (`methods`, comma-separated; default: default_rows(cfg)) from one shared base network through the same increments of dataset
    `data` (default: Fashion-MNIST where installed), each evaluated on all classes seen so far.
    Writes OUT/results.json, results.md and accuracy.png; returns (the table, seconds)."""
    setup_torch(cfg)
    spec = data or _default_data()
    names = methods.split(",") if methods else default_rows(cfg)
    rows = [parse_row(n) for n in dict.fromkeys(n.strip() for n in names if n.strip())]
    if not rows:
        raise UserError(f"--methods {methods!r}: no rows given")
    train = open_dataset(spec, "train", cfg.model.input_size)
    test = open_dataset(spec, "test", cfg.model.input_size)
    order = class_order(len(train.class_names), order_seed)
    groups = incremental_split(list(range(len(order))), base, steps)
    used = sum(len(g) for g in groups)
    train = train.reorder(order).select(list(range(used)), per_class, seed=cfg.train.seed)
    test = test.reorder(order).select(list(range(used)), test_per_class, seed=cfg.train.seed)
    log(f"demo: {spec}, {base} base classes + {steps} steps of {len(groups[-1])}, "
        f"{len(train)} training images, rows {', '.join(r.name for r in rows)}")
    t0 = time.perf_counter()
    o = Order(cfg, train, None, test, groups, log=log)
    runs = {}
    protocol = DEMO_PROTOCOL if spec == "fashion-mnist" else None   # its chosen settings are for that data
    for row in rows:
        runs[row.name] = res = o.run(row, {} if row.name == default_row(cfg) else row_settings(row, protocol))
        log(f"{row.name}: average incremental accuracy {100 * res.test.average_incremental:.1f}%, "
            f"last {100 * res.test.last:.1f}% [{res.seconds:.0f} s]")
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    table = "\n".join([format_table(groups, runs), "", *legend(list(runs), default_row(cfg))])
    write_json(out / "results.json", {
        "data": spec, "groups": [[train.class_names[c] for c in g] for g in groups],
        "config": cfg.to_dict(), "seconds": seconds, "default_learner": default_row(cfg),
        "methods": {n: {**r.test.to_dict(), "seconds": r.seconds, "settings": r.settings, "config": r.config}
                    for n, r in runs.items()}})
    plot_accuracy({n: r.test for n, r in runs.items()}, out / "accuracy.png", title=f"{spec}")
    (out / "results.md").write_text(table + "\n")
    return table, seconds
