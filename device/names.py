"""Class names: the one rule a class name follows wherever it arrives (a folder of images,
meta.json, a capture label, a fleet contribution), and the check for classes added to a model.
Torch-free: the data loader, the version store and the field apps all ask here.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from fieldlearn.runtime.errors import UserError

MAX_CLASS_NAME = 200  # characters; a class name also names an ONNX label and a folder

# ------------------------------------------------------------------------- class names

_BIDI_CONTROLS = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def class_name_problem(name: object) -> str | None:
    """Why `name` cannot be a class name, or None. Class names arrive as folder names and in
    meta.json; they end up in labels.txt, ONNX metadata and printed output, and must never
    act as a path: no separators, no '.'/'..', no control/bidi/unassigned/surrogate
    characters (a surrogate is how Python spells a folder name that is not valid UTF-8),
    no blank or edge-space names. Ordinary unicode (accents, CJK, emoji) is fine."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if not name.strip():
        return "is blank"
    if name != name.strip():
        return "has leading or trailing spaces"
    if name in (".", ".."):
        return "is a relative path"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if len(name) > MAX_CLASS_NAME:
        return f"is longer than {MAX_CLASS_NAME} characters"
    for ch in name:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs", "Cn", "Co") or ch in _BIDI_CONTROLS or ch in "\u2028\u2029":
            return f"contains the character U+{ord(ch):04X}"
    return None


def check_class_names(names: list, where: str | Path) -> None:
    """UserError naming `where` unless every name is valid and they are distinct (compared
    in NFC, so 'café' typed two ways is one class, not two that print the same)."""
    seen: dict[str, str] = {}
    for n in names:
        why = class_name_problem(n)
        if why:
            raise UserError(f"{where}: class name {n!r} {why}")
        key = unicodedata.normalize("NFC", n)
        if key in seen:
            raise UserError(f"{where}: class name {n!r} appears twice" +
                            (f" (as {seen[key]!r})" if seen[key] != n else ""))
        seen[key] = n


def check_new_class_names(new: list, known: list[str], where: Path) -> None:
    """Classes to add to a model that knows `known`: UserError unless every new name is a
    valid class name, they are distinct (check_class_names, naming `where`), and none is known
    already (compared in NFC too, naming `where`/NAME). Names that differ only in case from a
    known class or from each other are refused too, naming both: 'T-Shirt' beside a known
    't-shirt' is a slip far more often than a new class (checked here only: a saved state or a
    data set that already holds such a pair still loads). fieldlearn learn and the watch daemon
    (before it claims a folder) both ask this."""
    check_class_names(new, where)
    known_keys = {unicodedata.normalize("NFC", k) for k in known}
    known_cases = {_case_key(k): k for k in known}
    new_cases: dict[str, str] = {}
    for n in new:
        if unicodedata.normalize("NFC", n) in known_keys:
            raise UserError(f"{Path(where) / n}: class '{n}' is already known to the model")
        if _case_key(n) in known_cases:
            raise UserError(f"{Path(where) / n}: class '{n}' differs only in case from the known class "
                            f"'{known_cases[_case_key(n)]}' (rename the folder if it is another class)")
        if _case_key(n) in new_cases:
            raise UserError(f"{where}: class names '{new_cases[_case_key(n)]}' and '{n}' differ only in case "
                            "(rename one if they are two classes)")
        new_cases[_case_key(n)] = n


def _case_key(name: str) -> str:
    """A class name compared without case (and in NFC): 'T-Shirt' and 't-shirt' are twins."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


__all__ = ["MAX_CLASS_NAME", "class_name_problem", "check_class_names", "check_new_class_names"]
