"""fieldlearn learn: add the classes of an ImageFolder directory to a state (one increment).

Only the new classes' images are read; the state holds no data of the classes it knows.
The new version is written completely and then made current; on any error the current
model is untouched. The increment itself is fieldlearn.field.increment.learn_folder.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from fieldlearn.cli.flags import add_option, SECTIONS, add_config_arguments, config_from_args, option, overrides_from_args
from fieldlearn.device.config import RunConfig, StepOptions, Valid
from fieldlearn.field.increment import learn_folder
from fieldlearn.device.protocol import ignored_in_increment
from fieldlearn.store.versions import config_of, read_meta
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import current_version_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, help="ImageFolder root: one sub-folder of images per new class")
    p.add_argument("--state", required=True, type=Path, help="state directory (from fieldlearn init)")
    add_option(p, StepOptions, "val_fraction")
    p.add_argument("--min-new-accuracy", type=option(float, Valid(0.0, 100.0)), default=None, metavar="PCT",
                   help="refuse to publish the version when the held-out accuracy on the new classes is below "
                        "PCT percent (default: publish, with a warning under twice chance)")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="write model.onnx + labels.txt into the new version (default: on)")
    p.add_argument("--eval", dest="eval_data", default=None,
                   help="optional labelled dataset (cifar100, fashion-mnist, ImageFolder) to evaluate all "
                        "known classes on after the step")
    add_config_arguments(p, sections=("loss", "train"))


def say_ignored_options(args: argparse.Namespace) -> None:
    """One warning line naming the options given on the command line that change nothing in
    this step (protocol.ignored_in_increment: unread by the step's method and head, or read
    only by init's base step). They are still saved with the new version's config."""
    given = {dest.partition(".")[2] or dest for dest in vars(args)
             if dest.partition(".")[0] in SECTIONS or dest in ("method", "teacher_backend")}
    if not given:
        return
    try:
        saved = RunConfig.from_dict(config_of(read_meta(current_version_dir(args.state))))
        cfg = config_from_args(args, base=saved)
    except (UserError, ValueError, TypeError, KeyError):
        return                                    # learn_folder says what is wrong with the state
    unread, base = ignored_in_increment(cfg, given)

    def flags(keys: list[str]) -> str:
        return ", ".join("--" + k.replace("_", "-") for k in keys)

    parts = []
    if unread:
        parts.append(f"{flags(unread)}: " + ("--method none trains nothing in increments" if cfg.method == "none"
                                             else f"not read by --method {cfg.method} with the "
                                                  f"{cfg.model.classifier} head"))
    if base:
        parts.append(f"{flags(base)}: read only by init (the base step)")
    if parts:
        warnings.warn("; ".join(parts) + "; they change nothing in this step", UserWarning, stacklevel=1)


def run(args: argparse.Namespace) -> int:
    say_ignored_options(args)
    learn_folder(args.state, args.images, overrides_from_args(args), val_fraction=args.val_fraction, eval_data=args.eval_data,
                 export=args.export,
                 min_new_accuracy=None if args.min_new_accuracy is None else args.min_new_accuracy / 100)
    return 0
