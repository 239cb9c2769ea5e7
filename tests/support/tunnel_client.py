"""A raw tunnel client for attack tests: it authenticates like an endpoint (tunnel/keys.py,
tunnel/wire.py, tunnel/tls.py), over TCP or over a memory stream (tests/support/memlink.py),
and then hands the TLS stream and the codec to the test, which sends whatever it likes (a
PING flood, random records) and reads only if it wants to."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

import trio
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from netstack.frame import ALL_OFFLOADS, Frame
from tunnel.keys import check_server, client_ssl_context, load_identity, sign_client_auth
from tunnel.tls import TLSStream
from tunnel.wire import Frames, Hello, WireConnection

# The segment the raw-peer tests put a hub on, and the address "alice" (a raw peer) sends
# from: tests/test_tunnel_process_attacks.py and tests/test_capture.py.
SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
GATEWAY = ipaddress.IPv4Interface("10.77.0.1/24")
ALICE_MAC = bytes.fromhex("020000000a01")
ALICE_IP = "10.77.0.50"


@dataclass
class RawPeer:
    tls: TLSStream
    wire: WireConnection

    async def read_until_closed(self, timeout: float) -> bool:
        """Read (and drop) everything until the hub closes; False if it did not in time."""
        with trio.move_on_after(timeout):
            try:
                while await self.tls.receive_some(1 << 16):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return True
        return False

    async def echo(self, mac: bytes, address: str, gateway_mac: bytes,
                   gateway: ipaddress.IPv4Interface, sequence: int,
                   timeout: float = 5.0) -> None:
        """An ICMP echo from `address` (a MAC behind this peer) to the hub's gateway, and its
        reply: traffic through the hub's switch and services both ways."""
        request = (Ether(src=mac, dst=gateway_mac) / IP(src=address, dst=str(gateway.ip))
                   / ICMP(type=8, id=0x7575, seq=sequence))
        await self.tls.send_all(self.wire.send_frames([Frame(bytes(request))]))
        with trio.fail_after(timeout):
            while True:
                self.wire.receive_data(await self.tls.receive_some(1 << 16))
                for event in self.wire.next_events():
                    if not isinstance(event, Frames):
                        continue
                    for frame in event.frames:
                        reply = Ether(bytes(frame.data))
                        if (ICMP in reply and reply[ICMP].type == 0
                                and reply[ICMP].seq == sequence):
                            return


async def connect_peer(port: int, identity_dir: Path, hub_fingerprint: bytes, name: str, *,
                       host: str = "127.0.0.1", receive_buffer: int | None = None,
                       timeout: float = 10.0, introductions: bool = False) -> RawPeer:
    """An authenticated connection to the hub at host:port; `receive_buffer` shrinks the
    socket's SO_RCVBUF before connecting (a peer that reads nothing fills it sooner)."""
    with trio.fail_after(timeout):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect((host, port))
        return await log_in(trio.SocketStream(sock), identity_dir, hub_fingerprint, name,
                            introductions=introductions)


async def log_in(stream: trio.abc.Stream, identity_dir: Path, hub_fingerprint: bytes,
                 name: str, *, introductions: bool = False) -> RawPeer:
    """TLS, HELLO and AUTH over `stream` (a socket or a memory stream) as the endpoint
    whose key is in `identity_dir`; the hub's verdict is not awaited.  `introductions`: a
    hub link that may ADVERTISE and hear INTRO (tunnel/wire.py, version 2)."""
    tls = TLSStream(stream, client_ssl_context(), server_side=False)
    await tls.do_handshake()
    check_server(tls, hub_fingerprint)
    wire = WireConnection("client", name=name, offloads=int(ALL_OFFLOADS), mtu=1500,
                          introductions=introductions)
    await tls.send_all(wire.send_hello())
    hello = None
    while hello is None:
        wire.receive_data(await tls.receive_some(1 << 16))
        hello = next((e for e in wire.next_events() if isinstance(e, Hello)), None)
    certificate, signature = sign_client_auth(load_identity(identity_dir), hello.challenge,
                                              hub_fingerprint, name)
    await tls.send_all(wire.send_auth(certificate, signature))
    return RawPeer(tls, wire)
