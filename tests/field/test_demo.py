"""fieldlearn demo (fieldlearn.field.demo, cli/commands/demo.py): what a new user's first
command prints and where it writes."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fieldlearn.cli.main import main
from tests.conftest import ROOT, write_image_folder


def git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_demo_in_a_checkout_prints_no_nan_and_leaves_git_status_clean(tmp_path, gen_test, monkeypatch, capsys):
    """If this fails, the first command of a fresh clone dirties it (the demo's default output
    lands on a tracked or not-ignored path), or the demo prints `nan` for the validation
    split it does not have."""
    repo = tmp_path / "clone"
    repo.mkdir()
    git(repo, "init", "-q")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    for split, n in (("train", 5), ("test", 3)):
        write_image_folder(repo / "data" / split, gen_test, list(range(6)), n)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a clone")
    monkeypatch.chdir(repo)
    assert main(["demo", "--data", "data", "--base", "4", "--steps", "1", "--per-class", "5",
                 "--test-per-class", "3", "--methods", "ncm", "--num-threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower(), out
    assert "step 1/1: ncm" in out
    written = [p for p in repo.rglob("results.json") if ".git" not in p.parts]
    assert len(written) == 1, "the demo writes its results"
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == "", "the demo's output is not ignored"


@pytest.mark.parametrize("command", ["demo", "profile"])
def test_the_default_output_folder_is_ignored_and_holds_no_tracked_file(command):
    """If this fails, a command's default output folder (demo: results; profile: its plan)
    holds files tracked in git, which every run rewrites, or is not ignored, so running it in
    a checkout leaves the clone dirty."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    import argparse
    import importlib

    p = argparse.ArgumentParser()
    importlib.import_module(f"fieldlearn.cli.commands.{command}").add_arguments(p)
    out = p.parse_args(["--budget", "1GiB"] if command == "profile" else []).out
    assert not out.is_absolute()
    assert git(ROOT, "ls-files", "--", str(out)) == "", out
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "results.json")], cwd=ROOT)
    assert ignored.returncode == 0, f"{out} is not ignored by .gitignore"


def test_every_default_row_has_its_line_under_the_table():
    """If this fails, the demo prints a row that no line under its table explains, or a
    group's line for rows it did not run."""
    from fieldlearn.field.demo import DEMO_CONFIG, default_rows, legend
    from fieldlearn.device.protocol import default_row

    rows = default_rows(DEMO_CONFIG)
    assert rows[:4] == ["ncm", "analytic", "lda", default_row(DEMO_CONFIG)] and "lwm" in rows and "lwm+lda" in rows
    lines = legend(rows, default_row(DEMO_CONFIG))
    assert len(lines) == 4
    named = [n for line in lines for n in line.partition(":")[0].split(", ")]
    assert sorted(named) == sorted(rows)
    assert legend(["ncm", "lwm"], default_row(DEMO_CONFIG)) == [lines[0].replace("ncm, analytic, lda", "ncm"),
                                                              lines[3]]
