"""Property-based tests of the CLI (Hypothesis): whatever number or file a user hands over,
the command ends in exit 0 or a one-line exit 2: never a traceback, never a hang (an alarm
fails the example), and never a changed `current` (or any changed byte of the state) after
a refusal.

The numeric options are read from the commands' own parsers, so an option added later is
fuzzed without touching this file. Commands whose valid runs take minutes (profile, demo,
bench) are left to benchmarks/hostile.py, which also runs these properties with more
examples: FIELDLEARN_PROPERTY_EXAMPLES (CI: 20 each).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import shutil
import signal
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from fieldlearn.cli.main import COMMANDS, OneLineParser, main
from fieldlearn.device.data import SkippedInput
from fieldlearn.device.model import build_student
from fieldlearn.store.state import save_version
from tests.conftest import tiny_config, write_image_folder
from tests.cli.test_bad_input import tree_hash

EXAMPLES = int(os.environ.get("FIELDLEARN_PROPERTY_EXAMPLES", "20"))
TIMEOUT = 120            # seconds per example: a hang fails it
FUZZED = ["learn", "init", "classify", "export", "prune", "watch", "capture", "rollback", "history", "eval"]
# valid values of these options that cost minutes (not a correctness question): left out
CHEAP = {"--epochs": 2, "--base-epochs": 2, "--input-size": 64, "--num-threads": 2, "--width": 1.0, "--threads": 2,
         "--count": 2, "--settle-seconds": 5, "--quiet-seconds": 5}
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


class Hang(Exception):
    pass


def run_cli(argv: list[str]) -> tuple[int, list[str], list[str]]:
    """main(argv) in this process under an alarm: (exit code, stderr lines, warning lines).
    An exception escaping main (a traceback for the user) fails the test."""
    err = io.StringIO()

    def alarm(signum, frame):  # noqa: ARG001
        raise Hang(f"no answer in {TIMEOUT} s: {argv}")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIMEOUT)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:            # argparse
                rc = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return int(rc or 0), err.getvalue().strip().splitlines(), [str(w.message) for w in caught]


def assert_clean(rc: int, err: list[str], argv) -> None:
    errors = [line for line in err if ": error: " in line]
    assert rc in (0, 2), (rc, err, argv)
    if rc == 2:
        assert len(errors) == 1 and "Traceback" not in "\n".join(err), (err, argv)


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory, gen_test):
    """A tiny state (exported), a class folder to learn, an ImageFolder dataset, an image."""
    root = tmp_path_factory.mktemp("props")
    cfg = tiny_config()
    torch.manual_seed(0)
    state = root / "state"
    save_version(state, build_student(cfg.model, 2), ["apple", "pear"], cfg, 0,
                 [{"step": 0, "method": "base", "new_classes": ["apple", "pear"]}])
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--state", str(state), "--no-engine"]) == 0
    new = write_image_folder(root / "new", gen_test, [20], 6)
    data = write_image_folder(root / "data", gen_test, [30, 31], 6)
    image = next((new / gen_test.class_names[20]).iterdir())
    return {"root": root, "state": state, "new": new, "data": data, "image": image,
            "new_class": gen_test.class_names[20]}


def base_argv(command: str, w: dict, work: Path) -> list[str]:
    s = str(work / "state")
    fast = ["--no-progress", "--num-threads", "1", "--teacher-backend", "torch"]
    return {
        "learn": ["learn", w["new"], "--state", s, "--no-export", "--epochs", "1", *fast],
        "init": ["init", "--data", w["data"], "--state", work / "fresh", "--no-export", "--no-pretrained", "--width",
                 "0.35", "--variant", "cifar", "--input-size", "32", "--freeze-blocks", "10", "--base-epochs", "1",
                 "--no-progress", "--num-threads", "1"],
        "classify": ["classify", w["image"], "--state", s],
        "export": ["export", "--state", s, "--no-engine"],
        "prune": ["prune", "--state", s],
        "watch": ["watch", work / "inbox", "--state", s, "--once", "--settle-seconds", "0", "--epochs", "1", *fast],
        "capture": ["capture", "--label", "x", "--inbox", work / "inbox", "--camera", work / "no-such-video.mp4"],
        "rollback": ["rollback", "--state", s],
        "history": ["history", "--state", s],
        "eval": ["eval", "--state", s, "--data", w["data"]],
    }[command]


def numeric_options() -> list[tuple[str, str, int, str]]:
    """(command, flag, nargs, 'int'|'float') of every option that parses a number."""
    out = []
    for command in FUZZED:
        p = OneLineParser(prog=f"fieldlearn {command}")
        importlib.import_module(COMMANDS[command][0]).add_arguments(p)
        for a in p._actions:
            kind = getattr(a.type, "__name__", None)
            if a.option_strings and kind in ("int", "float"):
                out.append((command, a.option_strings[0], a.nargs if isinstance(a.nargs, int) else 1, kind))
    return out


OPTIONS = numeric_options()
INTS = st.one_of(st.integers(-10**6, 10**6), st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**63, 10**30]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 1.0, 0.999999]))
JUNK = st.sampled_from(["", "x", "1e", "--", "0x10", "\u0661", " 3", "1,5", "nan(1)"])


def raw(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@st.composite
def option_values(draw):
    command, flag, nargs, kind = draw(st.sampled_from(OPTIONS))
    values = [draw(st.one_of(INTS if kind == "int" else FLOATS, JUNK)) for _ in range(nargs)]
    return command, flag, [raw(v) for v in values]


def _parses_cheap(flag: str, values: list[str], kind_of: dict) -> bool:
    """False when the value is valid but in the range that costs minutes (CHEAP caps)."""
    if flag not in CHEAP:
        return True
    try:
        return float(values[0]) <= CHEAP[flag] or float(values[0]) != float(values[0])
    except ValueError:
        return True


def _fresh(w: dict) -> Path:
    work = Path(tempfile.mkdtemp(dir=w["root"], prefix="ex-"))
    shutil.copytree(w["state"], work / "state")
    (work / "inbox").mkdir()
    return work


@SETTINGS
@given(case=option_values())
def test_any_number_for_any_option_ends_in_exit_0_or_one_line_exit_2(world, case):
    """If this fails, some value of some numeric option (0, a negative, NaN, inf, 2**63, junk)
    gives a traceback, hangs, or changes the state while refusing (issue 14 items 1-2)."""
    command, flag, values = case
    assume(_parses_cheap(flag, values, {}))
    work = _fresh(world)
    try:
        before = tree_hash(work / "state")
        argv = [*base_argv(command, world, work), flag, *values]
        rc, err, _ = run_cli(argv)
        event(f"{command}: exit {rc}")
        assert_clean(rc, err, argv)
        if rc != 0 or command not in ("learn", "watch", "prune", "rollback", "export"):
            assert tree_hash(work / "state") == before, argv
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- file kinds

def _png(w: dict) -> bytes:
    return Path(w["image"]).read_bytes()


def _huge_header_png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


KINDS = ["empty", "truncated", "fifo", "directory", "symlink loop", "dangling symlink", "text named .png",
         "image named .txt", "huge header", "garbage"]


def make(path: Path, kind: str, w: dict) -> None:
    """Put a file of `kind` at `path` (replacing what is there)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(_png(w)[: len(_png(w)) // 2])
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink loop":
        os.symlink(path.name + ".b", path)
        os.symlink(path.name, path.with_name(path.name + ".b"))
    elif kind == "dangling symlink":
        os.symlink("nowhere", path)
    elif kind == "text named .png":
        path.write_text("GPS log 2026-11-28 lat 52.1\n" * 10)
    elif kind == "image named .txt":
        path.write_bytes(_png(w))
    elif kind == "huge header":
        path.write_bytes(_huge_header_png())
    else:
        path.write_bytes(os.urandom(3000))


TARGETS = ["learn image", "classify image", "classify --model", "explain image", "export --images",
           "meta.json", "model.safetensors", "current", "model.onnx", "labels.txt"]


@SETTINGS
@given(target=st.sampled_from(TARGETS), kind=st.sampled_from(KINDS))
def test_any_file_kind_anywhere_ends_in_exit_0_or_one_line_exit_2(world, gen_test, target, kind):
    """If this fails, an empty, truncated, FIFO, directory, symlink-loop, wrong-extension or
    huge-header file where an image, model or state file is expected gives a traceback or a
    hang, changes the state on a refusal, or (learn) is left out without a word."""
    work = _fresh(world)
    try:
        state = work / "state"
        vdir = state / "versions" / "0001"
        name = "zz.txt" if kind == "image named .txt" else "zz.png"
        if target == "learn image":
            folder = work / "new" / world["new_class"]
            shutil.copytree(world["new"], work / "new")
            make(folder / name, kind, world)
            argv = base_argv("learn", world, work)
            argv[1] = work / "new"
        elif target in ("classify image", "explain image", "export --images"):
            make(work / name, kind, world)
            argv = {"classify image": ["classify", work / name, "--state", state],
                    "explain image": ["explain", work / name, "--state", state, "--teacher-version", "1",
                                      "--out", work / "att.png"],
                    "export --images": ["export", "--state", state, "--no-engine", "--images", work / name]}[target]
        elif target == "classify --model":
            make(work / "m.onnx", kind, world)
            argv = ["classify", world["image"], "--model", work / "m.onnx"]
        else:
            where = state / "current" if target == "current" else vdir / target
            make(where, kind, world)
            argv = ["classify", world["image"], "--state", state] if target in ("model.onnx", "labels.txt") else \
                base_argv("learn", world, work)
        before = tree_hash(state)
        rc, err, warned = run_cli(argv)
        event(f"{target}: exit {rc}")
        assert_clean(rc, err, argv)
        if rc != 0:
            assert tree_hash(state) == before, argv
        if target == "learn image" and rc == 0 and kind != "image named .txt":
            assert any(name in w for w in warned), (kind, warned)   # skipped, and said so
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_properties_cover_every_fuzzed_commands_numeric_options():
    """If this fails, the option discovery broke (nothing would be fuzzed) or lost a command."""
    commands = {c for c, *_ in OPTIONS}
    assert {"learn", "init", "classify", "export", "prune", "watch", "capture"} <= commands
    assert ("learn", "--epochs", 1, "int") in OPTIONS and ("init", "--mean", 3, "float") in OPTIONS
    assert isinstance(SkippedInput, type) and argparse.ArgumentParser in OneLineParser.__mro__
