"""Camera frames into an inbox class folder, for `fieldlearn watch`: what `fieldlearn capture` runs.

    capture(inbox, label, count, camera)    frames -> INBOX/LABEL/*.jpg, then INBOX/LABEL/.done

    fieldlearn capture --label forklift --count 200                  # /dev/video0 (USB camera)
    fieldlearn capture --label forklift --count 200 --camera csi     # Jetson CSI camera (GStreamer)
    fieldlearn capture --label forklift --count 200 --camera rtsp://cam.local/stream
    fieldlearn capture --label forklift --count 50 --camera clip.mp4 --interval 0

Frames are JPEG files written atomically (fieldlearn.runtime.atomic), and `.done`
is written only after the last one, so watch never takes a half-captured class. OpenCV is
optional (pip install opencv-python-headless); for a Jetson CSI camera use JetPack's OpenCV
(python3-opencv, built with GStreamer), which a venv made with --system-site-packages sees.
"""

from __future__ import annotations

import time
from pathlib import Path

from fieldlearn.device.names import class_name_problem
from fieldlearn.runtime.atomic import atomic_write_bytes
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import DONE


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
    """The class-name rule (fieldlearn.device.names.class_name_problem), and no leading '.'
    (watch does not take hidden folders)."""
    why = class_name_problem(label) or ("starts with '.' (a hidden folder)" if label.startswith(".") else None)
    if why:
        raise UserError(f"--label {label!r}: must be a plain folder name and a valid class name; it {why}")


def capture(inbox: Path, label: str, count: int, camera: str = "0", *, interval: float = 0.2, width: int = 1280,
            height: int = 720, quality: int = 92) -> tuple[Path, int, float]:
    """`count` frames from `camera`, at least `interval` seconds apart, as INBOX/LABEL/LABEL-NNNNN.jpg
    (numbered on from what the folder holds), then INBOX/LABEL/.done. Returns (folder, frames,
    seconds). UserError when the folder is already complete, the camera cannot be opened, or
    the stream ends early (the frames stay, without .done)."""
    check_label(label)
    cv2 = import_cv2()
    folder = Path(inbox) / label
    if (folder / DONE).exists():
        raise UserError(f"{folder}: already complete and waiting for (or being learned by) fieldlearn watch; "
                        "wait for it to be learned, or use another --label")
    folder.mkdir(parents=True, exist_ok=True)
    first = len([p for p in folder.iterdir() if p.suffix == ".jpg" and not p.name.startswith(".")])
    cap = open_camera(cv2, camera, width, height)
    saved, last, t0 = 0, -float("inf"), time.monotonic()
    try:
        while saved < count:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            now = time.monotonic()
            if now - last < interval:
                continue
            last = now
            ok, jpg = cv2.imencode(".jpg", frame, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
            if not ok:
                raise UserError(f"--camera {camera}: a frame could not be encoded as JPEG")
            atomic_write_bytes(folder / f"{label}-{first + saved:05d}.jpg", jpg.tobytes())
            saved += 1
    finally:
        cap.release()
    if saved < count:
        raise UserError(f"--camera {camera}: the stream ended after {saved} of {count} frames; "
                        f"{folder} has them but no {DONE} (capture more, or: touch {folder / DONE})")
    (folder / DONE).touch()
    return folder, saved, time.monotonic() - t0
