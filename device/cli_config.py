"""Build CLI options from the typed config dataclasses, and a RunConfig back from them.

Every field of ModelConfig, LossConfig and TrainConfig (and RunConfig's own scalars)
becomes `--field-name`; booleans get `--x/--no-x`, Literals get choices. Options left
unset keep the base config's value (the defaults, or a state's saved config).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from fieldlearn.device.config import LossConfig, ModelConfig, RunConfig, TrainConfig

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
                _add(group, f, hints[f.name], f"{section}.{f.name}")
    group = parser.add_argument_group("method options")
    for f in dataclasses.fields(RunConfig):
        if f.name in run_fields:
            _add(group, f, hints_run[f.name], f.name)


def _add(group, f: dataclasses.Field, hint, dest: str) -> None:
    default = f.default if f.default is not dataclasses.MISSING else None
    kw: dict = {"dest": dest, "default": argparse.SUPPRESS}
    origin = typing.get_origin(hint)
    if hint is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is typing.Literal:
        kw["choices"] = list(typing.get_args(hint))
    elif origin is tuple:
        kw["type"], kw["nargs"] = float, len(typing.get_args(hint))
    else:
        kw["type"] = hint
    group.add_argument(_flag(f.name), help=f"default: {default}", **kw)


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    d = (base or RunConfig()).to_dict()
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if name and section in SECTIONS:
            d[section][name] = list(value) if isinstance(value, (list, tuple)) else value
        elif key in ("method", "teacher_backend"):
            d[key] = value
    return RunConfig.from_dict(d)
