"""fieldlearn capture --label NAME --count N: camera frames into INBOX/NAME/ for `fieldlearn watch`.

    fieldlearn capture --label forklift --count 200                  # /dev/video0 (USB camera)
    fieldlearn capture --label forklift --count 200 --camera csi     # Jetson CSI camera (GStreamer)
    fieldlearn capture --label forklift --count 200 --camera rtsp://cam.local/stream
    fieldlearn capture --label forklift --count 50 --camera clip.mp4 --interval 0

Frames are JPEG files written atomically (a hidden temp name, then a rename), and `.done`
is written only after the last one, so watch never takes a half-captured class. OpenCV is
optional (pip install opencv-python-headless); for a Jetson CSI camera use JetPack's OpenCV
(python3-opencv, built with GStreamer), which a venv made with --system-site-packages sees.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from fieldlearn.runtime.errors import UserError
from fieldlearn.device.config import Valid
from fieldlearn.device.validate import option
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


def import_cv2():
    try:
        import cv2  # noqa: PLC0415
    except ImportError:
        raise UserError("OpenCV is not installed: pip install opencv-python-headless "
                        "(on a Jetson with a CSI camera: sudo apt-get install python3-opencv)") from None
    return cv2


def csi_pipeline(sensor: int, width: int, height: int, fps: int = 30) -> str:
    """Jetson CSI camera -> BGR frames for OpenCV's appsink."""
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width={width}, height={height}, "
            f"framerate={fps}/1 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! "
            f"video/x-raw, format=BGR ! appsink drop=true max-buffers=1")


def has_gstreamer(cv2) -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def open_camera(cv2, camera: str, width: int, height: int):
    if camera.isdigit():
        source, api = int(camera), cv2.CAP_ANY
    elif camera == "csi" or camera.startswith("csi:"):
        sensor = camera.partition(":")[2] or "0"
        if not sensor.isdigit():
            raise UserError(f"--camera {camera}: expected csi or csi:N (N = sensor id)")
        source, api = csi_pipeline(int(sensor), width, height), cv2.CAP_GSTREAMER
    elif "appsink" in camera:
        source, api = camera, cv2.CAP_GSTREAMER
    else:
        source, api = camera, cv2.CAP_ANY
    if api == cv2.CAP_GSTREAMER and not has_gstreamer(cv2):
        raise UserError(f"--camera {camera}: this OpenCV ({cv2.__version__}) has no GStreamer; on a Jetson use "
                        "JetPack's: sudo apt-get install python3-opencv (and a venv with --system-site-packages)")
    cap = cv2.VideoCapture(source, api)
    if not cap.isOpened():
        raise UserError(f"--camera {camera}: cannot open it (no such device, file or stream?)")
    return cap


def check_label(label: str) -> None:
    if not label.strip() or label != label.strip() or any(ord(ch) < 32 for ch in label):
        raise UserError(f"--label {label!r}: must be non-blank printable text without edge spaces")
    if "/" in label or "\\" in label or label.startswith(".") or label in ("..",):
        raise UserError(f"--label {label!r}: must be a plain folder name (no '/', no leading '.')")


def run(args: argparse.Namespace) -> int:
    check_label(args.label)
    cv2 = import_cv2()
    inbox = (args.inbox or default_place("inbox")).expanduser()
    folder = inbox / args.label
    if (folder / DONE).exists():
        raise UserError(f"{folder}: already complete and waiting for (or being learned by) fieldlearn watch; "
                        "wait for it to be learned, or use another --label")
    folder.mkdir(parents=True, exist_ok=True)
    first = len([p for p in folder.iterdir() if p.suffix == ".jpg" and not p.name.startswith(".")])
    cap = open_camera(cv2, args.camera, args.width, args.height)
    saved, last, t0 = 0, -float("inf"), time.monotonic()
    try:
        while saved < args.count:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            now = time.monotonic()
            if now - last < args.interval:
                continue
            last = now
            ok, jpg = cv2.imencode(".jpg", frame, [int(cv2.IMWRITE_JPEG_QUALITY), args.quality])
            if not ok:
                raise UserError(f"--camera {args.camera}: a frame could not be encoded as JPEG")
            name = f"{args.label}-{first + saved:05d}.jpg"
            tmp = folder / f".{name}.part"
            tmp.write_bytes(jpg.tobytes())
            os.replace(tmp, folder / name)
            saved += 1
    finally:
        cap.release()
    if saved < args.count:
        raise UserError(f"--camera {args.camera}: the stream ended after {saved} of {args.count} frames; "
                        f"{folder} has them but no {DONE} (capture more, or: touch {folder / DONE})")
    (folder / DONE).touch()
    print(f"captured {saved} frames into {folder} ({time.monotonic() - t0:.1f} s); marked it {DONE} for "
          "fieldlearn watch")
    return 0
