"""Decode one image file the way every fieldlearn model sees images: RGB, bilinear resize
to size x size, uint8. The learner's loader (fieldlearn.device.data) and the inference
CLI (fieldlearn.runtime.classify) both call decode_rgb, so a deployed model gets exactly
the pixels it was trained on."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import numpy as np

from fieldlearn.runtime.files import NotRegularFile, open_regular

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard for user-supplied images


class UnreadableImage(Exception):
    """The file exists but is not an image PIL can decode. kind: the decoder's exception
    type name; reason: its message on one line. str(): "kind: reason"."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


def to_8_bits(arr: np.ndarray) -> np.ndarray:
    """16-bit grey levels (thermal and depth cameras, scanners) -> uint8, the same picture as
    its 8-bit twin: v / 257 rounded (65535 -> 255, 32768 -> 128, 257 * k -> k). A fixed scale,
    not the image's own maximum: a dark frame stays dark, as it would in 8 bits."""
    v = np.clip(arr.astype(np.int64), 0, 65535)
    return ((v + 128) // 257).astype(np.uint8)


def decode_rgb(path: str | Path, size: int) -> np.ndarray:
    """Image file -> uint8 [size, size, 3]. FileNotFoundError if absent, UnreadableImage
    if corrupt, truncated, not an image, larger than MAX_IMAGE_PIXELS, or not a regular
    file (a FIFO, a device, a directory, a symlink loop: refused before reading, never
    waited on; fieldlearn.runtime.files)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        f = open_regular(path)
    except NotRegularFile as e:
        raise UnreadableImage("NotRegularFile", f"{e.strerror}") from None
    except FileNotFoundError:
        if os.path.islink(path):
            raise UnreadableImage("DanglingSymlink", "a symlink to a missing file") from None
        raise
    except OSError as e:
        kind = "SymlinkLoop" if e.errno == errno.ELOOP else type(e).__name__
        raise UnreadableImage(kind, e.strerror or str(e)) from None
    try:
        with f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at reduced scale when possible
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    im = Image.fromarray(to_8_bits(np.asarray(im)))
                return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except UnidentifiedImageError:
        raise UnreadableImage("UnidentifiedImageError", "not an image format Pillow reads") from None
    except Exception as e:   # noqa: BLE001 - whatever a decoder raises on a hostile file, the file is unreadable
        reason = " ".join(str(e).split())[:200]   # one line, whatever the decoder said
        raise UnreadableImage(type(e).__name__, reason) from None
