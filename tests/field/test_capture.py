"""`fieldlearn capture`: frames from a camera (here a video file the test writes) into
INBOX/LABEL/ as images that the learner reads, with `.done` written last."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fieldlearn.cli.main import main
from fieldlearn.device.data import read_image
from fieldlearn.field.watch import scan

cv2 = pytest.importorskip("cv2", reason="OpenCV not installed (pip install opencv-python-headless)")


def write_video(path, n=8, size=(64, 48)):
    """n frames, each with its own colour and a bright band at its own height (MJPG in AVI)."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write MJPG/AVI")
    for i in range(n):
        f = np.zeros((h, w, 3), np.uint8)
        f[:, :, i % 3] = 40 + 20 * i
        f[5 * i: 5 * i + 5] = 255
        writer.write(f)
    writer.release()
    return path


def test_capture_writes_frames_then_done(tmp_path, capsys):
    """If this fails, capture's frames do not reach watch as a complete, readable class folder."""
    video = write_video(tmp_path / "clip.avi")
    inbox = tmp_path / "inbox"
    assert main(["capture", "--label", "red mug", "--count", "5", "--camera", str(video), "--inbox", str(inbox),
                 "--interval", "0"]) == 0
    folder = inbox / "red mug"
    frames = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert frames == [f"red mug-{i:05d}.jpg" for i in range(5)]
    assert (folder / ".done").is_file() and not list(folder.glob(".*.part"))
    images = [read_image(folder / f, 32) for f in frames]
    assert all(a is not None and a.shape == (3, 32, 32) for a in images)
    assert len({a.tobytes() for a in images}) == 5               # five different frames, not one repeated
    assert scan(inbox) == (["red mug"], [])                        # ready for watch
    assert "captured 5 frames" in capsys.readouterr().out

    # a class that is complete (and maybe being learned) is not written into again
    assert main(["capture", "--label", "red mug", "--count", "1", "--camera", str(video), "--inbox", str(inbox)]) == 2
    assert "already complete" in capsys.readouterr().err


def test_short_stream_leaves_no_done_marker(tmp_path, capsys):
    """If this fails, a half-captured class looks complete and watch learns it."""
    video = write_video(tmp_path / "clip.avi", n=3)
    inbox = tmp_path / "inbox"
    assert main(["capture", "--label", "cup", "--count", "10", "--camera", str(video), "--inbox", str(inbox),
                 "--interval", "0"]) == 2
    assert "ended after 3 of 10" in capsys.readouterr().err
    assert len(list((inbox / "cup").glob("*.jpg"))) == 3 and not (inbox / "cup" / ".done").exists()
    assert scan(inbox) == ([], ["cup"])


@pytest.mark.parametrize("argv, message", [
    (["--label", "../etc", "--count", "1"], "plain folder name"),
    (["--label", ".hidden", "--count", "1"], "plain folder name"),
    (["--label", "ok", "--count", "0"], "argument --count: must be an integer in [1, 1000000], got 0"),
    (["--label", "ok", "--count", "1", "--camera", "/no/such/video.avi"], "cannot open"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    """If this fails, a typo writes outside the inbox or ends in a traceback."""
    assert main(["capture", *argv, "--inbox", str(tmp_path / "inbox")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "etc").exists()


def test_missing_opencv_names_the_install_command(tmp_path, capsys, monkeypatch):
    """If this fails, a device without OpenCV gets a traceback instead of the fix."""
    monkeypatch.setitem(sys.modules, "cv2", None)       # import cv2 -> ImportError
    assert main(["capture", "--label", "cup", "--count", "1", "--inbox", str(tmp_path)]) == 2
    assert "pip install opencv-python-headless" in capsys.readouterr().err
