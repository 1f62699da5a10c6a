"""`fieldlearn bench accuracy`: the learners next to what not learning gives, in one run.

Rows (`--methods`; results.json names them exactly so) and the protocol are those of
fieldlearn.device.protocol: ncm and analytic (the pretrained network, nothing trained),
METHOD (the paper's linear head), METHOD+ncm / METHOD+analytic (a head solved from class
statistics), none+analytic (features frozen after the base step) and joint, the upper bound
that trains on all data seen so far. joint stores data: its step exists only here
(joint_step below) and it is marked so in every output.

For each class order every train/validation/test image is encoded once; each base setting's
network is trained once and shared by the rows that use it; every row learns the same
increments from the same images and is evaluated after each step on all classes seen so far,
on the test split and on a validation split held out of the training images.

--sweep: for each row, a staged search over SWEEP_STAGES (one setting changed at a time around
the best so far), scored by validation average incremental accuracy averaged over the class
orders; the test numbers of the chosen settings are the result (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from fieldlearn.cli.flags import add_config_arguments, config_from_args, option
from fieldlearn.device.config import LossConfig, ModelConfig, RunConfig, TrainConfig, Valid
from fieldlearn.device.data import MAX_IMAGES, MIN_IMAGES, ImageSet, class_order, incremental_split, open_dataset
from fieldlearn.device.classifier import ClassStats
from fieldlearn.device.learner import fit_classifier, setup_torch, train_step
from fieldlearn.device.methods import make_method
from fieldlearn.device.metrics import AccuracyMatrix, plot_accuracy
from fieldlearn.device.model import Student
from fieldlearn.device.protocol import (_FIELDS, JOINT_NOTE, MethodResult, Order, Row, parse_row, row_config,
                                        row_settings, row_uses, stores_data)
from fieldlearn.device.validate import validate_config
from fieldlearn.runtime.atomic import write_json
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import read_text as read_regular_text
from fieldlearn.runtime.metadata import fieldlearn_version

log = functools.partial(print, flush=True)

DEFAULT_ROWS = ["ncm", "analytic", "none+analytic", "lwm+analytic", "lwf_mc+analytic", "finetune+analytic",
                "lwm", "lwf_mc", "finetune"]


# Staged sweep: within a stage one key changes at a time around the best setting so far;
# a row skips the keys it does not use (row_uses), --sweep-keys narrows them further. Keys
# name config fields (fieldlearn.device.config owns their ranges and help); the grids are
# the values tried. lr: 0.02 left the grid after it diverged on the base network's features
# (benchmarks/README.md#linear-head-rows); 0.0003 probes the way to "features frozen".
SWEEP_STAGES: list[dict[str, list]] = [
    {"base_lr": [0.003, 0.01, 0.03, 0.05], "base_epochs": [8, 15, 30]},
    {"dropout": [0.0, 0.2], "features": ["student", "concat"], "ridge": [0.0, 0.03, 0.1, 0.3, 1.0],
     "shrink": [0.2, 0.35, 0.5, 0.65, 0.8]},
    {"lr": [0.0003, 0.001, 0.003, 0.01], "freeze_bn_in_increments": [True, False], "increment_blocks": [1, 2, -1]},
    {"epochs": [3, 6, 12], "new_head_init": ["scaled", "default"], "max_grad_norm": [0.0, 10.0],
     "drift_shrink": [0.1, 1.0, 10.0]},
    {"beta": [0.5, 1.0, 2.0], "gamma": [0.5, 1.0, 2.0], "ld": ["kd", "bce"], "lc_span": ["new", "all"]},
]

# Presets: protocol size and model/training config. cpu45: CIFAR-100 10x10 on 2 CPU cores
# (benchmarks/README.md); gpu: the 128x128 setting, for a GPU.
PRESETS: dict[str, dict] = {
    # CIFAR-100 10 x 10 at 32 px (the cifar variant) on 2 CPU cores
    "cpu45": {"per_class": 200, "test_per_class": 100, "val_fraction": 0.1,
              "model": {"variant": "cifar", "input_size": 32, "pretrained": True, "freeze_blocks": 14},
              "train": {"epochs": 5, "base_epochs": 10, "batch_size": 64}},
    # CIFAR-100 10 x 10 at 128 px, 100 images per class (80 train + 20 validation), 50 test
    "cifar128": {"data": "cifar100", "base": 10, "steps": 9, "per_class": 100, "test_per_class": 50,
                 "val_fraction": 0.2,
                 "model": {"variant": "imagenet", "input_size": 128, "pretrained": True, "freeze_blocks": 14},
                 "train": {"batch_size": 64}},
    # field-sized CIFAR-100: 10 base classes, then 20 steps of 2 classes, 50 images per class
    "cifar128-field": {"data": "cifar100", "classes": 50, "base": 10, "steps": 20, "per_class": 50,
                       "test_per_class": 50, "val_fraction": 0.2,
                       "model": {"variant": "imagenet", "input_size": 128, "pretrained": True, "freeze_blocks": 14},
                       "train": {"batch_size": 64}},
    # the README demo's protocol (Fashion-MNIST, 4 base + 3 steps of 2, 200 images per class) with
    # a validation split, at the demo's model (32 px cifar variant)
    "fmnist-demo": {"data": "fashion-mnist", "base": 4, "steps": 3, "per_class": 200, "test_per_class": 200,
                    "val_fraction": 0.2,
                    "model": {"variant": "cifar", "input_size": 32, "pretrained": True, "freeze_blocks": 14},
                    "train": {"batch_size": 64}},
    # field-sized Fashion-MNIST: 2 base classes, then 4 steps of 2 classes, 50 images per class
    "fmnist-field": {"data": "fashion-mnist", "base": 2, "steps": 4, "per_class": 50, "test_per_class": 200,
                     "val_fraction": 0.2,
                     "model": {"variant": "cifar", "input_size": 32, "pretrained": True, "freeze_blocks": 14},
                     "train": {"batch_size": 64}},
    # The field scenario (issue 21): the base classes with all their training images, then
    # 2-class steps whose classes have a few dozen (--new-per-class 10, 25, 50; 25 here);
    # --per-class N gives every class N instead (the same protocol, balanced). Validation:
    # 10 images of every class, held out before the training images are taken.
    "cifar128-field-full": {"data": "cifar100", "classes": 50, "base": 10, "steps": 20, "per_class": None,
                            "new_per_class": 25, "val_per_class": 10, "test_per_class": None,
                            "model": {"variant": "imagenet", "input_size": 128, "pretrained": True,
                                      "freeze_blocks": 14},
                            "train": {"batch_size": 64}},
    # Fashion-MNIST: 4 base classes with all 6,000 training images (less validation), then
    # 3 steps of 2 classes, at the demo's model (32 px cifar variant); 300 test images per class
    "fmnist-field-full": {"data": "fashion-mnist", "base": 4, "steps": 3, "per_class": None, "new_per_class": 25,
                          "val_per_class": 10, "test_per_class": 300,
                          "model": {"variant": "cifar", "input_size": 32, "pretrained": True, "freeze_blocks": 14},
                          "train": {"batch_size": 64}},
    # the 128 px setting with all 500 images per class, for a GPU
    "gpu": {"per_class": 500, "test_per_class": 100, "val_fraction": 0.1,
            "model": {"variant": "imagenet", "input_size": 128, "pretrained": True, "freeze_blocks": 14},
            "train": {"epochs": 6, "base_epochs": 10, "batch_size": 64, "device": "cuda"}},
}
PROTOCOL_DEFAULTS = {"data": "cifar100", "base": 10, "steps": 9, "classes": None}



def joint_step(student: Student, seen: ImageSet, n_new: int, cfg: RunConfig, step: int,
               z: torch.Tensor | None = None):
    """The upper bound: widen the head, then cross-entropy over all seen classes on ALL the
    data seen so far (it stores data: benchmark only, injected into protocol.Order). With a
    statistics head (joint+lda, ...), every class's statistics are then formed anew from all
    its images under the retrained top: the best features and head, with every image kept."""
    torch.manual_seed(cfg.train.seed + 1000 * step)
    student.widen(n_new, cfg.train.new_head_init)
    report = train_step(student, make_method("finetune", LossConfig(lc_span="all")), seen, n_old=0,
                        epochs=cfg.train.epochs, cfg=cfg, teacher=None, step=step, z=z)
    if student.stats is not None:
        student.stats = ClassStats(student.stats.dim, student.num_classes).to(student.stats.gram.device)
        report.classifier.update(fit_classifier(student, seen, list(range(student.num_classes)), cfg, z))
    return report


# ---------------------------------------------------------------------------- sweep

def sweep_candidates(keys: set[str], best: dict, stage: dict[str, list]) -> list[dict]:
    """One key of `stage` changed at a time around `best` (keys the row does not use skipped)."""
    return [{**best, k: v} for k in stage if k in keys for v in stage[k] if best.get(k, _UNSET) != v]


_UNSET = object()


def trial_key(cfg: RunConfig, row: Row, settings: dict) -> str:
    """What a setting means for this row: the effective value of every key it uses, so that
    two spellings of one configuration are one trial."""
    c = row_config(cfg, row, settings)
    values = {k: getattr(getattr(c, s), k) for k in sorted(row_uses(row))
              for s in ("model", "loss", "train") if k in _FIELDS[s]}
    return json.dumps(values, sort_keys=True)


def parse_grid(spec: str) -> dict[str, list]:
    """--sweep-grid 'lr=0.003,0.03;beta=0.5,2' -> {key: values}: the values a sweep tries for
    a key instead of SWEEP_STAGES' (the key keeps its stage). Each value is parsed as the
    config field's type and checked by the config's own validator."""
    from fieldlearn.device.protocol import apply_settings  # noqa: PLC0415

    out: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, eq, values = part.partition("=")
        key = key.strip()
        if not eq or key not in SETTING_KEYS:
            raise UserError(f"--sweep-grid {part!r}: expected KEY=V1,V2 with KEY one of {', '.join(sorted(SETTING_KEYS))}")
        default = next(getattr(sec(), key) for name, sec in (("model", ModelConfig), ("loss", LossConfig),
                                                               ("train", TrainConfig)) if key in _FIELDS[name])
        kind = type(default)
        bools = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        try:
            vals = [bools[v.strip().lower()] if kind is bool else kind(v.strip())
                    for v in values.split(",") if v.strip()]
            for v in vals:
                validate_config(apply_settings(RunConfig(), {key: v}))
        except KeyError as e:
            raise UserError(f"--sweep-grid {part!r}: {e} is not true or false") from None
        except (TypeError, ValueError, UserError) as e:
            raise UserError(f"--sweep-grid {part!r}: {e}") from None
        if not vals:
            raise UserError(f"--sweep-grid {part!r}: no values")
        out[key] = vals
    return out


def with_grid(grid: dict[str, list], stages: list[dict[str, list]] = SWEEP_STAGES) -> list[dict[str, list]]:
    """SWEEP_STAGES with the values of `grid`'s keys replaced."""
    return [{k: grid.get(k, v) for k, v in stage.items()} for stage in stages]


def sweep(orders: list[Order], row: Row, start: dict, keys: set[str] | None = None,
          stages: list[dict[str, list]] = SWEEP_STAGES) -> tuple[dict, list[dict], list[MethodResult]]:
    """Staged search over `stages`, scored by validation average incremental accuracy
    averaged over the class orders. Returns (best settings, every trial, the best setting's
    run per order)."""
    uses = row_uses(row) & (keys if keys is not None else row_uses(row))
    cfg = orders[0].cfg
    tried: dict[str, tuple[dict, list[MethodResult]]] = {}

    def score(k: str) -> float:
        rs = tried[k][1]
        return float("-inf") if any(r.error for r in rs) else sum(r.val.average_incremental for r in rs) / len(rs)

    def trial(s: dict) -> str:
        k = trial_key(cfg, row, s)
        if k not in tried:
            tried[k] = (s, [o.run(row, s, tag=f" {_short(s, row)}") for o in orders])
        return k

    best = trial(dict(start))
    for stage in stages:
        for cand in sweep_candidates(uses, tried[best][0], stage):
            trial(cand)
        best = max(tried, key=score)
        orders[0].log(f"sweep {row.name}: best so far {_short(tried[best][0], row)} (val avg incr. {100 * score(best):.1f}%)")
    trials = [{"settings": s, "val_average_incremental": score(k),
               "test_average_incremental": sum(r.test.average_incremental for r in rs) / len(rs),
               "test_last": sum(r.test.last for r in rs) / len(rs),
               "seconds": sum(r.seconds for r in rs), "error": "; ".join(r.error for r in rs if r.error)}
              for k, (s, rs) in tried.items()]
    return tried[best][0], trials, tried[best][1]


def _short(s: dict, row: Row) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(s.items()) if k in row_uses(row))


# ---------------------------------------------------------------------------- summary and outputs

def mean_matrix(ms: list[AccuracyMatrix]) -> AccuracyMatrix:
    n = min(len(m.acc) for m in ms)
    out = AccuracyMatrix(group_sizes=ms[0].group_sizes)
    for t in range(n):
        out.add(sum(m.acc[t] for m in ms) / len(ms),
                [sum(m.rows[t][g] for m in ms) / len(ms) for g in range(t + 1)])
    return out


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mu = sum(xs) / len(xs)
    return (sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def summarize(orders: list[dict]) -> dict:
    out = {}
    for name in orders[0]["methods"]:
        runs = [o["methods"][name] for o in orders if name in o["methods"]]
        avg = [r["average_incremental"] for r in runs]
        last = [r["last"] for r in runs]
        out[name] = {"average_incremental": sum(avg) / len(avg), "average_incremental_std": _std(avg),
                     "last": sum(last) / len(last), "last_std": _std(last),
                     "forgetting": sum(r["forgetting"] for r in runs) / len(runs),
                     **{k: sum(r["test"].get(k, float("nan")) for r in runs) / len(runs)
                        for k in ("new_class", "old_class", "mean_ece")},
                     "val_average_incremental": sum(r["val"]["average_incremental"] for r in runs) / len(runs),
                     "seconds": sum(r["seconds"] for r in runs) / len(runs), "orders": len(runs),
                     "settings": [r["settings"] for r in runs], "stores_data": stores_data(name)}
        if stores_data(name):
            out[name]["note"] = JOINT_NOTE
    return out


def format_markdown(summary: dict, orders: list[dict], command: str) -> str:
    sizes = orders[0]["methods"][next(iter(orders[0]["methods"]))]["test"]["group_sizes"]
    seen = [sum(sizes[: t + 1]) for t in range(len(sizes))]
    n = len(orders)
    lines = [f"Accuracy (%) on all classes seen so far, test split, mean over {n} class order(s) "
             f"({', '.join(str(o['order_seed']) for o in orders)}). `ncm` and `analytic`: the pretrained "
             "network, nothing trained.", "",
             "| method | " + " | ".join(str(s) for s in seen) + " | avg incr. | last | new | old | ECE | forgetting "
             "| val avg incr. | wall s | settings |",
             "|---" * (len(seen) + 10) + "|"]
    for name, s in summary.items():
        ms = [AccuracyMatrix.from_dict(o["methods"][name]["test"]) for o in orders if name in o["methods"]]
        m = mean_matrix(ms)
        pm = f" ± {100 * s['average_incremental_std']:.1f}" if n > 1 else ""
        label = f"{name} ({JOINT_NOTE})" if stores_data(name) else name
        row = parse_row(name)
        sett = "; ".join(sorted({_short(x, row) for x in s["settings"]}))
        lines.append(f"| {label} | " + " | ".join(f"{100 * a:.1f}" for a in m.acc)
                     + (" | —" * (len(seen) - len(m.acc)))
                     + f" | {100 * s['average_incremental']:.1f}{pm} | {100 * s['last']:.1f} "
                       f"| {_pct(s.get('new_class'))} | {_pct(s.get('old_class'))} | {_pct(s.get('mean_ece'))} "
                       f"| {100 * s['forgetting']:.1f} | {100 * s['val_average_incremental']:.1f} "
                       f"| {s['seconds']:.0f} | {sett} |")
    lines += ["", "new / old: accuracy on the classes a step added / on the classes known before it, mean over "
              "the increments; ECE: expected calibration error of the softmax (15 bins), mean over steps.",
              "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _machine() -> dict:
    d = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
         "torch_threads": torch.get_num_threads()}
    try:
        d["load_average"] = os.getloadavg()
    except OSError:
        pass
    return d


# ---------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="cifar100 (default: ../shared/data/cifar-100-binary), fashion-mnist, NAME:PATH, "
                        "or an ImageFolder root with train/ and val/ or test/")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="protocol and model: cifar128 (CIFAR-100 10x10, 128 px), cifar128-field (2-class steps, "
                        "50 images per class), fmnist-demo (the README demo's protocol), fmnist-field, cpu45 "
                        "(CIFAR-100 at 32 px), gpu; options given on the command line override it")
    p.add_argument("--base", type=option(int, Valid(1, 10_000)), default=None, help="base classes (default 10)")
    p.add_argument("--steps", type=option(int, Valid(0, 10_000)), default=None, help="increments after the base, splitting the remaining classes evenly "
                                                                 "(default 9: 10 steps of 10 classes on CIFAR-100)")
    p.add_argument("--classes", type=option(int, Valid(1, 100_000)), default=None,
                   help="use only the first N classes of each order (default: base + steps x step size = all)")
    p.add_argument("--order-seed", action="append", default=None,
                   help="class order seed; repeat or comma-separate for several orders (default 1993)")
    p.add_argument("--per-class", type=option(int, Valid(MIN_IMAGES, MAX_IMAGES)), default=None,
                   help="training images per class, before the validation hold-out")
    p.add_argument("--test-per-class", type=option(int, Valid(1, MAX_IMAGES)), default=None,
                   help="test images per class (default: all)")
    p.add_argument("--new-per-class", type=option(int, Valid(MIN_IMAGES, MAX_IMAGES)), default=None,
                   help="training images of each class after the base (the field: a few dozen; default: --per-class)")
    p.add_argument("--val-per-class", type=option(int, Valid(1, MAX_IMAGES)), default=None,
                   help="validation images held out of every class, the same count for each (instead of "
                        "--val-fraction)")
    p.add_argument("--val-fraction", type=option(float, Valid(0.0, 1.0, lo_open=True, hi_open=True)), default=None,
                   help="part of each class's training images held out for validation (default 0.1)")
    p.add_argument("--methods", default=",".join(DEFAULT_ROWS),
                   help="comma-separated rows: ncm, analytic (the pretrained network, nothing trained), METHOD "
                        "(linear head), METHOD+ncm, METHOD+analytic, none+analytic, joint "
                        f"(default {','.join(DEFAULT_ROWS)})")
    p.add_argument("--sweep", action="store_true",
                   help="choose each row's settings on validation (staged search), report test at those")
    p.add_argument("--sweep-keys", default=None,
                   help="comma-separated setting keys the sweep may vary (default: every key a row uses)")
    p.add_argument("--sweep-grid", default=None,
                   help="values a sweep tries instead of the built-in grid's, 'KEY=V1,V2;KEY=V1,V2' "
                        "(e.g. 'lr=0.003,0.03')")
    p.add_argument("--settings", type=Path, default=None,
                   help="results.json of an earlier --sweep: run each row at the settings it chose")
    p.add_argument("--out", type=Path, default=Path("bench-accuracy"), help="output directory")
    add_config_arguments(p, run_fields=("teacher_backend",))


def _resolve(args: argparse.Namespace) -> tuple[RunConfig, dict]:
    preset = PRESETS.get(args.preset or "", {})
    base = RunConfig(model=ModelConfig(**{"variant": "cifar", "input_size": 32, "freeze_blocks": 14,
                                          **preset.get("model", {})}),
                     train=TrainConfig(**{"progress": False, **preset.get("train", {})}))
    cfg = config_from_args(args, base=base)
    for key, default in PROTOCOL_DEFAULTS.items():     # the command line, else the preset, else the default
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))
    proto = {"per_class": args.per_class if args.per_class is not None else preset.get("per_class"),
             "test_per_class": args.test_per_class if args.test_per_class is not None else preset.get("test_per_class"),
             "val_fraction": args.val_fraction if args.val_fraction is not None else preset.get("val_fraction", 0.1),
             "new_per_class": args.new_per_class if args.new_per_class is not None else preset.get("new_per_class"),
             "val_per_class": args.val_per_class if args.val_per_class is not None else preset.get("val_per_class"),
             "base": args.base}
    if proto["new_per_class"] is not None and not proto["val_per_class"]:
        raise UserError("--new-per-class needs --val-per-class (a field protocol holds out a count per class)")
    if not 0 < proto["val_fraction"] < 1:
        raise UserError(f"--val-fraction {proto['val_fraction']}: must be between 0 and 1")
    return cfg, proto


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, rebuilt from the parsed options."""
    import shlex

    parts = ["fieldlearn", "bench", "accuracy"]
    for dest, value in vars(args).items():
        if dest == "bench_command" or value is None or value is False and "." not in dest:
            continue
        flag = "--" + dest.rpartition(".")[2].replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list) and dest == "order_seed":
            parts += [flag, ",".join(value)]
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _order_seeds(values: list[str] | None) -> list[int]:
    if not values:
        return [1993]
    try:
        seeds = [int(x) for v in values for x in v.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or not all(0 <= x < 2**32 for x in seeds):
        raise UserError(f"--order-seed {','.join(values)}: expected integers in [0, {2**32 - 1}]")
    return seeds


SETTING_KEYS = {k for stage in SWEEP_STAGES for k in stage}


def load_per_class(proto: dict) -> int | None:
    """The most training images per class any split of `proto` takes (None: all of them)."""
    if proto["per_class"] is None:
        return None
    n = max(proto["per_class"], proto.get("new_per_class") or 0)
    return n + (proto.get("val_per_class") or 0)


def order_splits(train_all: ImageSet, test_all: ImageSet, order_seed: int, used: int, proto: dict,
                 seed: int) -> tuple[ImageSet, ImageSet, ImageSet]:
    """One class order's (train, validation, test): classes renumbered in the order's sequence,
    the first `used` kept, proto's per_class / test_per_class images each, val_fraction of the
    training images held out. `seed` picks the images."""
    order = class_order(len(train_all.class_names), order_seed)
    test = test_all.reorder(order).select(list(range(used)), proto["test_per_class"], seed=seed)
    train_all = train_all.reorder(order)
    if proto.get("val_per_class"):          # the field protocols: a fixed count per class, balanced
        return (*field_split(train_all, used, proto["base"], proto["per_class"], proto.get("new_per_class"),
                             proto["val_per_class"], seed), test)
    train = train_all.select(list(range(used)), proto["per_class"], seed=seed)
    train, val = train.split(proto["val_fraction"], seed=seed)
    return train, val, test


def field_split(data: ImageSet, used: int, base: int, per_class: int | None, new_per_class: int | None,
                val_per_class: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, validation) as the field gives them: each of the first `used` classes first
    gives `val_per_class` validation images (the same count for every class, so validation
    scores classes, not images); then the `base` classes keep `per_class` training images
    (None: all the rest) and every later class `new_per_class` (None: per_class)."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in range(used):
        rows = (data.labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        n = per_class if c < base else (new_per_class if new_per_class is not None else per_class)
        if len(rows) < val_per_class + MIN_IMAGES:
            raise UserError(f"class {data.class_names[c]}: {len(rows)} images, fewer than --val-per-class "
                            f"{val_per_class} + {MIN_IMAGES}")
        val.append(rows[:val_per_class])
        train.append(rows[val_per_class:][: n])
    t, v = torch.cat(train).sort().values, torch.cat(val).sort().values
    return (ImageSet(data.images[t], data.labels[t], data.class_names),
            ImageSet(data.images[v], data.labels[v], data.class_names))


def run(args: argparse.Namespace) -> int:
    cfg, proto = _resolve(args)
    setup_torch(cfg)
    rows = [parse_row(m) for m in args.methods.split(",") if m.strip()]
    keys = None
    if args.sweep_keys:
        keys = {k.strip() for k in args.sweep_keys.split(",") if k.strip()}
        if keys - SETTING_KEYS:
            raise UserError(f"--sweep-keys: unknown {', '.join(sorted(keys - SETTING_KEYS))} "
                            f"(choose from {', '.join(sorted(SETTING_KEYS))})")
    if args.sweep_grid and not args.sweep:
        raise UserError("--sweep-grid: changes nothing without --sweep")
    stages = with_grid(parse_grid(args.sweep_grid)) if args.sweep_grid else SWEEP_STAGES
    chosen_from_file = {}
    if args.settings is not None:
        try:
            chosen_from_file = json.loads(read_regular_text(args.settings))["chosen"]
        except OSError as e:
            raise UserError(f"--settings {args.settings}: {e.strerror}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"--settings {args.settings}: not the results.json of a --sweep ({e})") from None
    for row in rows:   # every row's settings through the one validator, before any work
        try:
            settings = {**row_settings(row, args.preset), **dict(chosen_from_file.get(row.name, {}))}
            validate_config(row_config(cfg, row, settings), source=f"{args.settings or 'protocol.CHOSEN'} ({row.name})")
        except (TypeError, ValueError) as e:
            raise UserError(f"--settings {args.settings}: bad settings for {row.name} ({e})") from None
    seeds = _order_seeds(args.order_seed)
    command = _command(args)
    t_start = time.perf_counter()
    # an ImageFolder gives only the per-class sample the protocol takes, chosen before decoding
    train_all = open_dataset(args.data, "train", cfg.model.input_size, per_class=load_per_class(proto),
                             seed=cfg.train.seed)
    test_all = open_dataset(args.data, "test", cfg.model.input_size, per_class=proto["test_per_class"],
                            seed=cfg.train.seed)
    if test_all.class_names != train_all.class_names:
        test_all = test_all.relabel(train_all.class_names)
    n_classes = len(train_all.class_names) if args.classes is None else args.classes
    if not 0 < n_classes <= len(train_all.class_names):
        raise UserError(f"--classes {n_classes}: the data has {len(train_all.class_names)} classes")
    groups = incremental_split(list(range(n_classes)), args.base, args.steps)
    used = sum(len(g) for g in groups)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"bench accuracy: {args.data}, {args.base} base classes + {args.steps} steps of {len(groups[-1])}, "
        f"order seed(s) {seeds}, rows {', '.join(r.name for r in rows)}{' (sweep)' if args.sweep else ''}; "
        f"{torch.get_num_threads()} threads, load {_machine().get('load_average')}")
    report = {"benchmark": "accuracy", "fieldlearn_version": fieldlearn_version(), "git_commit": _git_commit(),
              "command": command, "data": args.data, "preset": args.preset, "sweep": args.sweep,
              "sweep_stages": stages if args.sweep else None, "sweep_keys": sorted(keys) if keys else None,
              "protocol": {"base": args.base, "steps": args.steps, **proto, "order_seeds": seeds},
              "config": cfg.to_dict(), "machine_start": _machine(), "orders": [], "chosen": {}}
    orders = []
    for seed in seeds:
        train, val, test = order_splits(train_all, test_all, seed, used, proto, cfg.train.seed)
        log(f"order {seed}: {len(train)} train, {len(val)} validation, {len(test)} test images")
        o = Order(cfg, train, val, test, groups, log=log, joint_step=joint_step)
        orders.append(o)
        report["orders"].append({
            "order_seed": seed, "class_order": [train.class_names[c] for c in range(used)],
            "groups": [[train.class_names[c] for c in g] for g in groups],
            "encode_seconds": o.encode_seconds, "methods": {}, "sweep": {}})
    # Options given on the command line override every row's settings.
    given = {dest.partition(".")[2]: v for dest, v in vars(args).items()
             if dest.partition(".")[0] in ("model", "loss", "train") and dest.partition(".")[2] in SETTING_KEYS}
    for row in rows:
        uses = row_uses(row)
        start = {**row_settings(row, args.preset), **chosen_from_file.get(row.name, {}), **{k: v for k, v in given.items() if k in uses}}
        if args.sweep:
            best, trials, results = sweep(orders, row, start, keys, stages)
            report["chosen"][row.name] = best
            report["orders"][0]["sweep"][row.name] = trials   # scored over all orders
        else:
            results = [o.run(row, start) for o in orders]
        for entry, o, res in zip(report["orders"], orders, results):
            entry["methods"][row.name] = res.to_dict()
            entry["base_seconds"] = {k: sec for k, (_, sec) in o.bases.items()}
            log(f"order {entry['order_seed']}: {row.name}{' (' + JOINT_NOTE + ')' if row.method == 'joint' else ''}: "
                f"avg incremental {100 * res.test.average_incremental:.1f}%, last {100 * res.test.last:.1f}% "
                f"[{res.seconds:.0f} s]")
        _write(args.out, report, command, t_start)   # partial results survive an interrupted run
    summary = _write(args.out, report, command, t_start)
    log("")
    log((args.out / "results.md").read_text())
    log(f"{time.perf_counter() - t_start:.0f} s in all; wrote {args.out}/results.json, results.md, accuracy.png")
    return 0 if summary else 1


def _write(out: Path, report: dict, command: str, t_start: float) -> dict:
    orders = [o for o in report["orders"] if o["methods"]]
    if not orders:
        return {}
    summary = summarize(orders)
    report["summary"] = summary
    report["seconds"] = time.perf_counter() - t_start
    report["machine_end"] = _machine()
    write_json(out / "results.json", report)
    (out / "results.md").write_text(format_markdown(summary, orders, command))
    curves = {}
    for name in summary:
        m = mean_matrix([AccuracyMatrix.from_dict(o["methods"][name]["test"]) for o in orders if name in o["methods"]])
        curves[f"{name} ({JOINT_NOTE})" if stores_data(name) else name] = m
    plot_accuracy(curves, out / "accuracy.png",
                  title=f"{report['data']}: {report['protocol']['base']} + {report['protocol']['steps']} steps, "
                        f"{len(orders)} order(s)")
    return summary
