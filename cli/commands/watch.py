"""fieldlearn watch INBOX --state DIR: learn new classes as they arrive, serve the new model.

Each sub-folder of INBOX is a new class (its name is the label). A folder is taken once it
holds a `.done` file (fieldlearn capture writes one last) or, with --quiet-seconds N, once
nothing in it changed for N seconds; and in both cases only once it has been quiet for
--settle-seconds and holds at least 5 images. Everything ready is learned as one LwM increment,
evaluated on held-out images of the new classes, exported to ONNX (checked against torch)
and published as the state's new current version; then the learned images are deleted
(or moved to --keep-images DIR/<version>/<class>/). See fieldlearn.field.watch for what
happens when the daemon is stopped mid-increment.

    fieldlearn watch ~/inbox --state ~/fieldlearn-state
    fieldlearn watch ~/inbox --state ~/fieldlearn-state --print-unit > fieldlearn-watch.service
"""

from __future__ import annotations

import argparse
import functools
import getpass
import os
import shutil
import signal
import sys
from pathlib import Path

from fieldlearn.cli.flags import add_option, add_config_arguments, option, overrides_from_args
from fieldlearn.device.config import StepOptions, Valid
from fieldlearn.field.watch import SETTLE_SECONDS, STATUS, Stopped, Watcher, systemd_unit

SECONDS = Valid(0.0, 7 * 86400.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inbox", type=Path, metavar="INBOX", help="folder whose sub-folders are new classes (created if missing)")
    p.add_argument("--state", required=True, type=Path, help="state directory (from fieldlearn init)")
    p.add_argument("--quiet-seconds", type=option(float, SECONDS), default=0, metavar="N",
                   help="also take a folder without .done once nothing in it changed for N seconds (default: off)")
    p.add_argument("--settle-seconds", type=option(float, SECONDS), default=SETTLE_SECONDS, metavar="N",
                   help=f"take a folder only once nothing in it changed for N seconds, .done or not "
                        f"(default {SETTLE_SECONDS:g})")
    p.add_argument("--keep-images", type=Path, default=None, metavar="DIR",
                   help="move learned images to DIR/<version>/<class>/ instead of deleting them (outside the state)")
    p.add_argument("--once", action="store_true", help="learn what is ready now, then exit")
    p.add_argument("--poll", type=option(float, Valid(0.0, 3600.0, lo_open=True)), default=2.0, metavar="S",
                   help="seconds between inbox scans (default 2)")
    p.add_argument("--status", type=Path, default=None, metavar="FILE",
                   help=f"status JSON file (default: STATE/{STATUS})")
    add_option(p, StepOptions, "val_fraction")
    p.add_argument("--eval", dest="eval_data", default=None,
                   help="optional labelled dataset to evaluate all known classes on after each increment")
    p.add_argument("--print-unit", action="store_true",
                   help="print a systemd unit that runs this command (with these options) and exit")
    p.add_argument("--unit-scope", choices=("system", "user"), default="system",
                   help="--print-unit: a system unit (User= this user) or a `systemctl --user` unit")
    add_config_arguments(p, sections=("loss", "train"))


def _executable() -> list[str]:
    script = Path(sys.executable).parent / "fieldlearn"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("fieldlearn")
    return [found] if found else [sys.executable, "-m", "fieldlearn.cli.main"]


def _unit_args(args: argparse.Namespace) -> list[str]:
    """The options of this command line that the unit should repeat."""
    out = []
    if args.quiet_seconds:
        out += ["--quiet-seconds", f"{args.quiet_seconds:g}"]
    if args.settle_seconds != SETTLE_SECONDS:
        out += ["--settle-seconds", f"{args.settle_seconds:g}"]
    if args.keep_images is not None:
        out += ["--keep-images", str(args.keep_images.expanduser().resolve())]
    if args.poll != 2.0:
        out += ["--poll", f"{args.poll:g}"]
    if args.status is not None:
        out += ["--status", str(args.status.expanduser().resolve())]
    if args.val_fraction != StepOptions.val_fraction:
        out += ["--val-fraction", f"{args.val_fraction:g}"]
    if args.eval_data:
        out += ["--eval", args.eval_data]
    for key, value in vars(args).items():     # config options given on the command line
        if "." in key:
            flag = "--" + key.partition(".")[2].replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, (list, tuple)):
                out += [flag, *map(str, value)]
            else:
                out += [flag, str(value)]
    return out


def run(args: argparse.Namespace) -> int:
    watcher = Watcher(args.inbox, args.state, quiet_seconds=args.quiet_seconds, keep_images=args.keep_images,
                      status_path=args.status, val_fraction=args.val_fraction, eval_data=args.eval_data,
                      overrides=overrides_from_args(args), log=functools.partial(print, flush=True),
                      settle_seconds=args.settle_seconds)
    if args.print_unit:
        # under sudo the service runs as the user who owns the venv and state, not as root
        user = os.environ.get("SUDO_USER") or None if os.geteuid() == 0 else getpass.getuser()
        print(systemd_unit(watcher.inbox, watcher.state_dir, executable=_executable(),
                           extra_args=_unit_args(args), user=user, scope=args.unit_scope), end="")
        return 0

    watcher.check_config()

    def on_term(signum, frame):  # noqa: ARG001
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return watcher.run(once=args.once, poll=args.poll)
    finally:
        signal.signal(signal.SIGTERM, previous)
