"""fieldlearn explain: teacher vs student attention maps as a PNG (fieldlearn.field.explain)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldlearn.field.explain import attention_figure


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--teacher-version", default=None, help="version to compare with (default: the previous one)")
    p.add_argument("--out", type=Path, default=Path("attention.png"))


def run(args: argparse.Namespace) -> int:
    out = attention_figure(args.state, args.images, args.out, args.teacher_version)
    print(f"wrote {out}")
    return 0
