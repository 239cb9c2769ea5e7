"""The NAT's TCP endpoint against the real thing: Linux's TCP in a network namespace, behind
a TUN device whose other end is this test driving netstack/nat/tcp.py, with loss,
duplication and reordering injected between them.  The host side of the core is an in-memory
echo with a bounded buffer (so backpressure runs both ways); the kernel client sends a seeded
random stream, half-closes, and checks the echo by sha256.  Needs root (netns, TUN)."""

from __future__ import annotations

import os
import random
import select
import subprocess
import sys
import time
from collections import deque

import pytest

from netstack.frame import HDR_F_NEEDS_CSUM, Frame, Offload
from netstack.nat.tcp import (
    Abort,
    Close,
    Connect,
    Connected,
    Eof,
    Received,
    Refused,
    Send,
    ShutdownWrite,
    TcpConnection,
    ToGuest,
    Written,
)
from netstack.wire import IPPROTO_TCP, Malformed
from netstack.wire.checksum import pseudo_header_sum, sum16, verifies
from netstack.wire.ipv4 import Ipv4, ipv4_header
from netstack.wire.tcp import Tcp
from tests.support.tun_kernel import CLIENT, Impairment, kernel_behind_tun
from tunnel.host.tuntap import TunTapDevice

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and TUN")

CORE_IP = "10.203.0.2"
CORE_IP_BYTES = bytes([10, 203, 0, 2])
PORT = 7000
CLOSED_PORT = 7001
TRACE_LINES = 60
ECHO_BUFFER = 96 * 1024  # the pretend host socket's buffer: full means no Written


def tcp_view(packet: bytes, partial_checksum: bool = False) -> tuple[Ipv4, Tcp] | None:
    """The checked IPv4/TCP views of a packet for the core's address, checksum verified
    unless the sender left it partial (the NAT's job before the core)."""
    try:
        ip = Ipv4(packet)
        if ip.protocol != IPPROTO_TCP or bytes(ip.dst) != CORE_IP_BYTES or ip.is_fragment:
            return None
        tcp = Tcp(ip.data, ip.payload_offset, ip.end)
    except Malformed:
        return None
    if partial_checksum:
        return ip, tcp
    total = pseudo_header_sum(bytes(ip.src), bytes(ip.dst), IPPROTO_TCP, tcp.end - tcp.offset)
    if not verifies(total + sum16(ip.data[tcp.offset:tcp.end])):
        return None
    return ip, tcp


def drive(dev: TunTapDevice, client: subprocess.Popen, *, loss: float, dup: float,
          reorder: float, seed: int, limit: float) -> dict:
    """Run the core against the kernel until the client exits; returns the connection's
    counters (and what ended it)."""
    rng = random.Random(seed)
    inbound = Impairment(rng, loss, dup, reorder)
    outbound = Impairment(rng, loss, dup, reorder)
    conns: dict[tuple[bytes, int, int], TcpConnection] = {}
    inbox = bytearray()  # bytes Sent to the pretend host socket, not yet Written
    echo = bytearray()  # what the pretend remote will echo back
    shut = False
    eof_sent = False
    ended: list[object] = []
    start = time.monotonic()
    conn: TcpConnection | None = None
    largest = 0  # the largest packet the kernel sent
    trace: deque[str] = deque(maxlen=TRACE_LINES)  # the last segments, for a failure message

    def note(direction: str, tcp: Tcp, dropped: bool) -> None:
        trace.append(f"{time.monotonic() - start:8.3f} {direction} seq={tcp.seq} "
                     f"ack={tcp.ack} flags={tcp.flags:#04x} win={tcp.window} "
                     f"len={len(tcp.payload)}{' LOST' if dropped else ''}")

    def handle(outputs: list, c: TcpConnection, now: float) -> list[bytes]:
        nonlocal shut
        frames: list[bytes] = []
        for o in outputs:
            if isinstance(o, ToGuest):
                body = c.encode(o)
                passed = outbound(ipv4_header(c.remote_ip, c.guest_ip, IPPROTO_TCP,
                                              len(body)) + body)
                note("->", Tcp(body), not passed)
                frames += passed
            elif isinstance(o, Connect):
                event = Connected() if c.remote_port == PORT else Refused("ECONNREFUSED")
                frames += handle(c.on_host(event, now), c, now)
            elif isinstance(o, Send):
                inbox.extend(o.data)
            elif isinstance(o, ShutdownWrite):
                shut = True
            elif isinstance(o, Abort | Close):
                ended.append(o)
        return frames

    while client.poll() is None:
        now = time.monotonic()
        if now - start > limit:
            c = next(iter(conns.values()), None)
            raise AssertionError(f"no end within {limit} s: {c and c.state} "
                                 f"{c and c.counters.as_dict()} inbox {len(inbox)} "
                                 f"echo {len(echo)} shut {shut} eof {eof_sent}\n"
                                 + "\n".join(trace))
        out: list[bytes] = []
        for frame in dev.read_batch():
            partial = bool(frame.offload[0] & HDR_F_NEEDS_CSUM)
            largest = max(largest, len(frame.data))
            passed = inbound(bytes(frame.data))
            if not passed and (views := tcp_view(bytes(frame.data))) is not None:
                note("<-", views[1], True)
            for packet in passed:
                views = tcp_view(packet, partial)
                if views is None:
                    continue
                note("<-", views[1], False)
                ip, tcp = views
                key = (bytes(ip.src), tcp.src_port, tcp.dst_port)
                c = conns.get(key)
                if c is None:  # one connection per key: a closed one answers late frames
                    c = conns[key] = TcpConnection(bytes(ip.src), tcp.src_port, CORE_IP_BYTES,
                                                   tcp.dst_port, now)
                out += handle(c.from_guest(tcp, now), c, now)
        conn = next((c for c in conns.values() if c.remote_port == PORT), None)
        if conn is not None and not conn.closed:
            # The pretend host socket: takes bytes while its buffer has room, echoes them.
            room = ECHO_BUFFER - len(echo)
            if inbox and room > 0:
                n = min(room, len(inbox))
                echo.extend(inbox[:n])
                del inbox[:n]
                out += handle(conn.on_host(Written(n), now), conn, now)
            budget = conn.host_read_budget()
            if echo and budget:
                n = min(budget, len(echo), 65536)
                chunk = bytes(echo[:n])
                del echo[:n]
                out += handle(conn.on_host(Received(chunk), now), conn, now)
            if shut and not inbox and not echo and not eof_sent:
                eof_sent = True
                out += handle(conn.on_host(Eof(), now), conn, now)
        for c in conns.values():
            deadline = c.next_deadline()
            if deadline is not None and deadline <= now:
                out += handle(c.tick(now), c, now)
        if out:
            dev.write_batch([Frame(p) for p in out])
        else:
            select.select([dev.fd], [], [], 0.002)
    result = {"ended": ended, "conns": conns, "largest": largest,
              "impaired": inbound.impaired + outbound.impaired}
    if conn is not None:
        result["counters"] = conn.counters.as_dict()
    return result


def run_client(offloads: Offload, port: int, size: int, *, rcvbuf: int = 0,
               read_delay: float = 0.0, loss: float = 0.0, dup: float = 0.0,
               reorder: float = 0.0, seed: int = 1) -> tuple[subprocess.CompletedProcess, dict]:
    """The kernel client in its namespace against the core, to the end; bounded at 25 s."""
    with kernel_behind_tun(offloads) as (dev, ns):
        args = ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, CORE_IP, str(port),
                str(size), str(seed), str(rcvbuf), str(read_delay)]
        client = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            result = drive(dev, client, loss=loss, dup=dup, reorder=reorder, seed=seed,
                           limit=25)
        finally:
            if client.poll() is None:
                client.kill()
            stdout, stderr = client.communicate(timeout=10)
    return subprocess.CompletedProcess(args, client.returncode, stdout, stderr), result


def assert_echoed(done: subprocess.CompletedProcess, size: int) -> None:
    assert done.returncode == 0, done.stderr
    sent_hash, echo_hash, echoed = done.stdout.split()
    assert sent_hash == echo_hash and int(echoed) == size


TSO = Offload.CSUM | Offload.TSO4


@pytest.mark.parametrize(("loss", "dup", "reorder", "size", "seed", "offloads"), [
    (0.0, 0.0, 0.0, 2_000_000, 1, Offload.NONE),
    (0.03, 0.02, 0.05, 400_000, 11, Offload.NONE),
    (0.03, 0.02, 0.05, 400_000, 12, Offload.NONE),
    (0.08, 0.05, 0.10, 200_000, 13, Offload.NONE),
    (0.0, 0.0, 0.0, 4_000_000, 2, TSO),
    (0.03, 0.02, 0.05, 1_000_000, 14, TSO),
])
def test_linux_tcp_echoes_through_the_core_with_loss_duplication_and_reordering(
        loss, dup, reorder, size, seed, offloads):
    done, result = run_client(offloads, PORT, size, loss=loss, dup=dup, reorder=reorder,
                              seed=seed)
    assert_echoed(done, size)
    counters = result["counters"]
    assert counters["bytes_to_host"] == size == counters["bytes_to_guest"]
    if loss:
        assert result["impaired"] > 0
    if offloads & Offload.TSO4:  # the kernel's TSO segments were taken whole
        assert result["largest"] > 10_000


def test_a_stalled_linux_reader_is_probed_through_its_zero_window_and_the_data_arrives():
    done, result = run_client(Offload.NONE, PORT, 600_000, rcvbuf=4096, read_delay=2.5,
                              seed=3)
    assert_echoed(done, 600_000)
    assert result["counters"]["window_probes"] > 0


def test_a_refused_connect_reaches_the_kernel_as_connection_refused():
    done, _ = run_client(Offload.NONE, CLOSED_PORT, 10)
    assert done.returncode != 0 and "ConnectionRefusedError" in done.stderr
