"""Attention distillation loss (LAD of Learning without Memorizing): the fused op's trio, laid
out as state-spaces/mamba lays out selective_scan_interface.py.

For a head that is global-average-pool -> linear, Grad-CAM of class c at the last
conv layer is exactly ReLU(sum_k W[c, k] * A_k) up to a positive factor 1/(h*w)
that the L2 normalisation removes (fieldlearn.device.attention). So the student's map
needs no backward pass to build, and the gradient of LAD w.r.t. the student's features
and head row is exact with an ordinary (single) backward.

    attention_distill(feat_s, w_s, q_t) -> scalar

    feat_s  [B, C, h, w]  student's last conv feature map (float32/16/bf16)
    w_s     [B, C]        student head row of class b_i for each sample i
                          (W_s[b] gathered: the gradient reaches W_s through the gather)
    q_t     [B, h*w]      teacher's Grad-CAM map of the same class, already L2-normalised
                          (a constant: the teacher is frozen)

    LAD = mean_i sum_j | q_t[i, j] - q_s[i, j] |,   q_s = relu(cam_s) / ||relu(cam_s)||_2

Side by side here: `attention_distill_ref`, the pure-PyTorch reference and the one place
the formula is written; `AttentionDistillFn`, the autograd Function over the compiled
kernels' fused forward and single-pass backward; and `attention_distill`, the dispatcher,
which takes the kernels when the tensors are on CUDA and they load, the reference
otherwise (FIELDLEARN_FORCE_REF=1 forces the reference everywhere, for debugging).
`TorchKernelBackend` is the kernels' contract computed from the reference's own terms,
standing in for the kernels where there is no GPU (tests, self-check). The NVRTC compile
and the launcher live below, in fieldlearn.device.ops.cuda_attention, imported only once a
CUDA tensor arrives.
"""

from __future__ import annotations

import os

import torch

from fieldlearn.device.attention import EPS, class_map, l2_normalize


def check_shapes(feat_s: torch.Tensor, w_s: torch.Tensor, q_t: torch.Tensor) -> None:
    if feat_s.dim() != 4:
        raise ValueError(f"attention_distill: feat_s must be [B, C, h, w], got {tuple(feat_s.shape)}")
    b, c, h, w = feat_s.shape
    if tuple(w_s.shape) != (b, c):
        raise ValueError(f"attention_distill: w_s must be [B, C]=({b}, {c}), got {tuple(w_s.shape)}")
    if tuple(q_t.shape) != (b, h * w):
        raise ValueError(f"attention_distill: q_t must be [B, h*w]=({b}, {h * w}), got {tuple(q_t.shape)}")


# ----------------------------------------------------------------------------- reference

def lad_terms(feat_s: torch.Tensor, w_s: torch.Tensor, q_t: torch.Tensor,
              eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's terms, per sample, accumulated in float32 (float64 stays float64):
    cam [B, hw] (before the ReLU), q_s [B, hw] (L2-normalised), loss_b [B] = sum_j |q_s - q_t|."""
    acc = torch.float64 if feat_s.dtype == torch.float64 else torch.float32
    cam = class_map(feat_s.to(acc), w_s.to(acc))                                 # [B, hw]
    q_s = l2_normalize(cam.relu(), eps)                                          # [B, hw]
    return cam, q_s, (q_s - q_t.to(acc)).abs().sum(dim=1)                        # ..., [B]


def attention_distill_ref(feat_s: torch.Tensor, w_s: torch.Tensor, q_t: torch.Tensor,
                          eps: float = EPS) -> torch.Tensor:
    """Pure-PyTorch LAD.

    feat_s [B, C, h, w], w_s [B, C], q_t [B, h*w] (L2-normalised, no grad) -> [] float32.
    Accumulates in float32 whatever the input dtype (float64 stays float64 for gradcheck).
    """
    check_shapes(feat_s, w_s, q_t)
    return lad_terms(feat_s, w_s, q_t, eps)[2].mean()


class TorchKernelBackend:
    """The kernels' contract (fieldlearn.device.ops.cuda_attention) in plain torch: the forward
    from the reference's terms, the backward the kernels' closed form written out (float32, or
    float64 for float64 inputs so that gradcheck can check it). Stands in for the kernels
    where there is no GPU: `cuda_attention.use_backend(TorchKernelBackend())`."""

    name = "torch"

    def supports(self, feat: torch.Tensor, w: torch.Tensor, qt: torch.Tensor) -> bool:
        return feat.dtype.is_floating_point and feat.numel() > 0

    def head_dtype(self, feat_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
        from fieldlearn.device.ops.cuda_attention import head_dtype  # noqa: PLC0415 - set up by use_backend

        return torch.float64 if feat_dtype == torch.float64 else head_dtype(feat_dtype, w_dtype)

    def workspace_numel(self, feat: torch.Tensor) -> int:
        return 0

    def forward(self, feat, w, qt, out=None, workspace=None):
        from fieldlearn.device.ops.cuda_attention import FwdOut  # noqa: PLC0415 - set up by use_backend

        cam, q, loss_b = lad_terms(feat, w, qt)                                  # [B, HW], [B, HW], [B]
        nraw = cam.clamp_min(0).norm(dim=1)                                      # [B] unclamped norm
        S = (q * (q - qt.to(q.dtype)).sign()).sum(1)                             # [B]
        res = FwdOut(loss_b.mean(), cam, torch.stack([nraw, S], 1), loss_b)
        if out is not None:
            for name in ("loss", "cam", "stats", "loss_b"):
                getattr(out, name).copy_(getattr(res, name))
            return out
        return res

    def backward(self, feat, w, qt, cam, stats, grad, out=None):
        acc = cam.dtype
        B = feat.shape[0]
        nraw, S = stats[:, 0:1], stats[:, 1:2]                                    # [B, 1]
        clamped = nraw < EPS
        n = torch.where(clamped, torch.full_like(nraw, EPS), nraw)
        gB = grad.to(acc) / B
        q = cam.clamp_min(0) / n
        sg = (q - qt.to(acc)).sign()
        dc = torch.where(cam > 0, gB * torch.where(clamped, sg, sg - q * S) / n, torch.zeros_like(cam))
        A = feat.to(acc).flatten(2)                                               # [B, C, HW]
        dfeat = (w.to(acc)[:, :, None] * dc[:, None, :]).view(feat.shape).to(feat.dtype)
        dw = torch.einsum("bj,bcj->bc", dc, A).to(w.dtype)
        if out is not None:
            out[0].copy_(dfeat)
            out[1].copy_(dw)
            return out
        return dfeat, dw


# ----------------------------------------------------------------------------- autograd

class AttentionDistillFn(torch.autograd.Function):
    """LAD through the backend's fused forward and single-pass backward.

    Inputs are made contiguous; head rows of a dtype the kernels do not pair with the feature
    dtype are cast to float32 (their gradient is cast back); q_t is read as float32 (a
    gradient for it, rarely wanted since the teacher is frozen, is computed in torch).
    """

    @classmethod
    def apply(cls, feat_s, w_s, q_t):  # type: ignore[override]
        # Inputs the backend cannot take (float64, empty batches) go to the reference, so
        # that the dispatcher may send any CUDA tensor here.
        from fieldlearn.device.ops.cuda_attention import get_backend  # noqa: PLC0415 - cuda-python lazily

        if not get_backend().supports(feat_s, w_s, q_t):
            return attention_distill_ref(feat_s, w_s, q_t)
        return super().apply(feat_s, w_s, q_t)

    @staticmethod
    def forward(ctx, feat_s: torch.Tensor, w_s: torch.Tensor, q_t: torch.Tensor) -> torch.Tensor:
        check_shapes(feat_s, w_s, q_t)
        if not (feat_s.device == w_s.device == q_t.device):
            raise ValueError(f"attention_distill: feat_s, w_s and q_t must be on one device, got "
                             f"{feat_s.device}, {w_s.device}, {q_t.device}")
        from fieldlearn.device.ops.cuda_attention import get_backend  # noqa: PLC0415

        backend = get_backend()
        acc = torch.float64 if feat_s.dtype == torch.float64 else torch.float32
        feat = feat_s.detach().contiguous()
        w = w_s.detach().to(backend.head_dtype(feat_s.dtype, w_s.dtype)).contiguous()
        qt = q_t.detach().to(acc).contiguous()
        res = backend.forward(feat, w, qt)
        ctx.save_for_backward(feat, w, qt, res.cam, res.stats)
        ctx.backend = backend
        ctx.w_dtype = w_s.dtype
        ctx.qt_dtype = q_t.dtype
        return res.loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        feat, w, qt, cam, stats = ctx.saved_tensors
        need_feat, need_w, need_qt = ctx.needs_input_grad
        dfeat = dw = dqt = None
        if need_feat or need_w:
            dfeat, dw = ctx.backend.backward(feat, w, qt, cam, stats, grad)
            dfeat = dfeat if need_feat else None
            dw = dw.to(ctx.w_dtype) if need_w else None
        if need_qt:  # d/dqt |q - qt| = -sign(q - qt), times g / B
            n = stats[:, 0:1].clamp_min(EPS)
            q = cam.clamp_min(0) / n
            dqt = (-(grad.to(cam.dtype) / feat.shape[0]) * (q - qt).sign()).to(ctx.qt_dtype)
        return dfeat, dw, dqt


# ----------------------------------------------------------------------------- dispatcher

def force_ref() -> bool:
    return os.environ.get("FIELDLEARN_FORCE_REF", "") not in ("", "0")


def attention_distill(feat_s: torch.Tensor, w_s: torch.Tensor, q_t: torch.Tensor) -> torch.Tensor:
    """LAD through the fused CUDA kernel where possible, the reference otherwise."""
    if feat_s.is_cuda and not force_ref():
        from fieldlearn.device.ops import cuda_attention  # noqa: PLC0415 - loads cuda-python lazily

        if cuda_attention.available():
            return AttentionDistillFn.apply(feat_s, w_s, q_t)
    return attention_distill_ref(feat_s, w_s, q_t)
