"""`fieldlearn history --state DIR [--json]`: the versions of a state, oldest first.

Reads meta.json files only (no torch, no lock): safe to run while another command works.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fieldlearn.device.store import history
from fieldlearn.runtime.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, type=Path, help="state directory")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _pct(v) -> str:
    return f"{100 * v:5.1f}%" if isinstance(v, (int, float)) else "    - "


def run(args: argparse.Namespace) -> int:
    rows = history(args.state)
    if not rows:
        raise UserError(f"{args.state}: holds no versions (run fieldlearn init)")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("   version  step  classes  new  method    test   new-val  eval   exported  created")
    for r in rows:
        mark = "*" if r["current"] else " "
        if r["problem"]:
            print(f"{mark}  {r['version']:>6}  unreadable: {r['problem']}")
            continue
        acc = r["accuracy"]
        print(f"{mark}  {r['version']:>6}  {r['step']:>4}  {r['classes']:>7}  {r['new_classes'] or 0:>3}  "
              f"{str(r['method'] or '-'):<8} {_pct(acc.get('test_accuracy'))} {_pct(acc.get('new_class_val_accuracy'))} "
              f"{_pct(acc.get('eval_accuracy'))}  {'onnx' + (' +trt' if r['engine'] else '') if r['exported'] else '-':<8}  "
              f"{r['created']}")
    print("(* = current)")
    return 0
