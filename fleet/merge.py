"""The hub: check the devices' contributions, add them exactly, publish one new version.

    hub current version (base or last merge) + ledger
      + each accepted contribution (check_contribution; names matched exactly, case or
        Unicode twins refused; a device's contribution replaced, never added twice)
      -> model_from_stats -> publish (the same atomic store, history and rollback as a device)

The ledger (versions/NNNN/fleet-ledger.safetensors, written with the version by one of its
writers, so a version and its ledger are published together or not at all) holds, per
device, the last contribution the version counts: its id, the hub version it was computed
against (its reference) and its statistics. A device that sends the same contribution again
(a retry, a re-join after a crash) is counted once; one that learned more since, against the
same reference, has its old contribution replaced by the new one (subtracted, then added),
which is exact too. Nothing is written unless at least one contribution changes the sums.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fieldlearn.device.classifier import SHRINK_GRID, pooled_scatter
from fieldlearn.device.learner import StepReport
from fieldlearn.store.publish import publish
from fieldlearn.store.state import LoadedState, load_state
from fieldlearn.export.deploy import export_writer
from fieldlearn.fleet.assemble import model_from_stats
from fieldlearn.fleet.base import base_hash
from fieldlearn.fleet.contribution import (BASE_REF, FLEET_METHOD, Contribution, Refused, check_contribution,
                                           from_upper, name_key, upper)
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import read_bytes
from fieldlearn.runtime.layout import FLEET_LEDGER


@dataclass
class LedgerEntry:
    ref: str                  # the hub version the contribution was computed against
    id: str                   # its contribution id
    version: str              # the hub version that first counted it
    contribution: Contribution


@dataclass
class FleetModel:
    """A hub version as the devices take it."""
    hub_version: str
    base: str
    classes: list[str]
    sums: torch.Tensor        # [K, D+1] float64
    gram: torch.Tensor        # [D+1, D+1] float64
    calib: torch.Tensor       # [2] float64
    seen: torch.Tensor        # [K, D] float64
    scatter: torch.Tensor     # [D+1, D+1] float64 (ClassStats.scatter)
    votes: torch.Tensor       # [G] float64 (ClassStats.votes: the shrink its lda head solves with)
    # device -> {"id", "ref"} of the contribution of that device it counts last
    counted: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class RoundResult:
    model: FleetModel                                       # what the devices take
    published: bool                                         # a new hub version was written
    merged: list[str] = field(default_factory=list)         # devices whose contribution this round added
    counted_before: list[str] = field(default_factory=list)  # devices whose contribution was already in it
    refused: dict[str, str] = field(default_factory=dict)   # device -> the one-line reason


# ---------------------------------------------------------------------------- the ledger

def read_ledger(version_dir: Path) -> dict[str, LedgerEntry]:
    path = Path(version_dir) / FLEET_LEDGER
    if not path.exists():
        return {}
    try:
        raw = read_bytes(path)
        (n,) = struct.unpack("<Q", raw[:8])
        index = json.loads(json.loads(raw[8: 8 + n])["__metadata__"]["ledger"])
        tensors = load_safetensors(raw)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise UserError(f"{path}: not a readable fleet ledger ({type(e).__name__}); roll the hub back to an "
                        "earlier version (fieldlearn rollback)") from None
    out = {}
    for i, (device, e) in enumerate(sorted(index.items())):
        dim = int(e["dim"])
        gram, sums = from_upper(tensors[f"{i}.gram"], dim + 1), tensors[f"{i}.sums"]
        if f"{i}.scatter" in tensors:
            scatter = from_upper(tensors[f"{i}.scatter"], dim + 1)
        else:   # a ledger written before the scatter: the one that reproduces the head it had
            scatter = pooled_scatter(gram, sums)
        # a ledger written before the votes: its contributions voted for no shrink (the hub's
        # config fixed it), so subtracting one that is replaced takes none away
        votes = tensors.get(f"{i}.votes", torch.zeros(len(SHRINK_GRID), dtype=torch.float64))
        c = Contribution(device=device, base=e["base"], ref=e["ref"], classes=list(e["classes"]),
                         sums=sums, gram=gram, calib=tensors[f"{i}.calib"], seen=tensors[f"{i}.seen"],
                         scatter=scatter, votes=votes)
        out[device] = LedgerEntry(ref=e["ref"], id=e["id"], version=e["version"] or Path(version_dir).name,
                                  contribution=c)
    return out


def ledger_writer(ledger: dict[str, LedgerEntry]) -> Callable[[Path], None]:
    """f(version_dir) writing the ledger beside the version's weights (entries counted first by
    this version have version None until then: the name is the directory's)."""
    def write(version_dir: Path) -> None:
        index, tensors = {}, {}
        for i, (device, e) in enumerate(sorted(ledger.items())):
            c = e.contribution
            index[device] = {"ref": e.ref, "id": e.id, "version": e.version, "base": c.base,
                             "classes": c.classes, "dim": c.dim}
            tensors.update({f"{i}.sums": c.sums.contiguous(), f"{i}.gram": upper(c.gram).contiguous(),
                            f"{i}.calib": c.calib.contiguous(), f"{i}.seen": c.seen.contiguous(),
                            f"{i}.scatter": upper(c.scatter).contiguous(), f"{i}.votes": c.votes.contiguous()})
        data = save_safetensors(tensors, metadata={"ledger": json.dumps(index)})
        fd = os.open(Path(version_dir) / FLEET_LEDGER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return write


# ---------------------------------------------------------------------------- a round

def fleet_model(hub: LoadedState) -> FleetModel:
    s = hub.student.stats
    if s is None:
        raise UserError(f"{hub.version_dir}: its classifier is a trained head ('linear'); a fleet merges class "
                        "statistics (fieldlearn init --classifier lda, the default)")
    ledger = read_ledger(hub.version_dir)
    return FleetModel(hub_version=hub.version_dir.name, base=base_hash(hub.student), classes=list(hub.classes),
                      sums=s.sums.clone(), gram=s.gram.clone(), calib=s.calib.clone(), seen=s.seen.clone(),
                      scatter=s.scatter.clone(), votes=s.votes.clone(),
                      counted={d: {"id": e.id, "ref": e.ref} for d, e in ledger.items()})


def _older(ref: str, version: str) -> bool:
    return ref == BASE_REF or int(ref) < int(version)


def merge_round(hub_dir: Path, contributions: list[tuple[Contribution, str | None]], *, export: bool = True,
                log: Callable[[str], None] = print) -> RoundResult:
    """Merge (contribution, the id its device sent) pairs into the hub's current version and
    publish the result as its next version. A contribution that fails a check is refused
    alone (RoundResult.refused names why) and merges nothing; the others merge. Hold the
    hub's state lock."""
    hub = load_state(hub_dir)
    model = fleet_model(hub)
    ledger = read_ledger(hub.version_dir)
    dim = hub.student.stats.dim
    classes = list(model.classes)
    keys = {name_key(n): n for n in classes}
    sums, gram, calib, seen_dims, scatter = model.sums, model.gram, model.calib, model.seen, model.scatter
    votes = model.votes
    result = RoundResult(model=model, published=False)
    seen: set[str] = set()
    for c, sent_id in sorted(contributions, key=lambda p: p[0].device):
        try:
            if c.device in seen:        # two devices under one name would replace each other's part
                raise Refused(f"device {c.device!r}: a second device of this name in the round; give each device "
                              "its own name (fleet join --device)")
            seen.add(c.device)
            check_contribution(c, model.base, dim, sent_id)
            for n in c.classes:
                if keys.get(name_key(n), n) != n:
                    raise Refused(f"device {c.device!r}: class {n!r} clashes with the fleet's class "
                                  f"{keys[name_key(n)]!r} (they differ only by case or Unicode form)")
            if c.ref != BASE_REF and (not c.ref.isdigit() or int(c.ref) > int(model.hub_version)):
                raise Refused(f"device {c.device!r}: it synced with hub version {c.ref}, but the hub serves version "
                              f"{model.hub_version} (rolled back?); its statistics do not add to this version")
            prev = ledger.get(c.device)
            if prev is not None and prev.ref == c.ref and prev.id == c.id:
                result.counted_before.append(c.device)
                continue
            if prev is not None and prev.ref != c.ref and _older(c.ref, prev.version):
                raise Refused(f"device {c.device!r}: its statistics are computed against hub version {c.ref}, older "
                              f"than version {prev.version} that holds its last contribution; it must take the "
                              "fleet's current version first")
        except Refused as e:
            result.refused[c.device] = str(e)
            log(f"refused: {e}")
            continue
        terms = [(c, 1.0)]
        if prev is not None and prev.ref == c.ref:
            terms.append((prev.contribution, -1.0))         # the same reference: replace, never add twice
        for t, sign in terms:
            for n, row, srow in zip(t.classes, t.sums, t.seen):
                if n not in keys.values():
                    classes.append(n)
                    keys[name_key(n)] = n
                    sums = torch.cat([sums, sums.new_zeros(1, sums.shape[1])])
                    seen_dims = torch.cat([seen_dims, seen_dims.new_zeros(1, seen_dims.shape[1])])
                sums[classes.index(n)] += sign * row
                seen_dims[classes.index(n)] += sign * srow
            gram = gram + sign * t.gram
            scatter = scatter + sign * t.scatter
            calib = calib + sign * t.calib
            votes = votes + sign * t.votes
        ledger[c.device] = LedgerEntry(ref=c.ref, id=c.id, version=None, contribution=c)
        result.merged.append(c.device)
    if not result.merged:
        return result
    k_old = len(model.classes)
    gram = from_upper(upper(gram), gram.shape[0])   # the form the devices receive: the same head, bit for bit
    scatter = from_upper(upper(scatter), scatter.shape[0])
    student = model_from_stats(hub.student, hub.config, sums, gram, calib, seen_dims, scatter, votes)
    step = hub.step + 1
    new = classes[k_old:]
    entry = {"step": step, "method": FLEET_METHOD, "new_classes": new, "n_images": int(sums[:, -1].sum()),
             "fleet": {"merged": {d: ledger[d].id for d in result.merged},
                       "counted_before": result.counted_before, "refused": result.refused}}
    report = StepReport(step=step, method=FLEET_METHOD, n_old=0, n_new=len(classes), n_images=entry["n_images"],
                        statistics_only=True)
    writers = [ledger_writer(ledger)] + ([export_writer(student, classes, step)] if export else [])
    vd = publish(hub_dir, student, classes, hub.config, step=step, history=hub.history + [entry], report=report,
                 epochs=0, writers=writers)
    log(f"hub version {vd.name}: {len(classes)} classes ({len(new)} new) from {', '.join(result.merged)}")
    result.published = True
    result.model = fleet_model(load_state(hub_dir))
    return result


__all__ = ["FleetModel", "LedgerEntry", "RoundResult", "fleet_model", "ledger_writer", "merge_round", "read_ledger"]
