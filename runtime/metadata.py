"""What an exported ONNX model says about itself: the metadata schema, in one place.

Every fieldlearn ONNX file carries, in its `metadata_props` (string key -> string value),
what is needed to use it without the state dir it came from:

    classes             ["cat", "dog", ...]   class names in logit order
    input_size          128                   square input side, pixels
    mean, std           [0.485, ...]          per-channel normalisation of RGB in [0, 1]
    fieldlearn_version  "0.1.0"
    step                3                     the incremental step that produced it
    arch, variant       "mobilenet_v2", "imagenet"
    graph               "classifier" (input_0 -> output_0) or "teacher" (z -> logits, features)

Every value is stored JSON-encoded (strings too), so reading is lossless; a value that is
not valid JSON (written by another tool) is kept as the raw string. `labels.txt` beside the
model repeats the class names one per line, for tools that read only that (jetson-inference).

Standard library + `onnx` only: the inference-only side reads this without torch.
"""

from __future__ import annotations

import os

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import read_bytes, read_text, why_not_regular
from fieldlearn.runtime.layout import LABELS_FILE

INPUT_NAME = "input_0"     # what jetson-inference's imagenet expects
OUTPUT_NAME = "output_0"
FEATURES_NAME = "features"
TEACHER_INPUT = "z"
TEACHER_OUTPUTS = ("logits", "features")


def fieldlearn_version() -> str:
    """The installed fieldlearn's version, from the package metadata (pyproject.toml): the one
    version source, written into meta.json, the ONNX metadata and benchmark results alike."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("fieldlearn")
    except PackageNotFoundError:
        return "unknown"


def encode(metadata: dict[str, Any]) -> dict[str, str]:
    return {str(k): json.dumps(v) for k, v in metadata.items()}


def decode(props: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in props.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def read_metadata(onnx_path: str | Path) -> dict[str, Any]:
    """The decoded metadata_props of an ONNX file (the weights are not kept)."""
    import onnx  # noqa: PLC0415 - only the commands that read a model need it

    onnx_path = Path(onnx_path)
    why = why_not_regular(onnx_path)
    if why is not None:
        raise UserError(f"{onnx_path}: no such ONNX file" if why == "is missing" else f"{onnx_path}: {why}")
    try:
        data = read_bytes(onnx_path)
    except OSError as e:
        raise UserError(f"{onnx_path}: unreadable ({e.strerror})") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a bad file
        raise UserError(f"{onnx_path}: not a readable ONNX model ({type(e).__name__})") from None
    return decode({p.key: p.value for p in model.metadata_props})


def read_labels(path: str | Path) -> list[str]:
    """labels.txt: one class name per line, in logit order."""
    try:
        lines = read_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable labels file ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def write_labels_text(classes: list[str]) -> str:
    for name in classes:
        if "\n" in name or "\r" in name:
            raise ValueError(f"class name {name!r} contains a line break; labels.txt cannot hold it")
    return "".join(f"{name}\n" for name in classes)


@dataclass
class ModelInfo:
    """What `classify` needs from a model file to preprocess images and name its outputs."""

    path: Path
    classes: list[str]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    extra: dict[str, Any] = field(default_factory=dict)


def model_info(onnx_path: str | Path) -> ModelInfo:
    """Metadata of a classifier ONNX; class names fall back to labels.txt beside it."""
    onnx_path = Path(onnx_path)
    meta = read_metadata(onnx_path)
    classes = meta.get("classes")
    if classes is None:
        labels = onnx_path.with_name(LABELS_FILE)
        if not os.path.lexists(labels):
            raise UserError(f"{onnx_path}: no class names in its metadata and no {labels}")
        classes = read_labels(labels)
    missing = [k for k in ("input_size", "mean", "std") if k not in meta]
    if missing:
        raise UserError(f"{onnx_path}: metadata lacks {', '.join(missing)} (not exported by fieldlearn export?)")
    try:
        info = ModelInfo(path=onnx_path, classes=[str(c) for c in classes], input_size=int(meta["input_size"]),
                         mean=tuple(float(v) for v in meta["mean"]), std=tuple(float(v) for v in meta["std"]),
                         extra=meta)
    except (TypeError, ValueError):
        raise UserError(f"{onnx_path}: malformed input_size/mean/std metadata") from None
    if len(info.mean) != 3 or len(info.std) != 3 or info.input_size <= 0:
        raise UserError(f"{onnx_path}: metadata mean/std need 3 values and input_size must be positive")
    return info
