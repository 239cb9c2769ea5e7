"""A host's presence on the Ethernet segment on behalf of a TUN device (`vhostvpn host --tun`).

A TUN device carries IP packets, the segment carries Ethernet frames.  `L3Host` is the
link layer between them: it owns one MAC address and does what a kernel's neighbour code
does for an Ethernet interface -- ARP, IPv6 neighbour discovery, router advertisements --
so the host's kernel sees a plain point-to-point device.  Sans-I/O: packets and frames in,
packets and frames out, the clock injected; the shell moves them between the TUN and the
switch and calls `tick` at `next_deadline()`.

The path of a packet from the host (`from_host`):
  1. fixed-offset read of the IP version and destination (no parsing beyond that);
  2. the next hop: IPv4 broadcast and multicast map straight to a MAC (RFC 1112 6.4); an
     on-link destination (our IPv4 subnet, fe80::/10, an on-link IPv6 prefix) is its own
     next hop; anything else goes to the IPv4 gateway / the IPv6 default router;
  3. the neighbour cache: resolved -> one Ethernet frame, the offload metadata shifted by
     the 14-byte header (csum_start when NEEDS_CSUM, hdr_len when non-zero); unresolved ->
     the packet waits in a bounded queue and an ARP request / neighbour solicitation goes
     out (one per destination per second, three in all, then the queue is dropped).
A cache entry is good for REACHABLE_SECONDS after the neighbour last answered; in its last
REFRESH_SECONDS a packet to it also sends a unicast probe, so busy flows never stall.

The path of a frame from the segment (`from_segment`), after the Ethernet destination
check (our MAC, broadcast or multicast; other unicast is `not_for_us`):
  ARP          a request for our IPv4 address -> a reply; the sender is learned when it
               asked us, when we asked it, or when it is already cached (RFC 826's merge)
  NS           for one of our IPv6 addresses -> NA (solicited, override); the sender's
               link-layer address is learned; from :: (someone's DAD for our address) ->
               NA to all-nodes, counted as `dad_conflict`
  NA           learned when cached or asked for (no override of a cached MAC without O)
  RA           from a link-local source: default router (lifetime), its MAC, MTU, RDNSS,
               on-link prefixes (L) and SLAAC (A, /64: the modified EUI-64 of our MAC;
               the RFC 4862 5.5.3 two-hour rule against shortened lifetimes)
  IPv4/IPv6    to our MAC: the IP packet for the TUN (Ethernet padding trimmed, offload
               metadata shifted back); broadcast/multicast: IPv4 broadcast or multicast and
               IPv6 multicast destinations only (the host's kernel filters groups)
Everything else is ignored and counted.  ND messages (RS, RA, NS, NA, redirect) are
consumed here and never reach the TUN: the host's kernel does no ND on a TUN device.

What it refuses, counted in `counters` (never raised): short or inconsistent headers, ND
with a hop limit other than 255, a bad ICMPv6 checksum, option lengths of 0 or past the
end, a multicast or zero link-layer address, an ARP claim to our own address.  Anything
else one frame makes `from_segment` raise is that frame's: counted `malformed`, its
traceback logged (at most once a minute).

Choices:
* No duplicate address detection: the link-local and SLAAC addresses are EUI-64 of our
  MAC, unique as long as the MAC is (and a duplicate MAC breaks the switch first).  Our
  addresses are defended: a DAD probe for one of them is answered and counted.
* No ICMP unreachable back to the host when resolution fails: the packets are dropped and
  counted (`unresolved_dropped`); the host's transport retries.
* IPv6 source addresses are the host's business; the hub's port policy polices them.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

import dpkt

from netstack.frame import (
    ETH_HEADER_LEN,
    ETH_P_ARP,
    ETH_P_IPV6,
    ETHERTYPE_ARP,
    ETHERTYPE_IP,
    ETHERTYPE_IPV6,
    HDR_F_NEEDS_CSUM,
    PLAIN,
    Frame,
    OffloadInfo,
)
from netstack.neighbour import HOP_LIMIT_ND, link_local_from_mac
from netstack.port import TracebackLog
from netstack.wire.icmpv6 import icmpv6_checksum_ok

log = logging.getLogger(__name__)

# --- Numbers from the specs ---------------------------------------------------------------

BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = bytes(6)
IPV4_MULTICAST_MAC_PREFIX = b"\x01\x00\x5e"  # RFC 1112 6.4
IPV6_MULTICAST_MAC_PREFIX = b"\x33\x33"  # RFC 2464 7
IPV4_BROADCAST = b"\xff\xff\xff\xff"
IPV4_ANY = bytes(4)
IPV6_ANY = bytes(16)
IPV6_LOOPBACK = IPv6Address("::1").packed
ALL_NODES = IPv6Address("ff02::1").packed
SOLICITED_NODE_PREFIX = IPv6Address("ff02::1:ff00:0").packed[:13]  # RFC 4291 2.7.1

IPV4_MIN_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
ARP_LEN = 28  # RFC 826 for Ethernet/IPv4
ARP_HTYPE_ETHERNET = 1
ARP_PTYPE_IPV4 = 0x0800
ARP_OP_REQUEST = 1
ARP_OP_REPLY = 2
ARP_HEADER = struct.Struct("!HHBBH6s4s6s4s")

IPPROTO_ICMPV6 = 58
ICMPV6_RS = 133
ICMPV6_RA = 134
ICMPV6_NS = 135
ICMPV6_NA = 136
ICMPV6_REDIRECT = 137
NA_FLAG_ROUTER = 0x80
NA_FLAG_SOLICITED = 0x40
NA_FLAG_OVERRIDE = 0x20
NS_MIN_LEN = 24  # ICMPv6 header, reserved/flags, target (RFC 4861 4.3, 4.4)
RA_MIN_LEN = 16  # RFC 4861 4.2
OPT_SOURCE_LINK_ADDRESS = 1
OPT_TARGET_LINK_ADDRESS = 2
OPT_PREFIX_INFORMATION = 3
OPT_MTU = 5
OPT_RDNSS = 25  # RFC 8106
PREFIX_FLAG_ON_LINK = 0x80
PREFIX_FLAG_AUTONOMOUS = 0x40
PREFIX_OPTION_LEN = 32
INFINITE_LIFETIME = 0xFFFFFFFF
SLAAC_PREFIX_LEN = 64  # RFC 4862 5.5.3 with a 64-bit interface identifier (RFC 4291)
TWO_HOURS = 7200.0  # RFC 4862 5.5.3 e
IPV6_MIN_MTU = 1280

# --- Our own limits -----------------------------------------------------------------------

REACHABLE_SECONDS = 300.0  # a neighbour entry lives this long after its last confirmation
REFRESH_SECONDS = 30.0  # in its last 30 s, traffic to an entry also sends a unicast probe
SOLICIT_INTERVAL = 1.0  # at most one ARP request / NS per destination per second
SOLICIT_TRIES = 3  # then the destination's queue is dropped
MAX_NEIGHBOURS = 1024
MAX_QUEUED_PER_DESTINATION = 16
MAX_QUEUED = 256  # packets waiting for resolution, all destinations together
MAX_PENDING = 256  # destinations being resolved at once
MAX_PREFIXES = 16  # on-link IPv6 prefixes and SLAAC addresses learned from RAs, each
MAX_DNS = 8


def _is_link_local6(address: bytes) -> bool:
    return address[0] == 0xFE and address[1] & 0xC0 == 0x80


def _solicited_node(address: bytes) -> bytes:
    return SOLICITED_NODE_PREFIX + address[13:16]


def _multicast_mac6(address: bytes) -> bytes:
    return IPV6_MULTICAST_MAC_PREFIX + address[12:16]


def _shift(offload: tuple, delta: int) -> tuple:
    """The offload metadata for the packet moved by `delta` bytes (the Ethernet header)."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = offload
    if not flags & HDR_F_NEEDS_CSUM and not hdr_len:
        return offload
    if flags & HDR_F_NEEDS_CSUM:
        csum_start += delta
        if csum_start < 0:
            raise _Malformed("offload", f"csum_start {csum_start - delta} inside the Ethernet "
                                        "header")
    if hdr_len:
        hdr_len = max(hdr_len + delta, 0)
    return OffloadInfo(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def _lifetime(now: float, seconds: int) -> float:
    return float("inf") if seconds == INFINITE_LIFETIME else now + seconds


class _Malformed(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _Neighbour:
    __slots__ = ("expires", "mac", "probed")

    def __init__(self, mac: bytes, expires: float) -> None:
        self.mac = mac
        self.expires = expires
        self.probed = float("-inf")


class _Pending:
    """A destination being resolved: its packets (ethertype, packet, offload), tries so far."""

    __slots__ = ("next_try", "packets", "tries")

    def __init__(self, next_try: float) -> None:
        self.packets: deque[tuple[bytes, bytes, tuple]] = deque()
        self.tries = 1
        self.next_try = next_try


class L3Host:
    """One host on the segment: its MAC, its addresses, its neighbours."""

    def __init__(
        self,
        mac: bytes,
        ipv4: IPv4Interface | None = None,
        gateway4: IPv4Address | None = None,
        ipv6: IPv6Interface | None = None,
        gateway6: IPv6Address | None = None,
        *,
        slaac: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(mac, bytes) or len(mac) != 6 or mac[0] & 1 or mac == ZERO_MAC:
            raise ValueError(f"mac must be 6 bytes of a unicast address, got {mac!r}")
        self.mac = mac
        self.clock = clock
        self.slaac = slaac
        self.counters: Counter[str] = Counter()
        self.tracebacks = TracebackLog(log, f"L3 host {mac.hex(':')}")
        self.on_slaac: Callable[[IPv6Interface], None] | None = None
        self.on_slaac_lost: Callable[[IPv6Interface], None] | None = None
        self.mtu6: int | None = None  # from router advertisements
        self._neighbours: dict[bytes, _Neighbour] = {}  # packed IPv4/IPv6 address -> entry
        self._pending: dict[bytes, _Pending] = {}
        self._queued = 0
        # IPv4: our address, its subnet as integers, the gateway (all None until configured).
        self._ipv4: IPv4Interface | None = None
        self._ip4: bytes | None = None
        self._net4 = self._mask4 = 0
        self._bcast4: bytes | None = None
        self._gateway4: bytes | None = None
        # IPv6: link-local always; a static address; SLAAC addresses and on-link prefixes.
        self.link_local = link_local_from_mac(mac)
        self._static6 = ipv6
        self._static_gateway6 = gateway6.packed if gateway6 is not None else None
        self._slaac: dict[bytes, float] = {}  # address -> valid until
        self._prefixes: dict[tuple[int, int], float] = {}  # (network, prefixlen) -> until
        self._onlink6: list[tuple[int, int]] = []  # (network, mask), recomputed on change
        self._own6: set[bytes] = set()
        self._router6: bytes | None = None
        self._router6_until = 0.0
        self._dns6: dict[bytes, float] = {}
        self._refresh_ipv6()
        if ipv4 is not None:
            self.configure_ipv4(ipv4, gateway4)

    # -- configuration ----------------------------------------------------------------------

    def configure_ipv4(self, interface: IPv4Interface | None,
                       gateway: IPv4Address | None = None) -> list[Frame]:
        """Set (or with None, remove) the IPv4 address, say from a DHCP lease.  IPv4
        neighbours and queued IPv4 packets are forgotten; returns a gratuitous ARP."""
        for address in [a for a in self._neighbours if len(a) == 4]:
            del self._neighbours[address]
        for address in [a for a in self._pending if len(a) == 4]:
            self._drop_pending(address, "reconfigured_dropped")
        self._ipv4 = interface
        if interface is None:
            self._ip4 = self._bcast4 = self._gateway4 = None
            self._net4 = self._mask4 = 0
            return []
        network = interface.network
        self._ip4 = interface.ip.packed
        self._net4, self._mask4 = int(network.network_address), int(network.netmask)
        self._bcast4 = network.broadcast_address.packed if network.prefixlen < 31 else None
        self._gateway4 = gateway.packed if gateway is not None else None
        announce = dpkt.arp.ARP(op=ARP_OP_REQUEST, sha=self.mac, spa=self._ip4, tha=ZERO_MAC,
                                tpa=self._ip4)
        return [self._control(BROADCAST_MAC, ETH_P_ARP, announce)]

    @property
    def ipv4(self) -> IPv4Interface | None:
        return self._ipv4

    @property
    def gateway4(self) -> IPv4Address | None:
        return IPv4Address(self._gateway4) if self._gateway4 is not None else None

    @property
    def ipv6_addresses(self) -> list[IPv6Interface]:
        """Our IPv6 addresses: link-local, the static one, those SLAAC formed."""
        addresses = [IPv6Interface(f"{self.link_local}/64")]
        if self._static6 is not None:
            addresses.append(self._static6)
        addresses += [IPv6Interface((IPv6Address(a), SLAAC_PREFIX_LEN)) for a in self._slaac]
        return addresses

    @property
    def router6(self) -> IPv6Address | None:
        router = self._static_gateway6 or self._router6
        return IPv6Address(router) if router is not None else None

    @property
    def dns6(self) -> list[IPv6Address]:
        return [IPv6Address(a) for a in self._dns6]

    def neighbour(self, address: IPv4Address | IPv6Address) -> bytes | None:
        """The MAC cached for `address`, if it is still good."""
        entry = self._neighbours.get(address.packed)
        return entry.mac if entry is not None and entry.expires > self.clock() else None

    def status(self) -> dict[str, object]:
        return {
            "mac": self.mac.hex(":"),
            "ipv4": str(self._ipv4) if self._ipv4 else None,
            "gateway4": str(self.gateway4) if self._gateway4 else None,
            "ipv6": [str(a) for a in self.ipv6_addresses],
            "router6": str(self.router6) if self.router6 else None,
            "neighbours": len(self._neighbours),
            "queued": self._queued,
            "counters": dict(self.counters),
        }

    # -- packets from the host ----------------------------------------------------------------

    def from_host(self, packet: bytes, offload: tuple = PLAIN) -> list[Frame]:
        """An IP packet the host sent: its frame, or an ARP request / NS while it waits."""
        size = len(packet)
        version = packet[0] >> 4 if size else 0
        if version == 4 and size >= IPV4_MIN_HEADER_LEN:
            ethertype = ETHERTYPE_IP
            hop, mac = self._route4(bytes(packet[16:20]))
        elif version == 6 and size >= IPV6_HEADER_LEN:
            ethertype = ETHERTYPE_IPV6
            hop, mac = self._route6(bytes(packet[24:40]))
        else:
            self.counters["host_malformed"] += 1
            return []
        if mac is not None:
            return [self._frame(mac, ethertype, packet, offload)]
        if hop is None:
            return []  # counted by the route lookup
        now = self.clock()
        entry = self._neighbours.get(hop)
        if entry is not None and entry.expires > now:
            frames = [self._frame(entry.mac, ethertype, packet, offload)]
            if entry.expires - now < REFRESH_SECONDS and now - entry.probed >= SOLICIT_INTERVAL:
                entry.probed = now
                self.counters["probe_sent"] += 1
                frames.append(self._solicit(hop, entry.mac))
            return frames
        return self._enqueue(hop, ethertype, packet, offload, now)

    def _route4(self, dst: bytes) -> tuple[bytes | None, bytes | None]:
        """(next hop, None) to resolve, (None, MAC) for a mapped address, (None, None): drop."""
        if dst == IPV4_BROADCAST or dst == self._bcast4:
            return None, BROADCAST_MAC
        if 224 <= dst[0] < 240:
            return None, IPV4_MULTICAST_MAC_PREFIX + bytes([dst[1] & 0x7F]) + dst[2:4]
        if self._ip4 is None:
            self.counters["no_ipv4_address"] += 1
            return None, None
        if dst[0] in (0, 127) or dst == self._ip4:
            self.counters["bad_destination"] += 1
            return None, None
        if int.from_bytes(dst, "big") & self._mask4 == self._net4:
            return dst, None
        if self._gateway4 is None:
            self.counters["no_route4"] += 1
            return None, None
        return self._gateway4, None

    def _route6(self, dst: bytes) -> tuple[bytes | None, bytes | None]:
        if dst[0] == 0xFF:
            return None, _multicast_mac6(dst)
        if dst in (IPV6_ANY, IPV6_LOOPBACK) or dst in self._own6:
            self.counters["bad_destination"] += 1
            return None, None
        if _is_link_local6(dst):
            return dst, None
        value = int.from_bytes(dst, "big")
        for network, mask in self._onlink6:
            if value & mask == network:
                return dst, None
        router = self._static_gateway6 or self._router6
        if router is None:
            self.counters["no_route6"] += 1
            return None, None
        return router, None

    def _enqueue(self, hop: bytes, ethertype: bytes, packet: bytes, offload: tuple,
                 now: float) -> list[Frame]:
        pending = self._pending.get(hop)
        frames: list[Frame] = []
        if pending is None:
            if len(self._pending) >= MAX_PENDING:
                self.counters["pending_full_dropped"] += 1
                return []
            pending = self._pending[hop] = _Pending(now + SOLICIT_INTERVAL)
            self.counters["solicit_sent"] += 1
            frames.append(self._solicit(hop, None))
        if len(pending.packets) >= MAX_QUEUED_PER_DESTINATION:
            pending.packets.popleft()  # the oldest goes, as Linux's neighbour queue does
            self._queued -= 1
            self.counters["queue_full_dropped"] += 1
        if self._queued >= MAX_QUEUED:
            self.counters["queue_full_dropped"] += 1
        else:
            pending.packets.append((ethertype, bytes(packet), offload))
            self._queued += 1
            self.counters["queued"] += 1
        return frames

    def _frame(self, mac: bytes, ethertype: bytes, packet, offload: tuple) -> Frame:
        self.counters["tx_frames"] += 1
        return Frame(b"".join((mac, self.mac, ethertype, packet)),
                     _shift(offload, ETH_HEADER_LEN))

    # -- frames from the segment ------------------------------------------------------------

    def from_segment(self, frame: Frame) -> tuple[list[tuple[bytes, tuple]], list[Frame]]:
        """A frame from the switch: (IP packets for the TUN, each with its offload metadata;
        frames to send back to the segment)."""
        data = frame.data
        if len(data) < ETH_HEADER_LEN:
            self.counters["malformed_short_frame"] += 1
            return [], []
        to_us = data[0:6] == self.mac
        if not to_us and not data[0] & 1:
            self.counters["not_for_us"] += 1
            return [], []
        try:
            return self._dispatch(frame, bytes(data), to_us)
        except _Malformed as error:
            self.counters[f"malformed_{error.reason}"] += 1
            return [], []
        except Exception:  # one frame's trouble is that frame's
            self.counters["malformed"] += 1
            self.tracebacks.log("reading a frame from the segment")
            return [], []

    def _dispatch(self, frame: Frame, data: bytes, to_us: bool
                  ) -> tuple[list[tuple[bytes, tuple]], list[Frame]]:
        ethertype = data[12:14]
        if ethertype == ETHERTYPE_IP:
            return self._ipv4_in(frame, data, to_us), []
        if ethertype == ETHERTYPE_IPV6:
            if len(data) >= ETH_HEADER_LEN + IPV6_HEADER_LEN + 1 and data[20] == IPPROTO_ICMPV6 \
                    and ICMPV6_RS <= data[54] <= ICMPV6_REDIRECT:
                return [], self._neighbour_discovery(data)
            return self._ipv6_in(frame, data, to_us), []
        if ethertype == ETHERTYPE_ARP:
            return [], self._arp(data)
        self.counters["other_ethertype"] += 1
        return [], []

    def _ipv4_in(self, frame: Frame, data: bytes, to_us: bool) -> list[tuple[bytes, tuple]]:
        if len(data) < ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN or data[14] >> 4 != 4:
            raise _Malformed("ipv4_header", f"{len(data)}-byte frame, version byte {data[14:15]!r}")
        (total,) = struct.unpack_from("!H", data, 16)
        if not IPV4_MIN_HEADER_LEN <= total <= len(data) - ETH_HEADER_LEN:
            raise _Malformed("ipv4_length", f"total length {total} in {len(data)}-byte frame")
        if not to_us:
            dst = data[30:34]
            if dst != IPV4_BROADCAST and dst != self._bcast4 and not 224 <= dst[0] < 240:
                self.counters["not_for_us"] += 1
                return []
        self.counters["rx_packets"] += 1
        return [(data[ETH_HEADER_LEN:ETH_HEADER_LEN + total], _shift(frame.offload,
                                                                     -ETH_HEADER_LEN))]

    def _ipv6_in(self, frame: Frame, data: bytes, to_us: bool) -> list[tuple[bytes, tuple]]:
        if len(data) < ETH_HEADER_LEN + IPV6_HEADER_LEN or data[14] >> 4 != 6:
            raise _Malformed("ipv6_header", f"{len(data)}-byte frame, version byte {data[14:15]!r}")
        (payload,) = struct.unpack_from("!H", data, 18)
        end = len(data)
        if payload:  # 0: a jumbogram (RFC 2675), taken as it is
            end = ETH_HEADER_LEN + IPV6_HEADER_LEN + payload
            if end > len(data):
                raise _Malformed("ipv6_length", f"payload length {payload} in {len(data)}-byte "
                                                "frame")
        if not to_us and data[38] != 0xFF:
            self.counters["not_for_us"] += 1
            return []
        self.counters["rx_packets"] += 1
        return [(data[ETH_HEADER_LEN:end], _shift(frame.offload, -ETH_HEADER_LEN))]

    # -- ARP -----------------------------------------------------------------------------------

    def _arp(self, data: bytes) -> list[Frame]:
        if len(data) < ETH_HEADER_LEN + ARP_LEN:
            raise _Malformed("arp", f"{len(data)}-byte frame")
        htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = ARP_HEADER.unpack_from(
            data, ETH_HEADER_LEN)
        if (htype, ptype, hlen, plen) != (ARP_HTYPE_ETHERNET, ARP_PTYPE_IPV4, 6, 4):
            raise _Malformed("arp", f"htype {htype} ptype {ptype:#06x} hlen {hlen} plen {plen}")
        if op not in (ARP_OP_REQUEST, ARP_OP_REPLY):
            self.counters["arp_other_op"] += 1
            return []
        if sha[0] & 1 or sha == ZERO_MAC:
            raise _Malformed("arp_sender", f"sender hardware address {sha.hex(':')}")
        if self._ip4 is None:
            self.counters["arp_no_address"] += 1
            return []
        if spa == self._ip4:
            self.counters["arp_address_conflict"] += 1  # someone else claims our address
            return []
        now = self.clock()
        for_us = tpa == self._ip4
        frames: list[Frame] = []
        if spa != IPV4_ANY and int.from_bytes(spa, "big") & self._mask4 == self._net4:
            frames += self._learn(spa, sha, now, create=for_us)
        if op == ARP_OP_REQUEST and for_us:
            self.counters["arp_reply_sent"] += 1
            reply = dpkt.arp.ARP(op=ARP_OP_REPLY, sha=self.mac, spa=self._ip4, tha=sha, tpa=spa)
            frames.append(self._control(sha, ETH_P_ARP, reply))
        return frames

    # -- neighbour discovery ---------------------------------------------------------------

    def _neighbour_discovery(self, data: bytes) -> list[Frame]:
        if data[14] >> 4 != 6:
            raise _Malformed("ipv6_header", f"version byte {data[14]:#04x}")
        (payload,) = struct.unpack_from("!H", data, 18)
        icmp_at = ETH_HEADER_LEN + IPV6_HEADER_LEN
        if icmp_at + payload > len(data) or payload < 4:
            raise _Malformed("ipv6_length", f"payload length {payload} in {len(data)}-byte frame")
        icmp = data[icmp_at:icmp_at + payload]
        src, dst = data[22:38], data[38:54]
        kind = icmp[0]
        if data[21] != HOP_LIMIT_ND or icmp[1] != 0:
            raise _Malformed("nd_hop_limit", f"hop limit {data[21]}, code {icmp[1]}")
        if not icmpv6_checksum_ok(src, dst, icmp):
            raise _Malformed("icmpv6_checksum")
        if kind == ICMPV6_NS:
            return self._solicitation(data, src, dst, icmp)
        if kind == ICMPV6_NA:
            return self._advertisement(data, dst, icmp)
        if kind == ICMPV6_RA:
            return self._router_advertisement(src, icmp)
        self.counters["nd_ignored"] += 1  # router solicitations, redirects
        return []

    @staticmethod
    def _options(area: bytes) -> list[tuple[int, bytes]]:
        options, i = [], 0
        while i < len(area):
            if i + 2 > len(area) or area[i + 1] == 0:
                raise _Malformed("nd_option", f"option at {i} of {len(area)} bytes")
            stop = i + area[i + 1] * 8
            if stop > len(area):
                raise _Malformed("nd_option", f"option {area[i]} runs past the end")
            options.append((area[i], area[i:stop]))
            i = stop
        return options

    @staticmethod
    def _link_address(options: list[tuple[int, bytes]], kind: int) -> bytes | None:
        for code, option in options:
            if code == kind:
                mac = option[2:8]
                if len(mac) != 6 or mac[0] & 1 or mac == ZERO_MAC:
                    raise _Malformed("nd_link_address", f"link-layer address {mac.hex(':')}")
                return mac
        return None

    def _solicitation(self, data: bytes, src: bytes, dst: bytes, icmp: bytes) -> list[Frame]:
        if len(icmp) < NS_MIN_LEN:
            raise _Malformed("ns", f"{len(icmp)} bytes")
        target = icmp[8:24]
        options = self._options(icmp[24:])
        if target not in self._own6:
            self.counters["ns_not_ours"] += 1
            return []
        sender_mac = self._link_address(options, OPT_SOURCE_LINK_ADDRESS)
        if src == IPV6_ANY:  # RFC 4862 5.4.3: someone's DAD for our address; defend it
            if sender_mac is not None or dst[0] != 0xFF:
                raise _Malformed("ns", "DAD probe with a link-layer address or unicast")
            self.counters["dad_conflict"] += 1
            return [self._advert(target, ALL_NODES, _multicast_mac6(ALL_NODES), NA_FLAG_OVERRIDE)]
        frames: list[Frame] = []
        if sender_mac is not None:  # RFC 4861 7.2.3: cache the sender
            frames += self._learn(src, sender_mac, self.clock(), create=True)
        self.counters["na_sent"] += 1
        reply_mac = sender_mac or data[6:12]
        frames.append(self._advert(target, src, reply_mac, NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE))
        return frames

    def _advertisement(self, data: bytes, dst: bytes, icmp: bytes) -> list[Frame]:
        if len(icmp) < NS_MIN_LEN:
            raise _Malformed("na", f"{len(icmp)} bytes")
        flags, target = icmp[4], icmp[8:24]
        if target[0] == 0xFF or (dst[0] == 0xFF and flags & NA_FLAG_SOLICITED):
            raise _Malformed("na", "multicast target, or solicited to a multicast address")
        mac = self._link_address(self._options(icmp[24:]), OPT_TARGET_LINK_ADDRESS)
        if target in self._own6:
            self.counters["dad_conflict"] += 1  # someone else says it has our address
            return []
        entry = self._neighbours.get(target)
        if mac is None:
            if entry is None and target not in self._pending:
                return []
            mac = data[6:12]  # RFC 4861 7.2.5: absent TLLA on a solicited unicast answer
        if entry is not None and entry.mac != mac and not flags & NA_FLAG_OVERRIDE:
            self.counters["na_no_override"] += 1
            return []
        return self._learn(target, mac, self.clock(), create=False)

    def _router_advertisement(self, src: bytes, icmp: bytes) -> list[Frame]:
        if len(icmp) < RA_MIN_LEN or not _is_link_local6(src):
            raise _Malformed("ra", f"{len(icmp)} bytes from {IPv6Address(src)}")
        options = self._options(icmp[RA_MIN_LEN:])
        now = self.clock()
        self.counters["ra_received"] += 1
        (lifetime,) = struct.unpack_from("!H", icmp, 6)
        frames: list[Frame] = []
        router_mac = self._link_address(options, OPT_SOURCE_LINK_ADDRESS)
        if router_mac is not None:
            frames += self._learn(src, router_mac, now, create=True)
        if lifetime:
            self._router6, self._router6_until = src, now + lifetime
        elif self._router6 == src:
            self._router6 = None
        for code, option in options:
            if code == OPT_MTU and len(option) == 8:
                (mtu,) = struct.unpack_from("!I", option, 4)
                if mtu >= IPV6_MIN_MTU:
                    self.mtu6 = mtu
            elif code == OPT_PREFIX_INFORMATION:
                self._prefix_information(option, now)
            elif code == OPT_RDNSS and len(option) >= 24:
                (seconds,) = struct.unpack_from("!I", option, 4)
                for at in range(8, len(option) - 15, 16):
                    self._dns6.pop(option[at:at + 16], None)
                    if seconds and len(self._dns6) < MAX_DNS:
                        self._dns6[option[at:at + 16]] = _lifetime(now, seconds)
        self._refresh_ipv6()
        return frames

    def _prefix_information(self, option: bytes, now: float) -> None:
        if len(option) != PREFIX_OPTION_LEN:
            raise _Malformed("nd_option", f"prefix information of {len(option)} bytes")
        length, flags, valid, preferred, prefix = struct.unpack_from("!BBII4x16s", option, 2)
        if length > 128 or _is_link_local6(prefix) or preferred > valid:
            self.counters["ra_prefix_ignored"] += 1  # RFC 4862 5.5.3 a, c
            return
        network = ipaddress.IPv6Network((prefix, length), strict=False)
        if flags & PREFIX_FLAG_ON_LINK:
            key = (int(network.network_address), length)
            self._prefixes.pop(key, None)
            if valid and len(self._prefixes) < MAX_PREFIXES:
                self._prefixes[key] = _lifetime(now, valid)
        if not flags & PREFIX_FLAG_AUTONOMOUS or not self.slaac:
            return
        if length != SLAAC_PREFIX_LEN:
            self.counters["slaac_prefix_not_64"] += 1
            return
        address = network.network_address.packed[:8] + self.link_local.packed[8:]
        until = self._slaac.get(address)
        if until is None:
            if valid == 0 or len(self._slaac) >= MAX_PREFIXES:
                return
            self._slaac[address] = _lifetime(now, valid)
            self.counters["slaac_address"] += 1
            self._refresh_ipv6()
            if self.on_slaac is not None:
                self.on_slaac(IPv6Interface((IPv6Address(address), SLAAC_PREFIX_LEN)))
            return
        # RFC 4862 5.5.3 e: a lifetime is never shortened below two hours by an RA.
        remaining = until - now
        if valid > TWO_HOURS or _lifetime(now, valid) > until:
            self._slaac[address] = _lifetime(now, valid)
        elif remaining > TWO_HOURS:
            self._slaac[address] = now + TWO_HOURS

    def _refresh_ipv6(self) -> None:
        own = {self.link_local.packed, *self._slaac}
        onlink = [(net, prefixlen) for net, prefixlen in self._prefixes]
        if self._static6 is not None:
            own.add(self._static6.ip.packed)
            network = self._static6.network
            onlink.append((int(network.network_address), network.prefixlen))
        self._own6 = own
        self._onlink6 = [(net, ((1 << 128) - 1) ^ ((1 << (128 - length)) - 1))
                         for net, length in onlink]

    def _advert(self, target: bytes, dst: bytes, dst_mac: bytes, flags: int) -> Frame:
        body = struct.pack("!B3x16sBB6s", flags, target, OPT_TARGET_LINK_ADDRESS, 1, self.mac)
        icmp = dpkt.icmp6.ICMP6(type=ICMPV6_NA, code=0, data=body)
        return self._ip6(dst_mac, target, dst, icmp)

    def _ip6(self, dst_mac: bytes, src: bytes, dst: bytes, icmp: dpkt.icmp6.ICMP6) -> Frame:
        ip = dpkt.ip6.IP6(src=src, dst=dst, nxt=IPPROTO_ICMPV6, hlim=HOP_LIMIT_ND, data=icmp,
                          plen=len(bytes(icmp)))
        return self._control(dst_mac, ETH_P_IPV6, ip)

    # -- the neighbour cache ----------------------------------------------------------------

    def _learn(self, address: bytes, mac: bytes, now: float, *, create: bool) -> list[Frame]:
        """Cache `address` at `mac` if it is cached, being resolved, or `create`; return the
        frames of the packets that waited for it."""
        entry = self._neighbours.get(address)
        pending = self._pending.pop(address, None)
        if entry is None and pending is None and not create:
            return []
        if entry is None:
            self._make_room(now)
            entry = self._neighbours[address] = _Neighbour(mac, 0.0)
            self.counters["neighbour_learned"] += 1
        entry.mac, entry.expires, entry.probed = mac, now + REACHABLE_SECONDS, float("-inf")
        if pending is None:
            return []
        self._queued -= len(pending.packets)
        self.counters["released"] += len(pending.packets)
        return [self._frame(mac, ethertype, packet, offload)
                for ethertype, packet, offload in pending.packets]

    def _make_room(self, now: float) -> None:
        if len(self._neighbours) < MAX_NEIGHBOURS:
            return
        for address in [a for a, e in self._neighbours.items() if e.expires <= now]:
            del self._neighbours[address]
        if len(self._neighbours) >= MAX_NEIGHBOURS:
            oldest = min(self._neighbours, key=lambda a: self._neighbours[a].expires)
            del self._neighbours[oldest]
            self.counters["neighbour_evicted"] += 1

    def _solicit(self, address: bytes, mac: bytes | None) -> Frame:
        """An ARP request / NS for `address`: broadcast/multicast, or unicast to `mac`."""
        if len(address) == 4:
            request = dpkt.arp.ARP(op=ARP_OP_REQUEST, sha=self.mac, spa=self._ip4,
                                   tha=ZERO_MAC, tpa=address)
            return self._control(mac or BROADCAST_MAC, ETH_P_ARP, request)
        dst = address if mac is not None else _solicited_node(address)
        body = struct.pack("!4x16sBB6s", address, OPT_SOURCE_LINK_ADDRESS, 1, self.mac)
        icmp = dpkt.icmp6.ICMP6(type=ICMPV6_NS, code=0, data=body)
        return self._ip6(mac or _multicast_mac6(dst), self._source6(address), dst, icmp)

    def _source6(self, target: bytes) -> bytes:
        """Our address to solicit `target` from: one in the target's prefix, else link-local."""
        if not _is_link_local6(target):
            for address in self.ipv6_addresses[1:]:
                if IPv6Address(target) in address.network:
                    return address.ip.packed
        return self.link_local.packed

    def _control(self, dst: bytes, ethertype: int, payload) -> Frame:
        self.counters["control_sent"] += 1
        return Frame(bytes(dpkt.ethernet.Ethernet(dst=dst, src=self.mac, type=ethertype,
                                                  data=payload)))

    def _drop_pending(self, address: bytes, reason: str) -> None:
        pending = self._pending.pop(address)
        self._queued -= len(pending.packets)
        self.counters[reason] += len(pending.packets)

    # -- timed work --------------------------------------------------------------------------

    def tick(self, now: float) -> list[Frame]:
        """Retry or give up on resolutions; expire routers, prefixes, SLAAC addresses; `now`
        is on the host's clock."""
        frames: list[Frame] = []
        for address, pending in list(self._pending.items()):
            if pending.next_try > now:
                continue
            if pending.tries >= SOLICIT_TRIES:
                self.counters["resolution_failed"] += 1
                self._drop_pending(address, "unresolved_dropped")
                continue
            pending.tries += 1
            pending.next_try = now + SOLICIT_INTERVAL
            self.counters["solicit_sent"] += 1
            frames.append(self._solicit(address, None))
        if self._router6 is not None and self._router6_until <= now:
            self._router6 = None
            self.counters["router6_expired"] += 1
        changed = False
        for key in [k for k, until in self._prefixes.items() if until <= now]:
            del self._prefixes[key]
            changed = True
        for address in [a for a, until in self._dns6.items() if until <= now]:
            del self._dns6[address]
        lost = [a for a, until in self._slaac.items() if until <= now]
        for address in lost:
            del self._slaac[address]
            self.counters["slaac_expired"] += 1
        if changed or lost:
            self._refresh_ipv6()
        for address in lost:
            if self.on_slaac_lost is not None:
                self.on_slaac_lost(IPv6Interface((IPv6Address(address), SLAAC_PREFIX_LEN)))
        return frames

    def next_deadline(self) -> float | None:
        """When `tick` has work next (None: nothing timed)."""
        deadlines = [p.next_try for p in self._pending.values()]
        if self._router6 is not None:
            deadlines.append(self._router6_until)
        deadlines += self._prefixes.values()
        deadlines += self._slaac.values()
        deadlines += self._dns6.values()
        finite = [d for d in deadlines if d != float("inf")]
        return min(finite) if finite else None
