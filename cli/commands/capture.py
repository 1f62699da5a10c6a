"""fieldlearn capture --label NAME --count N: camera frames into INBOX/NAME/ for `fieldlearn watch`
(fieldlearn.field.capture).

    fieldlearn capture --label forklift --count 200                  # /dev/video0 (USB camera)
    fieldlearn capture --label forklift --count 200 --camera csi     # Jetson CSI camera (GStreamer)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldlearn.field.capture import capture
from fieldlearn.device.config import Valid
from fieldlearn.cli.flags import option
from fieldlearn.runtime.layout import DONE, default_place


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", required=True, help="class name: the folder INBOX/LABEL/ gets the frames")
    p.add_argument("--count", required=True, type=option(int, Valid(1, 1_000_000)), metavar="N", help="frames to save")
    p.add_argument("--camera", default="0",
                   help="camera index (0), 'csi' or 'csi:N' (Jetson CSI sensor N via nvarguscamerasrc), "
                        "a GStreamer pipeline ending in appsink, or a URI / video file (default 0)")
    p.add_argument("--inbox", type=Path, default=None,
                   help="inbox folder (default $FIELDLEARN_INBOX, else ~/.local/share/fieldlearn/inbox)")
    p.add_argument("--interval", type=option(float, Valid(0.0, 3600.0)), default=0.2, metavar="S",
                   help="seconds between saved frames, for varied views (default 0.2; 0 = every frame)")
    p.add_argument("--width", type=option(int, Valid(16, 8192)), default=1280, help="CSI capture width (default 1280)")
    p.add_argument("--height", type=option(int, Valid(16, 8192)), default=720, help="CSI capture height (default 720)")
    p.add_argument("--quality", type=option(int, Valid(1, 100)), default=92, help="JPEG quality (default 92)")


def run(args: argparse.Namespace) -> int:
    folder, saved, seconds = capture((args.inbox or default_place("inbox")).expanduser(), args.label, args.count,
                                     args.camera, interval=args.interval, width=args.width, height=args.height,
                                     quality=args.quality)
    print(f"captured {saved} frames into {folder} ({seconds:.1f} s); marked it {DONE} for fieldlearn watch")
    return 0
