"""What the NAT shell's namespace tests share (tests/test_nat_shell*.py): the outside's
servers (UDP echo telling the TTL it saw, a DNS responder), `Guest` (what the shell delivers,
read back by scapy) and `run_in_hub`, a NatShell running in the hub's namespace."""

from __future__ import annotations

import ipaddress
import math
import os
import shutil
import socket
import struct

import pytest
import trio
from scapy.layers.dns import DNS, DNSRR
from scapy.layers.l2 import Ether

from tests.support.deadline import deadline
from tests.support.nat import checksums_valid, nat_config
from tests.support.nat_netns import inside
from tunnel.nat import NatShell

needs_netns = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and ip(8) for network namespaces")

OUT4 = "10.203.7.2"
OUT6 = "fdcb:7::2"
ECHO_PORT = 7
CLOSED_PORT = 9
ANSWER = "10.1.2.3"
IP_RECVTTL = 12


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Guest:
    """What the shell delivers to the guest, frame by frame."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel(math.inf)

    def deliver(self, frames: list) -> None:
        for frame in frames:
            self.send.send_nowait(frame)

    async def next(self, seconds: float = 5.0) -> Ether:
        with trio.fail_after(seconds):
            frame = await self.receive.receive()
        assert checksums_valid(frame)
        return Ether(bytes(frame.data))


def outside_sockets(netns: str) -> dict[str, socket.socket]:
    """The outside's servers: UDP echo (v4 and v6, telling the TTL it saw) and DNS."""
    with inside(netns):
        echo4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo4.bind((OUT4, ECHO_PORT))
        echo4.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        echo6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        echo6.bind((OUT6, ECHO_PORT))
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns.bind((OUT4, 53))
    return {"echo4": echo4, "echo6": echo6, "dns": dns}


async def echo_server(sock: socket.socket, ttls: list[int]) -> None:
    """Echo each datagram; note the TTL it arrived with (IPv4)."""
    server = trio.socket.from_stdlib_socket(sock)
    while True:
        data, ancillary, _flags, address = await server.recvmsg(65535, 64)
        ttls.extend(struct.unpack("i", cmsg)[0] for level, kind, cmsg in ancillary
                    if (level, kind) == (socket.IPPROTO_IP, socket.IP_TTL))
        await server.sendto(data, address)


async def dns_responder(sock: socket.socket) -> None:
    """Answer every A question with ANSWER."""
    server = trio.socket.from_stdlib_socket(sock)
    while True:
        data, address = await server.recvfrom(65535)
        query = DNS(data)
        answer = DNS(id=query.id, qr=1, ra=1, qd=query.qd,
                     an=DNSRR(rrname=query.qd[0].qname, type="A", rdata=ANSWER))
        await server.sendto(bytes(answer), address)


def run_in_hub(names: dict[str, str], test, *, seconds: float = 30.0, upstreams: str = OUT4,
               **shell_options) -> None:
    """Run `test(shell, guest)` with a NatShell in the hub namespace and the outside's
    servers running; everything bounded by `seconds`."""
    servers = outside_sockets(names["outside"])
    ttls: list[int] = []

    async def main() -> None:
        guest = Guest()
        shell = NatShell(nat_config(), guest.deliver,
                         upstreams=[ipaddress.ip_address(upstreams)], **shell_options)
        shell.ttls = ttls  # what the echo server saw, for the TTL test
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_server, servers["echo4"], ttls)
            nursery.start_soon(echo_server, servers["echo6"], [])
            nursery.start_soon(dns_responder, servers["dns"])
            await nursery.start(shell.run)
            await test(shell, guest)
            nursery.cancel_scope.cancel()

    try:
        with deadline(seconds), inside(names["hub"]):
            trio.run(main)
    finally:
        for sock in servers.values():
            sock.close()
