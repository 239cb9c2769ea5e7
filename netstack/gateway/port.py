"""The hub's own host on the segment: one MAC address, the gateway's IPv4 and IPv6 addresses,
and the services that live there, as one switch port (trusted, not policed).

What it answers, in untagged frames only (everything else is ignored; malformed frames are
dropped and counted):
  ARP       requests for the gateway's IPv4 address
  ICMP      echo requests to the gateway's IPv4 address (not fragmented, checksums right)
  NDP       neighbour solicitations for its IPv6 addresses (link-local and prefix::1)
  ICMPv6    echo requests to those addresses
  RS        router solicitations -> a router advertisement (netstack.gateway.ra)
  DHCPv4    requests to UDP port 67 -> the DHCP server (netstack.dhcp)
IPv6 is read at fixed offsets, its extension-header chain walked by netstack.wire.ipv6: ICMPv6
is answered behind a sane chain with a right checksum, never in a fragment (`fragment`).
ARP requests, neighbour and router solicitations are read and checked by netstack.neighbour,
the same checks the TUN host's L3 host makes (a wrong hop limit or code: `nd_hop_limit`, a
wrong checksum: `bad_checksum`), and answered with its builders.  dpkt parses IPv4 requests.
Whatever one frame raises is that frame's: counted `malformed` (a traceback logged, rate
limited, when unexpected).
Why one port for all of them: a port is a MAC address on the switch, and the services share
the gateway's MAC and addresses -- a DHCP client renews by unicast to the address ARP gave it.

Sans-I/O: `deliver()` (called by the switch) answers at once into `outbox` and calls
`on_ready`; `tick(now)` does the timed work (periodic advertisements, lease expiry);
`next_deadline()` says when.  The hub's shell moves `outbox` into the switch.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import dpkt

from netstack.frame import (
    ETH_HEADER_LEN,
    ETH_P_IP,
    ETHERTYPE_ARP,
    ETHERTYPE_IP,
    ETHERTYPE_IPV6,
    Frame,
    Offload,
)
from netstack.gateway.ra import RouterAdvertiser
from netstack.neighbour import (
    ICMPV6_NS,
    ICMPV6_RS,
    arp_reply,
    ethernet,
    icmpv6,
    link_local_from_mac,
    read_arp,
    read_nd,
    read_solicitation,
)
from netstack.port import SpeakingPort
from netstack.wire import IPPROTO_ICMPV6, Malformed
from netstack.wire.icmpv6 import icmpv6_checksum_ok
from netstack.wire.ipv6 import IPV6_HEADER_LEN, walk_chain

log = logging.getLogger(__name__)

IPV6_ANY = bytes(16)
BROADCAST_MAC = b"\xff" * 6
IPV6_MULTICAST_MAC_PREFIX = 0x33
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
DHCP_SERVER_PORT = 67
DEFAULT_TTL = 64

# What reading a hostile frame may raise: counted `malformed`, no traceback.
_MALFORMED = (Malformed, dpkt.UnpackError, struct.error, IndexError)
# Malformed ND messages counted under their own drop reason (the rest: `malformed`).
_ND_DROPS = {"nd_hop_limit": "nd_hop_limit", "icmpv6_checksum": "bad_checksum"}


class DhcpService:
    """What the gateway needs of a DHCP server (netstack.dhcp.DhcpServer)."""

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
        super().__init__("gateway", Offload.NONE, policy=None)
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
                if dst != self.mac and dst != BROADCAST_MAC \
                        and data[0] != IPV6_MULTICAST_MAC_PREFIX:
                    continue  # flooded unicast for someone else
                replies.extend(self._answer(bytes(data)))
            except _MALFORMED:
                self.counters.drop("malformed")
            except Exception:  # one frame's trouble is that frame's
                self.drop_unexpected("malformed", 1, "answering a frame")
        self.counters.out_frames += len(frames)
        self.counters.out_bytes += nbytes
        if replies:
            self._send(replies)

    def _answer(self, data: bytes) -> list[Frame]:
        ethertype = data[12:14]
        if ethertype == ETHERTYPE_IPV6:
            return self._ipv6(data) if self.ipv6 else []
        if self.ipv4 is None or (ethertype != ETHERTYPE_ARP and ethertype != ETHERTYPE_IP):
            return []  # VLAN-tagged and other frames: not on the gateway's segment
        if ethertype == ETHERTYPE_ARP:
            arp = read_arp(data)
            if not arp.asks_for(self.ipv4):
                return []
            self.services["arp_reply"] += 1
            return [arp_reply(arp, self.mac, self.ipv4)]
        return self._ipv4(dpkt.ethernet.Ethernet(data), data)

    # -- IPv4 ------------------------------------------------------------------------------

    def _ipv4(self, eth: dpkt.ethernet.Ethernet, data: bytes) -> list[Frame]:
        ip = eth.data
        if not isinstance(ip, dpkt.ip.IP):
            raise Malformed("ipv4_header", "truncated")
        header_len = ip.hl * 4
        if ip.v != 4 or not header_len <= ip.len <= len(data) - ETH_HEADER_LEN:
            raise Malformed("ipv4_header", f"version {ip.v}, total length {ip.len}")
        if ip.mf or ip.offset:
            self.counters.drop("fragment")
            return []
        if ip.p == dpkt.ip.IP_PROTO_UDP and isinstance(ip.data, dpkt.udp.UDP) \
                and ip.data.dport == DHCP_SERVER_PORT:
            if self.dhcp is None:
                return []
            return [Frame(reply) for reply in self.dhcp.handle(data)]
        if ip.dst != self.ipv4 or ip.p != dpkt.ip.IP_PROTO_ICMP:
            return []
        icmp = ip.data
        if not isinstance(icmp, dpkt.icmp.ICMP) or icmp.type != ICMP_ECHO_REQUEST:
            return []
        if dpkt.in_cksum(data[ETH_HEADER_LEN : ETH_HEADER_LEN + header_len]) != 0 \
                or dpkt.in_cksum(bytes(icmp)) != 0:
            self.counters.drop("bad_checksum")
            return []
        if ip.src[0] == 0 or ip.src[0] >= 224:
            return []  # no answer to an unspecified, multicast or broadcast source
        self.services["icmp_echo"] += 1
        reply_icmp = dpkt.icmp.ICMP(type=ICMP_ECHO_REPLY, code=0, data=icmp.data)
        reply = dpkt.ip.IP(src=self.ipv4, dst=ip.src, p=dpkt.ip.IP_PROTO_ICMP, ttl=DEFAULT_TTL,
                           data=reply_icmp)
        reply.len = len(reply)
        return [ethernet(eth.src, self.mac, ETH_P_IP, reply)]

    # -- IPv6 ------------------------------------------------------------------------------

    def _ipv6(self, data: bytes) -> list[Frame]:
        ip_end = ETH_HEADER_LEN + IPV6_HEADER_LEN
        if len(data) < ip_end or data[ETH_HEADER_LEN] >> 4 != 6:
            raise Malformed("ipv6_header", f"in a {len(data)}-byte frame")
        end = ip_end + int.from_bytes(data[18:20], "big")
        if end == ip_end or end > len(data):
            raise Malformed("ipv6_length", f"payload ends at {end} of a {len(data)}-byte frame")
        chain = walk_chain(data, ETH_HEADER_LEN, end)
        if chain is None:
            raise Malformed("ipv6_extension_headers")
        if chain.fragmented:
            self.counters.drop("fragment")
            return []
        if chain.next_header != IPPROTO_ICMPV6:
            return []
        icmp = data[chain.position : end]
        if len(icmp) < 4:
            raise Malformed("icmpv6_length", f"{len(icmp)} bytes")
        kind = icmp[0]
        src, dst = data[22:38], data[38:54]
        if kind == ICMPV6_ECHO_REQUEST:
            if not icmpv6_checksum_ok(src, dst, icmp):
                self.counters.drop("bad_checksum")
                return []
            if dst not in self.ipv6 or src == IPV6_ANY or src[0] == 0xFF:
                return []
            self.services["icmpv6_echo"] += 1
            return [icmpv6(self.mac, data[6:12], dst, src, ICMPV6_ECHO_REPLY, icmp[4:],
                           DEFAULT_TTL)]
        if kind != ICMPV6_NS and (kind != ICMPV6_RS or self.ra is None):
            return []
        try:
            nd = read_nd(src, dst, data[21], icmp)
        except Malformed as error:
            if error.reason not in _ND_DROPS:
                raise
            self.counters.drop(_ND_DROPS[error.reason])
            return []
        if kind == ICMPV6_RS:
            return self.ra.solicited(self.clock())
        solicitation = read_solicitation(nd, src, dst)
        if solicitation.target not in self.ipv6:
            return []
        self.services["neighbour_advertisement"] += 1
        return [solicitation.answer(self.mac, src, data[6:12], router=True)]

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
