"""A small, deterministic, generated image set: data the project can always produce.

Tests whose promise does not depend on accuracy on real photographs (privacy, crash
safety, the daemon, CLI plumbing, bad input) run on this, so that none of them is tested
only where ../shared/data exists. Tests that measure accuracy on real images stay on
CIFAR-100 / Fashion-MNIST (tests/conftest.py).

Class c is an oriented sinusoidal grating in its own colour (hue, orientation and spatial
frequency all depend on c); each image has its own phase, contrast, a small shift and
pixel noise, so every image (and every pixel row of it) is distinct while the classes stay
learnable from colour and texture.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Not alphabetical in index order: a sort anywhere between index and name shows.
WORDS = ["zebra", "apple", "mango", "kiwi", "lynx", "bear", "fig", "owl", "yak", "elm"]


def class_names(n: int) -> list[str]:
    return [f"{WORDS[c % len(WORDS)]}{c // len(WORDS)}" for c in range(n)]


def make_image_set(n_classes: int = 100, per_class: int = 100, size: int = 32, seed: int = 0):
    """ImageSet of n_classes * per_class uint8 images [N, 3, size, size], labels in class
    order (per_class of class 0, then of class 1, ...). The same (n_classes, per_class,
    size, seed) gives the same bytes; a different seed gives other images of the same classes."""
    from fieldlearn.device.data import ImageSet

    rng = np.random.default_rng(seed)
    n = n_classes * per_class
    labels = np.repeat(np.arange(n_classes), per_class)
    c = labels.astype(np.float64)
    golden = (math.sqrt(5) - 1) / 2
    hue = (c * golden) % 1.0                                            # [N]
    colour = 0.5 + 0.5 * np.stack([np.cos(2 * math.pi * (hue + k / 3)) for k in range(3)], 1)   # [N, 3] in [0, 1]
    theta = math.pi * ((c * 0.382) % 1.0)                               # orientation
    freq = 1.5 + (labels % 4)                                           # cycles per image
    phase = rng.uniform(0, 2 * math.pi, n)
    contrast = rng.uniform(45, 75, n)
    shift = rng.uniform(-2, 2, (n, 2))
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")   # [S, S]
    u = ((xx[None] + shift[:, 0, None, None]) * np.cos(theta)[:, None, None]
         + (yy[None] + shift[:, 1, None, None]) * np.sin(theta)[:, None, None])   # [N, S, S]
    wave = np.sin(2 * math.pi * freq[:, None, None] * u / size + phase[:, None, None])
    img = (128 + (colour - 0.5)[:, :, None, None] * 120
           + contrast[:, None, None, None] * wave[:, None] * (0.4 + colour[:, :, None, None])
           + rng.normal(0, 12, (n, 3, size, size)))                     # [N, 3, S, S]
    images = torch.from_numpy(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)), class_names(n_classes))
