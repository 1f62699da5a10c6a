"""fieldlearn eval: accuracy of a state on a labelled dataset's classes that it knows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fieldlearn.device.commands.common import log, setup_torch
from fieldlearn.device.data import open_dataset, report_unknown_classes
from fieldlearn.device.learner import evaluate
from fieldlearn.device.state import load_state
from fieldlearn.runtime.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--data", required=True, help="cifar100[:PATH], fashion-mnist[:PATH] or an ImageFolder root")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    st = load_state(args.state)
    setup_torch(st.config)
    data = open_dataset(args.data, args.split, st.config.model.input_size)
    known = [c for c in st.classes if c in data.class_names]
    if not known:
        raise UserError(f"--data {args.data}: shares no class name with the model ({', '.join(st.classes[:5])}...)")
    report_unknown_classes(data.class_names, st.classes, f"--data {args.data}")
    data = data.reorder([data.class_names.index(c) for c in known]).relabel(st.classes)
    groups, start = [], 0
    for h in st.history:
        n = len(h["new_classes"])
        groups.append(list(range(start, start + n)))
        start += n
    acc, per = evaluate(st.student, data, groups, st.config)
    result = {"version": st.version_dir.name, "step": st.step, "classes_evaluated": len(known),
              "classes_known": len(st.classes), "images": len(data), "accuracy": acc,
              "per_step": [{"step": h["step"], "classes": len(g), "accuracy": a}
                           for h, g, a in zip(st.history, groups, per)]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        log(f"version {result['version']} (step {st.step}): {100 * acc:.1f}% on {len(data)} images "
            f"of {len(known)}/{len(st.classes)} known classes")
        for r in result["per_step"]:
            log(f"  classes of step {r['step']:>2} ({r['classes']:>3}): {100 * r['accuracy']:5.1f}%")
    return 0
