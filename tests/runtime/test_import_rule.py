"""Imports go one way: export/ and runtime/ never import the training side (fieldlearn.device,
fieldlearn.store, fieldlearn.field), and runtime imports torch only inside the functions that
need it (an inference-only device has none)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAINING = r"(device|store|field)"
DEVICE_IMPORT = re.compile(rf"^\s*(from\s+fieldlearn\.{TRAINING}\b|import\s+fieldlearn\.{TRAINING}\b"
                           rf"|from\s+fieldlearn\s+import\s+(\([^)]*|[^\n]*)\b{TRAINING}\b)"
                           rf"|import_module\(\s*[\"']fieldlearn\.{TRAINING}\b", re.M)


def sources(*folders: str) -> list[Path]:
    files = [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]
    assert files, f"no sources under {folders}"
    return files


def test_export_and_runtime_do_not_import_device():
    """If this fails, the runtime side drags the training code (and torch) onto an
    inference-only device, or the packages import each other in a cycle."""
    offenders = [f"{p.relative_to(ROOT)}:{p.read_text()[:m.start()].count(chr(10)) + 1}"
                 for p in sources("export", "runtime") for m in DEVICE_IMPORT.finditer(p.read_text())]
    assert offenders == []


def module_level_imports(path: Path) -> set[str]:
    """Top-level modules imported at module level (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_imports_torch_lazily():
    """If this fails, importing fieldlearn.runtime needs torch."""
    eager = {str(p.relative_to(ROOT)): module_level_imports(p) & {"torch", "torchvision", "tensorrt", "onnxruntime"}
             for p in sources("runtime") + [ROOT / "export" / "tensorrt.py"]}
    assert {k: v for k, v in eager.items() if v} == {}


def test_importing_the_runtime_side_loads_no_torch():
    """If this fails, one of the modules classify needs pulls torch in indirectly."""
    code = ("import sys, fieldlearn.runtime.classify, fieldlearn.runtime.engines, fieldlearn.runtime.layout, "
            "fieldlearn.runtime.metadata, fieldlearn.runtime.cuda, fieldlearn.runtime.atomic, fieldlearn.export.tensorrt, "
            "fieldlearn.cli.main; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.split('.')[:2] in (['fieldlearn', 'device'], ['fieldlearn', 'store'], ['fieldlearn', 'field'])))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
