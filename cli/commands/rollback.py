"""`fieldlearn rollback --state DIR [--to N]`: serve an earlier version again.

Switches the `current` pointer atomically (default: to the newest complete version older
than the current one); no version is deleted, so a rollback can itself be undone with
`--to`. The next `fieldlearn learn` builds on the version that is current then.
Runs under the state lock (cli/main.py takes it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldlearn.store.versions import read_meta, rollback
from fieldlearn.runtime.layout import versions_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, type=Path, help="state directory")
    p.add_argument("--to", default=None, metavar="N", help="version number to make current (default: the previous one)")


def run(args: argparse.Namespace) -> int:
    old, new = rollback(args.state, args.to)
    meta = read_meta(versions_dir(args.state) / new)
    if old == new:
        print(f"version {new} is already current")
    else:
        print(f"current: {old or '(unreadable)'} -> {new} (step {meta['step']}, {meta['num_classes']} classes)")
    return 0
