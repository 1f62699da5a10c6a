"""Readers for the layouts users hold, and the class-incremental splitter."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from fieldlearn.device.data import (class_order, incremental_split, load_cifar100, load_fashion_mnist,
                                    load_image_folder, open_dataset, to_input)
from fieldlearn.runtime.errors import UserError
from tests.conftest import CIFAR_DIR, write_image_folder


def test_cifar_binary_layout_matches_the_documented_statistics(cifar_train):
    assert cifar_train.images.shape == (50000, 3, 32, 32)
    assert len(cifar_train.class_names) == 100 and cifar_train.class_names[0] == "apple"
    mean = cifar_train.images[:5000].float().mean((0, 2, 3)) / 255
    torch.testing.assert_close(mean, torch.tensor([0.5071, 0.4865, 0.4409]), atol=0.01, rtol=0)


def test_cifar_python_layout_through_the_restricted_unpickler(tmp_path, gen_test):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    n = 20
    data = gen_test.images[:n].reshape(n, -1).numpy()
    with open(d / "test", "wb") as f:
        pickle.dump({"data": data, "fine_labels": gen_test.labels[:n].tolist()}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": gen_test.class_names}, f)
    got = load_cifar100(tmp_path, "test")
    assert torch.equal(got.images, gen_test.images[:n])
    assert got.class_names == gen_test.class_names


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "test").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(UserError, match="not allowed"):
        load_cifar100(tmp_path, "test")


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx(tmp_path):
    imgs = np.random.RandomState(0).randint(0, 255, (7, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(7) % 10)
    got = load_fashion_mnist(tmp_path, "test")
    assert got.images.shape == (7, 3, 28, 28)
    assert torch.equal(got.images[:, 0], torch.from_numpy(imgs.astype(np.uint8)))
    assert got.labels.tolist() == list(range(7))


def test_truncated_idx_is_one_clear_error(tmp_path):
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 5, 28, 28) + b"\0" * 100)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(UserError, match="truncated"):
        load_fashion_mnist(tmp_path, "test")


def test_image_folder_with_train_and_val_splits(tmp_path, gen_test):
    write_image_folder(tmp_path / "train", gen_test, [3, 7], 4)
    write_image_folder(tmp_path / "val", gen_test, [3, 7], 2)
    tr = open_dataset(str(tmp_path), "train", image_size=32)
    te = open_dataset(str(tmp_path), "test", image_size=32)
    assert tr.class_names == sorted([gen_test.class_names[3], gen_test.class_names[7]])
    assert len(tr) == 8 and len(te) == 4
    first = gen_test.images[(gen_test.labels == 3).nonzero()[0, 0]]
    idx = tr.class_names.index(gen_test.class_names[3])
    assert torch.equal(tr.images[tr.labels == idx][0], first), "PNG round trip is lossless at the same size"


def test_image_folder_without_class_folders_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no class folders"):
        load_image_folder(tmp_path, 32)


def test_splitter_and_class_order():
    order = class_order(100, 1993)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert order == class_order(100, 1993)
    groups = incremental_split(order, 50, 5)
    assert [len(g) for g in groups] == [50, 10, 10, 10, 10, 10]
    assert sorted(c for g in groups for c in g) == list(range(100))
    with pytest.raises(UserError, match="--steps"):
        incremental_split(order[:10], 8, 3)


def test_reorder_select_split(gen_test):
    order = [5, 2, 9]
    d = gen_test.reorder(order)
    assert d.class_names == [gen_test.class_names[c] for c in order]
    assert set(d.labels.tolist()) == {0, 1, 2} and len(d) == 300
    s = d.select([1], per_class=10)
    assert len(s) == 10 and set(s.labels.tolist()) == {1}
    a, b = d.split(0.2)
    assert len(a) == 240 and len(b) == 60
    assert torch.equal(torch.bincount(b.labels), torch.tensor([20, 20, 20]))


def test_to_input_resizes_and_normalises():
    x = torch.full((2, 3, 28, 28), 255, dtype=torch.uint8)
    y = to_input(x, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert y.shape == (2, 3, 32, 32)
    torch.testing.assert_close(y, torch.ones_like(y))


def test_shared_data_location_is_used_by_default():
    if not (CIFAR_DIR / "test.bin").is_file():
        pytest.skip("no ../shared/data")
    assert len(open_dataset(f"cifar100:{CIFAR_DIR}", "test")) == 10000


def test_nothing_in_an_image_folder_is_left_out_without_a_word(tmp_path, gen_test, recwarn):
    """If this fails, input is dropped silently (issue 14 item 4): a .gif or an extension-less
    JPEG is ignored (8 files train on 1), a hidden class folder, a sub-folder, a FIFO or a
    symlink loop vanishes. Decision: every non-hidden regular file is offered to the decoder;
    what is left out is reported in ONE line with counts by reason and the first names."""
    import os

    from PIL import Image

    from fieldlearn.device.data import SkippedInput

    root = write_image_folder(tmp_path / "new", gen_test, [3], 5)
    folder = root / gen_test.class_names[3]
    img = Image.fromarray(gen_test.images[0].permute(1, 2, 0).numpy())
    img.save(folder / "anim.gif")
    img.save(folder / "no-extension", "JPEG")
    os.mkfifo(folder / "camera.jpg")
    os.symlink("loop2.jpg", folder / "loop1.jpg")
    os.symlink("loop1.jpg", folder / "loop2.jpg")
    (folder / "sub").mkdir()
    write_image_folder(root / ".hidden-class", gen_test, [4], 2)
    (root / "README.txt").write_text("what these are")
    data = load_image_folder(root, 32)
    assert data.class_names == [gen_test.class_names[3]] and len(data) == 5 + 2   # the .gif and the JPEG too
    lines = [str(w.message) for w in recwarn if issubclass(w.category, SkippedInput)]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"{root}: skipped 6 of 13 entries: ") and "\n" not in line, line
    for part in ("2 symlink loop", "1 not a regular file", "camera.jpg: a FIFO (named pipe)", "1 hidden (.hidden-class)",
                 "1 sub-folder, not read", "1 not a class folder (README.txt: a regular file)"):
        assert part in line, (part, line)


def test_an_unlistable_class_folder_is_one_line(tmp_path, monkeypatch):
    """If this fails, a class folder the user cannot read ends in a PermissionError traceback
    (as root the permission bits do not stop us, so the listing is made to fail)."""
    import os

    (tmp_path / "root" / "tulip").mkdir(parents=True)
    real = os.scandir

    def denied(path="."):
        if str(path).endswith("tulip"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(UserError, match="tulip: cannot list this class folder \\(Permission denied\\)"):
        load_image_folder(tmp_path / "root", 32)


def test_eval_data_with_classes_the_model_does_not_know_says_so(recwarn):
    """If this fails, `fieldlearn eval --data` drops the images of classes the model does not
    know without a word (the accuracy then covers less than the user thinks)."""
    from fieldlearn.device.data import SkippedInput, report_unknown_classes

    report_unknown_classes(["a", "b", "c", "d"], ["a", "x"], "--data D")
    assert [str(w.message) for w in recwarn if issubclass(w.category, SkippedInput)] == [
        "--data D: 3 of its 4 classes are not known to the model and were not evaluated (b, c, d)"]


def test_a_per_class_sample_is_taken_from_the_file_lists_before_decoding(tmp_path, gen_test, monkeypatch, recwarn):
    """If this fails, an ImageFolder larger than one load is refused (or decoded whole) although
    only a per-class sample of it was asked for: `bench accuracy --data FOLDER` on 50,000
    training images. A sampled file that does not decode is reported and the next one taken."""
    import fieldlearn.device.data as data

    root = write_image_folder(tmp_path / "f", gen_test, [0, 1, 2], 12)
    (root / gen_test.class_names[1] / "0004.png").write_bytes(b"not a png")
    monkeypatch.setattr(data, "MAX_IMAGES", 20)                 # 36 files exceed it; 3 x 5 do not
    with pytest.raises(UserError, match="exceed the limit of one load"):
        data.load_image_folder(root, 32)
    read = []
    real = data.try_read
    monkeypatch.setattr(data, "try_read", lambda p, size: read.append(p) or real(p, size))
    got = data.load_image_folder(root, 32, per_class=5, seed=0)
    assert torch.bincount(got.labels).tolist() == [5, 5, 5]
    assert len(read) <= 3 * 5 + 1, f"{len(read)} files decoded for a sample of 15"
    again = data.load_image_folder(root, 32, per_class=5, seed=0)
    assert torch.equal(again.images, got.images), "the same seed takes the same sample"
    recwarn.clear()
    read.clear()
    other = data.load_image_folder(root, 32, per_class=5, seed=1)   # this seed reads apple0/0004.png among the first 5
    assert not torch.equal(other.images, got.images), "the sample is random, not the first files"
    assert str(root / gen_test.class_names[1] / "0004.png") in map(str, read)
    assert torch.bincount(other.labels).tolist() == [5, 5, 5], "the next file replaces an unreadable one"
    assert any("0004.png" in str(w.message) for w in recwarn.list), "a skipped file is reported"
