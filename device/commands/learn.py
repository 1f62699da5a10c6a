"""fieldlearn learn: add the classes of an ImageFolder directory to a state (one increment).

Only the new classes' images are read; the state holds no data of the classes it knows.
The new version is written completely and then made current; on any error the current
model is untouched. The increment itself is fieldlearn.device.increment.learn_folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldlearn.device.cli_config import add_config_arguments
from fieldlearn.device.config import Valid
from fieldlearn.device.data import MIN_IMAGES
from fieldlearn.device.increment import learn_folder
from fieldlearn.device.validate import option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, help="ImageFolder root: one sub-folder of images per new class")
    p.add_argument("--state", required=True, type=Path, help="state directory (from fieldlearn init)")
    p.add_argument("--val-fraction", type=option(float, Valid(0.0, 1.0, hi_open=True)), default=0.1,
                   help="share of the new images held out to measure new-class accuracy (default 0.1; rounded "
                        f"per class, each class keeps at least {MIN_IMAGES} to learn from; held-out images join "
                        "the class statistics after they are scored)")
    p.add_argument("--min-new-accuracy", type=option(float, Valid(0.0, 100.0)), default=None, metavar="PCT",
                   help="refuse to publish the version when the held-out accuracy on the new classes is below "
                        "PCT percent (default: publish, with a warning under twice chance)")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="write model.onnx + labels.txt into the new version (default: on)")
    p.add_argument("--eval", dest="eval_data", default=None,
                   help="optional labelled dataset (cifar100, fashion-mnist, ImageFolder) to evaluate all "
                        "known classes on after the step")
    add_config_arguments(p, sections=("loss", "train"))


def run(args: argparse.Namespace) -> int:
    learn_folder(args.state, args.images, args, val_fraction=args.val_fraction, eval_data=args.eval_data,
                 export=args.export,
                 min_new_accuracy=None if args.min_new_accuracy is None else args.min_new_accuracy / 100)
    return 0
