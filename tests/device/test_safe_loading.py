"""Safe loading audit: nothing fieldlearn reads can execute code.

The code may deserialise with pickle in exactly one place (the restricted CIFAR unpickler
in device/data.py, which allows numpy arrays and plain types only) and call torch.load in
exactly one place (the pretrained weights package in device/model.py, weights_only=True).
Everything else a user, the inbox or a state supplies is read as safetensors, JSON, ONNX
(protobuf) or images. This test parses every source file (not a text grep, so a comment
does not hide or fake a use) and fails on any other pickle-family import or call,
torch.load without weights_only=True, torch.jit/hub loading, np.load(allow_pickle=True),
yaml.load, and the eval/exec builtins.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["device", "store", "field", "runtime", "export", "cli", "tools", "benchmarks", "scripts"]
PICKLE_FAMILY = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
ALLOWED_PICKLE = {("device/data.py", "pickle.Unpickler"), ("device/data.py", "pickle.UnpicklingError")}
# the same pretrained weights package, read by the outside reference that must not use fieldlearn
ALLOWED_TORCH_LOAD = {"device/model.py", "benchmarks/reference_check.py", "benchmarks/field_reference_check.py"}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def audit_source(rel: str, text: str) -> list[str]:
    """Unsafe deserialisation in one source file, as 'path:line: what' strings."""
    bad = []
    tree = ast.parse(text)
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_FAMILY and rel != "device/data.py":
                    bad.append(f"{where}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_FAMILY:
                bad.append(f"{where}: from {node.module} import ...")
            if node.module in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names):
                bad.append(f"{where}: from {node.module} import load")
        elif isinstance(node, ast.Attribute):
            name = dotted(node)
            if name.split(".")[0] in PICKLE_FAMILY and name.count(".") == 1 and (rel, name) not in ALLOWED_PICKLE:
                bad.append(f"{where}: {name}")
            if name in ("torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url", "torch.package",
                        "yaml.load", "yaml.unsafe_load", "numpy.load.__wrapped__"):
                bad.append(f"{where}: {name}")
        elif isinstance(node, ast.Call):
            fn = dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if fn == "torch.load":
                wo = kw.get("weights_only")
                if rel not in ALLOWED_TORCH_LOAD or not (isinstance(wo, ast.Constant) and wo.value is True):
                    bad.append(f"{where}: torch.load without weights_only=True (or outside device/model.py)")
            if fn in ("np.load", "numpy.load"):
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    bad.append(f"{where}: {fn}(allow_pickle=...)")
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                bad.append(f"{where}: {node.func.id}()")
        elif isinstance(node, ast.ClassDef):
            bases = {dotted(b) for b in node.bases}
            if "pickle.Unpickler" in bases:
                methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
                if "find_class" not in methods:
                    bad.append(f"{where}: Unpickler subclass {node.name} without a restricting find_class")
    return bad


def test_no_unsafe_deserialisation_in_the_code():
    """If this fails, some code path can unpickle (run code from) a file a user, the inbox or a
    state supplies: only the restricted CIFAR unpickler and the weights_only torch.load of the
    pretrained package are allowed."""
    files = [p for d in SCANNED if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    bad = [b for p in files for b in audit_source(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8"))]
    assert bad == []


def test_the_two_allowed_uses_are_where_the_audit_expects_them():
    """If this fails, the allow-list points at code that moved: the audit would pass vacuously."""
    data = (ROOT / "device" / "data.py").read_text()
    assert "class _RestrictedUnpickler(pickle.Unpickler)" in data and "def find_class" in data
    model = (ROOT / "device" / "model.py").read_text()
    assert "torch.load(" in model and "weights_only=True" in model


def test_the_audit_would_catch_unsafe_loading():
    """If this fails, the audit above proves nothing."""
    cases = {
        "import pickle\npickle.load(open('x', 'rb'))\n": "pickle.load",
        "import torch\ntorch.load('model.pt')\n": "torch.load",
        "import torch\ntorch.load('m.pt', weights_only=False)\n": "torch.load",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)\n": "allow_pickle",
        "import torch\ntorch.jit.load('m.pt')\n": "torch.jit.load",
        "from pickle import loads\n": "from pickle",
        "import dill\n": "import dill",
        "eval(open('cfg').read())\n": "eval()",
        "import pickle\nclass U(pickle.Unpickler):\n    pass\n": "without a restricting find_class",
    }
    for src, what in cases.items():
        found = audit_source("device/other.py", src)
        assert any(what in f for f in found), (src, found)
    assert audit_source("device/other.py", "import numpy as np\nnp.load('x.npy')\nm.eval()\n") == []
