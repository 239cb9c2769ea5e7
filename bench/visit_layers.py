"""Where one small frame's visit goes, layer by layer, on the data loop: the real objects of
an endpoint and of a hub in one process, each visit timed alone (docs/benchmarks.md, "The
layers on the data loop").

The three kinds of visit an idle ping makes (a 98-byte ICMP echo):
  tap->tls  an endpoint reads the TAP, switches, encodes and encrypts to its hub session
  tls->tap  an endpoint decrypts a session's record, decodes, switches, writes the TAP
  tls->tls  the hub decrypts one session's record, decodes, switches (policed), encodes and
            encrypts to another session
The endpoint is a Switch with a TapPort on a real TAP (in a namespace made for the run, with
a permanent neighbour entry, so the kernel answers the echo inside our TAP write) and a
SteeringUplink whose Link runs real TLS over an AF_UNIX socket pair; the hub is a Switch with
two policed SessionPorts and their Links.  The far ends of the sockets (the hub for the
endpoint, the clients for the hub) are driven here without being timed.  Every handler is the
one the data loop serves (virtio/dataloop.py: this loop subclass records them), called
straight, one visit at a time, the CPU time of the call measured with perf_counter_ns.

Modes: `plain` (no instrumentation: the visit's cost), `layers` (each layer's own time, by
wrappers around the objects' methods and the os calls: each wrapper adds ~0.2 us to its
caller's share), `profile` (cProfile: calls per visit).  `--cold` touches a 16 MiB buffer
before each visit (the L1/L2 caches emptied, as after an idle sleep).

Run (root): .venv/bin/python bench/visit_layers.py [--count 3000] [--cold] [--mode plain]
      .venv/bin/python bench/visit_layers.py --tree OLD --tree NEW [--rounds 5] (A/B, plain)
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import select
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ holds modules named like the packages (bench/tunnel.py): off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

NETNS = "lat-visits"
TAP = "latv0"
TAP_IP, PEER_IP = bytes([10, 79, 0, 1]), bytes([10, 79, 0, 2])
PEER_MAC = b"\x02\x00\x00\x4c\x00\x02"
EVICT_BYTES = 16 << 20
KINDS = ("tap->tls", "tls->tap", "tls->tls")
# The same visits by bench/python_floor.py's minimal relay and hub (no vnet header, no codec
# but a 2-byte length, no switch, SSLSocket): the floor, measured alongside.
FLOOR_TAP = "latv1"
FLOOR_TAP_IP, FLOOR_PEER_IP = bytes([10, 79, 1, 1]), bytes([10, 79, 1, 2])
FLOOR_KINDS = tuple(f"floor {kind}" for kind in KINDS)


def echo(dst: bytes, src: bytes, sip: bytes, dip: bytes, seq: int, icmp_type: int = 8) -> bytes:
    """An Ethernet + IPv4 + ICMP echo frame of 98 bytes, checksums right."""
    def csum(b: bytes) -> int:
        s = sum(int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF
    payload = bytes(56)
    icmp = bytes([icmp_type, 0, 0, 0]) + (0x4C4C).to_bytes(2, "big") + seq.to_bytes(2, "big")
    icmp = icmp[:2] + csum(icmp + payload).to_bytes(2, "big") + icmp[4:] + payload
    ip = bytes([0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0]) + sip + dip
    ip = ip[:10] + csum(ip).to_bytes(2, "big") + ip[12:]
    return dst + src + b"\x08\x00" + ip + icmp


class Layers:
    """Each wrapped callable's own time (its time less that of the wrapped calls inside)."""

    def __init__(self) -> None:
        self.own: dict[tuple[str, str], int] = defaultdict(int)  # (visit kind, layer): ns
        self.stack: list[int] = []
        self.kind = ""

    def wrap(self, name: str, fn: Callable) -> Callable:
        own, stack, clock = self.own, self.stack, time.perf_counter_ns

        def timed(*args: object) -> object:
            if not stack and name != "visit":  # the far ends' work, untimed
                return fn(*args)
            stack.append(0)
            started = clock()
            try:
                return fn(*args)
            finally:
                spent = clock() - started
                inner = stack.pop()
                own[self.kind, name] += spent - inner
                if stack:
                    stack[-1] += spent
        return timed


def measure(count: int, cold: bool, mode: str) -> dict[str, object]:
    import trio

    from netstack.frame import ALL_OFFLOADS, Frame
    from netstack.policy import PortPolicy
    from netstack.switch import Switch
    from tunnel.cli.launch import tune_gc
    from tunnel.direct import SteeringUplink
    from tunnel.host.tuntap import TapPort, TunTapDevice, run_device
    from tunnel.keys import client_ssl_context, generate_identity, server_ssl_context
    from tunnel.session import SESSION_MAC_LIMIT, Link, SessionPort
    from tunnel.tls import TLSStream
    from tunnel.wire import Frames, WireConnection
    from virtio import dataloop

    layers = Layers() if mode == "layers" else None
    floor = load_floor()

    class Recorder(dataloop.DataLoop):
        """The data loop, remembering each fd's handler for the driver to call."""

        handlers: dict[int, Callable[[], bool]] = {}

        async def serve(self, fd: int, handler: Callable[[], bool], writable: bool) -> None:
            if not writable:
                self.handlers[fd] = handler
            await super().serve(fd, handler, writable)

    async def session(server_ctx, name: str, *, hub_side: bool):
        """A handshaken TLS + codec pair over a socket pair: (ours, theirs) as
        (stream, wire) each; `hub_side`: ours is the hub's (server) end."""
        left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        server = TLSStream(trio.SocketStream(left), server_ctx, server_side=True)
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
        if hub_side:
            return (server, hub), (client, peer)
        return (client, peer), (server, hub)

    def send(far, frame: bytes) -> None:
        stream, wire = far
        assert stream.send_now(wire.send_frames([Frame(frame)]))

    def receive(far) -> bytes:
        """The far end's next frame (waits for its socket, untimed)."""
        stream, wire = far
        while True:
            view = stream.receive_view_nowait()
            if view is None:
                select.select([stream.fileno()], [], [], 5)
                continue
            for event in wire.receive_events(view):
                if type(event) is Frames:
                    return event.frames[0].data
            if not view:
                raise RuntimeError("far end closed")

    evict = bytearray(EVICT_BYTES)
    other = bytes(EVICT_BYTES)

    def flush_caches() -> None:
        evict[:] = other

    results: dict[str, list[int]] = {kind: [] for kind in KINDS + FLOOR_KINDS}
    calls: dict[str, float] = {}

    def timed_visit(kind: str, handler: Callable[[], object], profiler) -> None:
        if layers is not None:
            layers.kind = kind
        if cold:
            flush_caches()
        if profiler is not None:
            profiler.enable()
        started = time.perf_counter_ns()
        handler()
        spent = time.perf_counter_ns() - started
        if profiler is not None:
            profiler.disable()
        results[kind].append(spent)

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="lat-visits-") as tmp:
            server_ctx = server_ssl_context(generate_identity(Path(tmp)))
        # The endpoint: a TAP and the hub's session on one switch.
        for conf in ("default", "all"):
            Path(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6").write_text("1")
        device = TunTapDevice.open(TAP, "tap")
        subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
        subprocess.run(["ip", "addr", "add", "10.79.0.1/24", "dev", TAP], check=True)
        subprocess.run(["ip", "neigh", "replace", "10.79.0.2", "lladdr", PEER_MAC.hex(":"),
                        "dev", TAP, "nud", "permanent"], check=True)
        tap_mac = bytes.fromhex(Path(f"/sys/class/net/{TAP}/address").read_text()
                                .strip().replace(":", ""))
        e_switch = Switch()
        tap_port = TapPort(device.name, device)
        e_switch.attach(tap_port)
        uplink = SteeringUplink("hub")
        e_switch.attach(uplink)
        (e_tls, e_wire), e_far = await session(server_ctx, "e", hub_side=False)
        e_link = Link(uplink, e_tls, e_wire, e_switch.forward)
        # The hub: two policed sessions.
        h_switch = Switch()
        h_links, h_far = [], []
        for name in "ab":
            (tls, wire), far = await session(server_ctx, name, hub_side=True)
            port = SessionPort(name, policy=PortPolicy(mac_limit=SESSION_MAC_LIMIT))
            h_switch.attach(port)
            h_links.append(Link(port, tls, wire, h_switch.forward))
            h_far.append(far)
        floor_visits = floor_setup(floor, server_ctx, client_ssl_context())
        if layers is not None:
            w = layers.wrap
            os.readv, os.writev, os.write = (w("syscall readv", os.readv),
                                             w("syscall writev", os.writev),
                                             w("syscall write", os.write))
            device.read_batch = w("tap read_batch", device.read_batch)
            device.write_batch = w("tap write_batch", device.write_batch)
            for link in (e_link, *h_links):
                stream = link.stream
                stream.receive_view_nowait = w("tls receive_view_nowait",
                                               stream.receive_view_nowait)
                stream._decrypt = w("tls _decrypt", stream._decrypt)
                stream._ssl.read = w("openssl read", stream._ssl.read)
                stream._ssl.write = w("openssl write", stream._ssl.write)
                stream._pipe.fill_nowait = w("tls fill_nowait", stream._pipe.fill_nowait)
                stream._pipe.write_nowait = w("tls write_nowait", stream._pipe.write_nowait)
                stream.send_now = w("tls send_now", stream.send_now)
                link.wire.receive_events = w("codec receive_events", link.wire.receive_events)
                link.wire.send_frames = w("codec send_frames", link.wire.send_frames)
                link._dispatch = w("link _dispatch", link._dispatch)
                link.forward = w("switch forward", link.forward)
                link.port.deliver = w("port deliver", link.port.deliver)
            tap_port.deliver = w("port deliver", tap_port.deliver)
        forward = e_switch.forward if layers is None else layers.wrap("switch forward",
                                                                       e_switch.forward)
        async with trio.open_nursery() as nursery:
            e_link.activate()
            for link in h_links:
                link.activate()
            nursery.start_soon(run_device, device, tap_port, forward)
            for link in (e_link, *h_links):
                nursery.start_soon(link.run)
            await trio.sleep(0.2)  # every handler registered, the TAP's writer waiting
            if layers is not None:
                for link in (e_link, *h_links):
                    link.port.on_ready = layers.wrap("link _on_ready", link.port.on_ready)
                tap_port.on_ready = layers.wrap("tap write_now", tap_port.on_ready)
            handlers = Recorder.handlers
            tap_handler = handlers[device.fd]
            e_handler = handlers[e_tls.fileno()]
            a_handler = handlers[h_links[0].stream.fileno()]
            b_handler = handlers[h_links[1].stream.fileno()]
            if layers is not None:
                tap_handler = layers.wrap("visit", tap_handler)
                e_handler = layers.wrap("visit", e_handler)
                a_handler = layers.wrap("visit", a_handler)
                b_handler = layers.wrap("visit", b_handler)
            mac_a, mac_b = b"\x02\0\0\0\0\x01", b"\x02\0\0\0\0\x02"
            ip_a, ip_b = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
            profilers = {kind: cProfile.Profile() if mode == "profile" else None
                         for kind in KINDS + FLOOR_KINDS}
            tap_drops = 0
            for i in range(-200, count):  # the first 200 warm up, untimed
                if i == 0:
                    for kind in results:
                        results[kind].clear()
                    if layers is not None:
                        layers.own.clear()
                seq = i & 0xFFFF
                # The endpoint: an echo request from its hub session to the TAP, the
                # kernel's reply from the TAP to the session.
                send(e_far, echo(tap_mac, PEER_MAC, PEER_IP, TAP_IP, seq))
                timed_visit("tls->tap", e_handler, profilers["tls->tap"] if i >= 0 else None)
                timed_visit("tap->tls", tap_handler, profilers["tap->tls"] if i >= 0 else None)
                reply = receive(e_far)
                if reply[34] != 0:
                    tap_drops += 1
                # The hub: a request from a to b, the reply from b to a.
                send(h_far[0], echo(mac_b, mac_a, ip_a, ip_b, seq))
                timed_visit("tls->tls", a_handler, profilers["tls->tls"] if i >= 0 else None)
                receive(h_far[1])
                send(h_far[1], echo(mac_a, mac_b, ip_b, ip_a, seq, 0))
                timed_visit("tls->tls", b_handler, profilers["tls->tls"] if i >= 0 else None)
                receive(h_far[0])
                for kind, handler, done in floor_visits(seq):
                    timed_visit(kind, handler, profilers[kind] if i >= 0 else None)
                    done()
            if tap_drops:
                raise RuntimeError(f"{tap_drops} TAP answers were not echo replies")
            if mode == "profile":
                for kind, profiler in profilers.items():
                    stats = pstats.Stats(profiler)
                    visits = len(results[kind])
                    calls[kind] = sum(v[1] for v in stats.stats.values()) / visits
                    out = Path(f"/tmp/lat-visits-{kind.replace('->', '-')}.prof")
                    stats.dump_stats(out)
            nursery.cancel_scope.cancel()
        device.close()

    tune_gc()
    Recorder().run(main)
    visits = {kind: len(v) for kind, v in results.items()}
    results = {kind: v for kind, v in results.items() if v}
    row: dict[str, object] = {
        kind: {"p50_us": round(statistics.median(v) / 1e3, 2),
               "mean_us": round(statistics.fmean(v) / 1e3, 2)} for kind, v in results.items()}
    if layers is not None:
        row["layers_us_per_visit"] = {
            kind: {name: round(ns / visits[kind] / 1e3, 2) for (k, name), ns in
                   sorted(layers.own.items(), key=lambda kv: -kv[1]) if k == kind}
            for kind in KINDS}
    if calls:
        row["calls_per_visit"] = {k: round(v, 1) for k, v in calls.items()}
    return row


def load_floor():
    """bench/python_floor.py as a module, without its path changes."""
    import importlib.util
    path = sys.path[:]
    try:
        spec = importlib.util.spec_from_file_location("python_floor",
                                                      Path(__file__).with_name("python_floor.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def floor_setup(floor, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
    """The minimal relay's TAP and sessions; a function giving one round's floor visits:
    (kind, handler, what the far end does after it) each."""
    tap = floor.open_tap(FLOOR_TAP, "10.79.1.1/24")
    subprocess.run(["ip", "neigh", "replace", "10.79.1.2", "lladdr", PEER_MAC.hex(":"),
                    "dev", FLOOR_TAP, "nud", "permanent"], check=True)
    tap_mac = bytes.fromhex(Path(f"/sys/class/net/{FLOOR_TAP}/address").read_text()
                            .strip().replace(":", ""))

    def pair() -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
        left, right = socket.socketpair()
        ours = server_ctx.wrap_socket(left, server_side=True, do_handshake_on_connect=False)
        theirs = client_ctx.wrap_socket(right, do_handshake_on_connect=False)
        thread = threading.Thread(target=ours.do_handshake)
        thread.start()
        theirs.do_handshake()
        thread.join()
        ours.setblocking(False)
        return ours, theirs

    relay, relay_far = pair()
    hub_a, far_a = pair()
    hub_b, far_b = pair()
    pending = bytearray()

    def from_conn() -> None:  # python_floor.relay, a TLS wake-up
        nonlocal pending
        data = floor.receive(relay)
        pending += data
        floor.write_frames(tap, pending)

    def from_tap() -> None:  # python_floor.relay, a TAP wake-up
        burst = floor.read_burst(tap)
        if burst:
            floor.send_all(relay, burst)

    def hub(conn: ssl.SSLSocket, other: ssl.SSLSocket) -> Callable[[], None]:
        def visit() -> None:  # python_floor.hub
            data = floor.receive(conn)
            if data:
                floor.send_all(other, data)
        return visit

    def far_send(far: ssl.SSLSocket, frame: bytes) -> None:
        far.sendall(len(frame).to_bytes(2, "big") + frame)

    def far_receive(far: ssl.SSLSocket) -> Callable[[], None]:
        def done() -> None:
            got = b""
            while len(got) < 2 or len(got) < 2 + int.from_bytes(got[:2], "big"):
                got += far.recv(65536)
        return done

    mac_a, mac_b = b"\x02\0\0\0\0\x01", b"\x02\0\0\0\0\x02"
    ip_a, ip_b = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
    from_a, from_b = hub(hub_a, hub_b), hub(hub_b, hub_a)

    def visits(seq: int):
        far_send(relay_far, echo(tap_mac, PEER_MAC, FLOOR_PEER_IP, FLOOR_TAP_IP, seq))
        yield "floor tls->tap", from_conn, lambda: None
        yield "floor tap->tls", from_tap, far_receive(relay_far)
        far_send(far_a, echo(mac_b, mac_a, ip_a, ip_b, seq))
        yield "floor tls->tls", from_a, far_receive(far_b)
        far_send(far_b, echo(mac_a, mac_b, ip_b, ip_a, seq, 0))
        yield "floor tls->tls", from_b, far_receive(far_a)
    return visits


def in_netns(argv: list[str]) -> str:
    """Run this script with `argv` inside a fresh namespace; its stdout."""
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, __file__,
                               "--inside", *argv], text=True, check=True,
                              stdout=subprocess.PIPE).stdout
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--mode", choices=("plain", "layers", "profile"), default="plain")
    parser.add_argument("--tree", action="append", type=Path, default=[])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        import json
        print(json.dumps(measure(args.count, args.cold, args.mode)))
        return 0
    flags = ["--count", str(args.count), "--mode", args.mode] + (["--cold"] if args.cold else [])
    if not args.tree:
        os.environ.setdefault("PYTHONPATH", str(ROOT))
        print(in_netns(flags), end="")
        return 0
    import json
    rows: dict[Path, list[dict]] = {tree: [] for tree in args.tree}
    for round_ in range(args.rounds):
        for tree in args.tree if round_ % 2 == 0 else list(reversed(args.tree)):
            os.environ["PYTHONPATH"] = str(tree.resolve())
            rows[tree].append(json.loads(in_netns(flags)))
            print(round_, tree, json.dumps(rows[tree][-1]), flush=True)
    # The steady number: a visit's p50 less the minimal relay's in the same round (both
    # move together with the machine's load).
    for tree, tree_rows in rows.items():
        def med(kind: str, rows: list[dict] = tree_rows) -> float:
            return statistics.median(r[kind]["p50_us"] for r in rows)

        def above(kind: str, rows: list[dict] = tree_rows) -> float:
            return statistics.median(r[kind]["p50_us"] - r[f"floor {kind}"]["p50_us"]
                                     for r in rows)
        print(f"{tree}: " + " | ".join(f"{kind} {med(kind):.1f} (+{above(kind):.1f})"
                                       for kind in KINDS)
              + " us: medians of the rounds' p50s (+ above the floor's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
