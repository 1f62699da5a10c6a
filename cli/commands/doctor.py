"""fieldlearn doctor: one screen on what this device has and what fieldlearn will use
(the probes: fieldlearn.field.doctor). Exit status 1 when a required package is missing.

    fieldlearn doctor [--state DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from fieldlearn.field.doctor import collect, render
from fieldlearn.runtime.layout import default_place


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", type=Path, default=None,
                   help="state dir to report on (default $FIELDLEARN_STATE, else ~/.local/share/fieldlearn/state)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the screen")
    p.add_argument("--no-compile", action="store_true", help="skip the kernel compile check")


def run(args: argparse.Namespace) -> int:
    state_dir = (args.state or default_place("state")).expanduser()
    checks, summary, ok = collect(state_dir, no_compile=args.no_compile)
    if args.json:
        print(json.dumps({"ok": ok, "uses": summary, "state_dir": str(state_dir),
                          "checks": [asdict(c) for c in checks]}, indent=1))
    else:
        print(render(checks, summary, ok))
    return 0 if ok else 1
