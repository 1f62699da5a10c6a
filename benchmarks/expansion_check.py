"""Outside check (issue 12, item 1): does a fixed random ReLU expansion of the frozen pooled
features, phi -> ReLU(phi R) with R [1280, E] Gaussian / sqrt(1280), help the ridge head?

Plain ridge with one-hot targets, solved on all seen classes' training images at each step
(what the product's statistics give exactly), on the field-sized CIFAR protocol: 50 classes of
order 1993, 10 base + 20 steps of 2, 40 train / 10 validation / 50 test images per class,
128 px, ImageNet MobileNetV2 frozen. Prints validation and test (average incremental / last)
for the raw features and E = 2048, 4096, 8192 at relative ridge 0.01 .. 3.

    python benchmarks/expansion_check.py 1993 > benchmarks/results/expansion-check/log.txt
"""
import sys, time, torch, torch.nn.functional as F
from fieldlearn.device.config import RunConfig, ModelConfig
from fieldlearn.device.data import open_dataset, class_order, incremental_split
from fieldlearn.device.model import build_student
from fieldlearn.device.learner import classifier_features
torch.set_num_threads(1)
seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1993
cfg = RunConfig(model=ModelConfig(variant="imagenet", input_size=128, pretrained=True, freeze_blocks=14,
                                  classifier="analytic", features="frozen"))
order = class_order(100, seed)[:50]
tr = open_dataset("cifar100", "train").select(order, 50, seed=seed).reorder(order)
te = open_dataset("cifar100", "test").select(order, 50, seed=seed).reorder(order)
tr, va = tr.split(0.2, seed=seed)
st = build_student(cfg.model, 50)
t0 = time.time()
X = {k: classifier_features(st, d, cfg).double() for k, d in (("tr", tr), ("va", va), ("te", te))}
Y = {"tr": tr.labels, "va": va.labels, "te": te.labels}
print("features", {k: tuple(v.shape) for k, v in X.items()}, f"{time.time()-t0:.0f}s", flush=True)
groups = incremental_split(list(range(50)), 10, 20)

def ridge(x, y, k, lam_rel):
    xa = torch.cat([x, x.new_ones(len(x), 1)], 1)
    g = xa.T @ xa; s = xa.T @ F.one_hot(y, k).double()
    scale = g.diagonal()[:-1].mean()
    reg = lam_rel * scale * torch.eye(len(g), dtype=g.dtype); reg[-1, -1] = 1e-9
    return torch.linalg.solve(g + reg, s)

def feats(x, R):
    return x if R is None else torch.relu(x @ R)

def run(R, lam, split):
    accs, seen = [], []
    for g in groups:
        seen += g; k = len(seen)
        m = torch.isin(Y["tr"], torch.tensor(seen)); w = ridge(feats(X["tr"][m], R), Y["tr"][m], k, lam)
        mt = torch.isin(Y[split], torch.tensor(seen)); xt = feats(X[split][mt], R)
        p = (torch.cat([xt, xt.new_ones(len(xt), 1)], 1) @ w).argmax(1)
        accs.append(float((p == Y[split][mt]).double().mean()) * 100)
    return sum(accs) / len(accs), accs[-1]

def ncm(split):
    accs, seen = [], []
    for g in groups:
        seen += g
        mu = torch.stack([F.normalize(X["tr"][Y["tr"] == c].mean(0), dim=0) for c in seen])
        mt = torch.isin(Y[split], torch.tensor(seen))
        p = torch.tensor(seen)[(X[split][mt] @ mu.T).argmax(1)]
        accs.append(float((p == Y[split][mt]).double().mean()) * 100)
    return sum(accs) / len(accs), accs[-1]
print("ncm val %.1f/%.1f test %.1f/%.1f" % (*ncm("va"), *ncm("te")), flush=True)
gen = torch.Generator().manual_seed(0)
for E in (None, 2048, 4096, 8192):
    R = None if E is None else torch.randn(X["tr"].shape[1], E, generator=gen, dtype=torch.float64) / X["tr"].shape[1] ** 0.5
    for lam in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
        t0 = time.time()
        print(f"E={E} lam={lam}: val %.1f/%.1f test %.1f/%.1f" % (*run(R, lam, "va"), *run(R, lam, "te")), f"{time.time()-t0:.0f}s", flush=True)
