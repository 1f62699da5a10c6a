"""`fieldlearn init` under torchrun (issue 23, item 8): two processes on the CPU with the
gloo backend, on 127.0.0.1, train one base together (fieldlearn.device.distributed).

What would be wrong if a test here failed:
- the job does not finish, or writes no version, or more than one (a rank other than 0
  publishing too);
- the version is not the one a single process writes (other files, other meta), so that
  `load_state`, `learn`, the fleet or the export cannot take it;
- the statistics count half the base images (a rank's share instead of all of them): the
  heads solved from them would be another model than the one the base promises;
- the ranks' weights drift apart (the gradients not averaged by DistributedDataParallel):
  DdpStep.finish stops the job, and nothing is saved.
No multi-GPU machine runs this here: nccl on CUDA is the same code with another backend.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fieldlearn.cli.main import main
from fieldlearn.device.data import MIN_IMAGES
from fieldlearn.device.distributed import world_from_env
from fieldlearn.store.state import load_state
from fieldlearn.runtime.layout import META, current_version_dir, version_names

from ..conftest import ROOT, write_image_folder

TINY = ["--width", "0.35", "--variant", "cifar", "--input-size", "32", "--no-pretrained", "--freeze-blocks", "10",
        "--base-epochs", "1", "--batch-size", "8", "--no-progress", "--num-threads", "1"]
BASE, NEW = [0, 1, 2], [3, 4]
PER_CLASS = 21          # 3 x 21 = 63 images: the rows do not split evenly over 2 ranks


def _gloo() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _gloo(), reason="this torch has no torch.distributed with gloo")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(gen_train, tmp_path_factory):
    """(state, new-class folder, torchrun's output, seconds): init on 2 processes."""
    root = tmp_path_factory.mktemp("ddp")
    base = write_image_folder(root / "base", gen_train, BASE, PER_CLASS)
    new = write_image_folder(root / "new", gen_train, NEW, 12)
    state = root / "hub"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "fieldlearn.cli", "init", "--data", str(base), "--state", str(state), *TINY]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    return state, new, out, seconds


def test_torchrun_init_writes_one_version_in_the_usual_format(ddp_run, gen_train, tmp_path):
    """If this fails, a hub that trains its base on several GPUs gets no version, two, or one
    that other tools cannot read as they read a one-process base."""
    state, _, out, seconds = ddp_run
    print(f"torchrun init, 2 processes: {seconds:.1f} s")
    assert "distributed base training: 2 processes" in out
    assert out.count("saved ") == 1, out                 # rank 0 alone publishes (and speaks)
    assert version_names(state) == ["0001"]
    one = tmp_path / "one"
    assert main(["init", "--data", str(ddp_run[1].parent / "base"), "--state", str(one), *TINY]) == 0
    files = lambda s: sorted(p.name for p in current_version_dir(s).iterdir())   # noqa: E731
    assert files(state) == files(one)
    meta = lambda s: json.loads((current_version_dir(s) / META).read_text())       # noqa: E731
    a, b = meta(state), meta(one)
    assert a.keys() == b.keys() and a["config"] == b["config"] and a["classes"] == b["classes"]
    assert a["history"][0].keys() == b["history"][0].keys()


def test_the_statistics_count_every_base_image_once(ddp_run):
    """If this fails, the distributed base formed its class statistics from one rank's share
    of the images (half here), or from some twice."""
    st = load_state(ddp_run[0])
    counts = st.student.stats.counts
    assert counts.tolist() == [float(PER_CLASS)] * len(BASE)
    assert st.meta["history"][0]["n_images"] == PER_CLASS * len(BASE)
    assert torch.isfinite(st.student.classifier.weight).all() and st.student.stats.temperature != 1.0


def test_the_distributed_base_learns_new_classes_like_any_other(ddp_run, capsys):
    """If this fails, `fieldlearn learn` cannot build on a base trained under torchrun."""
    state, new, _, _ = ddp_run
    assert main(["learn", str(new), "--state", str(state), "--no-progress", "--num-threads", "1"]) == 0
    st = load_state(state)
    assert st.step == 1 and len(st.classes) == len(BASE) + len(NEW)
    assert st.student.stats.counts[:len(BASE)].tolist() == [float(PER_CLASS)] * len(BASE)
    assert st.student.stats.counts[len(BASE):].min() >= MIN_IMAGES


def test_one_process_is_not_a_job():
    """If this fails, a plain `fieldlearn init` (or torchrun with one process) would open a
    process group and change what it trains."""
    assert world_from_env({}) is None
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    w = world_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (w.rank, w.size, w.local_rank, w.main) == (2, 4, 0, False)


def test_the_shares_cover_every_image_and_are_of_equal_length():
    """If this fails, some base images train on no rank (a share dropped or cut short), or
    the ranks make different numbers of optimiser steps and the job hangs in an all-reduce."""
    from fieldlearn.device.distributed import DdpStep, World

    for n, size in ((57, 2), (10, 3), (3, 4)):
        shares = [DdpStep(World(rank=r, size=size, local_rank=r)).shard(n, seed=7) for r in range(size)]
        assert len({len(s) for s in shares}) == 1
        assert set(torch.cat(shares).tolist()) == set(range(n))
