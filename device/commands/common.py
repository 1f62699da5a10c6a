"""Small pieces the device commands share."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fieldlearn.device.config import RunConfig
from fieldlearn.runtime.errors import UserError


def setup_torch(cfg: RunConfig) -> None:
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.train.device}: CUDA is not available on this machine")
    index = cfg.train.device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {cfg.train.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def log(msg: str) -> None:
    print(msg, flush=True)


def write_json(path: Path, obj) -> None:
    from fieldlearn.runtime.atomic import write_json as write  # noqa: PLC0415

    write(path, obj)


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
