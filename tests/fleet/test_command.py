"""`fieldlearn fleet serve|join`: a bad argument is one line naming it, exit 2, before any
Flower process starts and with nothing saved touched."""

from __future__ import annotations

import contextlib
import io

import pytest

from fieldlearn.cli.main import main
from fieldlearn.runtime.layout import version_names


def run(argv) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue().strip().splitlines()


@pytest.mark.parametrize("argv, says", [
    (["serve", "--state", "{hub}"], "no TLS: give --ssl-certfile"),
    (["serve", "--state", "{hub}", "--insecure", "--min-devices", "0"], "argument --min-devices"),
    (["serve", "--state", "{hub}", "--insecure", "--address", "nowhere"], "--address nowhere: expected HOST:PORT"),
    (["serve", "--state", "{hub}", "--insecure", "--node-auth"], "--node-auth needs TLS"),
    (["serve", "--state", "{hub}", "--insecure", "--register", "{hub}/current"], "--register: only with --node-auth"),
    (["serve", "--state", "{empty}", "--insecure"], "holds no model"),
    (["serve", "--state", "{hub}", "--ssl-certfile", "{hub}/missing.crt"], "argument --ssl-certfile"),
    (["join", "--state", "{hub}", "--server", "127.0.0.1:1"], "no TLS: give --root-certificates"),
    (["join", "--state", "{hub}", "--server", "127.0.0.1:1", "--insecure", "--timeout", "0"], "argument --timeout"),
    (["join", "--state", "{empty}", "--server", "127.0.0.1:1", "--insecure"], "holds no model"),
    (["join", "--state", "{hub}"], "the following arguments are required: --server"),
])
def test_a_bad_fleet_argument_is_one_line_exit_2(fleet, tmp_path, argv, says):
    """If this fails, a typo in a fleet command starts Flower processes, prints a traceback, or
    says nothing of what is wrong."""
    hub = fleet[1]
    (tmp_path / "empty").mkdir()
    before = version_names(hub)
    rc, lines = run(["fleet", *[a.format(hub=hub, empty=tmp_path / "empty") for a in argv]])
    assert rc == 2 and len(lines) == 1 and says in lines[0], lines
    assert version_names(hub) == before
