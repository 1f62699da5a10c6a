"""One increment's training step (fieldlearn.device.learner.train_step), seen from outside:
what reaches the student's trainable blocks, and the loss it logs against the paper's
formula written out here in plain torch (not taken from the method objects)."""

from __future__ import annotations

import copy
import math
import dataclasses

import pytest
import torch

from fieldlearn.device.data import ImageSet, to_input
from fieldlearn.device.learner import learn_increment, predict_logits, train_base, train_step
from fieldlearn.device.methods import make_method
from fieldlearn.device.model import build_student
from fieldlearn.device.engine_teacher import make_teacher
from tests.conftest import tiny_config

N_OLD, N_NEW, PER_CLASS = 2, 2, 4


def _cfg(**loss):
    """tiny_config with the paper's linear head, torch everywhere, one batch per epoch and
    no gradient clipping (the clip would rescale the terms' gradients together)."""
    cfg = tiny_config(max_grad_norm=0.0, augment=False, trunk_backend="torch", lr=0.05)
    cfg.model = dataclasses.replace(cfg.model, classifier="linear")
    cfg.teacher_backend = "torch"
    cfg.loss = dataclasses.replace(cfg.loss, **loss)
    return cfg


def _increment(seed: int = 0, cfg=None):
    """(student widened to N_OLD + N_NEW, teacher, new-class data), the nets built from
    cfg.model (default: _cfg()). The teacher is a
    perturbed copy of the student: at the first batch of a real increment the student IS
    its teacher and LAD (an L1 at zero) has no gradient yet, so the difference between
    the two would only show from the second batch on."""
    cfg = cfg or _cfg()
    torch.manual_seed(seed)
    student = build_student(cfg.model, N_OLD)
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randint(0, 256, ((N_NEW * PER_CLASS), 3, 32, 32), generator=g, dtype=torch.uint8)
    _warm_batchnorm(student, to_input(images, 32, cfg.model.mean, cfg.model.std))
    old = copy.deepcopy(student)
    with torch.no_grad():
        for p in [*old.top.parameters(), *old.head.parameters()]:
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    teacher = make_teacher(old, "torch")
    student.widen(N_NEW)
    labels = torch.arange(N_OLD, N_OLD + N_NEW).repeat_interleave(PER_CLASS)
    data = ImageSet(images, labels, [f"c{i}" for i in range(N_OLD + N_NEW)])
    return student, teacher, data


def _warm_batchnorm(student, x):
    """BatchNorm statistics from data: a fresh net's eval-mode features are ~0 (its running
    statistics are the identity), which would leave every loss term without a gradient."""
    bns = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None   # a plain average over the warm-up pass
        m.train()
    with torch.no_grad():
        student(x)
    for m in bns:
        m.momentum = 0.1
    student.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and steadier on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def increment():
    return _increment()


def _step(increment, method: str, **loss):
    """One lwm/lwf_mc/... train_step (one batch) on a copy of the student: (student after, report)."""
    student, teacher, data = increment
    student = copy.deepcopy(student)
    cfg = _cfg(**loss)
    report = train_step(student, make_method(method, cfg.loss), data, n_old=N_OLD, epochs=1, cfg=cfg,
                        teacher=teacher, step=1)
    assert report.optimizer_steps == [1]
    return student, report


def _blocks(student) -> torch.Tensor:
    """The trainable blocks of the top (the head excluded), flattened."""
    return torch.cat([p.detach().flatten() for p in student.top.parameters()])


def test_lad_reaches_the_trainable_blocks_through_a_training_step(increment):
    """If this fails, LwM has quietly become LwF-MC: the attention term's gradient no longer
    reaches the student's feature blocks (e.g. a .detach() of the student features in the
    learner or the method), so gamma changes nothing but the head."""
    w0 = _blocks(increment[0])
    d = {g: _blocks(_step(increment, "lwm", gamma=g)[0]) - w0 for g in (0.0, 1.0, 2.0)}
    lad_part = d[1.0] - d[0.0]
    assert lad_part.abs().max() > 1e-3 * d[0.0].abs().max(), "gamma * LAD moved no weight of the blocks"
    # One SGD step is linear in the gradient: gamma = 2 moves the blocks twice as far as gamma = 1.
    torch.testing.assert_close(d[2.0] - d[0.0], 2 * lad_part, rtol=1e-3, atol=1e-3 * lad_part.abs().max().item())
    # LwF-MC is LwM at gamma = 0, step for step.
    assert torch.equal(_blocks(_step(increment, "lwf_mc")[0]) - w0, d[0.0])


def test_ld_reaches_the_blocks_in_proportion_to_beta(increment):
    """If this fails, beta no longer weighs LD in what trains the student (e.g. `beta *`
    dropped from the total loss): LwF-MC's distillation strength is not what is configured."""
    w0 = _blocks(increment[0])
    d = {b: _blocks(_step(increment, "lwf_mc", beta=b)[0]) - w0 for b in (0.0, 1.0, 3.0)}
    ld_part = d[1.0] - d[0.0]
    assert ld_part.abs().max() > 1e-3 * d[0.0].abs().max()
    torch.testing.assert_close(d[3.0] - d[0.0], 3 * ld_part, rtol=1e-3, atol=1e-3 * ld_part.abs().max().item())


# ---------------------------------------------------------------- the paper's loss, by hand

def _hand_loss(logits, feats, head_w, labels, t_logits, t_feats, t_head_w, *, ld, beta, gamma, temperature):
    """LC (cross-entropy over the new classes' logits), beta * LD, gamma * LAD, each written
    out from its definition (Dhar et al. 2019; Hinton et al. 2015 for KD)."""
    logits, feats, head_w = logits.double(), feats.double(), head_w.double()
    t_logits, t_feats, t_head_w = t_logits.double(), t_feats.double(), t_head_w.double()
    b = len(labels)
    new = logits[:, N_OLD:]
    lc = -(new.gather(1, (labels - N_OLD)[:, None]).squeeze(1) - new.exp().sum(1).log()).mean()
    s_old = logits[:, :N_OLD]
    if ld == "kd":
        t = temperature
        p_t = (t_logits / t).exp() / (t_logits / t).exp().sum(1, keepdim=True)
        log_p_s = s_old / t - (s_old / t).exp().sum(1, keepdim=True).log()
        ld_val = t * t * (p_t * (p_t.log() - log_p_s)).sum() / b          # T^2 KL(teacher || student)
    else:
        y, yh = torch.sigmoid(t_logits), torch.sigmoid(s_old)
        ld_val = -(y * yh.log() + (1 - y) * (1 - yh).log()).sum() / b

    def cam(f, w):   # Grad-CAM of a GAP -> linear head at the last conv map, L2-normalised
        m = torch.stack([(w[i][:, None, None] * f[i]).sum(0).flatten() for i in range(b)]).clamp_min(0)
        return m / m.norm(dim=1, keepdim=True)

    cls = t_logits.argmax(1)                                   # the teacher's top-1 base class
    lad = (cam(feats, head_w[cls]) - cam(t_feats, t_head_w[cls])).abs().sum(1).mean()
    return {"lc": lc, "ld": beta * ld_val, "lad": gamma * lad}


@pytest.mark.parametrize("ld", ["kd", "bce"])
def test_logged_loss_terms_equal_the_papers_formula(increment, ld):
    """If this fails, the loss that trains an LwM increment is not LC + beta * LD + gamma * LAD
    as defined: a weight dropped, KD's T^2 factor gone, the KL's arguments swapped, BCE's
    targets and predictions exchanged, or LAD's maps built from the wrong class."""
    loss = dict(ld=ld, beta=0.7, gamma=1.3, temperature=3.0)
    student, teacher, data = increment
    before = copy.deepcopy(student).eval()   # increments freeze BatchNorm; dropout is 0
    _, report = _step(increment, "lwm", **loss)
    cfg = _cfg(**loss)
    with torch.no_grad():
        z = before.encode(to_input(data.images, 32, cfg.model.mean, cfg.model.std))
        feats, logits = before.forward_top(z)
        t_feats, t_logits = teacher.model.forward_top(z)
    want = _hand_loss(logits, feats, before.head.weight.detach(), data.labels, t_logits, t_feats,
                      teacher.head_weight, **loss)
    assert set(report.loss_terms) == {"lc", "ld", "lad"}
    for k, v in want.items():
        assert v.item() > 1e-3, f"{k} is ~0 at this point: the comparison would say nothing"
        assert report.loss_terms[k] == pytest.approx(v.item(), rel=2e-5), k


def test_a_training_step_reports_what_it_trained(increment):
    """If this fails, the step's report miscounts its classes or claims to have learned by
    statistics alone, and `check_trained` (which publishes only a step that made optimiser
    steps in every epoch) would let an idle training step through."""
    _, report = _step(increment, "lwm")
    assert not report.statistics_only
    assert (report.n_old, report.n_new, report.n_images) == (N_OLD, N_NEW, N_NEW * PER_CLASS)


def test_a_statistics_only_increment_reports_its_encode_pass():
    """If this fails, the frozen trunk's pass over an increment's images (the default method
    trains nothing, so it is most of the step's work) is in no phase of the step's report:
    `learn` logs no encode time and `bench cost` counts it as setup."""
    cfg = tiny_config(trunk_backend="torch")
    cfg.model = dataclasses.replace(cfg.model, classifier="analytic")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(2).repeat_interleave(8)
    names = [f"c{i}" for i in range(4)]
    torch.manual_seed(0)
    student = build_student(cfg.model, 2)
    train_base(student, ImageSet(images, labels, names), cfg)
    report = learn_increment(student, ImageSet(images, labels + 2, names), 2, cfg, step=1, method="none")
    assert report.statistics_only and report.seconds["encode"] > 0


def test_a_method_that_distils_refuses_to_train_without_a_teacher(increment):
    """If this fails, LwM or LwF-MC asked to train with no teacher would run as something
    else (or fail deep inside the loss) instead of saying what is missing."""
    student, _, data = increment
    cfg = _cfg()
    for method in ("lwm", "lwf_mc"):
        with pytest.raises(ValueError, match=f"{method} needs a teacher"):
            train_step(copy.deepcopy(student), make_method(method, cfg.loss), data, n_old=N_OLD, epochs=1,
                       cfg=cfg, teacher=None, step=1)


def test_without_a_frozen_trunk_the_teacher_runs_every_batch():
    """If this fails, a student with nothing frozen (freeze_blocks 0: no trunk output to
    cache, so the teacher's targets are computed batch by batch from the augmented images)
    trains LwM without its teacher's terms, or not at all."""
    cfg = _cfg()
    cfg.model = dataclasses.replace(cfg.model, freeze_blocks=0)
    cfg.train = dataclasses.replace(cfg.train, augment=True)
    student, teacher, data = _increment(cfg=cfg)
    before = _blocks(student).clone()
    report = train_step(student, make_method("lwm", cfg.loss), data, n_old=N_OLD, epochs=1, cfg=cfg,
                        teacher=teacher, step=1)
    assert report.optimizer_steps == [1]
    assert report.loss_terms["ld"] > 0 and report.loss_terms["lad"] > 0
    assert not torch.equal(_blocks(student), before)


def _recording_sgd(monkeypatch) -> list[tuple[float, torch.Tensor]]:
    """Make the learner's SGD record, at each optimiser step, (its lr, the gradient it is
    about to apply, flattened over every parameter that has one)."""
    steps = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            grad = torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None])
            steps.append((self.param_groups[0]["lr"], grad.clone()))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", Recording)
    return steps


def test_the_learning_rate_follows_one_cosine_over_the_whole_step(increment, monkeypatch):
    """If this fails, the step's learning rate does not decay (scheduler not stepped) or its
    cosine spans another number of optimiser steps than the step makes (epochs x batches),
    so the last updates are taken at the wrong rate."""
    steps = _recording_sgd(monkeypatch)
    student, _, data = increment
    cfg = _cfg()
    cfg.train = dataclasses.replace(cfg.train, batch_size=4)          # 8 images: 2 batches an epoch
    train_step(copy.deepcopy(student), make_method("finetune", cfg.loss), data, n_old=N_OLD, epochs=2, cfg=cfg,
               teacher=None, step=1)
    total = 2 * 2
    assert [lr for lr, _ in steps] == pytest.approx([cfg.train.lr * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)])


def test_predictions_are_eval_mode_whatever_mode_the_student_was_left_in(increment):
    """If this fails, predicting right after a training step (student in train mode) uses
    the batch's BatchNorm statistics: a prediction would depend on the other images."""
    student, _, data = increment
    student = copy.deepcopy(student)
    cfg = _cfg()
    expected = predict_logits(student.eval(), data.images, cfg)
    assert torch.equal(predict_logits(student.train(), data.images, cfg), expected)


def test_each_optimiser_step_uses_only_its_own_batchs_gradient(increment, monkeypatch):
    """If this fails, gradients accumulate across batches (not zeroed between steps): each
    update also carries every earlier batch's gradient. At lr 0 the weights stay put, so one
    batch seen twice (two epochs of one batch) must give the same gradient twice."""
    steps = _recording_sgd(monkeypatch)
    student, _, data = increment
    cfg = _cfg()
    train_step(copy.deepcopy(student), make_method("finetune", cfg.loss), data, n_old=N_OLD, epochs=2, cfg=cfg,
               teacher=None, step=1, lr=0.0)
    grads = [g for _, g in steps]
    assert len(grads) == 2 and grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def _lda_base(**model):
    """(config, 3 classes x 8 random images, a fresh student) for one lda base step; model:
    ModelConfig fields to set beside classifier="lda"."""
    cfg = tiny_config(trunk_backend="torch")
    cfg.model = dataclasses.replace(cfg.model, classifier="lda", **model)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), generator=g, dtype=torch.uint8)
    torch.manual_seed(0)
    return cfg, ImageSet(images, torch.arange(3).repeat_interleave(8), ["a", "b", "c"]), build_student(cfg.model, 3)


@pytest.mark.parametrize("shrink", [0.5, 0.0])
def test_an_lda_step_factorises_its_covariance_once(monkeypatch, shrink):
    """If this fails, a step with the lda head builds its Cholesky factor twice (once for the
    head, once for the leave-one-out temperature): seconds per step at D = 2560, and two
    copies of one solve that could drift apart; or, with the shrink chosen by votes (0), more
    than once per SHRINK_GRID value and once for the chosen one; or it scores its images left
    out once more for the temperature at the chosen shrink, which the votes scored already;
    or it predicts the class means' left-out dimensions (fill_gaps) more than once, though
    they do not depend on the shrink (0.3 s a time at 100 classes, 8 times a step).
    The head must still equal solve_head's at the shrink the step reports."""
    from fieldlearn.device import classifier

    cfg, base, student = _lda_base(shrink=shrink)
    built, passes, gaps = [], [], []
    real, real_loo, real_gaps = classifier.LdaParts.__init__, classifier.LdaParts.loo_logits, classifier.fill_gaps
    monkeypatch.setattr(classifier.LdaParts, "__init__", lambda self, *a, **k: (built.append(1), real(self, *a, **k))[1])
    monkeypatch.setattr(classifier.LdaParts, "loo_logits", lambda self, *a: (passes.append(1), real_loo(self, *a))[1])
    monkeypatch.setattr(classifier, "fill_gaps", lambda *a: (gaps.append(1), real_gaps(*a))[1])
    report = train_base(student, base, cfg)
    grid = len(classifier.SHRINK_GRID) if shrink == 0 else 0
    assert len(built) == 1 + grid
    assert len(passes) == (grid or 1)
    assert len(gaps) == 1
    assert student.stats.temperature != 1.0                                   # the temperature was fitted
    used = report.classifier["shrink"]
    assert used == (shrink or student.stats.shrink(0.0)) and (shrink or student.stats.votes.sum() > 0)
    w, b, _ = classifier.solve_head(student.stats, "lda", shrink=used)
    t = student.stats.temperature
    assert torch.allclose(student.classifier.weight.double(), w / t, rtol=1e-4, atol=1e-6)


def test_a_step_weighs_its_temperature_by_the_configured_recency(monkeypatch):
    """If this fails, a step's fitted temperature is stored without the config's
    temperature_recency (or with the wrong class counts): the stored temperature falls back
    to the class-weighted mean that lagged the growing head (benchmarks/README.md)."""
    from fieldlearn.device import classifier

    cfg, base, student = _lda_base(temperature_recency=3.5)
    calls = []
    real = classifier.ClassStats.calibrate
    monkeypatch.setattr(classifier.ClassStats, "calibrate",
                        lambda self, t, added, known, recency=0.0: (calls.append((added, known, recency)),
                                                                     real(self, t, added, known, recency))[1])
    train_base(student, base, cfg)
    assert calls == [(3, 3, 3.5)]


def test_a_steps_leave_one_out_scores_at_most_loo_rows_images_of_a_class(monkeypatch):
    """If this fails, a step scores every image of a big class left out (the temperature and
    the shrink votes): a factorisation of the class's image count cubed per shrink value,
    minutes for a base of thousands of images a class; or the cap drops images of a
    class under it, or draws outside the calibration rows it was given."""
    from fieldlearn.device import classifier, learner

    monkeypatch.setattr(learner, "LOO_ROWS", 7)
    cfg = tiny_config(trunk_backend="torch")
    cfg.model = dataclasses.replace(cfg.model, classifier="lda")
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 20 + [1] * 5)
    images = torch.randint(0, 256, (25, 3, 32, 32), generator=g, dtype=torch.uint8)
    scored = []
    real = classifier.vote_shrink
    monkeypatch.setattr(learner, "vote_shrink", lambda st, x, y, *a: (scored.append(y.clone()), real(st, x, y, *a))[1])
    torch.manual_seed(0)
    student = build_student(cfg.model, 2)
    calib = torch.zeros(25, dtype=torch.bool)
    calib[:12] = True
    calib[20:] = True
    learner.fit_classifier(student, ImageSet(images, labels, ["a", "b"]), [0, 1], cfg, calib=calib)
    assert torch.bincount(scored[0], minlength=2).tolist() == [7, 5]
    learner.fit_classifier(build_student(cfg.model, 2), ImageSet(images, labels, ["a", "b"]), [0, 1], cfg)
    assert torch.bincount(scored[1], minlength=2).tolist() == [7, 5]


def test_the_base_steps_calibration_rows_are_the_documented_seeded_draw():
    """If this fails, the base images held out for the temperature are no longer the same
    ones for the same seed: every committed table's base temperature, and every run
    reproduced from its command, would move without a word. The draw (per_class_draw): the
    classes in label order, one seeded permutation each, its first round(CALIB_SHARE n)
    rows (at least one; none of a class of one image)."""
    from fieldlearn.device.learner import CALIB_SHARE, calibration_rows

    g = torch.Generator().manual_seed(11)
    labels = torch.cat([torch.full((n,), c) for c, n in ((3, 40), (0, 25), (7, 1), (1, 9))])   # [75]
    labels = labels[torch.randperm(len(labels), generator=g)]                  # interleaved
    data = ImageSet(torch.zeros(len(labels), 3, 2, 2, dtype=torch.uint8), labels, [str(i) for i in range(8)])
    got = calibration_rows(data, seed=5)                                      # [75] bool
    assert {c: int(got[labels == c].sum()) for c in (0, 1, 3, 7)} == {0: 2, 1: 1, 3: 4, 7: 0}
    want = torch.zeros(len(labels), dtype=torch.bool)
    g = torch.Generator().manual_seed(5)
    for c in (0, 1, 3, 7):                                                    # label order
        rows = (labels == c).nonzero().flatten()
        want[rows[torch.randperm(len(rows), generator=g)[:max(1, round(CALIB_SHARE * len(rows))) if len(rows) > 1 else 0]]] = True
    assert torch.equal(got, want)
    assert not torch.equal(calibration_rows(data, seed=6), got)               # the seed decides it
