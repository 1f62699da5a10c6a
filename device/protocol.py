"""The class-incremental protocol over a labelled dataset, shared by `fieldlearn demo` and
`fieldlearn bench accuracy`: rows (a way to learn increments + the classifier that
predicts), their settings, and one class order run end to end.

    Order(cfg, train, val, test, groups)     data split and encoded once (the trunk never trains)
    Order.run(row, settings)                 step 0 (base network, cached per base setting, with
                                             the row's classifier fitted), then every increment
                                             -> accuracy matrices on test and validation

Rows, named as results.json names them:

    ncm, analytic          the pretrained network, nothing trained: a classifier over the frozen
                           ImageNet features solved from class statistics (cosine nearest-class-
                           mean; ridge head). What a user gets for free.
    METHOD                 a learner with the paper's trained linear head (finetune, lwf_mc, lwm, lc_lad)
    METHOD+ncm, METHOD+analytic
                           the same learner predicting with a head solved from class statistics
                           (ModelConfig.classifier), old statistics carried along the drift
    none+CLASSIFIER        the base step adapts the features; increments train nothing and only
                           add statistics (features frozen after the base step)
    joint                  the upper bound on all data seen so far: it stores data, so its step
                           is injected by the benchmark (Order(joint_step=...)), never defined here

The frozen trunk's output of every image is kept in memory for the run: a shortcut of the
protocol (the trunk never trains, so it changes no number), not something the product does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fieldlearn.device.config import LossConfig, ModelConfig, RunConfig, TrainConfig
from fieldlearn.device.data import ImageSet
from fieldlearn.device.learner import (calibration_rows, classifier_features, encode, fit_classifier, learn_increment,
                                      predict_logits, score, train_step)
from fieldlearn.device.methods import METHODS, make_method
from fieldlearn.device.metrics import AccuracyMatrix, expected_calibration_error
from fieldlearn.device.model import Student, build_student
from fieldlearn.runtime.errors import UserError

JOINT_NOTE = "stores data — upper bound, benchmark only"


def stores_data(row_name: str) -> bool:
    """True for the joint rows (joint, joint+CLASSIFIER): they keep every image seen."""
    return row_name.partition("+")[0] == "joint"


CLASSIFIERS = ("linear", "ncm", "analytic", "lda")
PRETRAINED_ROWS = ("ncm", "analytic", "lda")   # the pretrained network, nothing trained


@dataclass(frozen=True)
class Row:
    """One line of the table: a way to learn increments and the classifier that predicts."""
    name: str
    method: str                  # a fieldlearn.device.methods name, or "joint"
    classifier: str = "linear"
    pretrained_only: bool = False   # ncm / analytic: no base training, frozen ImageNet features

    @property
    def kind(self) -> str:
        return "stats" if self.classifier != "linear" else "linear"


def parse_row(spec: str) -> Row:
    """'ncm', 'analytic', 'lda', 'METHOD', 'METHOD+CLASSIFIER', 'joint', 'joint+CLASSIFIER' -> Row."""
    spec = spec.strip()
    if spec in PRETRAINED_ROWS:
        return Row(spec, "none", spec, pretrained_only=True)
    method, _, classifier = spec.partition("+")
    classifier = classifier or "linear"
    if method != "joint" and method not in METHODS or classifier not in CLASSIFIERS:
        raise UserError(f"--methods: unknown row {spec!r} (ncm, analytic, lda, joint[+CLASSIFIER], or "
                        f"METHOD[+ncm|+analytic|+lda] with METHOD one of {', '.join(METHODS)})")
    if method == "none" and classifier == "linear":
        raise UserError(f"--methods {spec}: method 'none' trains nothing; give it a classifier (none+analytic)")
    return Row(spec if classifier != "linear" else method, method, classifier)


# The plain-PyTorch reimplementation's settings for CIFAR's linear rows (issue 22), which each
# protocol's sweep started from: 15 base epochs at lr 0.01, 6 per increment, LC over the new
# classes, torch's init for new rows, no clipping (and KD at T = 2 where there is KD).
_CIFAR_LINEAR = {"base_epochs": 15, "base_lr": 0.01, "epochs": 6, "lc_span": "new", "new_head_init": "default",
                 "max_grad_norm": 0.0}

# Settings each row runs with, on top of the config defaults, unless the benchmark's --sweep
# chooses them, --settings gives them, or the command line sets one for every row. By
# protocol (a benchmark preset's name), then row name (a row without an entry takes its
# method's); a protocol's own entry replaces the "*" entry, which holds choices made on one
# protocol and carried to the others (benchmarks/README.md says where each was chosen). Each
# key names a config field, whose range and help config.py owns. The product's default
# learner (default_row) has none: it runs at config.py's defaults, its sweep's choices.
CHOSEN: dict[str, dict[str, dict]] = {
    "*": {
        "analytic": {"ridge": 0.0},     # GCV won the ridge sweep on validation (benchmarks/results/fmnist-sweep)
        # the linear-head rows: lr 0.02 diverges on the base network's features (norm ~34); a
        # small lr with LC over all classes won on validation (benchmarks/README.md#linear-head-rows)
        "finetune": {"lc_span": "all", "lr": 0.003},
        "lwf_mc": {"lc_span": "all", "ld": "kd", "beta": 0.5, "lr": 0.003},
        "lwm": {"lc_span": "all", "ld": "kd", "beta": 0.5, "gamma": 1.0, "lr": 0.003},
        "lc_lad": {"lc_span": "new", "gamma": 0.5, "lr": 0.02},
        # LwM with the statistics head: training only the top's last block (the 1x1 conv) in
        # increments drifts the old classes' features least and won on validation; drift_shrink
        # and gamma hardly mattered (benchmarks/results/fmnist-lwm-sweep)
        "lwm+analytic": {"increment_blocks": 1, "drift_shrink": 0.1, "gamma": 2.0},
        "joint": {"lr": 0.01},
    },
    # CIFAR-100 10 x 10 at 128 px: the plain-PyTorch reimplementation's settings
    # (15 base epochs, lr 0.01, LC over the new classes, BatchNorm in train mode, torch's init
    # for new rows, no clipping, KD T = 2), then lr and beta (and gamma) swept on validation
    # (order 1993; benchmarks/results/cifar128-linear-sweep-*)
    "cifar128": {
        "lwm": {**_CIFAR_LINEAR, "ld": "kd", "temperature": 2.0, "beta": 0.5, "gamma": 1.0, "lr": 0.01,
                "freeze_bn_in_increments": False},
        "lwf_mc": {**_CIFAR_LINEAR, "ld": "kd", "temperature": 2.0, "beta": 2.0, "lr": 0.003,
                   "freeze_bn_in_increments": False},
        "finetune": {**_CIFAR_LINEAR, "lr": 0.01, "freeze_bn_in_increments": False},
        # lr only, on one order (0.003 / 0.01; 0.03 stopped after its first increment): cifar128-lclad-sweep
        "lc_lad": {**_CIFAR_LINEAR, "gamma": 1.0, "lr": 0.01, "freeze_bn_in_increments": False},
    },
    # the demo's protocol: the linear rows, staged sweeps on validation (order 1993): LC over
    # the new classes, a small lr, torch's init for the new rows, a light KD (and LAD)
    # (benchmarks/results/fmnist-demo-linear-sweep*; benchmarks/README.md#the-papers-lwm-with-its-linear-head-issue-22)
    "fmnist-demo": {
        "lwm": {"lc_span": "new", "ld": "kd", "beta": 0.5, "gamma": 0.5, "lr": 0.001, "new_head_init": "default"},
        "lwf_mc": {"lc_span": "new", "ld": "kd", "beta": 0.5, "lr": 0.001, "new_head_init": "default"},
        "finetune": {"lc_span": "new", "lr": 0.0003, "new_head_init": "default"},
        "lc_lad": {"lc_span": "new", "gamma": 0.5, "lr": 0.003, "new_head_init": "default"},
    },
    # field-sized CIFAR: each linear row's lr and BN mode (and beta or gamma) swept from CIFAR
    # 10 x 10's settings (benchmarks/results/cifar128-field-*-sweep); no setting tried learns
    # the new classes, so every choice is the one that keeps the old ones
    "cifar128-field": {
        "lwm": {**_CIFAR_LINEAR, "ld": "kd", "temperature": 2.0, "beta": 0.5, "gamma": 1.0, "lr": 0.001,
                "freeze_bn_in_increments": True},
        "lwf_mc": {**_CIFAR_LINEAR, "ld": "kd", "temperature": 2.0, "beta": 2.0, "lr": 0.0003,
                   "freeze_bn_in_increments": True},
        "finetune": {**_CIFAR_LINEAR, "lr": 0.0003, "freeze_bn_in_increments": True},
        "lc_lad": {**_CIFAR_LINEAR, "gamma": 1.0, "lr": 0.0003, "freeze_bn_in_increments": True},
    },
    # field-sized Fashion-MNIST: each linear row's lr, then beta / gamma and the LC span, around
    # the demo's choice (benchmarks/results/fmnist-field-*-sweep)
    "fmnist-field": {
        "lwm": {"lc_span": "new", "ld": "kd", "beta": 0.5, "gamma": 0.5, "lr": 0.003, "new_head_init": "default"},
        "lwf_mc": {"lc_span": "new", "ld": "kd", "beta": 2.0, "lr": 0.001, "new_head_init": "default"},
        "finetune": {"lc_span": "new", "lr": 0.001, "new_head_init": "default"},
        "lc_lad": {"lc_span": "new", "gamma": 0.5, "lr": 0.001, "new_head_init": "default"},
    },
}


def row_settings(row: Row, protocol: str | None = None) -> dict:
    """The settings a row starts from on `protocol` (a preset name; None: the "*" choices),
    before --settings, the command line and --sweep."""
    def pick(table: dict[str, dict]) -> dict | None:
        return table.get(row.name, table.get(row.method) if row.kind == "linear" else None)

    own = pick(CHOSEN.get(protocol, {})) if protocol else None
    return dict(own if own is not None else pick(CHOSEN["*"]) or {})


def default_row(cfg: RunConfig) -> str:
    """The row name of what `fieldlearn learn` does with cfg (e.g. 'lwm+analytic')."""
    return cfg.method if cfg.model.classifier == "linear" else f"{cfg.method}+{cfg.model.classifier}"


# Settings that change the base network (step 0): rows that agree on them share one.
BASE_KEYS = ("base_lr", "base_epochs", "dropout")
TRAIN_KEYS = ("lr", "epochs", "freeze_bn_in_increments", "increment_blocks", "new_head_init", "max_grad_norm",
              "momentum", "weight_decay", "augment", "checkpoint_top")
LOSS_KEYS = {"finetune": ("lc_span",), "lwf_mc": ("lc_span", "ld", "beta", "temperature"),
             "lwm": ("lc_span", "ld", "beta", "gamma", "temperature"),
             "lc_lad": ("lc_span", "gamma"), "none": (), "joint": ()}


def fixed_features(row: Row) -> bool:
    """True when nothing the row does after step 0 changes its classifier's input features
    (only the head solved from statistics changes)."""
    return row.kind == "stats" and (row.pretrained_only or (row.method != "joint" and not METHODS[row.method].trains))


def row_uses(row: Row) -> set[str]:
    """The config keys this row reads: those that can change its result (what a sweep may
    vary) or only its cost (checkpoint_top, teacher_backend). `learn` names the ones given
    that its row does not read (ignored_in_increment)."""
    head = {"analytic": {"ridge"}, "lda": {"shrink"}}.get(row.classifier, set())
    if row.kind == "stats":
        head = head | {"temperature_recency"}
    if row.pretrained_only:
        return head
    keys = set(BASE_KEYS) | set(LOSS_KEYS[row.method])
    if row.method == "joint":
        keys |= {"lr", "epochs"}
    elif METHODS[row.method].trains:
        keys |= set(TRAIN_KEYS)
    if row.kind == "stats":
        keys |= {"features"} | head
        if row.method not in ("none", "joint"):
            keys |= {"drift", "drift_shrink"}
    if row.method in METHODS and (METHODS[row.method].uses_teacher_logits or METHODS[row.method].uses_teacher_maps):
        keys |= {"teacher_backend"}
    return keys


def ignored_in_increment(cfg: RunConfig, keys: set[str]) -> tuple[list[str], list[str]]:
    """Of the config keys `keys` given for one increment (`fieldlearn learn`), those that change
    nothing in it: (keys some row uses but cfg's method and head do not, per row_uses; the base
    step's keys, which only `init` reads)."""
    used = row_uses(Row(default_row(cfg), cfg.method, cfg.model.classifier))
    some = set().union(*(row_uses(Row(m, m, c)) for m in METHODS for c in CLASSIFIERS))
    return sorted((keys & some) - used - set(BASE_KEYS)), sorted(keys & set(BASE_KEYS))


_FIELDS = {"model": set(ModelConfig.__dataclass_fields__), "loss": set(LossConfig.__dataclass_fields__),
           "train": set(TrainConfig.__dataclass_fields__)}


def apply_settings(cfg: RunConfig, settings: dict) -> RunConfig:
    """A copy of cfg with ModelConfig/LossConfig/TrainConfig fields replaced by `settings`."""
    out = copy.deepcopy(cfg)
    for k, v in settings.items():
        section = next((s for s, names in _FIELDS.items() if k in names), None)
        if section is None:
            raise UserError(f"setting {k!r} is not a ModelConfig, LossConfig or TrainConfig field")
        setattr(getattr(out, section), k, v)
    return out


def row_config(cfg: RunConfig, row: Row, settings: dict) -> RunConfig:
    """The RunConfig a row runs with: settings applied, its method and classifier set."""
    out = apply_settings(cfg, settings)
    out.method = row.method if row.method != "joint" else "finetune"
    out.model.classifier = row.classifier
    if row.pretrained_only:
        out.model.features = "frozen"
    return out



# ---------------------------------------------------------------------------- one class order

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
        print(f"  encoding {name}: {min(i + step, len(data))}/{len(data)} images "
            f"({time.perf_counter() - t0:.0f} s)")
    return Split(data, torch.cat(chunks) if chunks else None)


# ---------------------------------------------------------------------------- the protocol

@dataclass
class MethodResult:
    method: str
    settings: dict
    test: AccuracyMatrix
    val: AccuracyMatrix
    config: dict = field(default_factory=dict)
    seconds: float = 0.0
    loss_terms: list[dict] = field(default_factory=list)
    classifier: list[dict] = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict:
        d = {"method": self.method, "settings": self.settings, "test": self.test.to_dict(),
             "val": self.val.to_dict(), "seconds": self.seconds, "loss_terms": self.loss_terms,
             "classifier": self.classifier, "config": self.config, "stores_data": stores_data(self.method)}
        d.update({"accuracy": self.test.acc, "matrix": self.test.rows,
                  "average_incremental": self.test.average_incremental, "last": self.test.last,
                  "forgetting": self.test.forgetting})
        if stores_data(self.method):
            d["note"] = JOINT_NOTE
        if self.error:
            d["error"] = self.error
        return d


class Order:
    """One class order: data split and encoded once; base networks trained once per base
    setting (cached) and copied to every row that runs on them."""

    def __init__(self, cfg: RunConfig, train: ImageSet, val: ImageSet | None, test: ImageSet,
                 groups: list[list[int]], log: Callable[[str], None] = print, joint_step: Callable | None = None):
        self.cfg, self.groups, self.log, self.joint_step = cfg, groups, log, joint_step
        torch.manual_seed(cfg.train.seed)
        encoder = build_student(cfg.model, len(groups[0])).to(cfg.train.device)
        t0 = time.perf_counter()
        self.train = _encode_split(encoder, train, cfg, "train")
        self.val = _encode_split(encoder, val, cfg, "validation") if val is not None and len(val) else None
        self.test = _encode_split(encoder, test, cfg, "test")
        self.encode_seconds = time.perf_counter() - t0
        self.bases: dict[str, tuple[dict, float]] = {}   # base key -> (base weights, seconds)
        self.cache_features = True        # False: run the student on every evaluation (tests compare)

    def base(self, cfg: RunConfig) -> dict:
        """The trained base network's weights for cfg's base settings (trained on first use)."""
        calib = cfg.model.classifier != "linear"   # a statistics head: train_base holds its calibration rows out
        key = json.dumps({**{k: getattr(cfg.train, k, None) if k != "dropout" else cfg.model.dropout
                             for k in BASE_KEYS}, "calibration_held_out": calib}, sort_keys=True)
        if key not in self.bases:
            t0 = time.perf_counter()
            lin = dataclasses.replace(cfg.model, classifier="linear")
            torch.manual_seed(cfg.train.seed)
            st = build_student(lin, len(self.groups[0])).to(cfg.train.device)
            data, z = self.train.take(self.groups[0])
            if calib:
                fit = ~calibration_rows(data, cfg.train.seed)
                data, z = data.subset(fit), (z[fit] if z is not None else None)
            self.log(f"step 0: training the base network on {len(self.groups[0])} classes, {len(data)} images ({key})")
            train_step(st, make_method("finetune", cfg.loss), data, n_old=0, epochs=cfg.train.base_epochs, cfg=cfg,
                       teacher=None, step=0, lr=cfg.train.base_lr, z=z)
            self.bases[key] = ({k: v.clone() for k, v in st.state_dict().items()}, time.perf_counter() - t0)
        return self.bases[key][0]

    def student_for(self, row: Row, cfg: RunConfig) -> Student:
        """Step 0 of a row: the base network (or the pretrained one) with its classifier fitted."""
        torch.manual_seed(cfg.train.seed)
        st = build_student(cfg.model, len(self.groups[0])).to(cfg.train.device)
        if not row.pretrained_only:
            missing = st.load_state_dict(self.base(cfg), strict=False).missing_keys
            assert all(k.split(".")[0] in ("frozen_top", "stats", "classifier") for k in missing), missing
        data, z = self.train.take(self.groups[0])
        calib = None if row.pretrained_only else calibration_rows(data, cfg.train.seed)   # as train_base does
        fit_classifier(st, data, list(range(len(self.groups[0]))), cfg, z, calib)
        return st.eval()

    def _eval(self, st: Student, split: Split | None, t: int, cfg: RunConfig,
              phis: dict[str, torch.Tensor] | None = None) -> tuple[float, list[float], float]:
        """(accuracy, accuracy per step's classes, expected calibration error) on the classes
        of steps 0..t. phis: where the row's features never change after step 0, the split's
        classifier inputs, computed once and reused at every step (only the solved head
        changes); None: the student runs on the split every step."""
        if split is None:                     # no validation split (fieldlearn demo)
            return float("nan"), [float("nan")] * (t + 1), float("nan")
        classes = [c for g in self.groups[: t + 1] for c in g]
        if phis is None or split.z is None:
            data, z = split.take(classes)
            logits, labels = predict_logits(st, data.images, cfg, z).cpu(), data.labels
        else:
            key = "test" if split is self.test else "val"
            if key not in phis:
                phis[key] = classifier_features(st, split.data, cfg, split.z)                 # [N, D]
            idx = torch.isin(split.data.labels, torch.tensor(classes)).nonzero().flatten()
            with torch.no_grad():
                logits = st.classifier(phis[key][idx].to(st.classifier.weight.dtype)).cpu()   # [n, K]
            labels = split.data.labels[idx]
        acc, per = score(logits.argmax(1), labels, self.groups[: t + 1])
        return acc, per, expected_calibration_error(logits.double().softmax(1), labels)

    def run(self, row: Row, settings: dict, tag: str = "") -> MethodResult:
        cfg = row_config(self.cfg, row, settings)
        sizes = [len(g) for g in self.groups]
        res = MethodResult(row.name, dict(settings), AccuracyMatrix(sizes), AccuracyMatrix(sizes), config=cfg.to_dict())
        t0 = time.perf_counter()
        st = self.student_for(row, cfg)
        # features fixed after step 0 (pretrained rows, method none): evaluate from cached phi
        phis = {} if fixed_features(row) and self.cache_features else None
        res.test.add(*self._eval(st, self.test, 0, cfg, phis))
        res.val.add(*self._eval(st, self.val, 0, cfg, phis))
        for t in range(1, len(self.groups)):
            ts = time.perf_counter()
            try:
                if row.method == "joint":
                    if self.joint_step is None:
                        raise ValueError("the joint row needs the benchmark's joint_step")
                    data, z = self.train.take([c for g in self.groups[: t + 1] for c in g])
                    rep = self.joint_step(st, data, len(self.groups[t]), cfg, t, z)
                else:
                    data, z = self.train.take(self.groups[t])
                    rep = learn_increment(st, data, len(self.groups[t]), cfg, step=t, method=row.method, z=z)
            except UserError as e:  # TrainingDiverged: record it, the other runs go on
                res.error = f"step {t}: {e}"
                self.log(f"step {t}: {row.name}{tag} failed: {e}")
                break
            res.loss_terms.append(rep.loss_terms)
            res.classifier.append(rep.classifier)
            acc, per, ece = self._eval(st, self.test, t, cfg, phis)
            res.test.add(acc, per, ece)
            res.val.add(*self._eval(st, self.val, t, cfg, phis))
            old = per[:-1]
            self.log(f"step {t}/{len(self.groups) - 1}: {row.name + tag:<16} {sum(sizes[: t + 1]):>3} classes: "
                     f"test {100 * acc:5.1f}% (old {100 * sum(old) / len(old):5.1f}%, new {100 * per[-1]:5.1f}%, "
                     f"ECE {100 * ece:4.1f}%)"
                     + (f", val {100 * res.val.acc[-1]:5.1f}%" if self.val is not None else "")   # demo: no val split
                     + f" [{time.perf_counter() - ts:.0f} s]")
        res.seconds = time.perf_counter() - t0
        return res
