"""What the device commands share: how a command prints a line of progress."""

from __future__ import annotations


def log(msg: str) -> None:
    print(msg, flush=True)
