"""What the attack tests throw at real processes, and what they measure: strangers' TCP
connections (reset, silent, half a TLS handshake, garbage), a PING flood from a peer that never
reads, a hostile guest (the model front-end of tests/support/virtio_driver.py on a real
vhost-user socket, sending tests/support/hostile_frames.py's frames), and a process's resident
memory and open files; and all of them at once while two real guests ping each other
(`attack_while_guests_ping`).  Used by tests/test_tunnel_process_attacks.py,
tests/test_hub_under_attack.py and bench/attack.py."""

from __future__ import annotations

import itertools
import random
import re
import socket
import ssl
import struct
from pathlib import Path

import trio

from netstack.frame import PLAIN
from tests.support.guest import dhcp_guests
from tests.support.hostile_frames import HostileFrames
from tests.support.hub import TunnelKeys, endpoint_process, hub_process
from tests.support.tunnel_client import RawPeer, connect_peer
from tests.support.virtio_driver import (
    GuestRam,
    QueueFullError,
    VhostUserFrontend,
    pack_net_hdr,
)
from tunnel.keys import parse_fingerprint
from tunnel.wire import PING, PING_PAYLOAD, RECORD_HEADER

PING_RECORD = RECORD_HEADER.pack(PING, 0, 0, PING_PAYLOAD.size) + PING_PAYLOAD.pack(1, 2)
# A hostile guest's batch: frames it puts on its TX ring per kick.
HOSTILE_BATCH = 32
# Connections the strangers keep open at once (silent, half TLS, garbage); older ones close.
STRANGERS_HELD = 300
# The legitimate guests' ping, while everything else attacks.
PING_INTERVAL = 0.2


def rss(pid: int) -> int:
    """The process's resident memory in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def reset_from(source: str, port: int, host: str = "127.0.0.1") -> None:
    """Connect from `source`, then close with SO_LINGER 0: the hub's socket is reset."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind((source, 0))
        sock.connect((host, port))


def client_hello() -> bytes:
    """The first flight of a TLS 1.3 client, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a TLS client finished a handshake without a server")


async def flood_pings(peer: RawPeer, seconds: float) -> float | None:
    """PING records as fast as the hub takes them, never reading an answer, for `seconds`
    or until the hub cuts the link (as it does once its writes stall): when it did, after
    how many seconds."""
    flood = PING_RECORD * 4000
    started = trio.current_time()
    with trio.move_on_after(seconds):
        try:
            while True:
                await peer.tls.send_all(flood)
                await trio.sleep(0)
        except trio.BrokenResourceError:
            return trio.current_time() - started
    return None


async def strangers(port: int, seconds: float, host: str = "127.0.0.1") -> dict[str, int]:
    """For `seconds`: connect+RST from many loopback sources, and connections that stay
    silent, stop after a ClientHello, or send garbage.  What was done, counted."""
    done = {"reset": 0, "silent": 0, "half_tls": 0, "garbage": 0}
    hello = client_hello()
    held: list[trio.SocketStream] = []
    with trio.move_on_after(seconds):
        n = 0
        while True:
            n += 1
            await trio.to_thread.run_sync(reset_from, f"127.0.1.{1 + n % 250}", port, host)
            done["reset"] += 1
            if n % 10 == 0:
                kind = ("silent", "half_tls", "garbage")[n // 10 % 3]
                try:
                    stream = await trio.open_tcp_stream(host, port,
                                                        local_address=f"127.0.2.{1 + n % 250}")
                    if kind == "half_tls":
                        await stream.send_all(hello)
                    elif kind == "garbage":
                        await stream.send_all(b"GET / HTTP/1.1\r\n\r\n" * 50)
                    held.append(stream)
                    done[kind] += 1
                except (OSError, trio.BrokenResourceError):
                    pass  # refused or reset by the hub: what it should do to some of them
                if len(held) > STRANGERS_HELD:  # the attacker's own fds are limited too
                    await _close_quietly(held.pop(0))
            await trio.sleep(0)
    for stream in held:
        await _close_quietly(stream)
    return done


async def _close_quietly(stream: trio.SocketStream) -> None:
    try:
        await stream.aclose()
    except (OSError, trio.BrokenResourceError):
        pass


async def hostile_guest(path: str, seconds: float, seed: int) -> int:
    """A guest on the vhost-user socket `path` that sends hostile frames (any ethertype,
    tags, extension-header chains, option soups, giant and truncated frames, random offload
    metadata) for `seconds`; how many it sent."""
    frames = HostileFrames(random.Random(seed))
    sent = 0
    with GuestRam(1 << 23) as ram:
        async with VhostUserFrontend.connect(path, ram) as fe:
            fe.net.post_rx(128, 2048)
            fe.kick(0)
            with trio.move_on_after(seconds):
                while True:
                    batch = []
                    for _ in range(HOSTILE_BATCH):
                        frame = frames.frame()
                        header = (pack_net_hdr() if frame.offload is PLAIN
                                  else pack_net_hdr(*frame.offload))
                        batch.append((header, bytes(frame.data)))
                    fe.net.reclaim_tx()
                    received = len(fe.net.receive())
                    try:
                        if received:
                            fe.net.post_rx(received, 2048)
                        fe.net.send(batch)
                    except QueueFullError:  # the hub has not caught up with the ring yet
                        await trio.sleep(0.01)
                        continue
                    fe.kick(1)
                    sent += len(batch)
                    await trio.sleep(0.005)
    return sent


def replies(ping_output: str) -> list[int]:
    """The sequence numbers that were answered, from busybox ping's output."""
    return [int(n) for n in re.findall(r"seq=(\d+) ttl=", ping_output)]


def longest_stall(answered: list[int], sent: int, interval: float = PING_INTERVAL) -> float:
    """The longest time, in seconds of ping schedule, without an answer (busybox numbers
    requests from 0; the ends count too)."""
    marks = [-1, *sorted(answered), sent]
    return max(b - a for a, b in itertools.pairwise(marks)) * interval


async def attack_while_guests_ping(tmp_path: Path, seconds: float) -> dict:
    keys = TunnelKeys(tmp_path, ("ep1", "mallory"))
    port = keys.port
    hub_args = keys.hub_args("--subnet", "10.77.0.0/24", "--state-dir", str(tmp_path / "state"),
                             "--log-level", "info")
    vm_args = keys.vm_args("ep1", "--log-level", "info")
    async with hub_process(tmp_path, ["gb.sock", "evil.sock"], hub_args) as hub, \
            endpoint_process(tmp_path, "ep1", ["ga.sock", "evil1.sock"], vm_args) as ep1:
        async with dhcp_guests(tmp_path, ga=ep1.socket("ga.sock"),
                               gb=hub.socket("gb.sock")) as ((ga, _), (_, ip_b)):
            await ga.check(f"ping -c 2 -W 2 {ip_b}")
            pid = hub.process.pid
            before = rss(pid)
            count = int(seconds / PING_INTERVAL) + 10
            await ga.check(f"ping -i {PING_INTERVAL} -c {count} -W 1 {ip_b} "
                           ">/tmp/ping.out 2>&1 &")
            mallory = await connect_peer(port, tmp_path / "mallory-id",
                                         parse_fingerprint(keys.hub_fingerprint), "mallory",
                                         receive_buffer=4096)
            results: dict[str, object] = {}

            async def run(name, fn, *args):
                results[name] = await fn(*args)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "strangers", strangers, port, seconds)
                nursery.start_soon(run, "hostile_hub_guest", hostile_guest,
                                   hub.socket("evil.sock"), seconds, 1)
                nursery.start_soon(run, "hostile_remote_guest", hostile_guest,
                                   ep1.socket("evil1.sock"), seconds, 2)
                nursery.start_soon(run, "pings", flood_pings, mallory, seconds)
            await trio.sleep(PING_INTERVAL * 12)  # the ping's last requests
            ping_output = await ga.check("cat /tmp/ping.out")
            assert hub.process.poll() is None, "the hub process died"
            results["rss_growth"] = rss(pid) - before
            results["answered"] = replies(ping_output)
            results["sent"] = count
            results["hub"] = await hub.status()
            results["endpoint"] = await ep1.status()
            await ga.check(f"ping -c 2 -W 2 {ip_b}")  # still talking once it is over
    return results
