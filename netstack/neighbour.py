"""Address resolution on the segment: the one ARP (RFC 826) and the one IPv6 neighbour
discovery (RFC 4861) that the hub's gateway (netstack.gateway.port) and a TUN host's link
layer (netstack.host.l3host) share -- what a request must look like to be answered, the
answer, what a reply or an advertisement tells us, and the requests we send ourselves.

What it refuses, raising netstack.wire.Malformed with the reason the caller counts:
  ARP  (`read_arp`)  anything but 28 bytes of Ethernet/IPv4 ARP (htype 1, ptype 0x0800,
                     hlen 6, plen 4): `arp`; a multicast or zero sender MAC: `arp_sender`
  ND   (`read_nd`)   a hop limit other than 255 or a code other than 0 (RFC 4861: never
                     forwarded): `nd_hop_limit`; a wrong ICMPv6 checksum: `icmpv6_checksum`;
                     a message shorter than its kind's fixed part (`rs`, `ra`, `ns`, `na`,
                     `redirect`); options of length 0 or running past the end: `nd_option`;
                     a multicast or zero link-layer address option: `nd_link_address`
  NS   (`read_solicitation`)  from a multicast source; a DAD probe (from ::) with a source
                     link-layer option or to a unicast address (RFC 4861 7.1.1): `ns`
  NA   (`read_advertisement`)  a multicast target, or solicited and sent to a multicast
                     address (RFC 4861 7.1.2): `na`
Who answers what stays with the caller: the gateway answers for its addresses as a router,
the L3 host for its own addresses, and learns who asked.  Replies are built with dpkt.
"""

from __future__ import annotations

import struct
from ipaddress import IPv6Address
from typing import NamedTuple

import dpkt

from netstack.frame import ETH_HEADER_LEN, ETH_P_ARP, ETH_P_IPV6, Frame
from netstack.wire import Malformed
from netstack.wire.icmpv6 import icmpv6_checksum_ok

BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = bytes(6)
IPV6_ANY = bytes(16)
ALL_NODES = IPv6Address("ff02::1").packed
SOLICITED_NODE_PREFIX = IPv6Address("ff02::1:ff00:0").packed[:13]  # RFC 4291 2.7.1
IPV6_MULTICAST_MAC_PREFIX = b"\x33\x33"  # RFC 2464 7

# ARP for Ethernet and IPv4 (RFC 826).
ARP_LEN = 28
ARP_HTYPE_ETHERNET = 1
ARP_PTYPE_IPV4 = 0x0800
ARP_OP_REQUEST = 1
ARP_OP_REPLY = 2
_ARP = struct.Struct("!HHBBH6s4s6s4s")

# Neighbour discovery (RFC 4861 section 4).
HOP_LIMIT_ND = 255  # ND messages are sent, and accepted, only with hop limit 255
IPPROTO_ICMPV6 = 58
ICMPV6_RS = 133
ICMPV6_RA = 134
ICMPV6_NS = 135
ICMPV6_NA = 136
ICMPV6_REDIRECT = 137
# The fixed part of each ND message before its options (RFC 4861 4.1-4.5).
_FIXED_LEN = {ICMPV6_RS: (8, "rs"), ICMPV6_RA: (16, "ra"), ICMPV6_NS: (24, "ns"),
              ICMPV6_NA: (24, "na"), ICMPV6_REDIRECT: (40, "redirect")}
NA_FLAG_ROUTER = 0x80
NA_FLAG_SOLICITED = 0x40
NA_FLAG_OVERRIDE = 0x20
OPT_SOURCE_LINK_ADDRESS = 1
OPT_TARGET_LINK_ADDRESS = 2
OPT_PREFIX_INFORMATION = 3
OPT_MTU = 5
OPT_RDNSS = 25  # RFC 8106
PREFIX_FLAG_ON_LINK = 0x80
PREFIX_FLAG_AUTONOMOUS = 0x40


def link_local_from_mac(mac: bytes) -> IPv6Address:
    """fe80::/64 with the modified EUI-64 interface identifier of `mac` (RFC 4291 App. A)."""
    eui = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return IPv6Address(b"\xfe\x80" + bytes(6) + eui)


def solicited_node(address: bytes) -> bytes:
    return SOLICITED_NODE_PREFIX + address[13:16]


def multicast_mac6(address: bytes) -> bytes:
    return IPV6_MULTICAST_MAC_PREFIX + address[12:16]


def _unicast_mac(mac: bytes) -> bool:
    return len(mac) == 6 and not mac[0] & 1 and mac != ZERO_MAC


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: dpkt.Packet) -> Frame:
    return Frame(bytes(dpkt.ethernet.Ethernet(dst=dst, src=src, type=ethertype, data=payload)))


# -- ARP ----------------------------------------------------------------------------------


class Arp(NamedTuple):
    """An Ethernet/IPv4 ARP packet (RFC 826), read by `read_arp`."""

    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes

    def asks_for(self, ip: bytes) -> bool:
        """Is this a request for `ip` from another address (a claim to `ip` is no question)?"""
        return self.op == ARP_OP_REQUEST and self.tpa == ip and self.spa != ip


def read_arp(data: bytes) -> Arp:
    """The ARP packet in the untagged Ethernet frame `data`, checked."""
    if len(data) < ETH_HEADER_LEN + ARP_LEN:
        raise Malformed("arp", f"{len(data)}-byte frame")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data, ETH_HEADER_LEN)
    if (htype, ptype, hlen, plen) != (ARP_HTYPE_ETHERNET, ARP_PTYPE_IPV4, 6, 4):
        raise Malformed("arp", f"htype {htype} ptype {ptype:#06x} hlen {hlen} plen {plen}")
    if not _unicast_mac(sha):
        raise Malformed("arp_sender", f"sender hardware address {sha.hex(':')}")
    return Arp(op, sha, spa, tha, tpa)


def arp_reply(request: Arp, mac: bytes, ip: bytes) -> Frame:
    """`mac` has `ip`: the answer to `request`, to its sender."""
    reply = dpkt.arp.ARP(op=ARP_OP_REPLY, sha=mac, spa=ip, tha=request.sha, tpa=request.spa)
    return ethernet(request.sha, mac, ETH_P_ARP, reply)


def arp_request(mac: bytes, ip: bytes, target: bytes, dst_mac: bytes = BROADCAST_MAC) -> Frame:
    """Who has `target`? (broadcast, or a unicast probe to `dst_mac`); `target` == `ip`
    announces our own address (a gratuitous ARP)."""
    request = dpkt.arp.ARP(op=ARP_OP_REQUEST, sha=mac, spa=ip, tha=ZERO_MAC, tpa=target)
    return ethernet(dst_mac, mac, ETH_P_ARP, request)


# -- neighbour discovery ----------------------------------------------------------------------


class NdMessage(NamedTuple):
    """An ND message read by `read_nd`: its type, the message, its options (type, bytes)."""

    kind: int
    message: bytes
    options: list[tuple[int, bytes]]

    def link_address(self, option: int) -> bytes | None:
        """The MAC in the first source/target link-layer address option, if any."""
        for code, body in self.options:
            if code == option:
                return body[2:8]
        return None


def read_nd(src: bytes, dst: bytes, hop_limit: int, message: bytes) -> NdMessage:
    """Check the ND message `message` (RS, RA, NS, NA or redirect, the whole ICMPv6 message)
    from `src` to `dst` and walk its options."""
    if len(message) < 4 or message[0] not in _FIXED_LEN:
        raise Malformed("nd_type", f"{len(message)}-byte ICMPv6 message of type {message[:1]!r}")
    if hop_limit != HOP_LIMIT_ND or message[1] != 0:
        raise Malformed("nd_hop_limit", f"hop limit {hop_limit}, code {message[1]}")
    if not icmpv6_checksum_ok(src, dst, message):
        raise Malformed("icmpv6_checksum")
    kind = message[0]
    fixed, name = _FIXED_LEN[kind]
    if len(message) < fixed:
        raise Malformed(name, f"{len(message)} bytes")
    options, i = [], fixed
    while i < len(message):
        if i + 2 > len(message) or message[i + 1] == 0:
            raise Malformed("nd_option", f"option at {i} of {len(message)} bytes")
        stop = i + message[i + 1] * 8
        if stop > len(message):
            raise Malformed("nd_option", f"option {message[i]} runs past the end")
        code = message[i]
        if code in (OPT_SOURCE_LINK_ADDRESS, OPT_TARGET_LINK_ADDRESS) \
                and not _unicast_mac(message[i + 2:i + 8]):
            raise Malformed("nd_link_address",
                            f"link-layer address {message[i + 2:i + 8].hex(':')}")
        options.append((code, message[i:stop]))
        i = stop
    return NdMessage(kind, message, options)


class Solicitation(NamedTuple):
    """A neighbour solicitation: who is asked for, who asks (None: no option given)."""

    target: bytes
    sender_mac: bytes | None

    def answer(self, mac: bytes, src: bytes, src_mac: bytes, *, router: bool) -> Frame:
        """`mac` has the target: the advertisement to the asker at `src` (from Ethernet
        `src_mac`), or to all nodes for someone's duplicate address detection (RFC 4861
        7.2.4, RFC 4862 5.4.3)."""
        flags = NA_FLAG_OVERRIDE | (NA_FLAG_ROUTER if router else 0)
        if src == IPV6_ANY:
            return advertisement(mac, self.target, ALL_NODES, multicast_mac6(ALL_NODES), flags)
        return advertisement(mac, self.target, src, self.sender_mac or src_mac,
                             flags | NA_FLAG_SOLICITED)


def read_solicitation(nd: NdMessage, src: bytes, dst: bytes) -> Solicitation:
    if src[0] == 0xFF:
        raise Malformed("ns", f"from the multicast address {IPv6Address(src)}")
    sender_mac = nd.link_address(OPT_SOURCE_LINK_ADDRESS)
    if src == IPV6_ANY and (sender_mac is not None or dst[0] != 0xFF):
        raise Malformed("ns", "DAD probe with a link-layer address or unicast")
    return Solicitation(nd.message[8:24], sender_mac)


class Advertisement(NamedTuple):
    """A neighbour advertisement: for whom, its flags, the MAC it gives (None: no option)."""

    target: bytes
    flags: int
    target_mac: bytes | None


def read_advertisement(nd: NdMessage, dst: bytes) -> Advertisement:
    flags, target = nd.message[4], nd.message[8:24]
    if target[0] == 0xFF or (dst[0] == 0xFF and flags & NA_FLAG_SOLICITED):
        raise Malformed("na", "multicast target, or solicited to a multicast address")
    return Advertisement(target, flags, nd.link_address(OPT_TARGET_LINK_ADDRESS))


def advertisement(mac: bytes, target: bytes, dst: bytes, dst_mac: bytes, flags: int) -> Frame:
    """A neighbour advertisement from `target` at `mac`."""
    body = struct.pack("!B3x16sBB6s", flags, target, OPT_TARGET_LINK_ADDRESS, 1, mac)
    return icmpv6(mac, dst_mac, target, dst, ICMPV6_NA, body)


def solicitation(mac: bytes, src: bytes, target: bytes, dst_mac: bytes | None = None) -> Frame:
    """Who has `target`? To its solicited-node group, or a unicast probe to `dst_mac`."""
    dst = target if dst_mac is not None else solicited_node(target)
    body = struct.pack("!4x16sBB6s", target, OPT_SOURCE_LINK_ADDRESS, 1, mac)
    return icmpv6(mac, dst_mac or multicast_mac6(dst), src, dst, ICMPV6_NS, body)


def icmpv6(mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, kind: int, body: bytes,
           hop_limit: int = HOP_LIMIT_ND) -> Frame:
    """An ICMPv6 message of type `kind` (code 0) in IPv6 in Ethernet, the checksum filled."""
    message = dpkt.icmp6.ICMP6(type=kind, code=0, data=body)
    ip = dpkt.ip6.IP6(src=src, dst=dst, nxt=IPPROTO_ICMPV6, hlim=hop_limit, data=message,
                      plen=len(bytes(message)))
    return ethernet(dst_mac, mac, ETH_P_IPV6, ip)
