"""The learner's state on disk: immutable versions and an atomic `current` pointer.

What a version holds: weights (safetensors), class names in order, the config, the step
that produced it, the step history and metrics, the fieldlearn version. What it never
holds: any image, pixel tensor or feature of a training sample (tests/store/test_state.py
audits every byte written). Loading reads only safetensors and JSON: nothing executes.

Writing a version: everything goes to versions/.tmp-XXXX, is fsynced, renamed to
versions/NNNN and the directory fsynced; then `current` is replaced atomically. A crash
at any point leaves `current` on a complete version (the old or the new one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from fieldlearn.device.classifier import pooled_scatter
from fieldlearn.device.config import RunConfig
from fieldlearn.device.model import Student, build_student
from fieldlearn.store.versions import FORMAT, DiskFull, clean_leftovers, config_of, disk_full_reason, read_meta
from fieldlearn.runtime.atomic import fsync_dir, fsync_tree
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import read_bytes
from fieldlearn.runtime.metadata import fieldlearn_version
from fieldlearn.runtime.layout import (META, TMP_PREFIX, WEIGHTS, current_file, current_version_dir,
                                       next_version_name, switch_current, versions_dir)

# FORMAT, read_meta and clean_leftovers live in fieldlearn.store.versions (no torch) so that
# history/rollback/prune and the lock stay light; the file names in fieldlearn.runtime.layout.


@dataclass
class LoadedState:
    student: Student
    classes: list[str]
    config: RunConfig
    step: int
    version_dir: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def history(self) -> list[dict]:
        return list(self.meta.get("history", []))


def init_state_dir(state_dir: Path) -> Path:
    """Create the state dir owner-only (0700: weights and class names are the user's data)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    versions_dir(state_dir).mkdir(exist_ok=True, mode=0o700)
    for d in (state_dir, versions_dir(state_dir)):
        if d.stat().st_mode & 0o077:
            os.chmod(d, 0o700)
    clean_leftovers(state_dir)
    return state_dir


def save_version(state_dir: Path, student: Student, classes: list[str], config: RunConfig, step: int,
                 history: list[dict], extra: dict[str, Any] | None = None,
                 writers: list | None = None) -> Path:
    """Write a new version and make it current. Returns the version dir.

    writers: callables f(tmp_version_dir) run before publishing (e.g. the ONNX export),
    so the published version is complete with its exports or not published at all.
    """
    if len(classes) != student.num_classes:
        raise ValueError(f"{len(classes)} class names for a head of {student.num_classes}")
    state_dir = init_state_dir(state_dir)
    vd = versions_dir(state_dir)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=vd))   # 0700
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS))
        os.chmod(tmp / WEIGHTS, 0o600)
        m = config.model
        meta = {
            "format": FORMAT,
            "fieldlearn_version": fieldlearn_version(),
            "step": step,
            "classes": list(classes),
            "num_classes": len(classes),
            "architecture": {"arch": m.arch, "width": m.width, "variant": m.variant,
                             "num_features": student.num_features, "classifier": m.classifier,
                             "features": m.features if m.classifier != "linear" else "student"},
            "input_size": m.input_size,
            "mean": list(m.mean),
            "std": list(m.std),
            "config": config.to_dict(),
            "history": history,
            **(extra or {}),
        }
        with open(os.open(tmp / META, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True))
        for w in writers or []:
            w(tmp)
        fsync_tree(tmp)
        name = next_version_name(state_dir)
        final = vd / name
        os.rename(tmp, final)
        fsync_dir(vd)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, state_dir)
        raise
    try:
        switch_current(state_dir, name)
    except BaseException as e:
        # Not current, so not published: take it back out of the namespace (a crash right
        # here leaves a complete but never-current version, which is harmless). If the
        # pointer did switch (only its directory fsync failed), the version stays.
        try:
            switched = current_file(state_dir).read_text().strip() == name
        except OSError:
            switched = False
        if not switched:
            back = vd / f"{TMP_PREFIX}unpublished-{name}"
            os.rename(final, back)
            shutil.rmtree(back, ignore_errors=True)
        _raise_if_disk_full(e, state_dir)
        raise
    return final


def _raise_if_disk_full(e: BaseException, state_dir: Path) -> None:
    reason = disk_full_reason(e)
    if reason is not None:
        raise DiskFull(f"{state_dir}: no new version written ({reason}); the current version is unchanged") \
            from None


def load_version(version_dir: Path, device: str = "cpu") -> LoadedState:
    version_dir = Path(version_dir)
    meta = read_meta(version_dir)
    try:
        config = RunConfig.from_dict(config_of(meta))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{version_dir / META}: bad config ({e})") from None
    wpath = version_dir / WEIGHTS
    try:
        tensors = {k: v.to(device) for k, v in load_safetensors(read_bytes(wpath)).items()}   # a regular file only
    except FileNotFoundError:
        raise UserError(f"{wpath}: missing") from None
    except OSError as e:
        raise UserError(f"{wpath}: unreadable ({e.strerror})") from None
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{wpath}: not a readable safetensors file ({e})") from None
    cfg = config.model
    cfg_nopre = type(cfg)(**{**cfg.__dict__, "pretrained": False})  # weights come from the file
    try:
        student = build_student(cfg_nopre, int(meta["num_classes"]))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{version_dir / META}: cannot build its architecture ({e})") from None
    expected = student.state_dict()
    if "stats.calib" in expected and "stats.calib" not in tensors:
        tensors["stats.calib"] = expected["stats.calib"]   # saved before calibration: T = 1, as it predicted
    if "stats.seen" in expected and "stats.seen" not in tensors and "stats.sums" in tensors:
        sums = tensors["stats.sums"]                       # saved before `seen`: every dimension read as
        tensors["stats.seen"] = sums[:, -1:].expand(-1, sums.shape[1] - 1).contiguous()   # seen, as it predicted
    if "stats.scatter" in expected and "stats.scatter" not in tensors and "stats.gram" in tensors:
        # saved before the class-balanced covariance: its lda head, as it predicted, until it learns again
        tensors["stats.scatter"] = pooled_scatter(tensors["stats.gram"], tensors["stats.sums"])
    if "stats.votes" in expected and "stats.votes" not in tensors:
        tensors["stats.votes"] = expected["stats.votes"]   # saved before the shrink votes: its config's shrink is > 0
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise UserError(f"{wpath}: weights do not match the architecture in {META} "
                        f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    for k, v in expected.items():   # before load_state_dict, which raises on a shape mismatch
        if v.shape != tensors[k].shape or v.dtype != tensors[k].dtype:
            raise UserError(f"{wpath}: tensor {k} is {tuple(tensors[k].shape)} {tensors[k].dtype}, expected "
                            f"{tuple(v.shape)} {v.dtype}: weights do not match the architecture in {META}")
    student.load_state_dict(tensors)
    student.to(device).eval()
    return LoadedState(student=student, classes=list(meta["classes"]), config=config, step=int(meta["step"]),
                       version_dir=version_dir, meta=meta)


def load_state(state_dir: Path, device: str = "cpu") -> LoadedState:
    """The current version of a state directory."""
    return load_version(current_version_dir(state_dir), device=device)


__all__ = ["LoadedState", "save_version", "load_state", "load_version", "init_state_dir"]


