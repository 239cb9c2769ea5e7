"""CPU time of one round trip through a hub's session path, in one process: the steady A/B
number for the Python work of a visit (docs/benchmarks.md, "Latency through the hub").

Client A's TLS stream and codec -> the hub's Link (real TLSStream over an AF_UNIX socket pair,
WireConnection, a Switch whose session ports are policed) -> client B, and B's reply back, one
98-byte frame each way: four TLS stream visits per round trip, each one scheduler pass, as in
the hub and in an endpoint's session.  What it leaves out is what changes with the machine's
load: process wake-ups, TCP over veth, the TAP.  Prints the process CPU time per round trip.

Run: .venv/bin/python bench/hub_visit.py --tree OLD --tree NEW [--rounds 5] [--count 3000]
(trees alternate round by round, each in its own interpreter; without --tree: this checkout).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ itself holds modules named like the packages (bench/tunnel.py): off the path, so the
# tree under test (PYTHONPATH) or this checkout is what gets imported.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

def frame(dst: bytes, src: bytes, sip: bytes, dip: bytes) -> bytes:
    """An Ethernet + IPv4 frame of 98 bytes (an ICMP echo's size)."""
    ip = bytes([0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0]) + sip + dip
    return dst + src + b"\x08\x00" + ip + bytes(64)


def measure(count: int) -> float:
    """us of CPU per round trip, in this process, with the code on sys.path."""
    import trio

    from netstack.frame import ALL_OFFLOADS, PLAIN, Frame
    from netstack.policy import PortPolicy
    from netstack.switch import Switch
    from tunnel.keys import client_ssl_context, generate_identity, server_ssl_context
    from tunnel.session import SESSION_MAC_LIMIT, Link, SessionPort
    from tunnel.tls import TLSStream
    from tunnel.wire import Frames, WireConnection

    async def pair(ctx, switch, name):
        left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        server = TLSStream(trio.SocketStream(left), ctx, server_side=True)
        client = TLSStream(trio.SocketStream(right), client_ssl_context(), server_side=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        hub = WireConnection("server", name="hub", offloads=int(ALL_OFFLOADS), mtu=1500)
        peer = WireConnection("client", name=name, offloads=int(ALL_OFFLOADS), mtu=1500)
        hub.receive_data(peer.send_hello())
        peer.receive_data(hub.send_hello())
        hub.next_events()
        peer.next_events()
        hub.receive_data(peer.send_auth(b"certificate", b"signature"))
        hub.next_events()
        hub.accept_auth()
        port = SessionPort(name, policy=PortPolicy(mac_limit=SESSION_MAC_LIMIT))
        switch.attach(port)
        link = Link(port, server, hub, switch.forward)
        link.activate()
        return link, client, peer

    async def receive(stream, wire) -> None:
        while True:
            wire.receive_data(await stream.receive_some())
            if any(type(event) is Frames for event in wire.next_events()):
                return

    result: list[float] = []

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="hub-visit-") as tmp:
            ctx = server_ssl_context(generate_identity(Path(tmp)))
        switch = Switch()
        link_a, a, wire_a = await pair(ctx, switch, "a")
        link_b, b, wire_b = await pair(ctx, switch, "b")
        mac_a, mac_b = b"\x02\0\0\0\0\x01", b"\x02\0\0\0\0\x02"
        ip_a, ip_b = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
        request = [Frame(frame(mac_b, mac_a, ip_a, ip_b), PLAIN)]
        reply = [Frame(frame(mac_a, mac_b, ip_b, ip_a), PLAIN)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link_a.run)
            nursery.start_soon(link_b.run)
            # Both MACs learned (a broadcast from A, B's reply) before anything is timed.
            await a.send_all(wire_a.send_frames([Frame(frame(b"\xff" * 6, mac_a, ip_a, ip_b),
                                                       PLAIN)]))
            await receive(b, wire_b)
            await b.send_all(wire_b.send_frames(reply))
            await receive(a, wire_a)
            for _ in range(2):  # the first pass warms up
                started = time.process_time()
                for _ in range(count):
                    await a.send_all(wire_a.send_frames(request))
                    await receive(b, wire_b)
                    await b.send_all(wire_b.send_frames(reply))
                    await receive(a, wire_a)
                result.append((time.process_time() - started) / count * 1e6)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, default=[])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.tree and not args.here:
        sys.path.insert(0, str(ROOT))
    if args.here or not args.tree:
        print(f"{measure(args.count):.1f}")
        return 0
    results: dict[Path, list[float]] = {tree: [] for tree in args.tree}
    for round_ in range(args.rounds):
        for tree in args.tree if round_ % 2 == 0 else list(reversed(args.tree)):
            env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
            out = subprocess.run([sys.executable, __file__, "--here", "--count",
                                  str(args.count)], env=env, capture_output=True, text=True,
                                 check=True, cwd=tree).stdout
            results[tree].append(float(out))
    base = statistics.median(results[args.tree[0]])
    for tree, values in results.items():
        median = statistics.median(values)
        print(f"{tree}: {median:.1f} us CPU per round trip (median of {len(values)}: "
              f"{' '.join(f'{v:.1f}' for v in values)}), {median / base:.3f}x the first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
