"""Trio's turn beside a flood on the data loop (virtio/dataloop.py): a 10 ms `trio.sleep`
loop while a handler serves a socketpair end that is always readable.  Prints the timer's
ticks a second (at most ~97: each tick is 10 ms plus its lateness), how late it woke (p50,
p90) and the loop's CPU per handler call, each tree's median over interleaved rounds.

--hog runs a busy process (bounded by the run) on the CPU the flood is pinned to: the loop's
CPU shared with another process, as on a loaded machine, where Trio's I/O thread waits for
the GIL the busy loop holds.

Run: .venv/bin/python bench/dataloop_flood.py --tree OLD --tree NEW [--rounds 6] [--hog]
(trees alternate round by round, each in its own interpreter; without --tree: this checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 2.0
TICK = 0.01
HOG_CPU = 1  # the CPU the flood (and --hog's busy process) run on

MEASURE = r'''
import json, socket, sys, time
import trio
from virtio import dataloop
assert dataloop.__file__.startswith(sys.argv[1]), dataloop.__file__

a, b = socket.socketpair()
a.setblocking(False)
b.send(b"x")
calls = 0

def on_flood():  # never drains its fd: readable at every turn
    global calls
    calls += 1
    a.recv(1, socket.MSG_PEEK)
    return False

late = []

async def main():
    async def timer():
        while True:
            started = time.perf_counter()
            await trio.sleep(TICK)
            late.append(time.perf_counter() - started - TICK)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dataloop.serve_readable, a.fileno(), on_flood)
        nursery.start_soon(timer)
        await trio.sleep(SECONDS)
        nursery.cancel_scope.cancel()

cpu = time.process_time()
dataloop.run(main)
cpu = time.process_time() - cpu
late.sort()
print(json.dumps({"ticks": len(late) / SECONDS, "late_p50_ms": late[len(late) // 2] * 1e3,
                  "late_p90_ms": late[int(len(late) * 0.9)] * 1e3,
                  "ns_per_call": cpu / calls * 1e9}))
'''


def measure(tree: Path, pinned: bool) -> dict[str, float]:
    """One run of MEASURE with `tree` first on the path."""
    code = f"SECONDS = {SECONDS}\nTICK = {TICK}\n" + MEASURE
    command = [sys.executable, "-c", code, str(tree)]
    if pinned:
        command = ["taskset", "-c", str(HOG_CPU), *command]
    out = subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, action="append", help="a checkout (repeatable)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--hog", action="store_true",
                        help=f"share CPU {HOG_CPU} with a busy process during the runs")
    args = parser.parse_args()
    trees = args.tree or [ROOT]
    runs: dict[Path, list[dict[str, float]]] = {tree: [] for tree in trees}
    hog = None
    if args.hog:
        limit = int(args.rounds * len(trees) * (SECONDS + 2)) + 10
        hog = subprocess.Popen(["taskset", "-c", str(HOG_CPU), "timeout", str(limit),
                                sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(args.rounds):
            for tree in trees:
                runs[tree].append(measure(tree, pinned=args.hog))
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for tree, results in runs.items():
        median = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(f"{tree}: ticks/s {median['ticks']:.1f}, late p50 {median['late_p50_ms']:.2f} ms,"
              f" p90 {median['late_p90_ms']:.2f} ms, {median['ns_per_call']:.0f} ns CPU per"
              f" handler call (ticks/s by round: {[r['ticks'] for r in results]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
