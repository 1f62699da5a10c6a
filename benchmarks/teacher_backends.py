"""Teacher forward time: ONNX Runtime vs torch eager, measured in the same run.

    python benchmarks/teacher_backends.py [--batch 64] [--repeats 20] [--threads N]

The default model config (pretrained MobileNetV2, 14 frozen blocks, 128x128 input) gives
a trunk output z [B, 96, 8, 8]; the teacher runs the remaining blocks and the head:
z -> (logits, features [B, 1280, 4, 4]). Both backends get the same z and the same
number of threads; the two are timed alternately (so a busy shared machine slows both
alike) and the median of the repeats after warm-up is reported, with their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fieldlearn.device.config import ModelConfig
from fieldlearn.device.engine_teacher import EngineTeacher
from fieldlearn.device.model import Student
from fieldlearn.device.teacher import TorchTeacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for both backends")
    p.add_argument("--classes", type=int, default=50, help="base classes of the teacher's head")
    args = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig()
    student = Student(cfg, args.classes).eval()
    x = torch.randn(args.batch, 3, cfg.input_size, cfg.input_size)
    z = student.encode(x)                                                   # [B, 96, 8, 8]

    t0 = time.perf_counter()
    ort_teacher = EngineTeacher(student, "onnxruntime", threads=args.threads)
    setup_s = time.perf_counter() - t0
    torch_teacher = TorchTeacher(student)

    times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    for i in range(args.warmup + args.repeats):
        for name, teacher in (("torch", torch_teacher), ("onnxruntime", ort_teacher)):
            t0 = time.perf_counter()
            out = teacher(z)
            elapsed = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(elapsed)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    a, b = ort_teacher(z), torch_teacher(z)
    rel = {n: float((getattr(a, n) - getattr(b, n)).abs().max() / getattr(b, n).abs().max()) for n in ("logits", "features")}
    print(f"teacher forward, batch {args.batch}: z {list(z.shape)} -> logits {list(out.logits.shape)}, "
          f"features {list(out.features.shape)}; {args.threads} threads; median of {args.repeats} after {args.warmup} warm-up")
    print(f"  torch eager  {med['torch']:8.1f} ms")
    print(f"  onnxruntime  {med['onnxruntime']:8.1f} ms")
    print(f"  ratio torch / onnxruntime = {med['torch'] / med['onnxruntime']:.2f}x")
    print(f"  one-off cost per increment of the ONNX Runtime teacher (export + session): {setup_s:.2f} s")
    print(f"  max relative difference: logits {rel['logits']:.1e}, features {rel['features']:.1e}")
    print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(torch's thread pool slows down far more than ONNX Runtime's on a busy machine)")


if __name__ == "__main__":
    main()
