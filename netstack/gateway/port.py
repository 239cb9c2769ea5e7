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
With a NAT (the hub's --nat, tunnel/nat.py), every other IPv4/IPv6 frame sent to the gateway's
MAC -- a guest's traffic to the outside, and TCP/UDP to the gateway's own addresses (its DNS,
--map-host-loopback) -- goes to the NAT, one `nat.from_guests(batch)` per delivery; frames
the NAT has for the guests come back through `to_guests` into the outbox.  Without one such
frames are ignored: the gateway is then no router (DHCP gives no router option, router
advertisements a lifetime of 0; the hub decides with GatewayConfig.router and
DhcpConfig.router).
With a NAT the gateway is a router, not a `service` port (netstack.port.Port): guests' traffic
through it is not held to the per-port service rate meant for ARP/DHCP/echo (the NAT's own
per-guest caps bound it, a guest being the port its frames came in on; the DHCP server keeps
its per-port budget), and the switch cuts their GSO frames for it in software instead of
dropping them.
`resolve(ip)` gives a guest address's MAC (for the NAT's port forwards): learned from DHCP
leases (`learn`), from the source of frames guests route through the gateway and from ARP and
neighbour discovery messages to it; on a miss it asks (ARP request, neighbour solicitation),
rate limited per address, and says None.  The table is bounded and its entries expire.
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
from typing import Protocol

from netstack.frame import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Frame, Offload
from netstack.gateway.ra import RouterAdvertiser
from netstack.neighbour import (
    arp_reply,
    arp_request,
    asks_for,
    icmpv6_frame,
    is_link_local6,
    is_unicast_mac,
    link_local_from_mac,
    read_advertisement,
    read_arp,
    read_router_solicitation,
    read_solicitation,
    solicitation,
)
from netstack.port import SpeakingPort
from netstack.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, Malformed, icmpv6
from netstack.wire import icmp as icmp4
from netstack.wire.arp import OP_REPLY
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


class NatService(Protocol):
    """What the gateway needs of a NAT (tunnel/nat.py NatShell): it takes the frames of one
    batch guests routed to the gateway (a batch lets it write each host socket once and
    acknowledge once per connection), and counts and drops what it refuses."""

    def from_guests(self, frames: list[Frame]) -> None: ...


@dataclass(frozen=True)
class GatewayConfig:
    mac: bytes
    ipv4: ipaddress.IPv4Interface | None = None  # gateway address and the subnet's prefix
    ipv6_prefix: ipaddress.IPv6Network | None = None  # a /64; the gateway is prefix::1
    mtu: int = 1500
    dns6: tuple[ipaddress.IPv6Address, ...] = ()
    router: bool = True  # router advertisements name the gateway as default router


# How often the timed work runs at the least (DHCP lease expiry, old neighbours).
HOUSEKEEPING_SECONDS = 10.0
# Guest addresses whose MAC the gateway remembers (resolve), and for how long after it last
# heard from them; beyond the count the oldest are forgotten first.
NEIGHBOUR_ENTRIES = 4096
NEIGHBOUR_SECONDS = 600.0
# At most one ARP request / neighbour solicitation per address this often, and at most this
# many addresses being asked for at once.
RESOLVE_INTERVAL = 1.0
RESOLVING_ENTRIES = 256


class GatewayPort(SpeakingPort):
    service = True  # see Port: no unknown unicast floods, callers' frames rate limited

    def __init__(
        self,
        config: GatewayConfig,
        dhcp: DhcpService | None = None,
        clock: Callable[[], float] | None = None,
        nat: NatService | None = None,
    ) -> None:
        # Guests' TSO frames whole and partial checksums as they are: the NAT reads a
        # 64 KiB segment as one (netstack.nat.packet); no service here checks a partial sum.
        super().__init__("gateway", Offload.CSUM | Offload.TSO4 | Offload.TSO6, policy=None)
        self.config = config
        self.clock = clock or time.monotonic
        self.mac = config.mac
        self.ipv4 = config.ipv4.ip.packed if config.ipv4 else None
        self.ipv4_broadcast = (config.ipv4.network.broadcast_address.packed if config.ipv4
                               else None)
        self.ipv6: set[bytes] = set()
        self.ipv6_router: bytes | None = None
        self.ra: RouterAdvertiser | None = None
        if config.ipv6_prefix is not None:
            self.ipv6_router = (config.ipv6_prefix.network_address + 1).packed
            self.ipv6 = {link_local_from_mac(self.mac).packed, self.ipv6_router}
            self.ra = RouterAdvertiser(self.mac, config.ipv6_prefix, config.mtu, config.dns6,
                                       router=config.router)
        self.dhcp = dhcp
        self.nat = nat  # sets `service`
        self._nat_batch: list[Frame] = []  # what one delivery routes to the NAT
        self.services: Counter[str] = Counter()
        self._next_housekeeping = 0.0
        # guest address -> (MAC, when it is forgotten), oldest first; address -> last asked
        self.neighbours: dict[bytes, tuple[bytes, float]] = {}
        self._asked: dict[bytes, float] = {}

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
                replies.extend(self._answer(bytes(data), frame.offload))
            except Malformed:
                self.counters.drop("malformed")
            except Exception:  # one frame's trouble is that frame's
                self.drop_unexpected("malformed", 1, "answering a frame")
        self.counters.out_frames += len(frames)
        self.counters.out_bytes += nbytes
        if self._nat_batch:
            batch, self._nat_batch = self._nat_batch, []
            try:
                self.nat.from_guests(batch)
            except Exception:  # the NAT drops and counts what it refuses; this is a bug of its
                self.drop_unexpected("nat", len(batch), "the NAT taking a batch")
        if replies:
            self._send(replies)

    def _answer(self, data: bytes, offload: tuple) -> list[Frame]:
        eth = Ethernet(data)
        if eth.tci is not None:
            return []  # VLAN-tagged frames: not on the gateway's segment
        if eth.ethertype == ETH_P_IPV6:
            return self._ipv6(eth, data, offload) if self.ipv6 else []
        if self.ipv4 is None:
            return []
        if eth.ethertype == ETH_P_ARP:
            arp = read_arp(data, eth.payload_offset)
            if arp.tpa == self.ipv4 and arp.spa != self.ipv4 and (
                    arp.op == OP_REPLY or asks_for(arp, self.ipv4)):
                self._heard(bytes(arp.spa), bytes(arp.sha))
            if not asks_for(arp, self.ipv4):
                return []
            self.services["arp_reply"] += 1
            return [arp_reply(arp, self.mac, self.ipv4)]
        if eth.ethertype == ETH_P_IP:
            return self._ipv4(eth, data, offload)
        return []

    def _to_nat(self, eth: Ethernet, src: bytes, data: bytes, offload: tuple) -> list[Frame]:
        """A frame a guest routed to the gateway: its sender remembered, the frame the NAT's,
        in this delivery's batch (whose trouble is the batch's: counted, never the port's
        end)."""
        self._heard(src, bytes(eth.src))
        self._nat_batch.append(Frame(data, offload))
        return []

    # -- IPv4 ------------------------------------------------------------------------------

    def _ipv4(self, eth: Ethernet, data: bytes, offload: tuple) -> list[Frame]:
        ip = Ipv4(data, eth.payload_offset)
        if ip.is_fragment:
            self.counters.drop("fragment")
            return []
        dst = bytes(ip.dst)
        # Sent to the gateway's MAC and not broadcast: the NAT's, but for the gateway's own
        # services at its own address (DHCP renewals, echo).
        nat_takes = self.nat is not None and eth.dst == self.mac and dst[0] < 224 \
            and dst != self.ipv4_broadcast
        if ip.protocol == IPPROTO_UDP and (not nat_takes or dst == self.ipv4) \
                and Udp(data, ip.payload_offset, ip.end).dst_port == DHCP_SERVER_PORT:
            return [] if self.dhcp is None else [Frame(r) for r in self.dhcp.handle(data)]
        if nat_takes and (dst != self.ipv4 or ip.protocol != IPPROTO_ICMP):
            return self._to_nat(eth, bytes(ip.src), data, offload)
        if dst != self.ipv4 or ip.protocol != IPPROTO_ICMP:
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

    def _ipv6(self, eth: Ethernet, data: bytes, offload: tuple) -> list[Frame]:
        ip = Ipv6(data, eth.payload_offset)
        if ip.payload_length == 0:
            raise Malformed("ipv6_length", "no payload")
        chain = ip.chain()
        if chain.fragmented:
            self.counters.drop("fragment")
            return []
        src, dst = bytes(ip.src), bytes(ip.dst)
        own = dst in self.ipv6 or dst[0] == 0xFF
        if chain.next_header != IPPROTO_ICMPV6 or not own:
            # Routed through the gateway, or TCP/UDP to its own address: the NAT's.
            if self.nat is not None and eth.dst == self.mac and dst[0] != 0xFF:
                return self._to_nat(eth, src, data, offload)
            return []
        message = icmpv6.Icmpv6(data, chain.position, ip.end)
        kind = message.type
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
            if kind == icmpv6.NEIGHBOR_ADVERTISEMENT and dst in self.ipv6:
                heard = read_advertisement(ip, message)
                self._heard(heard.target, heard.target_mac or bytes(eth.src))
                return []
            if kind != icmpv6.NEIGHBOR_SOLICITATION:
                return []
            asked = read_solicitation(ip, message)
        except Malformed as error:
            if error.reason not in _ND_DROPS:
                raise
            self.counters.drop(_ND_DROPS[error.reason])
            return []
        if asked.target not in self.ipv6:
            return []
        if asked.src != ANY:
            self._heard(asked.src, asked.sender_mac or bytes(eth.src))
        self.services["neighbour_advertisement"] += 1
        return [asked.answer(self.mac, bytes(eth.src), router=True)]

    # -- the NAT's side ------------------------------------------------------------------------

    @property
    def nat(self) -> NatService | None:
        return self._nat

    @nat.setter
    def nat(self, nat: NatService | None) -> None:
        self._nat = nat
        self.service = nat is None  # a router carries traffic at the guests' rate

    def to_guests(self, frames: list[Frame]) -> None:
        """Frames the NAT built for guests: into the outbox (never blocks or raises)."""
        self._send(frames)

    def learn(self, ip: bytes, mac: bytes) -> None:
        """`ip` (4 or 16 bytes, a guest's) is at `mac`: a DHCP lease, or heard on the wire."""
        if not is_unicast_mac(mac):
            return
        self.neighbours.pop(ip, None)  # re-inserted last: the newest
        if len(self.neighbours) >= NEIGHBOUR_ENTRIES:
            del self.neighbours[next(iter(self.neighbours))]
        self.neighbours[ip] = (mac, self.clock() + NEIGHBOUR_SECONDS)
        self._asked.pop(ip, None)

    def _heard(self, ip: bytes, mac: bytes) -> None:
        entry = self.neighbours.get(ip)
        if entry is not None and entry[0] == mac \
                and entry[1] - self.clock() > NEIGHBOUR_SECONDS / 2:
            return  # known and fresh: every routed frame comes here
        if self._on_segment(ip):
            self.learn(ip, mac)

    def _on_segment(self, ip: bytes) -> bool:
        """A guest's unicast address on this segment (not the gateway's own)?"""
        if len(ip) == 4:
            config = self.config.ipv4
            return config is not None and ip != self.ipv4 and ip != self.ipv4_broadcast \
                and ipaddress.IPv4Address(ip) in config.network \
                and ip != config.network.network_address.packed
        prefix = self.config.ipv6_prefix
        return prefix is not None and ip not in self.ipv6 and ip[0] != 0xFF \
            and (is_link_local6(ip) or ipaddress.IPv6Address(ip) in prefix)

    def resolve(self, ip: bytes) -> bytes | None:
        """The MAC of the guest at `ip` (packed, 4 or 16 bytes), or None: then the gateway
        asks for it (at most once per RESOLVE_INTERVAL per address), and a later call finds
        it once the guest answered."""
        now = self.clock()
        entry = self.neighbours.get(ip)
        if entry is not None:
            if entry[1] > now:
                return entry[0]
            del self.neighbours[ip]
        if not self._on_segment(ip):
            return None
        last = self._asked.get(ip)
        if last is not None and now - last < RESOLVE_INTERVAL:
            return None
        if last is None and len(self._asked) >= RESOLVING_ENTRIES:
            self._forget_asked(now)
            if len(self._asked) >= RESOLVING_ENTRIES:
                self.services["resolve_limited"] += 1
                return None
        self._asked.pop(ip, None)
        self._asked[ip] = now
        if len(ip) == 4:
            assert self.ipv4 is not None
            self.services["arp_request"] += 1
            self._send([arp_request(self.mac, self.ipv4, ip)])
        else:
            source = link_local_from_mac(self.mac).packed if is_link_local6(ip) \
                else self.ipv6_router
            assert source is not None
            self.services["neighbour_solicitation"] += 1
            self._send([solicitation(self.mac, source, ip)])
        return None

    def _forget_asked(self, now: float) -> None:
        for ip in [ip for ip, last in self._asked.items() if now - last >= RESOLVE_INTERVAL]:
            del self._asked[ip]

    def _forget_neighbours(self, now: float) -> None:
        for ip in [ip for ip, (_, until) in self.neighbours.items() if until <= now]:
            del self.neighbours[ip]

    # -- timed work ---------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Do what is due at `now` (on the gateway's clock): periodic router advertisements,
        DHCP lease expiry (on the DHCP server's own clock)."""
        frames = self.ra.tick(now) if self.ra is not None else []
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_SECONDS
            self._forget_neighbours(now)
            self._forget_asked(now)
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
        status["neighbours"] = len(self.neighbours)
        if self.ra is not None:
            status["services"] |= dict(self.ra.counters)
        if self.dhcp is not None:
            status["dhcp"] = dict(self.dhcp.counters)
            status["dhcp_tables"] = self.dhcp.table_sizes()
        return status
