"""Diagnostic (issue 12): when LwM's increments lose to the features frozen after the base
step, is it the features or the old classes' statistics?

The demo's protocol (Fashion-MNIST, 4 base + 3 steps of 2, 160 train / 40 validation / 200
test images per class, `--preset fmnist-demo`), through the product's own code: the same base
network, then one LwM increment per step with the statistics head at TrainConfig's defaults
(every block of the top training; not CHOSEN["lwm+analytic"], which trains one). After each
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
from fieldlearn.device.data import incremental_split, open_dataset
from fieldlearn.device.learner import fit_classifier, learn_increment, setup_torch
from fieldlearn.device.protocol import Order, parse_row, row_config
from fieldlearn.tools.bench_accuracy import PRESETS, order_splits

PRESET = PRESETS["fmnist-demo"]

def refreshed(st, order: Order, t: int, cfg: RunConfig):
    """A copy of st whose statistics are rebuilt from every seen class's training images."""
    out = copy.deepcopy(st)
    out.stats = ClassStats(st.stats.dim, st.num_classes).to(st.stats.gram.device)
    classes = [c for g in order.groups[: t + 1] for c in g]
    data, z = order.train.take(classes)
    fit_classifier(out, data, classes, cfg, z)
    return out.eval()


def run(seed: int) -> dict[str, list[tuple[float, float]]]:
    cfg0 = RunConfig(model=ModelConfig(**PRESET["model"]),
                     train=TrainConfig(progress=False, num_threads=1, **PRESET["train"]))
    setup_torch(cfg0)
    tr_all = open_dataset(PRESET["data"], "train", cfg0.model.input_size)
    te_all = open_dataset(PRESET["data"], "test", cfg0.model.input_size)
    te_all = te_all.relabel(tr_all.class_names) if te_all.class_names != tr_all.class_names else te_all
    groups = incremental_split(list(range(len(tr_all.class_names))), PRESET["base"], PRESET["steps"])
    used = sum(len(g) for g in groups)
    order = Order(cfg0, *order_splits(tr_all, te_all, seed, used, PRESET, cfg0.train.seed), groups, log=print)
    none_row, lwm_row = parse_row("none+analytic"), parse_row("lwm+analytic")
    cfg_lwm = row_config(cfg0, lwm_row, {})
    cfg_nodrift = copy.deepcopy(cfg_lwm)
    cfg_nodrift.train.drift = "none"
    # each trained student: its row and config
    setups = {"none+analytic": (none_row, row_config(cfg0, none_row, {})), "carried": (lwm_row, cfg_lwm),
              "not carried": (lwm_row, cfg_nodrift)}
    students = {k: order.student_for(row, cfg) for k, (row, cfg) in setups.items()}

    def scores(st, t: int, cfg: RunConfig) -> tuple[float, float]:
        return order._eval(st, order.val, t, cfg)[0], order._eval(st, order.test, t, cfg)[0]

    out: dict[str, list[tuple[float, float]]] = {k: [scores(st, 0, setups[k][1])] for k, st in students.items()}
    out["refreshed"] = [out["carried"][0]]
    for t in range(1, len(groups)):
        data, z = order.train.take(groups[t])
        for k, st in students.items():
            row, cfg = setups[k]
            learn_increment(st, data, len(groups[t]), cfg, step=t, method=row.method, z=z)
            out[k].append(scores(st, t, cfg))
        out["refreshed"].append(scores(refreshed(students["carried"], order, t, cfg_lwm), t, cfg_lwm))
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
