"""What the hub's introductions cost (tunnel/introducer.py), in process, without TLS.

A switch with PEERS advertising sessions (every one listens), each holding MACS learned MACs
and IPS claimed IPv4 and IPv6 addresses; then, each timed alone (median of ROUNDS):
  first      the ticks until every endpoint had its first INTRO: scan, encode every peer,
             assemble every set (in all, the longest tick, and how many ticks the byte budget
             spread them over);
  idle       a tick when nothing changed (what a hub pays 4 times a second);
  change     the ticks after one peer learned a new MAC until every other endpoint had its
             new set (rescan, that peer re-encoded);
  encode     making the INTRO records of that change (WireConnection.send_intro_encoded for
             each recipient: what the Links' writers do), and their total bytes.
Run: .venv/bin/python bench/introductions.py [--peers 256] [--macs 4] [--ips 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netstack.policy import PortPolicy
from netstack.switch import Switch
from tunnel.introducer import Introducer
from tunnel.session import SessionPort
from tunnel.wire import WireConnection

ROUNDS = 7


class StandInLink:
    """What the introducer reads of a Link: its port (the port's `active` is this)."""

    def __init__(self, port: SessionPort) -> None:
        self.port = port
        port.active = self  # type: ignore[assignment]
        port.peer_address = "192.0.2.1"


def build(peers: int, macs: int, ips: int) -> tuple[Switch, Introducer, list[SessionPort]]:
    switch = Switch()
    now = switch.clock()
    digests = {}
    ports = []
    for n in range(peers):
        port = SessionPort(f"peer{n:04d}", policy=PortPolicy(mac_limit=256))
        switch.attach(port)
        for m in range(macs):
            switch._move(bytes([2, 0, n >> 8, n & 255, 0, m]), port, now)
        for i in range(ips):
            switch.addresses.claim(bytes([10, n & 255, i >> 8, i & 255]), port, now, 2048)
            switch.addresses.claim(bytes([0xFD] + [0] * 11 + [n >> 8, n & 255, i >> 8, i & 255]),
                                   port, now, 2048)
        digests[port.name] = bytes([n & 255, n >> 8]) + bytes(30)
        ports.append(port)
    clock = [0.0]
    introducer = Introducer(switch, digests.get, clock=lambda: clock[0])
    introducer.clock_value = clock  # type: ignore[attr-defined]
    for port in ports:
        introducer.advertise(StandInLink(port), (("0.0.0.0", 4000),))  # type: ignore[arg-type]
    return switch, introducer, ports


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def server_wire() -> WireConnection:
    client = WireConnection("client", name="e", offloads=0, mtu=1500, introductions=True)
    server = WireConnection("server", name="h", offloads=0, mtu=1500, introductions=True)
    server.receive_data(client.send_hello())
    client.receive_data(server.send_hello())
    client.next_events()
    server.next_events()
    server.receive_data(client.send_auth(b"c", b"s"))
    server.next_events()
    server.accept_auth()
    return server


def drain(introducer: Introducer, clock: list[float], wanted: int
          ) -> tuple[float, float, int, list]:
    """Tick (a quarter second apart) until `wanted` INTROs were made: total and longest
    tick time, ticks, the INTROs."""
    total = longest = 0.0
    ticks = 0
    out: list = []
    while len(out) < wanted:
        seconds, made = timed(introducer.tick)
        total += seconds
        longest = max(longest, seconds)
        ticks += 1
        out += made
        clock[0] += 0.25
    return total, longest, ticks, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=256)
    parser.add_argument("--macs", type=int, default=4)
    parser.add_argument("--ips", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in (
        "first", "first_longest", "idle", "change", "change_longest", "encode")}
    ticks: dict[str, list[int]] = {"first": [], "change": []}
    sizes = []
    for _ in range(ROUNDS):
        switch, introducer, ports = build(args.peers, args.macs, args.ips)
        clock = introducer.clock_value  # type: ignore[attr-defined]
        total, longest, count, _ = drain(introducer, clock, args.peers)
        results["first"].append(total)
        results["first_longest"].append(longest)
        ticks["first"].append(count)
        clock[0] += 0.25
        seconds, out = timed(introducer.tick)
        assert out == []
        results["idle"].append(seconds)
        switch._move(b"\x02\xff\xff\xff\xff\xff", ports[0], switch.clock())
        total, longest, count, out = drain(introducer, clock, args.peers - 1)
        results["change"].append(total)
        results["change_longest"].append(longest)
        ticks["change"].append(count)
        wires = [server_wire() for _ in out]
        seconds, records = timed(lambda out=out, wires=wires: [
            wire.send_intro_encoded(entries)
            for wire, (_, entries) in zip(wires, out, strict=True)])
        results["encode"].append(seconds)
        sizes.append(sum(map(len, records)))
    print(f"{args.peers} peers, {args.macs} MACs and {args.ips}+{args.ips} addresses each; "
          f"median of {ROUNDS}")
    for name, values in results.items():
        extra = f" over {statistics.median(ticks[name])} ticks" if name in ticks else ""
        print(f"  {name:15s} {statistics.median(values) * 1e3:8.2f} ms{extra}")
    print(f"  INTRO bytes after one change: {statistics.median(sizes) / 1e6:.2f} MB "
          f"({statistics.median(sizes) // max(1, args.peers - 1)} B per recipient)")


if __name__ == "__main__":
    main()
