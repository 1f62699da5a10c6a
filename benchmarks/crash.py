"""Crash benchmark: SIGKILL `fieldlearn learn` / `export` / `watch --once` N times, count the damage.

    python benchmarks/crash.py [--kills 50] [--seed 0] [--timed-share 0.3] [--work DIR] [--verbose]
    python benchmarks/crash.py --every-event [--no-real-kills] [--commands learn,export,prune,rollback]

Each kill is a real SIGKILL of a child process running the ordinary CLI on a tiny config
(CIFAR-100 test images written as ImageFolders or inbox folders, one new class per
increment), at a random file-system event of the write path, between a version's rename and
the `current` switch, or at a random time (tests/store/crash_harness.py says how). After
each kill: the state must load, `current` must name a complete version (the old one or the
run's new one), no earlier version may change, the next start must clean the leftovers and
stale lock (and a never-switched version), a re-run must succeed, and a killed daemon's next
start must learn its class exactly once and reject nothing. Prints e.g. "50 kills, 0 corrupt, 0 lost".
Takes about 5 s per kill on 2 cores (each child imports torch).

--every-event: no sample. For each of learn, export, prune and rollback, every file-system
event of the uninterrupted run (copies of the disk at each event, torn ones too, and the
fsync order: tests/store/crash_sweep.py, what tests/store/test_crash.py runs), then, as a
cross-check of those copies, a real child SIGKILLed at each event in turn, each on a fresh
copy of the state (one process per event: minutes). Prints one tally line per command and
per kind, e.g. "learn: 84 events (31 distinct disks), outcomes {'old': 82, 'new': 8}, ...".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timed-share", type=float, default=0.3, help="share of kills at a random time (rest: at an event)")
    p.add_argument("--switch-share", type=float, default=0.2,
                   help="share of learn/watch kills between the version's rename and the current switch")
    p.add_argument("--work", type=Path, default=None, help="where the states go (default: a temp dir, removed)")
    p.add_argument("--verbose", action="store_true", help="print one line per kill")
    p.add_argument("--every-event", action="store_true",
                   help="kill at every file-system event of learn, export, prune and rollback instead of at random")
    p.add_argument("--no-real-kills", action="store_true", help="with --every-event: the disk copies only")
    p.add_argument("--commands", default="learn,export,prune,rollback", help="with --every-event: which commands")
    args = p.parse_args()
    if args.every_event:
        return every_event(args)

    import contextlib
    import io

    from tests.conftest import CIFAR_DIR
    from tests.store.crash_harness import run, summary

    from fieldlearn.device.data import load_cifar100

    data = load_cifar100(CIFAR_DIR, "test")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fieldlearn-crash-") as tmp:
        work = args.work or Path(tmp)
        lines: list[str] = []
        log = print if args.verbose else lines.append
        quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet, contextlib.redirect_stderr(io.StringIO()):   # the in-process runs' own output
            tally = run(work, data, kills=args.kills, seed=args.seed, timed_share=args.timed_share,
                        switch_share=args.switch_share, log=log)
    print(summary(tally))
    for problem in tally.problems:
        print("PROBLEM", problem)
    print(f"({time.perf_counter() - t0:.0f} s; leftovers kept after a next start: {tally.leftovers_kept}, "
          f"failed re-runs: {tally.reruns_failed})")
    print(tally.line())
    ok = tally.corrupt == tally.lost == tally.leftovers_kept == tally.reruns_failed == 0 and tally.kills >= args.kills
    return 0 if ok else 1


def every_event(args) -> int:
    import contextlib
    import io
    import shutil

    from tests.conftest import CIFAR_DIR, write_image_folder
    from tests.store.crash_harness import Harness
    from tests.store.crash_sweep import add_versions, argv_of, real_kills, sweep

    from fieldlearn.device.data import load_cifar100

    data = load_cifar100(CIFAR_DIR, "test")
    ok = True
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fieldlearn-crash-") as tmp:
        work = args.work or Path(tmp)
        h = Harness(work / "base", data, log=lambda _: None)
        quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet, contextlib.redirect_stderr(io.StringIO()):
            h.init()
            state = add_versions(h.state)
        folder = write_image_folder(work / "new", data, [60], 10)
        for command in args.commands.split(","):
            argv = argv_of(command, state, folder)
            t1 = time.perf_counter()
            with quiet, contextlib.redirect_stderr(io.StringIO()):
                res = sweep(command, state, argv, work / command / "sweep", h.env)
            good = (not res.problems and not res.order and res.outcomes.get("old") and res.outcomes.get("new")
                    and not res.outcomes.get("neither") and res.torn_recovered == res.torn >= 1
                    and all(rc == 0 for rc in res.reruns.values()))
            ok &= bool(good)
            print(f"copies     {res.line()} ({time.perf_counter() - t1:.0f} s)", flush=True)
            for problem in res.problems + res.order:
                print("PROBLEM", problem)
            if args.no_real_kills:
                continue
            t1 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):
                real = real_kills(command, state, argv, work / command / "real", h.env, res.events,
                                  log=print if args.verbose else (lambda _: None))
            ok &= not real.problems and not real.outcomes.get("neither")
            print(f"real kills {command}: {real.copies} SIGKILLs, one at each event, outcomes {real.outcomes}, "
                  f"{len(real.problems)} problems ({time.perf_counter() - t1:.0f} s)", flush=True)
            for problem in real.problems:
                print("PROBLEM", problem)
            shutil.rmtree(work / command, ignore_errors=True)
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
