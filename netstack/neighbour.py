"""Address resolution on the segment: the one ARP (RFC 826) and the one IPv6 neighbour
discovery (RFC 4861) that the hub's gateway (netstack.gateway.port) and a TUN host's link
layer (netstack.host.l3host) share -- what a request must look like to be answered, the
answer, what a reply or an advertisement tells us, and the requests we send ourselves.
The packets are read through the netstack.wire views and built with its builders.

What it refuses, raising netstack.wire.Malformed with the reason the caller counts (besides
the views' own reasons: `arp_header`, `arp_format`, `nd_header`, `nd_option`):
  ARP  (`read_arp`)  a multicast or zero sender MAC: `arp_sender`
  ND   (every read_*)  a hop limit other than 255 or a code other than 0 (RFC 4861: never
                     forwarded): `nd_hop_limit`; a wrong ICMPv6 checksum: `icmpv6_checksum`;
                     a multicast or zero link-layer address option: `nd_link_address`
  RS   (`read_router_solicitation`)  fewer than 8 bytes: `nd_header`
  NS   (`read_solicitation`)  from a multicast source; a DAD probe (from ::) with a source
                     link-layer option or to a unicast address (RFC 4861 7.1.1): `ns`
  NA   (`read_advertisement`)  a multicast target, or solicited and sent to a multicast
                     address (RFC 4861 7.1.2): `na`
  RA   (`read_router_advertisement`)  from a source that is not link-local (6.1.2): `ra`
Who answers what stays with the caller: the gateway answers for its addresses as a router,
the L3 host for its own addresses, and learns who asked.
"""

from __future__ import annotations

from ipaddress import IPv6Address
from typing import NamedTuple

from netstack.frame import ETH_P_ARP, ETH_P_IPV6, Frame
from netstack.wire import IPPROTO_ICMPV6, Malformed
from netstack.wire.arp import OP_REPLY, OP_REQUEST, Arp, arp_packet
from netstack.wire.ethernet import BROADCAST, ethernet_frame
from netstack.wire.icmpv6 import (
    HOP_LIMIT_ND,
    NA_FLAG_OVERRIDE,
    NA_FLAG_ROUTER,
    NA_FLAG_SOLICITED,
    OPT_SOURCE_LINK_ADDRESS,
    OPT_TARGET_LINK_ADDRESS,
    RS_HEADER_LEN,
    Icmpv6,
    Neighbour,
    RouterAdvertisement,
    icmpv6_checksum_ok,
    neighbour_advertisement,
    neighbour_solicitation,
    options,
)
from netstack.wire.ipv6 import ANY, Ipv6, ipv6_header

ZERO_MAC = bytes(6)
ALL_NODES = IPv6Address("ff02::1").packed
SOLICITED_NODE_PREFIX = IPv6Address("ff02::1:ff00:0").packed[:13]  # RFC 4291 2.7.1
IPV6_MULTICAST_MAC_PREFIX = b"\x33\x33"  # RFC 2464 7

# An option list as the views give it: (type, the whole option) each.
Options = list[tuple[int, bytes | memoryview]]


def link_local_from_mac(mac: bytes) -> IPv6Address:
    """fe80::/64 with the modified EUI-64 interface identifier of `mac` (RFC 4291 App. A)."""
    eui = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return IPv6Address(b"\xfe\x80" + bytes(6) + eui)


def is_link_local6(address: bytes | memoryview) -> bool:
    return address[0] == 0xFE and address[1] & 0xC0 == 0x80


def solicited_node(address: bytes) -> bytes:
    return SOLICITED_NODE_PREFIX + address[13:16]


def multicast_mac6(address: bytes) -> bytes:
    return IPV6_MULTICAST_MAC_PREFIX + address[12:16]


def is_unicast_mac(mac: bytes | memoryview) -> bool:
    return len(mac) == 6 and not mac[0] & 1 and mac != ZERO_MAC


# -- ARP ----------------------------------------------------------------------------------


def read_arp(data: bytes | memoryview, offset: int) -> Arp:
    """The Ethernet/IPv4 ARP packet at `offset` of `data`, from a unicast sender."""
    arp = Arp(data, offset)
    if not is_unicast_mac(arp.sha):
        raise Malformed("arp_sender", f"sender hardware address {bytes(arp.sha).hex(':')}")
    return arp


def asks_for(arp: Arp, ip: bytes) -> bool:
    """Is `arp` a request for `ip` from another address (a claim to `ip` is no question)?"""
    return arp.op == OP_REQUEST and arp.tpa == ip and arp.spa != ip


def arp_reply(request: Arp, mac: bytes, ip: bytes) -> Frame:
    """`mac` has `ip`: the answer to `request`, to its sender."""
    sha = bytes(request.sha)
    reply = arp_packet(OP_REPLY, mac, ip, sha, bytes(request.spa))
    return Frame(ethernet_frame(sha, mac, ETH_P_ARP, reply))


def arp_request(mac: bytes, ip: bytes, target: bytes, dst_mac: bytes = BROADCAST) -> Frame:
    """Who has `target`? (broadcast, or a unicast probe to `dst_mac`); `target` == `ip`
    announces our own address (a gratuitous ARP)."""
    request = arp_packet(OP_REQUEST, mac, ip, ZERO_MAC, target)
    return Frame(ethernet_frame(dst_mac, mac, ETH_P_ARP, request))


# -- neighbour discovery ----------------------------------------------------------------------


def _check(ip: Ipv6, message: Icmpv6) -> None:
    """What every ND message must be: never forwarded, intact."""
    if ip.hop_limit != HOP_LIMIT_ND or message.code != 0:
        raise Malformed("nd_hop_limit", f"hop limit {ip.hop_limit}, code {message.code}")
    if not icmpv6_checksum_ok(ip.src, ip.dst, message.message):
        raise Malformed("icmpv6_checksum")


def _link_addresses_checked(found: Options) -> Options:
    for code, option in found:
        if code in (OPT_SOURCE_LINK_ADDRESS, OPT_TARGET_LINK_ADDRESS) \
                and not is_unicast_mac(option[2:8]):
            raise Malformed("nd_link_address", f"link-layer address {bytes(option[2:8]).hex(':')}")
    return found


def link_address(found: Options, kind: int) -> bytes | None:
    """The MAC in the first option of `kind` (source or target link-layer address)."""
    for code, option in found:
        if code == kind:
            return bytes(option[2:8])
    return None


def read_router_solicitation(ip: Ipv6, message: Icmpv6) -> Options:
    _check(ip, message)
    if message.end - message.offset < RS_HEADER_LEN:
        raise Malformed("nd_header", f"{message.end - message.offset}-byte RS")
    return _link_addresses_checked(options(message.data, message.offset + RS_HEADER_LEN,
                                           message.end))


class Solicitation(NamedTuple):
    """A neighbour solicitation: from whom, for whom, the asker's MAC if it gave one."""

    src: bytes
    target: bytes
    sender_mac: bytes | None

    def answer(self, mac: bytes, src_mac: bytes, *, router: bool) -> Frame:
        """`mac` has the target: the advertisement to the asker (at its source link-layer
        address, else Ethernet `src_mac`), or to all nodes for someone's duplicate address
        detection (RFC 4861 7.2.4, RFC 4862 5.4.3)."""
        flags = NA_FLAG_OVERRIDE | (NA_FLAG_ROUTER if router else 0)
        if self.src == ANY:
            return advertisement(mac, self.target, ALL_NODES, multicast_mac6(ALL_NODES), flags)
        return advertisement(mac, self.target, self.src, self.sender_mac or src_mac,
                             flags | NA_FLAG_SOLICITED)


def read_solicitation(ip: Ipv6, message: Icmpv6) -> Solicitation:
    _check(ip, message)
    ns = Neighbour(message)
    src = bytes(ip.src)
    if src[0] == 0xFF:
        raise Malformed("ns", f"from the multicast address {IPv6Address(src)}")
    sender_mac = link_address(_link_addresses_checked(ns.options()), OPT_SOURCE_LINK_ADDRESS)
    if src == ANY and (sender_mac is not None or ip.dst[0] != 0xFF):
        raise Malformed("ns", "DAD probe with a link-layer address or unicast")
    return Solicitation(src, bytes(ns.target), sender_mac)


class Advertisement(NamedTuple):
    """A neighbour advertisement: for whom, its flags, the MAC it gives (None: no option)."""

    target: bytes
    flags: int
    target_mac: bytes | None


def read_advertisement(ip: Ipv6, message: Icmpv6) -> Advertisement:
    _check(ip, message)
    na = Neighbour(message)
    flags, target = na.flags, bytes(na.target)
    if target[0] == 0xFF or (ip.dst[0] == 0xFF and flags & NA_FLAG_SOLICITED):
        raise Malformed("na", "multicast target, or solicited to a multicast address")
    found = _link_addresses_checked(na.options())
    return Advertisement(target, flags, link_address(found, OPT_TARGET_LINK_ADDRESS))


def read_router_advertisement(ip: Ipv6, message: Icmpv6
                              ) -> tuple[RouterAdvertisement, Options]:
    _check(ip, message)
    ra = RouterAdvertisement(message)
    if not is_link_local6(ip.src):
        raise Malformed("ra", f"from {IPv6Address(bytes(ip.src))}")
    return ra, _link_addresses_checked(ra.options())


def advertisement(mac: bytes, target: bytes, dst: bytes, dst_mac: bytes, flags: int) -> Frame:
    """A neighbour advertisement from `target` at `mac`."""
    return icmpv6_frame(mac, dst_mac, target, dst,
                        neighbour_advertisement(target, dst, target, flags, mac))


def solicitation(mac: bytes, src: bytes, target: bytes, dst_mac: bytes | None = None) -> Frame:
    """Who has `target`? To its solicited-node group, or a unicast probe to `dst_mac`."""
    dst = target if dst_mac is not None else solicited_node(target)
    return icmpv6_frame(mac, dst_mac or multicast_mac6(dst), src, dst,
                        neighbour_solicitation(src, dst, target, mac))


def icmpv6_frame(mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, message: bytes,
                 hop_limit: int = HOP_LIMIT_ND) -> Frame:
    """The ICMPv6 `message` (checksum filled) from `src` at `mac` in IPv6 in Ethernet."""
    header = ipv6_header(src, dst, IPPROTO_ICMPV6, len(message), hop_limit)
    return Frame(ethernet_frame(dst_mac, mac, ETH_P_IPV6, header + message))
