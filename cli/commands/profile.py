"""fieldlearn profile: measure an increment's peak memory, estimate it, and plan a config for a budget.

    fieldlearn profile --budget orin-nano-4gb                 # the default config
    fieldlearn profile --state DIR --budget 2GiB --out DIR    # the state's config

Prints the configured increment's memory by component and phase, measured (a fresh
process; see fieldlearn.tools.profile.measure) next to the analytic estimate, then the
plan: the configuration with the most training throughput whose measured peak fits the
budget, with the options that select it. Writes profile.json and profile.png (stacked
bars by component) into --out. Nothing fitting is a one-line error naming the smallest
configuration tried and its peak.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldlearn.cli.flags import add_config_arguments, config_from_args, option
from fieldlearn.cli.commands.common import log
from fieldlearn.device.learner import setup_torch
from fieldlearn.runtime.atomic import write_json
from fieldlearn.device.config import Valid
from fieldlearn.device.data import MAX_IMAGES
from fieldlearn.tools.profile.budget import PRESETS, fmt_bytes, parse_budget


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", required=True, metavar="SIZE|PRESET",
                   help=f"memory for the whole learner process: a size (2GiB, 512MB) or a preset ({', '.join(PRESETS)})")
    p.add_argument("--state", type=Path, default=None,
                   help="profile this state's config and class count; its model stays as it is, only the "
                        "training options that `fieldlearn learn` takes are planned")
    p.add_argument("--out", type=Path, default=Path("runs/profile"),
                   help="where profile.json/.png go (default runs/profile, which git ignores in a checkout)")
    p.add_argument("--images", type=option(int, Valid(2, MAX_IMAGES)), default=1000,
                   help="images of one increment held in memory (default 1000: 10 classes x 100)")
    p.add_argument("--new-classes", type=option(int, Valid(1, 10_000)), default=10, help="classes per increment (default 10)")
    p.add_argument("--old-classes", type=option(int, Valid(1, 100_000)), default=50, help="classes already known, without --state (default 50)")
    p.add_argument("--max-measured", type=option(int, Valid(1, 100)), default=3,
                   help="candidates measured in a fresh process at most, the configured one included (default 3)")
    add_config_arguments(p, sections=("model", "loss", "train"))


def run(args: argparse.Namespace) -> int:
    from fieldlearn.tools.profile.chart import plot_plan  # noqa: PLC0415
    from fieldlearn.tools.profile.planner import NothingFits, make_plan, training_method  # noqa: PLC0415

    budget = parse_budget(args.budget)
    n_old, fixed_arch = args.old_classes, args.state is not None
    if args.state is not None:
        from fieldlearn.store.state import load_state  # noqa: PLC0415

        state = load_state(args.state)
        cfg = config_from_args(args, base=state.config)
        cfg.model = state.config.model          # the state's network, whatever the model options say
        n_old = len(state.classes)
    else:
        cfg = config_from_args(args)
    setup_torch(cfg)
    log(f"budget {budget.describe()}; method {training_method(cfg)}, {n_old} known + {args.new_classes} new classes, "
        f"{args.images} images in memory")
    try:
        result = make_plan(cfg, budget, n_images=args.images, n_old=n_old, n_new=args.new_classes,
                           fixed_arch=fixed_arch, max_measured=args.max_measured, log=log)
        failure = None
    except NothingFits as e:
        result, failure = e.result, e
    log("")
    log(format_reference(result.reference))
    log("")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "profile.json", result.to_dict())
    png = plot_plan(result, args.out / "profile.png")
    if failure is not None:
        log(f"wrote {args.out / 'profile.json'} and {png}")
        raise failure
    c = result.chosen
    log(f"plan for {budget.describe()}:")
    log(f"  {c.candidate.label()}")
    log(f"  peak: predicted {fmt_bytes(c.predicted_total)}, measured {fmt_bytes(c.measured_total)} "
        f"(whole process; {fmt_bytes(budget.bytes - c.measured_total)} to spare)")
    log(f"  training step: {c.measured['images_per_second']:.0f} images/s measured "
        f"(predicted {c.throughput:.0f})")
    log(f"  options: {c.candidate.options(model=not fixed_arch)}")
    log(f"wrote {args.out / 'profile.json'} and {png}")
    return 0


def format_reference(ev) -> str:
    """Measured vs analytic, by component and by phase, for the configured candidate."""
    m, e = ev.measured, ev.estimate
    lines = [f"configured: {ev.candidate.label()}; bytes above the runtime baseline "
             f"({fmt_bytes(m['baseline_bytes'])}: torch and its libraries, {m['what']})",
             f"  {'':24} {'analytic':>11} {'measured':>11} {'diff':>7}"]

    def row(name, a, b):
        diff = f"{100 * (b - a) / a:+.0f}%" if a else ""
        lines.append(f"  {name:24} {fmt_bytes(a):>11} {fmt_bytes(b):>11} {diff:>7}")

    ec = dict(e.components)
    rest = sum(ec.pop(k, 0) for k in ("workspace", "runtime (model)", "allocator (model)"))
    mc = dict(m["components"])
    if "workspace + allocator" in mc:
        ec["workspace + allocator"] = rest
    else:
        ec["workspace"] = rest
    for k in list(ec) + [k for k in mc if k not in ec]:
        row(k, ec.get(k, 0), mc.get(k, 0))
    lines.append("  phase peaks:")
    for k in e.phases:
        row(k, e.phases[k], m["phases"].get(k, 0))
    lines.append(f"  peak ({m['peak_phase']})".ljust(26) + f" {fmt_bytes(e.peak_bytes):>11} {fmt_bytes(m['peak_bytes']):>11} "
                 f"{100 * (m['peak_bytes'] - e.peak_bytes) / max(1, e.peak_bytes):+.0f}%")
    lines.append("  (components at the training step's peak; measured ones are live tensor bytes, an engine's RSS growth, "
                 "and the rest of the measured peak)")
    return "\n".join(lines)
