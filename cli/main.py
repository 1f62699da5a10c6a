"""`fieldlearn` console script: a thin dispatcher.

Each command lives in its own module with `add_arguments(parser)` and `run(args) -> int`,
and is imported only when it runs, so `fieldlearn classify` never imports the training
code (fieldlearn.device) and works on an inference-only device.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings

from fieldlearn.runtime.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fieldlearn.cli.commands.demo", "short class-incremental run on real data: LwM next to fine-tuning"),
    "init": ("fieldlearn.cli.commands.init", "train the base model (step 0) from a dataset into a state dir"),
    "learn": ("fieldlearn.cli.commands.learn", "add the classes of an ImageFolder directory to a state (one increment)"),
    "eval": ("fieldlearn.cli.commands.evaluate", "evaluate a state on a dataset's classes"),
    "explain": ("fieldlearn.cli.commands.explain", "PNG of teacher vs student attention maps for some images"),
    "export": ("fieldlearn.cli.commands.export", "write the current version as ONNX (+ labels, + TensorRT engine) and check parity"),
    "bench": ("fieldlearn.cli.commands.bench", "benchmarks: accuracy (LwM vs baselines vs joint upper bound on a class-incremental protocol)"),
    "history": ("fieldlearn.cli.commands.history", "list a state's versions with class counts and accuracies"),
    "rollback": ("fieldlearn.cli.commands.rollback", "make an earlier version current again (atomic)"),
    "prune": ("fieldlearn.cli.commands.prune", "delete all but the newest K versions (never the current one)"),
    "profile": ("fieldlearn.cli.commands.profile", "measure an increment's peak memory and plan a config that fits a budget (SIZE or Jetson preset)"),
    "classify": ("fieldlearn.runtime.classify", "top-k labels for images from an exported model (no training code needed)"),
    "watch": ("fieldlearn.cli.commands.watch", "daemon: learn class folders that arrive in an inbox, serve the new model"),
    "capture": ("fieldlearn.cli.commands.capture", "grab N camera frames into INBOX/LABEL/ for watch"),
    "fleet": ("fieldlearn.fleet.command", "fleet serve (the hub) / fleet join (a device): merge what many devices learned, exactly, over Flower"),
    "doctor": ("fieldlearn.cli.commands.doctor", "what this device has and what fieldlearn will use; how to fix what is missing"),
}

# Commands that write a state dir run holding STATE/lock (fieldlearn.store.versions.state_lock).
LOCKED = {"init", "learn", "export", "rollback", "prune"}


def _state_lock(name: str, args: argparse.Namespace):
    if name not in LOCKED or getattr(args, "state", None) is None:
        return contextlib.nullcontext()
    if name == "init":   # under torchrun, rank 0 holds the lock for the whole job (it alone writes)
        from fieldlearn.device.distributed import world_from_env  # noqa: PLC0415

        world = world_from_env()
        if world is not None and not world.main:
            return contextlib.nullcontext()
    from fieldlearn.store.versions import state_lock  # noqa: PLC0415 - classify must not import device

    return state_lock(args.state, f"fieldlearn {name}", create=name == "init")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fieldlearn COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "fieldlearn COMMAND --help shows a command's options."]
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (`fieldlearn learn: error: argument --epochs:
    ...`), exit 2, like every other refusal; --help still prints the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from fieldlearn.runtime.metadata import fieldlearn_version  # noqa: PLC0415

        print(f"fieldlearn {fieldlearn_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fieldlearn: error: unknown command '{name}' (see fieldlearn --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = OneLineParser(prog=f"fieldlearn {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    try:
        args = parser.parse_args(rest)  # a bad argument: one line (OneLineParser), exit 2
    except SystemExit as e:             # (--help: 0) returned, so that in-process callers get a code
        return e.code if isinstance(e.code, int) else 2
    warnings.formatwarning = lambda msg, *_, **__: f"fieldlearn {name}: warning: {msg}\n"
    try:
        with _state_lock(name, args):
            return int(module.run(args) or 0)
    except UserError as e:
        print(f"fieldlearn {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fieldlearn {name}: interrupted; nothing saved was changed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
