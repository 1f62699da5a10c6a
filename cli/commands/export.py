"""`fieldlearn export --state DIR`: the current version as ONNX (+ labels, + TensorRT engine).

Parses the options, loads the current version and hands it to fieldlearn.export.deploy
(staging, onnx.checker, parity against torch, the engine where TensorRT is present), then
prints what was written and how close each engine came to torch.
"""

from __future__ import annotations

import argparse
import sys

from fieldlearn.device.config import Valid
from fieldlearn.store.state import load_state
from fieldlearn.cli.flags import option
from fieldlearn.export.deploy import export_state
from fieldlearn.runtime.engines import ParityError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, metavar="DIR", help="state dir (its current version is exported)")
    p.add_argument("--out", metavar="DIR", help="write here instead of the current version dir")
    p.add_argument("--engine", action=argparse.BooleanOptionalAction, default=None,
                   help="build a TensorRT engine too (default: where TensorRT and a GPU are present)")
    p.add_argument("--images", nargs="+", metavar="IMAGE", help="real images for the parity check")
    p.add_argument("--rtol", type=option(float, Valid(0.0, 1.0, lo_open=True)), default=1e-3,
                   help="relative tolerance of the parity check, max|onnx - torch| / max|torch| (default 1e-3)")


def run(args: argparse.Namespace) -> int:
    state = load_state(args.state)
    try:
        report = export_state(state, args.out, engine=args.engine, images=args.images, rtol=args.rtol)
    except ParityError as e:
        print(f"fieldlearn export: parity check failed, nothing written: {e}", file=sys.stderr)
        return 1
    mb = report.onnx_path.stat().st_size / 1e6
    print(f"wrote {report.onnx_path} ({mb:.1f} MB; {len(state.classes)} classes, step {state.step}, "
          f"input_0 [B, 3, {state.student.cfg.input_size}, {state.student.cfg.input_size}] -> output_0)")
    print(f"wrote {report.labels_path}")
    if report.engine_path is not None:
        print(f"wrote {report.engine_path}")
    else:
        print(f"TensorRT engine {report.engine_note}")
    for check, errors in report.parity.items():
        print(f"parity vs torch ({check}): " + ", ".join(f"{n} rel err {e:.2g}" for n, e in errors.items()))
    for note in report.notes:
        print(f"warning: {note}")
    return 0
