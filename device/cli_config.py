"""Build CLI options from the typed config dataclasses, and a RunConfig back from them.

Every field of ModelConfig, LossConfig and TrainConfig (and RunConfig's own scalars)
becomes `--field-name`; booleans get `--x/--no-x`, Literals get choices. Options left
unset keep the base config's value (the defaults, or a state's saved config). Each flag
parses and range-checks its value with fieldlearn.device.validate (the ranges declared in
fieldlearn.device.config.VALID), and config_from_args checks the merged config as a whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from fieldlearn.device.config import LossConfig, ModelConfig, RunConfig, TrainConfig
from fieldlearn.device.validate import field_option, validate_config

SECTIONS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig}
SKIP = {"arch"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, sections=("model", "loss", "train"),
                         run_fields=("method", "teacher_backend")) -> None:
    hints_run = typing.get_type_hints(RunConfig)
    for section in sections:
        klass = SECTIONS[section]
        group = parser.add_argument_group(f"{section} options")
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if f.name not in SKIP:
                _add(group, klass, f, hints[f.name], f"{section}.{f.name}")
    group = parser.add_argument_group("method options")
    for f in dataclasses.fields(RunConfig):
        if f.name in run_fields:
            _add(group, RunConfig, f, hints_run[f.name], f.name)


def _add(group, klass, f: dataclasses.Field, hint, dest: str) -> None:
    default = f.default if f.default is not dataclasses.MISSING else None
    kw: dict = {"dest": dest, "default": argparse.SUPPRESS}
    origin = typing.get_origin(hint)
    if hint is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is typing.Literal:
        kw["choices"] = list(typing.get_args(hint))
    elif origin is tuple:
        kw["type"], kw["nargs"] = field_option(klass, f.name), len(typing.get_args(hint))
    else:
        kw["type"] = field_option(klass, f.name)
    group.add_argument(_flag(f.name), help=f"default: {default}", **kw)


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None, source: str | None = None) -> RunConfig:
    """The base config (default: RunConfig()) with the options given on the command line,
    validated as a whole (UserError naming the flag, or `source` for a bad base value)."""
    d = (base or RunConfig()).to_dict()
    given = set()
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if name and section in SECTIONS:
            d[section][name] = list(value) if isinstance(value, (list, tuple)) else value
            given.add(key)
        elif key in ("method", "teacher_backend"):
            d[key] = value
            given.add(key)
    return validate_config(RunConfig.from_dict(d), source=source, given=given)
