"""The publish gate: a step's model becomes the state's `current` only if the step trained.

    train (StepReport.optimizer_steps) -> check_trained -> save_version(writers: ONNX export
    + parity, the PENDING marker) -> `current` switched -> marker removed

`publish` is how every product path (fieldlearn init, learn and watch) saves a version; a
test keeps it so. It refuses, with one line and nothing saved, a step that made no optimiser
step in some epoch (nothing to learn from: too few images for the batch, a step with 0
epochs), or whose weights are not finite (the loss itself is checked at every batch by the
learner: TrainingDiverged). The exported ONNX must pass its parity check against torch
inside save_version, as before, or the version is not published.

The PENDING marker makes "renamed into versions/ but never made current" visible: a run
killed between the version's rename and the `current` switch leaves a marked version, which
`history` does not list and the next writer removes (fieldlearn.store.versions.clean_leftovers),
so a redone increment never shows up twice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from fieldlearn.device.config import RunConfig
from fieldlearn.device.learner import StepReport
from fieldlearn.device.model import Student
from fieldlearn.store.state import save_version
from fieldlearn.runtime.atomic import fsync_dir
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import PENDING


class NotTrained(UserError):
    """The step did not train (no optimiser step in an epoch, or non-finite weights): not published."""


def check_trained(report: StepReport, epochs: int, student: Student) -> None:
    """NotTrained unless each of `epochs` epochs made at least one optimiser step (or the step
    learns by class statistics alone, by design, and formed them) and every weight is finite."""
    steps = report.optimizer_steps
    if report.statistics_only:
        if student.stats is None or student.stats.counts[report.n_old:].min() < 1:
            raise NotTrained(f"step {report.step} formed no class statistics; nothing was saved")
    elif epochs < 1 or len(steps) != epochs:
        raise NotTrained(f"step {report.step} ran {len(steps)} of {epochs} epochs; nothing was saved")
    idle = [i for i, n in enumerate(steps) if n < 1]
    if idle and not report.statistics_only:
        raise NotTrained(f"step {report.step}: epoch {idle[0]} made no optimiser step ({report.n_images} training "
                         f"images; a batch needs at least 2); nothing was saved")
    for name, t in student.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NotTrained(f"step {report.step}: weights {name} are not finite after training (learning rate "
                             f"too high?); nothing was saved")
    for k, v in report.loss_terms.items():
        if not math.isfinite(v):
            raise NotTrained(f"step {report.step}: loss term {k} is {v}; nothing was saved")


def _mark_pending(version_dir: Path) -> None:
    (Path(version_dir) / PENDING).write_bytes(b"")


def publish(state_dir: Path, student: Student, classes: list[str], cfg: RunConfig, *, step: int,
            history: list[dict[str, Any]], report: StepReport, epochs: int,
            writers: list[Callable[[Path], Any]] | None = None) -> Path:
    """Check the step (check_trained), write the version with its writers (the ONNX export
    and its parity check), make it current, and clear its PENDING marker. Returns the
    version dir; raises (nothing published) when a check fails."""
    check_trained(report, epochs, student)
    vd = save_version(state_dir, student, classes, cfg, step=step, history=history,
                      writers=[*(writers or []), _mark_pending])
    (vd / PENDING).unlink(missing_ok=True)   # current now: a kill before this is cleaned up by the next writer
    fsync_dir(vd)
    return vd


__all__ = ["NotTrained", "check_trained", "publish"]
