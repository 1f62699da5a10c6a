"""Diagnostic (issue 12): when LwM's increments lose to the features frozen after the base
step, is it the features or the old classes' statistics?

The demo's protocol (Fashion-MNIST, 4 base + 3 steps of 2, 160 train / 40 validation / 200
test images per class, `--preset fmnist-demo`), through the product's own code: the same base
network, then one LwM increment per step at the shipped settings (lwm+analytic). After each
step the one trained student is scored with its head solved from

- carried: the old classes' statistics as the product keeps them (formed when the class was
  learned, moved by the linear drift compensation; `learner.carry_statistics`);
- not carried: the same increment with `drift none` (statistics left as formed);
- refreshed: every seen class's statistics recomputed from its training images under the
  current student. This keeps old images: a diagnostic only, never the product;

beside `none+analytic` (the features frozen after the base step, the shipped default).
If "refreshed" beats none+analytic, LwM's features did improve and the loss is in carrying
the statistics; if it does not, training the top on new classes only does not pay here.

    python benchmarks/drift_check.py 1993 1 > benchmarks/results/drift-check/log.txt
"""
from __future__ import annotations

import copy
import sys

from fieldlearn.device.classifier import ClassStats
from fieldlearn.device.config import ModelConfig, RunConfig, TrainConfig
from fieldlearn.device.data import class_order, incremental_split, open_dataset
from fieldlearn.device.learner import fit_classifier, learn_increment, setup_torch
from fieldlearn.device.protocol import Order, parse_row, row_config


def refreshed(st, order: Order, t: int, cfg: RunConfig):
    """A copy of st whose statistics are rebuilt from every seen class's training images."""
    out = copy.deepcopy(st)
    out.stats = ClassStats(st.stats.dim, st.num_classes).to(st.stats.gram.device)
    classes = [c for g in order.groups[: t + 1] for c in g]
    data, z = order.train.take(classes)
    fit_classifier(out, data, classes, cfg, z)
    return out.eval()


def run(seed: int) -> dict[str, list[tuple[float, float]]]:
    cfg0 = RunConfig(model=ModelConfig(variant="cifar", input_size=32, pretrained=True, freeze_blocks=14),
                     train=TrainConfig(progress=False, batch_size=64, num_threads=1))
    setup_torch(cfg0)
    tr_all = open_dataset("fashion-mnist", "train", 32)
    te_all = open_dataset("fashion-mnist", "test", 32)
    te_all = te_all.relabel(tr_all.class_names) if te_all.class_names != tr_all.class_names else te_all
    groups = incremental_split(list(range(10)), 4, 3)
    perm = class_order(10, seed)
    train, val = tr_all.reorder(perm).select(list(range(10)), 200, seed=0).split(0.2, seed=0)
    test = te_all.reorder(perm).select(list(range(10)), 200, seed=0)
    order = Order(cfg0, train, val, test, groups, log=print)
    rows = {}
    for name in ("none+analytic", "lwm+analytic"):
        row = parse_row(name)
        rows[name] = (row, row_config(cfg0, row, {}))
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in ("none+analytic", "carried", "not carried",
                                                                 "refreshed")}
    students = {k: order.student_for(*rows["none+analytic" if k == "none+analytic" else "lwm+analytic"])
                for k in out if k != "refreshed"}
    for k, st in students.items():
        cfg = rows["none+analytic" if k == "none+analytic" else "lwm+analytic"][1]
        out[k].append((order._eval(st, order.val, 0, cfg)[0], order._eval(st, order.test, 0, cfg)[0]))
    out["refreshed"].append(out["carried"][0])
    cfg_lwm = rows["lwm+analytic"][1]
    cfg_nodrift = copy.deepcopy(cfg_lwm)
    cfg_nodrift.train.drift = "none"
    for t in range(1, len(groups)):
        data, z = order.train.take(groups[t])
        for k, st in students.items():
            cfg = {"none+analytic": rows["none+analytic"][1], "carried": cfg_lwm, "not carried": cfg_nodrift}[k]
            learn_increment(st, data, len(groups[t]), cfg, step=t, method=rows["none+analytic" if k == "none+analytic"
                                                                               else "lwm+analytic"][0].method, z=z)
            out[k].append((order._eval(st, order.val, t, cfg)[0], order._eval(st, order.test, t, cfg)[0]))
        fresh = refreshed(students["carried"], order, t, cfg_lwm)
        out["refreshed"].append((order._eval(fresh, order.val, t, cfg_lwm)[0],
                                 order._eval(fresh, order.test, t, cfg_lwm)[0]))
        print(f"order {seed} step {t}: " + ", ".join(f"{k} test {100 * v[-1][1]:.1f}" for k, v in out.items()),
              flush=True)
    return out


def main(seeds: list[int]) -> None:
    runs = [run(s) for s in seeds]
    print(f"\norders {seeds}; accuracy (%) on all classes seen so far after each step, mean over the orders")
    print("| head | val per step | val avg incr. | test per step | test avg incr. | test last |")
    print("|---|---|---|---|---|---|")
    for k in runs[0]:
        val = [sum(r[k][t][0] for r in runs) / len(runs) for t in range(len(runs[0][k]))]
        test = [sum(r[k][t][1] for r in runs) / len(runs) for t in range(len(runs[0][k]))]
        print(f"| {k} | {' / '.join(f'{100 * a:.1f}' for a in val)} | {100 * sum(val) / len(val):.1f} "
              f"| {' / '.join(f'{100 * a:.1f}' for a in test)} | {100 * sum(test) / len(test):.1f} "
              f"| {100 * test[-1]:.1f} |")


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [1993])
