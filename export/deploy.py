"""What a device deploys, written only once checked: model.onnx + labels.txt (+ model.engine).

    export_student(student, classes, step, out_dir)   stage, check, move into place
    export_state(state)                               a loaded version, into its own dir
    export_writer(student, classes, step)             f(version_dir) for save_version's writers:
                                                      a version is published with its checked
                                                      export, or not at all

model.onnx (input_0 -> output_0, class names etc. in its metadata; fieldlearn.export.onnx)
and labels.txt are written to a work dir beside the target (.export-*, fieldlearn.runtime.
layout), checked by onnx.checker and a parity check of ONNX Runtime against torch on random
inputs and, with `images`, on real images passed through classify's own preprocessing; where
TensorRT is present (or asked for) model.engine is built from the ONNX
(fieldlearn.export.tensorrt) and checked against torch too. Only when every check passes are
the files moved into place. Nothing from fieldlearn.device is imported: a model is anything
with `.cfg.input_size`, `.num_classes` and the forwards fieldlearn.export.onnx exports.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fieldlearn.export.onnx import ClassifierGraph, check_parity, eval_mode, export_classifier
from fieldlearn.runtime.atomic import fsync_dir
from fieldlearn.runtime.cuda import tensorrt_unavailable_reason
from fieldlearn.runtime.engines import DegenerateReference, TorchEngine, TrtEngine, cross_validate
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import ENGINE_FILE, EXPORT_PREFIX, LABELS_FILE, ONNX_FILE

ENGINE_MAX_BATCH = 32   # classify's batch; a camera classifies one frame at a time (opt 1)
FP16_RTOL = 2e-2        # TensorRT FP16 vs torch FP32


@dataclass
class ExportReport:
    onnx_path: Path
    labels_path: Path
    engine_path: Path | None = None
    engine_note: str = ""
    parity: dict[str, dict[str, float]] = field(default_factory=dict)   # check name -> output -> rel err
    notes: list[str] = field(default_factory=list)                        # checks that had nothing to compare


def export_state(state: Any, out_dir: str | Path | None = None, **kwargs: Any) -> ExportReport:
    """Export a loaded state (.student, .classes, .step, .version_dir) into its version dir
    (or out_dir); see export_student for the checks and kwargs."""
    return export_student(state.student, list(state.classes), int(state.step),
                          Path(out_dir) if out_dir is not None else Path(state.version_dir),
                          state_version=Path(state.version_dir).name, **kwargs)


def export_writer(student, classes: list[str], step: int, **kwargs: Any) -> Callable[[Path], ExportReport]:
    """f(version_dir) for a version's writers (fieldlearn.store.state.save_version): the
    version is then published with its checked model.onnx, or not at all."""
    return lambda version_dir: export_student(student, classes, step, version_dir, **kwargs)


def export_student(student, classes: list[str], step: int, out_dir: str | Path, *, state_version: str | None = None,
                   engine: bool | None = None, images: list[str] | None = None, rtol: float = 1e-3,
                   n_random: int = 4, seed: int = 0) -> ExportReport:
    """OUT/model.onnx + labels.txt (+ model.engine), moved into OUT only when onnx.checker and
    parity against torch pass (random inputs, and `images` through classify's preprocessing).

    Raises ParityError (nothing written) when an engine disagrees with torch by more than
    rtol; UserError for a bad image or a forced engine without TensorRT.
    """
    reason = tensorrt_unavailable_reason()
    if engine and reason is not None:
        raise UserError(f"--engine: {reason}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = int(student.cfg.input_size)
    extra = {"state_version": state_version} if state_version else {}
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=EXPORT_PREFIX))
    try:
        onnx_tmp = export_classifier(student, work, classes=list(classes), step=int(step), **extra)
        graph = ClassifierGraph(student)
        checks: list[tuple[str, np.ndarray]] = []
        gen = torch.Generator().manual_seed(seed)
        checks.append((f"random x{n_random}", torch.randn(n_random, 3, size, size, generator=gen).numpy()))
        if images:
            from fieldlearn.runtime.classify import load_image  # noqa: PLC0415 - only with real images
            from fieldlearn.runtime.metadata import model_info  # noqa: PLC0415

            info = model_info(onnx_tmp)
            checks.append((f"{len(images)} image{'s' if len(images) != 1 else ''}", np.stack([load_image(p, info) for p in images])))
        report = ExportReport(onnx_path=out_dir / ONNX_FILE, labels_path=out_dir / LABELS_FILE)
        for name, x in checks:
            try:
                report.parity[f"onnxruntime, {name}"] = check_parity(graph, onnx_tmp, x, rtol)
            except DegenerateReference as e:
                # A barely trained net can answer the same for every input; that says nothing
                # about the export, and must not stop the version from being published.
                # A real disagreement (ParityError) still does.
                report.notes.append(f"parity not checked on {name}: {e}")

        if engine or (engine is None and reason is None):
            report.parity.update(_build_and_check_engine(graph, onnx_tmp, work, checks, rtol))
            report.engine_path = out_dir / ENGINE_FILE
        else:
            report.engine_note = "not built (--no-engine)" if engine is False else f"not built: {reason}"

        for f in sorted(work.iterdir()):   # every check passed: move into place
            os.replace(f, out_dir / f.name)
        fsync_dir(out_dir)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_and_check_engine(graph, onnx_path: Path, work: Path, checks, rtol: float) -> dict[str, dict[str, float]]:
    from fieldlearn.export.tensorrt import build_engine  # noqa: PLC0415 - only where TensorRT is

    # The sidecar records the hash of this very ONNX file, so it stays valid after the move.
    path = build_engine(onnx_path, work / ENGINE_FILE, min_batch=1, opt_batch=1, max_batch=ENGINE_MAX_BATCH)
    trt_engine = TrtEngine(path)
    out = {}
    with eval_mode(graph):
        ref = TorchEngine(graph, trt_engine.output_names, trt_engine.input_names)
        for name, x in checks:
            worst: dict[str, float] = {}
            for i in range(0, len(x), ENGINE_MAX_BATCH):
                errors = cross_validate(trt_engine, ref, x[i:i + ENGINE_MAX_BATCH], rtol=max(rtol, FP16_RTOL))
                worst = {n: max(e, worst.get(n, 0.0)) for n, e in errors.items()}
            out[f"tensorrt, {name}"] = worst
    return out


__all__ = ["ENGINE_MAX_BATCH", "ExportReport", "export_state", "export_student", "export_writer"]
