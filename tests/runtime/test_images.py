"""Decoding one image file (fieldlearn.runtime.images.decode_rgb): what every model is trained
and queried on."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fieldlearn.runtime.images import decode_rgb


def _grey_twins(tmp_path, grey8: np.ndarray):
    """The same picture as an 8-bit and as a 16-bit PNG (v16 = 257 * v8: 255 -> 65535)."""
    p8, p16 = tmp_path / "g8.png", tmp_path / "g16.png"
    Image.fromarray(grey8.astype(np.uint8)).save(p8)
    im16 = Image.fromarray((grey8.astype(np.uint32) * 257).astype("<u2"))
    assert im16.mode == "I;16"
    im16.save(p16)
    assert Image.open(p16).mode.startswith("I"), "the file really is 16-bit"
    return p8, p16


def test_a_16_bit_png_decodes_to_the_same_picture_as_its_8_bit_twin(tmp_path):
    """If this fails, a thermal or depth camera's 16-bit frames are learned and classified as
    another picture than their 8-bit twin: unscaled (most of the image white) or stretched
    to the frame's own maximum (a dark frame made bright)."""
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.int64), (64, 1))            # [64, 64] a horizontal gradient
    for grey in (ramp, ramp // 8):                                           # full range, and a dark frame (max 31)
        p8, p16 = _grey_twins(tmp_path, grey)
        a8, a16 = decode_rgb(p8, 64), decode_rgb(p16, 64)
        assert a16.shape == (64, 64, 3) and a16.dtype == np.uint8
        np.testing.assert_array_equal(a16, a8)
        assert (np.diff(a16[0, :, 0].astype(int)) >= 0).all(), "the gradient keeps its order"
    assert decode_rgb(p16, 64).max() == 31, "a dark 16-bit frame stays dark"


def test_16_bit_levels_scale_by_257(tmp_path):
    """If this fails, the 16 -> 8 bit scaling is not v / 257 rounded (65535 -> 255, 32768 -> 128)."""
    levels = np.array([0, 128, 129, 257, 32768, 65279, 65535], dtype="<u2")
    p = tmp_path / "levels.png"
    Image.fromarray(np.tile(levels, (len(levels), 1))).save(p)
    got = decode_rgb(p, len(levels))[0, :, 0].tolist()
    assert got == [0, 0, 1, 1, 128, 254, 255]
