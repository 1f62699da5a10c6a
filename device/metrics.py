"""Class-incremental metrics: accuracy on all seen classes per step, the accuracy matrix
(step x class group), average incremental accuracy, new- and old-class accuracy,
forgetting, expected calibration error; JSON and a PNG plot."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AccuracyMatrix:
    group_sizes: list[int] = field(default_factory=list)   # classes per group, in step order
    acc: list[float] = field(default_factory=list)         # [T] accuracy on all seen classes after step t
    rows: list[list[float]] = field(default_factory=list)  # [T][t+1] accuracy on group g after step t
    ece: list[float] = field(default_factory=list)         # [T] expected calibration error after step t

    def add(self, acc_all: float, per_group: list[float], ece: float | None = None) -> None:
        if len(per_group) != len(self.acc) + 1:
            raise ValueError(f"step {len(self.acc)} needs {len(self.acc) + 1} group accuracies, got {len(per_group)}")
        self.acc.append(float(acc_all))
        self.rows.append([float(a) for a in per_group])
        if ece is not None:
            self.ece.append(float(ece))

    @property
    def new_class(self) -> float:
        """Mean over the increments (step >= 1) of the accuracy on the classes that step added."""
        new = [r[-1] for r in self.rows[1:]]
        return sum(new) / len(new) if new else float("nan")

    @property
    def old_class(self) -> float:
        """Mean over the increments of the accuracy on the classes known before the step
        (the groups weighted by their number of classes)."""
        old = [sum(a * n for a, n in zip(r[:-1], self.group_sizes)) / sum(self.group_sizes[: len(r) - 1])
               for r in self.rows[1:]]
        return sum(old) / len(old) if old else float("nan")

    @property
    def mean_ece(self) -> float:
        """Mean over steps of the expected calibration error (nan when none was measured)."""
        return sum(self.ece) / len(self.ece) if self.ece else float("nan")

    @property
    def average_incremental(self) -> float:
        """Mean over steps (step 0 included) of the accuracy on all classes seen so far."""
        return sum(self.acc) / len(self.acc) if self.acc else float("nan")

    @property
    def last(self) -> float:
        return self.acc[-1] if self.acc else float("nan")

    @property
    def forgetting(self) -> float:
        """Mean over old groups of (best accuracy before the last step - accuracy at the last step)."""
        if len(self.rows) < 2:
            return 0.0
        last = self.rows[-1]
        drops = [max(r[g] for r in self.rows[g:-1]) - last[g] for g in range(len(self.rows) - 1)]
        return sum(drops) / len(drops)

    def seen_classes(self) -> list[int]:
        out, n = [], 0
        for s in self.group_sizes[: len(self.acc)]:
            n += s
            out.append(n)
        return out

    def to_dict(self) -> dict:
        return {"group_sizes": self.group_sizes, "accuracy": self.acc, "matrix": self.rows,
                "seen_classes": self.seen_classes(), "average_incremental": self.average_incremental,
                "last": self.last, "forgetting": self.forgetting, "new_class": self.new_class,
                "old_class": self.old_class, "ece": self.ece, "mean_ece": self.mean_ece}

    @classmethod
    def from_dict(cls, d: dict) -> "AccuracyMatrix":
        return cls(group_sizes=list(d["group_sizes"]), acc=list(d["accuracy"]), rows=[list(r) for r in d["matrix"]],
                   ece=list(d.get("ece", [])))


def expected_calibration_error(probs, labels, bins: int = 15) -> float:
    """ECE of top-1 confidences: probs [N, K] (rows sum to 1), labels [N] -> the mean over
    `bins` equal-width confidence bins of |confidence - accuracy|, weighted by the share of
    images in each bin (Guo et al., 2017)."""
    import torch

    conf, pred = probs.max(1)                                                 # [N], [N]
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            ece += float(m.double().mean() * (conf[m].double().mean() - correct[m].mean()).abs())
    return ece


def plot_accuracy(curves: dict[str, AccuracyMatrix], path, title: str = "") -> None:
    """Accuracy on all seen classes vs number of classes, one line per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, m in curves.items():
        ax.plot(m.seen_classes(), [100 * a for a in m.acc], marker="o", label=f"{name} ({100 * m.average_incremental:.1f})")
    ax.set_xlabel("number of classes")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(title="method (avg incr. acc)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
