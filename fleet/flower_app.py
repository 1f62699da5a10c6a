"""The fleet as a Flower app: a ServerApp on the hub, a ClientApp on each device, each a thin
adapter over the library (contribution, merge, take, wire). Flower carries the messages.

One round:
    hub    --query.contribute-->  every connected device   (ClientApp: make_contribution)
    hub    <-- contribution ---   (or a one-line error; no reply by the round timeout: left out)
    hub    merge_round under the hub's state lock -> one new hub version, or none
    hub    --query.take (the fleet's version, the device's refusal if any)--> each device that replied
    device take under its state lock -> its new version; fleet-status.json says so
    hub    --query.done--> every device: the round is over (a device must stay connected until
           the hub has pulled its take reply, or the reply is lost with the connection)

Run config (`fieldlearn fleet serve` sets it; fleet.processes): hub-state, min-devices,
wait-s, round-timeout-s, rounds, export, result-file. Node config (`fieldlearn fleet join`):
state, device.

Flower starts one process per message on a device: the handlers import the learner (torch)
only where they need it, so the end-of-round note costs no torch import.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fieldlearn.store.versions import state_lock
from fieldlearn.runtime.atomic import write_text
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import FLEET_STATUS

DONE_TIMEOUT_S = 5.0     # the end-of-round note's replies are not needed: the devices go as they read it

server = ServerApp()
client = ClientApp()


def _say(line: str) -> None:
    print(f"fieldlearn fleet: {line}", flush=True)


def _error_reply(line: str, reply_to: Message) -> Message:
    return Message(RecordDict({"error": ConfigRecord({"line": line})}), reply_to=reply_to)


def _error_of(m: Message) -> str | None:
    """The one line a device answered instead of its content, or Flower's error, or None."""
    if m.has_error():
        return f"no reply ({m.error.reason})"
    if "error" in m.content:
        return str(m.content["error"]["line"])
    return None


# ---------------------------------------------------------------------------- the hub

def _wait_for_devices(grid: Grid, n: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def run_round(grid: Grid, hub: Path, *, min_devices: int, wait_s: float, timeout_s: float, export: bool) -> dict:
    """One round (module docstring). -> its summary: version, merged, refused, took, missing."""
    from fieldlearn.fleet.contribution import Refused
    from fieldlearn.fleet.merge import merge_round
    from fieldlearn.fleet.wire import contribution_from_record, model_to_record

    nodes = _wait_for_devices(grid, min_devices, wait_s)
    if len(nodes) < min_devices:
        raise UserError(f"{len(nodes)} device(s) joined within {wait_s:g} s; --min-devices is {min_devices}")
    _say(f"asking {len(nodes)} device(s) for what they learned")
    asks = [Message(RecordDict({"round": ConfigRecord({"hub": str(hub)})}), dst_node_id=n,
                    message_type="query.contribute") for n in nodes]
    replies = list(grid.send_and_receive(asks, timeout=timeout_s))
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in asks}   # (an error reply comes from the link)
    got = {}                                                    # node -> (Contribution, the id it sent)
    refused: dict[str, str] = {}
    for r in replies:
        node = node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
        err = _error_of(r)
        try:
            if err is not None:
                raise Refused(f"node {node}: {err}")
            got[node] = contribution_from_record(r.content, f"node {node}")
        except Refused as e:
            refused[f"node {node}"] = str(e)
            _say(f"left out: {e}")
    missing = sorted(set(nodes) - {node_of.get(r.metadata.reply_to_message_id) for r in replies})
    for n in missing:
        _say(f"left out: node {n} sent nothing within {timeout_s:g} s")
    with state_lock(hub, "fieldlearn fleet serve"):
        result = merge_round(hub, list(got.values()), export=export, log=_say)
    refused.update(result.refused)
    model = model_to_record(result.model)
    sends = []
    for node, (c, _) in got.items():
        content = RecordDict({"stats": model["stats"], "meta": model["meta"],
                              "verdict": ConfigRecord({"refused": result.refused.get(c.device, "")})})
        sends.append(Message(content, dst_node_id=node, message_type="query.take"))
    took = {}
    for r in grid.send_and_receive(sends, timeout=timeout_s) if sends else []:
        node = {m.metadata.message_id: m.metadata.dst_node_id for m in sends}.get(r.metadata.reply_to_message_id)
        err = _error_of(r)
        took[str(node)] = err or str(r.content["took"]["version"])
        _say(f"node {node}: " + (f"did not take the fleet's version: {err}" if err else
                                 f"took the fleet's version as {r.content['took']['version']}"))
    # the devices stay connected until the hub has their take replies; then they may go
    done = [Message(RecordDict({"done": ConfigRecord({"hub_version": result.model.hub_version})}), dst_node_id=n,
                    message_type="query.done") for n in nodes]
    list(grid.send_and_receive(done, timeout=DONE_TIMEOUT_S))
    return {"hub_version": result.model.hub_version, "published": result.published, "merged": result.merged,
            "counted_before": result.counted_before, "refused": refused, "missing": [str(n) for n in missing],
            "took": took}


@server.main()
def _serve(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    hub = Path(str(cfg["hub-state"]))
    rounds = []
    try:
        for i in range(int(cfg["rounds"])):
            _say(f"round {i + 1} of {cfg['rounds']}")
            rounds.append(run_round(grid, hub, min_devices=int(cfg["min-devices"]), wait_s=float(cfg["wait-s"]),
                                    timeout_s=float(cfg["round-timeout-s"]), export=bool(cfg["export"])))
        outcome = {"ok": True, "rounds": rounds}
    except UserError as e:
        outcome = {"ok": False, "error": str(e), "rounds": rounds}
    if cfg.get("result-file"):
        write_text(Path(str(cfg["result-file"])), json.dumps(outcome, indent=2))


# ---------------------------------------------------------------------------- a device

def _device(context: Context) -> tuple[Path, str]:
    return Path(str(context.node_config["state"])), str(context.node_config["device"])


@client.query("contribute")
def _contribute(msg: Message, context: Context) -> Message:
    from fieldlearn.fleet.contribution import make_contribution
    from fieldlearn.fleet.wire import contribution_to_record

    state, device = _device(context)
    try:
        c = make_contribution(state, device)
    except UserError as e:
        return _error_reply(f"device {device!r}: {e}", msg)
    rd = contribution_to_record(c)
    context.state["sent"] = rd["stats"]
    context.state["sent-meta"] = rd["meta"]
    return Message(rd, reply_to=msg)


@client.query("take")
def _take(msg: Message, context: Context) -> Message:
    from fieldlearn.fleet.take import take
    from fieldlearn.fleet.wire import contribution_from_record, model_from_record

    state, device = _device(context)
    sent = None
    if "sent" in context.state:
        sent, _ = contribution_from_record(RecordDict({"stats": context.state["sent"],
                                                      "meta": context.state["sent-meta"]}), device)
    try:
        model = model_from_record(msg.content)
        verdict = str(msg.content["verdict"]["refused"])
        with state_lock(state, "fieldlearn fleet join"):
            vd = take(state, device, model, None if verdict else sent, log=_say)
    except UserError as e:
        return _error_reply(f"device {device!r}: {e}", msg)
    _status(state, "took", hub_version=model.hub_version, version=vd.name, refused=verdict)
    return Message(RecordDict({"took": ConfigRecord({"version": vd.name, "refused": verdict})}), reply_to=msg)


@client.query("done")
def _done(msg: Message, context: Context) -> Message:
    """The hub has every reply of the round: `fieldlearn fleet join` may disconnect."""
    state, _ = _device(context)
    _status(state, "done", hub_version=str(msg.content["done"]["hub_version"]))
    return Message(RecordDict({"done": ConfigRecord({})}), reply_to=msg)


def _status(state: Path, what: str, **fields) -> None:
    """STATE/fleet-status.json: the last thing the fleet did on this device (join reads it)."""
    write_text(state / FLEET_STATUS, json.dumps({"state": what, "time": time.time(), "pid": os.getpid(), **fields}))


__all__ = ["client", "run_round", "server"]
