"""Build CLI options from the typed config dataclasses, and a RunConfig back from them.

Every field of ModelConfig, LossConfig and TrainConfig (and RunConfig's own scalars)
becomes `--field-name` with the help and default its field declares (config.knob);
booleans get `--x/--no-x`, Literals get choices. Options left
unset keep the base config's value (the defaults, or a state's saved config). Each flag
parses and range-checks its value by fieldlearn.device.validate's rules (the ranges declared
in fieldlearn.device.config.VALID); overrides_from_args turns the parsed options into the
typed ConfigOverrides that the library takes, and config_from_args checks the merged config
as a whole. The argparse side of the one validator lives here, not in the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable

from fieldlearn.device.config import LossConfig, ModelConfig, RunConfig, TrainConfig, Valid
from fieldlearn.device.validate import ConfigOverrides, describe, field_rule, problem

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


def add_option(parser, klass: type, name: str) -> None:
    """`--name` for one declared field of `klass` that is no part of RunConfig (e.g.
    config.StepOptions): its help, range and default, the default kept in the namespace."""
    f = next(f for f in dataclasses.fields(klass) if f.name == name)
    _add(parser, klass, f, typing.get_type_hints(klass)[name], name, keep_default=True)


def _add(group, klass, f: dataclasses.Field, hint, dest: str, keep_default: bool = False) -> None:
    default = f.default if f.default is not dataclasses.MISSING else None
    kw: dict = {"dest": dest, "default": default if keep_default else argparse.SUPPRESS}
    origin = typing.get_origin(hint)
    if hint is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is typing.Literal:
        kw["choices"] = list(typing.get_args(hint))
    elif origin is tuple:
        kw["type"], kw["nargs"] = field_option(klass, f.name), len(typing.get_args(hint))
    else:
        kw["type"] = field_option(klass, f.name)
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    rule, kind, _ = field_rule(klass, f.name)
    accepts = f"{describe(rule, kind)}; " if rule is not None and not (rule.choices or rule.pattern) else ""
    about = f.metadata.get("help", "")
    group.add_argument(_flag(f.name), help=f"{about} ({accepts}default: {shown})".lstrip(), **kw)


def overrides_from_args(args: argparse.Namespace) -> ConfigOverrides:
    """The config options given on the command line (add_config_arguments leaves the unset
    ones out of `args`), as the typed overrides the library takes."""
    values = {}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if (name and section in SECTIONS) or key in ("method", "teacher_backend"):
            values[key] = value
    return ConfigOverrides(values)


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None, source: str | None = None) -> RunConfig:
    """The base config (default: RunConfig()) with the options given on the command line,
    validated as a whole (UserError naming the flag, or `source` for a bad base value)."""
    return overrides_from_args(args).apply(base, source=source)


# ---------------------------------------------------------------------------- command-line options

def option(kind: type, rule: Valid) -> Callable[[str], int | float]:
    """argparse `type=` for a number option: parses `kind`, checks `rule`; argparse turns the
    ArgumentTypeError into one line naming the option (`argument --top-k: must be ...`)."""
    def convert(raw: str) -> int | float:
        try:
            value = kind(raw)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {describe(rule, kind)}, got {raw!r}") from None
        why = problem(value, rule, kind)
        if why:
            raise argparse.ArgumentTypeError(f"{why}, got {raw}")
        return value

    convert.__name__ = kind.__name__    # argparse names the type in its own messages
    return convert


def field_option(klass: type, name: str) -> Callable[[str], Any] | None:
    """argparse `type=` for the command-line flag of a config field (None: argparse's choices/flags do it)."""
    rule, kind, choices = field_rule(klass, name)
    if choices is not None:
        return None
    if rule is None:
        return kind
    if rule.choices or rule.pattern:
        def text(raw: str) -> str:
            why = problem(raw, rule, str)
            if why:
                raise argparse.ArgumentTypeError(f"{why}, got {raw!r}")
            return raw
        return text
    return option(kind, rule)


