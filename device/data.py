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
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fieldlearn.device.names import check_class_names
from fieldlearn.device.classifier import MIN_IMAGES  # noqa: F401  (re-exported: a class is learned from at least this many images)
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import why_not_regular
from fieldlearn.runtime.images import UnreadableImage, decode_rgb

# Every regular, non-hidden file of a class folder is offered to the decoder, whatever its
# extension (a .gif, a JPEG without extension); what it cannot read is skipped and reported.
# One ImageFolder load (an increment, or a base dataset) is held in memory as uint8
# [N, 3, S, S]: refuse more images, or more bytes, than a Jetson can hold.
MAX_IMAGES = 50_000
MAX_IMAGE_BYTES = 2 << 30
SHOWN = 3   # names shown per reason in a skip summary


class SkippedInput(UserWarning):
    """Files, folders or classes the user gave were left out (one summary line per load)."""


class Skips:
    """What one load left out, by reason; reported once as one line:
    `ROOT: skipped 4 of 12 entries: 2 unreadable image (a/x.jpg: OSError, a/y.gif: ...), 1 hidden (.cache), ...`"""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.by_reason: dict[str, list[str]] = {}

    def add(self, reason: str, path: Path, detail: str = "") -> None:
        try:
            name = str(Path(path).relative_to(self.root))
        except ValueError:
            name = str(path)
        self.by_reason.setdefault(reason, []).append(f"{name}: {detail}" if detail else name)

    def __len__(self) -> int:
        return sum(map(len, self.by_reason.values()))

    def line(self, total: int | None = None) -> str:
        of = f" of {total}" if total is not None else ""
        parts = [f"{len(v)} {k} ({', '.join(repr(x)[1:-1] for x in v[:SHOWN])}{', ...' if len(v) > SHOWN else ''})"
                 for k, v in sorted(self.by_reason.items(), key=lambda kv: -len(kv[1]))]
        return f"{self.root}: skipped {len(self)}{of} entries: " + "; ".join(parts)

    def warn(self, total: int | None = None) -> None:
        if self:
            warnings.warn(self.line(total), SkippedInput, stacklevel=3)

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

    def subset(self, rows: torch.Tensor) -> "ImageSet":
        """The images at `rows` (a [N] bool mask or indices), same class list."""
        return ImageSet(self.images[rows], self.labels[rows], self.class_names)

    def split(self, fraction: float, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """Stratified split: (1 - fraction, fraction) of each class, rounded per class."""
        g = np.random.default_rng(seed)
        a, b = [], []
        labels = self.labels.numpy()
        for c in np.unique(labels):
            idx = g.permutation(np.flatnonzero(labels == c))
            # the nearest whole number of images (halves up), never a class's last one: with
            # few images per class that can be none (callers say so), never more than asked
            n_b = min(int(math.floor(len(idx) * fraction + 0.5)), len(idx) - 1)
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

def open_dataset(spec: str, split: str = "train", image_size: int = 128, min_images: int = 1,
                 per_class: int | None = None, seed: int = 0) -> ImageSet:
    """`spec` is `cifar100`, `fashion-mnist` (optionally `NAME:PATH`) or a directory.

    split: "train" or "test" ("test" of an ImageFolder reads val/ or test/).
    image_size: the size ImageFolder images are stored at in memory (CIFAR/F-MNIST keep theirs).
    min_images: readable images an ImageFolder class needs (load_image_folder).
    per_class: an ImageFolder's classes are sampled to at most this many images each (seeded)
    before any is decoded (load_image_folder); CIFAR/F-MNIST are read whole (a few MB) and
    sampled by the caller (ImageSet.select).
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
    return load_image_folder(sub, image_size, min_images=min_images, per_class=per_class, seed=seed)


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


def try_read(path: Path, size: int) -> np.ndarray | tuple[str, str]:
    """One image file -> uint8 [3, size, size], or (reason, detail) when it cannot be used:
    ("unreadable image", decoder error), ("not a regular file", "a FIFO ..."), ("symlink
    loop", ""), ("dangling symlink", ""), ("vanished", "")."""
    try:
        return decode_rgb(path, size).transpose(2, 0, 1).copy()
    except FileNotFoundError:            # removed while listing
        return "vanished", ""
    except UnreadableImage as e:
        if e.kind == "NotRegularFile":
            return "not a regular file", e.reason.replace(", not a regular file", "").removeprefix("is ")
        if e.kind == "SymlinkLoop":
            return "symlink loop", ""
        if e.kind == "DanglingSymlink":
            return "dangling symlink", ""
        return "unreadable image", e.kind


def read_image(path: Path, size: int) -> np.ndarray | None:
    """One image file -> uint8 [3, size, size], or None (with a warning naming it) if unusable."""
    got = try_read(path, size)
    if isinstance(got, tuple):
        warnings.warn(f"{path}: skipped, {got[0]}" + (f" ({got[1]})" if got[1] else ""), SkippedInput, stacklevel=2)
        return None
    return got


def _scan(folder: Path, what: str) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"{folder}: cannot list this {what} ({e.strerror})") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()            # a symlink to a folder counts
    except OSError:
        return False


def list_class_folders(root: Path, skips: Skips | None = None) -> list[Path]:
    """Class sub-folders of an ImageFolder root, sorted by name. Hidden entries and entries
    that are not folders are left out and recorded in `skips`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    folders = []
    for e in _scan(root, "ImageFolder root"):
        if e.name.startswith("."):
            if skips is not None:
                skips.add("hidden", Path(e.path))
        elif _is_dir(e):
            folders.append(Path(e.path))
        elif skips is not None:
            why = why_not_regular(e.path)
            skips.add("not a class folder", Path(e.path), (why or "a regular file").removeprefix("is ").split(",")[0])
    return folders


def load_image_folder(root: Path, size: int, classes: list[str] | None = None, min_images: int = 1,
                      per_class: int | None = None, seed: int = 0) -> ImageSet:
    """ROOT/<class>/<image files> -> ImageSet with images resized to size x size.

    per_class: a sample of at most this many readable images per class, taken from the file
    lists before decoding (files in a seeded random order, read until per_class decode; an
    unreadable one is reported and the next file taken), so a folder larger than one load
    (MAX_IMAGES) can still give a per-class sample. The limit counts the sample.

    Every non-hidden regular file of a class folder is offered to the decoder. What is left
    out (hidden entries, sub-folders, files at the root, unreadable images, FIFOs and other
    non-regular files, symlink loops) is reported once, as one SkippedInput warning line with
    counts by reason and the first names. A class with fewer than `min_images` readable
    images (none at all, always) is refused, naming its folder."""
    root = Path(root)
    skips = Skips(root)
    folders = list_class_folders(root, skips)
    if classes is not None:
        by_name = {p.name: p for p in folders}
        folders = [by_name[c] for c in classes if c in by_name]
    if not folders:
        skips.warn()
        raise UserError(f"{root}: no class folders (expected ROOT/<class name>/<images>)")
    check_class_names([p.name for p in folders], root)
    listed = []
    for folder in folders:
        files = []
        for e in _scan(folder, "class folder"):
            p = Path(e.path)
            if e.name.startswith("."):
                skips.add("hidden", p)
            elif _is_dir(e):
                skips.add("sub-folder, not read", p)
            else:
                files.append(p)
        listed.append(files)
    n = sum(len(f) if per_class is None else min(len(f), per_class) for f in listed)
    if n > MAX_IMAGES or n * 3 * size * size > MAX_IMAGE_BYTES:
        raise UserError(f"{root}: {n} images at {size}x{size} exceed the limit of one load ({MAX_IMAGES} images, "
                        f"{MAX_IMAGE_BYTES >> 20} MiB in memory); split them into several increments")
    total = len(skips)                                # entries looked at: skipped ones and files offered
    images, labels, names, short = [], [], [], None
    g = np.random.default_rng(seed)
    for folder, files in zip(folders, listed):
        order = range(len(files)) if per_class is None or len(files) <= per_class else g.permutation(len(files))
        taken = []                                    # (index in the sorted list, image)
        for i in order:
            if per_class is not None and len(taken) == per_class:
                break                                 # the sample is full: the other files are not read
            total += 1
            a = try_read(files[i], size)
            if isinstance(a, tuple):
                skips.add(a[0], files[i], a[1])
            else:
                taken.append((int(i), a))
        got = [a for _, a in sorted(taken, key=lambda t: t[0])]   # file-name order, as without sampling
        if len(got) < max(1, min_images) and short is None:
            short = (folder, len(got))
        names.append(folder.name)
        images.extend(got)
        labels.extend([len(names) - 1] * len(got))
    skips.warn(total)
    if short is not None:
        folder, k = short
        raise UserError(f"{folder}: class folder has no readable images" if k == 0 else
                        f"{folder}: class folder has only {k} readable image{'s' if k != 1 else ''}; "
                        f"a new class needs at least {min_images}")
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), names)


def report_unknown_classes(data_classes: list[str], model_classes: list[str], where: str) -> None:
    """One warning line when a labelled dataset has classes the model does not know (their
    images are not evaluated): never left out without a word."""
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        warnings.warn(f"{where}: {len(unknown)} of its {len(data_classes)} classes are not known to the model and "
                      f"were not evaluated ({', '.join(unknown[:SHOWN])}{', ...' if len(unknown) > SHOWN else ''})",
                      SkippedInput, stacklevel=2)


def known_classes_of(spec: str, split: str, model_classes: list[str], image_size: int,
                     what: str) -> tuple[ImageSet, list[str]]:
    """The images of dataset `spec`'s split whose class the model knows, labelled by the
    model's class indices, and those classes (in the model's order): what `fieldlearn eval`
    and `learn --eval` score. UserError naming `what` when it shares no class with the model;
    one warning line for the classes left out (report_unknown_classes)."""
    data = open_dataset(spec, split, image_size)
    known = [c for c in model_classes if c in data.class_names]
    if not known:
        raise UserError(f"{what}: shares no class name with the model ({', '.join(model_classes[:5])}...)")
    report_unknown_classes(data.class_names, model_classes, what)
    return data.reorder([data.class_names.index(c) for c in known]).relabel(model_classes), known
