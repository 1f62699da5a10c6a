"""The import graph of fieldlearn.*, built from the source with `ast`: every import, the lazy
ones inside functions included, and every string constant that names a fieldlearn module
(the dispatch tables of `fieldlearn` and `fieldlearn bench` import by name; a module started
as a process, `[python, "-m", module]`, is not an import).

If a test here fails, the rooms of the house leak into each other:
- a cycle: two modules need each other, so neither can be read, tested or moved alone;
- library code imports a command (fieldlearn.cli.commands): the pipeline lives in a
  command file again instead of the library;
- fieldlearn.runtime or fieldlearn.export imports fieldlearn.device: an inference-only
  device needs the training code;
- the product imports fieldlearn.tools: a benchmark or the self-check becomes part of what
  ships. Only the thin command files (fieldlearn.cli.commands) may reach into tools;
- fieldlearn.device imports fieldlearn.fleet: a single device would need Flower. The fleet
  is a thin room over the library, never the other way round;
- the floors leak downward (FORBIDDEN below): the learning core (fieldlearn.device) imports
  the version store (fieldlearn.store), the field apps (fieldlearn.field) or the command
  line; the store imports the field apps; a library module imports the flag builder
  (fieldlearn.cli.flags) and so parses arguments again;
- something outside fieldlearn.store moves `current`: a version becomes current without
  the store (publish gate, lock, rollback bookkeeping);
- one folder holds more than a third of the product's lines: a floor has grown into a
  house of its own and wants splitting again (issue 24).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """{package: folder} from pyproject's [tool.setuptools.package-dir]."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    return {pkg: root / d for pkg, d in cfg["tool"]["setuptools"]["package-dir"].items()}


def module_files(dirs: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} for every .py under the mapped folders."""
    out = {}
    for pkg, folder in dirs.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def imports_of(name: str, source: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The fieldlearn modules that module `name` imports, wherever in the file."""
    pkg = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:   # `import a.b.c` of a name inside a module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    tree = ast.parse(source)
    run_as_script = {id(b) for node in ast.walk(tree) if isinstance(node, (ast.List, ast.Tuple))
                     for a, b in zip(node.elts, node.elts[1:])
                     if isinstance(a, ast.Constant) and a.value == "-m"}   # [python, "-m", module]: a process
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                sub = f"{base}.{a.name}"
                add(sub if sub in modules else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules \
                and id(node) not in run_as_script:
            add(node.value)
    return found


def import_graph(dirs: dict[str, Path]) -> dict[str, set[str]]:
    files = module_files(dirs)
    names = set(files)
    return {m: imports_of(m, f.read_text(), names, f.name == "__init__.py") for m, f in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def room(module: str) -> str:
    """The floor a module lives on: cli (the dispatcher), commands, flags (the command line's
    flag builder, fieldlearn.cli.flags), device (the learning core), store, field, export,
    runtime, fleet or tools."""
    if module.startswith("fieldlearn.cli.commands"):
        return "commands"
    if module == "fieldlearn.cli.flags":
        return "flags"
    return module.split(".")[1]


# The floors, bottom up: runtime and export (inference, no training code); device (the
# learning core); store (a version from staging to publish to rollback); field (the apps and
# the step pipeline); then the thin rooms on top: commands, flags, fleet, tools, cli.
ABOVE_THE_CORE = {"store", "field", "commands", "flags", "cli", "tools", "fleet"}

# room -> rooms it must never import
FORBIDDEN = {
    "cli": {"tools"},
    "commands": {"cli"},
    "flags": {"store", "field", "commands", "cli", "tools", "fleet"},
    "device": ABOVE_THE_CORE,
    "store": ABOVE_THE_CORE - {"store"},
    "field": {"commands", "flags", "cli", "tools", "fleet"},
    "export": {"device"} | ABOVE_THE_CORE,
    "runtime": {"device"} | ABOVE_THE_CORE,
    "fleet": {"commands", "cli", "tools"},
    "tools": {"commands", "cli"},
}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if room(t) in FORBIDDEN.get(room(m), ()))


# ---------------------------------------------------------------------------- the tree


def test_no_import_cycles():
    assert cycles(import_graph(package_dirs())) == []


def test_no_upward_imports():
    assert upward_imports(import_graph(package_dirs())) == []


def test_the_graph_sees_lazy_and_by_name_imports():
    """If this fails, the graph above misses imports and its two tests prove nothing."""
    graph = import_graph(package_dirs())
    assert {"fieldlearn.device", "fieldlearn.export", "fieldlearn.fleet", "fieldlearn.runtime",
            "fieldlearn.tools"} <= set(graph)
    assert "fieldlearn.runtime.metadata" in graph["fieldlearn.cli.main"]                 # inside main()
    assert "fieldlearn.cli.commands.learn" in graph["fieldlearn.cli.main"]            # COMMANDS table
    assert "fieldlearn.tools.bench_accuracy" in graph["fieldlearn.cli.commands.bench"]
    assert "fieldlearn.field.increment" in graph["fieldlearn.cli.commands.learn"]
    assert "fieldlearn.store.publish" in graph["fieldlearn.field.increment"]
    assert "fieldlearn.store.versions" in graph["fieldlearn.field.watch"]                 # inside a method
    assert "fieldlearn.cli.flags" in graph["fieldlearn.fleet.command"]


def uses_name(source: str, name: str) -> bool:
    """Whether a module imports, calls or otherwise names `name` (a bare or dotted use)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.alias) and node.name.rpartition(".")[2] == name:
            return True
        if (isinstance(node, ast.Name) and node.id == name) or (isinstance(node, ast.Attribute) and node.attr == name):
            return True
    return False


def test_only_the_store_moves_current():
    """If this fails, a module outside fieldlearn.store moves the `current` pointer through
    its one writer (fieldlearn.runtime.layout.switch_current): a version can become current
    past the publish gate, the state lock and rollback's bookkeeping. Following a version
    from `learn` to `current` must stay inside the store package."""
    files = module_files(package_dirs())
    movers = sorted(m for m, f in files.items()
                    if m != "fieldlearn.runtime.layout" and uses_name(f.read_text(), "switch_current"))
    assert movers, "switch_current is called nowhere: this test no longer sees the writer"
    assert [m for m in movers if room(m) != "store"] == [], movers


def product_lines(dirs: dict[str, Path]) -> dict[str, int]:
    """{package: non-blank lines of every .py under its folder} for each package-dir entry."""
    return {pkg: sum(1 for f in folder.rglob("*.py") for line in f.read_text().splitlines() if line.strip())
            for pkg, folder in dirs.items()}


def test_no_folder_holds_more_than_a_third_of_the_product():
    """If this fails, one folder has grown past a third of everything installed as
    fieldlearn.* (non-blank lines): split it along its floors, as issue 24 split device/.
    The message lists every folder's lines."""
    lines = product_lines(package_dirs())
    total = sum(lines.values())
    report = ", ".join(f"{pkg.removeprefix('fieldlearn.')} {n}" for pkg, n in sorted(lines.items(), key=lambda kv: -kv[1]))
    assert [pkg for pkg, n in lines.items() if 3 * n > total] == [], f"of {total} lines: {report}"


# ---------------------------------------------------------------------------- the detector


def synthetic(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return import_graph({"fieldlearn.device": tmp_path / "device", "fieldlearn.runtime": tmp_path / "runtime",
                         "fieldlearn.tools": tmp_path / "tools", "fieldlearn.cli": tmp_path / "cli",
                         "fieldlearn.store": tmp_path / "store", "fieldlearn.fleet": tmp_path / "fleet"})


def test_the_detector_flags_a_cycle_through_a_lazy_import(tmp_path):
    graph = synthetic(tmp_path, {
        "device/__init__.py": "",
        "device/a.py": "from fieldlearn.device.b import f\n",
        "device/b.py": "def f():\n    from . import a\n    return a\n",
        "device/c.py": "import fieldlearn.device.a\n",
        "runtime/__init__.py": "",
    })
    assert cycles(graph) == [["fieldlearn.device.a", "fieldlearn.device.b"]]


def test_the_detector_flags_upward_imports(tmp_path):
    graph = synthetic(tmp_path, {
        "device/__init__.py": "",
        "cli/commands/__init__.py": "",
        "cli/commands/learn.py": "import fieldlearn.tools.bench\n",       # allowed: a command
        "device/lib.py": "def g():\n    import importlib\n    return importlib.import_module('fieldlearn.tools.bench')\n",
        "runtime/__init__.py": "",
        "runtime/engines.py": "from fieldlearn.device import lib\n",
        "tools/__init__.py": "",
        "tools/bench.py": "from fieldlearn.device import lib\n",                # allowed: tools use the product
    })
    assert upward_imports(graph) == ["fieldlearn.device.lib -> fieldlearn.tools.bench",
                                     "fieldlearn.runtime.engines -> fieldlearn.device.lib"]


def test_the_detector_knows_the_floors(tmp_path):
    graph = synthetic(tmp_path, {
        "device/__init__.py": "",
        "device/learner.py": "from fieldlearn.store import state\n",              # the core reaches up
        "store/__init__.py": "",
        "store/state.py": "from fieldlearn.device import learner\n",              # allowed: the store uses the core
        "store/publish.py": "def f():\n    from fieldlearn.cli.flags import option\n",   # the store parses flags
        "cli/__init__.py": "",
        "cli/main.py": "",
        "cli/flags.py": "from fieldlearn.device import learner\n",
        "fleet/__init__.py": "",
        "fleet/command.py": "from fieldlearn.cli.flags import option\nfrom fieldlearn.cli import main\n",
    })
    assert room("fieldlearn.cli.flags") == "flags" and room("fieldlearn.cli.commands.learn") == "commands"
    assert upward_imports(graph) == ["fieldlearn.device.learner -> fieldlearn.store.state",
                                     "fieldlearn.fleet.command -> fieldlearn.cli.main",
                                     "fieldlearn.store.publish -> fieldlearn.cli.flags"]


def test_the_line_count_reads_every_folder(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.py").write_text("x = 1\n\n\ny = 2\n")
    (tmp_path / "a" / "sub" / "z.py").write_text("   \nz = 3\n")
    (tmp_path / "b" / "w.py").write_text("w = 4\n")
    assert product_lines({"p.a": tmp_path / "a", "p.b": tmp_path / "b"}) == {"p.a": 3, "p.b": 1}
