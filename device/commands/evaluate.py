"""fieldlearn eval: accuracy of a state on a labelled dataset's classes that it knows
(fieldlearn.device.increment.evaluate_version)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fieldlearn.device.increment import evaluate_version


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--data", required=True, help="cifar100[:PATH], fashion-mnist[:PATH] or an ImageFolder root")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    result = evaluate_version(args.state, args.data, args.split)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"version {result['version']} (step {result['step']}): {100 * result['accuracy']:.1f}% on "
              f"{result['images']} images of {result['classes_evaluated']}/{result['classes_known']} known classes",
              flush=True)
        for r in result["per_step"]:
            print(f"  classes of step {r['step']:>2} ({r['classes']:>3}): {100 * r['accuracy']:5.1f}%", flush=True)
    return 0
