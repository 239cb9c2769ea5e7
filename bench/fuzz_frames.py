"""The hostile-frame fuzzer (tests/support/hostile_frames.py) for as long as asked: hostile
frames from a policed guest port into the switch, policy, gateway with its DHCP server,
software offloads and an L3 host.  Prints how many cases ran, how fast, every drop reason
they met, and each distinct finding (an exception, an unexpected-error log, a malformed
reply, a table beyond its bound) with the first frame that caused it.
Run: .venv/bin/python bench/fuzz_frames.py [--examples 100000] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.hostile_frames import fuzz


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vhostvpn-fuzz-") as state_dir:
        started = time.perf_counter()
        report = fuzz(args.examples, args.seed, Path(state_dir))
        elapsed = time.perf_counter() - started
    print(f"{report.cases} hostile frames, seed {args.seed}, {elapsed:.1f} s "
          f"({report.cases / elapsed:.0f} frames/s)")
    print("drops: " + ", ".join(f"{reason}={count}" for reason, count in
                                sorted(report.drops.items(), key=lambda item: -item[1])))
    print(f"{len(report.findings)} findings")
    for what, frame in report.findings.items():
        print(f"  {what}\n    first frame: {frame[:400]}{'...' if len(frame) > 400 else ''}")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
