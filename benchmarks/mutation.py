"""Mutation testing of the core modules: how many one-line breaks of the product the tests catch.

    OMP_NUM_THREADS=1 python benchmarks/mutation.py losses metrics   # some modules
    python benchmarks/mutation.py                                     # every module (hours on 2 cores)
    python benchmarks/mutation.py losses --list                       # the mutants, not run
    python benchmarks/mutation.py losses --only 12,30                 # rerun some mutants
    python benchmarks/mutation.py store --sample 90                   # 90 of them, seeded draw (an estimate)

Not part of CI (too slow). A small AST runner rather than mutmut 3 or cosmic-ray (judged from
how they work; not tried): mutmut 3
names a mutant by the module path of its file (device/losses.py -> device.losses), while the
code is imported as fieldlearn.device.losses through setuptools' package-dir mapping, so its
trampolines are never reached; cosmic-ray needs a session database and a subprocess per
mutant that imports torch again (about 10 s each on the shared 2 cores). Here torch is
imported once, and each mutant runs in a forked child.

For each module: the source is parsed, each mutation site is found in a fixed order
(operators below), and for one mutant at a time the mutated source (ast.unparse) is written
into a private copy of the packages (TMP/fieldlearn/{device,export,...}), which the child
imports first on sys.path (and PYTHONPATH, for the CLI subprocesses some tests start). The
child runs only the tests that cover the module, with -x. Exit 0: the mutant survived; a
failure, an error or a timeout: killed. The unmutated unparse is run first and must pass.

Operators: comparison swaps (< <=, == !=, is/is not, in/not in), arithmetic swaps (+ -, * /,
// /, ** *), and/or, `not x` -> x, `-x` -> x, int constant n -> n + 1, float x -> 2x (0.0 ->
1.0), True <-> False, a call statement removed (`os.fsync(fd)` -> pass), a `raise` removed,
`.detach()` / `.clone()` / `.contiguous()` / `.float()` / `.relu()` / `.abs()` dropped,
`return e` -> `return None`, `a * b` -> a and -> b, `a / b` -> a (a weight
or a normaliser dropped), a call's two positional arguments swapped. Strings and f-strings (messages, log text) are not mutated.

Writes benchmarks/results/mutation/<module>.json (every mutant, its verdict and seconds).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("device", "export", "runtime", "cli", "tools")   # folder -> fieldlearn.<folder>

# Top-level definitions not mutated: the CUDA kernels' autograd Function and its CPU stand-in
# are the kernel path (tests/device/test_cuda_attention.py, the emulator and the GPU), not the
# `_ref` op this module is measured for.
SKIP = {"device/ops/attention_distill.py": frozenset({"TorchKernelBackend", "AttentionDistillFn"})}

# module name -> (source files, the tests that cover them)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "losses": (["device/losses.py"], ["tests/device/test_losses.py"]),
    "metrics": (["device/metrics.py"], ["tests/device/test_metrics.py"]),
    "attention": (["device/attention.py"],
                  ["tests/device/test_attention.py", "tests/device/test_ops_attention_distill.py",
                   "tests/device/test_losses.py"]),
    "attention_distill": (["device/ops/attention_distill.py"],
                          ["tests/device/test_ops_attention_distill.py", "tests/device/test_losses.py"]),
    "methods": (["device/methods/__init__.py", "device/methods/base.py", "device/methods/finetune.py",
                 "device/methods/lc_lad.py", "device/methods/lwf_mc.py", "device/methods/lwm.py",
                 "device/methods/none.py"],
                ["tests/device/test_losses.py", "tests/device/test_learner.py"]),
    # save_version's permissions, leftovers and disk-full paths are tested in test_store.py
    "state": (["store/state.py"], ["tests/store/test_state.py", "tests/store/test_store.py"]),
    "store": (["store/versions.py"], ["tests/store/test_store.py", "tests/store/test_state.py"]),
    "onnx": (["export/onnx.py"], ["tests/export/test_onnx.py"]),
    # test_learner.py checks the gradients of a training step; what learner.py also does (the
    # statistics, drift, evaluation, learn's increment) is tested in these
    "learner": (["device/learner.py"], ["tests/device/test_learner.py", "tests/field/test_learn.py",
                                        "tests/device/test_classifier.py", "tests/device/test_determinism.py",
                                        "tests/device/test_protocol.py"]),
}

PREIMPORT = ("pytest", "numpy", "torchvision", "torch.testing", "safetensors.torch", "onnx", "onnxruntime",
             "PIL.Image", "tqdm", "hypothesis", "_hypothesis_pytestplugin", "xdist.plugin")

# Tests left out of a module's selection, and why: each costs more than the rest of its files
# together, and is about something else than the module's logic (measured 2026-11-29, 2 cores).
AUDIT = ("test_no_training_pixels_or_features_are_ever_written",
         "test_feature_audit_would_catch_a_stored_image_feature", "test_audit_would_catch_a_stored_image")
DESELECT = {
    # 104 s: the privacy audit of a whole learn run, and its two positive controls (they test
    # the audit, on CIFAR images, not the state's code); 34 s: two CLI processes racing for the lock
    "state": [f"tests/store/test_state.py::{t}" for t in AUDIT]
    + ["tests/store/test_store.py::test_concurrent_cli_runs_are_refused_and_a_killed_owner_is_recovered"],
    # the same, and 34 s: two CLI processes racing for the lock
    "store": [f"tests/store/test_state.py::{t}" for t in AUDIT]
    + ["tests/store/test_store.py::test_concurrent_cli_runs_are_refused_and_a_killed_owner_is_recovered"],
    # 69 s: two class orders of the demo protocol, the accuracy claim (more than the rest together)
    "learner": ["tests/device/test_protocol.py::test_the_default_learner_clearly_beats_not_learning"],
}

CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
            ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}
SYM = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
       ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+",
       ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Pow: "**", ast.Mod: "%"}
DROPPED_METHODS = {"detach", "clone", "contiguous", "float", "relu", "abs"}


class Mutator(ast.NodeTransformer):
    """Post-order walk; numbers every mutation site. With target=None it only lists them;
    with target=k it applies mutant k (sites are numbered identically up to k)."""

    def __init__(self, target: int | None = None, skip: frozenset[str] = frozenset()):
        self.target = target
        self.skip = skip                         # top-level defs / classes left alone
        self.sites: list[tuple[int, str]] = []   # (line, description)

    def _site(self, node: ast.AST, desc: str) -> bool:
        k = len(self.sites)
        self.sites.append((getattr(node, "lineno", 0), desc))
        return k == self.target

    def visit_Module(self, node):
        node.body = [n if getattr(n, "name", None) in self.skip else self.visit(n) for n in node.body]
        return node

    def visit_JoinedStr(self, node):     # f-strings: message text, never mutated
        return node

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant):   # docstring
            return node
        self.generic_visit(node)
        if isinstance(node.value, ast.Call) and self._site(node, f"call removed: {ast.unparse(node.value)[:60]}"):
            return ast.copy_location(ast.Pass(), node)
        return node

    def visit_Raise(self, node):
        self.generic_visit(node)
        if self._site(node, "raise removed"):
            return ast.copy_location(ast.Pass(), node)
        return node

    def visit_Return(self, node):
        self.generic_visit(node)
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            if self._site(node, "return value -> None"):
                node.value = ast.Constant(None)
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            new = CMP_SWAP.get(type(op))
            if new and self._site(node, f"{SYM[type(op)]} -> {SYM[new]}"):
                node.ops[i] = new()
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        new = BIN_SWAP.get(type(node.op))
        if new and self._site(node, f"{SYM[type(node.op)]} -> {SYM[new]}"):
            node.op = new()
        if isinstance(node.op, (ast.Mult, ast.Div)):   # a weight or a normaliser dropped: beta * ld -> ld
            if self._site(node, f"{SYM[type(node.op)]} {ast.unparse(node.right)[:30]} dropped"):
                return node.left
        if isinstance(node.op, ast.Mult) and self._site(node, f"{ast.unparse(node.left)[:30]} * dropped"):
            return node.right
        return node

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        new = BIN_SWAP.get(type(node.op))
        if new and self._site(node, f"{SYM[type(node.op)]}= -> {SYM[new]}="):
            node.op = new()
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._site(node, f"{type(node.op).__name__.lower()} -> {new.__name__.lower()}"):
            node.op = new()
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, (ast.Not, ast.USub)):
            if self._site(node, f"{'not' if isinstance(node.op, ast.Not) else 'unary -'} removed"):
                return node.operand
        return node

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            if self._site(node, f"{v} -> {not v}"):
                return ast.copy_location(ast.Constant(not v), node)
        elif isinstance(v, int):
            if self._site(node, f"{v} -> {v + 1}"):
                return ast.copy_location(ast.Constant(v + 1), node)
        elif isinstance(v, float):
            new = v * 2 if v else 1.0
            if self._site(node, f"{v!r} -> {new!r}"):
                return ast.copy_location(ast.Constant(new), node)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if (len(node.args) == 2 and not any(isinstance(x, ast.Starred) for x in node.args)
                and self._site(node, "first two arguments swapped")):
            node.args = node.args[::-1]
        if (isinstance(f, ast.Attribute) and f.attr in DROPPED_METHODS and not node.args and not node.keywords
                and self._site(node, f".{f.attr}() dropped")):
            return f.value
        return node


def list_mutants(src: str, skip: frozenset[str] = frozenset()) -> list[tuple[int, str]]:
    m = Mutator(None, skip)
    m.visit(ast.parse(src))
    return m.sites


def mutant_source(src: str, k: int | None, skip: frozenset[str] = frozenset()) -> str:
    tree = ast.parse(src)
    if k is not None:
        tree = Mutator(k, skip).visit(tree)
        ast.fix_missing_locations(tree)
    return ast.unparse(tree) + "\n"


def make_copy() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="fieldlearn-mutation-"))
    (tmp / "fieldlearn").mkdir()
    (tmp / "fieldlearn" / "__init__.py").write_text("")   # a regular package: found before the editable finder
    for p in PACKAGES:
        shutil.copytree(ROOT / p, tmp / "fieldlearn" / p, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp


def run_tests(tests: list[str], timeout: float, log: Path) -> tuple[str, float]:
    """tests: pytest arguments (paths, --deselect ...)."""
    """Fork; the child runs pytest on the tests; -> ('passed' | 'failed' | 'timeout', seconds)."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:   # child
        try:
            os.setsid()
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest
            rc = pytest.main([*tests, "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                              "--import-mode=importlib", "-m", "not gpu", "--durations=8"])
        except BaseException:   # noqa: BLE001 - anything in the child is a failed run
            rc = 3
        os._exit(int(rc))
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                return ("passed" if rc == 0 else "failed"), time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                return "timeout", time.monotonic() - t0
            time.sleep(0.05)
    finally:   # a timeout, or the runner stopped (SIGTERM, ^C): the child and what it started go
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def run_module(name: str, copy: Path, only: set[int] | None, out_dir: Path, sample: int = 0) -> dict:
    files, tests = MODULES[name]
    tests = list(tests)   # relative to ROOT, the runner's working directory: --deselect matches node ids
    for t in DESELECT.get(name, []):
        tests += ["--deselect", t]
    log = out_dir / f"{name}.log"
    originals = {f: (ROOT / f).read_text() for f in files}
    # baseline: every file as unparsed (comments gone), no mutation: must pass
    for f, src in originals.items():
        (copy / "fieldlearn" / f).write_text(mutant_source(src, None))
    verdict, base_s = run_tests(tests, 1800, log)
    if verdict != "passed":
        raise SystemExit(f"{name}: the unmutated tests do not pass (see {log})")
    timeout = 3 * base_s + 30
    print(f"{name}: baseline {base_s:.1f} s, timeout {timeout:.0f} s", flush=True)
    total = sum(len(list_mutants(src, SKIP.get(f, frozenset()))) for f, src in originals.items())
    if sample and only is None and sample < total:   # a seeded random subset: an estimate of the score
        draw = list(range(total))
        random.Random(0).shuffle(draw)               # any prefix of the draw is a random sample too
        only = set(draw[:sample])
    mutants, n = [], 0
    for f, src in originals.items():
        lines = src.splitlines()
        skip = SKIP.get(f, frozenset())
        for k, (line, desc) in enumerate(list_mutants(src, skip)):
            idx, n = n, n + 1
            if only is not None and idx not in only:
                continue
            (copy / "fieldlearn" / f).write_text(mutant_source(src, k, skip))
            verdict, secs = run_tests(tests, timeout, log)
            status = "survived" if verdict == "passed" else ("timeout" if verdict == "timeout" else "killed")
            mutants.append({"id": idx, "file": f, "line": line, "mutation": desc,
                            "source": lines[line - 1].strip() if 0 < line <= len(lines) else "",
                            "status": status, "seconds": round(secs, 1)})
            mark = "SURVIVED" if status == "survived" else status
            print(f"  #{idx:3d} {f}:{line} {desc}: {mark} ({secs:.1f} s)", flush=True)
            (out_dir / f"{name}.partial.json").write_text(json.dumps(mutants, indent=1) + "\n")   # stopped early: kept
        (copy / "fieldlearn" / f).write_text(mutant_source(src, None))
    (out_dir / f"{name}.partial.json").unlink(missing_ok=True)
    killed = sum(m["status"] != "survived" for m in mutants)
    result = {"module": name, "files": files, "tests": MODULES[name][1],
              "deselected": DESELECT.get(name, []), "mutants": len(mutants),
              "killed": killed, "survived": len(mutants) - killed,
              "score": round(100 * killed / len(mutants), 1) if mutants else None,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "OMP_NUM_THREADS=1 python benchmarks/mutation.py " + " ".join(sys.argv[1:]),
              "rerun_of": sorted(only) if only and not sample else None,
              "sample_of": total if sample and sample < total else None, "list": mutants}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    p.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    p.add_argument("--only", default="", help="comma-separated mutant ids to run (one module)")
    p.add_argument("--sample", type=int, default=0,
                   help="run N of each module's mutants, drawn at random with a fixed seed (an estimate)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutation"))
    a = p.parse_args(argv)
    names = a.modules or list(MODULES)
    for n in names:
        if n not in MODULES:
            p.error(f"unknown module {n!r}; known: {', '.join(MODULES)}")
    if a.list:
        for n in names:
            i = 0
            for f in MODULES[n][0]:
                for line, desc in list_mutants((ROOT / f).read_text(), SKIP.get(f, frozenset())):
                    print(f"{n} #{i} {f}:{line} {desc}")
                    i += 1
        return 0
    only = {int(x) for x in a.only.split(",") if x} or None
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.dont_write_bytecode = True
    import importlib

    import torch   # once, in the parent: every forked child inherits it (about 10 s saved a mutant)
    torch.set_num_threads(1)
    for m in PREIMPORT:   # the product's dependencies and pytest's plugins, never fieldlearn itself
        try:
            importlib.import_module(m)
        except ImportError:
            pass
    out_dir = Path(a.out).resolve()
    os.chdir(ROOT)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = make_copy()
    sys.path.insert(0, str(copy))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # through the finally blocks
    try:
        rows = []
        for n in names:
            r = run_module(n, copy, only, out_dir, a.sample)
            suffix = "-rerun" if only else ""   # --only: a rerun of some mutants (the survivors)
            (out_dir / f"{n}{suffix}.json").write_text(json.dumps(r, indent=1) + "\n")
            rows.append(r)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    print("\n| module | mutants | killed | survived | score |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['survived']} | {r['score']} % |")
    for r in rows:
        for m in r["list"]:
            if m["status"] == "survived":
                print(f"survivor {r['module']} #{m['id']} {m['file']}:{m['line']} {m['mutation']}   `{m['source']}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
