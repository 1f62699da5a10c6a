"""Bad input corpus: junk images, odd class names, broken or foreign state files.

Each case runs the real command (fieldlearn.cli.main.main, in this process) on a copy of a
tiny state and checks what docs/GUARANTEES.md promises: a refused input is exit 2 with one
line that names the file or argument, no traceback, and the state dir byte-for-byte as
before; an unreadable image among good ones is skipped with a warning that names it; odd
but valid images are converted and learned. Warnings go through Python's warnings (pytest
collects them here); test_skipped_image_warning_is_one_stderr_line checks the CLI's line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fieldlearn.cli.main import main
from fieldlearn.device.data import MIN_IMAGES, SkippedInput
from fieldlearn.device.model import build_student
from fieldlearn.store.state import load_state, save_version
from tests.conftest import ROOT, tiny_config, write_image_folder

LEARN = ["--no-progress", "--epochs", "1", "--batch-size", "8", "--teacher-backend", "torch", "--no-export",
         "--num-threads", "1"]
KNOWN = ["apple", "pear"]


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode("utf-8", "surrogateescape"))
        h.update(oct(p.lstat().st_mode).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base_state(tmp_path_factory):
    """A tiny saved state (2 classes, random weights: these tests are about input, not accuracy)."""
    cfg = tiny_config()
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bad-input") / "state"
    save_version(root, build_student(cfg.model, 2), KNOWN, cfg, 0,
                 [{"step": 0, "method": "base", "new_classes": KNOWN}])
    return root


@pytest.fixture
def state(base_state, tmp_path):
    return Path(shutil.copytree(base_state, tmp_path / "state"))


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(rc: int, err: str, *names) -> str:
    """Exit 2, one stderr line naming each of `names`, no traceback."""
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def good_folder(root: Path, gen_test, name: str, n: int = MIN_IMAGES, cls: int = 20) -> Path:
    """ROOT/<name>/ with n generated images (tests/synthetic.py) of class `cls`."""
    tmp = write_image_folder(root / ".src", gen_test, [cls], n)
    src = tmp / gen_test.class_names[cls]
    dest = root / name
    shutil.move(str(src), str(dest))
    shutil.rmtree(tmp)
    return dest


def encoded(gen_test, fmt: str, mode: str = "RGB", i: int = 0, **kw) -> bytes:
    im = Image.fromarray(gen_test.images[i].permute(1, 2, 0).numpy())
    if mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257).astype("<u2"))   # mode I;16
    elif mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A 200-byte PNG that claims 30000 x 30000 pixels (900 MP)."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def corrupt_png(gen_test) -> bytes:
    data = bytearray(encoded(gen_test, "PNG"))
    i = data.index(b"IDAT") + 20
    data[i:i + 16] = bytes(16)                       # damages the compressed stream (and its CRC)
    return bytes(data)


BAD_IMAGES = {
    "zero-byte.jpg": lambda c: b"",
    "truncated.jpg": lambda c: encoded(c, "JPEG", quality=95)[:400],
    "truncated.png": lambda c: encoded(c, "PNG")[:900],
    "corrupt.jpg": lambda c: encoded(c, "JPEG")[:20] + bytes(np.random.default_rng(0).integers(0, 256, 600, np.uint8)),
    "corrupt.png": corrupt_png,
    "not-an-image.png": lambda c: b"GPS log 2026-11-28 12:00:01 lat 52.1 lon 4.3\n" * 20,
    "bomb.png": lambda c: bomb_png(),
}


@pytest.mark.parametrize("bad", sorted(BAD_IMAGES))
def test_unreadable_image_among_good_ones_is_skipped_with_a_warning(state, tmp_path, gen_test, capsys, recwarn, bad):
    """If this fails, one bad file from a camera either stops the whole increment or is
    silently fed to training. Decision: skip it, say so in the one summary line naming it,
    learn the rest."""
    folder = good_folder(tmp_path / "new", gen_test, "tulip")
    (folder / bad).write_bytes(BAD_IMAGES[bad](gen_test))
    before = {p: p.read_bytes() for p in (state / "versions" / "0001").iterdir()}
    rc, out, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    assert rc == 0, err
    skipped = [str(w.message) for w in recwarn if issubclass(w.category, SkippedInput)]
    assert len(skipped) == 1 and f"tulip/{bad}: " in skipped[0] and "\n" not in skipped[0], skipped
    assert skipped[0].startswith(f"{tmp_path / 'new'}: skipped 1 of {MIN_IMAGES + 1} entries: 1 unreadable image")
    st = load_state(state)
    assert st.classes == KNOWN + ["tulip"] and st.history[-1]["n_images"] + st.history[-1]["n_val_images"] == 5
    assert before == {p: p.read_bytes() for p in (state / "versions" / "0001").iterdir()}


def test_skipped_files_are_one_stderr_line(state, tmp_path, gen_test):
    """If this fails, the CLI prints Python's two-line warning (with a source line) for a skip,
    or one line per skipped file instead of one summary with counts by reason."""
    folder = good_folder(tmp_path / "new", gen_test, "tulip")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("no image")
    (folder / ".DS_Store").write_bytes(b"\0")
    quiet = ["--no-progress", "--batch-size", "8", "--no-export", "--num-threads", "1"]   # none that method none ignores
    r = subprocess.run([sys.executable, "-m", "fieldlearn.cli", "learn", str(tmp_path / "new"), "--state", str(state),
                        *quiet], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"fieldlearn learn: warning: {tmp_path / 'new'}: skipped 3 of {MIN_IMAGES + 3} entries: 2 unreadable image "
        "(tulip/notes.txt: UnidentifiedImageError, tulip/zero.jpg: UnidentifiedImageError); 1 hidden (tulip/.DS_Store)"], \
        r.stderr


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"),
                                      ("1", "PNG"), ("CMYK", "JPEG")])
def test_odd_image_modes_are_converted_and_learned(state, tmp_path, gen_test, capsys, recwarn, mode, fmt):
    """If this fails, grayscale, alpha, palette, 16-bit, bilevel or CMYK files (what cameras
    and editors write) are rejected instead of converted to RGB."""
    folder = tmp_path / "new" / "tulip"
    folder.mkdir(parents=True)
    for i in range(MIN_IMAGES):
        (folder / f"{i}.{fmt.lower()}").write_bytes(encoded(gen_test, fmt, mode, i=i))
    with Image.open(folder / "0.png" if fmt == "PNG" else folder / "0.jpeg") as im:
        assert im.mode == mode
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    assert rc == 0, err
    assert not [w for w in recwarn if issubclass(w.category, SkippedInput)]
    assert load_state(state).classes == KNOWN + ["tulip"]


def test_a_class_folder_of_only_unreadable_files_is_refused(state, tmp_path, capsys):
    """If this fails, a folder of junk becomes a class with no training images (or a crash)."""
    folder = tmp_path / "new" / "tulip"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.png").write_text("not a png")
    before = tree_hash(state)
    with pytest.warns(SkippedInput):
        rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, folder, "no readable images")
    assert tree_hash(state) == before


def test_an_empty_class_folder_is_refused(state, tmp_path, gen_test, capsys):
    """If this fails, an empty folder silently drops a class the user meant to add.
    Decision: refuse the increment and name the folder (adding it later is one more step)."""
    good_folder(tmp_path / "new", gen_test, "tulip")
    (tmp_path / "new" / "rose").mkdir()
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, tmp_path / "new" / "rose")
    assert tree_hash(state) == before


def test_a_class_the_model_knows_is_refused(state, tmp_path, gen_test, capsys):
    """If this fails, 'apple' gets a second output and the two fight over every apple."""
    good_folder(tmp_path / "new", gen_test, "apple")
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, tmp_path / "new" / "apple", "already known")
    assert tree_hash(state) == before


def test_a_case_twin_of_a_known_class_is_refused_naming_both(state, tmp_path, gen_test, capsys):
    """If this fails, a folder 'Apple' is learned as a new class beside the known 'apple' without
    a word, and the two fight over every apple."""
    good_folder(tmp_path / "new", gen_test, "Apple")
    good_folder(tmp_path / "new", gen_test, "tulip", cls=21)
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, tmp_path / "new" / "Apple", "'Apple'", "'apple'", "only in case")
    assert tree_hash(state) == before


def test_two_new_folders_that_differ_only_in_case_are_refused_naming_both(state, tmp_path, gen_test, capsys):
    """If this fails, 'Tulip' and 'tulip' in one inbox become two classes of one flower."""
    good_folder(tmp_path / "new", gen_test, "Tulip")
    good_folder(tmp_path / "new", gen_test, "tulip", cls=21)
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, tmp_path / "new", "'Tulip'", "'tulip'", "only in case")
    assert tree_hash(state) == before


BAD_NAMES = {
    "blank": "   ",
    "edge spaces": " tulip",
    "newline": "tu\nlip",
    "tab": "tu\tlip",
    "bidi override": "tulip\u202egnp.exe",
    "not UTF-8": os.fsdecode(b"tul\xffip"),
}


@pytest.mark.parametrize("why", sorted(BAD_NAMES))
def test_bad_class_folder_names_are_refused(state, tmp_path, gen_test, capsys, why):
    """If this fails, a class name that cannot be printed on one line, written to labels.txt
    or shown honestly (a bidi override hides its real text) gets into the model."""
    name = BAD_NAMES[why]
    good_folder(tmp_path / "new", gen_test, name)
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, tmp_path / "new", repr(name))
    assert tree_hash(state) == before


def test_odd_but_valid_unicode_class_names_are_learned_intact(state, tmp_path, gen_test, capsys):
    """If this fails, accented, CJK or emoji class names are rejected or mangled on the way
    through meta.json."""
    names = ["café", "猫", "🐱 cat", "tulip-red_2"]
    for i, n in enumerate(names):
        good_folder(tmp_path / "new", gen_test, n, cls=30 + i)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    assert rc == 0, err
    assert load_state(state).classes == KNOWN + sorted(names)


def test_one_name_in_two_unicode_spellings_is_refused(state, tmp_path, gen_test, capsys):
    """If this fails, 'café' (NFC) and 'café' (NFD) become two classes that print the same."""
    good_folder(tmp_path / "new", gen_test, "caf\u00e9")
    good_folder(tmp_path / "new", gen_test, "cafe\u0301", cls=21)
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, "appears twice")
    assert tree_hash(state) == before


def test_the_smallest_increment_is_learned(state, tmp_path, gen_test, capsys):
    """If this fails, the smallest allowed increment (MIN_IMAGES photos per class) crashes the
    held-out split or training. Decision: accepted; nothing is held out of such a class."""
    good_folder(tmp_path / "new", gen_test, "tulip", n=MIN_IMAGES)
    good_folder(tmp_path / "new", gen_test, "rose", n=MIN_IMAGES, cls=21)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    assert rc == 0, err
    assert load_state(state).classes == KNOWN + ["rose", "tulip"]


@pytest.mark.parametrize("n", [1, MIN_IMAGES - 1])
def test_a_class_with_too_few_images_is_refused(state, tmp_path, gen_test, capsys, n):
    """If this fails, a class is learned from 1-4 photos (its statistics and its held-out
    accuracy mean nothing). Decision: refuse the increment, naming the folder and the minimum."""
    good_folder(tmp_path / "new", gen_test, "tulip", n=n)
    good_folder(tmp_path / "new", gen_test, "rose", cls=21)
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, tmp_path / "new" / "tulip", f"at least {MIN_IMAGES}")
    assert tree_hash(state) == before


@pytest.mark.parametrize("per_class,fraction,held",
                         [(5, 0.1, 0), (5, 0.0, 0), (9, 0.1, 1), (5, 0.5, 0), (14, 0.1, 1), (9, 0.5, 4), (8, 0.5, 3)])
def test_the_held_out_share_follows_val_fraction(state, tmp_path, gen_test, capsys, per_class, fraction, held):
    """If this fails, a small class loses a fixed share of its images to the held-out split
    whatever --val-fraction says (issue 14: half of 2 images at 0.1). Decision: the nearest
    whole number of images per class (halves up), never leaving a class fewer than MIN_IMAGES
    to learn from (its statistics need them), and the count is printed."""
    good_folder(tmp_path / "new", gen_test, "tulip", n=per_class)
    rc, out, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN, "--val-fraction", fraction)
    assert rc == 0, err
    entry = load_state(state).history[-1]
    assert entry["n_images"] == per_class - held and entry.get("n_val_images", 0) == held
    if fraction:
        assert f"held out {held} of {per_class} images" in out, out


def test_too_many_images_for_one_increment_are_refused(state, tmp_path, gen_test, capsys, monkeypatch):
    """If this fails, a huge folder is read into memory until the device runs out of it."""
    import fieldlearn.device.data as data

    monkeypatch.setattr(data, "MAX_IMAGES", 4)
    good_folder(tmp_path / "new", gen_test, "tulip", n=5)
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, tmp_path / "new", "5 images")
    assert tree_hash(state) == before


def test_a_diverging_step_aborts_and_keeps_the_previous_model(state, tmp_path, gen_test, capsys, monkeypatch):
    """If this fails, a step whose loss turns NaN (an absurd learning rate; here forced at the
    third batch) saves a model of NaNs as the current one."""
    import fieldlearn.device.learner as learner

    real = learner.make_method

    def diverging(name, loss_cfg):
        m = real(name, loss_cfg)
        terms, calls = m.terms, []

        def nan_later(batch):
            calls.append(1)
            out = terms(batch)
            return {k: v * float("nan") for k, v in out.items()} if len(calls) >= 3 else out
        m.terms = nan_later
        return m

    monkeypatch.setattr(learner, "make_method", diverging)
    good_folder(tmp_path / "new", gen_test, "tulip", n=10)
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN, "--epochs", "3", "--method", "lwm")
    refused(rc, err, "learning rate", "nothing was saved")
    assert tree_hash(state) == before


# ---------------------------------------------------------------------------- broken state files

def edit_meta(state: Path, **changes) -> Path:
    path = state / "versions" / "0001" / "meta.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("names", [["apple", "../../etc"], ["apple", "a/b"], ["apple", ".."], ["apple", "apple"],
                                   ["apple", 7]])
def test_class_names_in_meta_json_are_checked(state, tmp_path, gen_test, capsys, names):
    """If this fails, a class name from a tampered meta.json ('../../etc', 'a/b') reaches the
    code as if it were safe (labels, folders, printed output)."""
    meta = edit_meta(state, classes=names)
    good_folder(tmp_path / "new", gen_test, "tulip")
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, meta)
    assert tree_hash(state) == before


def test_a_state_from_a_future_fieldlearn_is_refused(state, tmp_path, gen_test, capsys):
    """If this fails, a newer state is misread (or overwritten) by an older fieldlearn."""
    meta = edit_meta(state, format=99, fieldlearn_version="9.0.0")
    good_folder(tmp_path / "new", gen_test, "tulip")
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, meta, "newer fieldlearn", "9.0.0")
    assert tree_hash(state) == before


def test_meta_json_that_is_not_json_is_refused(state, capsys):
    meta = state / "versions" / "0001" / "meta.json"
    meta.write_bytes(b"\x00\x01{not json")
    before = tree_hash(state)
    rc, _, err = run(capsys, "export", "--state", state, "--no-engine")
    refused(rc, err, meta)
    assert tree_hash(state) == before


def test_a_state_whose_weights_do_not_match_its_architecture_is_refused(state, tmp_path, gen_test, capsys):
    """If this fails, weights of one width are loaded into a net of another (a torch
    RuntimeError traceback) instead of one line naming the file."""
    meta = json.loads((state / "versions" / "0001" / "meta.json").read_text())
    meta["config"]["model"]["width"] = 0.5
    edit_meta(state, config=meta["config"])
    good_folder(tmp_path / "new", gen_test, "tulip")
    before = tree_hash(state)
    rc, _, err = run(capsys, "learn", tmp_path / "new", "--state", state, *LEARN)
    refused(rc, err, state / "versions" / "0001" / "model.safetensors", "architecture")
    assert tree_hash(state) == before


def foreign_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))


@pytest.mark.parametrize("damage", ["truncated", "foreign", "empty", "garbage"])
def test_broken_weights_file_is_refused(state, capsys, damage):
    """If this fails, a damaged or foreign model.safetensors crashes the loader (or loads)."""
    w = state / "versions" / "0001" / "model.safetensors"
    if damage == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "foreign":
        foreign_safetensors(w)
    elif damage == "empty":
        w.write_bytes(b"")
    else:
        w.write_bytes(b"\xff" * 64 + b"PK\x03\x04 not safetensors")
    before = tree_hash(state)
    rc, _, err = run(capsys, "export", "--state", state, "--no-engine")
    refused(rc, err, w)
    assert tree_hash(state) == before


def test_garbage_onnx_is_refused_by_classify(tmp_path, gen_test, capsys):
    """If this fails, `classify --model` on a file that is not ONNX shows a protobuf traceback."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07garbage" + bytes(range(256)) * 4)
    img = tmp_path / "x.png"
    img.write_bytes(encoded(gen_test, "PNG"))
    rc, _, err = run(capsys, "classify", img, "--model", model)
    refused(rc, err, model)


def test_a_current_pointer_out_of_the_versions_dir_is_refused(state, capsys):
    """If this fails, a tampered `current` ('../../x') sends the loader outside the state."""
    (state / "current").write_text("../../etc\n")
    before = tree_hash(state)
    rc, _, err = run(capsys, "export", "--state", state, "--no-engine")
    refused(rc, err, state / "current")
    assert tree_hash(state) == before


def test_a_missing_state_dir_is_one_line(tmp_path, capsys):
    rc, _, err = run(capsys, "export", "--state", tmp_path / "nowhere", "--no-engine")
    refused(rc, err, tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
