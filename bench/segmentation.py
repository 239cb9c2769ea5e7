"""Cost of the software offloads (netstack/offload.py) on one CPU, in process.

Measures Gbit/s of *input* bytes for:
  tso4 full     64 KiB TSO4 frames cut to MSS 1448, every segment fully checksummed (PLAIN);
  tso4 partial  the same, segments left NEEDS_CSUM for a port that accepts CSUM;
  csum 64K      completing the checksum of a 64 KiB NEEDS_CSUM frame;
  csum 1500     completing the checksum of a 1500-byte NEEDS_CSUM frame.
Run: .venv/bin/python bench/segmentation.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netstack.frame import GSO_NONE, GSO_TCPV4, HDR_F_NEEDS_CSUM, Frame, Offload
from netstack.offload import adapt

MSS = 1448
ETH_IPV4_TCP = 14 + 20 + 32  # Ethernet, IPv4, TCP with timestamps: a Linux TSO frame
MAX_IPV4_TOTAL = 65535


def tcp4_frame(payload_len: int, gso_size: int) -> Frame:
    """A guest-style TCP/IPv4 frame (pseudo-header sum in the checksum field)."""
    tcp_len = 32 + payload_len
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    tcp = struct.pack(">HHIIBBHHH", 40000, 5201, 1, 1, 8 << 4, 0x18, 512, 0, 0)
    tcp += bytes([1, 1, 8, 10]) + bytes(8)
    frame = b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + ip + tcp + os.urandom(payload_len)
    gso = GSO_TCPV4 if gso_size else GSO_NONE
    return Frame(frame, (HDR_F_NEEDS_CSUM, gso, ETH_IPV4_TCP, gso_size, 34, 16))


def rate(work: Callable[[], object], seconds: float) -> float:
    """Calls per second, best of three runs."""
    best = 0.0
    for _ in range(3):
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds / 3
        while (now := time.perf_counter()) < deadline:
            for _ in range(20):
                work()
            calls += 20
        best = max(best, calls / (now - start))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per case")
    args = parser.parse_args()

    big_payload = MAX_IPV4_TOTAL - 20 - 32  # the largest TSO4 frame: 64 KiB of IPv4
    tso = tcp4_frame(big_payload, MSS)
    csum_big = tcp4_frame(big_payload, 0)
    csum_small = tcp4_frame(1500 - 20 - 32, 0)
    cases = [
        ("tso4 full", tso, Offload.NONE),
        ("tso4 partial", tso, Offload.CSUM),
        ("csum 64K", csum_big, Offload.TSO4),
        ("csum 1500", csum_small, Offload.TSO4),
    ]
    print(f"{'case':<14}{'frame B':>9}{'out':>5}{'us/frame':>10}{'Gbit/s':>8}{'Mpps out':>10}")
    for name, frame, accepts in cases:
        outputs = len(adapt(frame, accepts))
        per_second = rate(lambda f=frame, a=accepts: adapt(f, a), args.seconds)
        gbps = per_second * len(frame) * 8 / 1e9
        print(f"{name:<14}{len(frame):>9}{outputs:>5}{1e6 / per_second:>10.1f}{gbps:>8.2f}"
              f"{per_second * outputs / 1e6:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
