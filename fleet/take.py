"""A device takes the fleet's version back into its own store, keeping what is its own.

    device current = reference + own        (own: make_contribution, what it learned since)
    fleet model M  = reference + the others' + the part of own the hub counted
    ->  version 1: M                         (history entry "fleet": the next reference)
        version 2: M + own's uncounted part  (only when there is one: classes it learned
                                              after it sent, or a contribution the hub refused)

Both are published through the device's own store (fieldlearn.store.publish: atomic,
history, rollback), under the device's state lock held by the caller. A device's own
classes are never dropped: they are either in M (counted) or put back on top of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from fieldlearn.device.learner import StepReport
from fieldlearn.store.publish import publish
from fieldlearn.store.state import load_state
from fieldlearn.export.deploy import export_writer
from fieldlearn.fleet.assemble import model_from_stats
from fieldlearn.fleet.base import base_hash
from fieldlearn.fleet.contribution import FLEET_METHOD, Contribution, make_contribution, name_key
from fieldlearn.fleet.merge import FleetModel
from fieldlearn.runtime.errors import UserError


def minus(own: Contribution, sent: Contribution) -> Contribution:
    """own - sent, row by row by class name (both against the same reference)."""
    rows = {n: (r.clone(), s.clone()) for n, r, s in zip(own.classes, own.sums, own.seen)}
    for n, r, s in zip(sent.classes, sent.sums, sent.seen):
        r0, s0 = rows.get(n, (torch.zeros_like(r), torch.zeros_like(s)))
        rows[n] = (r0 - r, s0 - s)
    keep = [n for n, (r, _) in rows.items() if bool(r.abs().max() > 0)]
    return Contribution(device=own.device, base=own.base, ref=own.ref, classes=keep,
                        sums=torch.stack([rows[n][0] for n in keep]) if keep else own.sums[:0],
                        gram=own.gram - sent.gram, calib=own.calib - sent.calib,
                        seen=torch.stack([rows[n][1] for n in keep]) if keep else own.seen[:0],
                        scatter=own.scatter - sent.scatter, votes=own.votes - sent.votes)


def uncounted(own: Contribution, model: FleetModel, sent: Contribution | None) -> Contribution | None:
    """The part of `own` that `model` does not hold (None: all of it is held)."""
    counted = model.counted.get(own.device)
    if counted is None or counted["ref"] != own.ref:
        return own if own.classes or bool(own.gram.abs().max() > 0) else None
    if counted["id"] == own.id:
        return None
    if sent is not None and counted["id"] == sent.id and sent.ref == own.ref:
        rest = minus(own, sent)
        return rest if rest.classes or bool(rest.gram.abs().max() > 0) else None
    raise UserError(f"device {own.device!r}: the fleet's version {model.hub_version} holds an earlier contribution of "
                    "this device and it has learned more since; join the next round (its contribution is then "
                    "replaced) before taking the fleet's version")


def take(device_dir: Path, device: str, model: FleetModel, sent: Contribution | None = None, *,
         export: bool = True, log: Callable[[str], None] = print) -> Path:
    """Publish `model` (a hub version) into the device's store, with its own uncounted classes
    on top. sent: what the device sent this round (None: it sent nothing). Hold the state lock.
    Returns the new current version dir (the current one, unchanged, when it already holds
    `model` and nothing of its own is outside it)."""
    state = load_state(device_dir)
    h = base_hash(state.student)
    if h != model.base:
        raise UserError(f"{device_dir}: its features hash {h[:16]}, the fleet's base hashes {model.base[:16]}; "
                        "it cannot take the fleet's version")
    own = make_contribution(device_dir, device)
    rest = uncounted(own, model, sent)
    if rest is None and own.ref == model.hub_version:
        log(f"already holds the fleet's version {model.hub_version}")
        return state.version_dir
    cfg = state.config
    student = model_from_stats(state.student, cfg, model.sums, model.gram, model.calib, model.seen, model.scatter,
                               model.votes)
    step = state.step + 1
    new = [n for n in model.classes if n not in state.classes]
    entry = {"step": step, "method": FLEET_METHOD, "new_classes": new, "n_images": 0,
             "fleet": {"hub_version": model.hub_version, "classes": len(model.classes)}}
    report = StepReport(step=step, method=FLEET_METHOD, n_old=0, n_new=len(model.classes), n_images=0,
                        statistics_only=True)
    history = state.history + [entry]
    vd = publish(device_dir, student, model.classes, cfg, step=step, history=history, report=report, epochs=0,
                 writers=[export_writer(student, model.classes, step)] if export else [])
    log(f"took the fleet's version {model.hub_version} as {vd.name}: {len(model.classes)} classes ({len(new)} new)")
    if rest is None:
        return vd
    keys = {name_key(n): n for n in model.classes}
    classes, sums, seen = list(model.classes), model.sums.clone(), model.seen.clone()
    for n, row, srow in zip(rest.classes, rest.sums, rest.seen):
        if keys.get(name_key(n), n) != n:
            raise UserError(f"{device_dir}: its class {n!r} clashes with the fleet's class {keys[name_key(n)]!r} "
                            f"(case or Unicode form); the fleet's version is {vd.name}, its own classes are in "
                            f"the version before it (fieldlearn rollback)")
        if n not in classes:
            classes.append(n)
            keys[name_key(n)] = n
            sums = torch.cat([sums, sums.new_zeros(1, sums.shape[1])])
            seen = torch.cat([seen, seen.new_zeros(1, seen.shape[1])])
        sums[classes.index(n)] += row
        seen[classes.index(n)] += srow
    student = model_from_stats(state.student, cfg, sums, model.gram + rest.gram, model.calib + rest.calib, seen,
                               model.scatter + rest.scatter, model.votes + rest.votes)
    kept = classes[len(model.classes):]
    entry2 = {"step": step + 1, "method": "none", "new_classes": kept, "n_images": 0,
              "fleet": {"kept": rest.classes}}
    report2 = StepReport(step=step + 1, method="none", n_old=0, n_new=len(classes), n_images=0, statistics_only=True)
    vd = publish(device_dir, student, classes, cfg, step=step + 1, history=history + [entry2], report=report2,
                 epochs=0, writers=[export_writer(student, classes, step + 1)] if export else [])
    log(f"kept this device's own statistics not yet in the fleet ({', '.join(rest.classes)}) on top, as {vd.name}")
    return vd


__all__ = ["minus", "take", "uncounted"]
