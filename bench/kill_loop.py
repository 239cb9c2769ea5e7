"""The kill loop at full length: the hub, each TAP host's endpoint and the guest's QEMU killed
with SIGKILL and restarted, round after round, while one TCP stream runs across all of it
(tests/support/chaos.py has the topology and what a round is).

Reports, per victim, how long traffic took to come back (p50, p95, worst, and how many rounds
took more than the 5 s target), and whether the stream arrived intact.
Run (root, QEMU, the guest image): .venv/bin/python bench/kill_loop.py [--rounds 100]
(--rounds is per victim); results also go to bench/results/kill_loop.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from tests.support.chaos import KillLoop
from tests.support.guest import ensure_image
from tests.support.netns import hub_and_hosts

VICTIMS = ("hub", "h1", "h2", "qemu")
TARGET_SECONDS = 5.0


def summary(rounds: list[dict]) -> dict[str, dict[str, float]]:
    table = {}
    for victim in VICTIMS:
        times = sorted(r["seconds"] for r in rounds if r["victim"] == victim)
        if not times:
            continue
        table[victim] = {
            "rounds": len(times),
            "p50": round(statistics.median(times), 2),
            "p95": round(times[min(len(times) - 1, int(len(times) * 0.95))], 2),
            "worst": round(times[-1], 2),
            "over_target": sum(1 for t in times if t > TARGET_SECONDS),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds per victim")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kill_loop.json"))
    parser.add_argument("--victims", default=",".join(VICTIMS),
                        help="comma-separated, from " + ",".join(VICTIMS))
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the processes' logs in DIR (default: a temporary folder)")
    args = parser.parse_args()
    ensure_image()
    rounds: list[dict] = []

    def progress(index: int, victim: str, seconds: float) -> None:
        rounds.append({"victim": victim, "seconds": round(seconds, 3)})
        print(f"round {index + 1:4d}: {victim:5s} back in {seconds:5.2f} s", flush=True)

    victims = tuple(args.victims.split(","))
    if not set(victims) <= set(VICTIMS):
        parser.error(f"--victims: choose from {','.join(VICTIMS)}")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vv-killloop-") as scratch, \
            hub_and_hosts(2) as namespaces:
        loop = KillLoop(args.keep or Path(scratch), namespaces)
        result = trio.run(loop.run, args.rounds * len(victims), victims, progress)
    report = {"rounds": rounds, "summary": summary(rounds),
              "stream_bytes": result.stream_bytes, "stream_intact": result.stream_intact,
              "target_seconds": TARGET_SECONDS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{'victim':6s} {'rounds':>6s} {'p50':>6s} {'p95':>6s} {'worst':>6s} {'> 5 s':>6s}")
    for victim, row in report["summary"].items():
        print(f"{victim:6s} {row['rounds']:6d} {row['p50']:6.2f} {row['p95']:6.2f} "
              f"{row['worst']:6.2f} {row['over_target']:6d}")
    print(f"stream: {result.stream_bytes} bytes, intact: {result.stream_intact}")


if __name__ == "__main__":
    main()
