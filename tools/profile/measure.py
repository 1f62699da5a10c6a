"""Measure an increment's memory, phase by phase, in this process or in a fresh one.

    measured = measure_in_subprocess(spec, n_images=900)      # what the profiler and tests use
    python -m fieldlearn.tools.profile.measure SPEC.json     # the subprocess's entry point

The phases follow fieldlearn.device.learner.learn_increment: the student (weights), the
increment's images in memory, the teacher (built from the student before its head is
widened), encode (frozen trunk over every image, z kept), teacher targets (once per
image, kept; with a cached trunk the teacher is then closed, as the learner does), then
training steps. Each phase's peak is read with the meter's high-water
mark reset at its start (fieldlearn.tools.profile.meter). Everything is reported in
bytes above the baseline: the process after imports and a warm-up of torch's CPU kernels
(its thread pool and kernel caches would otherwise be charged to the first phase).

A fresh process per measurement, because RSS never goes down reliably within one
(freed memory stays with the C allocator), so a second candidate would be measured on
top of the first one's leftovers.

The breakdown at the training step's peak: weights, images, z cache, teacher targets,
batch, gradients and optimiser state are the bytes of the live tensors; saved
activations are counted with saved_tensors_hooks during a step (each storage once, the
batch and the weights left out); an inference-engine teacher is its RSS growth (CPU),
reported as teacher_bytes, and 0 in the breakdown once it has been released.
"workspace + allocator" is the rest of the step's peak: backward's transient buffers,
kernel scratch and, on CPU, what the C allocator holds beyond the live tensors. On CUDA
the allocator's overhead (reserved - allocated) is reported on its own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from fieldlearn.tools.profile.meter import open_meter, rss_parts, system_used

STEPS = 3     # measured steps (after WARMUP); the peak is over all of them
WARMUP = 2


def _nbytes(t) -> int:
    return t.untyped_storage().nbytes()


def _module_bytes(m) -> int:
    return sum(_nbytes(t) for t in [*m.parameters(), *m.buffers()])


def _warm_up(device) -> None:
    """Run a tiny conv forward/backward and an SGD step so that torch's one-off allocations
    (thread pool, oneDNN/cuDNN handles) are part of the baseline, not of the first phase."""
    import torch  # noqa: PLC0415

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(inplace=True),
                            torch.nn.Conv2d(8, 8, 3, groups=8)).to(device)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        m(torch.randn(2, 3, 16, 16, device=device)).sum().backward()
        opt.step()
    with torch.no_grad():
        m.eval()(torch.randn(2, 3, 16, 16, device=device))
    del m, opt
    # Libraries every increment loads anyway (it exports its model to ONNX and checks it in
    # ONNX Runtime): their code and data belong to the baseline, not to one phase.
    import onnx  # noqa: F401, PLC0415
    import onnxruntime  # noqa: F401, PLC0415
    import fieldlearn.device.engine_teacher  # noqa: F401, PLC0415
    import fieldlearn.device.learner  # noqa: F401, PLC0415
    import fieldlearn.store.state  # noqa: F401, PLC0415
    import fieldlearn.export.onnx  # noqa: F401, PLC0415


def measure(spec, n_images: int, steps: int = STEPS, warmup: int = WARMUP,
            system_before: int | None = None) -> dict[str, Any]:
    """Run one increment's phases of `spec` (a StepSpec) here and return what each cost,
    in bytes above the baseline. system_before: the system's used memory before this
    process loaded torch (Jetson: the budget counts the whole process)."""
    import torch  # noqa: PLC0415

    from fieldlearn.tools.profile.harness import SavedBytes, StepHarness, random_images  # noqa: PLC0415

    cfg = spec.cfg
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = torch.device(cfg.train.device)
    meter = open_meter(str(device))
    _warm_up(device)
    h = StepHarness(spec, str(device), build=False)
    out: dict[str, Any] = {"meter": meter.kind, "what": meter.what, "threads": torch.get_num_threads()}
    comp: dict[str, int] = {}
    phases: dict[str, int] = {}

    def now() -> int:
        return meter.current()

    base = now()
    meter.reset_peak()
    out["rss_parts"] = {"baseline": rss_parts()}
    out["baseline_bytes"] = base if meter.kind == "cpu" else meter.host.current()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # the CUDA context and kernels (and, on a shared GPU, other processes)
        out["cuda_context_bytes"] = int(total - free - torch.cuda.memory_reserved(device))
    if meter.kind == "jetson":
        out["system_before_bytes"] = system_before if system_before is not None else meter.system_current()

    h.build_student()
    comp["weights"] = _module_bytes(h.student)
    images = random_images(max(n_images, cfg.train.batch_size), cfg.model.input_size, spec.seed)
    comp["images"] = _nbytes(images) if meter.kind != "cuda" else 0    # host memory: not the GPU's
    phases["load"] = meter.peak() - base

    mark = now()
    meter.reset_peak()
    h.make_teacher()
    torch_teacher = getattr(h.teacher, "model", h.teacher) if h.teacher is not None else None
    engine = h.teacher is not None and not isinstance(torch_teacher, torch.nn.Module)
    # a torch teacher is counted by its tensors; an engine only shows in RSS (CPU) or the allocator
    comp["teacher"] = (now() - mark) if engine else (_module_bytes(torch_teacher) if torch_teacher is not None else 0)
    phases["teacher setup"] = meter.peak() - base
    h.widen()

    mark = now()
    meter.reset_peak()
    z_all = h.encode_images(images if h.cached else images[: cfg.train.batch_size])
    phases["encode"] = meter.peak() - base
    out.setdefault("rss_parts", {})["after encode"] = rss_parts()
    comp["z cache"] = _nbytes(z_all) if h.cached else 0

    mark = now()
    meter.reset_peak()
    targets_all = h.precompute(z_all)
    phases["teacher targets"] = meter.peak() - base
    grown = now() - mark
    target_bytes = sum(_nbytes(t) for t in targets_all.tensors()) if targets_all else 0
    comp["targets"] = target_bytes
    if engine:
        comp["teacher"] += max(0, grown - target_bytes)    # an engine's arena kept after its first run
    out["teacher_bytes"] = comp["teacher"]
    mark = now()
    out["teacher_released"] = h.release_teacher()          # as the learner does, before training
    if out["teacher_released"]:
        out["teacher_returned_bytes"] = mark - now()       # what the process gave back (RSS / allocator)
        comp["teacher"] = 0

    h.set_batch(z_all, targets_all)
    h.make_optimizer()
    comp["batch"] = sum(_nbytes(t) for t in (h.z, h.labels, *(h.targets.tensors() if h.targets else ())))
    if not h.cached:
        del z_all

    meter.reset_peak()
    times = []
    saved = SavedBytes(h)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if i == warmup + steps - 1:
            with saved.hooks():
                h.step()
        else:
            h.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_peak = meter.peak()
    phases["train step"] = step_peak - base
    comp["gradients"] = sum(_nbytes(p.grad) for p in h.params if p.grad is not None)
    comp["optimizer"] = sum(_nbytes(v) for st in h.opt.state.values() for v in st.values() if torch.is_tensor(v))
    comp["activations"] = saved.total
    # the rest of the step's peak: backward's transient buffers and kernel scratch, and on
    # CPU whatever the C allocator holds beyond the live tensors (RSS cannot tell them apart)
    rest = phases["train step"] - sum(comp.values())
    if meter.kind == "cpu":
        comp["workspace + allocator"] = rest
    else:
        comp["workspace"] = rest
        comp["allocator overhead"] = max(0, meter.peak_reserved() - step_peak)
    out["components"] = comp
    out["phases"] = phases
    out["peak_phase"] = max(phases, key=phases.get)
    out["peak_bytes"] = max(phases.values())
    if meter.kind != "cpu":
        out["peak_reserved_bytes"] = meter.peak_reserved()
        out["host_peak_bytes"] = meter.host.peak()
    if meter.kind == "jetson":
        out["system_peak_bytes"] = meter.system_peak()
    out["step_seconds"] = statistics.median(times)
    out["images_per_second"] = cfg.train.batch_size / out["step_seconds"]
    meter.close()
    return out


def measure_in_subprocess(spec, n_images: int, *, repeats: int = 1, threads: int | None = None,
                          timeout: float = 600) -> dict[str, Any]:
    """measure() in a fresh Python process (nothing measured before is in its RSS).

    repeats > 1: that many fresh processes; the run with the median peak is returned, with
    every run's peak in "peak_runs" (RSS peaks vary from run to run: which thread's malloc
    arena serves an allocation, and which kernel oneDNN picks, are not deterministic).
    """
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    payload = json.dumps({"spec": spec.to_dict(), "n_images": n_images})
    runs = []
    for _ in range(max(1, repeats)):
        proc = subprocess.run([sys.executable, "-m", "fieldlearn.tools.profile.measure"], input=payload,
                              capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"memory measurement failed in its subprocess: {tail}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["peak_bytes"])
    out = runs[(len(runs) - 1) // 2]
    out["peak_runs"] = [r["peak_bytes"] for r in runs]
    return out


def main() -> int:
    before = system_used()            # before torch is imported: a Jetson counts all of it
    import warnings  # noqa: PLC0415

    from fieldlearn.tools.profile.harness import StepSpec  # noqa: PLC0415

    warnings.filterwarnings("ignore")
    req = json.loads(sys.stdin.read())
    result = measure(StepSpec.from_dict(req["spec"]), int(req["n_images"]), system_before=before)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
