"""Grad-CAM at the last conv layer, closed form and autograd oracle.

For logits = head(GAP(A)) with A [B, C, h, w], d logit_c / d A_k(j) = W[c, k] / (h*w) at
every position j, so Grad-CAM's channel weights alpha_k = mean_j of that = W[c, k] / (h*w)
and the map ReLU(sum_k alpha_k A_k) = ReLU(sum_k W[c, k] A_k) / (h*w). After L2
normalisation the positive factor is gone: `gradcam` below is exact, with no backward.
`gradcam_autograd` builds the map the textbook way (hooks + autograd.grad) and is the
test oracle; with create_graph=True it is differentiable (double backward).

This module owns the maps and their normalisation floor EPS; the fused LAD op
(fieldlearn.device.ops.attention_distill) builds on them, never the other way round.
"""

from __future__ import annotations

from typing import Callable

import torch

EPS = 1e-12   # floor of a map's L2 norm: an all-zero map stays zero instead of 0/0


def class_map(feats: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The closed form before its ReLU: sum_k w[b, k] A_k, in feats' dtype.

    feats [B, C, h, w], w [B, C] (each sample's head row) -> [B, h*w]. The one copy of the
    formula: gradcam below, the fused LAD op's reference and the self-check's inputs use it.
    """
    return torch.einsum("bc,bchw->bhw", w.to(feats.dtype), feats).flatten(1)


def gradcam(feats: torch.Tensor, head_weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Unnormalised closed-form Grad-CAM.

    feats [B, C, h, w], head_weight [K, C], classes [B] (long) -> [B, h*w], >= 0.
    """
    return class_map(feats, head_weight[classes]).relu()       # head rows [B, C]


def l2_normalize(maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """maps [B, N] -> each row divided by its L2 norm (zero rows stay zero)."""
    return maps / maps.norm(dim=1, keepdim=True).clamp_min(eps)


def gradcam_normalized(feats: torch.Tensor, head_weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w], [K, C], [B] -> [B, h*w] L2-normalised maps (what LAD compares)."""
    return l2_normalize(gradcam(feats, head_weight, classes).float())


def gradcam_autograd(feats: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                     classes: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Textbook Grad-CAM (Selvaraju et al.): alpha = spatial mean of d y_c / d A.

    feats [B, C, h, w] (must require grad or be part of a graph), logits_fn maps feats to
    logits [B, K], classes [B] -> [B, h*w] (unnormalised). Each sample's score only
    depends on its own features, so one backward of the sum gives every sample's gradient.
    """
    if not feats.requires_grad:
        feats = feats.detach().requires_grad_(True)
    return gradcam_of_graph(logits_fn(feats), feats, classes, create_graph)


def gradcam_of_graph(logits: torch.Tensor, feats: torch.Tensor, classes: torch.Tensor,
                     create_graph: bool = False) -> torch.Tensor:
    """The same from logits [B, K] already computed from feats [B, C, h, w] (e.g. activations
    caught by a forward hook, as public LwM code does) -> [B, h*w] (unnormalised)."""
    score = logits.gather(1, classes[:, None]).sum()
    (grad,) = torch.autograd.grad(score, feats, create_graph=create_graph)  # [B, C, h, w]
    alpha = grad.mean(dim=(2, 3), keepdim=True)                            # [B, C, 1, 1]
    return (alpha * feats).sum(1).flatten(1).relu()                        # [B, h*w]
