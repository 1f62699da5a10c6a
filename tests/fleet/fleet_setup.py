"""A small fleet on generated data (tests/synthetic.py): a hub's base and devices that each
learned their own classes, one class ("kiwi0") on two devices from different images.

    hub base   classes 0, 1, 2                     (fieldlearn's own base step, then copied)
    device a   3 (20 images), 4 (images 0..9)
    device b   5, 6
    device c   4 (images 10..19), 7

The config is tests/conftest.tiny_config with the frozen ImageNet-top features (D = 1280):
the base step trains nothing and the LDA head solves in a second, so the whole fleet is
built in about ten seconds on one core.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from tests.conftest import tiny_config
from tests.synthetic import make_image_set

PER_CLASS = 20
DEVICES = {"a": {3: slice(0, 20), 4: slice(0, 10)},
           "b": {5: slice(0, 20), 6: slice(0, 20)},
           "c": {4: slice(10, 20), 7: slice(0, 20)}}
BASE_CLASSES = (0, 1, 2)


def fleet_config():
    cfg = tiny_config()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, features="frozen"))


def fleet_data():
    return make_image_set(n_classes=10, per_class=PER_CLASS, seed=0)


def class_images(data, plan: dict[int, slice]):
    """ImageSet of the images `plan` names ({class: slice of its images}), labels 0..len(plan)-1."""
    from fieldlearn.device.data import ImageSet

    imgs, labels = [], []
    for j, (c, rows) in enumerate(plan.items()):
        idx = (data.labels == c).nonzero().flatten()[rows]
        imgs.append(data.images[idx])
        labels.append(torch.full((len(idx),), j))
    return ImageSet(torch.cat(imgs), torch.cat(labels), [data.class_names[c] for c in plan])


def make_base(state_dir: Path, data, cfg=None, seed: int = 0) -> Path:
    """The hub's base version (step 0) from the base classes."""
    from fieldlearn.device.learner import train_base
    from fieldlearn.device.model import build_student
    from fieldlearn.store.publish import publish

    cfg = cfg or fleet_config()
    base = class_images(data, {c: slice(0, PER_CLASS) for c in BASE_CLASSES})
    torch.manual_seed(seed)
    student = build_student(cfg.model, len(BASE_CLASSES))
    report = train_base(student, base, cfg)
    entry = {"step": 0, "method": "base", "new_classes": base.class_names, "n_images": len(base)}
    return publish(state_dir, student, base.class_names, cfg, step=0, history=[entry], report=report,
                   epochs=cfg.train.base_epochs)


def learn(state_dir: Path, new, method: str | None = None) -> Path:
    """One increment of `new` on the device, as `fieldlearn learn` runs it (no held-out share,
    no export; `method`: another learner than the state's)."""
    from fieldlearn.field.increment import learn_new_classes
    from fieldlearn.store.state import load_state

    state = load_state(state_dir)
    cfg = dataclasses.replace(state.config, method=method) if method else state.config
    return learn_new_classes(state_dir, state, new, cfg, val_fraction=0, log=lambda s: None).version_dir


def make_fleet(root: Path, data) -> dict[str, Path]:
    """{"hub": ..., "a": ..., "b": ..., "c": ...}: the base copied to every device, each device's classes learned."""
    dirs = {"hub": root / "hub"}
    make_base(dirs["hub"], data)
    for name, plan in DEVICES.items():
        dirs[name] = root / name
        shutil.copytree(dirs["hub"], dirs[name])
        learn(dirs[name], class_images(data, plan))
    return dirs
