"""Library entry points take typed configs (ConfigOverrides, RunConfig), never argparse
objects: the command line is one caller among several (the daemon, the fleet, benchmarks,
tests). If a test here fails, either a library module parses arguments again (a pipeline
grows back into the CLI's shape), or the overrides no longer mean what the flags meant.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from fieldlearn.cli.flags import add_config_arguments, config_from_args, overrides_from_args
from fieldlearn.device.config import RunConfig
from fieldlearn.device.validate import ConfigOverrides
from fieldlearn.runtime.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("device", "store", "field", "export", "runtime", "fleet", "cli", "tools")


def _command_file(path: Path) -> bool:
    """Where argparse belongs: cli/ (the dispatcher, the command files, the flag builder
    cli/flags.py), tools, and the two commands that live in their own room (fleet's, and
    runtime's torch-free classify)."""
    rel = path.relative_to(ROOT).as_posix()
    return (rel.startswith(("cli/", "tools/")) or "/commands/" in rel
            or rel in ("fleet/command.py", "runtime/classify.py"))


def test_only_command_files_import_argparse():
    offenders = []
    for top in PRODUCT:
        for f in sorted((ROOT / top).rglob("*.py")):
            if _command_file(f):
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("argparse", "fieldlearn") and
                       (n == "argparse" or n == "fieldlearn.cli" or n.startswith("fieldlearn.cli.")) for n in names):
                    offenders.append(f.relative_to(ROOT).as_posix())
    assert offenders == []


def test_overrides_from_the_command_line_equal_the_typed_ones():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    args = p.parse_args(["--epochs", "3", "--beta", "0.5", "--method", "lwm"])
    o = overrides_from_args(args)
    assert dict(o.values) == {"train.epochs": 3, "loss.beta": 0.5, "method": "lwm"}
    assert "train.epochs" in o and "train.lr" not in o
    base = RunConfig()
    assert config_from_args(args, base=base) == ConfigOverrides(o.values).apply(base)


def test_a_bad_override_names_its_flag_and_a_bad_base_value_its_source():
    with pytest.raises(UserError, match=r"^--epochs 0: must be an integer"):
        ConfigOverrides({"train.epochs": 0}).apply()
    bad = RunConfig()
    bad.train.lr = -1.0
    with pytest.raises(UserError, match=r"^meta.json: config.train.lr"):
        ConfigOverrides({"train.epochs": 2}).apply(bad, source="meta.json")
    with pytest.raises(ValueError, match="no_such"):
        ConfigOverrides({"train.no_such": 1}).apply()
