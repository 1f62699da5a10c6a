"""`fieldlearn fleet serve --state HUB ...` and `fieldlearn fleet join --state DEVICE --server ADDR ...`.

serve: the hub. It starts Flower's SuperLink, runs the fleet's rounds (each merges what the
connected devices learned and publishes it as the hub's next version) and stops.
join: a device. It connects to the hub, sends what it learned since it last synced, takes
the fleet's version into its own store and stops (docs/FLEET.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fieldlearn.device.config import Valid
from fieldlearn.cli.flags import option
from fieldlearn.fleet.processes import JoinConfig, ServeConfig, Tls, join, serve, split_address
from fieldlearn.runtime.errors import UserError


def _file(p: str) -> Path:
    path = Path(p)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{p}: no such file")
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="serve|join")
    s = sub.add_parser("serve", help="the hub: merge what the devices learned, publish it as a new version")
    d = ServeConfig()
    s.add_argument("--state", required=True, type=Path, help="the hub's state directory (holds the fleet's base)")
    s.add_argument("--address", default=d.address, help=f"HOST:PORT devices connect to (default {d.address})")
    s.add_argument("--min-devices", type=option(int, Valid(1, 10_000)), default=d.min_devices,
                   help=f"a round waits for this many devices (default {d.min_devices})")
    s.add_argument("--wait", type=option(float, Valid(0.0, 86_400.0)), default=d.wait_s, metavar="S",
                   help=f"... for at most S seconds (default {d.wait_s:g})")
    s.add_argument("--round-timeout", type=option(float, Valid(1.0, 86_400.0)), default=d.round_timeout_s,
                   metavar="S", help=f"a device that has not replied in S seconds is left out of the round "
                                     f"(default {d.round_timeout_s:g})")
    s.add_argument("--rounds", type=option(int, Valid(1, 10_000)), default=d.rounds, help="rounds to run (default 1)")
    s.add_argument("--export", action=argparse.BooleanOptionalAction, default=d.export,
                   help="write each hub version's model.onnx + labels.txt (default: on)")
    s.add_argument("--ssl-certfile", type=_file, help="the hub's TLS certificate (with --ssl-keyfile, --ssl-ca-certfile)")
    s.add_argument("--ssl-keyfile", type=_file, help="the hub's TLS private key")
    s.add_argument("--ssl-ca-certfile", type=_file, help="the CA certificate that signed the hub's certificate")
    s.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    s.add_argument("--node-auth", action="store_true",
                   help="only devices whose public key is registered with the hub connect (Flower's SuperNode "
                        "authentication; needs TLS)")
    s.add_argument("--register", type=_file, action="append", default=[], metavar="PUBKEY",
                   help="with --node-auth: a device's public key (ssh-keygen -t ecdsa -b 384), repeatable")
    j = sub.add_parser("join", help="a device: send what it learned, take the fleet's version")
    dj = JoinConfig()
    j.add_argument("--state", required=True, type=Path, help="this device's state directory")
    j.add_argument("--server", required=True, help="the hub's HOST:PORT")
    j.add_argument("--device", default=None, help="this device's name in the fleet, unique in it (default: the host "
                                                  "name and 8 hex digits of /etc/machine-id)")
    j.add_argument("--rounds", type=option(int, Valid(0, 10_000)), default=dj.rounds,
                   help="stop after taking the fleet's version this often (0: stay connected; default 1)")
    j.add_argument("--timeout", type=option(float, Valid(1.0, 1e7)), default=dj.timeout_s, metavar="S",
                   help=f"give up after S seconds (default {dj.timeout_s:g})")
    j.add_argument("--root-certificates", type=_file, help="the CA certificate the hub's TLS certificate is checked with")
    j.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    j.add_argument("--auth-private-key", type=_file, help="this device's private key (node authentication)")


def _stop_on_sigterm() -> None:
    """SIGTERM (systemd, kill) ends the command through its clean-up: the Flower processes it
    started are stopped, its work folder removed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def run(args: argparse.Namespace) -> int:
    if args.action == "serve":
        tls = Tls(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
        given = [x is not None for x in (tls.certfile, tls.keyfile, tls.ca_certfile)]
        if any(given) and not all(given):
            raise UserError("--ssl-certfile, --ssl-keyfile and --ssl-ca-certfile go together")
        if not any(given) and not args.insecure:
            raise UserError("no TLS: give --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile, or --insecure "
                            "(loopback tests only)")
        if args.node_auth and tls.insecure:
            raise UserError("--node-auth needs TLS (--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile)")
        if args.register and not args.node_auth:
            raise UserError("--register: only with --node-auth")
        if not (args.state / "current").is_file():
            raise UserError(f"--state {args.state}: holds no model (fieldlearn init --state {args.state} ...)")
        cfg = ServeConfig(address=args.address, min_devices=args.min_devices, wait_s=args.wait,
                          round_timeout_s=args.round_timeout, rounds=args.rounds, export=args.export,
                          node_auth=args.node_auth, register=args.register, tls=tls)
        split_address(args.address)
        _stop_on_sigterm()
        out = serve(args.state, cfg)
        for i, r in enumerate(out["rounds"], 1):
            print(f"round {i}: hub version {r['hub_version']}" + (" (new)" if r["published"] else " (unchanged)")
                  + f"; merged {', '.join(r['merged']) or 'nothing'}"
                  + (f"; counted before {', '.join(r['counted_before'])}" if r["counted_before"] else "")
                  + (f"; refused {len(r['refused'])}" if r["refused"] else "")
                  + (f"; no reply from {len(r['missing'])}" if r["missing"] else ""))
        if not out["ok"]:
            raise UserError(out["error"])
        return 0
    if args.root_certificates is None and not args.insecure:
        raise UserError("no TLS: give --root-certificates, or --insecure (loopback tests only)")
    if not (args.state / "current").is_file():
        raise UserError(f"--state {args.state}: holds no model (copy the hub's base version to it first)")
    cfg = JoinConfig(server=args.server, rounds=args.rounds, timeout_s=args.timeout,
                     root_certificates=args.root_certificates, auth_private_key=args.auth_private_key,
                     **({"device": args.device} if args.device else {}))
    _stop_on_sigterm()
    join(args.state, cfg)
    return 0
