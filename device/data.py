"""Data: readers for the layouts users hold, a class-incremental splitter, preprocessing.

Every reader returns an `ImageSet`: uint8 images [N, 3, S, S] in memory, global labels
[N] and class names. Nothing here writes anything to disk.

Readers (`open_dataset(spec, split)`):
  - ImageFolder: ROOT/<class>/<image> or ROOT/{train,val|test}/<class>/<image>
  - CIFAR-100: the official binary layout (train.bin/test.bin) or torchvision's
    `cifar-100-python/` (read with a restricted unpickler: numpy arrays and plain types only)
  - Fashion-MNIST: IDX files (`apt-get install dataset-fashion-mnist`)
"""

from __future__ import annotations

import gzip

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fieldlearn.device.store import check_class_names
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.images import UnreadableImage, decode_rgb

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
# One ImageFolder load (an increment, or a base dataset) is held in memory as uint8
# [N, 3, S, S]: refuse more images, or more bytes, than a Jetson can hold.
MAX_IMAGES = 50_000
MAX_IMAGE_BYTES = 2 << 30


class SkippedImage(UserWarning):
    """An image file that could not be read was left out (the message names it)."""

CIFAR100_PLACES = ["../shared/data/cifar-100-binary", "~/data/cifar-100-binary", "~/data/cifar-100-python",
                   "~/.cache/fieldlearn/data/cifar-100-binary", "./data/cifar-100-python", "./data/cifar-100-binary"]
FASHION_PLACES = ["/usr/share/datasets/fashion-mnist", "~/data/fashion-mnist", "./data/fashion-mnist"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]


@dataclass
class ImageSet:
    images: torch.Tensor      # [N, 3, S, S] uint8
    labels: torch.Tensor      # [N] int64, indices into class_names
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def select(self, classes: list[int], per_class: int | None = None, seed: int = 0) -> "ImageSet":
        """Keep only `classes` (global indices), at most `per_class` images each (seeded)."""
        keep = []
        g = np.random.default_rng(seed)
        labels = self.labels.numpy()
        for c in classes:
            idx = np.flatnonzero(labels == c)
            if per_class is not None and len(idx) > per_class:
                idx = np.sort(g.choice(idx, per_class, replace=False))
            keep.append(idx)
        index = torch.from_numpy(np.concatenate(keep)) if keep else torch.zeros(0, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.class_names)

    def split(self, fraction: float, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """Stratified split: (1 - fraction, fraction) of each class."""
        g = np.random.default_rng(seed)
        a, b = [], []
        labels = self.labels.numpy()
        for c in np.unique(labels):
            idx = g.permutation(np.flatnonzero(labels == c))
            n_b = int(round(len(idx) * fraction))
            if len(idx) > 1:
                n_b = min(max(n_b, 1), len(idx) - 1)
            else:
                n_b = 0
            b.append(idx[:n_b])
            a.append(idx[n_b:])
        ia, ib = (torch.from_numpy(np.sort(np.concatenate(x))) for x in (a, b))
        return (ImageSet(self.images[ia], self.labels[ia], self.class_names),
                ImageSet(self.images[ib], self.labels[ib], self.class_names))

    def reorder(self, order: list[int]) -> "ImageSet":
        """Keep classes `order` (dataset indices) and renumber them 0..len(order)-1 in that order."""
        lut = torch.full((len(self.class_names),), -1, dtype=torch.long)
        lut[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        new = lut[self.labels]
        keep = new >= 0
        return ImageSet(self.images[keep], new[keep], [self.class_names[c] for c in order])

    def relabel(self, class_names: list[str]) -> "ImageSet":
        """Map labels onto another class list by name (names must all be present)."""
        index = {n: i for i, n in enumerate(class_names)}
        missing = [n for n in self.class_names if n not in index]
        if missing:
            raise UserError(f"class(es) {missing[:3]} not in the target class list")
        lut = torch.tensor([index[n] for n in self.class_names], dtype=torch.long)
        return ImageSet(self.images, lut[self.labels], class_names)


# ---------------------------------------------------------------------------- preprocessing

def to_input(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> normalised float32 [B, 3, size, size] (bilinear resize)."""
    x = images.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------------- splitter

def class_order(n_classes: int, seed: int | None) -> list[int]:
    """A permutation of range(n_classes) from a seed (None: identity)."""
    if seed is None:
        return list(range(n_classes))
    return [int(i) for i in np.random.RandomState(seed).permutation(n_classes)]


def incremental_split(order: list[int], base: int, steps: int) -> list[list[int]]:
    """[base classes, step-1 classes, ..., step-k classes]; the rest split evenly."""
    if base <= 0 or base > len(order):
        raise UserError(f"--base {base}: must be in 1..{len(order)}")
    rest = len(order) - base
    if steps < 0 or (steps > 0 and rest < steps):
        raise UserError(f"--steps {steps}: {rest} classes left after the base cannot make {steps} steps")
    groups = [order[:base]]
    if steps:
        per = rest // steps
        for t in range(steps):
            groups.append(order[base + t * per: base + (t + 1) * per])
    return groups


# ---------------------------------------------------------------------------- readers

def open_dataset(spec: str, split: str = "train", image_size: int = 128) -> ImageSet:
    """`spec` is `cifar100`, `fashion-mnist` (optionally `NAME:PATH`) or a directory.

    split: "train" or "test" ("test" of an ImageFolder reads val/ or test/).
    image_size: the size ImageFolder images are stored at in memory (CIFAR/F-MNIST keep theirs).
    """
    name, _, path = spec.partition(":")
    if name in ("cifar100", "cifar-100"):
        return load_cifar100(_find(path, CIFAR100_PLACES, spec), split)
    if name in ("fashion-mnist", "fmnist"):
        return load_fashion_mnist(_find(path, FASHION_PLACES, spec), split)
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"{spec}: not a directory, and not one of cifar100, fashion-mnist")
    sub = _split_dir(root, split)
    return load_image_folder(sub, image_size)


def _find(path: str, places: list[str], spec: str) -> Path:
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"{path}: no such file or directory (dataset {spec})")
        return p
    for place in places:
        p = Path(place).expanduser()
        if p.exists():
            return p
    raise UserError(f"dataset {spec}: not found in {', '.join(places)}; give it as {spec.split(':')[0]}:PATH")


def _split_dir(root: Path, split: str) -> Path:
    names = ["train"] if split == "train" else ["val", "test"]
    for n in names:
        if (root / n).is_dir():
            return root / n
    has_splits = any((root / n).is_dir() for n in ("train", "val", "test"))
    if has_splits:
        raise UserError(f"{root}: has no {'/'.join(names)} folder for the {split} split")
    return root


def load_cifar100(root: Path, split: str) -> ImageSet:
    root = Path(root)
    if (root / "cifar-100-binary").is_dir():
        root = root / "cifar-100-binary"
    if (root / "cifar-100-python").is_dir():
        root = root / "cifar-100-python"
    binf = root / f"{split}.bin"
    if binf.is_file():
        raw = np.fromfile(binf, np.uint8)
        if raw.size % 3074:
            raise UserError(f"{binf}: size {raw.size} is not a whole number of 3074-byte CIFAR-100 records")
        rec = raw.reshape(-1, 3074)
        labels = rec[:, 1].astype(np.int64)
        images = rec[:, 2:].reshape(-1, 3, 32, 32)
        names_file = root / "fine_label_names.txt"
        names = names_file.read_text().split() if names_file.is_file() else [f"class_{i:02d}" for i in range(100)]
    elif (root / split).is_file():
        d = _safe_unpickle(root / split)
        images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
        meta = root / "meta"
        names = list(_safe_unpickle(meta)["fine_label_names"]) if meta.is_file() else [f"class_{i:02d}" for i in range(100)]
        names = [n.decode() if isinstance(n, bytes) else n for n in names]
    else:
        raise UserError(f"{root}: no CIFAR-100 {split}.bin (binary layout) or {split} (python layout)")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), names)


class _RestrictedUnpickler(pickle.Unpickler):
    """Only numpy arrays and builtin containers: a CIFAR pickle cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "bytes")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _safe_unpickle(path: Path):
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path}: not a CIFAR-100 python file ({e})") from None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: unreadable IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(np.int64)
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated IDX file ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def load_fashion_mnist(root: Path, split: str) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"

    def pick(kind: str) -> Path:
        for suffix in (".gz", ""):
            p = Path(root) / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte{suffix}"
            if p.is_file():
                return p
        raise UserError(f"{root}: no {prefix}-{kind} IDX file (install: apt-get install dataset-fashion-mnist)")

    images = _read_idx(pick("images"))                              # [N, 28, 28]
    labels = _read_idx(pick("labels")).astype(np.int64)             # [N]
    rgb = np.repeat(images[:, None], 3, axis=1)                     # [N, 3, 28, 28]
    return ImageSet(torch.from_numpy(np.ascontiguousarray(rgb)), torch.from_numpy(labels), list(FASHION_CLASSES))


def read_image(path: Path, size: int) -> np.ndarray | None:
    """One image file -> uint8 [3, size, size], or None (with a warning) if unreadable."""
    try:
        return decode_rgb(path, size).transpose(2, 0, 1).copy()
    except (FileNotFoundError, UnreadableImage) as e:   # a file removed while listing is skipped too
        reason = str(e) if isinstance(e, UnreadableImage) else "FileNotFoundError"
        warnings.warn(f"{path}: skipped, not a readable image ({reason})", SkippedImage, stacklevel=2)
        return None


def list_class_folders(root: Path) -> list[Path]:
    """Class sub-folders of an ImageFolder root, sorted by name (hidden ones skipped)."""
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_folder(root: Path, size: int, classes: list[str] | None = None) -> ImageSet:
    """ROOT/<class>/<image files> -> ImageSet with images resized to size x size."""
    folders = list_class_folders(Path(root))
    if classes is not None:
        by_name = {p.name: p for p in folders}
        folders = [by_name[c] for c in classes if c in by_name]
    if not folders:
        raise UserError(f"{root}: no class folders (expected ROOT/<class name>/<images>)")
    check_class_names([p.name for p in folders], root)
    listed = [sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
              for folder in folders]
    n = sum(map(len, listed))
    if n > MAX_IMAGES or n * 3 * size * size > MAX_IMAGE_BYTES:
        raise UserError(f"{root}: {n} images at {size}x{size} exceed the limit of one load ({MAX_IMAGES} images, "
                        f"{MAX_IMAGE_BYTES >> 20} MiB in memory); split them into several increments")
    images, labels, names = [], [], []
    for folder, files in zip(folders, listed):
        got = [a for a in (read_image(p, size) for p in files) if a is not None]
        if not got:
            raise UserError(f"{folder}: class folder has no readable images")
        names.append(folder.name)
        images.extend(got)
        labels.extend([len(names) - 1] * len(got))
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), names)


