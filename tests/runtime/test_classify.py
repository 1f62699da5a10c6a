"""`fieldlearn classify` in a subprocess: right labels, one-line errors, no training code.

The model is a hand-made "colour" classifier exported like a student (logit c = mean of
normalised channel c), so the expected label of a red, green or blue photo is known, and
the test checks the whole path: Pillow decode, resize to the metadata's input size,
normalisation with its mean/std, the engine, and the class names from the metadata.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from fieldlearn.export.onnx import export_classifier

CLASSES = ["red", "green", "blue"]
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


class ColourNet(nn.Module):
    """Student-shaped (forward -> (features, logits), .cfg, .num_classes): logits are the
    per-channel means of the normalised image, so a red image scores highest on "red"."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(input_size=24, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                   arch="colour", variant="test", width=1.0)
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(3) * 4)
            self.head.bias.zero_()

    def forward(self, x):
        return x, self.head(x.mean((2, 3)))    # [B, 3, S, S], [B, 3]


def photo(rgb, size, seed, mode="RGB") -> Image.Image:
    """A noisy image of one dominant colour (not a flat fill: resizing must average it)."""
    rng = np.random.default_rng(seed)
    base = np.array(rgb, np.float64) * 200 + 25
    arr = np.clip(base + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    return im.convert(mode) if mode != "RGB" else im


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    version = root / "state" / "versions" / "0002"
    export_classifier(ColourNet(), version, classes=CLASSES, step=2)
    (root / "state" / "current").write_text("0002\n")
    images = {
        "red": root / "red.jpg", "green": root / "green.png", "blue": root / "blue_rgba.png"}
    photo((1, 0, 0), (50, 40), 0).save(images["red"], quality=90)
    photo((0, 1, 0), (64, 64), 1).save(images["green"])
    photo((0, 0, 1), (20, 30), 2, mode="RGBA").save(images["blue"])
    bad = root / "notes.jpg"
    bad.write_text("this is not a JPEG")
    return SimpleNamespace(root=root, state=root / "state", model=version / "model.onnx", images=images, bad=bad)


def fieldlearn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fieldlearn.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=120)


def test_classify_names_each_image_by_its_colour(state):
    """If this fails, classify's preprocessing, engine or label lookup is wrong."""
    paths = [str(state.images[c]) for c in CLASSES]
    r = fieldlearn("classify", *paths, "--state", str(state.state), "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "onnxruntime" and doc["model"] == str(state.model)
    assert [res["top"][0]["label"] for res in doc["results"]] == CLASSES
    for res in doc["results"]:
        assert len(res["top"]) == 2 and 0 < res["top"][1]["prob"] <= res["top"][0]["prob"] <= 1


def test_classify_imports_neither_torch_nor_training_code(state, tmp_path):
    """If this fails, an inference-only device (no torch) could not run classify."""
    out = tmp_path / "modules.json"
    script = textwrap.dedent(f"""
        import json, sys
        from fieldlearn.cli.main import main
        rc = main(["classify", {str(state.images["red"])!r}, "--model", {str(state.model)!r}, "--top-k", "1"])
        json.dump({{"rc": rc, "modules": sorted(sys.modules)}}, open({str(out)!r}, "w"))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == str(state.images["red"]) and lines[1].endswith("  red")
    doc = json.loads(out.read_text())
    assert doc["rc"] == 0 and {"fieldlearn.runtime.classify", "onnxruntime"} <= set(doc["modules"])
    leaked = [m for m in doc["modules"] if m == "torch" or m.startswith(("torch.", "fieldlearn.device"))]
    assert leaked == []


def test_bad_image_is_a_one_line_error_naming_it(state):
    """If this fails, one corrupt photo gives a traceback instead of saying which file."""
    r = fieldlearn("classify", str(state.images["red"]), str(state.bad), "--state", str(state.state))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and str(state.bad) in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("case", ["no_current", "bad_current", "no_model", "not_exported"])
def test_bad_state_or_model_is_a_one_line_error(state, tmp_path, case):
    """If this fails, a wrong --state/--model gives a traceback or names the wrong file."""
    if case == "no_current":
        (tmp_path / "versions").mkdir()
        args, named = ["--state", str(tmp_path)], str(tmp_path / "current")
    elif case == "bad_current":
        (tmp_path / "current").write_text("../../etc\n")
        args, named = ["--state", str(tmp_path)], str(tmp_path / "current")
    elif case == "no_model":
        args, named = ["--model", str(tmp_path / "missing.onnx")], str(tmp_path / "missing.onnx")
    else:
        (tmp_path / "versions" / "0001").mkdir(parents=True)
        (tmp_path / "current").write_text("0001")
        args, named = ["--state", str(tmp_path)], str(tmp_path / "versions" / "0001" / "model.onnx")
    r = fieldlearn("classify", str(state.images["red"]), *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and named in r.stderr, r.stderr


def test_top_k_lists_every_class_in_order_of_probability(state, tmp_path):
    """If this fails, classify names the right set of classes but in the wrong order, or puts
    one class's name on another's probability (labels looked up sorted, the ranking reversed):
    with k = the number of classes a comparison of label *sets* cannot see either."""
    from fieldlearn.runtime.classify import classify
    from fieldlearn.runtime.engines import OrtEngine
    from fieldlearn.runtime.metadata import model_info

    info = model_info(state.model)
    assert info.classes == CLASSES          # red, green, blue: logit order, not alphabetical
    colours = {"gbr.png": (0.2, 1.0, 0.6), "brg.png": (0.5, 0.1, 1.0), "rgb.png": (1.0, 0.55, 0.1)}
    paths = []
    for i, (name, rgb) in enumerate(colours.items()):
        photo(rgb, (30, 30), 10 + i).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    results = classify(paths, info, OrtEngine(state.model, threads=1), top_k=len(CLASSES))
    mean, std = info.mean, info.std
    for res, rgb in zip(results, colours.values()):
        # ColourNet's logit of a class is 4 x its channel's normalised mean (photo: c * 200 + 25).
        logits = [4 * ((c * 200 + 25) / 255 - m) / s for c, m, s in zip(rgb, mean, std)]
        want = sorted(range(3), key=lambda j: -logits[j])
        assert [t["label"] for t in res["top"]] == [CLASSES[j] for j in want], res
        assert [t["index"] for t in res["top"]] == want
        probs = [t["prob"] for t in res["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-6)
