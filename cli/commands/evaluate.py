"""fieldlearn eval: accuracy of a state on a labelled dataset's classes that it knows
(fieldlearn.field.increment.evaluate_version)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fieldlearn.field.increment import evaluate_version


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--data", required=True, help="cifar100[:PATH], fashion-mnist[:PATH] or an ImageFolder root")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    result = evaluate_version(args.state, args.data, args.split)
    for r in result["per_step"]:          # a step whose classes have no image in the data has no accuracy
        if math.isnan(r["accuracy"]):
            r["accuracy"] = None
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"version {result['version']} (step {result['step']}): {100 * result['accuracy']:.1f}% on "
              f"{result['images']} images of {result['classes_evaluated']}/{result['classes_known']} known classes",
              flush=True)
        for r in result["per_step"]:
            acc = "    — (no images of these classes in the data)" if r["accuracy"] is None \
                else f"{100 * r['accuracy']:5.1f}%"
            print(f"  classes of step {r['step']:>2} ({r['classes']:>3}): {acc}", flush=True)
    return 0
