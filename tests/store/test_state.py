"""The state: atomic and durable versions (fsync before every publishing rename), class
order kept end to end, and the promise that no training data is ever stored.

The privacy audit (tests/store/privacy_audit.py) runs real `fieldlearn init`, `learn` and
`export` in a child process whose HOME, TMPDIR, XDG_CACHE_HOME and FIELDLEARN_CACHE are
inside the test's folder, captures every byte the child destroys (deleted, renamed over,
truncated, rewritten) or passes to os.write, and searches those bytes and everything left
on disk for each training image: uint8 CHW and HWC pixel rows, normalised float32 input
rows and their float16 copies, and the pooled features of the frozen and the trained top
under every saved version (float32 and float16, to float tolerance). A twin test plants one
leak of each kind, each in another place and way, and requires the audit to find each.
"""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fieldlearn.device.data import load_image_folder, to_input
from fieldlearn.device.model import build_student
from fieldlearn.store.state import load_state, load_version, save_version
from tests.conftest import tiny_config, write_image_folder
from tests.store.privacy_audit import (captured, feature_patterns, on_disk, pixel_patterns, run_child,
                                        scan)


def _versions(state):
    return {vd.name: load_version(vd) for vd in sorted((state / "versions").iterdir())}


def _patterns(state, images, versions=None):
    """Every pattern of `images`: pixels, and pooled features under each saved version."""
    pats = pixel_patterns(images, load_state(state).config)
    for name, v in (versions or _versions(state)).items():
        pats += feature_patterns(v.student, images, v.config, name)
    return pats


@pytest.mark.slow
def test_no_training_pixels_or_features_are_ever_written(tmp_path, gen_test):
    """If this fails, fieldlearn init / learn / export keeps a training image (its pixels,
    its model input or one of its pooled features) somewhere it writes: the state, a cache
    under FIELDLEARN_CACHE, XDG_CACHE_HOME or HOME, a temp file, even one deleted later;
    or it writes outside those places at all."""
    base = write_image_folder(tmp_path / "base", gen_test, [0, 1, 2], 12)
    new = write_image_folder(tmp_path / "new", gen_test, [3, 4], 12)
    work = tmp_path / "run"
    state = work / "state"
    fast = ["--no-progress", "--batch-size", "8", "--num-threads", "1"]
    # The shipped kind of model (pretrained trunk, frozen, features cached in memory per
    # step); an increment that trains the top (LwM) against an ONNX Runtime teacher, whose
    # model is written to TMPDIR and deleted; a re-export (files renamed over the exported ones).
    r, places, dump = run_child(work, [
        ["init", "--data", base, "--state", state, "--base-epochs", "2", "--variant", "cifar", "--input-size", "32",
         "--freeze-blocks", "14", *fast],
        ["learn", new, "--state", state, "--epochs", "1", "--method", "lwm", "--teacher-backend", "onnxruntime", *fast],
        ["export", "--state", state, "--no-engine"]])
    assert r.returncode == 0, r.stderr[-2000:]
    blobs, opened = captured(dump)
    roots = [state, *places.values()]
    outside = [p for p in opened if not any(p.startswith(str(x) + os.sep) for x in roots) and p != os.devnull]
    assert outside == [], f"written outside the state and the run's HOME, TMPDIR and caches: {outside}"
    assert any(label.startswith("deleted: ") and "fieldlearn-teacher-" in label for label, _ in blobs), \
        "the ONNX teacher's deleted temp files were not captured: the capture sees less than it should"
    assert any(label.startswith("renamed over: ") for label, _ in blobs), "the re-export's renames were not captured"
    left = on_disk(roots)
    names = {os.path.basename(label) for label, _ in left}
    # ".ses" is onnxruntime's session-id file in TMPDIR (a UUID), "deviceid" and "onnxruntime.db"
    # its device id and usage database under XDG_CACHE_HOME/Microsoft; their bytes are scanned like the rest.
    assert names <= {"current", "model.safetensors", "meta.json", "model.onnx", "labels.txt", ".ses", "deviceid",
                     "onnxruntime.db"}, names

    imgs = torch.cat([load_image_folder(base, 32).images, load_image_folder(new, 32).images])
    versions = _versions(state)
    pats = _patterns(state, imgs, versions)
    assert {p.name.split(" 000")[0] for p in pats} >= {"uint8 CHW row", "uint8 HWC row", "float32 input row",
                                                       "float16 input row", "pooled feature trained top",
                                                       "pooled feature frozen top"}
    assert all(len(p.needles) >= len(imgs) for p in pats), [(p.name, len(p.needles)) for p in pats]
    found = scan(blobs + left, pats)
    assert found == [], f"training data written: {found[:10]}"
    # The class statistics are model state only as aggregates: no stored vector may be one
    # training image's classifier feature (or a multiple of it), to float tolerance.
    leaks = []
    for name, v in versions.items():
        vd = state / "versions" / name
        phis = _image_features(v, imgs)
        assert phis.shape == (len(imgs), v.student.stats.dim)
        stored = load_file(str(vd / "model.safetensors"))
        assert "stats.sums" in stored and "stats.gram" in stored, "the statistics are saved with the weights"
        leaks += [f"{vd.name}/{name}: {n} row(s)" for name, t in stored.items() if (n := _rows_matching(t, phis))]
    assert leaks == [], f"stored statistics hold a single image's feature: {leaks}"


def _warmed_student(cfg, images):
    """A random-init tiny net whose BatchNorm statistics are those of `images` (at init they
    are not, and its pooled features are ~1e-8: too small for float16, so a float16 leak of
    them would be zeros)."""
    s = build_student(cfg.model, 2)
    bns = [m for m in s.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        z = s.trunk(to_input(images, cfg.model.input_size, cfg.model.mean, cfg.model.std))
        s.top(z)
        s.frozen_top(z)
    return s.eval()


# Where each planted leak (tests/store/privacy_audit.py, Plants) must be found: pattern,
# image, and the start of the place's label (relative to the run folder).
PLANTED = [
    ("uint8 HWC row", 0, "on disk: {home}/.leak-hwc"),
    ("uint8 CHW row", 1, "deleted: {tmpdir}/leak-b.bin"),
    ("float32 input row", 2, "overwritten: {xdg_cache_home}/leak-f32.bin"),
    ("float16 input row", 3, "deleted: {fieldlearn_cache}/leak-f16.bin"),
    ("pooled feature trained top 0002 f32", 4, "on disk: {state}/versions/0002/model.safetensors"),
    ("pooled feature frozen top 0002 f16", 5, "deleted: {tmpdir}/tmp"),
    ("pooled feature frozen top 0002 f16", 5, "os.write: fd"),
]


@pytest.mark.slow
def test_the_privacy_audit_finds_each_kind_of_leak_where_it_was_planted(tmp_path, gen_test):
    """If this fails, the audit above proves nothing for some encoding or place: a planted
    HWC copy in HOME, a CHW copy renamed then deleted in TMPDIR, a float32 input overwritten
    in XDG_CACHE_HOME, a float16 input written then deleted in FIELDLEARN_CACHE, a pooled
    feature in model.safetensors (a head row imprinted from one image), a float16 pooled
    feature os.write-n into a removed temporary directory: each must be found, there, and
    nothing else (the learn itself leaks nothing)."""
    cfg = tiny_config()
    work = tmp_path / "run"
    state = work / "state"
    torch.manual_seed(0)
    known = [gen_test.class_names[c] for c in (0, 1)]
    save_version(state, _warmed_student(cfg, gen_test.images[-64:]), known, cfg, 0, [{"step": 0, "method": "base"}])
    new = write_image_folder(tmp_path / "new", gen_test, [5, 6], 6)
    r, places, dump = run_child(work, [["learn", new, "--state", state, "--epochs", "1", "--no-progress",
                                        "--batch-size", "8", "--num-threads", "1", "--no-export",
                                        "--teacher-backend", "torch"]], plant=True)
    assert r.returncode == 0, r.stderr[-2000:]
    blobs, _ = captured(dump)
    imgs = load_image_folder(new, 32).images
    found = scan(blobs + on_disk([state, *places.values()]), _patterns(state, imgs))
    where = {k.lower(): str(v) for k, v in places.items()} | {"state": str(state)}
    for name, image, place in PLANTED:
        place = place.format(**where)
        assert any(f[0] == name and f[1] == image and f[2].startswith(place) for f in found), \
            (name, image, place, found)
    places_planted = [p.format(**where) for _, _, p in PLANTED]
    stray = [f for f in found if not any(f[2].startswith(p) for p in places_planted)]
    assert stray == [], f"found where nothing was planted: {stray}"


def test_the_scan_finds_every_pattern_at_any_offset_and_not_a_near_miss(gen_test):
    """If this fails, the byte search behind the audit misses a leak at some byte offset (an
    alignment it does not try) or in some encoding, or calls a clearly different vector a
    match (then the audit would fail on noise)."""
    cfg = tiny_config()
    images = gen_test.images[:3]
    student = _warmed_student(cfg, gen_test.images[-64:])
    pats = pixel_patterns(images, cfg) + feature_patterns(student, images, cfg, "v")
    assert len(pats) == 8 and all(p.needles for p in pats)
    rng = np.random.default_rng(0)
    for p in pats:
        j = len(p.needles) // 2
        n = p.needles[j]
        n = n if p.kind == "exact" else np.asarray(n, np.float32).astype(np.float32 if p.kind == "f32" else np.float16)
        if p.kind == "f32":
            n = n * np.float32(1 + 3e-6)                      # another summation order, not the same bits
        n = bytes(n) if p.kind == "exact" else n.tobytes()
        for off in range(8):
            blob = rng.integers(0, 256, 100 + off, np.uint8).tobytes() + n + rng.integers(0, 256, 64, np.uint8).tobytes()
            assert (p.name, p.owner[j], "x") in scan([("x", blob)], [p]), (p.name, off)
        if p.kind != "exact":
            dt = np.float32 if p.kind == "f32" else np.float16
            far = (np.asarray(p.needles[j], np.float32) * np.float32(1.05)).astype(dt).tobytes()
            assert scan([("x", b"\0" * 5 + far)], [p]) == [], p.name


def _image_features(st, images):
    """phi [N, D] of each image under a saved model: what a leaked per-image feature would be."""
    x = to_input(images, st.config.model.input_size, st.config.model.mean, st.config.model.std)
    with torch.no_grad():
        return st.student.eval().features(st.student.encode(x)).double()


def _rows_matching(t: torch.Tensor, phis: torch.Tensor, cos: float = 1 - 1e-5) -> int:
    """Rows of t (any tensor whose last dim is D or D + 1) parallel to one of phis' rows."""
    d = phis.shape[1]
    if t.dim() < 1 or t.shape[-1] not in (d, d + 1) or not t.is_floating_point():
        return 0
    rows = torch.nn.functional.normalize(t.reshape(-1, t.shape[-1])[:, :d].double(), dim=1)
    return int(((rows @ torch.nn.functional.normalize(phis, dim=1).T) > cos).any(1).sum())


def test_feature_audit_would_catch_a_stored_image_feature(tmp_path, gen_test):
    """The statistics audit's check really finds a per-image feature (a class 'sum' of one
    image), and passes genuine sums over >= 5 images (else the audit above proves nothing)."""
    cfg = tiny_config()
    cfg.model.classifier, cfg.model.features = "analytic", "concat"
    from fieldlearn.device.data import ImageSet
    from fieldlearn.device.learner import fit_classifier
    from fieldlearn.store.state import LoadedState

    s = build_student(cfg.model, 2).eval()
    images = gen_test.images[:12]
    data = ImageSet(images, torch.tensor([0, 1] * 6), ["a", "b"])
    fit_classifier(s, data, [0, 1], cfg)
    st = LoadedState(student=s, classes=["a", "b"], config=cfg, step=0, version_dir=tmp_path)
    phis = _image_features(st, images)
    assert _rows_matching(s.stats.sums, phis) == 0, "a sum over 6 images is not one image's feature"
    leaked = s.stats.sums.clone()
    leaked[1, :-1] = phis[3] * 7.0
    assert _rows_matching(leaked, phis) == 1


def test_versions_are_immutable_and_current_moves_atomically(tmp_path):
    cfg = tiny_config()
    s = build_student(cfg.model, 2)
    v1 = save_version(tmp_path, s, ["a", "b"], cfg, 0, [])
    s.widen(1)
    v2 = save_version(tmp_path, s, ["a", "b", "c"], cfg, 1, [])
    assert (v1.name, v2.name) == ("0001", "0002")
    assert (tmp_path / "current").read_text().strip() == "0002"
    assert load_state(tmp_path).classes == ["a", "b", "c"]
    assert (v1 / "model.safetensors").is_file()


def test_a_failing_writer_publishes_nothing(tmp_path):
    cfg = tiny_config()
    s = build_student(cfg.model, 2)
    save_version(tmp_path, s, ["a", "b"], cfg, 0, [])

    def boom(_):
        raise RuntimeError("export failed")

    try:
        save_version(tmp_path, s, ["a", "b"], cfg, 1, [], writers=[boom])
    except RuntimeError:
        pass
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["0001"]
    assert (tmp_path / "current").read_text().strip() == "0001"


def test_a_format_1_state_loads_as_a_linear_head_model(tmp_path):
    """If this fails, states written before the statistics classifiers no longer load (or
    load as a model whose solved head is all zeros)."""
    import json

    cfg = tiny_config()
    cfg.model.classifier = "linear"
    s = build_student(cfg.model, 2).eval()
    vd = save_version(tmp_path, s, ["a", "b"], cfg, 0, [])
    meta = json.loads((vd / "meta.json").read_text())
    meta["format"] = 1
    for k in ("classifier", "features", "ridge"):
        del meta["config"]["model"][k]
    for k in ("drift", "drift_shrink", "increment_blocks"):
        del meta["config"]["train"][k]
    meta["config"]["train"]["new_head_init"] = "random"
    meta["config"]["loss"].update(lc_calibration=0.0, lc_margin=1.0)
    (vd / "meta.json").write_text(json.dumps(meta))
    st = load_state(tmp_path)
    assert st.config.model.classifier == "linear" and st.student.classifier is None
    assert st.config.train.new_head_init == "scaled"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(st.student.predict(x)[1], s(x)[1])



def test_a_state_saved_before_calibration_and_seen_counts_loads_as_it_predicted(tmp_path):
    """If this fails, a state saved before `stats.calib`, `stats.seen` and `stats.votes` existed is refused
    (missing tensors) or loads with a head that predicts otherwise than it did: T must read
    as 1 and every dimension as seen by all of a class's images."""
    from safetensors.torch import save_file

    from fieldlearn.device.classifier import solve_head

    cfg = tiny_config()
    s = build_student(cfg.model, 2).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, s.stats.dim, generator=g, dtype=torch.float64) + 0.5
    s.stats.add(x, torch.tensor([0] * 6 + [1] * 6))
    w = save_version(tmp_path, s, ["a", "b"], cfg, 0, []) / "model.safetensors"
    tensors = load_file(w)
    for k in ("stats.calib", "stats.seen", "stats.votes"):
        del tensors[k]
    os.chmod(w, 0o600)
    save_file(tensors, str(w))
    st = load_state(tmp_path).student.stats
    assert st.temperature == 1.0 and not st.votes.any()
    assert torch.equal(st.seen, st.counts[:, None].expand_as(st.seen))
    for kind in ("lda", "ncm"):
        assert all(torch.allclose(a, b) for a, b in zip(solve_head(st, kind, shrink=0.3)[:2],
                                                         solve_head(s.stats, kind, shrink=0.3)[:2]))


def test_a_state_saved_before_the_class_covariances_loads_with_the_head_it_saved(tmp_path):
    """If this fails, a state saved before `stats.scatter` existed is refused, or its lda head
    changes on loading: until it learns again it must solve the head it saved, from the
    covariance pooled over images (computed here from the images, classes of 4 and 8 so that
    pooling over classes would differ)."""
    from safetensors.torch import save_file

    from fieldlearn.device.classifier import solve_head

    cfg = tiny_config()
    s = build_student(cfg.model, 2).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, s.stats.dim, generator=g, dtype=torch.float64) + 0.5
    y = torch.tensor([0] * 4 + [1] * 8)
    s.stats.add(x, y)
    w = save_version(tmp_path, s, ["a", "b"], cfg, 0, []) / "model.safetensors"
    tensors = load_file(w)
    del tensors["stats.scatter"]
    os.chmod(w, 0o600)
    save_file(tensors, str(w))
    st = load_state(tmp_path).student.stats
    mus = torch.stack([x[y == c].mean(0) for c in (0, 1)])
    within = sum((x[y == c] - mus[c]).T @ (x[y == c] - mus[c]) for c in (0, 1)) / (12 - 2)
    eye = torch.eye(len(within), dtype=torch.float64)
    w_old = torch.linalg.solve(0.7 * within + 0.3 * within.diagonal().mean() * eye, mus.T).T
    w_new = solve_head(s.stats, "lda", shrink=0.3)[0]
    assert torch.allclose(solve_head(st, "lda", shrink=0.3)[0], w_old, atol=1e-6)
    assert not torch.allclose(w_new, w_old, atol=1e-3)          # the two poolings differ on these classes


# ---------------------------------------------------------------- durability: fsync before publish

def _linear_cfg():
    cfg = tiny_config()
    cfg.model.classifier = "linear"   # no class statistics: a small weights file
    return cfg


class _FsLog:
    """Records os.fsync (by the path its fd is open on), os.rename and os.replace, in order.
    A SIGKILL keeps the page cache, so a crash test cannot see a missing fsync: its order
    against the renames that publish is the only evidence."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd):
            self.events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
            return real_fsync(fd)

        def rename(src, dst, *a, **kw):
            self.events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
            return real_rename(src, dst, *a, **kw)

        def replace(src, dst, *a, **kw):
            self.events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)

    def move_to(self, dst) -> int:
        """Index of the (last) rename/replace onto dst."""
        dst = os.path.realpath(dst)
        hits = [i for i, e in enumerate(self.events) if e[0] in ("rename", "replace") and e[2] == dst]
        assert hits, f"nothing was renamed onto {dst}: {self.events}"
        return hits[-1]

    def fsyncs(self, path) -> list[int]:
        path = os.path.realpath(path)
        return [i for i, e in enumerate(self.events) if e == ("fsync", path)]

    def assert_published(self, dst, after: int = -1) -> int:
        """dst (a file or a directory tree) was renamed into place after fsync of everything
        in it under its temporary name, and its parent directory was fsynced after the rename.
        Returns the index of the parent's fsync."""
        i = self.move_to(dst)
        assert i > after
        src = self.events[i][1]
        dst = os.path.realpath(dst)
        inside = [dst] + ([os.path.join(d, n) for d, dirs, files in os.walk(dst) for n in dirs + files]
                          if os.path.isdir(dst) else [])
        for path in inside:
            tmp_name = src + path[len(dst):]
            assert any(j < i for j in self.fsyncs(tmp_name)), \
                f"{tmp_name} was not fsynced before the rename that published it as {path}"
        parent = [j for j in self.fsyncs(os.path.dirname(dst)) if j > i]
        assert parent, f"{os.path.dirname(dst)} was not fsynced after {dst} was renamed into it"
        return parent[0]


def _nested_writer(version_dir):
    (version_dir / "extra").mkdir()
    (version_dir / "extra" / "notes.txt").write_text("written by a writer, e.g. the export")


def test_save_version_fsyncs_every_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """If this fails, a power cut can publish a version (or a `current` pointer) whose bytes
    or directory entry never reached the disk: a file of the version is not fsynced before
    the rename that publishes it, or the parent directory not after it. (A SIGKILL keeps the
    page cache, so the crash tests cannot see this.)"""
    cfg = _linear_cfg()
    s = build_student(cfg.model, 2)
    save_version(tmp_path, s, ["a", "b"], cfg, 0, [])
    log = _FsLog(monkeypatch)
    vd = save_version(tmp_path, s, ["a", "b"], cfg, 1, [], writers=[_nested_writer])
    assert vd.name == "0002" and (vd / "extra" / "notes.txt").is_file()
    version_synced = log.assert_published(vd)
    # `current` moves only once the version is durable, and is itself durable after.
    assert log.move_to(tmp_path / "current") > version_synced
    log.assert_published(tmp_path / "current", after=version_synced)


def test_rollback_and_prune_make_their_changes_durable(tmp_path, monkeypatch):
    """If this fails, a power cut after `rollback` can bring the old `current` back, or after
    `prune` a half-deleted version back into versions/ (the pointer's file or directory
    fsync, or the versions directory's fsync after the rename out, went missing)."""
    from fieldlearn.store.versions import prune, rollback

    cfg = _linear_cfg()
    s = build_student(cfg.model, 2)
    for step in range(3):
        save_version(tmp_path, s, ["a", "b"], cfg, step, [])
    log = _FsLog(monkeypatch)
    assert rollback(tmp_path) == ("0003", "0002")
    log.assert_published(tmp_path / "current")
    n = len(log.events)
    assert prune(tmp_path, keep=1) == ["0001"]       # 0003 is the newest, 0002 is current
    renames = [i for i, e in enumerate(log.events) if i >= n and e[0] == "rename"
               and e[1] == os.path.realpath(tmp_path / "versions" / "0001")]
    assert renames, log.events[n:]
    assert any(j > renames[0] for j in log.fsyncs(tmp_path / "versions")), \
        "versions/ not fsynced after a version was renamed out of it"


# ---------------------------------------------------------------- class order

ZOO = ["zebra", "apple", "mango"]   # not alphabetical: a sort anywhere shows


@pytest.fixture
def one_thread():
    """A tiny net exports several times faster on one thread when the cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_class_order_survives_save_export_and_load(tmp_path, one_thread):
    """If this fails, a class name is attached to the wrong output somewhere between the
    learner and the device: meta.json, labels.txt or the ONNX metadata does not list the
    classes in logit order (e.g. sorted), so every prediction is mislabelled."""
    from fieldlearn.export.onnx import export_classifier
    from fieldlearn.runtime.metadata import model_info, read_labels, read_metadata

    cfg = _linear_cfg()
    s = build_student(cfg.model, len(ZOO)).eval()
    vd = save_version(tmp_path, s, ZOO, cfg, 0, [],
                      writers=[lambda d: export_classifier(s, d, classes=ZOO, step=0)])
    assert load_state(tmp_path).classes == ZOO
    assert read_labels(vd / "labels.txt") == ZOO
    assert read_metadata(vd / "model.onnx")["classes"] == ZOO
    assert model_info(vd / "model.onnx").classes == ZOO


def test_a_loaded_state_carries_its_step_history_and_architecture(tmp_path):
    """If this fails, `learn` resumes from a version that forgot the steps before it (the next
    version's history, and the README's tables built from it, lose the base step), or a
    linear-head version claims features it does not use."""
    cfg = tiny_config()
    s = build_student(cfg.model, 2)
    hist = [{"step": 0, "method": "base", "new_classes": ["a", "b"]}]
    save_version(tmp_path, s, ["a", "b"], cfg, 0, hist)
    st = load_state(tmp_path)
    assert st.history == hist and st.step == 0
    assert st.meta["architecture"]["features"] == ("student" if cfg.model.classifier == "linear"
                                                   else cfg.model.features)


def test_class_names_must_match_the_head_when_saving(tmp_path):
    """If this fails, a version whose class list is shorter than its head is published, and
    `classify` names some outputs with the wrong class (or none)."""
    cfg = tiny_config()
    with pytest.raises(ValueError, match="class names"):
        save_version(tmp_path, build_student(cfg.model, 3), ["a", "b"], cfg, 0, [])
    assert not (tmp_path / "current").exists()


@pytest.mark.parametrize("damage", ["bad value", "no config"])
def test_a_version_with_a_broken_config_is_refused_in_one_line(tmp_path, damage):
    """If this fails, a meta.json whose config no longer validates, or that has none (read_meta
    accepts that; building the net cannot), loads anyway or ends in a traceback instead of a
    UserError naming the file."""
    import json

    from fieldlearn.runtime.errors import UserError

    cfg = tiny_config()
    vd = save_version(tmp_path, build_student(cfg.model, 2), ["a", "b"], cfg, 0, [])
    meta = json.loads((vd / "meta.json").read_text())
    if damage == "bad value":
        meta["config"]["train"]["epochs"] = "many"
    else:
        del meta["config"]
    os.chmod(vd / "meta.json", 0o600)
    (vd / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta.json"):
        load_state(tmp_path)


@pytest.mark.parametrize("damage, says", [("missing", "missing"), ("directory", "unreadable"),
                                          ("garbage", "not a readable safetensors")])
def test_a_damaged_weights_file_is_refused_in_one_line(tmp_path, damage, says):
    """If this fails, a version whose weights are gone, unreadable or not safetensors ends in a
    traceback (or loads a net with random weights) instead of a UserError naming the file."""
    from fieldlearn.runtime.errors import UserError

    cfg = tiny_config()
    w = save_version(tmp_path, build_student(cfg.model, 2), ["a", "b"], cfg, 0, []) / "model.safetensors"
    os.chmod(w, 0o600)
    w.unlink()
    if damage == "directory":
        w.mkdir()
    elif damage == "garbage":
        w.write_bytes(b"not a model")
    with pytest.raises(UserError, match=says):
        load_state(tmp_path)


@pytest.mark.parametrize("change", ["missing", "dtype"])
def test_weights_that_do_not_fit_the_architecture_are_refused_in_one_line(tmp_path, change):
    """If this fails, a weights file that lacks a tensor of the architecture (left at its random
    initial value) or holds one in another dtype (silently cast) loads instead of being refused."""
    from safetensors.torch import save_file

    from fieldlearn.runtime.errors import UserError

    cfg = tiny_config()
    w = save_version(tmp_path, build_student(cfg.model, 2), ["a", "b"], cfg, 0, []) / "model.safetensors"
    tensors = load_file(w)
    k = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    if change == "missing":
        del tensors[k]
    else:
        tensors[k] = tensors[k].double()
    os.chmod(w, 0o600)
    save_file(tensors, str(w))
    with pytest.raises(UserError, match="do not match the architecture"):
        load_state(tmp_path)


def test_a_state_dir_whose_parents_do_not_exist_yet_is_created(tmp_path):
    """If this fails, `fieldlearn init --state ~/models/new/state` fails on a fresh device
    because the folders above the state dir are not there yet."""
    cfg = tiny_config()
    save_version(tmp_path / "models" / "new" / "state", build_student(cfg.model, 2), ["a", "b"], cfg, 0, [])
    assert load_state(tmp_path / "models" / "new" / "state").classes == ["a", "b"]


def test_a_state_dir_made_by_hand_is_made_owner_only(tmp_path):
    """If this fails, a state folder the user created beforehand (mkdir: 0755) keeps letting
    other users read the model and its class names."""
    import stat

    (tmp_path / "state" / "versions").mkdir(parents=True, mode=0o755)
    for d in (tmp_path / "state", tmp_path / "state" / "versions"):
        os.chmod(d, 0o755)
    cfg = tiny_config()
    save_version(tmp_path / "state", build_student(cfg.model, 2), ["a", "b"], cfg, 0, [])
    for d in (tmp_path / "state", tmp_path / "state" / "versions"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_saving_a_version_clears_what_an_interrupted_save_left(tmp_path):
    """If this fails, every killed `learn` leaves a half-written version behind for good
    (versions/.tmp-*), filling the device's disk."""
    cfg = tiny_config()
    s = build_student(cfg.model, 2)
    save_version(tmp_path, s, ["a", "b"], cfg, 0, [])
    (tmp_path / "versions" / ".tmp-killed").mkdir()
    save_version(tmp_path, s, ["a", "b"], cfg, 1, [])
    assert not (tmp_path / "versions" / ".tmp-killed").exists()


@pytest.mark.parametrize("target, code", [("save_file", "ENOSPC"), ("switch_current", "EIO")])
def test_a_failed_write_or_switch_is_reported_and_publishes_nothing(tmp_path, monkeypatch, target, code):
    """If this fails, a full disk while the weights are written ends in an OSError traceback
    (not the DiskFull message that says the current version is unchanged) or leaves the
    half-written version behind; or an I/O error while `current` is replaced is swallowed:
    `learn` reports a new version that is not current (or half there), and the user believes
    it was saved."""
    import errno

    from fieldlearn.store import state as state_mod
    from fieldlearn.store.versions import DiskFull

    cfg = tiny_config()
    s = build_student(cfg.model, 2)
    save_version(tmp_path, s, ["a", "b"], cfg, 0, [])
    err = getattr(errno, code)

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(state_mod, target, fail)
    raised, match = (DiskFull, "unchanged") if code == "ENOSPC" else (OSError, os.strerror(err))
    with pytest.raises(raised, match=match):
        save_version(tmp_path, s, ["a", "b"], cfg, 1, [])
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["0001"]
    assert load_state(tmp_path).step == 0
