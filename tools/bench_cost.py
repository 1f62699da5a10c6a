"""`fieldlearn bench cost`: what one LwM step costs next to its baselines, and how long an increment takes.

In one run on one machine:

1. Step time: one optimiser step of finetune, lwf_mc, lwm (ours) and a naive LwM, timed
   round-robin (so a busy shared machine slows all alike), median of repeats after
   warm-up, ratios to fine-tuning. Ours runs as the learner does: the frozen trunk's
   output z is cached once per image and the teacher's logits and maps are precomputed
   once per image, so a step is forward_top + loss + backward. Their one-off cost per
   image is reported beside it and amortised over the epochs ("step + precompute").
2. Peak memory of each method's step: each in a fresh subprocess (fieldlearn.tools.profile),
   peak RSS above the import baseline (CUDA: the allocator's peak).
3. Teacher forward time per available backend (torch, ONNX Runtime, TensorRT) on the same z.
4. Time to learn: one whole increment at the shipped defaults, read from an ImageFolder,
   trained, evaluated on held-out images, exported to ONNX and saved, seconds per phase.

The naive LwM (`NaiveLwM`, fieldlearn.tools.naive_lwm) is built the way public LwM code does it: forward hooks on the
last conv block of the student and of a PyTorch copy of the teacher, a second forward of
that teacher on every batch, Grad-CAM by autograd.grad (create_graph=True for the
student so that LAD's gradient flows through the double backward). Two variants:
`naive_lwm` gets the same cached z as ours (isolates the teacher and Grad-CAM work);
`naive_lwm_pixels` runs student and teacher from pixels on every batch, as public code
does (it knows nothing of a frozen-trunk cache).
"""

from __future__ import annotations

import argparse
import copy
import functools
from pathlib import Path

import torch

from fieldlearn.device.config import RunConfig


# ---------------------------------------------------------------------------- step time

STEP_METHODS = ["finetune", "lwf_mc", "lwm", "naive_lwm", "naive_lwm_pixels"]
LABELS = {"finetune": "fine-tuning", "lwf_mc": "LwF-MC", "lwm": "LwM (ours)",
          "lwm_torch_teacher": "LwM (ours), torch teacher",
          "naive_lwm": "naive LwM, trunk cached", "naive_lwm_pixels": "naive LwM, from pixels (public code)"}


def _spec(cfg: RunConfig, method: str, n_old: int, n_new: int):
    from fieldlearn.tools.profile.harness import StepSpec  # noqa: PLC0415

    if method == "lwm_torch_teacher":
        cfg = copy.deepcopy(cfg)
        cfg.teacher_backend = "torch"
        method = "lwm"
    return StepSpec(cfg, method, n_old=n_old, n_new=n_new)


def time_steps(cfg: RunConfig, methods: list[str], *, n_old: int, n_new: int, warmup: int, repeats: int,
               log=lambda s: None) -> dict[str, dict]:
    """Median seconds of one optimiser step per method, timed round-robin in this process."""
    import statistics  # noqa: PLC0415
    import time  # noqa: PLC0415

    from fieldlearn.tools.profile.harness import StepHarness  # noqa: PLC0415

    harnesses = {}
    for m in methods:
        log(f"  setting up {m} ...")
        harnesses[m] = StepHarness(_spec(cfg, m, n_old, n_new))
    times: dict[str, list[float]] = {m: [] for m in methods}
    cuda = cfg.train.device.startswith("cuda")
    for r in range(warmup + repeats):
        for m, h in harnesses.items():
            t0 = time.perf_counter()
            h.step()
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                times[m].append(time.perf_counter() - t0)
    out = {}
    for m in methods:
        ts = sorted(times[m])
        out[m] = {"median_s": statistics.median(ts), "p10_s": ts[len(ts) // 10], "p90_s": ts[(9 * len(ts)) // 10],
                  "teacher_backend": _backend(harnesses[m]), "repeats": len(ts)}
    return out


def _backend(h) -> str:
    return h.teacher_backend    # the harness has released a cached-trunk teacher by now


# ---------------------------------------------------------------------------- per-image precompute

def time_precompute(cfg: RunConfig, *, n_old: int, backends: list[str], images: int, warmup: int, repeats: int,
                    log=lambda s: None) -> dict:
    """Per image: the frozen trunk (encode) and the teacher's forward on each backend, on the
    same z, alternated; plus each engine's one-off setup (export + session/engine build)."""
    import statistics  # noqa: PLC0415
    import time  # noqa: PLC0415

    from fieldlearn.device.learner import chunk_size, encode  # noqa: PLC0415
    from fieldlearn.device.model import build_student  # noqa: PLC0415
    from fieldlearn.tools.profile.harness import random_images  # noqa: PLC0415
    from fieldlearn.device.engine_teacher import make_teacher  # noqa: PLC0415
    from fieldlearn.device.teacher import teacher_targets  # noqa: PLC0415

    torch.manual_seed(0)
    student = build_student(cfg.model, n_old).to(cfg.train.device).eval()
    imgs = random_images(images, cfg.model.input_size)
    chunk = chunk_size(cfg)
    out: dict = {"images": images, "chunk": chunk, "encode_s_per_image": None, "encode": {}, "teacher": {}}
    if cfg.model.freeze_blocks == 0:
        return out
    from fieldlearn.device.trunk_encoder import resolve  # noqa: PLC0415

    trunk_cfgs = {}
    for b in ("torch", "onnxruntime"):
        c = copy.deepcopy(cfg)
        c.train.trunk_backend = b
        try:
            if resolve(b, cfg.train.device) == b:
                trunk_cfgs[b] = c
        except Exception as e:  # noqa: BLE001 - not installed: reported
            out["encode"][b] = {"available": False, "reason": str(e)}
    used = resolve(cfg.train.trunk_backend, cfg.train.device)
    z = encode(student, imgs, cfg)
    teachers = {}
    for b in backends:
        t0 = time.perf_counter()
        try:
            teachers[b] = make_teacher(student, b, batch_size=chunk)
        except Exception as e:  # noqa: BLE001 - an unavailable backend is reported, not fatal
            out["teacher"][b] = {"available": False, "reason": str(e).splitlines()[0][:200]}
            continue
        out["teacher"][b] = {"available": True, "setup_s": time.perf_counter() - t0}
    enc, tch = {b: [] for b in trunk_cfgs}, {b: [] for b in teachers}
    for r in range(warmup + repeats):
        for b, c in trunk_cfgs.items():
            t0 = time.perf_counter()
            encode(student, imgs, c)
            if r >= warmup:
                enc[b].append((time.perf_counter() - t0) / images)
        for b, t in teachers.items():
            t0 = time.perf_counter()
            teacher_targets(t, z, chunk)
            if r >= warmup:
                tch[b].append((time.perf_counter() - t0) / images)
    for b in trunk_cfgs:
        out["encode"][b] = {"available": True, "s_per_image": statistics.median(enc[b])}
    out["encode_backend"] = used
    out["encode_s_per_image"] = out["encode"][used]["s_per_image"]
    for b in teachers:
        out["teacher"][b]["s_per_image"] = statistics.median(tch[b])
    log("  encode " + ", ".join(f"{b} {1e3 * v['s_per_image']:.2f} ms/image" for b, v in out["encode"].items()
                                if v.get("available")) + "; teacher " + ", ".join(
        f"{b} {1e3 * v['s_per_image']:.2f} ms/image (setup {v['setup_s']:.1f} s)"
        for b, v in out["teacher"].items() if v.get("available")))
    return out


# ---------------------------------------------------------------------------- time to learn

def time_to_learn(cfg: RunConfig, image_dir, state_dir, *, n_base: int, log=lambda s: None) -> dict:
    """One increment through `fieldlearn learn`'s own code (learn_new_classes, export on),
    seconds per phase. The base version is a pretrained student with an n_base-class head
    (its training is not part of an increment and is not timed)."""
    import contextlib  # noqa: PLC0415
    import time  # noqa: PLC0415

    from fieldlearn.field import increment as learn_cmd  # noqa: PLC0415
    from fieldlearn.device.data import load_image_folder  # noqa: PLC0415
    from fieldlearn.device.model import build_student  # noqa: PLC0415
    from fieldlearn.store.state import load_state, save_version  # noqa: PLC0415

    torch.manual_seed(0)
    base = build_student(cfg.model, n_base)
    save_version(state_dir, base, [f"base_{i:02d}" for i in range(n_base)], cfg, step=0, history=[])
    state = load_state(state_dir)
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    def timed_writer(make):
        def wrapper(*a, **k):
            return timed("export", make(*a, **k))
        return wrapper

    t_all = time.perf_counter()
    t0 = time.perf_counter()
    new = load_image_folder(image_dir, cfg.model.input_size)
    read_s = time.perf_counter() - t0
    patches = {"learn_increment": timed("increment", learn_cmd.learn_increment),
               "check_new_classes": timed("eval", learn_cmd.check_new_classes),   # the held-out check
               "fold_in": timed("fold in", learn_cmd.fold_in),                   # held-out images into the statistics
               "publish": timed("save", learn_cmd.publish),
               "export_writer": timed_writer(learn_cmd.export_writer)}
    with contextlib.ExitStack() as stack:
        for name, fn in patches.items():
            old = getattr(learn_cmd, name)
            setattr(learn_cmd, name, fn)
            stack.callback(setattr, learn_cmd, name, old)
        inc = learn_cmd.learn_new_classes(state_dir, state, new, cfg, val_fraction=0.1, export=True)
    total = time.perf_counter() - t_all
    phases = inc.entry["phases"]
    # "setup": inside learn_increment but in no phase of its report (the teacher made from the
    # student, the copy widened); "classifier": the head solved from class statistics.
    p = {"read": read_s, "encode": phases.get("encode", 0.0),
         "setup": spent["increment"] - sum(phases.values()),
         "teacher": phases.get("teacher", 0.0), "train": phases.get("train", 0.0),
         "classifier": phases.get("classifier", 0.0), "eval": spent.get("eval", 0.0),
         "fold in": spent.get("fold in", 0.0),
         "export": spent.get("export", 0.0), "save": spent.get("save", 0.0) - spent.get("export", 0.0)}
    p["other"] = total - sum(p.values())
    return {"method": cfg.method, "phases_s": p, "total_s": total, "n_train": inc.entry["n_images"], "n_val": inc.entry.get("n_val_images", 0),
            "new_classes": len(new.class_names), "teacher_backend": inc.entry.get("teacher_backend", ""),
            "version": str(inc.version_dir.name)}


def write_cifar_folder(root, n_classes: int, per_class: int, data_spec: str = "cifar100") -> list[str]:
    """The first n_classes CIFAR-100 training classes, per_class images each, as PNGs."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from fieldlearn.device.data import open_dataset  # noqa: PLC0415

    if data_spec in ("cifar100", "cifar-100"):
        # the checkout's ../shared/data, wherever the benchmark is run from
        beside = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar-100-binary"
        if beside.is_dir():
            data_spec = f"cifar100:{beside.resolve()}"
    data = open_dataset(data_spec, "train")
    labels = data.labels.numpy()
    names = []
    for c in range(n_classes):
        d = root / data.class_names[c]
        d.mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(np.flatnonzero(labels == c)[:per_class]):
            Image.fromarray(data.images[idx].permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")
        names.append(data.class_names[c])
    return names


# ---------------------------------------------------------------------------- report

def summarize(steps: dict, pre: dict, mem: dict, cfg: RunConfig, n_images: int) -> list[dict]:
    """One row per method: step time, step + its share of the per-image precompute, peak memory;
    each with its ratio to fine-tuning."""
    b, epochs = cfg.train.batch_size, max(1, cfg.train.epochs)
    enc = pre.get("encode_s_per_image") or 0.0
    rows = []
    for m, st in steps.items():
        backend = st["teacher_backend"]
        share = 0.0
        if m != "naive_lwm_pixels":
            share += b * enc / epochs                      # the trunk runs once per image per increment
        t = pre.get("teacher", {}).get(backend, {})
        if m in ("lwf_mc", "lwm", "lwm_torch_teacher") and t.get("available"):
            share += b * t["s_per_image"] / epochs + t["setup_s"] * b / (n_images * epochs)
        row = {"method": m, "label": LABELS.get(m, m), "teacher_backend": backend, "step_s": st["median_s"],
               "step_plus_precompute_s": st["median_s"] + share}
        if m in mem:
            row["step_peak_bytes"] = mem[m]["phases"]["train step"]
            row["peak_bytes"] = mem[m]["peak_bytes"]
            row["peak_phase"] = mem[m]["peak_phase"]
        rows.append(row)
    ft = next((r for r in rows if r["method"] == "finetune"), None)
    for r in rows:
        if ft is not None:
            r["step_x_finetune"] = r["step_s"] / ft["step_s"]
            r["step_plus_precompute_x_finetune"] = r["step_plus_precompute_s"] / ft["step_plus_precompute_s"]
            if "step_peak_bytes" in r and "step_peak_bytes" in ft:
                r["step_peak_x_finetune"] = r["step_peak_bytes"] / ft["step_peak_bytes"]
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, checked on this run's numbers."""
    by = {r["method"]: r for r in rows}
    out = []
    if "lwm" in by and "finetune" in by:
        out.append({"target": "LwM step <= 1.25x fine-tuning step", "value": by["lwm"]["step_x_finetune"],
                    "met": by["lwm"]["step_x_finetune"] <= 1.25})
        if "step_peak_x_finetune" in by["lwm"]:
            out.append({"target": "LwM step peak memory <= 1.15x fine-tuning's", "value": by["lwm"]["step_peak_x_finetune"],
                        "met": by["lwm"]["step_peak_x_finetune"] <= 1.15})
    for naive in ("naive_lwm_pixels", "naive_lwm"):
        if "lwm" in by and naive in by:
            v = by[naive]["step_plus_precompute_s"] / by["lwm"]["step_plus_precompute_s"]
            out.append({"target": f"LwM >= 2x faster than {LABELS[naive]} (step + precompute)", "value": v,
                        "met": v >= 2.0})
    return out


def format_markdown(report: dict) -> str:
    MiB = 1 << 20
    c = report["config"]
    lines = [f"One training step at batch {c['train']['batch_size']}, {c['model']['input_size']} px, "
             f"{c['model']['freeze_blocks']} frozen blocks ({report['machine']['torch_threads']} threads; load average "
             f"{report['machine']['load_average_start']} at the start, {report['machine']['load_average_end']} at the end). "
             f"Median of {report['repeats']} steps after {report['warmup']} warm-up, methods timed round-robin; memory: each "
             "method's training-step peak above the runtime baseline, in its own process.", "",
             "| method | teacher | step ms | x fine-tune | step + precompute ms | x fine-tune | step peak MiB | x fine-tune |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        mem = f"{r['step_peak_bytes'] / MiB:.0f}" if "step_peak_bytes" in r else "-"
        memx = f"{r['step_peak_x_finetune']:.2f}" if "step_peak_x_finetune" in r else "-"
        lines.append(f"| {r['label']} | {r['teacher_backend']} | {1e3 * r['step_s']:.0f} | {r.get('step_x_finetune', 1):.2f} | "
                     f"{1e3 * r['step_plus_precompute_s']:.0f} | {r.get('step_plus_precompute_x_finetune', 1):.2f} | "
                     f"{mem} | {memx} |")
    pre = report["precompute"]
    if pre.get("encode_s_per_image") is not None:
        lines += ["", "Per image, once per increment (\"precompute\", shared out over the epochs in the table above):", "",
                  "| what | ms / image | one-off setup s |", "|---|---:|---:|"]
        for b, t in pre["encode"].items():
            used = " (used)" if b == pre.get("encode_backend") else ""
            lines.append(f"| frozen trunk (encode), {b}{used} | {1e3 * t['s_per_image']:.2f} | - |" if t.get("available")
                         else f"| frozen trunk, {b} | not available: {t['reason']} | - |")
        for b, t in pre["teacher"].items():
            if t.get("available"):
                lines.append(f"| teacher forward + maps, {b} | {1e3 * t['s_per_image']:.2f} | {t['setup_s']:.2f} |")
            else:
                lines.append(f"| teacher, {b} | not available: {t['reason']} | - |")
    if report.get("targets"):
        lines += ["", "| target | this run | met |", "|---|---:|---|"]
        lines += [f"| {t['target']} | {t['value']:.2f}x | {'yes' if t['met'] else '**no**'} |" for t in report["targets"]]
    inc = report.get("time_to_learn")
    if inc:
        p = inc["phases_s"]
        lines += ["", f"Time to learn: {inc['new_classes']} new classes, {inc['n_train']} training + {inc['n_val']} held-out "
                  f"images read from an ImageFolder of PNGs, through `fieldlearn learn` (export on), method "
                  f"{inc.get('method', '?')}, teacher {inc['teacher_backend'] or 'none'}: **{inc['total_s']:.1f} s**", "",
                  "| " + " | ".join(p) + " | total |", "|" + "---:|" * (len(p) + 1),
                  "| " + " | ".join(f"{v:.1f}" for v in p.values()) + f" | {inc['total_s']:.1f} |"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    from fieldlearn.cli.flags import add_config_arguments  # noqa: PLC0415

    p.add_argument("--out", type=Path, default=Path("fieldlearn-bench-cost"), help="cost.json and cost.md go here")
    p.add_argument("--methods", default=",".join(STEP_METHODS + ["lwm_torch_teacher"]),
                   help="comma-separated, timed round-robin (default: all; lwm_torch_teacher is LwM with "
                        "--teacher-backend torch)")
    from fieldlearn.device.config import Valid  # noqa: PLC0415
    from fieldlearn.device.data import MIN_IMAGES  # noqa: PLC0415
    from fieldlearn.cli.flags import option  # noqa: PLC0415

    p.add_argument("--repeats", type=option(int, Valid(1, 100_000)), default=20, help="timed steps per method (default 20)")
    p.add_argument("--warmup", type=option(int, Valid(0, 100_000)), default=3,
                   help="untimed steps per method first (default 3)")
    p.add_argument("--old-classes", type=option(int, Valid(1, 100_000)), default=50,
                   help="classes the teacher knows (default 50)")
    p.add_argument("--new-classes", type=option(int, Valid(1, 100)), default=10,
                   help="classes of the increment (default 10; the CIFAR-100 folder has 100)")
    p.add_argument("--per-class", type=option(int, Valid(MIN_IMAGES, 100)), default=100,
                   help="images per new class (default 100)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each method's step peak in a fresh process (default on)")
    p.add_argument("--increment", action=argparse.BooleanOptionalAction, default=True,
                   help="time one whole increment from an ImageFolder of CIFAR-100 PNGs (default on)")
    p.add_argument("--data", default="cifar100",
                   help="where the increment's images come from: cifar100[:PATH] (default ../shared/data)")
    # --method: what the timed increment trains (--methods: whose optimiser step is timed)
    add_config_arguments(p, sections=("model", "loss", "train"), run_fields=("method", "teacher_backend"))


def run(args) -> int:
    import os  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    import time  # noqa: PLC0415

    from fieldlearn.cli.flags import config_from_args  # noqa: PLC0415
    from fieldlearn.device.learner import setup_torch  # noqa: PLC0415
    from fieldlearn.runtime.atomic import write_json  # noqa: PLC0415
    from fieldlearn.tools.profile.measure import measure_in_subprocess  # noqa: PLC0415
    from fieldlearn.tools.profile.meter import loadavg  # noqa: PLC0415
    from fieldlearn.runtime.errors import UserError  # noqa: PLC0415

    log = functools.partial(print, flush=True)
    cfg = config_from_args(args)
    cfg.train.progress = False
    setup_torch(cfg)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LABELS]
    if unknown:
        raise UserError(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(LABELS)})")
    if "finetune" not in methods:
        methods.insert(0, "finetune")            # the ratios' denominator
    if args.repeats < 1 or args.warmup < 0:
        raise UserError("--repeats must be >= 1 and --warmup >= 0")
    n_images = args.new_classes * args.per_class
    t_start = time.perf_counter()
    report: dict = {"command": "fieldlearn bench cost", "config": cfg.to_dict(), "methods": methods,
                    "repeats": args.repeats, "warmup": args.warmup, "old_classes": args.old_classes,
                    "new_classes": args.new_classes, "increment_images": n_images,
                    "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads(), "load_average_start": loadavg()}}
    log(f"step time: {', '.join(methods)}; batch {cfg.train.batch_size}, {cfg.model.input_size} px, "
        f"{cfg.model.freeze_blocks} frozen; {args.warmup} warm-up + {args.repeats} timed steps each, round-robin")
    steps = time_steps(cfg, methods, n_old=args.old_classes, n_new=args.new_classes, warmup=args.warmup,
                       repeats=args.repeats, log=log)
    report["steps"] = steps
    log("precompute per image: encode, teacher per backend")
    report["precompute"] = time_precompute(cfg, n_old=args.old_classes, backends=["torch", "onnxruntime", "tensorrt"],
                                           images=max(2 * cfg.train.batch_size, 64), warmup=1,
                                           repeats=max(3, args.repeats // 4), log=log)
    mem = {}
    if args.memory:
        for m in methods:
            log(f"memory: {m} in a fresh process ...")
            mem[m] = measure_in_subprocess(_spec(cfg, m, args.old_classes, args.new_classes), cfg.train.batch_size)
        report["memory"] = mem
    if args.increment:
        with tempfile.TemporaryDirectory(prefix="fieldlearn-cost-") as tmp:
            tmp = Path(tmp)
            log(f"time to learn: writing {args.new_classes} x {args.per_class} CIFAR-100 images as PNGs ...")
            write_cifar_folder(tmp / "images", args.new_classes, args.per_class, args.data)
            log("time to learn: one increment through fieldlearn learn's code ...")
            report["time_to_learn"] = time_to_learn(cfg, tmp / "images", tmp / "state", n_base=args.old_classes, log=log)
    report["machine"]["load_average_end"] = loadavg()
    report["rows"] = summarize(steps, report["precompute"], mem, cfg, n_images)
    report["targets"] = targets(report["rows"])
    report["seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "cost.json", report)
    md = format_markdown(report)
    (args.out / "cost.md").write_text(md)
    log("")
    log(md)
    log(f"wrote {args.out / 'cost.json'} and {args.out / 'cost.md'} ({report['seconds']:.0f} s)")
    return 0
