"""PNG: stacked bars of memory by component at each candidate's peak, with the budget."""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20
ORDER = ["runtime baseline", "weights", "images", "teacher", "z cache", "targets", "batch", "gradients", "optimizer",
         "activations", "workspace", "runtime (model)", "allocator (model)", "encode transient", "teacher targets transient", "teacher setup transient",
         "load transient", "allocator overhead (measured - analytic)"]


def plot_plan(result, path: Path, max_bars: int = 14) -> Path:
    """One bar per candidate (the configured one, the chosen one, then the rest of those
    estimated, fastest first): analytic components stacked, the runtime baseline under
    them, a hatched segment for measured minus analytic where measured, and the budget."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    bars = [result.reference]
    if result.chosen is not None and result.chosen is not result.reference:
        bars.append(result.chosen)
    rest = sorted((e for e in result.evaluated if e not in bars), key=lambda e: (e.measured is None, -e.throughput))
    bars += rest[: max(0, max_bars - len(bars))]
    stacks = []
    for e in bars:
        st = {"runtime baseline": result.baseline_bytes, **e.estimate.stack()}
        if e.measured_total is not None:
            st["allocator overhead (measured - analytic)"] = max(0, e.measured_total - sum(st.values()))
        stacks.append(st)
    names = [n for n in ORDER if any(s.get(n, 0) > 0 for s in stacks)]
    names += sorted({n for s in stacks for n in s if n not in names and s[n] > 0})
    fig, ax = plt.subplots(figsize=(max(7, 0.75 * len(bars) + 3), 5.5))
    cmap = plt.get_cmap("tab20")
    x = range(len(bars))
    bottom = [0.0] * len(bars)
    for i, n in enumerate(names):
        vals = [s.get(n, 0) / MiB for s in stacks]
        hatch = "//" if n.startswith("allocator") else None
        color = "#dddddd" if n == "runtime baseline" else ("white" if hatch else cmap(i % 20))
        ax.bar(x, vals, bottom=bottom, label=n, color=color, hatch=hatch, edgecolor="#555555", linewidth=0.4)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, e in enumerate(bars):
        if e.measured_total is not None:
            ax.plot([i], [e.measured_total / MiB], "kD", markersize=5, label="measured" if i == 0 else None)
    ax.axhline(result.budget.bytes / MiB, color="red", linestyle="--", linewidth=1, label=f"budget {result.budget.label}")
    labels = []
    for e in bars:
        tag = "\n(configured)" if e is result.reference else ("\n(chosen)" if e is result.chosen else "")
        labels.append(e.candidate.label().replace(", ", "\n") + tag)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=6.5)
    ax.set_ylabel("MiB at the peak phase")
    ax.set_title(f"fieldlearn profile: memory by component ({result.device}); bars analytic, diamonds measured",
                 fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
