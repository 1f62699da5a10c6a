"""Plan a configuration that fits a memory budget, with the most training throughput.

    result = make_plan(cfg, budget, n_images=1000)     # raises UserError if nothing fits

Knobs, searched in this order of preference:

    input resolution (down from the configured one) and frozen depth (up from it)
        change what the model learns, so they are "levels": the planner keeps the
        configured ones if anything fits there, and gives them up one level at a time;
    batch size (down from the configured one) and activation checkpointing of the
        trainable blocks change only speed and memory: within a level, the combination
        with the most predicted throughput that fits is taken.

Only what the learner can run is planned: it trains in fp32, so no fp16 candidate is
(a plan that fits only in fp16 would exceed the budget as soon as `learn` runs it).

Every candidate is estimated analytically (fieldlearn.tools.profile.analytic: meta
device, milliseconds). The configured one is also measured in a fresh process first: that
gives the runtime's own baseline (torch and its libraries) and the ratio of measured to
analytic peak on this machine (allocator overhead), which scales the other candidates'
predictions. The chosen candidate is then measured in a fresh process too; if it does not
fit after all, the next one is measured (at most `max_measured` in all).

Throughput model: a step costs 3 forwards of the trainable top (forward + backward), 4
with checkpointing (the recomputation), in FLOPs per image from the meta-device count;
predicted images/s scale the configured candidate's measured speed by that cost ratio.
Batch size is assumed not to change the per-image cost (it does, a little: ties go to the
larger batch).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

from fieldlearn.device.config import RunConfig
from fieldlearn.device.model import N_BLOCKS
from fieldlearn.tools.profile.analytic import Estimate, estimate
from fieldlearn.tools.profile.budget import Budget, fmt_bytes
from fieldlearn.tools.profile.harness import StepSpec
from fieldlearn.runtime.errors import UserError

BATCHES = (8, 16, 32, 64, 128)
# A candidate fits when its measured total plus this share of its peak (above the runtime
# baseline) is within the budget: peak RSS varies by up to ~10% between identical runs here.
MARGIN = 0.10
MIN_INPUT = 64
INPUT_STEP = 32
FREEZE_STEP = 2


@dataclass(frozen=True)
class Candidate:
    batch_size: int
    input_size: int
    freeze_blocks: int
    checkpoint_top: bool = False

    @classmethod
    def of(cls, cfg: RunConfig) -> "Candidate":
        return cls(cfg.train.batch_size, cfg.model.input_size, cfg.model.freeze_blocks, cfg.train.checkpoint_top)

    def apply(self, cfg: RunConfig) -> RunConfig:
        out = copy.deepcopy(cfg)
        out.train.batch_size = self.batch_size
        out.model.input_size = self.input_size
        out.model.freeze_blocks = self.freeze_blocks
        out.train.checkpoint_top = self.checkpoint_top
        return out

    def label(self) -> str:
        parts = [f"batch {self.batch_size}", f"{self.input_size}px", f"{self.freeze_blocks} frozen"]
        if self.checkpoint_top:
            parts.append("checkpointing")
        return ", ".join(parts)

    def options(self, model: bool = True) -> str:
        """The command-line options that select this candidate (model=False: only the
        training options, which are all `fieldlearn learn` takes for an existing state)."""
        opts = [f"--batch-size {self.batch_size}",
                "--checkpoint-top" if self.checkpoint_top else "--no-checkpoint-top"]
        if model:
            opts[1:1] = [f"--input-size {self.input_size}", f"--freeze-blocks {self.freeze_blocks}"]
        return " ".join(opts)


@dataclass
class Evaluated:
    candidate: Candidate
    estimate: Estimate
    predicted_total: int            # baseline + analytic peak x measured overhead ratio
    throughput: float               # predicted images/s of a training step
    measured: dict | None = None
    measured_total: int | None = None

    def to_dict(self) -> dict:
        return {"candidate": asdict(self.candidate), "label": self.candidate.label(),
                "estimate": self.estimate.to_dict(), "predicted_total_bytes": self.predicted_total,
                "predicted_images_per_second": self.throughput, "measured": self.measured,
                "measured_total_bytes": self.measured_total}


@dataclass
class PlanResult:
    budget: Budget
    reference: Evaluated                   # the configured candidate, measured
    chosen: Evaluated | None
    evaluated: list[Evaluated] = field(default_factory=list)
    overhead_ratio: float = 1.0
    baseline_bytes: int = 0
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"budget": {"bytes": self.budget.bytes, "label": self.budget.label, "total": self.budget.total,
                           "headroom": self.budget.headroom, "text": self.budget.describe()},
                "device": self.device, "baseline_bytes": self.baseline_bytes,
                "overhead_ratio": self.overhead_ratio, "reference": self.reference.to_dict(),
                "chosen": self.chosen.to_dict() if self.chosen else None,
                "candidates": [e.to_dict() for e in self.evaluated], "notes": self.notes}


def measured_total(measured: dict) -> int:
    """The number the budget is compared with: everything this process made the device hold."""
    if measured["meter"] == "jetson":
        return int(measured["system_peak_bytes"] - measured["system_before_bytes"])
    if measured["meter"] == "cuda":
        return int(measured["peak_reserved_bytes"] + measured.get("cuda_context_bytes", 0))
    return int(measured["baseline_bytes"] + measured["peak_bytes"])


def levels(cfg: RunConfig, fixed_input: bool, min_freeze: int, fixed_arch: bool = False) -> list[tuple[int, int]]:
    """(input size, frozen blocks) pairs, most faithful to the configured model first."""
    size, freeze = cfg.model.input_size, max(cfg.model.freeze_blocks, min_freeze)
    if fixed_arch:
        return [(size, freeze)]
    sizes = [size] if fixed_input else [size] + list(range(size - INPUT_STEP, MIN_INPUT - 1, -INPUT_STEP))
    freezes = sorted({freeze, *range(freeze + FREEZE_STEP, N_BLOCKS - 1, FREEZE_STEP), N_BLOCKS - 2})
    freezes = [f for f in freezes if f >= freeze]
    # one knob at a time: freeze more at the configured size first (keeps the resolution
    # the trunk was trained at), then lower the resolution at each depth
    return [(s, f) for s in sizes for f in freezes]


def throughput(est: Estimate, cand: Candidate, ref: tuple[Estimate, Candidate, float]) -> float:
    ref_est, ref_cand, ref_ips = ref

    def cost(e: Estimate, c: Candidate) -> float:
        return (4 if c.checkpoint_top else 3) * max(1, e.flops.get("top", 1))

    return ref_ips * cost(ref_est, ref_cand) / cost(est, cand)


def training_method(cfg: RunConfig) -> str:
    """The method whose optimiser step is sized: cfg.method, or, where an increment trains
    nothing (method "none", the default: statistics only), the base step's cross-entropy
    training ("finetune" on the base classes), the one training run such a device does."""
    from fieldlearn.device.methods import METHODS  # noqa: PLC0415

    return cfg.method if METHODS[cfg.method].trains else "finetune"


def make_plan(cfg: RunConfig, budget: Budget, *, method: str | None = None, n_images: int = 1000,
              n_old: int = 50, n_new: int = 10, fixed_input: bool = False, min_freeze: int = 0,
              fixed_arch: bool = False,
              max_measured: int = 3, measure: Callable | None = None,
              log: Callable[[str], None] = lambda s: None) -> PlanResult:
    """Search the knobs (module docstring) for the fastest candidate whose measured total fits."""
    from fieldlearn.tools.profile.measure import measure_in_subprocess  # noqa: PLC0415

    measure = measure or measure_in_subprocess
    method = method or training_method(cfg)
    cuda = cfg.train.device.startswith("cuda")

    def spec(c: Candidate) -> StepSpec:
        return StepSpec(c.apply(cfg), method, n_old=n_old, n_new=n_new)   # fp32: what the learner runs

    ref_cand = Candidate.of(cfg)
    log(f"measuring the configured candidate ({ref_cand.label()}) in a fresh process ...")
    ref_est = estimate(spec(ref_cand), n_images)
    ref_meas = measure(spec(ref_cand), n_images)
    ratio = ref_meas["peak_bytes"] / max(1, ref_est.peak_bytes)
    ratio = max(1.0, ratio)          # never predict less than the analytic count
    base = measured_total(ref_meas) - ref_meas["peak_bytes"]
    ref_ips = ref_meas["images_per_second"]
    ref = Evaluated(ref_cand, ref_est, base + int(ref_est.peak_bytes * ratio), ref_ips, ref_meas,
                    measured_total(ref_meas))
    result = PlanResult(budget, ref, None, [ref], ratio, base, "cuda" if cuda else "cpu")
    result.notes.append(f"analytic peaks are scaled by {ratio:.3f}, the configured candidate's measured / analytic "
                        "peak on this machine (allocator overhead)")
    seen = {ref_cand: ref}
    n_measured = 1
    # never above the configured batch: a larger one would change the training recipe
    # (steps per epoch, gradient noise) for speed alone
    batches = [b for b in sorted({*BATCHES, cfg.train.batch_size}, reverse=True)
               if b <= min(cfg.train.batch_size, max(n_images, 2))]

    def fits(e: Evaluated) -> bool:
        return e.measured_total + MARGIN * e.measured["peak_bytes"] <= budget.bytes

    def predicted_fit(e: Evaluated) -> bool:
        return e.predicted_total + MARGIN * e.estimate.peak_bytes * ratio <= budget.bytes

    def estimate_one(c: Candidate) -> Evaluated:
        if c not in seen:
            e = estimate(spec(c), n_images)
            seen[c] = Evaluated(c, e, base + int(e.peak_bytes * ratio), throughput(e, c, (ref_est, ref_cand, ref_ips)))
            result.evaluated.append(seen[c])
        return seen[c]

    all_levels = levels(cfg, fixed_input, min_freeze, fixed_arch)
    # Fail fast: the least memory the search can reach is at the last level, smallest batch,
    # checkpointed (or not: on CPU the allocator can make either the smaller)
    size, freeze = all_levels[-1]
    least = [estimate_one(Candidate(batches[-1], size, freeze, ck)) for ck in (True, False)]
    if not any(predicted_fit(e) for e in least):
        smallest = min(least, key=lambda e: e.predicted_total)
        raise NothingFits(f"nothing fits in {budget.describe()}: the smallest configuration "
                          f"({smallest.candidate.label()}) peaks at {fmt_bytes(smallest.predicted_total)} "
                          f"(predicted; the configured one measured {fmt_bytes(ref.measured_total)})", result)

    for size, freeze in all_levels:
        for e in _level_candidates(size, freeze, batches, predicted_fit, estimate_one):
            if e.measured is None:
                if n_measured >= max_measured:
                    break
                log(f"measuring {e.candidate.label()} (predicted {fmt_bytes(e.predicted_total)}) ...")
                e.measured = measure(spec(e.candidate), n_images)
                e.measured_total = measured_total(e.measured)
                n_measured += 1
            if fits(e):
                result.chosen = e
                return result
            log(f"  measured {fmt_bytes(e.measured_total)} (+{100 * MARGIN:.0f}% margin): over the budget, next candidate")
    untried = [e for e in result.evaluated if e.measured is None and predicted_fit(e)]
    if untried:
        raise NothingFits(f"no measured candidate fits in {budget.describe()} after {n_measured} measurements; "
                          f"{untried[0].candidate.label()} is predicted to ({fmt_bytes(untried[0].predicted_total)}): "
                          f"raise --max-measured", result)
    smallest = min(result.evaluated, key=lambda e: e.measured_total or e.predicted_total)
    how = "measured" if smallest.measured_total is not None else "predicted"
    peak = smallest.measured_total or smallest.predicted_total
    raise NothingFits(f"nothing fits in {budget.describe()}: the smallest configuration ({smallest.candidate.label()}) "
                      f"peaks at {fmt_bytes(peak)} ({how})", result)


def _level_candidates(size, freeze, batches, predicted_fit, estimate_one):
    """Candidates of one (input size, frozen depth) level predicted to fit, fastest first.

    Peak memory grows with the batch size, so for each checkpointing setting the batches
    are tried from the largest down and the first that fits is the one kept: without
    checkpointing, then with it (the throughput model's order).
    """
    out = []
    for ck in (False, True):
        for b in batches:
            e = estimate_one(Candidate(b, size, freeze, ck))
            if predicted_fit(e):
                out.append(e)
                break
    out.sort(key=lambda e: (-round(e.throughput, 6), -e.candidate.batch_size))
    return out


class NothingFits(UserError):
    def __init__(self, message: str, result: PlanResult):
        super().__init__(message)
        self.result = result
