"""A model from merged statistics: the fleet's feature weights, a head solved from the sums.

The hub and a device both end a round here: the feature weights (trunk, top, frozen top)
are the fleet's base, unchanged (fleet.base); only the class statistics are new, and the
deployed head is solved from them as every increment solves it (learner.solve_classifier,
calibration temperature included).
"""

from __future__ import annotations

import dataclasses

import torch

from fieldlearn.device.config import RunConfig
from fieldlearn.device.learner import solve_classifier
from fieldlearn.device.model import Student, build_student
from fieldlearn.fleet.base import FEATURE_MODULES


def model_from_stats(features: Student, cfg: RunConfig, sums: torch.Tensor, gram: torch.Tensor,
                     calib: torch.Tensor, seen: torch.Tensor, scatter: torch.Tensor, votes: torch.Tensor) -> Student:
    """A student with `features`' feature weights and len(sums) classes whose statistics are
    sums [K, D+1], gram [D+1, D+1], calib [2], seen [K, D], scatter [D+1, D+1], votes [G], and
    its head solved from them (votes first: with ModelConfig.shrink 0 they choose its shrink)."""
    torch.manual_seed(cfg.train.seed)   # the trained head's rows (unused by a statistics classifier)
    out = build_student(dataclasses.replace(cfg.model, pretrained=False), len(sums))
    kept = {k: v for k, v in features.state_dict().items() if k.startswith(FEATURE_MODULES)}
    missing, unexpected = out.load_state_dict(kept, strict=False)
    if unexpected or any(k.startswith(FEATURE_MODULES) for k in missing):
        raise ValueError(f"feature weights do not fit the architecture (missing {missing[:2]}, unexpected "
                         f"{unexpected[:2]})")
    with torch.no_grad():
        out.stats.sums.copy_(sums)
        out.stats.gram.copy_(gram)
        out.stats.calib.copy_(calib)
        out.stats.seen.copy_(seen)
        out.stats.scatter.copy_(scatter)
        out.stats.votes.copy_(votes)
    solve_classifier(out, cfg)
    return out.eval()


__all__ = ["model_from_stats"]
