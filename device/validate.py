"""The one validator: every config and every numeric command-line option is checked here,
against what it declares, before any work starts.

    fieldlearn.device.config.VALID      ranges / patterns of the config fields (Literal and
                                        bool fields declare their choices by their type)
    validate_config(cfg, source)        a whole RunConfig, from the CLI, meta.json or a preset
    ConfigOverrides(values).apply(base) fields set on top of a base config, then validated

A refusal is a UserError (the CLI prints one line, exit 2) naming the option and the
allowed values, e.g. `--epochs 0: must be an integer in [1, 10000]`. Standard library only
(dataclasses + typing), so the torch-free store can check a saved state's config too.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Mapping

from fieldlearn.device.config import VALID, RunConfig, Valid
from fieldlearn.runtime.errors import UserError



def _sections() -> dict[str, type]:
    """RunConfig's nested configs by field name (model, loss, train, and any added later)."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


SECTIONS = _sections()


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def describe(v: Valid, kind: type) -> str:
    """'an integer in [1, 10000]', 'a number in (0, 1000]', 'one of a, b', ..."""
    if v.choices:
        return "one of " + ", ".join(v.choices)
    if v.pattern:
        return v.text or f"text matching {v.pattern}"
    what = "an integer" if kind is int else "a number"
    if v.lo is None and v.hi is None:
        return f"{what} (finite)"
    if v.hi is None:
        return f"{what} {'>' if v.lo_open else '>='} {_fmt(v.lo)}"
    if v.lo is None:
        return f"{what} {'<' if v.hi_open else '<='} {_fmt(v.hi)}"
    return f"{what} in {'(' if v.lo_open else '['}{_fmt(v.lo)}, {_fmt(v.hi)}{')' if v.hi_open else ']'}"


def problem(value: Any, v: Valid, kind: type) -> str | None:
    """'must be ...' when `value` is not allowed by `v` (for a field of type `kind`), else None."""
    must = f"must be {describe(v, kind)}"
    if v.choices or v.pattern:
        if not isinstance(value, str):
            return must
        return None if (value in v.choices if v.choices else re.fullmatch(v.pattern, value)) else must
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        return must
    if not math.isfinite(value):
        return must
    low = v.lo is not None and (value <= v.lo if v.lo_open else value < v.lo)
    high = v.hi is not None and (value >= v.hi if v.hi_open else value > v.hi)
    return must if low or high else None


def field_rule(klass: type, name: str) -> tuple[Valid | None, type, tuple | None]:
    """(declared Valid, element type, Literal/bool choices) of one config field."""
    hint = typing.get_type_hints(klass)[name]
    origin = typing.get_origin(hint)
    if hint is bool:
        return None, bool, (True, False)
    if origin is typing.Literal:
        return None, str, typing.get_args(hint)
    if origin is tuple:
        hint = typing.get_args(hint)[0]
    return VALID.get(klass, {}).get(name), hint, None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_field(klass: type, name: str, value: Any) -> str | None:
    """'must be ...' when `value` is not allowed for field `name` of `klass`, else None."""
    rule, kind, choices = field_rule(klass, name)
    if choices is not None:
        if kind is bool:
            return None if isinstance(value, bool) else "must be true or false"
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"
    hint = typing.get_type_hints(klass)[name]
    if typing.get_origin(hint) is tuple:
        n = len(typing.get_args(hint))
        if not isinstance(value, tuple) or len(value) != n:
            return f"must be {n} numbers"
        values = value
    else:
        values = (value,)
    if rule is None:                 # not declared (a new field): at least its type, and finite
        if not isinstance(kind, type):   # Optional[...], a nested config: left to its own checks
            return None
        rule = Valid() if kind in (int, float) else None
        if rule is None:
            return None if all(isinstance(x, kind) for x in values) else f"must be a {kind.__name__}"
    for x in values:
        why = problem(x, rule, kind)
        if why:
            return why
    return None


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(_shown, value))
    if isinstance(value, str):
        return value
    return _fmt(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


def _cross_field(cfg: RunConfig) -> list[tuple[str, str]]:
    """Rules between fields: (field path, why)."""
    out = []
    if cfg.model.pretrained and cfg.model.width != 1.0:
        out.append(("model.width", f"{_fmt(cfg.model.width)} needs --no-pretrained (ImageNet weights exist "
                                   "for width 1.0 only)"))
    return out


def validate_config(cfg: RunConfig, source: str | None = None, given: set[str] | frozenset = frozenset()) -> RunConfig:
    """Check every field of `cfg`; UserError on the first bad one, naming the command-line
    flag when `source` is None or the field is in `given` (dotted paths set on the command
    line), else `source: config.<section>.<field>` (a meta.json, a benchmark preset).
    e.g. `--epochs 0: must be an integer in [1, 10000]`. Returns cfg."""
    def label(path: str) -> str:
        return flag(path.rpartition(".")[2]) if source is None or path in given else f"{source}: config.{path}"

    items: list[tuple[str, type, str]] = []
    for section, klass in SECTIONS.items():
        items += [(f"{section}.{f.name}", klass, f.name) for f in dataclasses.fields(klass)]
    items += [(f.name, RunConfig, f.name) for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    for path, klass, name in items:
        section, _, _ = path.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        why = check_field(klass, name, value)
        if why:
            raise UserError(f"{label(path)} {_shown(value)}: {why}")
    for path, why in _cross_field(cfg):
        raise UserError(f"{label(path)}: {why}")
    return cfg


def undeclared_fields() -> list[str]:
    """Config fields that declare no valid values (neither by type nor in VALID)."""
    out = []
    for klass in (*SECTIONS.values(), RunConfig):
        for f in dataclasses.fields(klass):
            if klass is RunConfig and f.name in SECTIONS:
                continue
            rule, _, choices = field_rule(klass, f.name)
            if rule is None and choices is None:
                out.append(f"{klass.__name__}.{f.name}")
    return out


# ---------------------------------------------------------------------------- overrides

@dataclasses.dataclass(frozen=True)
class ConfigOverrides:
    """Config fields a caller sets on top of a base config (a version's saved config, a
    preset, or the defaults): dotted field paths ("train.epochs", "loss.beta", "method") to
    values. The command line is one source (fieldlearn.cli.flags.overrides_from_args);
    the daemon, the benchmarks and tests build one directly."""
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __contains__(self, path: str) -> bool:
        return path in self.values

    @property
    def given(self) -> frozenset[str]:
        return frozenset(self.values)

    def apply(self, base: RunConfig | None = None, source: str | None = None) -> RunConfig:
        """`base` (default RunConfig()) with these values on top, validated as a whole
        (validate_config: a bad given value names its flag, a bad base value `source`)."""
        d = (base or RunConfig()).to_dict()
        for path, value in self.values.items():
            section, _, name = path.rpartition(".")
            if section and section not in SECTIONS or not section and path not in d:
                raise ValueError(f"{path}: not a config field")
            (d[section] if section else d)[name] = list(value) if isinstance(value, (list, tuple)) else value
        return validate_config(RunConfig.from_dict(d), source=source, given=self.given)


__all__ = ["ConfigOverrides", "validate_config", "check_field", "describe", "problem", "field_rule", "undeclared_fields",
           "Valid"]
