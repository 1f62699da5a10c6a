"""ONNX export of the student: the deployable classifier and the teacher graph.

    classifier  input_0 [B, 3, H, W] (normalised RGB) -> output_0 [B, K] logits
                                                         (+ features [B, C, h, w] if asked)
    teacher     z [B, C_k, H/s, W/s] (trunk output)   -> logits [B, K], features [B, C, h, w]

The teacher graph returns the last conv feature map next to the logits: with the head's
weight, that is all the closed-form Grad-CAM needs (fieldlearn.device.attention), so the
teacher never needs a backward pass and can run in ONNX Runtime or TensorRT.

Models are exported with the TorchScript exporter (dynamo=False, opset 17: about 1 s for
MobileNetV2, loadable by TensorRT 8.6 and 10.x) with a dynamic batch axis, carry their
class names, input size, normalisation, fieldlearn version and step in the ONNX metadata
(fieldlearn.runtime.metadata), pass onnx.checker, and are written atomically.

A model here is anything with `forward(x) -> (features, logits)` and
`forward_top(z) -> (features, logits)` (the Student; the teacher graph is what trains),
and optionally `predict(x) -> (features, logits)`, the deployed classifier where it is not
the trained head (a head solved from class statistics: normalisation + one linear layer,
plain ONNX ops). Nothing from fieldlearn.device is imported, so export stays usable from
the runtime side.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from fieldlearn.runtime import metadata as md
from fieldlearn.runtime.atomic import atomic_write_bytes
from fieldlearn.runtime.engines import Batch, OrtEngine, TorchEngine, cross_validate
from fieldlearn.runtime.layout import LABELS_FILE, ONNX_FILE
from fieldlearn.runtime.metadata import fieldlearn_version

OPSET = 17


class ClassifierGraph(nn.Module):
    """image -> logits (and the last feature map when with_features)."""

    def __init__(self, model: nn.Module, with_features: bool = False):
        super().__init__()
        self.model = model
        self.with_features = with_features

    @property
    def output_names(self) -> list[str]:
        return [md.OUTPUT_NAME, md.FEATURES_NAME] if self.with_features else [md.OUTPUT_NAME]

    def forward(self, x: torch.Tensor):
        predict = getattr(self.model, "predict", self.model)   # the deployed classifier where it differs
        feats, logits = predict(x)               # [B, C, h, w], [B, K]
        return (logits, feats) if self.with_features else logits


class TeacherGraph(nn.Module):
    """trunk output z -> (logits, last feature map): what a teacher engine computes."""

    output_names = list(md.TEACHER_OUTPUTS)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor):
        feats, logits = self.model.forward_top(z)  # [B, C, h, w], [B, K]
        return logits, feats


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every submodule's own train/eval flag restored
    (model.train(True) would undo a frozen-BatchNorm setting)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def onnx_bytes(model: nn.Module, input_shape: Sequence[int], *, metadata: dict[str, Any],
               output_names: Sequence[str], input_name: str = md.INPUT_NAME, dynamic_batch: bool = True) -> bytes:
    """`model` (forward(input) -> one tensor or a tuple in `output_names` order) as a checked
    ONNX model, float32, opset 17, with `metadata` JSON-encoded into metadata_props.

    The model is traced in eval mode under no_grad; its own train/eval flags are restored.
    """
    import onnx  # noqa: PLC0415

    param = next(model.parameters(), None)
    dummy = torch.zeros(tuple(input_shape), dtype=torch.float32,
                        device=param.device if param is not None else "cpu")
    axes = {name: {0: "batch"} for name in (input_name, *output_names)} if dynamic_batch else None
    buf = io.BytesIO()
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (1 s vs 20 s, opset 17 for TensorRT 8.6).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=OPSET,
                          input_names=[input_name], output_names=list(output_names),
                          dynamic_axes=axes, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    del proto.metadata_props[:]
    for key, value in md.encode(metadata).items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "fieldlearn", fieldlearn_version()
    onnx.checker.check_model(proto, full_check=True)   # also runs shape inference
    return proto.SerializeToString()


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int], *, metadata: dict[str, Any],
                output_names: Sequence[str], input_name: str = md.INPUT_NAME,
                dynamic_batch: bool = True) -> Path:
    """onnx_bytes of `model`, written atomically to `path`."""
    path = Path(path)
    atomic_write_bytes(path, onnx_bytes(model, input_shape, metadata=metadata, output_names=output_names,
                                         input_name=input_name, dynamic_batch=dynamic_batch))
    return path


def classifier_metadata(model: nn.Module, *, classes: Sequence[str], step: int, **extra: Any) -> dict[str, Any]:
    """The metadata of a deployable classifier, read from the model's ModelConfig (`.cfg`)."""
    cfg = model.cfg
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    return {"classes": list(classes), "input_size": int(cfg.input_size), "mean": list(cfg.mean),
            "std": list(cfg.std), "arch": cfg.arch, "variant": cfg.variant, "width": cfg.width,
            "fieldlearn_version": fieldlearn_version(), "step": int(step), "graph": "classifier", **extra}


def export_classifier(model: nn.Module, out_dir: str | Path, *, classes: Sequence[str], step: int,
                      with_features: bool = False, **extra_metadata: Any) -> Path:
    """OUT/model.onnx (input_0 -> output_0 [, features]) and OUT/labels.txt; returns the ONNX path."""
    out_dir = Path(out_dir)
    size = int(model.cfg.input_size)
    meta = classifier_metadata(model, classes=classes, step=step, **extra_metadata)
    graph = ClassifierGraph(model, with_features)
    path = export_onnx(graph, out_dir / ONNX_FILE, (1, 3, size, size), metadata=meta,
                       output_names=graph.output_names)
    atomic_write_bytes(out_dir / LABELS_FILE, md.write_labels_text(list(classes)).encode("utf-8"))
    return path


def trunk_output_shape(model: nn.Module, batch: int = 1) -> tuple[int, ...]:
    """Shape of z = model.trunk(x) for x [batch, 3, S, S] with S = model.cfg.input_size."""
    size = int(model.cfg.input_size)
    param = next(model.parameters())
    with eval_mode(model), torch.no_grad():
        z = model.trunk(torch.zeros(1, 3, size, size, device=param.device))
    return (batch, *z.shape[1:])


def export_teacher(model: nn.Module, path: str | Path, *, step: int = -1, **extra_metadata: Any) -> Path:
    """The teacher graph z -> (logits, features) of `model`, dynamic batch."""
    meta = {"graph": "teacher", "fieldlearn_version": fieldlearn_version(), "step": int(step),
            "num_classes": int(model.num_classes), **extra_metadata}
    return export_onnx(TeacherGraph(model), path, trunk_output_shape(model), metadata=meta,
                       input_name=md.TEACHER_INPUT, output_names=TeacherGraph.output_names)


def check_parity(model: nn.Module, onnx_path: str | Path, inputs: Batch, rtol: float = 1e-3, *,
                 threads: int = 0) -> dict[str, float]:
    """Relative error of ONNX Runtime vs torch, per output, on the same inputs.

    `model` is the exported module (ClassifierGraph / TeacherGraph, or anything whose forward
    returns the outputs in the ONNX file's order). Raises fieldlearn.runtime.engines.
    ParityError above rtol, or when torch's outputs are ~0 or the same for every input
    (an untrained net in eval mode outputs its head bias whatever the image, which would
    make any check pass): warm its BatchNorm statistics or use real images.
    """
    ort_engine = OrtEngine(onnx_path, threads=threads, providers=["CPUExecutionProvider"])
    with eval_mode(model):
        torch_engine = TorchEngine(model, ort_engine.output_names, ort_engine.input_names)
        return cross_validate(ort_engine, torch_engine, inputs, rtol=rtol)
