"""A fleet on loopback: `fieldlearn fleet serve` and four `fieldlearn fleet join` processes
over Flower (127.0.0.1 only), one device killed in the middle of the round.

What must hold afterwards:
- the hub's new version holds exactly the statistics the in-process merge of the same three
  devices gives (tests/fleet/conftest.py): Flower carried them without loss;
- each device that stayed ends with the merged classes and the hub's head, bit for bit;
- the killed device's state is as it was (loadable, current unchanged), nothing of it merged;
- no Flower process of the session outlives it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from fieldlearn.store.state import load_state  # noqa: E402
from fieldlearn.fleet.processes import free_port  # noqa: E402
from fieldlearn.runtime.layout import current_version_name  # noqa: E402
from tests.fleet.fleet_setup import class_images, learn  # noqa: E402

ROUND_TIMEOUT_S = 45


def cli(*args: str, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fieldlearn.cli.main", "fleet", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def processes_with(text: str) -> list[int]:
    """Pids whose command line contains `text`."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass


@pytest.mark.slow
def test_three_devices_merge_over_flower_and_one_killed_mid_round_is_left_out(fleet, data, tmp_path):
    """If this fails, the fleet does not work as a user runs it: the transport loses or changes
    statistics, a device does not end with the fleet's model, a device that dies mid-round
    blocks the round or gets half-merged, or Flower processes are left running."""
    dirs, pristine, _, merged_in_process = fleet
    root = tmp_path
    shutil.copytree(pristine, root / "hub")
    for d in ("a", "b", "c"):
        shutil.copytree(dirs[d], root / d)
    shutil.copytree(pristine, root / "k")
    learn(root / "k", class_images(data, {9: slice(0, 20)}))
    k_before = current_version_name(root / "k")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    lines: list[str] = []
    try:
        serve = cli("serve", "--state", str(root / "hub"), "--address", f"127.0.0.1:{port}", "--insecure",
                    "--min-devices", "4", "--wait", "120", "--round-timeout", str(ROUND_TIMEOUT_S), "--no-export",
                    env=env)
        procs.append(serve)
        reader = threading.Thread(target=lambda: lines.extend(serve.stdout), daemon=True)
        reader.start()
        joins = {d: cli("join", "--state", str(root / d), "--server", f"127.0.0.1:{port}", "--insecure",
                        "--device", d, "--timeout", "240", env=env) for d in ("a", "b", "c", "k")}
        procs += joins.values()
        deadline = time.monotonic() + 200
        while not any("asking 4 device(s)" in line for line in lines):          # the round has started
            assert time.monotonic() < deadline and serve.poll() is None, "".join(lines)
            time.sleep(0.2)
        for pid in processes_with(f"state=\"{root / 'k'}\""):                   # k's SuperNode: gone, mid-round
            os.kill(pid, signal.SIGKILL)
        assert serve.wait(240) == 0, "".join(lines)
        outs = {d: p.communicate(timeout=60)[0] for d, p in joins.items()}
    finally:
        for p in procs:
            kill_group(p)
    out = "".join(lines)
    assert "merged a, b, c" in out and "no reply from 1" in out, out
    for d in ("a", "b", "c"):
        assert joins[d].returncode == 0 and "took the fleet's version 0002" in outs[d], outs[d]
    assert joins["k"].returncode == 2 and "SuperNode ended" in outs["k"], outs["k"]
    hub = load_state(root / "hub")
    want = load_state(dirs["hub"])                                               # the in-process merge
    assert hub.classes == want.classes == merged_in_process.model.classes
    assert torch.equal(hub.student.stats.sums, want.student.stats.sums)
    assert torch.equal(hub.student.stats.gram, want.student.stats.gram)
    assert torch.equal(hub.student.stats.scatter, want.student.stats.scatter)
    assert torch.equal(hub.student.stats.votes, want.student.stats.votes)
    for d in ("a", "b", "c"):
        got = load_state(root / d)
        assert got.classes == hub.classes
        assert torch.equal(got.student.classifier.weight, hub.student.classifier.weight)
    assert current_version_name(root / "k") == k_before
    assert load_state(root / "k").classes[-1] == data.class_names[9]
    deadline = time.monotonic() + 20                                             # Flower's children follow their parents
    while processes_with(f"127.0.0.1:{port}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with(f"127.0.0.1:{port}") == []
