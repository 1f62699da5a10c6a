"""LC, LD and LAD: the three terms of LwM's loss  L = LC + beta * LD + gamma * LAD."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fieldlearn.device.attention import gradcam_normalized
from fieldlearn.device.ops import attention_distill


def lc(logits: torch.Tensor, labels: torch.Tensor, n_old: int, span: str) -> torch.Tensor:
    """Classification loss on new-class data.

    logits [B, K_old + K_new], labels [B] (global indices, all >= n_old in an increment).
    span "all": cross-entropy over every seen class. On new-class data alone this pushes
    every old logit down and wipes the old classes out (measured: see benchmarks/README.md).
    span "new": cross-entropy over the new classes' logits only; old logits are left to LD.
    (Spans that tied the new logits to the old ones, a calibrated CE, its blend, a margin
    and a data-free anchor, lost on validation and were removed: benchmarks/README.md.)
    """
    if span == "all" or n_old == 0:
        return F.cross_entropy(logits, labels)
    if span == "new":
        return F.cross_entropy(logits[:, n_old:], labels - n_old)
    raise ValueError(f"lc span must be 'all' or 'new', got {span!r}")


def ld_bce(student_old: torch.Tensor, teacher_old: torch.Tensor) -> torch.Tensor:
    """Distillation on base-class logits with sigmoid targets (LwF-MC / iCaRL form).

    student_old, teacher_old [B, K_old] -> [] : sum over classes, mean over the batch, of
    BCE(sigmoid(teacher), sigmoid(student)) = -[s(y) log s(y^) + (1 - s(y)) log(1 - s(y^))].

    The one-term form -sum s(y) log s(y^) that some summaries of LwM write is minimised
    by driving every base logit to +infinity (its gradient s(y)(s(y^) - 1) is never
    positive), so it does not preserve the teacher's responses; the full BCE is
    minimised exactly at y^ = y.
    """
    target = torch.sigmoid(teacher_old)
    return F.binary_cross_entropy_with_logits(student_old, target, reduction="sum") / student_old.shape[0]


def ld_kd(student_old: torch.Tensor, teacher_old: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax knowledge distillation (Hinton; LwF): T^2 * KL(p_T(teacher) || p_T(student))."""
    t = temperature
    log_p_s = F.log_softmax(student_old / t, dim=1)
    p_t = F.softmax(teacher_old / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (t * t)


def ld(student_old: torch.Tensor, teacher_old: torch.Tensor, form: str, temperature: float) -> torch.Tensor:
    if form == "bce":
        return ld_bce(student_old, teacher_old)
    if form == "kd":
        return ld_kd(student_old, teacher_old, temperature)
    raise ValueError(f"ld form must be 'bce' or 'kd', got {form!r}")


def teacher_maps(teacher_feats: torch.Tensor, teacher_head_weight: torch.Tensor,
                 teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """b = teacher's top-1 base class and its normalised Grad-CAM.

    [B, C, h, w], [K_old, C], [B, K_old] -> (b [B] long, q_t [B, h*w] float32)
    """
    b = teacher_logits.argmax(dim=1)
    return b, gradcam_normalized(teacher_feats, teacher_head_weight, b)


def lad(student_feats: torch.Tensor, student_head_weight: torch.Tensor, b: torch.Tensor,
        q_t: torch.Tensor) -> torch.Tensor:
    """Attention distillation: L1 between the L2-normalised Grad-CAMs of class b.

    student_feats [B, C, h, w] (requires grad), student_head_weight [K, C] (a Parameter:
    the gather keeps the graph, so LAD's gradient reaches both), b [B], q_t [B, h*w].

    The rows are gathered with index_select, not W[b]: the backward of W[b] on a CPU adds
    the rows of samples that share a class with parallel atomic adds once B * C is large
    and torch runs more than one thread, in an order that varies from run to run, which
    made a seeded LwM run irreproducible (index_select's backward adds them in order).
    """
    return attention_distill(student_feats, student_head_weight.index_select(0, b), q_t)
