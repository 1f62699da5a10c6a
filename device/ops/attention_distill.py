"""Attention distillation loss (LAD of Learning without Memorizing), one op.

For a head that is global-average-pool -> linear, Grad-CAM of class c at the last
conv layer is exactly ReLU(sum_k W[c, k] * A_k) up to a positive factor 1/(h*w)
that the L2 normalisation removes. So the student's map needs no backward pass to
build, and the gradient of LAD w.r.t. the student's features and head row is exact
with an ordinary (single) backward.

    attention_distill(feat_s, w_s, q_t) -> scalar

    feat_s  [B, C, h, w]  student's last conv feature map (float32/16/bf16)
    w_s     [B, C]        student head row of class b_i for each sample i
                          (W_s[b] gathered: the gradient reaches W_s through the gather)
    q_t     [B, h*w]      teacher's Grad-CAM map of the same class, already L2-normalised
                          (a constant: the teacher is frozen)

    LAD = mean_i sum_j | q_t[i, j] - q_s[i, j] |,   q_s = relu(cam_s) / ||relu(cam_s)||_2

`attention_distill_ref` is the pure-PyTorch twin; `attention_distill` dispatches to
the fused CUDA kernel (fieldlearn.device.ops.cuda_attention) when the tensors are on
CUDA and the kernel loads, and to the reference otherwise. Set
FIELDLEARN_FORCE_REF=1 to force the reference everywhere (debugging).
"""

from __future__ import annotations

import os

import torch

EPS = 1e-12


def attention_distill_ref(feat_s: torch.Tensor, w_s: torch.Tensor, q_t: torch.Tensor,
                          eps: float = EPS) -> torch.Tensor:
    """Pure-PyTorch LAD.

    feat_s [B, C, h, w], w_s [B, C], q_t [B, h*w] (L2-normalised, no grad) -> [] float32.
    Accumulates in float32 whatever the input dtype (float64 stays float64 for gradcheck).
    """
    check_shapes(feat_s, w_s, q_t)
    acc = torch.float64 if feat_s.dtype == torch.float64 else torch.float32
    cam = torch.einsum("bc,bchw->bhw", w_s.to(acc), feat_s.to(acc)).flatten(1)  # [B, hw]
    cam = cam.relu()
    q_s = cam / cam.norm(dim=1, keepdim=True).clamp_min(eps)                    # [B, hw]
    return (q_s - q_t.to(acc)).abs().sum(dim=1).mean()


def check_shapes(feat_s: torch.Tensor, w_s: torch.Tensor, q_t: torch.Tensor) -> None:
    if feat_s.dim() != 4:
        raise ValueError(f"attention_distill: feat_s must be [B, C, h, w], got {tuple(feat_s.shape)}")
    b, c, h, w = feat_s.shape
    if tuple(w_s.shape) != (b, c):
        raise ValueError(f"attention_distill: w_s must be [B, C]=({b}, {c}), got {tuple(w_s.shape)}")
    if tuple(q_t.shape) != (b, h * w):
        raise ValueError(f"attention_distill: q_t must be [B, h*w]=({b}, {h * w}), got {tuple(q_t.shape)}")


def force_ref() -> bool:
    return os.environ.get("FIELDLEARN_FORCE_REF", "") not in ("", "0")


def attention_distill(feat_s: torch.Tensor, w_s: torch.Tensor, q_t: torch.Tensor) -> torch.Tensor:
    """LAD through the fused CUDA kernel where possible, the reference otherwise."""
    if feat_s.is_cuda and not force_ref():
        from fieldlearn.device.ops import cuda_attention  # noqa: PLC0415 - loads cuda-python lazily

        if cuda_attention.available():
            return cuda_attention.AttentionDistillFn.apply(feat_s, w_s, q_t)
    return attention_distill_ref(feat_s, w_s, q_t)
