"""fieldlearn bench SUBCOMMAND: benchmarks that run through the product's own code.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`
and is imported only when `fieldlearn bench` runs.
"""

from __future__ import annotations

import argparse
import importlib

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "accuracy": ("fieldlearn.tools.bench_accuracy",
                 "class-incremental accuracy: finetune, lwf_mc, lwm, lc_lad and the joint upper bound in one run"),
    "cost": ("fieldlearn.tools.bench_cost",
             "step time and peak memory of LwM vs fine-tuning, LwF-MC and a naive LwM; time to learn one increment"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    for name, (module, text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=text, description=text)
        importlib.import_module(module).add_arguments(sp)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(SUBCOMMANDS[args.bench_command][0]).run(args) or 0)
