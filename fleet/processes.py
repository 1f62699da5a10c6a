"""The Flower processes behind `fieldlearn fleet serve` and `fieldlearn fleet join`.

    serve:  flower-superlink (the hub's one HTTP port: Fleet, Control and Runtime APIs)
            + `flwr run APP fleet` (submits the fleet app; the SuperLink starts its ServerApp)
            -> waits for the run to end, then stops the SuperLink
    join:   flower-supernode --superlink ADDR --node-config 'state=... device=...'
            -> waits until `rounds` rounds of the hub ended (fleet-status.json, written by the
               ClientApp) or `timeout_s` passed, then stops the SuperNode

Everything Flower writes (its config file, the installed app, logs) goes to a private work
folder (FLWR_HOME) that is removed at the end; every process is started in its own session
and stopped (SIGTERM, then SIGKILL) however the command ends. Flower's own children
(SuperExec, flwr-serverapp, flwr-clientapp) watch their parent's pid and end with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.files import read_text
from fieldlearn.runtime.layout import FLEET_STATUS

APP_MODULE = "fieldlearn_fleet_app"     # the app bundle's one module: it imports fieldlearn.fleet.flower_app
CONNECTION = "fleet"                    # the SuperLink connection's name in Flower's config file


@dataclass
class Tls:
    """TLS as Flower provides it: the hub's certificate and key, the CA devices verify it with.
    All None: insecure (loopback tests only)."""
    certfile: Path | None = None
    keyfile: Path | None = None
    ca_certfile: Path | None = None

    @property
    def insecure(self) -> bool:
        return self.ca_certfile is None


@dataclass
class ServeConfig:
    address: str = "127.0.0.1:9092"          # host:port of the SuperLink (devices connect here)
    min_devices: int = 1                     # a round waits for this many devices to connect
    wait_s: float = 60.0                     # ... for at most this long
    round_timeout_s: float = 120.0           # a device that has not replied by then is left out
    rounds: int = 1
    export: bool = True                      # each hub version with its checked model.onnx
    node_auth: bool = False                  # only SuperNodes whose public key is registered connect
    register: list[Path] = field(default_factory=list)   # the devices' public keys (OpenSSH EC keys)
    tls: Tls = field(default_factory=Tls)


def default_device() -> str:
    """host name + 8 hex of /etc/machine-id: two devices left at one stock host name stay two."""
    try:
        mid = Path("/etc/machine-id").read_text().strip()
    except OSError:
        mid = ""
    return f"{socket.gethostname()}-{hashlib.sha256(mid.encode()).hexdigest()[:8]}" if mid else socket.gethostname()


@dataclass
class JoinConfig:
    server: str = "127.0.0.1:9092"
    device: str = field(default_factory=default_device)      # this device's name in the fleet's ledger (unique)
    rounds: int = 1                                           # stop after taking the fleet's version this often (0: never)
    timeout_s: float = 600.0
    root_certificates: Path | None = None                     # the CA that signed the hub's certificate
    auth_private_key: Path | None = None                      # this SuperNode's key (node authentication)


def _bin(name: str) -> str:
    """A console script of the Python environment fieldlearn runs in (Flower's come with flwr)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise UserError(f"{name}: not found; install Flower with pip install 'fieldlearn[fleet]' (flwr)")
        return found
    return str(path)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, FLWR_HOME=str(home))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"   # Flower starts its own scripts
    return env


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--address {address}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the Flower process ended at start (exit {proc.returncode}); its log: "
                            + " ".join(read_text(log).split()[-40:]))
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise UserError(f"{host}:{port}: nothing listens after {timeout_s:g} s")


@contextmanager
def running(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """cmd as a process in its own session, stopped (its whole process group) on the way out."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_app(root: Path) -> Path:
    """The Flower app bundle's source: a pyproject naming the fleet's ServerApp and ClientApp."""
    app = root / "app"
    app.mkdir()
    (app / f"{APP_MODULE}.py").write_text("from fieldlearn.fleet import flower_app\n\n"
                                          "server = flower_app.server\nclient = flower_app.client\n")
    (app / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fieldlearn-fleet"
version = "1.0.0"
description = "fieldlearn fleet: devices merge the class statistics they learned"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fieldlearn"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server"
clientapp = "{APP_MODULE}:client"

[tool.flwr.app.config]
hub-state = ""
min-devices = 1
wait-s = 60.0
round-timeout-s = 120.0
rounds = 1
export = true
result-file = ""
""")
    return app


def _toml(v) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) else repr(v)


def _print(line: str) -> None:
    print(line, flush=True)


def serve(hub: Path, cfg: ServeConfig, say=_print) -> dict:
    """Run the hub for cfg.rounds rounds (module docstring). -> the ServerApp's outcome."""
    host, port = split_address(cfg.address)
    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)   # how this machine reaches its own hub
    hub = Path(hub).resolve()
    with workdir("fieldlearn-fleet-hub-") as root:
        home = root / "flwr"
        home.mkdir()
        conn = {"address": f"[{local}]:{port}" if ":" in local else f"{local}:{port}"}
        conn.update({"insecure": True} if cfg.tls.insecure else {"root-certificates": str(cfg.tls.ca_certfile)})
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                          + "".join(f"{k} = {_toml(v)}\n" for k, v in conn.items()))
        link = [_bin("flower-superlink"), "--host", host, "--port", str(port),
                "--disable-runtime-dependency-installation"]
        link += ["--insecure"] if cfg.tls.insecure else ["--ssl-certfile", str(cfg.tls.certfile), "--ssl-keyfile",
                                                        str(cfg.tls.keyfile), "--ssl-ca-certfile",
                                                        str(cfg.tls.ca_certfile)]
        link += ["--enable-supernode-auth"] if cfg.node_auth else []
        env = _env(home)
        result_file = root / "result.json"
        run_config = {"hub-state": str(hub), "min-devices": cfg.min_devices, "wait-s": float(cfg.wait_s),
                      "round-timeout-s": float(cfg.round_timeout_s), "rounds": cfg.rounds, "export": cfg.export,
                      "result-file": str(result_file)}
        with running(link, env, root / "superlink.log") as proc:
            wait_for_port(local, port, 60, proc, root / "superlink.log")
            for key in cfg.register:
                _register(key, env, root)
            say(f"hub listening on {host}:{port} ({'TLS' if not cfg.tls.insecure else 'insecure: loopback only'})"
                + (f"; {len(cfg.register)} device key(s) registered" if cfg.register else ""))
            app = write_app(root)
            budget = cfg.rounds * (cfg.wait_s + 2 * cfg.round_timeout_s + 300)
            cmd = [_bin("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config",
                   " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())]
            tail = _stream(cmd, env, root, budget, say)
        if not result_file.exists():
            raise UserError(f"the fleet's run ended without a result: {' '.join(' '.join(tail).split()[-60:])}")
        return json.loads(result_file.read_text())


def _register(key: Path, env: dict[str, str], cwd: Path) -> None:
    """Register a device's public key with the SuperLink (Flower's SuperNode authentication)."""
    r = subprocess.run([_bin("flwr"), "supernode", "register", str(key), CONNECTION], env=env, cwd=cwd,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise UserError(f"--register {key}: Flower refused it: {' '.join(r.stdout.split())[-300:]}")


def _stream(cmd: list[str], env: dict[str, str], cwd: Path, timeout_s: float, say) -> list[str]:
    """Run `flwr run ... --stream`, passing the ServerApp's own lines on as they come (a thread
    stops it at timeout_s). -> the last lines of its output (for an error)."""
    tag = "fieldlearn fleet: "
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    timer = threading.Timer(timeout_s, stop, [proc])
    timer.start()
    tail: list[str] = []
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-30:]
            if tag in line:
                say(line[line.index(tag) + len(tag):].rstrip())
        proc.wait()
    finally:
        timer.cancel()
        stop(proc)
    return tail


def _status(state: Path) -> dict:
    try:
        st = json.loads(read_text(state / FLEET_STATUS))
        return st if isinstance(st, dict) else {}
    except (OSError, ValueError):
        return {}


def join(state: Path, cfg: JoinConfig, say=_print) -> int:
    """Connect this device to the hub until cfg.rounds of its rounds ended (0: until killed).
    -> how often it took it (a round can end without: the hub refused it, or merged nothing new)."""
    state = Path(state).resolve()
    with workdir("fieldlearn-fleet-device-") as root:
        node_config = f"state={json.dumps(str(state))} device={json.dumps(cfg.device)}"
        cmd = [_bin("flower-supernode"), "--superlink", cfg.server, "--port", str(free_port()),
               "--node-config", node_config]
        cmd += ["--insecure"] if cfg.root_certificates is None else ["--root-certificates",
                                                                       str(cfg.root_certificates)]
        if cfg.auth_private_key is not None:
            cmd += ["--auth-supernode-private-key", str(cfg.auth_private_key)]
        (root / "flwr").mkdir()
        seen, took, rounds = _status(state).get("time"), 0, 0
        deadline = time.monotonic() + cfg.timeout_s
        with running(cmd, _env(root / "flwr"), root / "supernode.log") as proc:
            say(f"device {cfg.device!r} joined {cfg.server}")
            while cfg.rounds == 0 or rounds < cfg.rounds:
                if proc.poll() is not None:
                    raise UserError(f"the SuperNode ended (exit {proc.returncode}): the hub at {cfg.server} refused "
                                    "this device or cannot be reached (with --node-auth: is its public key "
                                    "registered? with TLS: the right --root-certificates?); Flower said: "
                                    + " ".join(read_text(root / "supernode.log").split()[-30:]))
                if time.monotonic() > deadline:
                    raise UserError(f"--timeout {cfg.timeout_s:g}: the hub at {cfg.server} ended no round in time "
                                    f"({rounds} of {cfg.rounds}; took its version {took} time(s))")
                st = _status(state)
                if st.get("time") != seen:
                    seen = st.get("time")
                    if st.get("state") == "took":
                        took += 1
                        say(f"took the fleet's version {st['hub_version']} as {st['version']}"
                            + (f" (its own contribution refused: {st['refused']})" if st.get("refused") else ""))
                    elif st.get("state") == "done":
                        rounds += 1
                time.sleep(0.3)
        return took


__all__ = ["JoinConfig", "ServeConfig", "Tls", "join", "serve", "write_app"]
