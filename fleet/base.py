"""The fleet's base: a content hash of everything a device's features depend on.

Class statistics from two devices add exactly only when both computed phi with the same
function: the same frozen trunk, the same top (as the base step trained it), the same frozen
ImageNet top, the same input size and normalisation, the same feature layout. `base_hash`
hashes exactly those (weights, BatchNorm buffers included, and the config fields), and
nothing the fleet changes (the head, the classifier, the statistics), so a device on another
base, or one whose top trained in an increment (its features moved), hashes differently.
"""

from __future__ import annotations

import hashlib
import json

from fieldlearn.device.model import Student

FEATURE_MODULES = ("trunk.", "top.", "frozen_top.")      # state_dict prefixes phi depends on
FEATURE_CONFIG = ("arch", "width", "variant", "input_size", "freeze_blocks", "mean", "std", "features")
TRAINS_NOTHING = ("base", "none", "fleet")                # history methods that leave the top as it was


def base_hash(student: Student) -> str:
    """sha256 (hex, 16 characters shown are enough to tell bases apart) of the feature weights and config."""
    h = hashlib.sha256()
    cfg = student.cfg
    h.update(json.dumps({k: getattr(cfg, k) for k in FEATURE_CONFIG}, sort_keys=True, default=list).encode())
    for name, t in sorted(student.state_dict().items()):
        if name.startswith(FEATURE_MODULES):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def moved_features(history: list[dict]) -> str | None:
    """The first step of `history` that trained the top (its features moved), as text, or None."""
    for h in history:
        method = h.get("method") if isinstance(h, dict) else None
        if method not in TRAINS_NOTHING:
            return f"its step {h.get('step')} trained the top with --method {method}"
    return None


__all__ = ["base_hash", "moved_features"]
