"""A guest's routed IP packet as the NAT reads it, and where the NAT lets it go.

`read_guest_packet` reads a frame through the netstack.wire views and checks what every
protocol table needs before it looks at its own header: the frame is untagged and sent to
the gateway's MAC (routed, not flooded), the IPv4 header checksum is right, the packet is not
a fragment (no reassembly here), and the source is a unicast address.  A guest's TSO frame
(GSO TCPV4/TCPV6, its checksum partial) is one packet here, as long as its IP version matches
its GSO type and it carries TCP: the TCP core takes a 64 KiB segment whole.  UDP GSO (UFO,
USO) is refused (`gso`): the gateway port does not accept it, so the switch never hands it
one.  A frame that fails is
refused with `Malformed` (the bytes lie) or `Refused` (the bytes are fine, the NAT will not
carry them), each with a reason the caller counts.

`DenyList` is the set of networks guests may not reach through the NAT: `DEFAULT_DENY`
(see there why each one) plus the operator's `--nat-deny CIDR`s, checked with integer
masks when a flow opens (never per packet of an open flow).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from netstack.frame import (
    ETH_HEADER_LEN,
    ETH_P_IP,
    ETH_P_IPV6,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    HDR_F_NEEDS_CSUM,
    Frame,
)
from netstack.wire import IPPROTO_TCP
from netstack.wire.ethernet import Ethernet, ethernet_frame
from netstack.wire.ipv4 import DEFAULT_TTL, MIN_HEADER_LEN, Ipv4, ipv4_header
from netstack.wire.ipv6 import IPV6_HEADER_LEN, Ipv6, ipv6_header

REASONS = frozenset({"not_routed", "vlan", "gso", "fragment", "bad_source", "ipv4_checksum",
                     "not_ip", "denied"})


class Refused(Exception):
    """A well-formed packet the NAT does not carry; `reason` is counted as a drop."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class GuestPacket(NamedTuple):
    """The IP layer of a guest frame, checked.  `l4_offset:end` is the upper-layer message
    within `data` (the frame); `ip_offset:end` the whole IP packet (what an ICMP error
    quotes)."""

    data: bytes
    guest_mac: bytes
    version: int  # 4 or 6
    src: bytes
    dst: bytes
    ttl: int  # TTL or hop limit
    protocol: int
    ip_offset: int
    l4_offset: int
    end: int


_TCP_GSO = {GSO_TCPV4: 4, GSO_TCPV6: 6}  # a TSO frame is one segment: its IP version


def _unicast(address: bytes) -> bool:
    if len(address) == 4:
        return 0 < address[0] < 224 and address != b"\xff\xff\xff\xff"
    return address[0] != 0xFF and address != bytes(16)


def read_guest_packet(frame: Frame, gateway_mac: bytes) -> GuestPacket:
    """The checked IP layer of `frame`, a frame a guest routed through the gateway."""
    data = bytes(frame.data)
    eth = Ethernet(data)
    if eth.dst != gateway_mac:
        raise Refused("not_routed", "not sent to the gateway's MAC")
    if eth.tci is not None:
        raise Refused("vlan", f"tag {eth.vlan_id}")
    gso = frame.offload[1]
    if gso != GSO_NONE and gso not in _TCP_GSO:
        raise Refused("gso", f"GSO type {gso}")
    if eth.ethertype == ETH_P_IP:
        ip4 = Ipv4(data, eth.payload_offset)
        if not ip4.header_checksum_ok():
            raise Refused("ipv4_checksum")
        if ip4.is_fragment:
            raise Refused("fragment")
        packet = GuestPacket(data, bytes(eth.src), 4, bytes(ip4.src), bytes(ip4.dst), ip4.ttl,
                             ip4.protocol, ip4.offset, ip4.payload_offset, ip4.end)
    elif eth.ethertype == ETH_P_IPV6:
        ip6 = Ipv6(data, eth.payload_offset)
        chain = ip6.chain()
        if chain.fragmented:
            raise Refused("fragment")
        packet = GuestPacket(data, bytes(eth.src), 6, bytes(ip6.src), bytes(ip6.dst),
                             ip6.hop_limit, chain.next_header, ip6.offset, chain.position,
                             ip6.end)
    else:
        raise Refused("not_ip", f"EtherType {eth.ethertype:#06x}")
    if not _unicast(packet.src):
        raise Refused("bad_source")
    if gso != GSO_NONE and (_TCP_GSO[gso] != packet.version or packet.protocol != IPPROTO_TCP):
        raise Refused("gso", f"GSO type {gso} on IPv{packet.version} protocol {packet.protocol}")
    return packet


# Networks no guest reaches through the NAT unless the operator says otherwise, and why:
DEFAULT_DENY = (
    # The hub host's own loopback: connect() to these reaches the hub's private services
    # (`--map-host-loopback` is the one way in, through the gateway's address).
    "127.0.0.0/8", "::1/128",
    # "This host": Linux connects 0.0.0.0 and :: to the loopback.
    "0.0.0.0/8", "::/128",
    # IPv4-mapped IPv6: an IPv6 socket sent to ::ffff:127.0.0.1 reaches the loopback too,
    # and any other mapped address would skip the IPv4 deny list.
    "::ffff:0:0/96",
    # Link-local: the cloud metadata service (169.254.169.254) hands out the host's
    # credentials; an IPv6 link-local address means nothing without the hub's interface.
    "169.254.0.0/16", "fe80::/10",
    # Multicast and broadcast: not a flow; answers would come from other addresses.
    "224.0.0.0/4", "255.255.255.255/32", "ff00::/8",
)


class DenyList:
    """Networks guests may not reach, per address family, as (network, mask) integers."""

    def __init__(self, networks: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network]
                 = DEFAULT_DENY) -> None:
        self.networks = [ipaddress.ip_network(n) for n in networks]
        self._masks: dict[int, list[tuple[int, int]]] = {4: [], 16: []}
        for network in self.networks:
            self._masks[len(network.network_address.packed)].append(
                (int(network.network_address), int(network.netmask)))

    def denies(self, address: bytes) -> bool:
        value = int.from_bytes(address, "big")
        return any(value & mask == net for net, mask in self._masks.get(len(address), ()))

    @classmethod
    def with_defaults(cls, extra: Iterable[str] = ()) -> DenyList:
        """DEFAULT_DENY plus the operator's `--nat-deny` CIDRs (ValueError names a bad one)."""
        return cls([*DEFAULT_DENY, *extra])


@dataclass(frozen=True)
class NatConfig:
    """What every NAT table knows of the gateway it serves."""

    gateway_mac: bytes
    gateway_ips: frozenset[bytes]  # the gateway's own addresses, packed (IPv4 and IPv6)
    deny: DenyList = field(default_factory=DenyList)
    map_host_loopback: bool = False  # the gateway's address reaches the hub's 127.0.0.1/::1
    mtu: int = 1500  # the guests' link MTU: nothing longer is sent to them (but TSO frames)
    # TCP toward guests in TSO frames of up to 64 KiB (gso_size within the MTU); the switch
    # segments them in software for a port that does not accept TSO.
    tso: bool = True


def refuse_denied(packet: GuestPacket, deny: DenyList) -> None:
    """Refuse (`denied`) a packet to a denied destination."""
    if deny.denies(packet.dst):
        raise Refused("denied", ipaddress.ip_address(packet.dst).compressed)



def ip_header_len(address: bytes) -> int:
    return MIN_HEADER_LEN if len(address) == 4 else IPV6_HEADER_LEN


def frame_to_guest(config: NatConfig, guest_mac: bytes, src: bytes, dst: bytes, protocol: int,
                   message: bytes) -> Frame | None:
    """`message` (an upper-layer packet, its checksum done) in an IP packet from `src` to
    `dst` and a frame from the gateway to `guest_mac`; None if it would exceed the MTU."""
    if ip_header_len(src) + len(message) > config.mtu:
        return None
    if len(src) == 4:
        header = ipv4_header(src, dst, protocol, len(message), ttl=DEFAULT_TTL)
        return Frame(ethernet_frame(guest_mac, config.gateway_mac, ETH_P_IP, header + message))
    header = ipv6_header(src, dst, protocol, len(message), DEFAULT_TTL)
    return Frame(ethernet_frame(guest_mac, config.gateway_mac, ETH_P_IPV6, header + message))


TCP_CSUM_OFFSET = 16
_ETHERTYPE_IP = ETH_P_IP.to_bytes(2, "big")
_ETHERTYPE_IPV6 = ETH_P_IPV6.to_bytes(2, "big")


def tso_frame_to_guest(config: NatConfig, guest_mac: bytes, src: bytes, dst: bytes,
                       tcp_header: bytes, payload: bytes, mss: int) -> Frame:
    """A TCP segment longer than the MTU allows (`tcp_header`'s checksum field holding the
    pseudo-header sum, NEEDS_CSUM) in a TSO frame whose pieces fit the MTU: gso_size is the
    guest's `mss`, or less if the MTU leaves less after the IP and TCP headers.  The
    payload is copied once, into the frame."""
    ip_len = ip_header_len(src)
    l4 = ETH_HEADER_LEN + ip_len
    header_len = len(tcp_header)
    gso_size = min(mss, config.mtu - ip_len - header_len)
    length = header_len + len(payload)
    if len(src) == 4:
        header = ipv4_header(src, dst, IPPROTO_TCP, length, ttl=DEFAULT_TTL)
        ethertype, gso_type = _ETHERTYPE_IP, GSO_TCPV4
    else:
        header = ipv6_header(src, dst, IPPROTO_TCP, length, DEFAULT_TTL)
        ethertype, gso_type = _ETHERTYPE_IPV6, GSO_TCPV6
    return Frame(b"".join((guest_mac, config.gateway_mac, ethertype, header, tcp_header,
                           payload)),
                 (HDR_F_NEEDS_CSUM, gso_type, l4 + header_len, gso_size, l4, TCP_CSUM_OFFSET))
