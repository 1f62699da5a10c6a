"""LC / LD / LAD: the gradients that make LwM LwM."""

import pytest
import torch
import torch.nn.functional as F

from fieldlearn.device import losses
from fieldlearn.device.attention import gradcam_autograd, l2_normalize
from fieldlearn.device.methods import Batch, make_method
from fieldlearn.device.config import LossConfig
from fieldlearn.device.ops import attention_distill_ref


def _setup(seed=0, b=5, c=12, hw=(4, 4), k=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, c, *hw, generator=g, dtype=dtype).requires_grad_(True)
    head = torch.nn.Linear(c, k).to(dtype)
    t_feats = torch.randn(b, c, *hw, generator=g, dtype=dtype)
    t_w = torch.randn(k - 2, c, generator=g, dtype=dtype)
    t_logits = t_feats.mean((2, 3)) @ t_w.T                           # [B, K_old]
    return feats, head, t_feats, t_w, t_logits


def test_lad_gradient_reaches_student_features_and_head():
    feats, head, t_feats, t_w, t_logits = _setup()
    b, q_t = losses.teacher_maps(t_feats, t_w, t_logits)
    loss = losses.lad(feats, head.weight, b, q_t)
    loss.backward()
    assert loss.item() > 0
    assert feats.grad is not None and feats.grad.abs().sum() > 0, "LAD must reach the student's features"
    assert head.weight.grad is not None and head.weight.grad[b].abs().sum() > 0, "LAD must reach W_s[b]"
    rows_not_b = sorted(set(range(head.weight.shape[0])) - set(b.tolist()))
    assert head.weight.grad[rows_not_b].abs().sum() == 0


def test_lad_gradient_equals_double_backward_gradcam_oracle():
    """The closed-form LAD's gradient == the gradient of LAD built from autograd
    Grad-CAM with create_graph=True (a double backward through the head)."""
    feats, head, t_feats, t_w, t_logits = _setup(seed=1)
    b, q_t = losses.teacher_maps(t_feats, t_w, t_logits)

    loss = losses.lad(feats, head.weight, b, q_t)
    g_feats, g_w = torch.autograd.grad(loss, (feats, head.weight))

    def logits_fn(a):
        return head(a.mean((2, 3)))

    q_s = l2_normalize(gradcam_autograd(feats, logits_fn, b, create_graph=True))
    oracle = (q_s - q_t).abs().sum(1).mean()
    o_feats, o_w = torch.autograd.grad(oracle, (feats, head.weight))
    torch.testing.assert_close(loss, oracle)
    torch.testing.assert_close(g_feats, o_feats, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(g_w, o_w, rtol=1e-7, atol=1e-10)


def test_lad_gradient_matches_finite_differences():
    feats, head, t_feats, t_w, t_logits = _setup(seed=2, b=3, c=5, hw=(3, 3))
    b, q_t = losses.teacher_maps(t_feats, t_w, t_logits)
    w_s = head.weight[b].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(attention_distill_ref, (feats, w_s, q_t.double()))


def test_detached_maps_would_be_caught():
    """Guard against the public-code bug: a LAD built from detached maps has no gradient."""
    feats, head, t_feats, t_w, t_logits = _setup(seed=3)
    b, q_t = losses.teacher_maps(t_feats, t_w, t_logits)
    loss = attention_distill_ref(feats.detach(), head.weight[b].detach(), q_t)
    assert not loss.requires_grad
    loss = losses.lad(feats, head.weight, b, q_t)
    assert loss.requires_grad


def test_ld_bce_is_minimised_at_the_teacher_logits():
    t = torch.randn(8, 5, dtype=torch.float64)
    s = t.clone().requires_grad_(True)
    losses.ld_bce(s, t).backward()
    assert s.grad.abs().max() < 1e-12, "full BCE has zero gradient when student == teacher"
    # The one-term form -sum s(y) log s(y^) keeps pushing logits up at the same point.
    s2 = t.clone().requires_grad_(True)
    (-(torch.sigmoid(t) * F.logsigmoid(s2)).sum(1).mean()).backward()
    assert (s2.grad < 0).all()


def test_ld_kd_zero_at_teacher_and_positive_elsewhere():
    t = torch.randn(4, 6)
    assert losses.ld_kd(t, t, 2.0).abs() < 1e-6
    assert losses.ld_kd(t + torch.randn(4, 6), t, 2.0) > 0


def test_lc_spans():
    logits = torch.randn(4, 7, requires_grad=True)
    labels = torch.tensor([4, 5, 6, 4])
    losses.lc(logits, labels, n_old=4, span="new").backward()
    assert logits.grad[:, :4].abs().sum() == 0, "span new must not touch old logits"
    logits.grad = None
    losses.lc(logits, labels, n_old=4, span="all").backward()
    assert logits.grad[:, :4].abs().sum() > 0


def test_methods_return_their_terms():
    feats, head, t_feats, t_w, t_logits = _setup(dtype=torch.float32)
    b, q_t = losses.teacher_maps(t_feats, t_w, t_logits)
    logits = head(feats.mean((2, 3)))
    batch = Batch(labels=torch.tensor([4, 5, 4, 5, 4]), n_old=4, feats=feats, logits=logits,
                  head_weight=head.weight, teacher_logits=t_logits, teacher_class=b, teacher_map=q_t)
    cfg = LossConfig()
    assert set(make_method("finetune", cfg).terms(batch)) == {"lc"}
    assert set(make_method("lwf_mc", cfg).terms(batch)) == {"lc", "ld"}
    assert set(make_method("lwm", cfg).terms(batch)) == {"lc", "ld", "lad"}
    assert set(make_method("lc_lad", cfg).terms(batch)) == {"lc", "lad"}


def test_lad_gradient_is_bit_identical_run_to_run_on_several_threads():
    """If this fails, an LwM run is not reproducible from its seed: LAD's gradient into the
    head rows W_s[b] is summed in an order that depends on thread scheduling (torch's CPU
    backward of W[b] adds duplicate rows with parallel atomic adds once the batch is large
    and more than one thread runs), so the same command gives different tables."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        b_, c, k = 64, 1280, 6                          # B * C above torch's parallel grain (32768)
        feats = torch.randn(b_, c, 4, 4, generator=g)
        head = torch.randn(k, c, generator=g, requires_grad=True)
        cls = torch.randint(0, 3, (b_,), generator=g)  # many samples share a teacher class
        q_t = l2_normalize(torch.rand(b_, 16, generator=g))
        grads = [torch.autograd.grad(losses.lad(feats.clone().requires_grad_(True), head, cls, q_t), head)[0]
                 for _ in range(12)]
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(grads[0], gw) for gw in grads[1:])


def test_ld_forms_equal_their_formulas_written_out():
    """If this fails, LD is not the loss the README names: the BCE form lost its mean over the
    batch, or KD its T^2 factor, its temperature, or the direction of its KL (KL(teacher ||
    student), as in Hinton et al. and LwF). The formulas are written here in plain torch."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.sigmoid(t)
    bce = -(y * torch.log(torch.sigmoid(s)) + (1 - y) * torch.log(1 - torch.sigmoid(s))).sum() / 5
    torch.testing.assert_close(losses.ld(s, t, "bce", 2.0), bce)
    T = 3.0
    p_t, p_s = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    kd = T * T * (p_t * (p_t.log() - p_s.log())).sum() / 5
    torch.testing.assert_close(losses.ld(s, t, "kd", T), kd)


def test_lc_span_new_leaves_the_old_logits_alone_with_one_old_class():
    """If this fails, span "new" falls back to the cross-entropy over every class for some
    number of old classes other than 0 (here 1)."""
    logits = torch.randn(3, 3, requires_grad=True)
    losses.lc(logits, torch.tensor([1, 2, 1]), n_old=1, span="new").backward()
    assert logits.grad[:, 0].abs().sum() == 0


def test_unknown_spans_and_forms_are_refused():
    """If this fails, a typo in a loss setting trains with no LC or LD term at all (None)."""
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="span"):
        losses.lc(x, torch.tensor([1, 2]), n_old=1, span="old")
    with pytest.raises(ValueError, match="form"):
        losses.ld(x, x, "mse", 2.0)


def test_each_method_declares_what_it_uses_and_whether_it_trains():
    """If this fails, the learner runs (or skips) the teacher for the wrong methods: fine-tuning
    paying for a teacher pass, LwF-MC or LwM without the teacher's logits or maps; or a
    training method is taken for `none` and trains nothing, or a method claims to store data."""
    cfg = LossConfig()
    flags = {n: (m.uses_teacher_logits, m.uses_teacher_maps, m.trains, m.stores_data)
             for n, m in ((n, make_method(n, cfg)) for n in ("finetune", "lwf_mc", "lwm", "lc_lad", "none"))}
    assert flags == {"finetune": (False, False, True, False), "lwf_mc": (True, False, True, False),
                     "lwm": (True, True, True, False), "lc_lad": (False, True, True, False),
                     "none": (False, False, False, False)}


def test_an_unknown_method_is_a_user_error_naming_the_choices():
    """If this fails, `--method lmw` ends in a KeyError traceback instead of the list of methods."""
    from fieldlearn.runtime.errors import UserError

    with pytest.raises(UserError, match="lwm"):
        make_method("lmw", LossConfig())


def test_a_method_without_terms_refuses_to_train():
    """If this fails, a method with no loss terms (`none`, or one that forgot to define them)
    hands the learner None instead of stopping it."""
    from fieldlearn.device.methods import Method

    with pytest.raises(NotImplementedError):
        Method(LossConfig()).terms(None)
    with pytest.raises(RuntimeError, match="none"):
        make_method("none", LossConfig()).terms(None)
