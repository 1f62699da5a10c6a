"""`fieldlearn history --state DIR [--json]`: the versions of a state, oldest first.

Reads meta.json files only (no torch, no lock): safe to run while another command works.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fieldlearn.store.versions import history
from fieldlearn.runtime.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, type=Path, help="state directory")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"


def run(args: argparse.Namespace) -> int:
    rows = history(args.state)
    if not rows:
        raise UserError(f"{args.state}: holds no versions (run fieldlearn init)")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"   {'version':>7}  {'step':>4}  {'classes':>7}  {'new':>3}  {'method':<8}  {'test':>6}  {'new-val':>7}  "
          f"{'eval':>6}  {'exported':<9}  created")
    for r in rows:
        mark = "*" if r["current"] else " "
        if r["problem"]:
            print(f"{mark}  {r['version']:>7}  unreadable: {r['problem']}")
            continue
        acc = r["accuracy"]
        exported = ("onnx+trt" if r["engine"] else "onnx") if r["exported"] else "-"
        print(f"{mark}  {r['version']:>7}  {r['step']:>4}  {r['classes']:>7}  {r['new_classes'] or 0:>3}  "
              f"{str(r['method'] or '-'):<8}  {_pct(acc.get('test_accuracy')):>6}  "
              f"{_pct(acc.get('new_class_val_accuracy')):>7}  {_pct(acc.get('eval_accuracy')):>6}  {exported:<9}  "
              f"{r['created']}")
    print("(* = current)")
    return 0
