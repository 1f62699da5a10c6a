"""The deployed classifier: class statistics (model state) and the heads solved from them.

    f0 [N, 1280] pooled last conv map of the frozen ImageNet top   (never trains)
    f1 [N, 1280] pooled last conv map of the trained top           (base step, increments)
    phi [N, D] = [f0 / |f0|, f1 / |f1|]      ModelConfig.features: "frozen" | "student" | "concat"

Class statistics, formed when a class is learned from that class's own images under the
model of that step (at least MIN_IMAGES of them), then the images go:

    sums [K, D + 1]      per class, the sum of phi_aug = [phi, 1] (its last entry counts images)
    gram [D + 1, D + 1]  the sum of phi_aug phi_aug^T over every image learned so far
    scatter [D + 1, D + 1]
                         per class, its images' scatter about their mean divided by its
                         count less one (its covariance), summed over classes; the last
                         diagonal entry (where a centred phi_aug is 0) counts the classes
    seen [K, D]          per class and dimension, the images folded in with that dimension
                         kept (shared_dims leaves a dimension out of a small step's sums)

They are aggregates, never a per-image vector, and they are the model's state like a head
row (docs/GUARANTEES.md). Three heads are solved from them, each a plain linear layer on phi:

    ncm       W[c] = mean of class c / |mean|, b = 0        cosine nearest-class-mean
    analytic  ridge regression onto one-hot targets with an unshrunk bias: exactly the
              joint-data ridge solution, with no image kept. lam is ModelConfig.ridge x the
              mean diagonal of the Gram matrix, or, with ridge 0, chosen among RIDGE_GRID by
              generalised cross-validation, which needs only the statistics (RidgePath).
              It weighs every image equally: classes with thousands of images pull the
              solution, so a class learned from a few dozen is rarely predicted.
    lda       linear discriminant analysis, equal priors: class means and the pooled
              within-class covariance scatter / classes, each class's covariance weighing
              once (shrunk towards a scaled identity by ModelConfig.shrink),
              W[c] = P mu_c, b[c] = -mu_c^T P mu_c / 2 + tr(P S) / (2 n_c) with P the inverse
              of the shrunk covariance S_a and S the unshrunk one. The last term removes the
              bias of the estimated mean's norm (E|mu^_c|^2_P = |mu_c|^2_P + tr(P S) / n_c),
              which would otherwise penalise a class the fewer images it has. Each class
              counts once, however many images it had, in its mean and in the covariance:
              balanced by construction. (Pooled over images, the covariance was the base
              classes' when the base had 490 images a class and a new class 25, and the
              new classes, whose images spread differently under a top trained on the
              base, lost 2-3 points: benchmarks/README.md.)

ncm and lda read a class's mean over the images that kept each dimension (`means`). A
dimension no image of the class kept (a sparse feature that fewer than MIN_IMAGES images of
a small step fired) is unknown, not zero: read as zero, it spoke against the class (with
2 x 10 images per step, 300-500 of 2560 dimensions are left out, and LDA's precision
weighs exactly these low-variance dimensions most). It is predicted from the dimensions
the class did keep, by a ridge regression across the classes that know it (`fill_gaps`:
class means are far from independent across dimensions); with too few such classes, it
takes the mean of their means, so it neither speaks for the class nor against it.

The lda shrink (ModelConfig.shrink 0, the default) is chosen by the images of every step
while they are in memory: each SHRINK_GRID value's head scores each of the step's images
without it (leave-one-out, closed form: LdaParts.loo_logits), and `votes` adds up, per
value, its recall on each class a step learned, over every step so far (numbers, no image;
they add across devices). The head uses the value with the most votes. The best shrink is a property of the
protocol: a class learned from 25 photos wants a strong one (0.8 on the field protocol's
validation), a class of 80 a weak one (0.2 on CIFAR-100 10 x 10's), and the votes found
both (benchmarks/README.md).

Calibration: every head's logits are divided by a temperature T, part of the model (a plain
linear layer still). Each step fits T^ on its own images by cross-fitting (the head solved
without one fold of the step's images scores that fold; `crossfit_temperature`), while they
are in memory; T is the geometric mean of the steps' T^, step s weighted by the k_s classes
it added times K_s^r, K_s the classes known after it and r ModelConfig.temperature_recency
(`calib` holds sum w_s log T^_s and sum w_s: two numbers, no image; they add across devices).
A step's T^ calibrates the head of its time: as classes are added the head that calibrates
falls from T ~ 45 (10 classes) to ~ 20 (50) on the field protocol, and the mean over every
step lagged it (underconfident, ECE 8.4 % where the recent steps' T^ give 3.0 %:
benchmarks/README.md).

When an increment trains the top, the old classes' statistics no longer describe the
student's features. `fit_drift` estimates an affine map T from the features of the new
images before (teacher) and after (student) the step, shrunk towards the identity, and
`ClassStats.transform(T)` carries every old statistic through it: no old data needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_IMAGES = 5                              # fewest images a class statistic is formed from
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)    # relative ridge values GCV chooses among
SHRINK_GRID = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)   # lda shrinks the leave-one-out votes choose among
GAP_RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 1e6)   # relative ridges fill_gaps chooses among (1e6: the mean)
GAP_MIN_CLASSES = 3                         # fewest classes fill_gaps regresses a class's gaps on
CALIB_FOLDS = 5                             # folds of a step's images that fit its temperature


class TooFewImages(ValueError):
    """A class has fewer than MIN_IMAGES images: no statistic is formed from it."""


def check_counts(counts: torch.Tensor, classes: list[int]) -> None:
    """counts [k] images of each class of `classes` -> TooFewImages if one is under MIN_IMAGES."""
    if len(classes) and counts.min() < MIN_IMAGES:
        i = int(counts.argmin())
        raise TooFewImages(f"class {classes[i]} has {int(counts[i])} image(s); "
                           f"a class statistic needs at least {MIN_IMAGES}")


def phi(f0: torch.Tensor | None, f1: torch.Tensor | None) -> torch.Tensor:
    """Pooled features -> the classifier's input: each given block L2-normalised, concatenated.

    f0 [N, C0] or None, f1 [N, C1] or None -> [N, D] (D = C0 + C1 of the blocks given)
    """
    blocks = [F.normalize(f, dim=1) for f in (f0, f1) if f is not None]
    return torch.cat(blocks, dim=1)


def augment(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D + 1] float64 with a trailing 1 (the bias)."""
    x = x.double()
    return torch.cat([x, x.new_ones(len(x), 1)], dim=1)


def shared_dims(xa: torch.Tensor) -> torch.Tensor:
    """xa [N, D+1] the phi_aug of one batch of images folded in -> [D+1] bool: the
    dimensions that at least MIN_IMAGES images share, by effective count
    n_eff = (sum_n |x_nd|)^2 / sum_n x_nd^2 >= MIN_IMAGES (no single image carries more than
    1/sqrt(MIN_IMAGES) of the dimension's weight).

    Why: row d of the Gram matrix is sum_n x_nd phi_aug_n. A dimension that one image alone
    fires (sparse ReLU features do this) makes that row one image's feature, scaled: a
    per-image vector in model.safetensors. Such dimensions are left out of this batch's
    statistics (as zeros), so every Gram row is an aggregate like the class sums.
    """
    a = xa.abs()
    s1, s2 = a.sum(0), a.square().sum(0)                                      # [D+1]
    return s1.square() >= MIN_IMAGES * s2.clamp_min(torch.finfo(s2.dtype).tiny)


class ClassStats(nn.Module):
    """Per-class sums and the Gram matrix of phi_aug, as buffers (saved with the weights)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("gram", torch.zeros(dim + 1, dim + 1, dtype=torch.float64))
        self.register_buffer("sums", torch.zeros(num_classes, dim + 1, dtype=torch.float64))
        # (sum over steps of k_s log T^_s, sum of k_s): the calibration temperature's evidence
        self.register_buffer("calib", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("scatter", torch.zeros(dim + 1, dim + 1, dtype=torch.float64))
        # per SHRINK_GRID value, its lda head's leave-one-out recall summed over classes (vote_shrink)
        self.register_buffer("votes", torch.zeros(len(SHRINK_GRID), dtype=torch.float64))
        self.masked_dims = 0           # dimensions the last add left out (shared_dims); not saved
        self._keep: torch.Tensor | None = None   # the last add's kept dimensions [D+1] (in memory)

    @property
    def dim(self) -> int:
        return self.gram.shape[0] - 1

    @property
    def counts(self) -> torch.Tensor:
        return self.sums[:, -1]                                           # [K]

    def add(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold images into the statistics: x [N, D] their phi, labels [N] global class indices."""
        if len(x) != len(labels) or x.shape[1] != self.dim:
            raise ValueError(f"{tuple(x.shape)} features for {len(labels)} labels and dimension {self.dim}")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.sums.shape[0]:
            raise ValueError(f"labels outside 0..{self.sums.shape[0] - 1}")
        xa = augment(x)                                                       # [N, D+1]
        keep = shared_dims(xa)                                                # [D+1]
        self.masked_dims = int((~keep[:-1]).sum())
        self._keep = keep
        xa = xa * keep
        with torch.no_grad():
            self.sums.index_add_(0, labels, xa)                                # [K, D+1]
            self.gram += xa.T @ xa                                             # [D+1, D+1]
            self.seen.index_add_(0, labels, keep[:-1].double().expand(len(labels), -1))   # [K, D]
            self._add_scatter(xa, labels)

    def _add_scatter(self, xa: torch.Tensor, labels: torch.Tensor) -> None:
        """Each class's images of this fold (xa [n, D+1], already in the counts): their scatter
        about their own mean over the class's count less one, and n - 1 over it in the class
        tally. A class learned in one fold adds its covariance and 1; images folded into a
        known class later (fold_in) add their share of it."""
        for c in labels.unique().tolist():
            xc = xa[labels == c]                                              # [n, D+1]
            n = float(xc[:, -1].sum())          # the images counted (a fold under MIN_IMAGES counts none)
            if n < 2:
                continue
            d = xc - xc.mean(0)                                               # [n, D+1], last column 0
            w = 1.0 / float(self.counts[c] - 1)
            self.scatter += w * (d.T @ d)
            self.scatter[-1, -1] += w * (n - 1)

    def check(self, classes: list[int]) -> None:
        """TooFewImages unless every class of `classes` is summarised over >= MIN_IMAGES images."""
        check_counts(self.counts[classes], classes)

    def widen(self, n_new: int) -> None:
        """Empty rows for n_new classes (filled by add)."""
        self.sums = torch.cat([self.sums, self.sums.new_zeros(n_new, self.sums.shape[1])])
        self.seen = torch.cat([self.seen, self.seen.new_zeros(n_new, self.seen.shape[1])])

    def transform(self, t: torch.Tensor) -> None:
        """phi_aug -> T phi_aug for every image summarised so far: T [D+1, D+1]. T mixes
        dimensions, so a left-out dimension's sum is first filled with the class's count
        times its `means` value, and every dimension is then seen by all of the class's images.
        The Gram matrix moves with the sums so that the pooled within-class scatter
        G - sum_c s_c s_c^T / n_c stays as folded (positive semi-definite): filling the sums
        alone subtracted n_c mu_cd^2 from a diagonal entry no image of the class had added to,
        and LDA's covariance went indefinite (its Cholesky failed after a trained step)."""
        with torch.no_grad():
            inv_n = 1.0 / self.counts.clamp_min(1)[:, None]                     # [K, 1]
            old = self.sums.clone()                                             # [K, D+1]
            self.sums[:, :-1].copy_(self.means() * self.counts[:, None])
            self.gram += self.sums.T @ (self.sums * inv_n) - old.T @ (old * inv_n)
            self.seen.copy_(self.counts[:, None].expand_as(self.seen))
            self.gram.copy_(t @ self.gram @ t.T)
            self.sums.copy_(self.sums @ t.T)
            tally = self.scatter[-1, -1].clone()   # centred images have no bias entry: T's linear part moves them
            self.scatter[-1, -1] = 0.0
            self.scatter.copy_(t @ self.scatter @ t.T)
            self.scatter[-1, -1] = tally

    def without(self, x: torch.Tensor, labels: torch.Tensor) -> "ClassStats":
        """A copy that lacks images the last `add` folded in (x [n, D] their phi, labels [n]),
        folded out as they were folded in (the same kept dimensions): cross-fitting. The
        scatter stays as is: its one reader, the lda head, leaves an image out in closed
        form (LdaParts.loo_logits) instead."""
        keep = self._keep if self._keep is not None else torch.ones(self.dim + 1, dtype=torch.bool,
                                                                    device=self.gram.device)
        xa = augment(x) * keep                                                 # [n, D+1]
        out = ClassStats(self.dim, self.sums.shape[0]).to(self.gram.device)
        with torch.no_grad():
            out.sums.copy_(self.sums.index_add(0, labels, xa, alpha=-1))
            out.gram.copy_(self.gram - xa.T @ xa)
            out.seen.copy_(self.seen.index_add(0, labels, keep[:-1].double().expand(len(labels), -1), alpha=-1))
            out.scatter.copy_(self.scatter)
        return out

    @property
    def temperature(self) -> float:
        """The calibration temperature the head's logits are divided by (1 before any fit)."""
        lt, k = self.calib.tolist()
        return math.exp(lt / k) if k > 0 else 1.0

    def calibrate(self, t_hat: float, added: int, known: int, recency: float = 0.0) -> None:
        """Add one step's fitted temperature with weight added x known^recency (module docstring)."""
        weight = added * float(known) ** recency
        with torch.no_grad():
            self.calib += torch.tensor([weight * math.log(t_hat), weight], dtype=torch.float64,
                                       device=self.calib.device)

    def shrink(self, fixed: float) -> float:
        """The lda head's shrink: `fixed` when > 0 (ModelConfig.shrink), else the SHRINK_GRID
        value with the most leave-one-out votes, a tie (no votes yet) to the larger shrink."""
        if fixed > 0:
            return fixed
        votes = self.votes.tolist()
        best = max(votes)
        # a recall summed over classes is a sum of fractions: equal sums may differ in the last bit
        return max(s for v, s in zip(votes, SHRINK_GRID) if v >= best - 1e-9 * max(1.0, best))

    def means(self) -> torch.Tensor:
        """[K, D] class means of phi, each dimension over the class's images that kept it; the
        dimensions none of them kept are predicted from the ones they did (fill_gaps, module
        docstring). A class without images stays 0."""
        mu = self.sums[:, :-1] / self.seen.clamp_min(1)                       # [K, D]
        return fill_gaps(mu, self.seen > 0, self.counts > 0)

    def raw_means(self) -> torch.Tensor:
        """[K, D] sums / counts: the means of the statistics as folded (left-out dimensions
        read 0), the ones the Gram matrix is consistent with."""
        return self.sums[:, :-1] / self.counts.clamp_min(1)[:, None]

    def ridge_scale(self) -> float:
        """The ridge unit: the mean diagonal of the features' Gram matrix."""
        return float(torch.diagonal(self.gram)[:-1].mean().clamp_min(1e-12))

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (Gc [D, D], Sc [D, K], mean [D], class priors [K]): the Gram matrix and the
        feature/target cross sums about the mean. Ridge with an unshrunk bias is ridge on
        centred data, with b = priors - W^T mean."""
        n = self.gram[-1, -1].clamp_min(1)
        mean = self.gram[:-1, -1] / n                                          # [D]
        priors = self.counts / n                                               # [K]
        gc = self.gram[:-1, :-1] - n * torch.outer(mean, mean)
        sc = self.sums[:, :-1].T - torch.outer(mean, self.counts)              # [D, K]
        return gc, sc, mean, priors

    def ridge_path(self) -> "RidgePath":
        """One eigendecomposition from which the head and its GCV score follow for any ridge."""
        gc, sc, mean, priors = self.centred()
        evals, evecs = torch.linalg.eigh(gc)                                   # [D], [D, D]
        return RidgePath(evals.clamp_min(0), evecs, evecs.T @ sc, mean, priors, self.counts, self.ridge_scale())

    def solve_ridge(self, lam_rel: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (W [K, D], b [K]) of the ridge head at one ridge value (a Cholesky solve)."""
        gc, sc, mean, priors = self.centred()
        gc.diagonal().add_(lam_rel * self.ridge_scale())
        w = torch.cholesky_solve(sc, torch.linalg.cholesky(gc)).T              # [K, D]
        return w, priors - w @ mean

    def gcv(self, lam_rel: float) -> float:
        return self.ridge_path().gcv(lam_rel)


def fill_gaps(mu: torch.Tensor, known: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """mu [K, D] class means, known [K, D] where a class's images kept a dimension, live [K]
    the classes with images -> [K, D], each live class's unknown dimensions predicted from
    its known ones by ridge regression across classes: fitted on the classes that know all of
    that class's gaps (at least GAP_MIN_CLASSES of them; fewer: the mean of the class means
    that know the dimension), on their means (a gap of theirs elsewhere: that mean), each
    centred on the fitted classes' mean. The ridge is the GAP_RIDGE_GRID value, relative to
    the mean eigenvalue, with the lowest leave-one-class-out error of the fit (closed form).

    Why: with 2 x 10 photos a step, 300-500 of 2560 dimensions are left out of a step's
    sums (shared_dims); filled with the other classes' mean, a new class's mean sat far from
    its own test images there, and on CIFAR-100's field protocol at 10 photos its new
    classes lost 6.5 points against the same head without the left-out dimensions, of which
    this regression gives back 5 (benchmarks/README.md)."""
    fill = (mu * known).sum(0) / known.sum(0).clamp_min(1)                    # [D]
    gap = ~known & live[:, None]                                               # [K, D]
    base = torch.where(gap, fill.expand_as(mu), mu)                            # [K, D]
    out = base.clone()
    gram = base @ base.T                                                       # [K, K]
    for c in gap.any(1).nonzero().flatten().tolist():
        m = gap[c]                                                             # [D] c's unknown dimensions
        ref = live & known[:, m].all(1)
        ref[c] = False
        r = ref.nonzero().flatten()
        if len(r) < GAP_MIN_CLASSES:
            continue
        a = base[r]                                                            # [R, D]
        centre = a.mean(0)                                                     # [D]
        cen = torch.eye(len(r), dtype=mu.dtype, device=mu.device) - 1.0 / len(r)   # [R, R]
        k = cen @ (gram[r][:, r] - a[:, m] @ a[:, m].T) @ cen                 # [R, R] Gram on c's known dims
        y = a[:, m] - centre[m]                                                # [R, G] the targets
        evals, evecs = torch.linalg.eigh(k)
        evals = evals.clamp_min(0)
        unit = float(evals.sum()) / len(r)
        if unit <= 0:
            continue

        def hat(lam: float) -> torch.Tensor:                                  # [R, R] K (K + lam)^-1
            return (evecs * (evals / (evals + lam))) @ evecs.T

        def loo(lam: float) -> float:                                          # leave one class out
            h = hat(lam)
            return float(((y - h @ y) / (1 - h.diagonal()).clamp_min(1e-9)[:, None]).square().sum())

        lam = unit * min(GAP_RIDGE_GRID, key=lambda g: loo(unit * g))
        v = (base[c] - centre) * ~m                                            # [D] c on its known dims
        kv = cen @ (a @ v)                                                     # [R] centred inputs . v
        alpha = (evecs / (evals + lam)) @ (evecs.T @ kv)                       # [R]
        out[c, m] = centre[m] + alpha @ y
    return out


def pooled_scatter(gram: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """The `scatter` of statistics saved before it existed: gram [D+1, D+1], sums [K, D+1] ->
    [D+1, D+1] whose class tally is the classes learned (K') and whose mean class covariance
    is the pooled within-class covariance over images (G - sum_c s_c s_c^T / n_c) / (N - K'),
    so that such a state's lda head is the one it saved until it learns again."""
    counts = sums[:, -1]
    k = int((counts > 0).sum())
    n = float(gram[-1, -1])
    raw = sums[:, :-1] / counts.clamp_min(1)[:, None]                          # [K, D]
    out = torch.zeros_like(gram)
    out[:-1, :-1] = (gram[:-1, :-1] - sums[:, :-1].T @ raw) * (k / max(n - k, 1.0))
    out[-1, -1] = k
    return out


class RidgePath:
    """Ridge regression onto one-hot targets from centred statistics, Gc = Q diag(ev) Q^T:
    W(lam) = Q diag(1 / (ev + lam)) Q^T Sc, for every lam at the cost of one eigendecomposition.

    Generalised cross-validation (lower is better), from the statistics alone:
    RSS = |Yc|^2 - 2 tr(W^T Sc) + tr(W^T Gc W), tr(H) = 1 + sum ev / (ev + lam).
    """

    def __init__(self, evals, evecs, proj, mean, priors, counts, scale):
        self.evals, self.evecs, self.proj = evals, evecs, proj        # [D], [D, D], [D, K] = Q^T Sc
        self.mean, self.priors, self.counts, self.scale = mean, priors, counts, scale

    def solve(self, lam_rel: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (W [K, D], b [K])."""
        inv = 1.0 / (self.evals + lam_rel * self.scale)                        # [D]
        w = (self.evecs @ (inv[:, None] * self.proj)).T                         # [K, D]
        return w, self.priors - w @ self.mean

    def gcv(self, lam_rel: float) -> float:
        n = self.counts.sum()
        lam = lam_rel * self.scale
        p2 = (self.proj ** 2).sum(1)                                          # [D]
        yc2 = (self.counts - self.counts ** 2 / n).sum()
        rss = yc2 - 2 * (p2 / (self.evals + lam)).sum() + (self.evals * p2 / (self.evals + lam) ** 2).sum()
        tr_h = 1 + (self.evals / (self.evals + lam)).sum()
        return float(rss / n / (1 - tr_h / n).clamp_min(1e-12) ** 2)


class LdaParts:
    """The shrunk LDA head's pieces from `stats` (module docstring): chol [D, D] the Cholesky factor of the
    shrunk covariance S_a (P = S_a^-1), mu [K, D] class means, n [K] images per class,
    tr = tr(P S). mu: stats.means() when the caller has them (they do not depend on the
    shrink: a step's votes build these parts once per SHRINK_GRID value)."""

    def __init__(self, stats: ClassStats, shrink: float, mu: torch.Tensor | None = None):
        self.stats = stats
        self.n = stats.counts.clamp_min(1)                                       # [K]
        self.classes = stats.scatter[-1, -1].clamp_min(1e-12)                    # the class tally
        self.shrink_keep = 1 - shrink
        sw = stats.scatter[:-1, :-1] / self.classes                               # [D, D] mean class covariance
        self.mu = stats.means() if mu is None else mu                             # [K, D]
        scale = torch.diagonal(sw).mean().clamp_min(1e-12)
        ridge = (shrink + 1e-9) * scale
        sa = (1 - shrink) * sw
        sa.diagonal().add_(ridge)
        self.chol = torch.linalg.cholesky(sa)
        if shrink < 0.999:    # S = (S_a - ridge I) / (1 - shrink): tr(P S) = (D - ridge tr P) / (1 - shrink)
            eye = torch.eye(len(sa), dtype=sa.dtype, device=sa.device)
            tr_p = torch.linalg.solve_triangular(self.chol, eye, upper=False).square().sum()   # tr(L^-T L^-1)
            self.tr = (len(sa) - ridge * tr_p) / (1 - shrink)
        else:
            self.tr = torch.trace(torch.cholesky_solve(sw, self.chol))            # tr(P S)

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (W [K, D] = mu P, b [K] = -mu P mu / 2 + tr / (2 n))."""
        w = torch.cholesky_solve(self.mu.T, self.chol).T                          # [K, D]
        return w, -0.5 * (w * self.mu).sum(1) + 0.5 * self.tr / self.n

    def loo_logits(self, x: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Leave-one-out logits: x [N, D] phi of images folded into these parts' statistics,
        labels [N] -> [N, K], each row the head solved without that image scoring it, as a new
        image of the field is scored. Closed form, no re-solve: the image leaves its class
        mean (mu' = (n mu - x_k) / (n - 1), per dimension over the images that kept it:
        `seen`) and its class's covariance, which the pooled one holds over the class tally:
        with u = x_k - mu_raw and Dc [n, D] the class's images less their mean,

            S_a' = S_a + b Dc^T Dc - a u u^T,   b = (1 - shrink) / (classes (n - 1) (n - 2)),
                                                a = (1 - shrink) n / (classes (n - 1) (n - 2))

        (the class's scatter, less the image's share, now over n - 2): Woodbury for the class
        term (one n x n factorisation per class), Sherman-Morrison for the image's. A class
        whose images x does not all hold (the base step scores only its calibration rows)
        keeps its divisor: b = 0, a over (n - 1)^2, an O(1 / n) difference. x_k is x on the
        dimensions the fold kept (keep [D]). The shrink target's scale and tr(P S) are kept,
        and so are the dimensions the class did not keep (fill_gaps predicts them from the
        kept ones, which the image moves by O(1 / n)).
        Needs n >= 2 per class (the class term, n >= 3)."""
        stats = self.stats
        x = x.double()
        xk = x * keep.to(x.dtype) if keep is not None else x                      # [N, D]
        n = self.n[labels]                                                         # [N]
        u = xk - stats.raw_means()[labels]                                         # [N, D]
        solve = lambda t: torch.linalg.solve_triangular(self.chol, t.T, upper=False)   # L^-1 t^T
        v, q, m = solve(x), solve(u), solve(self.mu)                               # [D, N] x2, [D, K]
        seen = stats.seen[labels]                                                  # [N, D]
        k = keep.to(x.dtype) if keep is not None else torch.ones_like(seen[0])
        left = seen - k                                                            # [N, D]
        mu1 = torch.where(left > 0, (seen * self.mu[labels] - xk) / left.clamp_min(1), self.mu[labels])
        mc = solve(mu1)                                                            # [D, N] L^-1 mu_c'
        # whitened inner products under P = S_a^-1, then each class's Woodbury correction
        xm, qm = v.T @ m, q.T @ m                                                  # [N, K] x P mu_j, u P mu_j
        pm = m.square().sum(0).expand_as(xm).clone()                               # [N, K] mu_j P mu_j
        vq, qq = (v * q).sum(0), q.square().sum(0)                                 # [N]
        qc, xc, pc = (q * mc).sum(0), (v * mc).sum(0), mc.square().sum(0)          # [N]
        whole = torch.zeros_like(n, dtype=torch.bool)                              # [N] class term applied
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().flatten()
            nc = float(self.n[c])
            if len(rows) != nc or nc < 3:
                continue
            whole[rows] = True
            b = self.shrink_keep / (float(self.classes) * (nc - 1) * (nc - 2))
            ut = math.sqrt(b) * q[:, rows]                                         # [D, n] L^-1 sqrt(b) Dc^T
            r = torch.linalg.cholesky(torch.eye(len(rows), dtype=x.dtype, device=x.device) + ut.T @ ut)
            proj = lambda t: torch.linalg.solve_triangular(r, ut.T @ t, upper=False)   # [n, .]
            pv, pq, pmu, pmc = proj(v[:, rows]), proj(q[:, rows]), proj(m), proj(mc[:, rows])
            xm[rows] -= pv.T @ pmu
            qm[rows] -= pq.T @ pmu
            pm[rows] -= pmu.square().sum(0)
            vq[rows] -= (pv * pq).sum(0)
            qq[rows] -= pq.square().sum(0)
            qc[rows] -= (pq * pmc).sum(0)
            xc[rows] -= (pv * pmc).sum(0)
            pc[rows] -= pmc.square().sum(0)
        a = self.shrink_keep * n / (self.classes * (n - 1) * torch.where(whole, n - 2, n - 1))   # [N]
        den = 1 - a * qq                                                           # [N]
        logits = (xm + (a * vq / den)[:, None] * qm
                  - 0.5 * (pm + (a / den)[:, None] * qm.square()) + 0.5 * self.tr / self.n)
        own = xc + a * vq * qc / den - 0.5 * (pc + a * qc.square() / den) + 0.5 * self.tr / (n - 1)
        return logits.scatter(1, labels[:, None], own[:, None])


def loo_scores(stats: ClassStats, x: torch.Tensor, labels: torch.Tensor, shrink: float,
               parts: LdaParts | None = None, mu: torch.Tensor | None = None) -> torch.Tensor | None:
    """The lda head's leave-one-out logits (LdaParts.loo_logits) of x [N, D], phi of images
    the last `stats.add` folded in (all of them or a subset), labels [N] -> [N, K], at this
    shrink (parts: its pieces, mu: stats.means(), when the caller has them). None when a
    class would be left under 2 images (these statistics are in memory only, so MIN_IMAGES
    does not bind them)."""
    counts = torch.bincount(labels, minlength=stats.sums.shape[0]).to(stats.counts.device)
    present = counts > 0
    if not present.any() or bool((stats.counts[present] < 2).any()):
        return None
    keep = stats._keep[:-1] if stats._keep is not None else None
    dev = stats.gram.device
    return (parts or LdaParts(stats, shrink, mu)).loo_logits(x.to(dev), labels.to(dev), keep)


def vote_shrink(stats: ClassStats, x: torch.Tensor, labels: torch.Tensor,
                mu: torch.Tensor | None = None) -> dict[float, torch.Tensor] | None:
    """Add the leave-one-out votes of x [N, D], phi of images the last `stats.add` folded in
    (all of them or a subset), labels [N]: for each SHRINK_GRID value, the recall of the lda
    head at that shrink, solved without each image, summed over x's classes (module
    docstring). A class counts once however many images it had, as in the head: counted by
    images, the 4,410 images of a full base outvoted every later step, and the frozen lda
    row kept the base's weak shrink while its new classes of 25 lost 3 points.
    -> {shrink: its leave-one-out logits [N, K]} (the temperature at the chosen one needs no
    second pass), or None (no vote) when a class would be left under 2 images. mu:
    stats.means() when the caller has them (fill_gaps runs once, not once per value)."""
    mu = stats.means() if mu is None else mu                                      # [K, D]
    scored = {s: loo_scores(stats, x, labels, s, mu=mu) for s in SHRINK_GRID}
    if any(v is None for v in scored.values()):
        return None
    labels = labels.to(stats.gram.device)
    share = 1.0 / torch.bincount(labels, minlength=stats.sums.shape[0]).clamp_min(1).double()   # [K] each class weighs 1
    right = [float(share[labels][v.argmax(1) == labels].sum()) for v in scored.values()]
    with torch.no_grad():
        stats.votes += torch.tensor(right, dtype=torch.float64, device=stats.votes.device)
    return scored


def choose_ridge(path: RidgePath, ridge: float) -> float:
    """ridge > 0: that value; 0: the RIDGE_GRID value with the lowest GCV."""
    if ridge > 0:
        return ridge
    return min(RIDGE_GRID, key=path.gcv)


def solve_head(stats: ClassStats, kind: str, ridge: float = 0.0,
               shrink: float = 0.5, parts: LdaParts | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """-> (W [K, D], b [K], the relative ridge used (0 for ncm and lda)) of the `kind` head,
    uncalibrated (T = 1). parts: lda's pieces of these statistics at this shrink, when the
    caller has them (one Cholesky factorisation for the head and its temperature)."""
    if kind == "ncm":
        return F.normalize(stats.means(), dim=1), stats.sums.new_zeros(stats.sums.shape[0]), 0.0
    if kind == "analytic":
        if ridge > 0:
            return (*stats.solve_ridge(ridge), ridge)
        path = stats.ridge_path()                 # GCV: one eigendecomposition (seconds at D = 2560)
        lam = choose_ridge(path, ridge)
        return (*path.solve(lam), lam)
    if kind == "lda":
        return (*(parts or LdaParts(stats, shrink)).head(), 0.0)
    raise ValueError(f"classifier must be 'ncm', 'analytic' or 'lda', got {kind!r}")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the cross-entropy of softmax(logits / T): logits [N, K], labels [N].
    A golden-section search over log T in [1e-3, 1e4] (the loss is unimodal in T)."""
    logits = logits.double()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    lo, hi = math.log(1e-3), math.log(1e4)
    for _ in range(60):
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def crossfit_temperature(stats: ClassStats, x: torch.Tensor, labels: torch.Tensor, kind: str, ridge: float,
                         shrink: float, folds: int = CALIB_FOLDS, seed: int = 0,
                         parts: LdaParts | None = None, loo: torch.Tensor | None = None) -> float | None:
    """The temperature that calibrates the head on images it was not solved from.

    x [N, D] phi, labels [N]: images the last `stats.add` folded in (still in memory), all
    of them or a subset.
    lda: each image is scored with its own class's mean taken without it (leave-one-out,
    closed form: LdaParts.loo_logits). A head solved without a fifth of a class's 25
    images scores that fifth as a class of 20 would, noisier in D dimensions than the
    class of 25 the field meets, and its temperature comes out higher (benchmarks/README.md).
    ncm, analytic: each of `folds` folds is scored by the head solved from the statistics
    without it (a relative ridge > 0 is kept fixed: GCV per fold would cost an
    eigendecomposition each).
    None when a class would be left under 2 images (these statistics are in memory only,
    so MIN_IMAGES does not bind them). parts: as in solve_head; loo: lda's leave-one-out
    logits of x at this shrink, when the caller has them (vote_shrink).
    """
    if kind == "lda":
        logits = loo if loo is not None else loo_scores(stats, x, labels, shrink, parts)
        return None if logits is None else fit_temperature(logits.cpu(), labels.cpu())
    counts = torch.bincount(labels, minlength=stats.sums.shape[0]).to(stats.counts.device)
    present = counts > 0
    if not present.any() or bool((stats.counts[present] - (counts[present] + folds - 1) // folds < 2).any()):
        return None
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in present.nonzero().flatten().tolist():                           # stratified folds
        rows = (labels == c).nonzero().flatten()
        fold[rows[torch.randperm(len(rows), generator=g)]] = torch.arange(len(rows)) % folds
    logits = torch.empty(len(labels), stats.sums.shape[0], dtype=torch.float64)
    for k in range(folds):
        m = fold == k
        if not m.any():
            continue
        w, b, _ = solve_head(stats.without(x[m], labels[m]), kind, ridge, shrink)
        logits[m] = (x[m].double().to(w.device) @ w.T + b).cpu()
    return fit_temperature(logits, labels.cpu())


def fit_drift(before: torch.Tensor, after: torch.Tensor, shrink: float) -> torch.Tensor:
    """Affine map of the student's features from before to after an increment.

    before, after [N, D] phi of the same (new-class) images under the teacher and the
    student -> T [D+1, D+1] with after_aug ~ T before_aug, by ridge regression whose linear
    part is shrunk towards the identity (shrink x the mean diagonal of before's Gram); the
    offset is not shrunk, so a strong shrink leaves the mean shift of the new images (a
    translation, as semantic drift compensation does).
    """
    x, y = augment(before), augment(after)                                 # [N, D+1]
    eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
    xtx = x.T @ x
    reg = shrink * torch.diagonal(xtx)[:-1].mean() * eye
    reg[-1, -1] = 0.0
    b = torch.linalg.solve(xtx + reg + 1e-9 * eye, x.T @ y + reg @ eye)   # y ~ x b
    t = b.T
    t[-1] = 0.0
    t[-1, -1] = 1.0                                                        # the bias entry stays 1
    return t
