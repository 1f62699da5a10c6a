"""`fieldlearn bench accuracy`: LwM next to its baselines and the joint upper bound, in one run.

For each class order: the base model (step 0) is trained once and copied to every method;
every method then learns the same increments from the same images, with its own settings,
and is evaluated after each step on all classes seen so far (test split) and on the
held-out part of the training data (validation split, used to choose settings).

    train images of a class -> split(val_fraction) -> train part | validation part
    frozen trunk, once per image for the whole run (train, val, test) -> z   [N, C_k, h', w']
    step 0: LC on the base classes (shared)   -> copy per method
    step t: learn_increment(method, z of the step's new-class train images)
            -> accuracy on val/test of all seen classes

The frozen-trunk activations of every image are kept in memory for the run: that is a
benchmark shortcut (it changes no number, the trunk never trains) and not something the
product does; `joint` is the upper bound that trains on all data seen so far. It stores
data, exists only here (joint_step below, never in fieldlearn.device.methods) and is
marked so in every output.

--sweep: for each method, run a small staged grid of settings on the same base model and
pick the one with the best validation average incremental accuracy; the test numbers of
the chosen settings are the result. The grid (SWEEP_STAGES) is documented in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fieldlearn.device.cli_config import add_config_arguments, config_from_args
from fieldlearn.device.commands.common import log, setup_torch, write_json
from fieldlearn.device.config import LossConfig, ModelConfig, RunConfig, TrainConfig, Valid
from fieldlearn.device.data import MAX_IMAGES, MIN_IMAGES, ImageSet, class_order, incremental_split, open_dataset
from fieldlearn.device.learner import encode, evaluate, learn_increment, train_step
from fieldlearn.device.methods import METHODS, make_method
from fieldlearn.device.metrics import AccuracyMatrix, plot_accuracy
from fieldlearn.device.model import Student, build_student
from fieldlearn.device.validate import option, validate_config
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import read_text as read_regular_text

ALL_METHODS = ["finetune", "lwf_mc", "lwm", "lc_lad", "joint"]
JOINT_NOTE = "stores data — upper bound, benchmark only"

# Settings a method runs with unless --sweep chooses them, --settings gives them, or the
# command line sets one of them for all methods (e.g. --lr 0.01); keys are LossConfig/TrainConfig
# fields: each method's choice on validation in the sweep recorded in benchmarks/README.md
# (CIFAR-100 10x10, orders 1993 and 1, 32x32 cifar variant; the 128x128 sweep chose the same).
METHOD_SETTINGS: dict[str, dict] = {
    "finetune": {"lc_span": "new", "lr": 0.02},
    "lwf_mc": {"lc_span": "new", "ld": "kd", "beta": 0.5, "lr": 0.02},
    "lwm": {"lc_span": "new", "ld": "kd", "beta": 0.5, "gamma": 1.0, "lr": 0.02},
    "lc_lad": {"lc_span": "new", "gamma": 0.5, "lr": 0.02},
    "joint": {"lr": 0.01},
}

# Staged sweep, kept small. Stage 1 crosses LC span and LD form; the later stages change
# one key at a time around the best setting so far. A method skips keys it does not use.
# LC span "all" is tried for fine-tuning only: with distillation it wipes the old classes
# out whatever the LD (the calibration: 22.7-23.6 vs 48-55 avg. incr. acc).
SWEEP_STAGES: list[dict[str, list]] = [
    {"lc_span": ["new"], "ld": ["bce", "kd"]},
    {"beta": [0.5, 2.0], "gamma": [0.5, 2.0]},
    {"lr": [0.005, 0.02]},
]
SETTING_KEYS = {"lc_span", "ld", "beta", "gamma", "lr"}
SWEEP_EXTRA = {"finetune": [{"lc_span": "all"}]}   # added to stage 1
USES = {"finetune": {"lc_span", "lr"}, "lwf_mc": {"lc_span", "ld", "beta", "lr"},
        "lwm": {"lc_span", "ld", "beta", "gamma", "lr"}, "lc_lad": {"lc_span", "gamma", "lr"}, "joint": {"lr"}}

# Presets: protocol size and model/training config. cpu45: measured in benchmarks/README.md
# to run the four non-joint methods x 10 steps of CIFAR-100 within 45 min on 2 cores.
PRESETS: dict[str, dict] = {
    "cpu45": {"per_class": 200, "test_per_class": 100, "val_fraction": 0.1,
              "model": {"variant": "cifar", "input_size": 32, "pretrained": True, "freeze_blocks": 14},
              "train": {"epochs": 5, "base_epochs": 10, "batch_size": 64}},
    # gpu: the 128x128 setting the GPU sweep ran (README), with all 500 images per class;
    # batch size kept at 64 so the swept learning rates still apply. Not yet run in full.
    "gpu": {"per_class": 500, "test_per_class": 100, "val_fraction": 0.1,
            "model": {"variant": "imagenet", "input_size": 128, "pretrained": True, "freeze_blocks": 14},
            "train": {"epochs": 6, "base_epochs": 10, "batch_size": 64, "device": "cuda"}},
}


# ---------------------------------------------------------------------------- settings

def apply_settings(cfg: RunConfig, settings: dict) -> RunConfig:
    """A copy of cfg with LossConfig/TrainConfig fields replaced by `settings`."""
    out = copy.deepcopy(cfg)
    loss_fields, train_fields = set(LossConfig.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    for k, v in settings.items():
        if k in loss_fields:
            setattr(out.loss, k, v)
        elif k in train_fields:
            setattr(out.train, k, v)
        else:
            raise UserError(f"setting {k!r} is not a LossConfig or TrainConfig field")
    return out


def sweep_candidates(method: str, best: dict, stage: dict[str, list]) -> list[dict]:
    """Settings to try in one stage: stage 1's keys crossed (plus SWEEP_EXTRA), later
    stages one key changed at a time around `best`."""
    keys = [k for k in stage if k in USES[method]]
    if stage is SWEEP_STAGES[0]:
        grid = [{}]
        for k in keys:
            grid = [{**g, k: v} for g in grid for v in stage[k]]
        return [{**best, **g} for g in grid + SWEEP_EXTRA.get(method, [])] if keys else []
    return [{**best, k: v} for k in keys for v in stage[k]]


# ---------------------------------------------------------------------------- data

@dataclass
class Split:
    """An ImageSet and (when the trunk is frozen) its trunk output, indexed by class."""
    data: ImageSet
    z: torch.Tensor | None

    def take(self, classes: list[int]) -> tuple[ImageSet, torch.Tensor | None]:
        idx = torch.isin(self.data.labels, torch.tensor(classes)).nonzero().flatten()
        return (ImageSet(self.data.images[idx], self.data.labels[idx], self.data.class_names),
                None if self.z is None else self.z[idx])


def _encode_split(student: Student, data: ImageSet, cfg: RunConfig, name: str) -> Split:
    if cfg.model.freeze_blocks == 0:
        return Split(data, None)
    t0 = time.perf_counter()
    chunks, step = [], 2048
    for i in range(0, len(data), step):
        chunks.append(encode(student, data.images[i: i + step], cfg))
        log(f"  encoding {name}: {min(i + step, len(data))}/{len(data)} images "
            f"({time.perf_counter() - t0:.0f} s)")
    return Split(data, torch.cat(chunks) if chunks else None)


# ---------------------------------------------------------------------------- the protocol

def joint_step(student: Student, seen: ImageSet, n_new: int, cfg: RunConfig, step: int,
               z: torch.Tensor | None = None):
    """The upper bound: widen the head, then cross-entropy over all seen classes on ALL the
    data seen so far (it stores data: benchmark only)."""
    torch.manual_seed(cfg.train.seed + 1000 * step)
    student.widen(n_new)
    return train_step(student, make_method("finetune", LossConfig(lc_span="all")), seen, n_old=0,
                      epochs=cfg.train.epochs, cfg=cfg, teacher=None, step=step, z=z)


@dataclass
class MethodResult:
    method: str
    settings: dict
    test: AccuracyMatrix
    val: AccuracyMatrix
    seconds: float = 0.0
    loss_terms: list[dict] = field(default_factory=list)
    error: str = ""

    def to_dict(self, cfg: RunConfig) -> dict:
        d = {"method": self.method, "settings": self.settings, "test": self.test.to_dict(),
             "val": self.val.to_dict(), "seconds": self.seconds, "loss_terms": self.loss_terms,
             "config": apply_settings(cfg, self.settings).to_dict(), "stores_data": self.method == "joint"}
        d.update({"accuracy": self.test.acc, "matrix": self.test.rows,
                  "average_incremental": self.test.average_incremental, "last": self.test.last,
                  "forgetting": self.test.forgetting})
        if self.method == "joint":
            d["note"] = JOINT_NOTE
        if self.error:
            d["error"] = self.error
        return d


class Protocol:
    """One class order: data split and encoded once, base trained once, then any number
    of (method, settings) runs from copies of the base."""

    def __init__(self, cfg: RunConfig, train: ImageSet, val: ImageSet, test: ImageSet,
                 groups: list[list[int]], log: Callable[[str], None] = log):
        self.cfg, self.groups, self.log = cfg, groups, log
        torch.manual_seed(cfg.train.seed)
        self.student = build_student(cfg.model, len(groups[0])).to(cfg.train.device)
        t0 = time.perf_counter()
        self.train = _encode_split(self.student, train, cfg, "train")
        self.val = _encode_split(self.student, val, cfg, "validation")
        self.test = _encode_split(self.student, test, cfg, "test")
        self.encode_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        data, z = self.train.take(groups[0])
        self.log(f"step 0: training the base model on {len(groups[0])} classes, {len(data)} images")
        train_step(self.student, make_method("finetune", cfg.loss), data, n_old=0, epochs=cfg.train.base_epochs,
                   cfg=cfg, teacher=None, step=0, lr=cfg.train.base_lr, z=z)
        self.base_seconds = time.perf_counter() - t0
        self.base_val = self._eval(self.student, self.val, 0)
        self.base_test = self._eval(self.student, self.test, 0)
        self.log(f"step 0: base accuracy test {100 * self.base_test[0]:.1f}%, val {100 * self.base_val[0]:.1f}% "
                 f"(encode {self.encode_seconds:.0f} s, base {self.base_seconds:.0f} s)")

    def _eval(self, st: Student, split: Split, t: int) -> tuple[float, list[float]]:
        data, z = split.take([c for g in self.groups[: t + 1] for c in g])
        return evaluate(st, data, self.groups[: t + 1], self.cfg, z)

    def run(self, method: str, settings: dict, tag: str = "") -> MethodResult:
        mcfg = apply_settings(self.cfg, settings)
        sizes = [len(g) for g in self.groups]
        res = MethodResult(method, dict(settings), AccuracyMatrix(sizes), AccuracyMatrix(sizes))
        res.test.add(*self.base_test)
        res.val.add(*self.base_val)
        st = copy.deepcopy(self.student)
        t0 = time.perf_counter()
        for t in range(1, len(self.groups)):
            ts = time.perf_counter()
            try:
                if method == "joint":
                    data, z = self.train.take([c for g in self.groups[: t + 1] for c in g])
                    rep = joint_step(st, data, len(self.groups[t]), mcfg, t, z)
                else:
                    data, z = self.train.take(self.groups[t])
                    rep = learn_increment(st, data, len(self.groups[t]), mcfg, step=t, method=method, z=z)
            except UserError as e:  # TrainingDiverged: record it, the other runs go on
                res.error = f"step {t}: {e}"
                self.log(f"step {t}: {method}{tag} failed: {e}")
                break
            res.loss_terms.append(rep.loss_terms)
            acc, per = self._eval(st, self.test, t)
            res.test.add(acc, per)
            res.val.add(*self._eval(st, self.val, t))
            old = per[:-1]
            self.log(f"step {t}/{len(self.groups) - 1}: {method + tag:<12} {sum(sizes[: t + 1]):>3} classes: "
                     f"test {100 * acc:5.1f}% (old {100 * sum(old) / len(old):5.1f}%, new {100 * per[-1]:5.1f}%), "
                     f"val {100 * res.val.acc[-1]:5.1f}% [{time.perf_counter() - ts:.0f} s]")
        res.seconds = time.perf_counter() - t0
        return res


def sweep(protos: list[Protocol], method: str, start: dict) -> tuple[dict, list[dict], list[MethodResult]]:
    """Staged grid, scored by validation average incremental accuracy averaged over the
    class orders. Returns (best settings, every trial, the best setting's run per order)."""
    tried: dict[str, list[MethodResult]] = {}
    best = dict(start)

    def key(s: dict) -> str:
        return json.dumps(s, sort_keys=True)

    def score(rs: list[MethodResult]) -> float:
        if any(r.error for r in rs):
            return float("-inf")
        return sum(r.val.average_incremental for r in rs) / len(rs)

    def trial(s: dict) -> None:
        if key(s) not in tried:
            tried[key(s)] = [p.run(method, s, tag=f" {_short(s, method)}") for p in protos]

    trial(best)
    for stage in SWEEP_STAGES:
        for cand in sweep_candidates(method, best, stage):
            trial(cand)
        best = max((json.loads(k) for k in tried), key=lambda s: score(tried[key(s)]))
        protos[0].log(f"sweep {method}: best so far {_short(best, method)} "
                      f"(val avg incr. {100 * score(tried[key(best)]):.1f}%)")
    trials = [{"settings": rs[0].settings, "val_average_incremental": score(rs),
               "test_average_incremental": sum(r.test.average_incremental for r in rs) / len(rs),
               "test_last": sum(r.test.last for r in rs) / len(rs),
               "seconds": sum(r.seconds for r in rs), "error": "; ".join(r.error for r in rs if r.error)}
              for rs in tried.values()]
    return best, trials, tried[key(best)]


def _short(s: dict, method: str) -> str:
    return ",".join(f"{k}={v}" for k, v in s.items() if k in USES[method])


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
                     "val_average_incremental": sum(r["val"]["average_incremental"] for r in runs) / len(runs),
                     "seconds": sum(r["seconds"] for r in runs) / len(runs), "orders": len(runs),
                     "settings": [r["settings"] for r in runs], "stores_data": name == "joint"}
        if name == "joint":
            out[name]["note"] = JOINT_NOTE
    return out


def format_markdown(summary: dict, orders: list[dict], command: str) -> str:
    sizes = orders[0]["methods"][next(iter(orders[0]["methods"]))]["test"]["group_sizes"]
    seen = [sum(sizes[: t + 1]) for t in range(len(sizes))]
    n = len(orders)
    lines = [f"Accuracy (%) on all classes seen so far, test split, mean over {n} class order(s) "
             f"({', '.join(str(o['order_seed']) for o in orders)}).", "",
             "| method | " + " | ".join(str(s) for s in seen) + " | avg incr. | last | forgetting | val avg incr. "
             "| wall s | settings |",
             "|---" * (len(seen) + 7) + "|"]
    for name, s in summary.items():
        ms = [AccuracyMatrix.from_dict(o["methods"][name]["test"]) for o in orders if name in o["methods"]]
        m = mean_matrix(ms)
        pm = f" ± {100 * s['average_incremental_std']:.1f}" if n > 1 else ""
        label = f"{name} ({JOINT_NOTE})" if name == "joint" else name
        sett = "; ".join(sorted({_short(x, name) for x in s["settings"]}))
        lines.append(f"| {label} | " + " | ".join(f"{100 * a:.1f}" for a in m.acc)
                     + (" | —" * (len(seen) - len(m.acc)))
                     + f" | {100 * s['average_incremental']:.1f}{pm} | {100 * s['last']:.1f} "
                       f"| {100 * s['forgetting']:.1f} | {100 * s['val_average_incremental']:.1f} "
                       f"| {s['seconds']:.0f} | {sett} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fieldlearn")
    except PackageNotFoundError:
        return "unknown"


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
    p.add_argument("--data", default="cifar100",
                   help="cifar100 (default: ../shared/data/cifar-100-binary), fashion-mnist, NAME:PATH, "
                        "or an ImageFolder root with train/ and val/ or test/")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="cpu45: CIFAR-100 10x10 within 45 min on 2 CPU cores; gpu: larger, for a GPU")
    p.add_argument("--base", type=option(int, Valid(1, 10_000)), default=10, help="base classes (default 10)")
    p.add_argument("--steps", type=option(int, Valid(0, 10_000)), default=9, help="increments after the base, splitting the remaining classes evenly "
                                                                 "(default 9: 10 steps of 10 classes on CIFAR-100)")
    p.add_argument("--classes", type=option(int, Valid(1, 100_000)), default=None,
                   help="use only the first N classes of each order (default: base + steps x step size = all)")
    p.add_argument("--order-seed", action="append", default=None,
                   help="class order seed; repeat or comma-separate for several orders (default 1993)")
    p.add_argument("--per-class", type=option(int, Valid(MIN_IMAGES, MAX_IMAGES)), default=None,
                   help="training images per class, before the validation hold-out")
    p.add_argument("--test-per-class", type=option(int, Valid(1, MAX_IMAGES)), default=None,
                   help="test images per class (default: all)")
    p.add_argument("--val-fraction", type=option(float, Valid(0.0, 1.0, lo_open=True, hi_open=True)), default=None,
                   help="part of each class's training images held out for validation (default 0.1)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated (default {','.join(ALL_METHODS)})")
    p.add_argument("--sweep", action="store_true",
                   help="choose each method's settings on validation (staged grid), report test at those")
    p.add_argument("--settings", type=Path, default=None,
                   help="results.json of an earlier --sweep: run each method at the settings it chose")
    p.add_argument("--out", type=Path, default=Path("bench-accuracy"), help="output directory")
    add_config_arguments(p, run_fields=("teacher_backend",))


def _resolve(args: argparse.Namespace) -> tuple[RunConfig, dict]:
    preset = PRESETS.get(args.preset or "", {})
    base = RunConfig(model=ModelConfig(**{"variant": "cifar", "input_size": 32, "freeze_blocks": 14,
                                          **preset.get("model", {})}),
                     train=TrainConfig(**{"progress": False, **preset.get("train", {})}))
    cfg = config_from_args(args, base=base)
    proto = {"per_class": args.per_class if args.per_class is not None else preset.get("per_class"),
             "test_per_class": args.test_per_class if args.test_per_class is not None else preset.get("test_per_class"),
             "val_fraction": args.val_fraction if args.val_fraction is not None else preset.get("val_fraction", 0.1)}
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


def run(args: argparse.Namespace) -> int:
    cfg, proto = _resolve(args)
    setup_torch(cfg)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m != "joint"]
    if unknown:
        raise UserError(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(ALL_METHODS)})")
    chosen_from_file = {}
    if args.settings is not None:
        try:
            chosen_from_file = json.loads(read_regular_text(args.settings))["chosen"]
        except OSError as e:
            raise UserError(f"--settings {args.settings}: {e.strerror}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"--settings {args.settings}: not the results.json of a --sweep ({e})") from None
    for name in methods:   # every method's settings through the one validator, before any work
        try:
            settings = {**METHOD_SETTINGS[name], **dict(chosen_from_file.get(name, {}))}
            validate_config(apply_settings(cfg, settings), source=f"{args.settings or 'METHOD_SETTINGS'} ({name})")
        except (TypeError, ValueError) as e:
            raise UserError(f"--settings {args.settings}: bad settings for {name} ({e})") from None
    seeds = _order_seeds(args.order_seed)
    command = _command(args)
    t_start = time.perf_counter()
    train_all = open_dataset(args.data, "train", cfg.model.input_size)
    test_all = open_dataset(args.data, "test", cfg.model.input_size)
    if test_all.class_names != train_all.class_names:
        test_all = test_all.relabel(train_all.class_names)
    n_classes = len(train_all.class_names) if args.classes is None else args.classes
    if not 0 < n_classes <= len(train_all.class_names):
        raise UserError(f"--classes {n_classes}: the data has {len(train_all.class_names)} classes")
    groups = incremental_split(list(range(n_classes)), args.base, args.steps)
    used = sum(len(g) for g in groups)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"bench accuracy: {args.data}, {args.base} base classes + {args.steps} steps of {len(groups[-1])}, "
        f"order seed(s) {seeds}, methods {', '.join(methods)}{' (sweep)' if args.sweep else ''}; "
        f"{torch.get_num_threads()} threads, load {_machine().get('load_average')}")
    report = {"benchmark": "accuracy", "fieldlearn_version": _version(), "git_commit": _git_commit(),
              "command": command, "data": args.data, "preset": args.preset, "sweep": args.sweep,
              "sweep_stages": SWEEP_STAGES if args.sweep else None,
              "protocol": {"base": args.base, "steps": args.steps, **proto, "order_seeds": seeds},
              "config": cfg.to_dict(), "machine_start": _machine(), "orders": [], "chosen": {}}
    protos = []
    for seed in seeds:
        order = class_order(len(train_all.class_names), seed)
        train = train_all.reorder(order).select(list(range(used)), proto["per_class"], seed=cfg.train.seed)
        train, val = train.split(proto["val_fraction"], seed=cfg.train.seed)
        test = test_all.reorder(order).select(list(range(used)), proto["test_per_class"], seed=cfg.train.seed)
        log(f"order {seed}: {len(train)} train, {len(val)} validation, {len(test)} test images")
        p = Protocol(cfg, train, val, test, groups)
        protos.append(p)
        report["orders"].append({
            "order_seed": seed, "class_order": [train.class_names[c] for c in range(used)],
            "groups": [[train.class_names[c] for c in g] for g in groups],
            "encode_seconds": p.encode_seconds, "base_seconds": p.base_seconds,
            "base": {"test": p.base_test[0], "val": p.base_val[0]}, "methods": {}, "sweep": {}})
    # Loss/train options given on the command line override every method's settings.
    given = {dest.partition(".")[2]: v for dest, v in vars(args).items()
             if dest.partition(".")[0] in ("loss", "train") and dest.partition(".")[2] in SETTING_KEYS}
    for name in methods:
        start = {**METHOD_SETTINGS[name], **chosen_from_file.get(name, {}),
                 **{k: v for k, v in given.items() if k in USES[name]}}
        if args.sweep and name != "joint":
            best, trials, results = sweep(protos, name, start)
            report["chosen"][name] = best
            report["orders"][0]["sweep"][name] = trials   # scored over all orders
        else:
            results = [p.run(name, start) for p in protos]
        for entry, res in zip(report["orders"], results):
            entry["methods"][name] = res.to_dict(cfg)
            log(f"order {entry['order_seed']}: {name}{' (' + JOINT_NOTE + ')' if name == 'joint' else ''}: "
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
        curves[f"{name} ({JOINT_NOTE})" if name == "joint" else name] = m
    plot_accuracy(curves, out / "accuracy.png",
                  title=f"{report['data']}: {report['protocol']['base']} + {report['protocol']['steps']} steps, "
                        f"{len(orders)} order(s)")
    return summary
