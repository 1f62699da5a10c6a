"""The fleet's records <-> Flower's message content (flwr.app.RecordDict).

    contribution  {"stats": ArrayRecord{sums [k, D+1], gram [(D+1)(D+2)/2], calib [2], seen [k, D],
                                        scatter [(D+1)(D+2)/2], votes [G]},
                   "meta":  ConfigRecord{device, base, ref, classes (JSON), moved, id}}
    fleet model   {"stats": ArrayRecord{sums [K, D+1], gram [(D+1)(D+2)/2], calib [2], seen [K, D],
                                        scatter [(D+1)(D+2)/2], votes [G]},
                   "meta":  ConfigRecord{hub_version, base, classes (JSON), counted (JSON)}}

Every array is float64 (the statistics are sums: float32 would lose the exactness the fleet
promises) and the Gram matrix and the scatter (both symmetric) travel as their upper
triangles (contribution.upper), the smallest exact form. votes [G]: ClassStats.votes, one
count per classifier.SHRINK_GRID value. Decoding never trusts the sender: a missing or
mistyped field is one line (Refused / UserError) naming what is wrong (a sender older than
the scatter or the votes included: its head would be solved otherwise than the fleet's), and
check_contribution then checks shapes, counts, names and the content id.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fieldlearn.device.classifier import SHRINK_GRID
from fieldlearn.fleet.contribution import Contribution, Refused, from_upper, upper
from fieldlearn.fleet.merge import FleetModel
from fieldlearn.runtime.errors import UserError


STATS = ("sums", "gram", "calib", "seen", "scatter", "votes")


def _arrays(sums: torch.Tensor, gram: torch.Tensor, calib: torch.Tensor, seen: torch.Tensor,
            scatter: torch.Tensor, votes: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({"sums": Array(sums.double().cpu().numpy()),
                        "gram": Array(upper(gram.double().cpu()).numpy()),
                        "calib": Array(calib.double().cpu().numpy()),
                        "seen": Array(seen.double().cpu().numpy()),
                        "scatter": Array(upper(scatter.double().cpu()).numpy()),
                        "votes": Array(votes.double().cpu().numpy())})


def _tensors(rd: RecordDict, what: str, error: type[UserError]) -> tuple[torch.Tensor, ...]:
    """(sums [k, D+1], gram [D+1, D+1], calib [2], seen [k, D], scatter [D+1, D+1], votes [G])
    from a record, or `error` naming what is wrong."""
    try:
        a = rd["stats"]
        lacking = [k for k in STATS if k not in a]
        if lacking:   # a sender older than the field (scatter, votes), or a damaged message
            raise error(f"{what}: the message's statistics lack {', '.join(lacking)} (a fieldlearn older than "
                        "this hub's, or damaged on the way); nothing of it was read")
        sums, tri, calib, seen, stri, votes = (torch.from_numpy(np.array(a[k].numpy(), dtype=np.float64))
                                               for k in STATS)
    except (KeyError, TypeError, ValueError) as e:
        raise error(f"{what}: no readable statistics in the message ({type(e).__name__}: {e})") from None
    if (sums.ndim != 2 or tri.ndim != 1 or seen.shape != (sums.shape[0], sums.shape[1] - 1)
            or stri.shape != tri.shape):
        raise error(f"{what}: wrong shapes (sums {tuple(sums.shape)}, Gram {tuple(tri.shape)}, seen {tuple(seen.shape)}, "
                    f"scatter {tuple(stri.shape)})")
    m = (math.isqrt(8 * tri.shape[0] + 1) - 1) // 2                          # the side of the triangle
    if m * (m + 1) // 2 != tri.shape[0]:
        raise error(f"{what}: wrong shapes ({tri.shape[0]} Gram values are no upper triangle)")
    return sums, from_upper(tri, m), calib, seen, from_upper(stri, m), votes


def _meta(rd: RecordDict, what: str, keys: tuple[str, ...], error: type[UserError]) -> dict:
    try:
        meta = rd["meta"]
        out = {k: meta[k] for k in keys}
    except (KeyError, TypeError) as e:
        raise error(f"{what}: the message lacks {e}") from None
    for k, v in out.items():
        if not isinstance(v, str):
            raise error(f"{what}: field {k!r} is a {type(v).__name__}, not text")
    return out


def _names(text: str, what: str, error: type[UserError]) -> list:
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        raise error(f"{what}: its class names are not valid JSON") from None
    if not isinstance(names, list):
        raise error(f"{what}: its class names are not a list")
    return names


# ---------------------------------------------------------------------------- contributions

def contribution_to_record(c: Contribution) -> RecordDict:
    return RecordDict({"stats": _arrays(c.sums, c.gram, c.calib, c.seen, c.scatter, c.votes),
                       "meta": ConfigRecord({"device": c.device, "base": c.base, "ref": c.ref,
                                             "classes": json.dumps(c.classes), "moved": c.moved or "",
                                             "id": c.id})})


def contribution_from_record(rd: RecordDict, sender: str) -> tuple[Contribution, str]:
    """-> (the contribution, the id its device sent). sender: how to name it in an error."""
    meta = _meta(rd, sender, ("device", "base", "ref", "classes", "moved", "id"), Refused)
    who = f"device {meta['device']!r}"
    sums, gram, calib, seen, scatter, votes = _tensors(rd, who, Refused)
    c = Contribution(device=meta["device"], base=meta["base"], ref=meta["ref"],
                     classes=_names(meta["classes"], who, Refused), sums=sums, gram=gram, calib=calib,
                     seen=seen, scatter=scatter, votes=votes, moved=meta["moved"] or None)
    return c, meta["id"]


# ---------------------------------------------------------------------------- the fleet's model

def model_to_record(m: FleetModel) -> RecordDict:
    return RecordDict({"stats": _arrays(m.sums, m.gram, m.calib, m.seen, m.scatter, m.votes),
                       "meta": ConfigRecord({"hub_version": m.hub_version, "base": m.base,
                                             "classes": json.dumps(m.classes), "counted": json.dumps(m.counted)})})


def model_from_record(rd: RecordDict) -> FleetModel:
    what = "the fleet's version"
    meta = _meta(rd, what, ("hub_version", "base", "classes", "counted"), UserError)
    sums, gram, calib, seen, scatter, votes = _tensors(rd, what, UserError)
    classes = _names(meta["classes"], what, UserError)
    if (len(classes) != len(sums) or sums.shape[1] != gram.shape[0] or calib.shape != (2,)
            or votes.shape != (len(SHRINK_GRID),)):
        raise UserError(f"{what}: {len(classes)} class names, sums {tuple(sums.shape)}, Gram {tuple(gram.shape)}, "
                        f"calibration {tuple(calib.shape)}, votes {tuple(votes.shape)} (one per shrink: "
                        f"{len(SHRINK_GRID)})")
    try:
        counted = json.loads(meta["counted"])
    except json.JSONDecodeError:
        raise UserError(f"{what}: its ledger is not valid JSON") from None
    return FleetModel(hub_version=meta["hub_version"], base=meta["base"], classes=classes, sums=sums, gram=gram,
                      calib=calib, seen=seen, scatter=scatter, votes=votes, counted=counted)


__all__ = ["contribution_from_record", "contribution_to_record", "model_from_record", "model_to_record"]
