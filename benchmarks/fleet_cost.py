"""The fleet's cost (issue 23): bytes on the wire per device per round and the hub's merge time,
for 2, 4, 8 simulated devices and 10 / 100 new classes, at the default feature width.

    .venv/bin/python benchmarks/fleet_cost.py [--out benchmarks/results/fleet-cost]

Each device's contribution is real in form (what fieldlearn.fleet.contribution makes: the
statistics of its share of the new classes, 20 images each, as float64, the Gram and the
scatter as their upper triangles) with random features, serialised exactly as Flower sends it (fleet.wire, then
Flower's protobuf). The merge is fieldlearn.fleet.merge.merge_round on a hub whose base has
the default config (MobileNetV2, features "concat": D = 2560, lda head), without the ONNX
export; it includes solving the head once and publishing the version.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fieldlearn.device.classifier import ClassStats
from fieldlearn.device.config import ModelConfig, RunConfig
from fieldlearn.device.learner import StepReport
from fieldlearn.device.model import build_student
from fieldlearn.store.publish import publish
from fieldlearn.store.state import load_state
from fieldlearn.fleet.base import base_hash
from fieldlearn.fleet.contribution import BASE_REF, Contribution
from fieldlearn.fleet.merge import merge_round

PER_CLASS = 20


def stats_of(n_classes: int, dim: int, g: torch.Generator) -> ClassStats:
    """The class statistics of PER_CLASS random unit vectors per class, folded as a device folds them."""
    x = torch.nn.functional.normalize(torch.randn(n_classes * PER_CLASS, dim, generator=g, dtype=torch.float64), dim=1)
    stats = ClassStats(dim, n_classes)
    stats.add(x, torch.arange(n_classes).repeat_interleave(PER_CLASS))
    return stats


def make_hub(root: Path) -> Path:
    cfg = RunConfig(model=ModelConfig(pretrained=False))
    student = build_student(cfg.model, 10)
    folded = stats_of(10, student.stats.dim, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name in ("sums", "gram", "scatter"):
            getattr(student.stats, name).copy_(getattr(folded, name))
    hub = root / "hub"
    publish(hub, student, [f"base{i}" for i in range(10)], cfg, step=0,
            history=[{"step": 0, "method": "base", "new_classes": [f"base{i}" for i in range(10)]}],
            report=StepReport(step=0, method="base", n_old=0, n_new=10, n_images=200, statistics_only=True), epochs=1)
    return hub


def main() -> None:
    from flwr.common.serde import recorddict_to_proto

    from fieldlearn.fleet.wire import contribution_to_record

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fleet-cost"))
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="fleet-cost-"))
    rows = []
    try:
        hub0 = make_hub(root)
        base = base_hash(load_state(hub0).student)
        dim = load_state(hub0).student.stats.dim
        for classes in (10, 100):
            for devices in (2, 4, 8):
                g = torch.Generator().manual_seed(classes * 10 + devices)
                share = [classes // devices + (i < classes % devices) for i in range(devices)]
                contribs, sizes = [], []
                for i, k in enumerate(share):
                    st = stats_of(k, dim, g)
                    c = Contribution(device=f"d{i}", base=base, ref=BASE_REF,
                                     classes=[f"c{classes}-{i}-{j}" for j in range(k)], sums=st.sums, gram=st.gram,
                                     calib=torch.tensor([k * 0.5, float(k)], dtype=torch.float64),
                                     seen=st.seen, scatter=st.scatter, votes=st.votes)
                    contribs.append((c, c.id))
                    sizes.append(len(recorddict_to_proto(contribution_to_record(c)).SerializeToString()))
                hub = root / f"hub-{classes}-{devices}"
                shutil.copytree(hub0, hub)
                t0 = time.perf_counter()
                r = merge_round(hub, contribs, export=False, log=lambda s: None)
                seconds = time.perf_counter() - t0
                assert r.published and len(r.merged) == devices
                rows.append({"classes": classes, "devices": devices, "dim": dim,
                             "bytes_per_device_max": max(sizes), "bytes_per_device_min": min(sizes),
                             "merge_s": round(seconds, 2)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| new classes | devices | bytes per device per round | merge (s) |", "|---|---|---|---|"]
    for r in rows:
        b = (f"{r['bytes_per_device_min'] / 1e6:.2f} MB" if r["bytes_per_device_min"] == r["bytes_per_device_max"]
             else f"{r['bytes_per_device_min'] / 1e6:.2f}-{r['bytes_per_device_max'] / 1e6:.2f} MB")
        lines.append(f"| {r['classes']} | {r['devices']} | {b} | {r['merge_s']} |")
    (args.out / "results.md").write_text("`.venv/bin/python benchmarks/fleet_cost.py` (CPU, 1 thread, shared 2-core "
                                         "box)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
