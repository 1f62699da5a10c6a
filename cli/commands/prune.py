"""`fieldlearn prune --state DIR --keep K`: delete all but the newest K versions.

The current version is never deleted (it is kept on top of K when a rollback made an older
one current). Each version leaves by an atomic rename before it is deleted, so a crash
leaves no half-deleted version. Runs under the state lock (cli/main.py takes it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldlearn.store.versions import prune
from fieldlearn.cli.flags import option
from fieldlearn.device.config import Valid


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, type=Path, help="state directory")
    p.add_argument("--keep", required=True, type=option(int, Valid(1, None)), metavar="K", help="how many of the newest versions to keep")


def run(args: argparse.Namespace) -> int:
    removed = prune(args.state, args.keep)
    print(f"removed {len(removed)} version(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0
