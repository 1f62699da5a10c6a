"""The state: atomic and durable versions (fsync before every publishing rename), class
order kept end to end, and the promise that no training data is ever stored.

The audit trains real increments through the CLI with TMPDIR pointed into the test's
own folder, then reads every byte written under the state dir and the temp dir and
looks for the training images' pixels (raw uint8 rows, the normalised float32 input
rows) and the frozen-trunk features of those images (float32 and float16 rows).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fieldlearn.device.data import load_image_folder, to_input
from fieldlearn.device.model import build_student
from fieldlearn.device.state import load_state, save_version
from tests.conftest import tiny_config, write_image_folder


def _cli(*args, env):
    r = subprocess.run([sys.executable, "-m", "fieldlearn.cli", *args], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _needles(images: torch.Tensor, cfg, student=None) -> list[bytes]:
    """Byte strings that would betray stored pixels or features of these images."""
    out = []
    for img in images:
        a = img.numpy()                                     # [3, S, S] uint8
        out += [a[c, r].tobytes() for c in range(3) for r in (5, 17)]   # raw pixel rows
    x = to_input(images, cfg.model.input_size, cfg.model.mean, cfg.model.std)
    for row in x[:, :, 9].numpy():                          # [N, 3, W] normalised input rows
        out.append(row[1].astype(np.float32).tobytes())
    student = (student or build_student(cfg.model, 2)).eval()  # the run's frozen trunk
    with torch.no_grad():
        z = student.encode(x)                               # [N, C, h, w]
    for zi in z[:8]:
        out.append(zi[0, 1].numpy().astype(np.float32).tobytes())
        out.append(zi[0, 1].numpy().astype(np.float16).tobytes())
    return [n for n in out if len(set(n)) > 4]              # skip constant rows (padding-like)


def _all_files(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            yield os.path.join(dirpath, f)


def test_no_training_pixels_or_features_are_ever_written(tmp_path, cifar_test):
    base = write_image_folder(tmp_path / "base", cifar_test, [0, 1, 2], 12)
    new = write_image_folder(tmp_path / "new", cifar_test, [3, 4], 12)
    state, tmpdir = tmp_path / "state", tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    # The shipped kind of model (pretrained trunk, frozen, features cached in memory per step).
    _cli("init", "--data", str(base), "--state", str(state), "--base-epochs", "2", "--variant", "cifar",
         "--input-size", "32", "--freeze-blocks", "14", "--no-progress", "--batch-size", "8", env=env)
    _cli("learn", str(new), "--state", str(state), "--epochs", "1", "--no-progress", "--batch-size", "8",
         "--teacher-backend", "onnxruntime", env=env)

    st = load_state(state)
    imgs = torch.cat([load_image_folder(base, 32).images, load_image_folder(new, 32).images])
    needles = _needles(imgs, st.config, st.student)
    assert len(needles) > 100
    written = list(_all_files(state)) + list(_all_files(tmpdir))
    names = {os.path.basename(p) for p in written}
    # ".ses" is onnxruntime's session-id file in TMPDIR (a UUID); its bytes are scanned like the rest.
    assert names <= {"current", "model.safetensors", "meta.json", "model.onnx", "labels.txt", "lock", ".ses"}, names
    assert "model.onnx" in names, "every updated model is exported"
    for path in written:
        blob = open(path, "rb").read()
        for n in needles:
            assert n not in blob, f"{path} contains training pixels or features"
    # The class statistics are model state only as aggregates: no stored vector may be one
    # training image's classifier feature (or a multiple of it), to float tolerance.
    phis = _image_features(st, imgs)
    assert phis.shape == (len(imgs), st.student.stats.dim)
    for vd in (state / "versions").iterdir():
        stored = load_file(str(vd / "model.safetensors"))
        assert "stats.sums" in stored and "stats.gram" in stored, "the statistics are saved with the weights"
        for name, t in stored.items():
            assert _rows_matching(t, phis) == 0, f"{vd.name}/{name} holds a single image's feature"


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


def test_feature_audit_would_catch_a_stored_image_feature(tmp_path, cifar_test):
    """The statistics audit's check really finds a per-image feature (a class 'sum' of one
    image), and passes genuine sums over >= 5 images (else the audit above proves nothing)."""
    cfg = tiny_config()
    cfg.model.classifier, cfg.model.features = "analytic", "concat"
    from fieldlearn.device.data import ImageSet
    from fieldlearn.device.learner import fit_classifier
    from fieldlearn.device.state import LoadedState

    s = build_student(cfg.model, 2).eval()
    images = cifar_test.images[:12]
    data = ImageSet(images, torch.tensor([0, 1] * 6), ["a", "b"])
    fit_classifier(s, data, [0, 1], cfg)
    st = LoadedState(student=s, classes=["a", "b"], config=cfg, step=0, version_dir=tmp_path)
    phis = _image_features(st, images)
    assert _rows_matching(s.stats.sums, phis) == 0, "a sum over 6 images is not one image's feature"
    leaked = s.stats.sums.clone()
    leaked[1, :-1] = phis[3] * 7.0
    assert _rows_matching(leaked, phis) == 1


def test_audit_would_catch_a_stored_image(tmp_path, cifar_test):
    """The audit's needles really match stored pixels (else the test above proves nothing)."""
    cfg = tiny_config()
    imgs = cifar_test.images[:4]
    blob = imgs[2].numpy().tobytes()
    assert any(n in blob for n in _needles(imgs, cfg))
    x = to_input(imgs, 32, cfg.model.mean, cfg.model.std)
    assert any(n in x.numpy().astype(np.float32).tobytes() for n in _needles(imgs, cfg))


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
    from fieldlearn.device.store import prune, rollback

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


def test_a_version_with_a_broken_config_is_refused_in_one_line(tmp_path):
    """If this fails, a meta.json whose config no longer validates loads anyway (or ends in a
    traceback) instead of a UserError naming the file."""
    import json

    from fieldlearn.runtime.errors import UserError

    cfg = tiny_config()
    vd = save_version(tmp_path, build_student(cfg.model, 2), ["a", "b"], cfg, 0, [])
    meta = json.loads((vd / "meta.json").read_text())
    meta["config"]["train"]["epochs"] = "many"
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


def test_disk_full_while_writing_a_version_is_a_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    """If this fails, a full disk while the weights are written ends in an OSError traceback
    (not the DiskFull message that says the current version is unchanged), or leaves the
    half-written version behind."""
    import errno

    from fieldlearn.device import state as state_mod
    from fieldlearn.device.store import DiskFull

    cfg = tiny_config()
    s = build_student(cfg.model, 2)
    save_version(tmp_path, s, ["a", "b"], cfg, 0, [])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(state_mod, "save_file", full)
    with pytest.raises(DiskFull, match="unchanged"):
        save_version(tmp_path, s, ["a", "b"], cfg, 1, [])
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["0001"]
    assert load_state(tmp_path).step == 0


def test_a_failed_switch_of_current_is_reported_and_publishes_nothing(tmp_path, monkeypatch):
    """If this fails, an I/O error while `current` is replaced is swallowed: `learn` reports a
    new version that is not current (or half there), and the user believes it was saved."""
    import errno

    from fieldlearn.device import state as state_mod

    cfg = tiny_config()
    s = build_student(cfg.model, 2)
    save_version(tmp_path, s, ["a", "b"], cfg, 0, [])

    def broken(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(state_mod, "switch_current", broken)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        save_version(tmp_path, s, ["a", "b"], cfg, 1, [])
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["0001"]
    assert load_state(tmp_path).step == 0
