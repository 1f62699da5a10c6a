"""The field commands on a GPU, in one short device call (H100/H200 or a Jetson):

    python3 scripts/field_gpu_check.py        # from the repo root; fieldlearn need not be installed

1. `fieldlearn doctor` (GPU name and capability, NVRTC compile + cache for the device's arch);
2. a tiny base model trained on CUDA (synthetic images: the GPU box has no datasets), then
   `fieldlearn watch --once` learning two arriving classes on CUDA (the fused LAD kernel),
   exporting ONNX from the CUDA student and cleaning the inbox.
Exit status 0 when both pass, 1 when one fails, 3 without a GPU. About a minute.
Needs torch with CUDA, torchvision, onnx, onnxruntime, safetensors, Pillow and cuda-python on
the box (the lent H100/H200 image may lack torchvision, onnx or safetensors: carry wheels).
"""
import json, os, sys, tempfile, time
from pathlib import Path

os.chdir(Path(__file__).resolve().parents[1])

shim = Path(tempfile.mkdtemp()) / "fieldlearn"
shim.mkdir()
for pkg in ("cli", "device", "export", "runtime"):
    (shim / pkg).symlink_to(Path(pkg).resolve())
sys.path.insert(0, str(shim.parent))
os.environ["FIELDLEARN_CACHE"] = tempfile.mkdtemp()

import numpy as np, torch, torch.nn as nn
if not torch.cuda.is_available():
    print("field_gpu_check: no GPU here (exit 3)")
    sys.exit(3)
from PIL import Image
from fieldlearn.cli.main import main

tmp = Path(tempfile.mkdtemp())
t = time.time()
doctor_rc = main(["doctor", "--state", str(tmp / "state")])
print("doctor rc", doctor_rc, f"{time.time() - t:.1f}s", flush=True)

from fieldlearn.device.config import ModelConfig, RunConfig, TrainConfig
from fieldlearn.device.data import ImageSet, to_input
from fieldlearn.device.learner import train_base
from fieldlearn.device.model import build_student
from fieldlearn.store.state import save_version

rng = np.random.default_rng(0)
def images(k, n):
    base = rng.integers(0, 256, 3)
    out = []
    for i in range(n):
        a = np.clip(rng.normal(0, 30, (32, 32, 3)) + base, 0, 255).astype(np.uint8)
        a[(4 * k) % 32:(4 * k) % 32 + 6] = 255 - base
        out.append(a)
    return out

cfg = RunConfig(model=ModelConfig(width=0.35, variant="cifar", input_size=32, pretrained=False, freeze_blocks=10),
                train=TrainConfig(epochs=3, base_epochs=3, batch_size=16, progress=False, device="cuda"))
imgs, labels = [], []
for k in range(3):
    for a in images(k, 40):
        imgs.append(torch.from_numpy(a).permute(2, 0, 1)); labels.append(k)
base = ImageSet(torch.stack(imgs), torch.tensor(labels), ["a", "b", "c"])
torch.manual_seed(0)
st = build_student(cfg.model, 3).to("cuda")
train_base(st, base, cfg)
for m in st.modules():
    if isinstance(m, nn.BatchNorm2d):
        m.reset_running_stats(); m.momentum = None
st.train()
with torch.no_grad():
    st(to_input(base.images, 32, cfg.model.mean, cfg.model.std).cuda())
st.eval()
state = tmp / "state"
save_version(state, st, base.class_names, cfg, step=0, history=[])
inbox = tmp / "inbox"
for k, name in ((3, "d"), (4, "e")):
    (inbox / name).mkdir(parents=True)
    for i, a in enumerate(images(k, 24)):
        Image.fromarray(a).save(inbox / name / f"{i:03d}.png")
    (inbox / name / ".done").touch()
t = time.time()
rc = main(["watch", str(inbox), "--state", str(state), "--once"])
print("watch rc", rc, f"{time.time()-t:.1f}s", flush=True)
st = json.loads((state / "watch-status.json").read_text())
print("status", st["state"], st["current_version"], st["classes"], st["last_increment"])
meta = json.loads((state / "versions" / st["current_version"] / "meta.json").read_text())
print("history", {k: meta["history"][-1].get(k) for k in ("teacher_backend", "seconds", "phases", "new_class_val_accuracy")})
print("inbox left", sorted(os.listdir(inbox)), "files", sorted(os.listdir(state / "versions" / st["current_version"])))
ok = doctor_rc == 0 and rc == 0 and os.listdir(inbox) == [] and st["classes"] == ["a", "b", "c", "d", "e"]
print("field_gpu_check:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
