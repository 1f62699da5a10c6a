"""TLS and node authentication as Flower provides them, on loopback: a device whose public key
the hub registered merges; a device without the fleet's credentials is refused at connection,
in bounded time, and merges nothing."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("flwr")

from fieldlearn.store.state import load_state  # noqa: E402
from fieldlearn.fleet.processes import free_port  # noqa: E402
from fieldlearn.runtime.layout import current_version_name  # noqa: E402
from tests.fleet.credentials import node_key, tls  # noqa: E402
from tests.fleet.test_loopback import cli, kill_group  # noqa: E402


@pytest.mark.slow
def test_an_unregistered_device_is_refused_and_a_registered_one_merges(fleet, tmp_path):
    """If this fails, the hub accepts a device without the fleet's credentials (anyone who can
    reach the port could send statistics into the fleet's model), or TLS with node
    authentication keeps out the fleet's own devices."""
    dirs, pristine, _, _ = fleet
    shutil.copytree(pristine, tmp_path / "hub")
    shutil.copytree(dirs["a"], tmp_path / "a")
    shutil.copytree(dirs["b"], tmp_path / "x")
    x_before = current_version_name(tmp_path / "x")
    creds = tmp_path / "creds"
    creds.mkdir()
    t = tls(creds)
    a_key, a_pub = node_key(creds, "a")
    x_key, _ = node_key(creds, "x")                                   # never registered
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    try:
        serve = cli("serve", "--state", str(tmp_path / "hub"), "--address", f"127.0.0.1:{port}",
                    "--ssl-certfile", str(t["cert"]), "--ssl-keyfile", str(t["key"]), "--ssl-ca-certfile", str(t["ca"]),
                    "--node-auth", "--register", str(a_pub), "--min-devices", "1", "--wait", "90",
                    "--round-timeout", "45", "--no-export", env=env)
        procs.append(serve)
        first = serve.stdout.readline()                               # the hub is up, a's key registered
        assert "hub listening" in first, first + serve.stdout.read()
        common = ["--server", f"127.0.0.1:{port}", "--root-certificates", str(t["ca"])]
        x = cli("join", "--state", str(tmp_path / "x"), *common, "--auth-private-key", str(x_key), "--device", "x",
                "--timeout", "120", env=env)
        a = cli("join", "--state", str(tmp_path / "a"), *common, "--auth-private-key", str(a_key), "--device", "a",
                "--timeout", "180", env=env)
        procs += [x, a]
        x_out = x.communicate(timeout=150)[0]
        a_out = a.communicate(timeout=200)[0]
        serve_out = first + serve.communicate(timeout=200)[0]
    finally:
        for p in procs:
            kill_group(p)
    assert x.returncode == 2 and "refused this device or cannot be reached" in x_out, x_out
    assert a.returncode == 0 and "took the fleet's version 0002" in a_out, a_out
    assert serve.returncode == 0 and "(TLS)" in serve_out and "merged a" in serve_out, serve_out
    assert load_state(tmp_path / "hub").classes == load_state(tmp_path / "a").classes
    assert current_version_name(tmp_path / "x") == x_before                    # nothing of it changed
