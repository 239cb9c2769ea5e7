"""How long one batch of the worst TX and RX rings a guest can build holds the event loop.

TX: every one of the ring's 256 entries is a chain made of one indirect descriptor pointing at
a table of 1024 descriptors (the most vring.py walks), each a 16-byte buffer.  The timer covers
`NetQueues.pop_tx` calls until the ring is empty: the number that matters is the longest
single call, the time the Trio shell runs without yielding to other guests.
RX (mergeable buffers): a ring of 1024 one-byte buffers, every descriptor offered, and a full
port queue (1024 frames of 9000 bytes) that can never fit; the longest `NetQueues.push_rx`
call until the queue is empty.
Run: .venv/bin/python bench/hostile_ring.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netstack.frame import Frame
from tests.support.virtio_driver import DriverQueue, GuestRam, Segment
from virtio.memory import GuestMemory, RegionSpec
from virtio.net import NetQueues
from virtio.protocol import DEVICE_FEATURES
from virtio.vring import SplitQueue

RING = 256
TABLE_ENTRIES = 1024
BUFFER = 16
RX_RING = 1024
RX_FRAMES = 1024
RX_FRAME = 9000


def worst_ring(ram: GuestRam) -> DriverQueue:
    queue = DriverQueue(ram, RING, event_idx=True, indirect=True)
    buffer = ram.alloc(BUFFER)
    ram.write(buffer, bytes(BUFFER))
    segments = [Segment(buffer, BUFFER, False)] * TABLE_ENTRIES
    for _ in range(RING):
        queue.add_segments(segments, indirect=True)
    queue.publish()
    return queue


def one_round() -> tuple[float, float, int]:
    """(longest pop_tx call, whole ring, calls) in seconds."""
    with GuestRam(32 << 20) as ram:
        driver = worst_ring(ram)
        specs = [RegionSpec(*region) for region in ram.memory_table()]
        fds = [os.dup(fd) for fd in ram.region_fds()]
        memory = GuestMemory(specs, fds)
        queue = SplitQueue(1, RING, memory, driver.desc_uva, driver.avail_uva, driver.used_uva,
                           0, event_idx=True, indirect=True)
        net = NetQueues(DEVICE_FEATURES)
        longest = total = 0.0
        calls = 0
        while queue.avail_count():
            start = time.perf_counter()
            net.pop_tx(queue, RING)
            took = time.perf_counter() - start
            longest = max(longest, took)
            total += took
            calls += 1
        queue.release()
        memory.close()
        for fd in fds:
            os.close(fd)
        return longest, total, calls


def one_rx_round() -> tuple[float, int]:
    """(longest push_rx call, calls) for the ring of one-byte buffers."""
    with GuestRam(8 << 20) as ram:
        driver = DriverQueue(ram, RX_RING, event_idx=True, indirect=True)
        buffer = ram.alloc(64)
        for _ in range(RX_RING):
            driver.add_segments([Segment(buffer, 1, True)])
        driver.publish()
        specs = [RegionSpec(*region) for region in ram.memory_table()]
        fds = [os.dup(fd) for fd in ram.region_fds()]
        memory = GuestMemory(specs, fds)
        queue = SplitQueue(0, RX_RING, memory, driver.desc_uva, driver.avail_uva,
                           driver.used_uva, 0, event_idx=True, indirect=True)
        net = NetQueues(DEVICE_FEATURES)
        frames = deque(Frame(b"\x02" * 12 + b"\x08\x00" + bytes(RX_FRAME - 14))
                       for _ in range(RX_FRAMES))
        longest = 0.0
        calls = 0
        while frames:
            start = time.perf_counter()
            net.push_rx(queue, frames, RING)
            longest = max(longest, time.perf_counter() - start)
            calls += 1
        queue.release()
        memory.close()
        for fd in fds:
            os.close(fd)
        return longest, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = [one_round() for _ in range(args.rounds)]
    longest = min(r[0] for r in results)
    total = min(r[1] for r in results)
    calls = results[0][2]
    sys.stdout.write(
        f"{RING} chains x {TABLE_ENTRIES} indirect descriptors: longest pop_tx call "
        f"{longest * 1e3:.1f} ms, whole ring {total * 1e3:.1f} ms in {calls} calls "
        f"(best of {args.rounds})\n"
    )
    rx = [one_rx_round() for _ in range(args.rounds)]
    sys.stdout.write(
        f"RX ring of {RX_RING} one-byte buffers, {RX_FRAMES} frames of {RX_FRAME} B queued: "
        f"longest push_rx call {min(r[0] for r in rx) * 1e3:.1f} ms in {rx[0][1]} calls "
        f"(best of {args.rounds})\n"
    )


if __name__ == "__main__":
    main()
