"""Analytic estimate of an increment's memory, from the architecture alone.

The same phases as fieldlearn.tools.profile.measure are run on the meta device: tensors
there have shapes and dtypes but no data, so the whole increment (encode, teacher targets,
training steps with backward and the optimiser) costs milliseconds and no memory. A
dispatch mode counts the bytes of every tensor storage that comes into existence and
frees them when the storage is released, so the estimate follows the real code path,
including what autograd saves, backward's transient buffers and checkpointing:

    live bytes = sum of the storages alive at a moment;   phase peak = max over the phase

Not seen on the meta device, and so added from a model whose constants were measured on
the project's CPU machine (torch 2.14.1, onnxruntime 1.32; docs/COST.md):

- CPU_RUNTIME_BYTES: the first time a network's convolutions run, torch's CPU backend
  (oneDNN) JIT-compiles kernels and caches primitives, and the C allocator keeps per-
  thread arenas: about 24 MiB beyond the live tensors, from the first phase that runs
  the network on.
- GLIBC_STEP_FRACTION: in a training step glibc's heap grows past the live tensors, by
  about 0.4 x the bytes the top's forward allocates (backward frees saved activations
  while it allocates gradients of other sizes; the holes are not given back). With
  checkpointing the forward allocates as much as without (it frees instead of saving),
  so the term stays: on CPU, checkpointing saves less than the tensor count suggests.
- an ONNX Runtime teacher: ORT_FIXED_BYTES for the session itself (thread pools,
  kernel registry, allocators) + ORT_WEIGHT_COPIES x the teacher graph's weights (the
  ONNX model, its initializers and the pre-packed convolution weights) + an arena as
  large as the largest forward it has run (simulated: the torch teacher's forward peak).
- TensorRT: weights + the same forward peak as workspace (not measured: no TensorRT here).
- the frozen trunk in ONNX Runtime (the CPU default, no arena, one session per pass):
  ORT_TRUNK_FRACTION x the activations torch would hold for one chunk (its memory
  planner shares buffers that eager torch allocates anew; measured 0.80-0.89 at the
  defaults), and torch's oneDNN runtime term starts with the teacher targets instead.
- the teacher is closed once its targets are computed (the learner's release_teacher),
  so it is not resident in the train step phase, except, for ONNX Runtime, ORT_ENV_BYTES
  that stay with the process after its session is gone (its global environment and
  thread pools; measured: a 39 MiB teacher session gave back 20 MiB).

The allocator's overhead beyond that (fragmentation) is what measured minus analytic shows.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fieldlearn.tools.profile.harness import SavedBytes, StepHarness, StepSpec
from fieldlearn.tools.profile.meter import is_jetson
from fieldlearn.device.trunk_encoder import resolve as resolve_trunk

CPU_RUNTIME_BYTES = 24 << 20
GLIBC_STEP_FRACTION = 0.4
ORT_FIXED_BYTES = 29 << 20
ORT_WEIGHT_COPIES = 5
ORT_TRUNK_FRACTION = 0.85
ORT_ENV_BYTES = 19 << 20

# Steps run after the first, so that the optimiser state (made by the first step) and
# the previous step's gradients (alive during the next forward) are present.
STEPS = 1


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while it is active (any device)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocated = 0      # cumulative bytes of new storages
        self._sizes: dict[int, int] = {}

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._sizes.pop(key, None)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self._sizes:
                    n = st.nbytes()
                    self._sizes[key] = n
                    self.live += n
                    self.allocated += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
        return out


@dataclass
class Estimate:
    components: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    teacher_backend: str = ""
    teacher_released: bool = False    # closed after its targets: not resident in the train step
    notes: list[str] = field(default_factory=list)
    flops: dict[str, int] = field(default_factory=dict)     # forward FLOPs per image: trunk, top

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def stack(self) -> dict[str, int]:
        """What is alive at the peak, by component; sums to peak_bytes.

        The resident parts (weights, images, teacher, and the caches once built) are the
        components; the rest of the peak phase is that phase's transient."""
        c, phase = self.components, self.peak_phase
        out = {k: c.get(k, 0) for k in ("weights", "images", "teacher")}
        if phase == "train step" and self.teacher_released:
            out["teacher"] = c.get("teacher (released, kept)", 0)
        if phase != "load":
            out["runtime (model)"] = c.get("runtime (model)", 0)
        if phase == "train step":
            out.update({k: c.get(k, 0) for k in ("z cache", "targets", "batch", "gradients", "optimizer",
                                                  "activations", "allocator (model)", "workspace")})
            out["workspace"] = self.phases[phase] - sum(v for k, v in out.items() if k != "workspace")
        else:
            if phase == "teacher targets":
                out["z cache"] = c.get("z cache", 0)
            out[f"{phase} transient"] = self.phases[phase] - sum(out.values())
        return out

    def to_dict(self) -> dict:
        return {"components": self.components, "stack_at_peak": self.stack(), "phases": self.phases, "peak_bytes": self.peak_bytes,
                "peak_phase": self.peak_phase, "teacher_backend": self.teacher_backend,
                "teacher_released": self.teacher_released, "notes": self.notes,
                "flops_per_image": self.flops}


def resolve_teacher_backend(spec: StepSpec) -> str:
    """The backend the learner would pick for this spec's teacher (none: no teacher)."""
    if spec.method in ("naive_lwm", "naive_lwm_pixels"):
        return "torch"
    from fieldlearn.device.methods import METHODS  # noqa: PLC0415

    m = METHODS[spec.method]
    if not (m.uses_teacher_logits or m.uses_teacher_maps):   # m is the class: no property
        return "none"
    backend = spec.cfg.teacher_backend
    if backend == "auto":
        from fieldlearn.device.engine_teacher import pick_backend  # noqa: PLC0415

        backend = pick_backend(torch.device(spec.cfg.train.device))
    return backend


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def estimate(spec: StepSpec, n_images: int) -> Estimate:
    """Phase peaks and components, bytes above the process's baseline, for `spec`."""
    backend = resolve_teacher_backend(spec)
    cfg = copy.deepcopy(spec.cfg)
    cfg.train.device = "meta"
    cfg.model.pretrained = False                     # same shapes; nothing to load
    engine = backend in ("onnxruntime", "tensorrt")
    if engine or backend == "none":
        cfg.teacher_backend = "torch"
    sim = StepSpec(**{**spec.__dict__, "cfg": cfg})
    est = Estimate(teacher_backend=backend)
    c, ph = est.components, est.phases
    mode = LiveBytes()
    with torch.device("meta"), mode:
        h = StepHarness(sim, "meta", build=False)
        h.build_student()
        if spec.cfg.model.pretrained:
            _load_transient(mode)
        c["weights"] = mode.live
        mark = mode.live
        size = cfg.model.input_size
        images = torch.empty(max(n_images, cfg.train.batch_size), 3, size, size, dtype=torch.uint8)
        c["images"] = mode.live - mark
        ph["load"] = mode.live

        mark = mode.live
        h.make_teacher()
        c["teacher"] = mode.live - mark
        ph["teacher setup"] = mode.live
        h.widen()

        mark = mode.live
        mode.reset_peak()
        z_all = h.encode_images(images if h.cached else images[: cfg.train.batch_size])
        ph["encode"] = mode.peak
        c["z cache"] = mode.live - mark
        encode_transient = mode.peak - mode.live      # the trunk's activations of one chunk

        mark = mode.live
        mode.reset_peak()
        targets = h.precompute(z_all)
        ph["teacher targets"] = mode.peak
        c["targets"] = mode.live - mark
        teacher_forward_peak = mode.peak - mark
        est.teacher_released = h.release_teacher()    # as the learner does: not resident while training

        mark = mode.live
        h.set_batch(z_all, targets)
        h.make_optimizer()
        c["batch"] = mode.live - mark
        if not h.cached:
            del z_all
        before = mode.live
        mode.reset_peak()
        saved = SavedBytes(h)
        for i in range(1 + STEPS):
            if i == STEPS:
                with saved.hooks():
                    h.step()
            else:
                h.step()
        ph["train step"] = mode.peak
        mark = mode.allocated
        h.student.forward_top(h.z)                     # what one forward allocates (then freed)
        forward_allocated = mode.allocated - mark
        c["gradients"] = sum(p.grad.numel() * p.grad.element_size() for p in h.params if p.grad is not None)
        c["optimizer"] = sum(v.numel() * v.element_size() for st in h.opt.state.values()
                             for v in st.values() if torch.is_tensor(v))
        c["activations"] = saved.total
        c["workspace"] = mode.peak - before - c["gradients"] - c["optimizer"] - c["activations"]
        if engine:
            # the engine replaces the torch copy simulated above: its weights (the top and
            # head only: it takes z) plus an arena the size of its largest forward
            graph = _param_bytes(h.student.top) + _param_bytes(h.student.head)
            if backend == "onnxruntime":
                engine_bytes = ORT_FIXED_BYTES + ORT_WEIGHT_COPIES * graph + teacher_forward_peak
            else:
                engine_bytes = graph + teacher_forward_peak
            delta = engine_bytes - c["teacher"]
            c["teacher"] = engine_bytes
            for name in ("teacher setup", "encode", "teacher targets"):
                ph[name] += delta
            if est.teacher_released and backend == "onnxruntime":
                c["teacher (released, kept)"] = ORT_ENV_BYTES   # ONNX Runtime's process-wide environment
                ph["train step"] += ORT_ENV_BYTES
            elif not est.teacher_released:
                ph["train step"] += delta
            est.notes.append(f"{backend} teacher modelled (module docstring), not simulated")
        elif backend == "none":
            c["teacher"] = 0
        est.flops = forward_flops(h.student, cfg.model.input_size)
    ort_trunk = (spec.cfg.model.freeze_blocks > 0 and h.cached
                 and resolve_trunk(spec.cfg.train.trunk_backend, spec.cfg.train.device) == "onnxruntime")
    if ort_trunk:
        # the encode pass runs in ONNX Runtime (fieldlearn.device.trunk_encoder), not torch
        ph["encode"] -= int((1 - ORT_TRUNK_FRACTION) * encode_transient)
        est.notes.append("encode in ONNX Runtime: modelled as a fraction of torch's activations")
    if spec.cfg.train.device == "cpu":
        c["runtime (model)"] = CPU_RUNTIME_BYTES
        for name in ("teacher targets", "train step") + (() if ort_trunk else ("encode",)):
            ph[name] += CPU_RUNTIME_BYTES
        c["allocator (model)"] = int(GLIBC_STEP_FRACTION * forward_allocated)
        ph["train step"] += c["allocator (model)"]
        est.notes.append("CPU: + runtime and allocator terms (module docstring)")
    if spec.cfg.train.device.startswith("cuda") and not is_jetson():
        # the images stay in host memory (the learner moves each batch to the GPU);
        # a discrete GPU's budget does not hold them
        for name in ph:
            ph[name] -= c["images"]
        c["images"] = 0
        est.notes.append("images in host memory, not counted against the GPU")
    return est


def forward_flops(student, input_size: int) -> dict[str, int]:
    """Forward FLOPs per image of the frozen trunk and of the trainable top + head (meta device).

    Only forward passes are counted (torch's counter overcounts grouped-conv backward); a
    training step is taken as 3 forwards of the top, 4 with checkpointing.
    """
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    was = student.training
    student.eval()
    with torch.no_grad(), torch.device("meta"):
        x = torch.empty(1, 3, input_size, input_size)
        with FlopCounterMode(display=False) as fc:
            z = student.trunk(x)
        trunk = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            student.forward_top(z)
        top = fc.get_total_flops()
    student.train(was)
    return {"trunk": int(trunk), "top": int(top)}


def _load_transient(mode: LiveBytes) -> None:
    """Loading pretrained weights holds torchvision's whole network (classifier included)
    and the state dict it loads, both at once, for a moment."""
    from torch.utils._python_dispatch import _disable_current_modes  # noqa: PLC0415
    from torchvision.models import mobilenet_v2  # noqa: PLC0415

    with _disable_current_modes(), torch.device("meta"):
        full = sum(t.numel() * t.element_size() for t in mobilenet_v2().state_dict().values())
    mode.peak = max(mode.peak, mode.live + 2 * full)
