"""Teacher vs student attention maps (as in LwM's Fig. 4): what `fieldlearn explain` draws.

    attention_figure(state_dir, images, out)      -> the PNG written

For each image: the image, the Grad-CAM of the previous version (the teacher) for its
top-1 class b, and the current version's Grad-CAM for the same b, side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fieldlearn.device.attention import gradcam
from fieldlearn.device.data import to_input, try_read
from fieldlearn.store.state import load_state, load_version
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import version_dir, version_names


def _maps(student, x: torch.Tensor, b: torch.Tensor, size: int) -> np.ndarray:
    with torch.no_grad():
        feats, _ = student(x)
        m = gradcam(feats, student.head.weight, b).view(len(x), 1, *feats.shape[-2:])
        m = torch.nn.functional.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
        m = m / m.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return m[:, 0].numpy()


def attention_figure(state_dir: Path, images: list[Path], out: Path, teacher_version: str | None = None) -> Path:
    """A PNG at `out`: for each image, the teacher's map of its top-1 class next to the current
    version's map of the same class. The teacher is `teacher_version` (default: the version
    before the current one)."""
    cur = load_state(state_dir)
    if teacher_version is None:
        prev = [n for n in version_names(state_dir) if int(n) < int(cur.version_dir.name)]
        if not prev:
            raise UserError(f"--state {state_dir}: no earlier version to compare with")
        teacher_dir = version_dir(state_dir, prev[-1])
    else:
        names = {int(n): n for n in version_names(state_dir)}
        try:
            teacher_dir = version_dir(state_dir, names[int(teacher_version)])
        except (ValueError, KeyError):
            raise UserError(f"--teacher-version {teacher_version}: no such version in {state_dir} "
                            f"(have {', '.join(names.values()) or 'none'})") from None
    teacher = load_version(teacher_dir)
    size = cur.config.model.input_size
    imgs = []
    for p in images:
        a = try_read(p, size)
        if isinstance(a, tuple):
            raise UserError(f"{p}: {a[0]}" + (f" ({a[1]})" if a[1] else ""))
        imgs.append(a)
    u8 = torch.from_numpy(np.stack(imgs))
    x = to_input(u8, size, cur.config.model.mean, cur.config.model.std)
    with torch.no_grad():
        b = teacher.student(x)[1].argmax(1)
    qt, qs = _maps(teacher.student, x, b, size), _maps(cur.student, x, b, size)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(imgs)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for i in range(n):
        rgb = u8[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(rgb)
        axes[i, 0].set_title(images[i].name[:24], fontsize=8)
        for j, (m, who) in enumerate(((qt, f"teacher v{teacher_dir.name}"), (qs, f"student v{cur.version_dir.name}")), 1):
            axes[i, j].imshow(rgb)
            axes[i, j].imshow(m[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[i, j].set_title(f"{who}: {teacher.classes[int(b[i])]}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
