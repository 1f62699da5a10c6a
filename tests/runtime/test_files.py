"""Regular files only, never blocking (fieldlearn.runtime.files), where the product reads them.

Each check runs under an alarm: a FIFO opened the ordinary way would block forever (no
writer ever comes), so a regression shows up as a TimeoutError here, not a hung suite.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket

import pytest

from fieldlearn.runtime.files import NotRegularFile, open_regular, read_bytes, why_not_regular


@contextlib.contextmanager
def deadline(seconds: int = 20):
    def boom(signum, frame):  # noqa: ARG001
        raise TimeoutError("blocked")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def kinds(tmp_path):
    (tmp_path / "regular").write_bytes(b"data")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    os.symlink("nowhere", tmp_path / "dangling")
    os.symlink("regular", tmp_path / "link")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    return s


@pytest.mark.parametrize("name,why", [("regular", None), ("link", None), ("fifo", "is a FIFO (named pipe), not a regular file"),
                                      ("dir", "is a directory, not a regular file"), ("loop-a", "is a symlink loop"),
                                      ("dangling", "is a dangling symlink"), ("sock", "is a socket, not a regular file"),
                                      ("missing", "is missing")])
def test_file_kinds_are_told_apart_without_blocking(tmp_path, name, why):
    """If this fails, a FIFO (a camera pipe), a socket or a directory is opened as if it were a
    file (a FIFO blocks for ever), or the reason given for refusing it is wrong."""
    sock = kinds(tmp_path)
    try:
        with deadline():
            assert why_not_regular(tmp_path / name) == why
            if why is None:
                assert read_bytes(tmp_path / name) == b"data"
            elif why.endswith("not a regular file"):
                with pytest.raises(NotRegularFile):
                    open_regular(tmp_path / name)
            else:
                with pytest.raises(OSError):
                    open_regular(tmp_path / name)
    finally:
        sock.close()


def test_classify_on_a_fifo_is_one_line_not_a_hang(tmp_path, capsys):
    """If this fails, `fieldlearn classify x.jpg` where x.jpg is a camera pipe blocks forever
    (issue 14 item 3), or the image is decoded from the pipe."""
    from fieldlearn.cli.main import main

    os.mkfifo(tmp_path / "x.jpg")
    model = tmp_path / "model.onnx"
    os.mkfifo(model)
    with deadline():
        rc = main(["classify", str(tmp_path / "x.jpg"), "--model", str(model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{model}: is a FIFO" in err[0], err


def test_a_state_whose_files_are_fifos_is_one_line_not_a_hang(tmp_path, capsys):
    """If this fails, a `current`, meta.json or weights file that is a FIFO hangs every command
    that reads the state instead of one line naming it; a FIFO in place of the lock hangs the
    next writer instead of being removed as an unreadable (stale) lock."""
    import torch

    from fieldlearn.cli.main import main
    from fieldlearn.device.model import build_student
    from fieldlearn.store.state import save_version
    from tests.conftest import tiny_config

    cfg = tiny_config()
    state = tmp_path / "state"
    save_version(state, build_student(cfg.model, 2), ["a", "b"], cfg, 0, [{"step": 0, "new_classes": ["a", "b"]}])
    torch.manual_seed(0)
    for rel in ("lock", "versions/0001/model.safetensors", "versions/0001/meta.json", "current"):
        path = state / rel
        saved = path.read_bytes() if path.exists() else None
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        with deadline(60):
            rc = main(["export", "--state", str(state), "--no-engine"])
        err = capsys.readouterr().err.strip().splitlines()
        if rel == "lock":
            assert rc == 0 and err == ["fieldlearn: removed the stale lock of an unreadable lock, which is no longer "
                                       "running"] and not path.exists(), err
            continue
        assert rc == 2 and len(err) == 1 and str(path) in err[0] and "FIFO" in err[0], (rel, err)
        path.unlink()
        if saved is not None:
            path.write_bytes(saved)
