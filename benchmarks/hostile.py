"""Hostile corpus: every option of every command, and the field daemon, fed what users feed them.

    python benchmarks/hostile.py [--only SUBSTR] [--spawn] [--properties N] [--json FILE]

Each case runs the real CLI (`fieldlearn.cli.main.main(argv)`) in its own child process with
its own stdout, stderr and exit code, on a fresh copy of a tiny state, and gets a verdict:

    clean error        exit 2, exactly one `error:` line, the state dir byte-identical
    accepted           exit 0 and the case's own check holds (e.g. a skipped file was reported)
    traceback          a Python traceback, or an exit code other than 0 and 2
    hang               no answer within the timeout (the child is killed)
    silent wrong       exit 0 where a refusal was due, or the check found input dropped or a
                       bad result (e.g. an untrained model made current)
    messy error        exit 2 with more than one error line, or the state changed on a refusal
    wrong refusal      exit 2 on input that should have been accepted

By default the children are forked from one process that has imported fieldlearn and torch
once (each child is still a separate process: a hang or a crash is its own); --spawn starts
a fresh interpreter per case instead (slower: torch is imported every time). The daemon
cases run `fieldlearn watch` for real and poke at its inbox while it runs; after each, the
daemon must still be running and must not have rejected a good class.

--properties N also runs the property-based CLI tests (tests/cli/test_cli_properties.py)
with N examples each. Exit status 0 only when every verdict is `clean error` or `accepted`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PYTHONWARNINGS", "default")

TIMEOUT = 180
GOOD_VERDICTS = {"clean error", "accepted"}
TINY = ["--no-pretrained", "--width", "0.35", "--variant", "cifar", "--input-size", "32", "--freeze-blocks", "0"]
FAST = ["--no-progress", "--num-threads", "1", "--batch-size", "8"]


# ---------------------------------------------------------------------------- running one child

@dataclass
class Result:
    rc: int | None
    out: str
    err: str
    seconds: float


def run_child(argv: list[str], spawn: bool, timeout: float = TIMEOUT, cwd: Path | None = None) -> Result:
    """The CLI in a child process: (exit code or None on a hang, stdout, stderr)."""
    argv = [str(a) for a in argv]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        if spawn:
            p = subprocess.Popen([sys.executable, "-m", "fieldlearn.cli", *argv], stdout=fo, stderr=fe,
                                 stdin=subprocess.DEVNULL, cwd=cwd or ROOT)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                rc = None
        else:
            pid = os.fork()
            if pid == 0:   # the child: the CLI as the interpreter would run it
                code = 1
                try:
                    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                    os.dup2(fo.fileno(), 1)
                    os.dup2(fe.fileno(), 2)
                    sys.stdout, sys.stderr = (io.TextIOWrapper(os.fdopen(os.dup(n), "wb"), line_buffering=True)
                                              for n in (1, 2))
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    if cwd:
                        os.chdir(cwd)
                    from fieldlearn.cli.main import main

                    try:
                        code = main(argv)
                    except SystemExit as e:
                        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    except BaseException:   # noqa: BLE001 - what the user would see: a traceback
                        traceback.print_exc()
                        code = 1
                finally:
                    for f in (sys.stdout, sys.stderr):
                        try:
                            f.flush()
                        except Exception:   # noqa: BLE001
                            pass
                    os._exit(int(code or 0))
            deadline = time.monotonic() + timeout
            rc = None
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    rc = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        fo.seek(0)
        fe.seek(0)
        return Result(rc, fo.read().decode(errors="replace"), fe.read().decode(errors="replace"),
                      time.perf_counter() - t0)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    if not root.exists():
        return "absent"
    for p in sorted(root.rglob("*")):
        if p.name in ("watch-status.json", ".watch.lock"):
            continue
        h.update(str(p.relative_to(root)).encode("utf-8", "surrogateescape"))
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- the world

class World:
    """Shared inputs, made once: a tiny exported state, class folders, datasets, images."""

    def __init__(self, base: Path, spawn: bool):
        from PIL import Image

        from fieldlearn.device.data import load_cifar100
        from tests.conftest import CIFAR_DIR, write_image_folder

        self.base, self.spawn = base, spawn
        self.data = load_cifar100(CIFAR_DIR, "test")
        self.write = write_image_folder
        self.names = self.data.class_names
        d = base / "dataset"
        write_image_folder(d / "train", self.data, [0, 1, 2], 10)
        write_image_folder(d / "test", self.data, [0, 1, 2], 5)
        self.dataset = d
        self.state = base / "state"
        r = run_child(["init", "--data", d, "--state", self.state, *TINY, "--base-epochs", "6", "--epochs", "1",
                       *FAST], spawn)
        assert r.rc == 0, r.err
        self.image = base / "probe.png"
        Image.fromarray(self.data.images[7].permute(1, 2, 0).numpy()).save(self.image)
        self.next = 10

    def classes(self, n: int = 1) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


@dataclass
class Work:
    """One case's copy: w.state (a copy of the tiny state), w.tmp (scratch), helpers."""
    world: World
    tmp: Path
    state: Path

    def folder(self, n: int = 6, classes: int = 1, name: str = "new") -> Path:
        root = self.tmp / name
        self.world.write(root, self.world.data, self.world.classes(classes), n)
        return root

    def class_dir(self, root: Path) -> Path:
        return sorted(p for p in root.iterdir() if not p.name.startswith("."))[0]

    def meta(self) -> dict:
        from fieldlearn.runtime.layout import current_version_dir

        return json.loads((current_version_dir(self.state) / "meta.json").read_text())


@dataclass
class Case:
    name: str
    argv: Callable[[Work], list]          # built after setup
    expect: str = "error"                 # "error" or "ok"
    check: Callable[[Work, Result], str | None] | None = None   # for "ok": what is wrong, or None
    changes_state: bool = False           # an accepted run may change the state


def current(w: Work) -> str:
    return (w.state / "current").read_text().strip()


def learned(n: int):
    """check: a new version is current and it learned n images (train + held out)."""
    def check(w: Work, r: Result) -> str | None:
        h = w.meta()["history"][-1]
        got = h.get("n_images", 0) + h.get("n_val_images", 0)
        return None if current(w) == "0002" and got == n else f"current {current(w)}, learned {got} images, not {n}"
    return check


def warned(*words: str, then=None):
    """check: a warning line on stderr names every word (nothing dropped without a word)."""
    def check(w: Work, r: Result) -> str | None:
        lines = [line for line in r.err.splitlines() if "warning:" in line]
        if not any(all(x in line for x in words) for line in lines):
            return f"no warning naming {words}: {lines}"
        return then(w, r) if then else None
    return check


def put(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path`; return the path (for building argv in one expression)."""
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def fifo(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)
    return path


def loop(path: Path) -> Path:
    os.symlink(path.name + ".b", path)
    os.symlink(path.name, path.with_name(path.name + ".b"))
    return path


# ---------------------------------------------------------------------------- the cases

def cli_cases() -> list[Case]:
    C: list[Case] = []

    def bad(name, argv):
        C.append(Case(name, argv))

    def learn_bad(opt: str, *values: str):
        for v in values:
            bad(f"learn {opt} {v}", lambda w, v=v: ["learn", w.folder(), "--state", w.state, *FAST, opt, v])

    # ---- learn: every numeric / choice option, then the input
    learn_bad("--epochs", "0", "-3", "x")
    learn_bad("--batch-size", "0", "-8", "1")
    learn_bad("--lr", "-1", "0", "nan", "inf", "1e30")
    learn_bad("--base-lr", "-1")
    learn_bad("--momentum", "1", "-0.1")
    learn_bad("--weight-decay", "-1")
    learn_bad("--beta", "-1")
    learn_bad("--gamma", "nan")
    learn_bad("--temperature", "0")
    learn_bad("--ld", "mse")
    learn_bad("--lc-span", "some")
    learn_bad("--seed", "-1", "1099511627776")
    learn_bad("--num-threads", "-1")
    learn_bad("--max-grad-norm", "-1")
    learn_bad("--device", "tpu", "cuda", "cuda:99")
    learn_bad("--method", "nope")
    learn_bad("--teacher-backend", "nope")
    learn_bad("--trunk-backend", "nope")
    learn_bad("--new-head-init", "nope")
    learn_bad("--val-fraction", "1", "-0.1", "nan")
    bad("learn --eval missing", lambda w: ["learn", w.folder(), "--state", w.state, *FAST, "--eval", w.tmp / "nope"])
    C.append(Case("learn --eval with unknown classes", lambda w: ["learn", w.folder(), "--state", w.state, *FAST,
                                                                  "--eval", "cifar100"],
                  "ok", warned("not known to the model"), True))
    C.append(Case("learn --val-fraction 0", lambda w: ["learn", w.folder(), "--state", w.state, *FAST,
                                                       "--val-fraction", "0", "--no-export"], "ok", learned(6), True))
    C.append(Case("learn --epochs 2 --no-export", lambda w: ["learn", w.folder(), "--state", w.state, *FAST, "--epochs",
                                                             "2", "--no-export"], "ok", learned(6), True))
    bad("learn images dir missing", lambda w: ["learn", w.tmp / "nope", "--state", w.state, *FAST])
    bad("learn images dir is a FIFO", lambda w: ["learn", fifo(w.tmp / "pipe"), "--state", w.state, *FAST])
    bad("learn 2 images per class", lambda w: ["learn", w.folder(n=2), "--state", w.state, *FAST])

    def empty_class(w):
        root = w.folder()
        (root / "rose").mkdir()
        return ["learn", root, "--state", w.state, *FAST]
    bad("learn an empty class folder", empty_class)
    bad("learn a known class", lambda w: ["learn", w.world.dataset / "train", "--state", w.state, *FAST])

    def bad_name(w):
        root = w.folder()
        w.class_dir(root).rename(root / "tu\tlip")
        return ["learn", root, "--state", w.state, *FAST]
    bad("learn a class name with a tab", bad_name)

    def hidden_class(w):
        root = w.folder()
        w.world.write(root / ".secret", w.world.data, w.world.classes(), 6)
        return ["learn", root, "--state", w.state, *FAST]
    C.append(Case("learn with a hidden class folder", hidden_class, "ok", warned(".secret", then=learned(6)), True))

    def gif_and_bare(w):
        from PIL import Image
        root = w.folder()
        d = w.class_dir(root)
        im = Image.open(next(d.iterdir())).convert("RGB")
        im.save(d / "anim.gif")
        im.save(d / "no-extension", "JPEG")
        return ["learn", root, "--state", w.state, *FAST]
    C.append(Case("learn .gif and extension-less JPEG", gif_and_bare, "ok", learned(8), True))

    def with_loop(w):
        root = w.folder()
        loop(w.class_dir(root) / "loop.jpg")
        return ["learn", root, "--state", w.state, *FAST]
    C.append(Case("learn with a symlink loop", with_loop, "ok", warned("symlink loop", then=learned(6)), True))

    def with_fifo(w):
        root = w.folder()
        fifo(w.class_dir(root) / "camera.jpg")
        return ["learn", root, "--state", w.state, *FAST]
    C.append(Case("learn with a FIFO named camera.jpg", with_fifo, "ok", warned("camera.jpg", "FIFO", then=learned(6)),
                  True))

    def with_junk(w):
        root = w.folder()
        (w.class_dir(root) / "zero.jpg").write_bytes(b"")
        (w.class_dir(root) / "sub").mkdir()
        (root / "README.txt").write_text("x")
        return ["learn", root, "--state", w.state, *FAST]
    C.append(Case("learn with a zero-byte image, a sub-folder, a root file", with_junk, "ok",
                  warned("zero.jpg", "sub", "README.txt", then=learned(6)), True))

    def no_current(w):
        (w.state / "current").unlink()
        return ["learn", w.folder(), "--state", w.state, *FAST]
    C.append(Case("learn with current missing (advice: rollback --to N)", no_current, "error"))
    C[-1].check = lambda w, r: None if "fieldlearn rollback" in r.err and "--to 1" in r.err else "no rollback advice"

    def current_fifo(w):
        fifo(w.state / "current")
        return ["learn", w.folder(), "--state", w.state, *FAST]
    bad("learn with current a FIFO", current_fifo)

    def meta_edit(key, value):
        def setup(w):
            m = w.state / "versions" / "0001" / "meta.json"
            d = json.loads(m.read_text())
            section, _, name = key.partition(".")
            d["config"][section][name] = value
            m.write_text(json.dumps(d))
            return ["learn", w.folder(), "--state", w.state, *FAST]
        return setup
    bad("learn on a saved config with epochs 0", meta_edit("train.epochs", 0))
    bad("learn on a saved config with input_size -1", meta_edit("model.input_size", -1))
    bad("learn on a saved config with lr 'fast'", meta_edit("train.lr", "fast"))

    def meta_garbage(w):
        (w.state / "versions" / "0001" / "meta.json").write_bytes(b"\0{not json")
        return ["learn", w.folder(), "--state", w.state, *FAST]
    bad("learn with meta.json not JSON", meta_garbage)

    def weights_cut(w):
        p = w.state / "versions" / "0001" / "model.safetensors"
        p.write_bytes(p.read_bytes()[:1000])
        return ["learn", w.folder(), "--state", w.state, *FAST]
    bad("learn with truncated weights", weights_cut)
    bad("learn on a missing state", lambda w: ["learn", w.folder(), "--state", w.tmp / "nope", *FAST])

    # ---- init
    def init(*extra, data=None, state=None):
        return lambda w: ["init", "--data", data(w) if data else w.world.dataset, "--state",
                          state(w) if state else w.tmp / "fresh", *TINY, "--base-epochs", "1", *FAST, "--no-export",
                          *extra]
    for opt, v in [("--base-epochs", "0"), ("--input-size", "0"), ("--input-size", "5000"), ("--classes", "0"),
                   ("--classes", "99"), ("--per-class", "1"), ("--order-seed", "-1"), ("--width", "0"),
                   ("--freeze-blocks", "19"), ("--dropout", "1"), ("--variant", "tiny"), ("--epochs", "-1"),
                   ("--device", "tpu"), ("--arch", "resnet")]:
        bad(f"init {opt} {v}", init(opt, v))
    bad("init --width 0.5 with pretrained weights",
        lambda w: ["init", "--data", w.world.dataset, "--state", w.tmp / "fresh", "--width", "0.5", *FAST])
    bad("init --mean 2 0 0", init("--mean", "2", "0", "0"))
    bad("init --std 0 1 1", init("--std", "0", "1", "1"))
    bad("init under a file (unwritable parent)", init(state=lambda w: put(w.tmp / "f", "x") / "s"))
    bad("init --data missing", init(data=lambda w: w.tmp / "nope"))
    bad("init --data a FIFO", init(data=lambda w: fifo(w.tmp / "pipe")))

    def small_dataset(w):
        w.world.write(w.tmp / "small", w.world.data, w.world.classes(2), 3)
        return w.tmp / "small"
    bad("init on 3 images per class", init(data=small_dataset))
    bad("init on a state with versions", init(state=lambda w: w.state))
    C.append(Case("init --force on a state with versions", init("--force", state=lambda w: w.state), "ok",
                  lambda w, r: None if current(w) == "0002" and (w.state / "versions" / "0001").is_dir()
                  else f"current {current(w)}", True))
    C.append(Case("init tiny", init(), "ok",
                  lambda w, r: None if (w.tmp / "fresh" / "current").read_text().strip() == "0001" else "no version"))

    # ---- export
    for opt, v in [("--rtol", "0"), ("--rtol", "-1"), ("--rtol", "nan")]:
        bad(f"export {opt} {v}", lambda w, opt=opt, v=v: ["export", "--state", w.state, "--no-engine", opt, v])
    bad("export --images FIFO", lambda w: ["export", "--state", w.state, "--no-engine", "--images", fifo(w.tmp / "x.jpg")])
    bad("export --images missing", lambda w: ["export", "--state", w.state, "--no-engine", "--images", w.tmp / "x.png"])
    bad("export --engine without TensorRT", lambda w: ["export", "--state", w.state, "--engine"])
    C.append(Case("export", lambda w: ["export", "--state", w.state, "--no-engine", "--images", w.world.image], "ok",
                  lambda w, r: None if (w.state / "versions" / "0001" / "model.onnx").is_file() else "no model.onnx",
                  True))

    # ---- classify
    cl = lambda *a: lambda w: ["classify", *[x(w) if callable(x) else x for x in a]]  # noqa: E731
    st_ = lambda w: w.state  # noqa: E731
    img = lambda w: w.world.image  # noqa: E731
    bad("classify a FIFO named x.jpg", cl(lambda w: fifo(w.tmp / "x.jpg"), "--state", st_))
    bad("classify a directory", cl(lambda w: w.tmp, "--state", st_))
    bad("classify a symlink loop", cl(lambda w: loop(w.tmp / "l.jpg"), "--state", st_))
    bad("classify a text file named .png", cl(lambda w: put(w.tmp / "t.png", "x"), "--state", st_))
    bad("classify a missing image", cl(lambda w: w.tmp / "none.png", "--state", st_))
    bad("classify --top-k 0", cl(img, "--state", st_, "--top-k", "0"))
    bad("classify --top-k -1", cl(img, "--state", st_, "--top-k", "-1"))
    bad("classify --threads -1", cl(img, "--state", st_, "--threads", "-1"))
    bad("classify --backend nope", cl(img, "--state", st_, "--backend", "nope"))
    bad("classify --backend tensorrt without TensorRT", cl(img, "--state", st_, "--backend", "tensorrt"))
    bad("classify --model FIFO", cl(img, "--model", lambda w: fifo(w.tmp / "m.onnx")))
    bad("classify --model garbage", cl(img, "--model", lambda w: put(w.tmp / "m.onnx", b"\x08garbage")))
    bad("classify with model.onnx a FIFO", cl(img, "--state", lambda w: fifo(w.state / "versions" / "0001" /
                                                                              "model.onnx").parents[2]))
    C.append(Case("classify --top-k 100 (more than classes)", cl(img, "--state", st_, "--top-k", "100"), "ok",
                  lambda w, r: None if r.out.count("\n") == 4 else f"printed {r.out!r}"))

    # ---- history, rollback, prune, eval, explain
    bad("history of a missing state", lambda w: ["history", "--state", w.tmp / "nope"])
    C.append(Case("history", lambda w: ["history", "--state", w.state], "ok",
                  lambda w, r: None if "0001" in r.out else r.out))
    bad("rollback --to abc", lambda w: ["rollback", "--state", w.state, "--to", "abc"])
    bad("rollback --to 99", lambda w: ["rollback", "--state", w.state, "--to", "99"])
    bad("rollback with no earlier version", lambda w: ["rollback", "--state", w.state])
    for v in ("0", "-1", "x"):
        bad(f"prune --keep {v}", lambda w, v=v: ["prune", "--state", w.state, "--keep", v])
    bad("eval --data missing", lambda w: ["eval", "--state", w.state, "--data", w.tmp / "nope"])
    bad("eval --split bogus", lambda w: ["eval", "--state", w.state, "--data", w.world.dataset, "--split", "bogus"])
    C.append(Case("eval with unknown classes", lambda w: ["eval", "--state", w.state, "--data", "cifar100"], "ok",
                  warned("not known to the model")))
    bad("explain a FIFO", lambda w: ["explain", fifo(w.tmp / "x.jpg"), "--state", w.state, "--teacher-version", "1"])
    bad("explain --teacher-version 99", lambda w: ["explain", w.world.image, "--state", w.state, "--teacher-version", "99"])

    # ---- profile, capture, demo, bench (their invalid values: valid runs take minutes)
    for opt, v in [("--images", "1"), ("--new-classes", "0"), ("--old-classes", "0"), ("--max-measured", "0"),
                   ("--epochs", "0"), ("--input-size", "0")]:
        bad(f"profile {opt} {v}", lambda w, opt=opt, v=v: ["profile", "--budget", "2GiB", "--out", w.tmp / "p", opt, v])
    bad("profile --budget junk", lambda w: ["profile", "--budget", "lots", "--out", w.tmp / "p"])
    cap = ["capture", "--label", "x", "--count", "2"]
    for opt, v in [("--count", "0"), ("--interval", "-1"), ("--quality", "0"), ("--quality", "101"), ("--width", "0"),
                   ("--label", "../x"), ("--label", ".hidden")]:
        bad(f"capture {opt} {v}", lambda w, opt=opt, v=v: [*cap, "--inbox", w.tmp / "in", opt, v])
    bad("capture from a missing camera file", lambda w: [*cap, "--inbox", w.tmp / "in", "--camera", w.tmp / "no.mp4"])
    for opt, v in [("--base", "0"), ("--steps", "-1"), ("--per-class", "1"), ("--methods", "nope"),
                   ("--order-seed", "-1"), ("--epochs", "0")]:
        bad(f"demo {opt} {v}", lambda w, opt=opt, v=v: ["demo", "--out", w.tmp / "d", opt, v])
    ba = ["bench", "accuracy"]
    for opt, v in [("--base", "0"), ("--steps", "-1"), ("--classes", "0"), ("--per-class", "1"), ("--val-fraction", "0"),
                   ("--val-fraction", "1"), ("--order-seed", "x"), ("--methods", "nope"), ("--lr", "-1")]:
        bad(f"bench accuracy {opt} {v}", lambda w, opt=opt, v=v: [*ba, "--out", w.tmp / "b", opt, v])
    bad("bench accuracy --settings FIFO", lambda w: [*ba, "--out", w.tmp / "b", "--settings", fifo(w.tmp / "s.json")])
    bad("bench accuracy --settings not JSON", lambda w: [*ba, "--out", w.tmp / "b", "--settings",
                                                         put(w.tmp / "s.json", "{")])
    bad("bench accuracy --settings with lr -1",
        lambda w: [*ba, "--out", w.tmp / "b", "--settings",
                   put(w.tmp / "s.json", json.dumps({"chosen": {"lwm": {"lr": -1}}}))])
    for opt, v in [("--repeats", "0"), ("--warmup", "-1"), ("--old-classes", "0"), ("--new-classes", "0"),
                   ("--per-class", "1"), ("--batch-size", "0")]:
        bad(f"bench cost {opt} {v}", lambda w, opt=opt, v=v: ["bench", "cost", "--out", w.tmp / "c", opt, v])

    # ---- watch, started with bad options or places
    wa = lambda w, *a: ["watch", w.tmp / "inbox", "--state", w.state, "--once", *a]  # noqa: E731
    for opt, v in [("--poll", "0"), ("--quiet-seconds", "-1"), ("--settle-seconds", "-1"), ("--val-fraction", "1"),
                   ("--epochs", "0"), ("--device", "cuda"), ("--unit-scope", "galaxy")]:
        bad(f"watch {opt} {v}", lambda w, opt=opt, v=v: wa(w, opt, v))
    bad("watch INBOX is a file", lambda w: ["watch", put(w.tmp / "f", "x"), "--state", w.state])
    bad("watch on a missing state", lambda w: ["watch", w.tmp / "inbox", "--state", w.tmp / "nope", "--once"])
    bad("watch --keep-images inside the state", lambda w: wa(w, "--keep-images", w.state / "kept"))
    bad("watch INBOX inside the state", lambda w: ["watch", w.state / "inbox", "--state", w.state, "--once"])
    return C


# ---------------------------------------------------------------------------- the daemon

RUNNING: list["Daemon"] = []   # every daemon started; killed after each case whatever happened


@dataclass
class Daemon:
    """`fieldlearn watch` running in a child, its status file read as it goes."""
    w: Work
    spawn: bool
    settle: float = 0.0
    proc: object = None
    log: Path = None

    def start(self, *extra: str) -> "Daemon":
        RUNNING.append(self)
        self.log = self.w.tmp / "daemon.log"
        argv = [sys.executable, "-m", "fieldlearn.cli", "watch", str(self.w.tmp / "inbox"), "--state",
                str(self.w.state), "--poll", "0.2", "--settle-seconds", str(self.settle), "--epochs", "1",
                *FAST, *extra]
        self.proc = subprocess.Popen(argv, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, cwd=ROOT)
        self.wait(lambda s: s.get("pid") == self.proc.pid, "start")
        return self

    def status(self) -> dict:
        try:
            return json.loads((self.w.state / "watch-status.json").read_text())
        except (OSError, ValueError):
            return {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, pred, what: str, seconds: float = 240) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            s = self.status()
            if pred(s):
                return s
            if not self.alive():
                raise AssertionError(f"daemon died waiting for {what}: {self.log.read_text()[-800:]}")
            time.sleep(0.2)
        raise TimeoutError(f"daemon never reached {what}: {self.log.read_text()[-800:]}")

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return -9
        return self.proc.returncode


def daemon_cases(spawn: bool) -> list[tuple[str, Callable[[Work], str | None]]]:
    """(name, run(work) -> problem or None). Each ends with the daemon still running, no good
    class rejected, and no traceback in its log."""
    out = []

    def inbox_class(w: Work, n: int = 8, done: bool = True) -> str:
        ids = w.world.classes()
        w.world.write(w.tmp / "inbox", w.world.data, ids, n)
        name = w.world.names[ids[0]]
        if done:
            (w.tmp / "inbox" / name / ".done").touch()
        return name

    def classes(w: Work) -> list[str]:
        return w.meta()["classes"]

    def case(fn):
        out.append((fn.__doc__.strip().splitlines()[0], fn))
        return fn

    @case
    def unreadable_first(w):
        """watch: an unreadable image sorting first, next to a good class"""
        (w.tmp / "inbox").mkdir()
        d = Daemon(w, spawn)
        a = inbox_class(w, done=False)
        (w.tmp / "inbox" / a / "0000-broken.jpg").write_bytes(b"\xff\xd8 broken")
        b = inbox_class(w, done=False)
        for n in (a, b):
            (w.tmp / "inbox" / n / ".done").touch()
        d.start()
        s = d.wait(lambda s: s.get("current_version") == "0002" and s.get("state") == "idle", "learning both")
        rej = w.tmp / "inbox" / ".rejected"
        names = sorted(p.name for p in rej.iterdir()) if rej.is_dir() else []
        alive = d.alive()
        d.stop()
        if not alive or classes(w)[-2:] != sorted([a, b]) or names != [f"{a}.unread-0002"]:
            return f"alive {alive}, classes {classes(w)[-2:]}, set aside {names}, status {s.get('last_event')}"

    @case
    def few_images(w):
        """watch: a class with 2 images and .done waits, is not learned or rejected"""
        (w.tmp / "inbox").mkdir()
        a = inbox_class(w, n=2)
        d = Daemon(w, spawn).start()
        s = d.wait(lambda s: a in (s.get("waiting_why") or {}), "saying why it waits")
        time.sleep(1)
        alive, rejected = d.alive(), (w.tmp / "inbox" / ".rejected").exists()
        d.stop()
        if not alive or rejected or current(w) != "0001" or "at least 5" not in s["waiting_why"][a]:
            return f"alive {alive}, rejected {rejected}, current {current(w)}, why {s.get('waiting_why')}"

    @case
    def inbox_deleted(w):
        """watch: the inbox deleted while running, then back with a class"""
        (w.tmp / "inbox").mkdir()
        d = Daemon(w, spawn).start()
        shutil.rmtree(w.tmp / "inbox")
        s = d.wait(lambda s: s.get("state") == "error", "an error status")
        a = inbox_class(w)
        d.wait(lambda s: s.get("current_version") == "0002" and s.get("state") == "idle", "learning after")
        alive = d.alive()
        rc = d.stop()
        log = d.log.read_text()
        final = d.status().get("state")
        if not alive or "Traceback" in log or "watch error:" not in log or final != "stopped" or rc != 0 or \
                classes(w)[-1] != a:
            return f"alive {alive}, rc {rc}, final status {final}, error {s.get('error')}"

    @case
    def killed_thrice(w):
        """watch: SIGKILLed mid-increment 3 times, then left to finish"""
        (w.tmp / "inbox").mkdir()
        a = inbox_class(w, n=10)
        for _ in range(3):
            d = Daemon(w, spawn)
            d.start("--epochs", "3000")          # long enough to be killed while learning
            d.wait(lambda s: (s.get("last_event") or "").startswith("learning"), "learning")
            time.sleep(0.5)
            d.proc.kill()
            d.proc.wait()
        d = Daemon(w, spawn).start()
        d.wait(lambda s: s.get("current_version") == "0002" and s.get("state") == "idle", "learning at last")
        d.stop()
        left = sorted(p.name for p in (w.tmp / "inbox").iterdir())
        if classes(w)[-1] != a or left:
            return f"classes {classes(w)[-1:]}, inbox {left}"

    @case
    def junk_in_inbox(w):
        """watch: a hidden folder, a file and a FIFO at the inbox root, a FIFO in a class"""
        (w.tmp / "inbox").mkdir()
        w.world.write(w.tmp / "inbox" / ".cache", w.world.data, w.world.classes(), 6)
        (w.tmp / "inbox" / "notes.txt").write_text("x")
        fifo(w.tmp / "inbox" / "pipe")
        a = inbox_class(w, done=False)
        fifo(w.tmp / "inbox" / a / "camera.jpg")
        (w.tmp / "inbox" / a / ".done").touch()
        d = Daemon(w, spawn).start()
        d.wait(lambda s: s.get("current_version") == "0002" and s.get("state") == "idle", "learning")
        alive = d.alive()
        d.stop()
        log = d.log.read_text()
        said = all(x in log for x in (".cache", "notes.txt", "pipe", "camera.jpg"))
        if not alive or not said or classes(w)[-1] != a:
            return f"alive {alive}, reported all {said}, classes {classes(w)[-1:]}"

    @case
    def settle(w):
        """watch: .done written before the copy ends (settle 3 s)"""
        (w.tmp / "inbox").mkdir()
        d = Daemon(w, spawn, settle=3.0).start()
        ids = w.world.classes()
        name = w.world.names[ids[0]]
        folder = w.tmp / "inbox" / name
        folder.mkdir()
        (folder / ".done").touch()                      # marked complete too early
        src = w.tmp / "src"
        w.world.write(src, w.world.data, ids, 12)
        for p in sorted((src / name).iterdir()):        # the copy goes on for ~2 s
            shutil.copy(p, folder / p.name)
            time.sleep(0.15)
        d.wait(lambda s: s.get("current_version") == "0002" and s.get("state") == "idle", "learning")
        d.stop()
        h = w.meta()["history"][-1]
        n = h.get("n_images", 0) + h.get("n_val_images", 0)
        if n != 12:
            return f"learned {n} of 12 images"

    @case
    def read_only_inbox(w):
        """watch: a read-only inbox is one line at start"""
        (w.tmp / "inbox").mkdir()
        inbox_class(w)
        ib = w.tmp / "inbox"
        if subprocess.run(["mount", "--bind", str(ib), str(ib)], capture_output=True).returncode or \
                subprocess.run(["mount", "-o", "remount,bind,ro", str(ib)], capture_output=True).returncode:
            subprocess.run(["umount", str(ib)], capture_output=True)
            return "SKIP: cannot mount read-only here"
        try:
            r = run_child(["watch", ib, "--state", w.state, "--settle-seconds", "0"], spawn, timeout=120)
        finally:
            subprocess.run(["umount", str(ib)], capture_output=True)
        lines = r.err.strip().splitlines()
        if r.rc != 2 or len(lines) != 1 or "not writable" not in lines[0] or current(w) != "0001":
            return f"rc {r.rc}, stderr {lines}"

    return out


# ---------------------------------------------------------------------------- verdicts

def verdict(case: Case, w: Work, r: Result, before: str) -> tuple[str, str]:
    if r.rc is None:
        return "hang", f"no answer in {TIMEOUT} s"
    if "Traceback (most recent call last)" in r.err or r.rc not in (0, 2):
        return "traceback", (r.err.strip().splitlines() or [f"exit {r.rc}"])[-1][:200]
    errors = [line for line in r.err.splitlines() if ": error: " in line]
    if case.expect == "error":
        if r.rc == 0:
            return "silent wrong", "accepted: " + (r.out.strip().splitlines() or [""])[-1][:160]
        if len(errors) != 1 or tree_hash(w.state) != before:
            return "messy error", f"{len(errors)} error lines; state {'changed' if tree_hash(w.state) != before else 'same'}"
        problem = case.check(w, r) if case.check else None
        return ("silent wrong", problem) if problem else ("clean error", errors[0][:200])
    if r.rc == 2:
        return "wrong refusal", errors[0][:200] if errors else r.err[-200:]
    if not case.changes_state and tree_hash(w.state) != before:
        return "silent wrong", "the state changed"
    problem = case.check(w, r) if case.check else None
    return ("silent wrong", problem) if problem else ("accepted", (r.err.strip().splitlines() or [""])[-1][:160])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="run only the cases whose name contains this")
    p.add_argument("--spawn", action="store_true", help="a fresh interpreter per case instead of a fork")
    p.add_argument("--no-daemon", action="store_true", help="skip the daemon cases")
    p.add_argument("--properties", type=int, default=0, metavar="N",
                   help="also run the property-based CLI tests with N examples each")
    p.add_argument("--json", type=Path, default=None, help="write every verdict here")
    args = p.parse_args()

    if not args.spawn:     # what the forked children need, imported once
        import fieldlearn.cli.main  # noqa: F401
        import fieldlearn.field.increment  # noqa: F401
        import fieldlearn.cli.commands.watch  # noqa: F401
        import fieldlearn.runtime.classify  # noqa: F401
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fieldlearn-hostile-") as tmp:
        world = World(Path(tmp) / "world", args.spawn)
        cases = [c for c in cli_cases() if not args.only or args.only in c.name]
        for i, case in enumerate(cases):
            work = Path(tmp) / f"case{i:03d}"
            work.mkdir()
            w = Work(world, work, work / "state")
            shutil.copytree(world.state, w.state, symlinks=True)
            try:
                argv = case.argv(w)
            except Exception as e:   # noqa: BLE001 - a broken case is reported, not hidden
                rows.append({"case": case.name, "verdict": "case error", "detail": repr(e)})
                continue
            before = tree_hash(w.state)
            r = run_child(argv, args.spawn)
            v, detail = verdict(case, w, r, before)
            rows.append({"case": case.name, "verdict": v, "detail": detail, "seconds": round(r.seconds, 1)})
            print(f"{v:>13}  {case.name}  ({r.seconds:.1f} s)  {detail}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
        if not args.no_daemon:
            for i, (name, fn) in enumerate(daemon_cases(args.spawn)):
                if args.only and args.only not in name:
                    continue
                work = Path(tmp) / f"daemon{i:02d}"
                work.mkdir()
                w = Work(world, work, work / "state")
                shutil.copytree(world.state, w.state, symlinks=True)
                t = time.perf_counter()
                try:
                    problem = fn(w)
                except (AssertionError, TimeoutError) as e:
                    problem = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                finally:
                    for d in RUNNING:
                        if d.alive():
                            d.proc.kill()
                            d.proc.wait()
                    RUNNING.clear()
                if problem and problem.startswith("SKIP"):
                    v = "skipped"
                else:
                    v = "accepted" if problem is None else ("hang" if "never reached" in problem else
                                                            "traceback" if "Traceback" in problem else "silent wrong")
                rows.append({"case": name, "verdict": v, "detail": problem or "", "seconds": round(time.perf_counter() - t, 1)})
                print(f"{v:>13}  {name}  ({time.perf_counter() - t:.1f} s)  {problem or ''}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print(f"\n{len(rows)} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
          + f" ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "cases": rows}, indent=1) + "\n")
    ok = all(r["verdict"] in GOOD_VERDICTS | {"skipped"} for r in rows)
    if args.properties:
        env = {**os.environ, "FIELDLEARN_PROPERTY_EXAMPLES": str(args.properties)}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/cli/test_cli_properties.py",
                            "--hypothesis-show-statistics"], cwd=ROOT, env=env)
        print(f"property-based CLI tests with {args.properties} examples each: "
              f"{'passed' if r.returncode == 0 else 'FAILED'}")
        ok = ok and r.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
