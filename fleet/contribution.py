"""What a device sends: the class statistics it learned since it last synced with the fleet.

    device state (current) - its reference version  ->  Contribution
        sums  [k, D+1]   per-class sums of phi_aug (last entry: images) of the k classes
                         it changed (the new ones; known ones only where it added images)
        gram  [D+1, D+1] the sum of phi_aug phi_aug^T over those images
        scatter [D+1, D+1] the classes' covariances it added, and their tally in [-1, -1]
                         (ClassStats.scatter: additive like the Gram)
        seen  [k, D]     per class and dimension, the images that kept it (ClassStats.seen)
        calib [2]        its steps' temperature evidence (sum k_s log T_s, sum k_s)
        votes [G]        per classifier.SHRINK_GRID value, its images the lda head at that
                         shrink got right left out (ClassStats.votes: they choose the shrink)

Reference: the device's own version it last synced at. A version the fleet wrote on the
device carries a history entry {"method": "fleet", "fleet": {"hub_version": ...}}; every
later version keeps that entry in its history (learn appends), so the reference is the
version whose history is the current history up to that entry (before any fleet round:
the step-0 base). The difference of two states of one device is then exactly what it
learned in between: aggregates over >= MIN_IMAGES images per class, never a per-image
vector (classifier.shared_dims keeps the Gram the same way).

`contribution_id` hashes the whole content: the hub recomputes it, so a message truncated
or changed on the way is refused, and a contribution that arrives twice is counted once.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from fieldlearn.device.classifier import MIN_IMAGES, SHRINK_GRID
from fieldlearn.store.state import LoadedState, load_state, load_version
from fieldlearn.device.names import class_name_problem
from fieldlearn.store.versions import read_meta
from fieldlearn.fleet.base import base_hash, moved_features
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import version_names, versions_dir

BASE_REF = "base"     # the reference of a device that has taken no merged version yet
FLEET_METHOD = "fleet"


class Refused(UserError):
    """A contribution the hub does not merge (the line names the device and why)."""


@dataclass
class Contribution:
    device: str
    base: str                  # base_hash of the device's features
    ref: str                   # the hub version the device last took, or BASE_REF
    classes: list[str]         # [k] the names of the rows of sums
    sums: torch.Tensor         # [k, D+1] float64
    gram: torch.Tensor         # [D+1, D+1] float64, symmetric
    calib: torch.Tensor        # [2] float64
    seen: torch.Tensor         # [k, D] float64, the rows of ClassStats.seen of `classes`
    scatter: torch.Tensor      # [D+1, D+1] float64, symmetric: ClassStats.scatter's difference
    votes: torch.Tensor        # [G] float64, G = len(SHRINK_GRID): ClassStats.votes's difference
    moved: str | None = None   # why the device's features moved (its history), or None

    @property
    def dim(self) -> int:
        return self.gram.shape[0] - 1

    @property
    def counts(self) -> torch.Tensor:
        return self.sums[:, -1]                                              # [k]

    @property
    def id(self) -> str:
        return contribution_id(self)


def contribution_id(c: Contribution) -> str:
    """sha256 over everything a contribution says (the Gram and the scatter by their upper triangles)."""
    h = hashlib.sha256()
    h.update(json.dumps([c.device, c.base, c.ref, c.classes, c.moved]).encode())
    for t in (c.sums, upper(c.gram), c.calib, c.seen, upper(c.scatter), c.votes):
        t = t.detach().to(torch.float64).cpu().contiguous()
        h.update(f"{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def upper(gram: torch.Tensor) -> torch.Tensor:
    """[n, n] symmetric -> [n (n + 1) / 2] its upper triangle, row by row (the exact, smallest form)."""
    i, j = torch.triu_indices(gram.shape[0], gram.shape[1])
    return gram[i, j]


def from_upper(tri: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `upper`: [n (n + 1) / 2] -> [n, n] symmetric."""
    if tri.shape != (n * (n + 1) // 2,):
        raise ValueError(f"{tuple(tri.shape)} values for the upper triangle of a {n} x {n} Gram matrix")
    out = tri.new_zeros(n, n)
    i, j = torch.triu_indices(n, n)
    out[i, j] = tri
    out[j, i] = tri
    return out


# ---------------------------------------------------------------------------- the device side

def reference_version(state_dir: Path, state: LoadedState) -> tuple[LoadedState, str]:
    """(the device's version it last synced at, the hub version that was: BASE_REF before any)."""
    hist = state.history
    marks = [i for i, h in enumerate(hist) if isinstance(h, dict) and h.get("method") == FLEET_METHOD]
    last = marks[-1] if marks else 0
    prefix = hist[: last + 1]
    ref = str(hist[last]["fleet"]["hub_version"]) if marks else BASE_REF
    for name in reversed(version_names(state_dir, pending=False)):
        vd = versions_dir(state_dir) / name
        try:
            if read_meta(vd).get("history") == prefix:
                return load_version(vd), ref
        except UserError:
            continue
    what = f"the fleet version it took from hub version {ref}" if marks else "its base (step 0)"
    raise UserError(f"{state_dir}: {what} is no longer in its versions (pruned?), so what it learned since "
                    f"cannot be told apart; copy the fleet's current version to it to join again")


def make_contribution(state_dir: Path, device: str) -> Contribution:
    """What the current version of `state_dir` learned since its reference version."""
    state = load_state(state_dir)
    stats = state.student.stats
    if stats is None:
        raise UserError(f"{state_dir}: its classifier is a trained head ('linear'), not class statistics: "
                        "it has nothing a fleet can merge")
    ref, ref_name = reference_version(state_dir, state)
    k_ref = len(ref.classes)
    if state.classes[:k_ref] != ref.classes or ref.student.stats is None:
        raise UserError(f"{state_dir}: its classes do not extend those of its reference version "
                        f"{ref.version_dir.name}")
    sums, seen = stats.sums.clone(), stats.seen.clone()
    sums[:k_ref] -= ref.student.stats.sums                                   # [K, D+1]
    seen[:k_ref] -= ref.student.stats.seen                                   # [K, D]
    changed = [i for i in range(len(sums)) if i >= k_ref or bool(sums[i].abs().max() > 0)]
    return Contribution(device=device, base=base_hash(state.student), ref=ref_name,
                        classes=[state.classes[i] for i in changed], sums=sums[changed],
                        gram=stats.gram - ref.student.stats.gram, calib=stats.calib - ref.student.stats.calib,
                        seen=seen[changed], scatter=stats.scatter - ref.student.stats.scatter,
                        votes=stats.votes - ref.student.stats.votes,
                        moved=moved_features(state.history))


# ---------------------------------------------------------------------------- the hub side

def name_key(name: str) -> str:
    """Names equal under this key are one class or a clash (NFC, case-folded)."""
    return unicodedata.normalize("NFC", name).casefold()


def check_contribution(c: Contribution, base: str, dim: int, sent_id: str | None = None) -> None:
    """Refused (one line naming the device) unless `c` can be merged into a fleet whose base
    hashes to `base` with features of dimension `dim`. sent_id: the id the device computed."""
    who = f"device {c.device!r}"
    if sent_id is not None and sent_id != c.id:
        raise Refused(f"{who}: the contribution does not match its id (truncated or changed on the way); "
                      "nothing of it was merged")
    if c.moved is not None or c.base != base:
        why = f" ({c.moved}: its features moved)" if c.moved else ""
        raise Refused(f"{who}: its features hash {c.base[:16]}, the fleet's base hashes {base[:16]}{why}; "
                      "only devices on the fleet's base version (with --method none) merge exactly")
    n = dim + 1
    if (c.gram.shape != (n, n) or c.sums.ndim != 2 or c.sums.shape[1] != n or c.calib.shape != (2,)
            or c.seen.shape != (c.sums.shape[0], dim) or c.scatter.shape != (n, n)
            or c.votes.shape != (len(SHRINK_GRID),)):
        raise Refused(f"{who}: wrong shapes (Gram {tuple(c.gram.shape)}, sums {tuple(c.sums.shape)}, calibration "
                      f"{tuple(c.calib.shape)}, seen {tuple(c.seen.shape)}, scatter {tuple(c.scatter.shape)}, "
                      f"votes {tuple(c.votes.shape)}); the fleet's features need a {n} x {n} Gram matrix and "
                      f"scatter, its {len(SHRINK_GRID)} shrinks a vote each")
    if len(c.classes) != c.sums.shape[0]:
        raise Refused(f"{who}: {len(c.classes)} class names for {c.sums.shape[0]} rows of class sums")
    if not all(bool(torch.isfinite(t).all()) for t in (c.sums, c.gram, c.calib, c.seen, c.scatter, c.votes)):
        raise Refused(f"{who}: non-finite statistics")
    if float(c.scatter[-1, -1]) < 0:
        raise Refused(f"{who}: its scatter counts {float(c.scatter[-1, -1]):g} classes; a class tally is never "
                      "negative")
    if bool((c.votes < 0).any()):   # votes only grow: the reference's are part of the device's
        raise Refused(f"{who}: its shrink votes {[round(v, 6) for v in c.votes.tolist()]} go below zero; a count of "
                      "images is never negative")
    keys: dict[str, str] = {}
    for name in c.classes:
        why = class_name_problem(name)
        if why:
            raise Refused(f"{who}: class name {name!r} {why}")
        if name_key(name) in keys:
            raise Refused(f"{who}: class names {keys[name_key(name)]!r} and {name!r} differ only by case or "
                          "Unicode form")
        keys[name_key(name)] = name
    for name, n_img in zip(c.classes, c.counts.tolist()):
        if n_img != math.floor(n_img) or n_img < MIN_IMAGES:
            raise Refused(f"{who}: class {name!r} is summarised over {n_img:g} image(s); a class statistic "
                          f"needs at least {MIN_IMAGES}")
    if bool((c.seen < 0).any()) or bool((c.seen > c.counts[:, None]).any()):
        raise Refused(f"{who}: its per-dimension image counts are not between 0 and its classes' image counts")
    total = float(c.gram[-1, -1])
    if abs(total - float(c.counts.sum())) > 1e-6 * max(1.0, total):
        raise Refused(f"{who}: its Gram matrix counts {total:g} images, its classes {float(c.counts.sum()):g}")


__all__ = ["BASE_REF", "FLEET_METHOD", "Contribution", "Refused", "check_contribution", "contribution_id",
           "from_upper", "make_contribution", "name_key", "reference_version", "upper"]
