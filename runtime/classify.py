"""`fieldlearn classify IMAGES... (--state DIR | --model model.onnx)`: top-k labels.

Runs an exported model through the best engine here (TensorRT > ONNX Runtime) with
numpy + Pillow preprocessing read from the model's own metadata (input size, mean, std).
Imports nothing from fieldlearn.device and no torch: it runs on an inference-only device.

    $ fieldlearn classify cat.jpg --state ~/fieldlearn-state --top-k 3
    cat.jpg
      0.912  cat
      0.051  fox
      0.013  dog
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fieldlearn.runtime.engines import BACKENDS, best_engine
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import why_not_regular
from fieldlearn.runtime.images import UnreadableImage, decode_rgb
from fieldlearn.runtime.layout import ONNX_FILE, current_version_dir
from fieldlearn.runtime.metadata import ModelInfo, model_info

BATCH = 32  # images per engine call (also the TensorRT profile's max batch for ad-hoc engines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything Pillow reads)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--state", metavar="DIR", help="state dir: use the current version's model.onnx")
    src.add_argument("--model", metavar="FILE", help="an ONNX file written by fieldlearn export")
    p.add_argument("--top-k", type=_count(1, 100_000), default=5, metavar="K", help="labels to print per image (default 5)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="inference engine (default auto: TensorRT where present, else ONNX Runtime)")
    p.add_argument("--threads", type=_count(0, 1024), default=0,
                   help="ONNX Runtime intra-op threads (default 0: one per core)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def _count(lo: int, hi: int):
    """argparse type: an integer in [lo, hi] (fieldlearn.device.validate's rule, without
    importing the training side), one line naming the option otherwise."""
    def convert(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {raw}")
        return value
    convert.__name__ = "int"
    return convert


def resolve_model(state: str | None, model: str | None) -> Path:
    if model is not None:
        path = Path(model)
        why = why_not_regular(path)
        if why is not None:
            raise UserError(f"{path}: no such model file" if why == "is missing" else f"{path}: {why}")
        return path
    path = current_version_dir(state) / ONNX_FILE
    why = why_not_regular(path)
    if why == "is missing":
        raise UserError(f"{path}: not exported yet (run: fieldlearn export --state {state})")
    if why is not None:
        raise UserError(f"{path}: {why}")
    return path


def load_image(path: str | Path, info: ModelInfo) -> np.ndarray:
    """One image -> normalised float32 [3, S, S] (S = the model's input_size), or UserError
    naming the file. The same steps as the learner's image loader, so a model sees what it
    was trained on: RGB, bilinear resize to S x S, uint8, /255, (x - mean) / std."""
    try:
        rgb = decode_rgb(path, info.input_size)                                     # [S, S, 3] uint8
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except UnreadableImage as e:
        raise UserError(f"{path}: not a readable image ({e.kind}: {e.reason})"[:400]) from None
    x = rgb.astype(np.float32) / 255.0                                              # [S, S, 3]
    x = (x - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))                              # [3, S, S]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def classify(paths: list[str], info: ModelInfo, engine, top_k: int) -> list[dict]:
    """[{"image": path, "top": [{"label", "index", "prob"}, ...]}] in the order of `paths`."""
    k = min(top_k, len(info.classes))
    results = []
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        batch = np.stack([load_image(p, info) for p in chunk])                   # [N, 3, S, S]
        logits = np.asarray(engine(batch)[engine.output_names[0]], np.float64)    # [N, K]
        if logits.shape[1] != len(info.classes):
            raise UserError(f"{info.path}: {logits.shape[1]} outputs but {len(info.classes)} class names")
        probs = softmax(logits)
        for path, p in zip(chunk, probs):
            order = np.argsort(-p, kind="stable")[:k]
            results.append({"image": str(path), "top": [
                {"label": info.classes[i], "index": int(i), "prob": float(p[i])} for i in order]})
    return results


def run(args: argparse.Namespace) -> int:
    path = resolve_model(args.state, args.model)
    info = model_info(path)
    engine = best_engine(path, prefer=args.backend, threads=args.threads, max_batch=BATCH)
    results = classify(args.images, info, engine, args.top_k)
    if args.json:
        json.dump({"model": str(path), "backend": engine.backend, "results": results}, sys.stdout, indent=1)
        print()
        return 0
    for r in results:
        print(r["image"])
        for t in r["top"]:
            print(f"  {t['prob']:.3f}  {t['label']}")
    return 0
