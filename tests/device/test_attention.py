"""Closed-form Grad-CAM must equal textbook (autograd) Grad-CAM after L2 normalisation.

If this fails, LAD compares the wrong maps: the closed form ReLU(W[c] . A) is only valid
for a GAP -> linear head, and any change to the head (e.g. a nonlinearity) breaks it.
"""

import torch

from fieldlearn.device.attention import gradcam, gradcam_autograd, gradcam_normalized, l2_normalize
from fieldlearn.device.model import build_student


def test_closed_form_equals_autograd_on_random_features_several_classes_per_batch():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 40, 5, 5, generator=g).relu()      # [B, C, h, w] like a ReLU6 output
    head = torch.nn.Linear(40, 9)
    classes = torch.tensor([0, 3, 8, 3, 1, 7])                 # different class per sample

    def logits_fn(a):
        return head(a.mean((2, 3)))

    ref = l2_normalize(gradcam_autograd(feats, logits_fn, classes))
    got = gradcam_normalized(feats, head.weight, classes)
    assert got.shape == (6, 25)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_closed_form_equals_autograd_through_the_real_student(tiny_cfg):
    torch.manual_seed(0)
    student = build_student(tiny_cfg.model, 7).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        feats, _ = student(x)
    assert feats.shape[-2:] == (4, 4), "the CIFAR variant must keep a 4x4 last map at 32x32"
    classes = torch.tensor([6, 0, 2, 2, 5])

    def logits_fn(a):  # the student's own head path (dropout is off in eval mode)
        return student.head(student.dropout(a.mean((2, 3))))

    ref = l2_normalize(gradcam_autograd(feats, logits_fn, classes))
    got = gradcam_normalized(feats, student.head.weight, classes)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_gradcam_is_nonnegative_and_zero_rows_stay_zero():
    feats = torch.zeros(2, 4, 3, 3)
    w = torch.randn(3, 4)
    m = gradcam(feats, w, torch.tensor([0, 2]))
    assert (m >= 0).all()
    assert torch.equal(l2_normalize(m), torch.zeros(2, 9))


def test_teacher_maps_are_float32_whatever_the_teacher_gives():
    """If this fails, the teacher's map keeps the teacher's dtype (float16 from an engine,
    float64 here) instead of the float32 that LAD's op and its kernel are written for."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    q = gradcam_normalized(feats, torch.randn(3, 4, generator=g, dtype=torch.float64), torch.tensor([0, 2]))
    assert q.dtype == torch.float32


def test_the_autograd_oracle_leaves_the_callers_features_alone():
    """If this fails, the oracle turns on requires_grad on the caller's own tensor, so a later
    comparison against it runs with a graph the product's path never has."""
    feats = torch.rand(2, 4, 3, 3)
    head = torch.nn.Linear(4, 3)
    gradcam_autograd(feats, lambda a: head(a.mean((2, 3))), torch.tensor([0, 1]))
    assert not feats.requires_grad
