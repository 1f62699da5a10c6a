"""Class statistics and the heads solved from them (fieldlearn.device.classifier)."""

import pytest
import torch
import torch.nn.functional as F

from fieldlearn.device.classifier import (MIN_IMAGES, RIDGE_GRID, ClassStats, TooFewImages, augment, choose_ridge,
                                          fit_drift, phi, solve_head)


def _data(n_per=(7, 9, 6, 8), dim=5, seed=0, shift=0.0):
    """shift: added to every feature; a large one makes every dimension shared by all the
    images of a step (no dimension left out by shared_dims), so exact identities hold."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per)])
    centres = torch.randn(len(n_per), dim, generator=g, dtype=torch.float64) * 2
    x = centres[labels] + torch.randn(len(labels), dim, generator=g, dtype=torch.float64) + shift
    return x, labels


def _stats(x, labels, steps, masked: int | None = None):
    """Statistics built step by step: steps = [[classes of step 0], [classes of step 1], ...];
    masked: how many dimensions each step must leave out (None: not checked)."""
    s = ClassStats(x.shape[1], len(steps[0]))
    for t, classes in enumerate(steps):
        if t:
            s.widen(len(classes))
        m = torch.isin(labels, torch.tensor(classes))
        s.add(x[m], labels[m])
        assert masked is None or s.masked_dims == masked
        s.check(classes)
    return s


def test_ridge_head_equals_the_joint_data_solution():
    """If this fails, the head solved from statistics is not the ridge regression on all the
    images seen (the whole point of keeping statistics instead of data)."""
    x, labels = _data(shift=10.0)
    s = _stats(x, labels, [[0, 1], [2], [3]], masked=0)
    lam_rel = 0.3
    xa = augment(x)                                                      # [N, D+1]
    y = F.one_hot(labels, 4).double()
    lam = lam_rel * (x * x).sum(0).mean()
    reg = torch.eye(6, dtype=torch.float64) * lam
    reg[-1, -1] = 0
    joint = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y).T              # [K, D+1]
    w, b, used = solve_head(s, "analytic", lam_rel)
    assert used == lam_rel
    assert torch.allclose(w, joint[:, :-1], atol=1e-10) and torch.allclose(b, joint[:, -1], atol=1e-10)
    w2, b2 = s.ridge_path().solve(lam_rel)      # the GCV path gives the same head
    assert torch.allclose(w2, w, atol=1e-9) and torch.allclose(b2, b, atol=1e-9)


def test_statistics_do_not_depend_on_how_classes_were_grouped_into_steps():
    x, labels = _data(shift=10.0)
    a = _stats(x, labels, [[0, 1, 2, 3]], masked=0)
    b = _stats(x, labels, [[0], [1], [2, 3]], masked=0)
    assert torch.allclose(a.gram, b.gram) and torch.allclose(a.sums, b.sums)
    assert a.counts.tolist() == [7, 9, 6, 8]


def test_gcv_from_statistics_equals_gcv_from_the_data():
    """If this fails, the ridge chosen without data is not generalised cross-validation."""
    x, labels = _data(n_per=(12, 15, 11), dim=4, seed=2)
    s = _stats(x, labels, [[0, 1, 2]])
    xa, y = augment(x), F.one_hot(labels, 3).double()
    n = len(x)
    for lam_rel in (0.01, 1.0):
        reg = torch.eye(5, dtype=torch.float64) * lam_rel * (x * x).sum(0).mean()
        reg[-1, -1] = 0
        hat = xa @ torch.linalg.solve(xa.T @ xa + reg, xa.T)               # [N, N]
        rss = ((y - hat @ y) ** 2).sum()
        direct = float(rss / n / (1 - torch.trace(hat) / n) ** 2)
        assert s.gcv(lam_rel) == pytest.approx(direct, rel=1e-9)
    path = s.ridge_path()
    assert choose_ridge(path, 0.0) == min(RIDGE_GRID, key=s.gcv)
    assert choose_ridge(path, 0.7) == 0.7


def test_transform_equals_statistics_of_the_transformed_features():
    x, labels = _data()
    s = _stats(x, labels, [[0, 1], [2, 3]])
    g = torch.Generator().manual_seed(5)
    t = torch.eye(6, dtype=torch.float64) + 0.1 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    t[-1] = 0
    t[-1, -1] = 1
    s.transform(t)
    moved = (augment(x) @ t.T)[:, :-1]
    ref = _stats(moved, labels, [[0, 1, 2, 3]])
    assert torch.allclose(s.gram, ref.gram, atol=1e-9) and torch.allclose(s.sums, ref.sums, atol=1e-9)


def test_fit_drift_recovers_an_affine_map_and_shrinks_towards_identity():
    g = torch.Generator().manual_seed(3)
    before = torch.randn(200, 4, generator=g, dtype=torch.float64)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    c = torch.randn(4, generator=g, dtype=torch.float64)
    after = before @ a.T + c
    t = fit_drift(before, after, shrink=0.0)
    assert torch.allclose(t[:4, :4], a, atol=1e-6) and torch.allclose(t[:4, 4], c, atol=1e-6)
    assert t[4].tolist() == [0, 0, 0, 0, 1]
    # Strong shrinkage: the linear part is held at the identity and the map becomes the
    # mean shift of the new images (a translation, as in semantic drift compensation).
    t_big = fit_drift(before, after, shrink=1e6)
    assert torch.allclose(t_big[:4, :4], torch.eye(4, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(t_big[:4, 4], after.mean(0) - before.mean(0), atol=1e-3)


def test_ncm_head_is_the_normalised_class_means():
    x, labels = _data()
    s = _stats(x, labels, [[0, 1, 2, 3]])
    w, b, _ = solve_head(s, "ncm")
    means = torch.stack([x[labels == c].mean(0) for c in range(4)])
    assert torch.allclose(w, F.normalize(means, dim=1)) and b.abs().max() == 0


def test_a_class_with_too_few_images_is_refused_and_nothing_changes():
    """If this fails, a 'class statistic' could be one image's feature in disguise (the learner
    calls check before a head is solved from new classes)."""
    x, labels = _data(n_per=(7, MIN_IMAGES - 1))
    s = ClassStats(x.shape[1], 2)
    s.add(x, labels)
    with pytest.raises(TooFewImages, match=f"class 1 has {MIN_IMAGES - 1} image"):
        s.check([0, 1])
    s.check([0])


def test_phi_normalises_each_block():
    f0, f1 = torch.randn(3, 4) * 5, torch.randn(3, 6) * 0.1
    out = phi(f0, f1)
    assert out.shape == (3, 10)
    assert torch.allclose(out[:, :4].norm(dim=1), torch.ones(3)) and torch.allclose(out[:, 4:].norm(dim=1), torch.ones(3))
    assert torch.equal(phi(None, f1), F.normalize(f1, dim=1))


def test_no_gram_row_is_one_images_feature():
    """If this fails, model.safetensors holds one image's classifier feature in disguise: row
    i of the Gram matrix is sum_n phi_n[i] phi_aug_n, so when dimension i is non-zero for one
    image only (sparse ReLU features do this), row i / its last entry is that image's phi_aug,
    exactly, although every class statistic is over >= MIN_IMAGES images."""
    x, labels = _data(n_per=(6, 6), dim=8, seed=3)
    x = x.abs()
    x[:, 2] = 0
    x[4, 2] = 0.7                     # dimension 2 fires for image 4 only
    x[:, 5] = 1e-4
    x[7, 5] = 3.0                     # dimension 5 fires for all 12, but image 7 carries it
    s = _stats(x, labels, [[0, 1]])
    rows = s.gram / s.gram[:, -1:].clamp_min(1e-300)     # [D+1, D+1], each row scaled to end in 1
    xa = augment(x)
    leaked = [n for n in range(len(x)) if any(F.cosine_similarity(r, xa[n], dim=0) > 1 - 1e-6 for r in rows)]
    assert leaked == [], f"Gram rows equal the features of images {leaked}"
    kept = [0, 1, 3, 4, 6, 7, 8]                                          # 8: the bias entry
    assert s.masked_dims == 2 and not s.gram[[2, 5]].any() and not s.gram[:, [2, 5]].any()
    assert s.gram[kept][:, kept].all() and s.sums[:, kept].all()
