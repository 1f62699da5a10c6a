"""Shared fixtures: small generated and real data, tiny configs, so the suite stays fast on 2 cores.

`gen_train` / `gen_test` (tests/synthetic.py) are generated on the spot: every test whose
promise does not depend on accuracy on real photographs uses them, so it runs on any clone.
`cifar_train`, `cifar_test` and `fashion` are real data and skip where it is absent; with
FIELDLEARN_TEST_NO_SHARED_DATA=1 they always skip (as on a clone without ../shared/data),
which shows which tests still need the shared folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
CIFAR_DIR = SHARED_DATA / "cifar-100-binary"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
if os.environ.get("FIELDLEARN_TEST_NO_SHARED_DATA") == "1":
    CIFAR_DIR = FASHION_DIR = Path("/nonexistent/fieldlearn-test-no-shared-data")

# pytest-xdist (the README's `-n 2`): each worker is one process on one core, so torch gets
# one thread there, and its own cache folder.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
os.environ.setdefault("FIELDLEARN_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"fieldlearn-test-cache{WORKER}"))
if WORKER:
    import torch

    torch.set_num_threads(1)

    @pytest.fixture(autouse=True)
    def _one_torch_thread_per_worker():
        """A test that runs a command with --num-threads 2 leaves torch at 2 threads: on a
        worker beside another, the rest of its tests would run 3 threads on 2 cores (the
        user path test beside one busy core: 295 s on 2 threads, 192 s on 1)."""
        yield
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)


def tiny_config(**train):
    """A narrow, random-init CIFAR-variant net: fast, deterministic, for plumbing tests."""
    from fieldlearn.device.config import ModelConfig, RunConfig, TrainConfig

    t = dict(epochs=1, base_epochs=1, batch_size=16, progress=False, seed=0)
    t.update(train)
    return RunConfig(model=ModelConfig(width=0.35, variant="cifar", input_size=32, pretrained=False,
                                       freeze_blocks=10), train=TrainConfig(**t))


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def gen_train():
    """Generated data (tests/synthetic.py): 100 classes of 100 images, 32 x 32; always present."""
    from tests.synthetic import make_image_set

    return make_image_set(seed=0)


@pytest.fixture(scope="session")
def gen_test():
    """Other images of gen_train's classes."""
    from tests.synthetic import make_image_set

    return make_image_set(seed=1)


@pytest.fixture(scope="session")
def cifar_train():
    """CIFAR-100 training split from ../shared/data (skips where absent)."""
    if not (CIFAR_DIR / "train.bin").is_file():
        pytest.skip(f"CIFAR-100 not found at {CIFAR_DIR}")
    from fieldlearn.device.data import load_cifar100

    return load_cifar100(CIFAR_DIR, "train")


@pytest.fixture(scope="session")
def cifar_test():
    if not (CIFAR_DIR / "test.bin").is_file():
        pytest.skip(f"CIFAR-100 not found at {CIFAR_DIR}")
    from fieldlearn.device.data import load_cifar100

    return load_cifar100(CIFAR_DIR, "test")


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST (train, test) from Debian's dataset-fashion-mnist (skips where absent)."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
    from fieldlearn.device.data import load_fashion_mnist

    return load_fashion_mnist(FASHION_DIR, "train"), load_fashion_mnist(FASHION_DIR, "test")


def write_image_folder(root: Path, data, classes: list[int], per_class: int, fmt: str = "png") -> Path:
    """Write the first `per_class` images of `classes` from an ImageSet as ROOT/<name>/<i>.<fmt>."""
    import numpy as np
    from PIL import Image

    labels = data.labels.numpy()
    for c in classes:
        d = root / data.class_names[c]
        d.mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(np.flatnonzero(labels == c)[:per_class]):
            Image.fromarray(data.images[idx].permute(1, 2, 0).numpy()).save(d / f"{i:04d}.{fmt}")
    return root


def pytest_collection_modifyitems(config, items):
    """Modules holding a `slow` test run first, in their own order: pytest-xdist hands tests
    out in collection order, and a long test left to the end runs alone on one core while
    the other idles (CI's wall time). Whole modules move, so module fixtures are built once."""
    slow = {it.module for it in items if it.get_closest_marker("slow")}
    items.sort(key=lambda it: it.module not in slow)


def pytest_configure(config):
    """Under pytest-xdist, hand tests out one or two at a time (not xdist's first chunks of a
    quarter of the suite each, which would put every slow module, sorted first, on one
    worker): the slow ones spread over both workers and the short ones fill in around them."""
    if getattr(config.option, "maxschedchunk", "absent") is None:
        config.option.maxschedchunk = 1
