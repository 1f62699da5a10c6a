"""The class-incremental protocol on a labelled dataset: base training once, then the same
increments for each method, evaluating on all seen classes after every step.

Used by `fieldlearn demo` and the accuracy benchmark. Step 0 is trained once and shared
by every method; the frozen trunk is the same for all of them, so the test images are
encoded once and their trunk activations are kept in memory for the whole run.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fieldlearn.device.config import RunConfig
from fieldlearn.device.data import ImageSet
from fieldlearn.device.learner import StepReport, encode, evaluate, learn_increment, train_base
from fieldlearn.device.metrics import AccuracyMatrix
from fieldlearn.device.model import Student, build_student


@dataclass
class MethodRun:
    method: str
    matrix: AccuracyMatrix
    reports: list[StepReport] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ProtocolResult:
    groups: list[list[int]]
    runs: dict[str, MethodRun]
    base_report: StepReport
    base_seconds: float


def _take(data: ImageSet, classes: list[int]) -> ImageSet:
    return data.select(classes)


def run_protocol(cfg: RunConfig, train: ImageSet, test: ImageSet, groups: list[list[int]], methods: list[str],
                 log: Callable[[str], None] = print, joint_step: Callable | None = None,
                 method_cfgs: dict[str, RunConfig] | None = None) -> ProtocolResult:
    """train/test labels must be 0..K-1 in class order (ImageSet.reorder); groups are
    consecutive ranges of those labels. `method_cfgs` overrides the config per method.
    `joint_step(student, seen_train, n_new, cfg, step)` trains the benchmark's joint upper bound."""
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg.model, len(groups[0])).to(cfg.train.device)
    t0 = time.perf_counter()
    base_report = train_base(student, _take(train, groups[0]), cfg)
    base_seconds = time.perf_counter() - t0

    seen_test = [_take(test, g) for g in groups]
    test_z = [encode(student, s.images, cfg) if cfg.model.freeze_blocks > 0 else None for s in seen_test]

    def eval_upto(st: Student, t: int) -> tuple[float, list[float]]:
        data = ImageSet(torch.cat([s.images for s in seen_test[: t + 1]]),
                        torch.cat([s.labels for s in seen_test[: t + 1]]), test.class_names)
        z = torch.cat(test_z[: t + 1]) if test_z[0] is not None else None
        return evaluate(st, data, groups[: t + 1], cfg, z)

    base_acc = eval_upto(student, 0)
    log(f"step 0: {len(groups[0])} base classes, accuracy {100 * base_acc[0]:.1f}% "
        f"({base_seconds:.1f} s)")
    runs: dict[str, MethodRun] = {}
    for name in methods:
        mcfg = (method_cfgs or {}).get(name, cfg)
        st = copy.deepcopy(student)
        run = MethodRun(name, AccuracyMatrix(group_sizes=[len(g) for g in groups]))
        run.matrix.add(*base_acc)
        t_method = time.perf_counter()
        for t in range(1, len(groups)):
            data = _take(train, groups[t])
            if name == "joint":
                seen = _take(train, [c for g in groups[: t + 1] for c in g])
                rep = joint_step(st, seen, len(groups[t]), mcfg, t)
            else:
                rep = learn_increment(st, data, len(groups[t]), mcfg, step=t, method=name)
            run.reports.append(rep)
            acc, per = eval_upto(st, t)
            run.matrix.add(acc, per)
            log(f"step {t}: {name:<8} {sum(map(len, groups[: t + 1])):>3} classes, accuracy {100 * acc:5.1f}% "
                f"(old {100 * _old(per):5.1f}%, new {100 * per[-1]:5.1f}%) "
                f"[{sum(rep.seconds.values()):.1f} s]")
        run.seconds = time.perf_counter() - t_method
        runs[name] = run
    return ProtocolResult(groups=groups, runs=runs, base_report=base_report, base_seconds=base_seconds)


def _old(per: list[float]) -> float:
    old = per[:-1]
    return sum(old) / len(old) if old else float("nan")
