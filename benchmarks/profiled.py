"""Run a Python program with cProfile switched on and off by signals: the ``counts``
scenario's launcher, and a tool for counting what a request costs by hand.

    python benchmarks/profiled.py OUT.prof -m gwcore serve --port 8080
    python benchmarks/profiled.py OUT.prof benchmarks/minimal_proxy.py --port 8081 ...
    kill -USR1 PID   # start counting (the program runs unprofiled until then)
    kill -USR2 PID   # stop, and write OUT.prof (pstats format; written whole, then renamed)

Counts of calls, unlike times, do not move with a noisy machine: two versions of the
gateway compared by Python calls and trio task steps per request tell which does less,
where paced CPU time on a shared machine spreads by a third.  The signal handlers run in
the main thread, between bytecodes, so the program needs no hook of its own.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import runpy
import signal
import sys
import time
from pathlib import Path
from typing import Any

# What trio calls once per task step (unrolled_run: ``task.context.run(...)``).
TASK_STEP = ("~", 0, "<method 'run' of '_contextvars.Context' objects>")
TRIO = os.sep + "trio" + os.sep


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, program = argv[0], argv[1:]
    profile = cProfile.Profile()

    def start(*_: Any) -> None:
        profile.enable()

    def stop(*_: Any) -> None:
        profile.disable()
        partial = out + ".part"
        profile.dump_stats(partial)
        os.replace(partial, out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    if program[0] == "-m":
        sys.argv = program[1:]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        sys.path.insert(0, os.path.dirname(os.path.abspath(program[0])))
        runpy.run_path(program[0], run_name="__main__")


def wait_for(path: Path, timeout_s: float = 15.0) -> None:
    """Until ``path`` (written on SIGUSR2) exists."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no profile written to {path} within {timeout_s:g} s")
        time.sleep(0.05)


def counts(path: Path, requests: int, own: str, top: int = 15) -> dict[str, Any]:
    """Per request, from a profile of ``requests`` requests: Python calls (cProfile's
    count: functions, C functions and methods, and each resumption of a coroutine), trio
    task steps, calls into the program's own code (files under ``own``) and into trio;
    and the ``top`` most called functions."""
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    n = max(1, requests)
    total = mine = in_trio = 0
    rows = []
    for (file, line, name), (_, calls, *_rest) in stats.items():
        total += calls
        if file.startswith(own):
            mine += calls
        elif TRIO in file:
            in_trio += calls
        where = name if file == "~" else f"{Path(file).name}:{line} {name}"
        rows.append((calls, where))
    rows.sort(reverse=True)
    return {"python_calls_per_request": total / n,
            "task_steps_per_request": stats.get(TASK_STEP, (0, 0))[1] / n,
            "own_calls_per_request": mine / n, "trio_calls_per_request": in_trio / n,
            "top_calls_per_request": {where: round(calls / n, 2) for calls, where in rows[:top]}}


if __name__ == "__main__":
    main(sys.argv[1:])
