"""The hub's own host on the segment: one MAC address, the gateway's IPv4 and IPv6 addresses,
and the services that live there, as one switch port (trusted, not policed).

What it answers, in untagged frames only (everything else is ignored; malformed frames are
dropped and counted):
  ARP       requests for the gateway's IPv4 address
  ICMP      echo requests to the gateway's IPv4 address (not fragmented, checksums right)
  NDP       neighbour solicitations for its IPv6 addresses (link-local and prefix::1)
  ICMPv6    echo requests to those addresses
  RS        router solicitations -> a router advertisement (netstack.gateway.ra)
  DHCPv4    requests to UDP port 67 -> the DHCP server (netstack.gateway.dhcp_server)
Every header is read through the netstack.wire views, every reply built with its builders.
ICMPv6 is answered behind a sane extension-header chain with a right checksum, never in a
fragment (IPv4 or IPv6: `fragment`).  ARP requests, neighbour and router solicitations are
checked and answered by netstack.neighbour, with the checks the TUN host's L3 host makes (a
hop limit other than 255 or a code: `nd_hop_limit`, a wrong checksum: `bad_checksum`).  A
frame a view or those checks refuse is counted `malformed`; whatever else one frame raises
is that frame's too (counted `malformed`, a traceback logged, rate limited).
Why one port for all of them: a port is a MAC address on the switch, and the services share
the gateway's MAC and addresses -- a DHCP client renews by unicast to the address ARP gave it.

Sans-I/O: `deliver()` (called by the switch) answers at once into `outbox` and calls
`on_ready`; `tick(now)` does the timed work (periodic advertisements, lease expiry);
`next_deadline()` says when.  The hub's shell moves `outbox` into the switch.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from netstack.frame import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Frame, Offload
from netstack.gateway.ra import RouterAdvertiser
from netstack.neighbour import (
    arp_reply,
    asks_for,
    icmpv6_frame,
    link_local_from_mac,
    read_arp,
    read_router_solicitation,
    read_solicitation,
)
from netstack.port import SpeakingPort
from netstack.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, Malformed, icmpv6
from netstack.wire import icmp as icmp4
from netstack.wire.ethernet import BROADCAST, Ethernet, ethernet_frame
from netstack.wire.ipv4 import DEFAULT_TTL, Ipv4, ipv4_header
from netstack.wire.ipv6 import ANY, Ipv6
from netstack.wire.udp import Udp

log = logging.getLogger(__name__)

IPV6_MULTICAST_MAC_PREFIX = 0x33
DHCP_SERVER_PORT = 67

# Malformed ND messages counted under their own drop reason (the rest: `malformed`).
_ND_DROPS = {"nd_hop_limit": "nd_hop_limit", "icmpv6_checksum": "bad_checksum"}


class DhcpService:
    """What the gateway needs of a DHCP server (netstack.gateway.dhcp_server.DhcpServer)."""

    counters: Counter[str]

    def clock(self) -> float: ...  # the server's own clock (wall time: leases outlive us)
    def handle(self, frame: bytes) -> list[bytes]: ...
    def expire(self, now: float) -> None: ...


@dataclass(frozen=True)
class GatewayConfig:
    mac: bytes
    ipv4: ipaddress.IPv4Interface | None = None  # gateway address and the subnet's prefix
    ipv6_prefix: ipaddress.IPv6Network | None = None  # a /64; the gateway is prefix::1
    mtu: int = 1500
    dns6: tuple[ipaddress.IPv6Address, ...] = ()


# How often the timed work runs at the least (DHCP lease expiry).
HOUSEKEEPING_SECONDS = 10.0


class GatewayPort(SpeakingPort):
    service = True  # see Port: no unknown unicast floods, callers' frames rate limited

    def __init__(
        self,
        config: GatewayConfig,
        dhcp: DhcpService | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        # Guests' TSO frames whole and partial checksums as they are: the NAT reads a
        # 64 KiB segment as one (netstack.nat.packet); no service here checks a partial sum.
        super().__init__("gateway", Offload.CSUM | Offload.TSO4 | Offload.TSO6, policy=None)
        self.config = config
        self.clock = clock or time.monotonic
        self.mac = config.mac
        self.ipv4 = config.ipv4.ip.packed if config.ipv4 else None
        self.ipv6: set[bytes] = set()
        self.ra: RouterAdvertiser | None = None
        if config.ipv6_prefix is not None:
            router = config.ipv6_prefix.network_address + 1
            self.ipv6 = {link_local_from_mac(self.mac).packed, router.packed}
            self.ra = RouterAdvertiser(self.mac, config.ipv6_prefix, config.mtu, config.dns6)
        self.dhcp = dhcp
        self.services: Counter[str] = Counter()
        self._next_housekeeping = 0.0

    # -- frames from the switch -------------------------------------------------------------

    @property
    def addresses(self) -> list[bytes]:
        """The gateway's own IPv4 and IPv6 addresses (the switch reserves them for it)."""
        return ([self.ipv4] if self.ipv4 is not None else []) + sorted(self.ipv6)

    def deliver(self, frames: list[Frame]) -> None:
        replies: list[Frame] = []
        nbytes = 0
        for frame in frames:
            data = frame.data
            nbytes += len(data)
            try:
                dst = data[0:6]
                if dst != self.mac and dst != BROADCAST and data[0] != IPV6_MULTICAST_MAC_PREFIX:
                    continue  # flooded unicast for someone else
                replies.extend(self._answer(bytes(data)))
            except Malformed:
                self.counters.drop("malformed")
            except Exception:  # one frame's trouble is that frame's
                self.drop_unexpected("malformed", 1, "answering a frame")
        self.counters.out_frames += len(frames)
        self.counters.out_bytes += nbytes
        if replies:
            self._send(replies)

    def _answer(self, data: bytes) -> list[Frame]:
        eth = Ethernet(data)
        if eth.tci is not None:
            return []  # VLAN-tagged frames: not on the gateway's segment
        if eth.ethertype == ETH_P_IPV6:
            return self._ipv6(eth, data) if self.ipv6 else []
        if self.ipv4 is None:
            return []
        if eth.ethertype == ETH_P_ARP:
            arp = read_arp(data, eth.payload_offset)
            if not asks_for(arp, self.ipv4):
                return []
            self.services["arp_reply"] += 1
            return [arp_reply(arp, self.mac, self.ipv4)]
        if eth.ethertype == ETH_P_IP:
            return self._ipv4(eth, data)
        return []

    # -- IPv4 ------------------------------------------------------------------------------

    def _ipv4(self, eth: Ethernet, data: bytes) -> list[Frame]:
        ip = Ipv4(data, eth.payload_offset)
        if ip.is_fragment:
            self.counters.drop("fragment")
            return []
        if ip.protocol == IPPROTO_UDP:
            if Udp(data, ip.payload_offset, ip.end).dst_port != DHCP_SERVER_PORT \
                    or self.dhcp is None:
                return []
            return [Frame(reply) for reply in self.dhcp.handle(data)]
        if ip.dst != self.ipv4 or ip.protocol != IPPROTO_ICMP:
            return []
        request = icmp4.Icmp(data, ip.payload_offset, ip.end)
        if request.type != icmp4.ECHO_REQUEST:
            return []
        if not ip.header_checksum_ok() or not request.checksum_ok():
            self.counters.drop("bad_checksum")
            return []
        src = bytes(ip.src)
        if src[0] == 0 or src[0] >= 224:
            return []  # no answer to an unspecified, multicast or broadcast source
        self.services["icmp_echo"] += 1
        reply = icmp4.echo_reply(request)
        header = ipv4_header(self.ipv4, src, IPPROTO_ICMP, len(reply), ttl=DEFAULT_TTL)
        return [Frame(ethernet_frame(bytes(eth.src), self.mac, ETH_P_IP, header + reply))]

    # -- IPv6 ------------------------------------------------------------------------------

    def _ipv6(self, eth: Ethernet, data: bytes) -> list[Frame]:
        ip = Ipv6(data, eth.payload_offset)
        if ip.payload_length == 0:
            raise Malformed("ipv6_length", "no payload")
        chain = ip.chain()
        if chain.fragmented:
            self.counters.drop("fragment")
            return []
        if chain.next_header != IPPROTO_ICMPV6:
            return []
        message = icmpv6.Icmpv6(data, chain.position, ip.end)
        kind = message.type
        src, dst = bytes(ip.src), bytes(ip.dst)
        if kind == icmpv6.ECHO_REQUEST:
            if not message.checksum_ok(src, dst):
                self.counters.drop("bad_checksum")
                return []
            if dst not in self.ipv6 or src == ANY or src[0] == 0xFF:
                return []
            self.services["icmpv6_echo"] += 1
            return [icmpv6_frame(self.mac, bytes(eth.src), dst, src,
                                 icmpv6.echo_reply(dst, src, message), DEFAULT_TTL)]
        try:
            if kind == icmpv6.ROUTER_SOLICITATION and self.ra is not None:
                read_router_solicitation(ip, message)
                return self.ra.solicited(self.clock())
            if kind != icmpv6.NEIGHBOR_SOLICITATION:
                return []
            solicitation = read_solicitation(ip, message)
        except Malformed as error:
            if error.reason not in _ND_DROPS:
                raise
            self.counters.drop(_ND_DROPS[error.reason])
            return []
        if solicitation.target not in self.ipv6:
            return []
        self.services["neighbour_advertisement"] += 1
        return [solicitation.answer(self.mac, bytes(eth.src), router=True)]

    # -- timed work ---------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Do what is due at `now` (on the gateway's clock): periodic router advertisements,
        DHCP lease expiry (on the DHCP server's own clock)."""
        frames = self.ra.tick(now) if self.ra is not None else []
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_SECONDS
            if self.dhcp is not None:
                self.dhcp.expire(self.dhcp.clock())
        if frames:
            self._send(frames)

    def next_deadline(self) -> float:
        deadline = self._next_housekeeping
        if self.ra is not None and self.ra.next_deadline() is not None:
            deadline = min(deadline, self.ra.next_deadline())
        return deadline

    def status(self) -> dict[str, object]:
        status = super().status()
        status["kind"] = "gateway"
        status["services"] = dict(self.services)
        if self.ra is not None:
            status["services"] |= dict(self.ra.counters)
        if self.dhcp is not None:
            status["dhcp"] = dict(self.dhcp.counters)
            status["dhcp_tables"] = self.dhcp.table_sizes()
        return status
