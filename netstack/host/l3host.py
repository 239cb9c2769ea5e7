"""A host's presence on the Ethernet segment on behalf of a TUN device (`vhostvpn host --tun`).

A TUN device carries IP packets, the segment carries Ethernet frames.  `L3Host` is the
link layer between them: it owns one MAC address and does what a kernel's neighbour code
does for an Ethernet interface -- ARP, IPv6 neighbour discovery, router advertisements --
so the host's kernel sees a plain point-to-point device.  Sans-I/O: packets and frames in,
packets and frames out, the clock injected; the shell moves them between the TUN and the
switch and calls `tick(now)` at `next_deadline()`.  Its rooms: the neighbour cache
(netstack.host.neighbour_cache), what RAs teach (netstack.host.slaac), ARP and NDP as the
hub's gateway speaks them too (netstack.neighbour); this module routes and frames.

The path of a packet from the host (`from_host`):
  1. fixed-offset read of the IP version and destination: the host's kernel wrote the packet
     and this is the per-packet path, so nothing else of it is read (no view);
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
check (our MAC, broadcast or multicast; other unicast is `not_for_us`), read through the
netstack.wire views:
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

What it refuses, counted in `counters` as `malformed_<reason>` (never raised): what the
views refuse (short or inconsistent headers), and what netstack.neighbour refuses (ND with
a hop limit other than 255, a bad ICMPv6 checksum, option lengths of 0 or past the end, a
multicast or zero link-layer address); an ARP claim to our own address is counted
`arp_address_conflict`.  Anything else one frame makes `from_segment` raise is that
frame's: counted `malformed`, its traceback logged (at most once a minute).

Choices:
* No duplicate address detection: the link-local and SLAAC addresses are EUI-64 of our
  MAC, unique as long as the MAC is (and a duplicate MAC breaks the switch first).  Our
  addresses are defended: a DAD probe for one of them is answered and counted.
* No ICMP unreachable back to the host when resolution fails: the packets are dropped and
  counted (`unresolved_dropped`); the host's transport retries.
* IPv6 source addresses are the host's business; the hub's port policy polices them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from netstack.frame import (
    ETH_HEADER_LEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ETHERTYPE_IP,
    ETHERTYPE_IPV6,
    HDR_F_NEEDS_CSUM,
    PLAIN,
    Frame,
    OffloadInfo,
)
from netstack.host.neighbour_cache import NeighbourCache
from netstack.host.slaac import SLAAC_PREFIX_LEN, Slaac
from netstack.neighbour import (
    ZERO_MAC,
    arp_reply,
    arp_request,
    asks_for,
    is_link_local6,
    link_address,
    link_local_from_mac,
    multicast_mac6,
    read_advertisement,
    read_arp,
    read_router_advertisement,
    read_solicitation,
    solicitation,
)
from netstack.port import TracebackLog
from netstack.wire import IPPROTO_ICMPV6, Malformed
from netstack.wire.arp import OP_REPLY, OP_REQUEST
from netstack.wire.ethernet import BROADCAST, Ethernet
from netstack.wire.icmpv6 import (
    NA_FLAG_OVERRIDE,
    NEIGHBOR_ADVERTISEMENT,
    NEIGHBOR_SOLICITATION,
    OPT_SOURCE_LINK_ADDRESS,
    REDIRECT,
    ROUTER_ADVERTISEMENT,
    ROUTER_SOLICITATION,
    Icmpv6,
)
from netstack.wire.ipv4 import Ipv4
from netstack.wire.ipv6 import IPV6_HEADER_LEN, Ipv6

log = logging.getLogger(__name__)

IPV4_MULTICAST_MAC_PREFIX = b"\x01\x00\x5e"  # RFC 1112 6.4
IPV4_BROADCAST = b"\xff\xff\xff\xff"
IPV4_ANY = bytes(4)
IPV6_ANY = bytes(16)
IPV6_LOOPBACK = IPv6Address("::1").packed
IPV4_MIN_HEADER_LEN = 20
IPV4_DST_OFFSET = 16
IPV6_DST_OFFSET = 24


def _shift(offload: tuple, delta: int) -> tuple:
    """The offload metadata for the packet moved by `delta` bytes (the Ethernet header)."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = offload
    if not flags & HDR_F_NEEDS_CSUM and not hdr_len:
        return offload
    if flags & HDR_F_NEEDS_CSUM:
        csum_start += delta
        if csum_start < 0:
            raise Malformed("offload", f"csum_start {csum_start - delta} inside the Ethernet "
                                       "header")
    if hdr_len:
        hdr_len = max(hdr_len + delta, 0)
    return OffloadInfo(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


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
        self.counters: Counter[str] = Counter()
        self.tracebacks = TracebackLog(log, f"L3 host {mac.hex(':')}")
        self.on_slaac: Callable[[IPv6Interface], None] | None = None
        self.on_slaac_lost: Callable[[IPv6Interface], None] | None = None
        self.neighbours = NeighbourCache(self.counters)
        # IPv4: our address, its subnet as integers, the gateway (all None until configured).
        self._ipv4: IPv4Interface | None = None
        self._ip4: bytes | None = None
        self._net4 = self._mask4 = 0
        self._bcast4: bytes | None = None
        self._gateway4: bytes | None = None
        # IPv6: link-local always; a static address; what router advertisements teach.
        self.link_local = link_local_from_mac(mac)
        self.slaac = Slaac(self.link_local.packed[8:], self.counters, enabled=slaac)
        self._static6 = ipv6
        self._static_gateway6 = gateway6.packed if gateway6 is not None else None
        self._onlink6: list[tuple[int, int]] = []  # (network, mask), recomputed on change
        self._own6: set[bytes] = set()
        self._refresh_ipv6()
        if ipv4 is not None:
            self.configure_ipv4(ipv4, gateway4)

    # -- configuration ----------------------------------------------------------------------

    def configure_ipv4(self, interface: IPv4Interface | None,
                       gateway: IPv4Address | None = None) -> list[Frame]:
        """Set (or with None, remove) the IPv4 address, say from a DHCP lease.  IPv4
        neighbours and queued IPv4 packets are forgotten; returns a gratuitous ARP."""
        self.neighbours.forget(4)
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
        return [self._control(arp_request(self.mac, self._ip4, self._ip4))]

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
        addresses += [IPv6Interface((IPv6Address(a), SLAAC_PREFIX_LEN))
                      for a in self.slaac.addresses]
        return addresses

    @property
    def router6(self) -> IPv6Address | None:
        router = self._static_gateway6 or self.slaac.router
        return IPv6Address(router) if router is not None else None

    @property
    def dns6(self) -> list[IPv6Address]:
        return [IPv6Address(a) for a in self.slaac.dns]

    @property
    def mtu6(self) -> int | None:
        """The MTU router advertisements gave."""
        return self.slaac.mtu

    def neighbour(self, address: IPv4Address | IPv6Address) -> bytes | None:
        """The MAC cached for `address`, if it is still good."""
        entry = self.neighbours.resolved(address.packed, self.clock())
        return entry.mac if entry is not None else None

    def status(self) -> dict[str, object]:
        return {
            "mac": self.mac.hex(":"),
            "ipv4": str(self._ipv4) if self._ipv4 else None,
            "gateway4": str(self.gateway4) if self._gateway4 else None,
            "ipv6": [str(a) for a in self.ipv6_addresses],
            "router6": str(self.router6) if self.router6 else None,
            "neighbours": len(self.neighbours.entries),
            "queued": self.neighbours.queued,
            "counters": dict(self.counters),
        }

    # -- packets from the host ----------------------------------------------------------------

    def from_host(self, packet: bytes, offload: tuple = PLAIN) -> list[Frame]:
        """An IP packet the host sent: its frame, or an ARP request / NS while it waits."""
        size = len(packet)
        version = packet[0] >> 4 if size else 0
        if version == 4 and size >= IPV4_MIN_HEADER_LEN:
            ethertype = ETHERTYPE_IP
            hop, mac = self._route4(bytes(packet[IPV4_DST_OFFSET:IPV4_DST_OFFSET + 4]))
        elif version == 6 and size >= IPV6_HEADER_LEN:
            ethertype = ETHERTYPE_IPV6
            hop, mac = self._route6(bytes(packet[IPV6_DST_OFFSET:IPV6_DST_OFFSET + 16]))
        else:
            self.counters["host_malformed"] += 1
            return []
        if mac is not None:
            return [self._frame(mac, ethertype, packet, offload)]
        if hop is None:
            return []  # counted by the route lookup
        now = self.clock()
        entry = self.neighbours.resolved(hop, now)
        if entry is not None:
            frames = [self._frame(entry.mac, ethertype, packet, offload)]
            if self.neighbours.wants_probe(entry, now):
                frames.append(self._solicit(hop, entry.mac))
            return frames
        first = self.neighbours.enqueue(hop, (ethertype, bytes(packet), offload), now)
        return [self._solicit(hop, None)] if first else []

    def _route4(self, dst: bytes) -> tuple[bytes | None, bytes | None]:
        """(next hop, None) to resolve, (None, MAC) for a mapped address, (None, None): drop."""
        if dst == IPV4_BROADCAST or dst == self._bcast4:
            return None, BROADCAST
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
            return None, multicast_mac6(dst)
        if dst in (IPV6_ANY, IPV6_LOOPBACK) or dst in self._own6:
            self.counters["bad_destination"] += 1
            return None, None
        if is_link_local6(dst):
            return dst, None
        value = int.from_bytes(dst, "big")
        for network, mask in self._onlink6:
            if value & mask == network:
                return dst, None
        router = self._static_gateway6 or self.slaac.router
        if router is None:
            self.counters["no_route6"] += 1
            return None, None
        return router, None

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
        except Malformed as error:
            self.counters[f"malformed_{error.reason}"] += 1
            return [], []
        except Exception:  # one frame's trouble is that frame's
            self.counters["malformed"] += 1
            self.tracebacks.log("reading a frame from the segment")
            return [], []

    def _dispatch(self, frame: Frame, data: bytes, to_us: bool
                  ) -> tuple[list[tuple[bytes, tuple]], list[Frame]]:
        eth = Ethernet(data)
        if eth.tci is None:
            if eth.ethertype == ETH_P_IP:
                return self._ipv4_in(frame, data, to_us), []
            if eth.ethertype == ETH_P_IPV6:
                ip = Ipv6(data, ETH_HEADER_LEN)
                if ip.next_header == IPPROTO_ICMPV6 and ip.payload_length \
                        and ROUTER_SOLICITATION <= data[ip.payload_offset] <= REDIRECT:
                    return [], self._neighbour_discovery(eth, ip)
                return self._ipv6_in(frame, ip, to_us), []
            if eth.ethertype == ETH_P_ARP:
                return [], self._arp(data)
        self.counters["other_ethertype"] += 1
        return [], []

    def _ipv4_in(self, frame: Frame, data: bytes, to_us: bool) -> list[tuple[bytes, tuple]]:
        ip = Ipv4(data, ETH_HEADER_LEN)
        if not to_us:
            dst = ip.dst
            if dst != IPV4_BROADCAST and dst != self._bcast4 and not 224 <= dst[0] < 240:
                self.counters["not_for_us"] += 1
                return []
        self.counters["rx_packets"] += 1
        return [(data[ETH_HEADER_LEN:ip.end], _shift(frame.offload, -ETH_HEADER_LEN))]

    def _ipv6_in(self, frame: Frame, ip: Ipv6, to_us: bool) -> list[tuple[bytes, tuple]]:
        if not to_us and ip.dst[0] != 0xFF:
            self.counters["not_for_us"] += 1
            return []
        self.counters["rx_packets"] += 1
        end = ip.end if ip.payload_length else len(ip.data)  # 0: a jumbogram (RFC 2675)
        return [(ip.data[ETH_HEADER_LEN:end], _shift(frame.offload, -ETH_HEADER_LEN))]

    # -- ARP -----------------------------------------------------------------------------------

    def _arp(self, data: bytes) -> list[Frame]:
        arp = read_arp(data, ETH_HEADER_LEN)
        if arp.op not in (OP_REQUEST, OP_REPLY):
            self.counters["arp_other_op"] += 1
            return []
        if self._ip4 is None:
            self.counters["arp_no_address"] += 1
            return []
        spa = bytes(arp.spa)
        if spa == self._ip4:
            self.counters["arp_address_conflict"] += 1  # someone else claims our address
            return []
        now = self.clock()
        for_us = arp.tpa == self._ip4
        frames: list[Frame] = []
        if spa != IPV4_ANY and int.from_bytes(spa, "big") & self._mask4 == self._net4:
            frames += self._learn(spa, bytes(arp.sha), now, create=for_us)
        if asks_for(arp, self._ip4):
            self.counters["arp_reply_sent"] += 1
            frames.append(self._control(arp_reply(arp, self.mac, self._ip4)))
        return frames

    # -- neighbour discovery ---------------------------------------------------------------

    def _neighbour_discovery(self, eth: Ethernet, ip: Ipv6) -> list[Frame]:
        message = Icmpv6(ip.data, ip.payload_offset, ip.end)
        kind = message.type
        if kind == NEIGHBOR_SOLICITATION:
            return self._solicitation(eth, ip, message)
        if kind == NEIGHBOR_ADVERTISEMENT:
            return self._advertisement(eth, ip, message)
        if kind == ROUTER_ADVERTISEMENT:
            return self._router_advertisement(ip, message)
        self.counters["nd_ignored"] += 1  # router solicitations, redirects
        return []

    def _solicitation(self, eth: Ethernet, ip: Ipv6, message: Icmpv6) -> list[Frame]:
        ns = read_solicitation(ip, message)
        if ns.target not in self._own6:
            self.counters["ns_not_ours"] += 1
            return []
        if ns.src == IPV6_ANY:  # RFC 4862 5.4.3: someone's DAD for our address; defend it
            self.counters["dad_conflict"] += 1
            return [self._control(ns.answer(self.mac, bytes(eth.src), router=False))]
        frames: list[Frame] = []
        if ns.sender_mac is not None:  # RFC 4861 7.2.3: cache the sender
            frames += self._learn(ns.src, ns.sender_mac, self.clock(), create=True)
        self.counters["na_sent"] += 1
        frames.append(self._control(ns.answer(self.mac, bytes(eth.src), router=False)))
        return frames

    def _advertisement(self, eth: Ethernet, ip: Ipv6, message: Icmpv6) -> list[Frame]:
        na = read_advertisement(ip, message)
        if na.target in self._own6:
            self.counters["dad_conflict"] += 1  # someone else says it has our address
            return []
        mac = na.target_mac
        if mac is None:
            if not self.neighbours.is_known(na.target):
                return []
            mac = bytes(eth.src)  # RFC 4861 7.2.5: absent TLLA on a solicited unicast answer
        cached = self.neighbours.mac_of(na.target)
        if cached is not None and cached != mac and not na.flags & NA_FLAG_OVERRIDE:
            self.counters["na_no_override"] += 1
            return []
        return self._learn(na.target, mac, self.clock(), create=False)

    def _router_advertisement(self, ip: Ipv6, message: Icmpv6) -> list[Frame]:
        ra, options = read_router_advertisement(ip, message)
        src, now = bytes(ip.src), self.clock()
        frames: list[Frame] = []
        router_mac = link_address(options, OPT_SOURCE_LINK_ADDRESS)
        if router_mac is not None:
            frames += self._learn(src, router_mac, now, create=True)
        formed = self.slaac.router_advertisement(src, ra, options, now)
        self._refresh_ipv6()
        for address in formed:
            if self.on_slaac is not None:
                self.on_slaac(IPv6Interface((IPv6Address(address), SLAAC_PREFIX_LEN)))
        return frames

    def _refresh_ipv6(self) -> None:
        own = {self.link_local.packed, *self.slaac.addresses}
        onlink = list(self.slaac.prefixes)
        if self._static6 is not None:
            own.add(self._static6.ip.packed)
            network = self._static6.network
            onlink.append((int(network.network_address), network.prefixlen))
        self._own6 = own
        self._onlink6 = [(net, ((1 << 128) - 1) ^ ((1 << (128 - length)) - 1))
                         for net, length in onlink]

    # -- the neighbour cache ----------------------------------------------------------------

    def _learn(self, address: bytes, mac: bytes, now: float, *, create: bool) -> list[Frame]:
        """Cache `address` at `mac` (see NeighbourCache.learn): the frames of the packets
        that waited for it."""
        return [self._frame(mac, ethertype, packet, offload) for ethertype, packet, offload
                in self.neighbours.learn(address, mac, now, create=create)]

    def _solicit(self, address: bytes, mac: bytes | None) -> Frame:
        """An ARP request / NS for `address`: broadcast/multicast, or unicast to `mac`."""
        if len(address) == 4:
            return self._control(arp_request(self.mac, self._ip4, address, mac or BROADCAST))
        return self._control(solicitation(self.mac, self._source6(address), address, mac))

    def _source6(self, target: bytes) -> bytes:
        """Our address to solicit `target` from: one in the target's prefix, else link-local."""
        if not is_link_local6(target):
            for address in self.ipv6_addresses[1:]:
                if IPv6Address(target) in address.network:
                    return address.ip.packed
        return self.link_local.packed

    def _control(self, frame: Frame) -> Frame:
        self.counters["control_sent"] += 1
        return frame

    # -- timed work --------------------------------------------------------------------------

    def tick(self, now: float) -> list[Frame]:
        """Retry or give up on resolutions; expire routers, prefixes, SLAAC addresses; `now`
        is on the host's clock."""
        frames = [self._solicit(address, None) for address in self.neighbours.tick(now)]
        prefixes = len(self.slaac.prefixes)
        lost = self.slaac.tick(now)
        if lost or len(self.slaac.prefixes) != prefixes:
            self._refresh_ipv6()
        for address in lost:
            if self.on_slaac_lost is not None:
                self.on_slaac_lost(IPv6Interface((IPv6Address(address), SLAAC_PREFIX_LEN)))
        return frames

    def next_deadline(self) -> float | None:
        """When `tick` has work next (None: nothing timed)."""
        deadlines = self.neighbours.deadlines() + self.slaac.deadlines()
        finite = [d for d in deadlines if d != float("inf")]
        return min(finite) if finite else None
