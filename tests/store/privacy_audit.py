"""The privacy audit: every byte a `fieldlearn` child process writes, searched for training data.

Child side (`child_main`): runs one or more CLI commands in one process with capture hooks
installed (`ByteCapture`, a `sys.addaudithook` hook plus wrappers of os.write / os.pwrite /
os.writev). Whatever would destroy written bytes is intercepted first and the bytes are
copied to the dump folder: a file removed (os.remove / unlink, shutil.rmtree, a
TemporaryDirectory's cleanup), renamed over, truncated, or reopened for writing with
truncation; bytes passed to os.write are dumped as written. Every path opened for writing
is listed, so the test can require that nothing is written outside the run's own folders
(state, HOME, TMPDIR, XDG_CACHE_HOME, FIELDLEARN_CACHE). Files written by native code
(safetensors, ONNX Runtime) and never destroyed through Python are read from disk after
the run; the parent scans both.

With FL_AUDIT_PLANT=1 the child also plants one leak of each kind (`Plants`), the positive
control: each pattern must be found, where it was planted.

Parent side: `patterns` turns images into what would betray them (uint8 CHW and HWC pixel
rows, the normalised float32 model input rows and their float16 copies: exact bytes;
the pooled feature vectors of the frozen top and the trained top, float32 and float16:
within a float tolerance), `scan` searches blobs for them at every byte offset.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ENV_DIRS = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "FIELDLEARN_CACHE")


# ---------------------------------------------------------------------------- child side

class ByteCapture:
    """Copies every byte that is about to be destroyed (or is passed to os.write) to `dump`."""

    def __init__(self, dump: Path):
        self.dump = Path(dump)
        self.dump.mkdir(parents=True, exist_ok=True)
        self.busy = False
        self.n = 0
        self.index: list[dict] = []          # {"file", "how", "path"} per dumped blob
        self.opened: set[str] = set()        # every path opened for writing
        self.writes: dict[str, bytearray] = {}

    @staticmethod
    def _path(path, dir_fd=None) -> str | None:
        if path is None or isinstance(path, int):
            return None
        p = os.fsdecode(os.fspath(path))
        if dir_fd not in (None, -1) and not os.path.isabs(p):
            p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        return os.path.abspath(p)

    def _save(self, how: str, path: str, data: bytes) -> None:
        if not data:
            return
        self.busy = True
        try:
            self.n += 1
            name = f"{self.n:05d}.bin"
            fd = os.open(self.dump / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            self.index.append({"file": name, "how": how, "path": path})
        finally:
            self.busy = False

    def _snapshot(self, how: str, path: str | None) -> None:
        if path is None or path.startswith(str(self.dump)):
            return
        self.busy = True
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                with builtins.open(path, "rb") as f:
                    data = f.read()
            elif os.path.isdir(path) and not os.path.islink(path):
                for d, _, files in os.walk(path):
                    for name in files:
                        self._snapshot(how, os.path.join(d, name))
                return
            else:
                return
        except OSError:
            return
        finally:
            self.busy = False
        self._save(how, path, data)

    def hook(self, event: str, args: tuple) -> None:
        if self.busy:
            return
        if event == "open":
            path, mode, flags = args
            p = self._path(path)
            if p is None or p.startswith(str(self.dump)):
                return
            flags = flags or 0
            writing = (isinstance(mode, str) and any(ch in mode for ch in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR)
            if writing:
                self.opened.add(p)
                if (isinstance(mode, str) and "w" in mode) or flags & os.O_TRUNC:
                    self._snapshot("overwritten", p)
        elif event == "os.remove":
            self._snapshot("deleted", self._path(args[0], args[1]))
        elif event == "os.rename":               # os.rename and os.replace
            self._snapshot("renamed over", self._path(args[1], args[3]))
        elif event == "shutil.rmtree":
            self._snapshot("deleted", self._path(args[0], args[1] if len(args) > 1 else None))
        elif event == "os.truncate":
            target = args[0]
            p = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else self._path(target)
            self._snapshot("truncated", p)

    def _wrap_writes(self) -> None:
        real_write, real_pwrite, real_writev = os.write, os.pwrite, os.writev

        def keep(fd, data):
            if not self.busy:
                try:
                    where = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    where = "?"
                self.writes.setdefault(f"fd {fd} ({where})", bytearray()).extend(bytes(data))

        def write(fd, data):
            keep(fd, data)
            return real_write(fd, data)

        def pwrite(fd, data, offset):
            keep(fd, data)
            return real_pwrite(fd, data, offset)

        def writev(fd, buffers):
            buffers = [bytes(b) for b in buffers]
            for b in buffers:
                keep(fd, b)
            return real_writev(fd, buffers)

        os.write, os.pwrite, os.writev = write, pwrite, writev

    def install(self) -> "ByteCapture":
        sys.addaudithook(self.hook)
        self._wrap_writes()
        return self

    def finish(self) -> None:
        """Dump what went through os.write and the list of paths opened for writing."""
        for where, data in self.writes.items():
            self._save("os.write", where, bytes(data))
        self.writes.clear()
        self.busy = True
        (self.dump / "index.json").write_text(json.dumps({"blobs": self.index, "opened": sorted(self.opened)}))


class Plants:
    """Positive controls: when the product is about to save weights, leak one image in each
    encoding the audit looks for, each in its own place and way. Images are the ones the
    command loaded from the folder it learns (image i of that folder for plant i)."""

    def __init__(self):
        self.images = None

    def install(self) -> None:
        import fieldlearn.field.increment as inc  # noqa: PLC0415
        import fieldlearn.store.state as state  # noqa: PLC0415

        real_load, real_save = inc.load_image_folder, state.save_file

        def load_image_folder(*a, **k):
            data = real_load(*a, **k)
            if self.images is None:
                self.images = data.images
            return data

        def save_file(tensors, filename, *a, **k):
            student = sys._getframe(1).f_locals["student"]   # save_version's student
            cfg = sys._getframe(1).f_locals["config"]
            if self.images is not None:                        # (an init has no learn folder)
                self.plant(student, cfg, tensors)
            return real_save(tensors, filename, *a, **k)

        inc.load_image_folder, state.save_file = load_image_folder, save_file

    def plant(self, student, cfg, tensors) -> None:
        import tempfile  # noqa: PLC0415

        import torch  # noqa: PLC0415

        from fieldlearn.device.data import to_input  # noqa: PLC0415

        imgs = self.images
        x = to_input(imgs[:6], cfg.model.input_size, cfg.model.mean, cfg.model.std)   # [6, 3, S, S]
        was = student.training
        student.eval()
        with torch.no_grad():
            z = student.encode(x)
            f1 = student.top(z).mean((2, 3))                     # trained top, pooled [6, C]
            f0 = student.frozen_top(z).mean((2, 3))              # frozen top, pooled [6, C0]
        student.train(was)
        env = os.environ
        # 0: uint8 HWC, a file left in HOME
        Path(env["HOME"], ".leak-hwc").write_bytes(imgs[0].permute(1, 2, 0).contiguous().numpy().tobytes())
        # 1: uint8 CHW, written in TMPDIR, renamed, then deleted
        a, b = Path(env["TMPDIR"], "leak-a.bin"), Path(env["TMPDIR"], "leak-b.bin")
        a.write_bytes(imgs[1].numpy().tobytes())
        os.rename(a, b)
        os.remove(b)
        # 2: float32 model input, in XDG_CACHE_HOME, then overwritten with something else
        c = Path(env["XDG_CACHE_HOME"], "leak-f32.bin")
        c.write_bytes(x[2].numpy().astype(np.float32).tobytes())
        c.write_bytes(b"nothing to see")
        # 3: float16 model input, a file in FIELDLEARN_CACHE written then deleted
        d = Path(env["FIELDLEARN_CACHE"], "leak-f16.bin")
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(x[3].numpy().astype(np.float16).tobytes())
        os.remove(d)
        # 4: the trained network's pooled float32 feature, stored in model.safetensors (a head
        #    row imprinted from one image)
        w = tensors["head.weight"]
        assert w.shape[1] == f1.shape[1], (w.shape, f1.shape)
        w = w.clone()
        w[0] = f1[4]
        tensors["head.weight"] = w
        # 5: the frozen top's pooled float16 feature, os.write into a temporary directory
        #    that is then removed
        with tempfile.TemporaryDirectory() as t:
            fd = os.open(os.path.join(t, "leak"), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, f0[5].numpy().astype(np.float16).tobytes())
            os.close(fd)


def child_main() -> None:
    """`python -c '...child_main()' DUMP COMMANDS_JSON`: run each argv of COMMANDS_JSON with
    fieldlearn's CLI main in this process, under the capture; stop at the first failure."""
    dump, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
    cap = ByteCapture(dump).install()
    if os.environ.get("FL_AUDIT_PLANT") == "1":
        Plants().install()
    from fieldlearn.cli.main import main  # noqa: PLC0415

    rc = 0
    try:
        for argv in commands:
            rc = main(argv)
            if rc:
                break
    finally:
        cap.finish()
    sys.exit(rc)


CHILD = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.store.privacy_audit import child_main; child_main()"


def run_child(work: Path, commands: list[list[str]], plant: bool = False, timeout: int = 600):
    """Run `commands` in one child with HOME, TMPDIR, XDG_CACHE_HOME and FIELDLEARN_CACHE under
    `work`. Returns (CompletedProcess, places {env var: dir}, dump dir)."""
    import subprocess  # noqa: PLC0415

    places = {k: work / k.lower() for k in ENV_DIRS}
    for p in places.values():
        p.mkdir(parents=True, exist_ok=True)
    dump = work / "dump"
    env = {**os.environ, **{k: str(v) for k, v in places.items()}, "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "FL_AUDIT_PLANT": "1" if plant else "0"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(dump), json.dumps([[str(a) for a in c] for c in commands])],
                       cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    return r, places, dump


def captured(dump: Path) -> tuple[list[tuple[str, bytes]], list[str]]:
    """([(label, bytes)] of every dumped blob, [paths opened for writing])."""
    index = json.loads((dump / "index.json").read_text())
    blobs = [(f"{b['how']}: {b['path']}", (dump / b["file"]).read_bytes()) for b in index["blobs"]]
    return blobs, index["opened"]


def on_disk(roots) -> list[tuple[str, bytes]]:
    out = []
    for root in roots:
        for d, _, files in os.walk(root):
            for name in files:
                p = os.path.join(d, name)
                if os.path.isfile(p) and not os.path.islink(p):
                    out.append((f"on disk: {p}", Path(p).read_bytes()))
    return out


# ---------------------------------------------------------------------------- patterns

@dataclass
class Pattern:
    name: str
    needles: list            # bytes (exact) or float32 arrays (tolerance)
    owner: list[int]         # image index of each needle
    kind: str = "exact"      # "exact", "f32" or "f16"


def pixel_patterns(images, cfg) -> list[Pattern]:
    """uint8 CHW rows, uint8 HWC rows, float32 and float16 normalised-input rows of each image."""
    from fieldlearn.device.data import to_input  # noqa: PLC0415

    chw = images.numpy()                                        # [N, 3, S, S] uint8
    hwc = np.ascontiguousarray(chw.transpose(0, 2, 3, 1))       # [N, S, S, 3]
    x = to_input(images, cfg.model.input_size, cfg.model.mean, cfg.model.std).numpy()   # [N, 3, S', S'] float32
    pats = {"uint8 CHW row": [], "uint8 HWC row": [], "float32 input row": [], "float16 input row": []}
    owners = {k: [] for k in pats}

    def add(name, i, b):
        if len(set(b)) > 4:                                    # not a constant (padding-like) row
            pats[name].append(b)
            owners[name].append(i)

    for i in range(len(chw)):
        for r in range(chw.shape[2]):
            add("uint8 HWC row", i, hwc[i, r].tobytes())        # 3 S bytes
            for c in range(3):
                add("uint8 CHW row", i, chw[i, c, r].tobytes())  # S bytes
        for c in range(3):
            for r in range(x.shape[2]):
                add("float32 input row", i, x[i, c, r].astype(np.float32).tobytes())
                add("float16 input row", i, x[i, c, r].astype(np.float16).tobytes())
    return [Pattern(k, pats[k], owners[k]) for k in pats]


def feature_patterns(student, images, cfg, label: str) -> list[Pattern]:
    """The pooled features of each image (frozen top and trained top) under `student`,
    float32 and float16, to be found within a float tolerance."""
    import torch  # noqa: PLC0415

    from fieldlearn.device.data import to_input  # noqa: PLC0415

    x = to_input(images, cfg.model.input_size, cfg.model.mean, cfg.model.std)
    student = student.eval()
    with torch.no_grad():
        z = student.encode(x)
        feats = {"trained top": student.top(z).mean((2, 3)), "frozen top": student.frozen_top(z).mean((2, 3))}
    out = []
    for which, f in feats.items():
        v = f.numpy().astype(np.float32)
        # (a vector of a few non-zeros, or one float16 cannot hold, would match by chance or never)
        keep = [i for i in range(len(v)) if np.count_nonzero(v[i]) >= 8 and np.abs(v[i]).max() > 1e-3]
        for kind in ("f32", "f16"):
            out.append(Pattern(f"pooled feature {which} {label} {kind}", [v[i] for i in keep], keep, kind))
    return out


# ---------------------------------------------------------------------------- search

def _exact(blob: bytes, needles: list[bytes]) -> list[tuple[int, int]]:
    """(needle index, offset) of every needle found in blob, at any offset. Each needle's key
    (8 of its bytes) is looked up at all 8 alignments of the blob read as uint64."""
    if not needles or len(blob) < 8:
        return []
    # each needle's key: its 8-byte window with the most distinct bytes (a key of zeros would
    # stop at every zero run of a weights file)
    key_at = [max(sorted({0, 8, len(n) // 2 - 4, len(n) - 8}), key=lambda o, n=n: len(set(n[o:o + 8])))
              for n in needles]
    keys = np.frombuffer(b"".join(n[o:o + 8] for n, o in zip(needles, key_at)), dtype="<u8")
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    mask = (1 << 20) - 1
    table = np.zeros(1 << 20, dtype=bool)                     # a first, cheap filter on 20 bits of the key (1 MB: stays in cache)
    table[sk & mask] = True
    found = []
    for a in range(8):
        m = (len(blob) - a) // 8
        if m <= 0:
            continue
        arr = np.frombuffer(blob, dtype="<u8", count=m, offset=a)
        cand = np.flatnonzero(table[arr & mask])
        if not len(cand):
            continue
        vals = arr[cand]
        lo = np.searchsorted(sk, vals, "left")
        hi = np.searchsorted(sk, vals, "right")
        keep = hi > lo                                         # the whole key matches
        for c, l, h in zip(cand[keep].tolist(), lo[keep].tolist(), hi[keep].tolist()):
            for j in order[l:h].tolist():
                off = a + 8 * c - key_at[j]
                if off >= 0 and blob.startswith(needles[j], off):
                    found.append((j, off))
    return found


def _close(blob: bytes, V: np.ndarray, kind: str) -> list[tuple[int, int]]:
    """(row of V, offset) where blob holds that row to float tolerance: float32 at rtol 1e-4,
    float16 (the float16 rounding of the row) at rtol 4e-3; atol 1e-3 of the row's largest
    magnitude. V [K, L] float32. Candidates are offsets holding a row's largest element, then
    its second largest; then the whole row is compared."""
    if not len(V):
        return []
    dt, size, rtol = (np.float32, 4, 1e-4) if kind == "f32" else (np.float16, 2, 4e-3)
    V = V.astype(dt).astype(np.float32)                        # [K, L]
    K, L = V.shape
    mag = np.abs(V)
    j1 = np.argmax(mag, 1)
    atol = 1e-3 * mag[np.arange(K), j1]
    mag[np.arange(K), j1] = -1
    j2 = np.argmax(mag, 1)
    a1 = V[np.arange(K), j1]
    order = np.argsort(a1)
    s1 = a1[order]
    tol1 = rtol * np.abs(s1) + 1e-6
    found = set()
    for a in range(size):
        m = (len(blob) - a) // size
        if m < L:
            continue
        A = np.frombuffer(blob, dtype=dt, count=m, offset=a).astype(np.float32)   # (numpy's float16 math is slow)
        i = np.flatnonzero((A >= s1[0] - tol1[0]) & (A <= s1[-1] + tol1[-1]))   # NaN never in range
        if not len(i):
            continue
        Ai = A[i]
        pos = np.searchsorted(s1, Ai)
        for off in (-1, 0):
            kk = np.clip(pos + off, 0, K - 1)
            hit = np.abs(Ai - s1[kk]) <= tol1[kk]
            ii, k = i[hit], order[kk[hit]]
            start = ii - j1[k]
            ok = (start >= 0) & (start + L <= m)
            start, k = start[ok], k[ok]
            if not len(k):
                continue
            second = A[start + j2[k]]
            want = V[k, j2[k]]
            with np.errstate(invalid="ignore", over="ignore"):      # inf / NaN in the blob: no match
                ok = np.abs(second - want) <= rtol * np.abs(want) + atol[k]
            for s, kv in zip(start[ok].tolist(), k[ok].tolist()):
                if np.allclose(A[s:s + L], V[kv], rtol=rtol, atol=atol[kv]):
                    found.add((kv, a + size * s))
    return sorted(found)


def scan(blobs: list[tuple[str, bytes]], patterns: list[Pattern]) -> list[tuple[str, int, str]]:
    """[(pattern name, image index, where)] for every pattern found in any blob. Identical
    blobs are searched once; all exact needles in one pass, float vectors in one pass per
    kind and length."""
    import hashlib  # noqa: PLC0415

    seen: dict[str, list[str]] = {}
    unique = []
    for label, data in blobs:
        h = hashlib.sha256(data).hexdigest()
        if h not in seen:
            seen[h] = []
            unique.append((h, data))
        seen[h].append(label)
    groups: dict[tuple, list[tuple[int, int]]] = {}          # (kind, length) -> [(pattern, needle)]
    for pi, p in enumerate(patterns):
        for j, n in enumerate(p.needles):
            groups.setdefault((p.kind, len(n) if p.kind == "exact" else n.shape[0]), []).append((pi, j))
    out = set()
    for (kind, _), members in groups.items():
        distinct: dict[bytes, list[tuple[int, int]]] = {}       # one search per distinct needle
        for pi, j in members:
            n = patterns[pi].needles[j]
            distinct.setdefault(n if kind == "exact" else np.asarray(n, np.float32).tobytes(), []).append((pi, j))
        keys = list(distinct)
        needles = keys if kind == "exact" else np.stack([np.frombuffer(k, np.float32) for k in keys])
        for h, data in unique:
            hits = _exact(data, needles) if kind == "exact" else _close(data, needles, kind)
            for k, _ in hits:
                for pi, j in distinct[keys[k]]:
                    for label in seen[h]:
                        out.add((patterns[pi].name, patterns[pi].owner[j], label))
    return sorted(out)
