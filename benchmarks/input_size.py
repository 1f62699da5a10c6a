"""Which input size pays for its cost? The frozen ImageNet features at 128, 160 and 224 px,
with the lda head (fieldlearn.device.classifier, calibrated as the product does), on the
field protocol: CIFAR-100, 10 base classes with every training image, then 20 steps of 2
classes with --new-per-class images each; 10 validation images of every class choose the
head's shrink per size; test: all 100 test images of each class seen.

Cost per image: the product's encode path (trunk in ONNX Runtime where installed, then the
frozen top), timed in the same run for every size, as a ratio to 128 px.

    python benchmarks/input_size.py --data cifar100:PATH [--sizes 128,160,224] [--new-per-class 25]

--flip also folds each training image's horizontal mirror into the statistics (twice the
images per class, the same classes; validation and test are not mirrored) and reports both.

Prints one table; --out writes it with the run's numbers as JSON. Nothing here trains.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fieldlearn.device.classifier import ClassStats, crossfit_temperature, solve_head
from fieldlearn.device.config import ModelConfig, RunConfig, TrainConfig
from fieldlearn.device.data import ImageSet, class_order, open_dataset
from fieldlearn.device.learner import classifier_features
from fieldlearn.device.metrics import AccuracyMatrix, expected_calibration_error
from fieldlearn.device.model import build_student

SHRINKS = (0.2, 0.35, 0.5, 0.65, 0.8)
BASE, STEPS, STEP, VAL = 10, 20, 2, 10


def splits(train, n_new: int, seed: int):
    """-> (train rows, validation rows) of the first 50 classes (already in the order's sequence)."""
    g = torch.Generator().manual_seed(seed)
    tr, va = [], []
    for c in range(BASE + STEPS * STEP):
        rows = (train.labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        va.append(rows[:VAL])
        tr.append(rows[VAL:] if c < BASE else rows[VAL: VAL + n_new])
    return torch.cat(tr), torch.cat(va)


def run_protocol(x, y, xs: dict[str, tuple[torch.Tensor, torch.Tensor]], shrink: float) -> dict[str, AccuracyMatrix]:
    """The field protocol with the lda head over fixed features: x [N, D], y [N] training;
    xs: evaluation splits (name -> (features, labels)) -> an AccuracyMatrix per split."""
    groups = [list(range(BASE))] + [list(range(BASE + t * STEP, BASE + (t + 1) * STEP)) for t in range(STEPS)]
    out = {k: AccuracyMatrix([len(g) for g in groups]) for k in xs}
    stats = ClassStats(x.shape[1], BASE)
    for t, g in enumerate(groups):
        if t:
            stats.widen(len(g))
        m = torch.isin(y, torch.tensor(g))
        stats.add(x[m], y[m])
        t_hat = crossfit_temperature(stats, x[m], y[m], "lda", 0.0, shrink)
        if t_hat is not None:
            stats.calibrate(t_hat, len(g), stats.sums.shape[0], ModelConfig.temperature_recency)
        w, b, _ = solve_head(stats, "lda", shrink=shrink)
        seen = [c for gg in groups[: t + 1] for c in gg]
        for name, (xe, ye) in xs.items():
            me = torch.isin(ye, torch.tensor(seen))
            logits = (xe[me] @ w.T + b) / stats.temperature
            pred, lab = logits.argmax(1), ye[me]
            per = [float((pred[torch.isin(lab, torch.tensor(gg))] == lab[torch.isin(lab, torch.tensor(gg))])
                         .double().mean()) for gg in groups[: t + 1]]
            out[name].add(float((pred == lab).double().mean()), per,
                          expected_calibration_error(logits.softmax(1), lab))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="cifar100")
    p.add_argument("--sizes", default="128,160,224")
    p.add_argument("--new-per-class", type=int, default=25)
    p.add_argument("--order-seed", type=int, default=1993)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing-images", type=int, default=256)
    p.add_argument("--flip", action="store_true", help="also fold the training images' mirrors into the statistics")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train = open_dataset(args.data, "train")
    test = open_dataset(args.data, "test")
    order = class_order(len(train.class_names), args.order_seed)[: BASE + STEPS * STEP]
    train, test = train.reorder(order), test.reorder(order)
    tr, va = splits(train, args.new_per_class, seed=0)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cfg = RunConfig(model=ModelConfig(input_size=size, features="frozen", classifier="lda"),
                        train=TrainConfig(progress=False))
        st = build_student(cfg.model, BASE)
        t0 = time.perf_counter()
        feats = {k: classifier_features(st, d, cfg).float().double() for k, d in
                 (("train", train.subset(tr)), ("val", train.subset(va)), ("test", test))}
        encode_s = time.perf_counter() - t0
        probe = test.subset(torch.arange(args.timing_images))
        classifier_features(st, probe, cfg)                                     # warm-up
        t0 = time.perf_counter()
        classifier_features(st, probe, cfg)
        per_image_ms = 1000 * (time.perf_counter() - t0) / len(probe)
        evals = {"val": (feats["val"], train.labels[va]), "test": (feats["test"], test.labels)}
        y = train.labels[tr]
        variants = {"": (feats["train"], y)}
        if args.flip:
            sub = train.subset(tr)
            mirrored = classifier_features(st, ImageSet(sub.images.flip(-1), sub.labels, sub.class_names), cfg)
            variants["flip"] = (torch.cat([feats["train"], mirrored.float().double()]), torch.cat([y, y]))
        for flip, (x_train, y_train) in variants.items():
            by_shrink = {s: run_protocol(x_train, y_train, evals, s) for s in SHRINKS}
            best = max(SHRINKS, key=lambda s: by_shrink[s]["val"].average_incremental)
            m = by_shrink[best]["test"]
            rows.append({"size": size, "flip": bool(flip), "shrink": best,
                         "val_average_incremental": by_shrink[best]["val"].average_incremental,
                         "average_incremental": m.average_incremental, "last": m.last, "new_class": m.new_class,
                         "old_class": m.old_class, "mean_ece": m.mean_ece, "ms_per_image": per_image_ms,
                         "encode_seconds": encode_s})
            print(f"{size} px{' + flips' if flip else ''}: shrink {best} (validation), test avg incr. "
                  f"{100 * m.average_incremental:.1f}, ECE {100 * m.mean_ece:.1f}, {per_image_ms:.2f} ms/image",
                  flush=True)
    base_ms = rows[0]["ms_per_image"]
    lines = [f"Field protocol, CIFAR-100 order {args.order_seed}: 10 base classes x 490 images, 20 steps x 2 "
             f"classes x {args.new_per_class} images; frozen ImageNet features, lda head; test %",
             "", "| input | flips | shrink (val) | val avg incr. | avg incr. | last | new | old | ECE | ms / image | x 128 px |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {'yes' if r['flip'] else 'no'} | {r['shrink']} | {100 * r['val_average_incremental']:.1f} | "
                     f"{100 * r['average_incremental']:.1f} | {100 * r['last']:.1f} | {100 * r['new_class']:.1f} | "
                     f"{100 * r['old_class']:.1f} | {100 * r['mean_ece']:.1f} | {r['ms_per_image']:.2f} | "
                     f"{r['ms_per_image'] / base_ms:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(table + f"\n\nCommand: `python benchmarks/input_size.py --data {args.data} "
                                             f"--sizes {args.sizes} --new-per-class {args.new_per_class}"
                                             f"{' --flip' if args.flip else ''}`\n")
        (args.out / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args) | {"out": str(args.out)}},
                                                          indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
