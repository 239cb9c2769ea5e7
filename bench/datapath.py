"""Per-stage cost of the vhostvpn data path, in process, without sockets or other processes.

A model guest driver (tests/support/virtio_driver.py) fills guest A's TX ring with frames and
guest B's RX ring with buffers; the timer covers only the back-end's work:
  pop   NetQueues.pop_tx: walk A's TX chains, copy frames out (copy 1), return chains;
  fwd   Switch.forward: learn, look up, regroup per egress port, queue on B's port;
  push  NetQueues.push_rx: reserve B's RX chains, write header + frame (copy 2), publish;
  note  should_notify on both rings (one fence each per batch).
Run: .venv/bin/python bench/datapath.py [--frames 200] [--rounds 300] [--size 64] [--policy]
Prints ns per frame for each stage; numbers are for one CPU, with the process's GC tuning.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netstack.frame import Frame
from netstack.policy import PortPolicy
from netstack.port import QueuedPort
from netstack.switch import Switch
from tests.support.virtio_driver import DriverQueue, GuestRam, NetDriver
from tunnel.cli.launch import tune_gc
from virtio.memory import GuestMemory, RegionSpec
from virtio.net import NetQueues
from virtio.protocol import DEVICE_FEATURES
from virtio.spec import Feature, bit
from virtio.vring import SplitQueue

RING = 256
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


class Guest:
    """A model guest NIC and the back-end's view of its two queues."""

    def __init__(self) -> None:
        self.ram = GuestRam(1 << 24)
        self.rx_q = DriverQueue(self.ram, RING, event_idx=True, indirect=True)
        self.tx_q = DriverQueue(self.ram, RING, event_idx=True, indirect=True)
        self.driver = NetDriver(self.rx_q, self.tx_q, mrg_rxbuf=True)
        specs = [RegionSpec(*r) for r in self.ram.memory_table()]
        self.memory = GuestMemory(specs, [os.dup(fd) for fd in self.ram.region_fds()])
        self.rx = SplitQueue(0, RING, self.memory, self.rx_q.desc_uva, self.rx_q.avail_uva,
                             self.rx_q.used_uva, 0, event_idx=True, indirect=True)
        self.tx = SplitQueue(1, RING, self.memory, self.tx_q.desc_uva, self.tx_q.avail_uva,
                             self.tx_q.used_uva, 0, event_idx=True, indirect=True)
        self.net = NetQueues(DEVICE_FEATURES & ~bit(Feature.PROTOCOL_FEATURES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames per batch (<= 256)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="frame size in bytes, 60..1514")
    parser.add_argument("--policy", action="store_true",
                        help="police guest A's port (MAC/IP anti-spoofing, guards), as the hub "
                             "does by default")
    args = parser.parse_args()
    if not 1 <= args.frames <= RING or not 60 <= args.size <= 1514:
        parser.error("--frames 1..256, --size 60..1514")
    tune_gc()
    a, b = Guest(), Guest()
    switch = Switch()
    port_a = QueuedPort("a", policy=PortPolicy() if args.policy else None)
    port_b = QueuedPort("b", limit=1 << 20)
    switch.attach(port_a)
    switch.attach(port_b)
    switch.forward(port_b, [Frame(MAC_A + MAC_B + b"\x08\x00" + bytes(46))])  # learn B
    port_a.queue.clear()
    # An IPv4/UDP frame from A to B, so the IP policies have something to check.
    ip_header = bytes.fromhex("4500") + (args.size - 14).to_bytes(2, "big") + bytes.fromhex(
        "00004000401100000a0000010a000002")
    udp = (4000).to_bytes(2, "big") + (5000).to_bytes(2, "big") + (args.size - 34).to_bytes(
        2, "big") + b"\0\0"
    frame = MAC_B + MAC_A + b"\x08\x00" + ip_header + udp + bytes(args.size - 42)
    spent = {"pop": 0.0, "fwd": 0.0, "push": 0.0, "note": 0.0}
    frames_timed = 0
    for round_ in range(args.rounds):
        a.driver.send([frame] * args.frames)
        b.driver.post_rx(args.frames, 2048)
        t0 = time.perf_counter()
        popped = a.net.pop_tx(a.tx, RING)
        t1 = time.perf_counter()
        switch.forward(port_a, popped)
        t2 = time.perf_counter()
        b.net.push_rx(b.rx, port_b.queue, RING)
        t3 = time.perf_counter()
        a.tx.should_notify()
        b.rx.should_notify()
        t4 = time.perf_counter()
        if round_ >= 10:  # warm-up
            spent["pop"] += t1 - t0
            spent["fwd"] += t2 - t1
            spent["push"] += t3 - t2
            spent["note"] += t4 - t3
            frames_timed += len(popped)
        a.driver.reclaim_tx()
        b.rx_q.used()
    total = sum(spent.values())
    print(f"{args.size}-byte IPv4/UDP frames, batches of {args.frames}, {frames_timed} frames "
          f"timed, port policy {'on' if args.policy else 'off'}")
    for stage, seconds in spent.items():
        print(f"  {stage:5s} {seconds / frames_timed * 1e9:6.0f} ns/frame")
    print(f"  total {total / frames_timed * 1e9:6.0f} ns/frame = "
          f"{frames_timed / total / 1e6:.3f} Mpps on one CPU (no I/O, no Trio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
