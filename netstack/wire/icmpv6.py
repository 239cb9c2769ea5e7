"""ICMPv6 (RFC 4443) and neighbour discovery (RFC 4861, RFC 8106): the views of a message,
of NS/NA and RA bodies and of their options, the checksum check, and the builders of the
messages the gateway and a TUN host send (echo reply, NA, NS, RA and its options).

A message is `data[offset:end]` where `end` is the IPv6 payload's end (Ethernet padding is
not part of it).  `Icmpv6` checks the 4-byte header; `Neighbour` (NS, NA) and
`RouterAdvertisement` check their fixed bodies; `options()` walks an option list, every
length checked, and `PrefixInformation` reads one prefix option.  `nd_link_addresses_match`
is the option walk on bare offsets for the switch's per-frame policy (None, not raised, for
a list it cannot walk; at most MAX_ND_OPTIONS options).
Malformed reasons:
  icmpv6_header  fewer than 4 bytes
  nd_header      an NS/NA shorter than 24 bytes, an RA shorter than 16
  nd_option      an option of length 0, one running past the end, a prefix information
                 option that is not 32 bytes
"""

from __future__ import annotations

import struct

from netstack.wire import IPPROTO_ICMPV6, Malformed
from netstack.wire.checksum import checksum, pseudo_header_sum, sum16, verifies
from netstack.wire.icmp import HEADER_LEN, IcmpMessage

DEST_UNREACHABLE = 1
PACKET_TOO_BIG = 2
TIME_EXCEEDED = 3
ECHO_REQUEST = 128
ECHO_REPLY = 129
MLD_QUERY = 130
MLD_REPORT = 131
MLD_DONE = 132
ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
NEIGHBOR_SOLICITATION = 135
NEIGHBOR_ADVERTISEMENT = 136
REDIRECT = 137
MLD2_REPORT = 143
HOP_LIMIT_ND = 255  # RFC 4861: ND messages are sent, and accepted, only with hop limit 255

ND_HEADER_LEN = 24  # NS/NA: ICMPv6 header, flags/reserved, target (RFC 4861 4.3, 4.4)
TARGET_OFFSET = 8
RS_HEADER_LEN = 8  # RFC 4861 4.1
RA_HEADER_LEN = 16  # RFC 4861 4.2
NA_FLAG_ROUTER = 0x80
NA_FLAG_SOLICITED = 0x40
NA_FLAG_OVERRIDE = 0x20

OPT_SOURCE_LINK_ADDRESS = 1
OPT_TARGET_LINK_ADDRESS = 2
OPT_PREFIX_INFORMATION = 3
OPT_MTU = 5
OPT_RDNSS = 25  # RFC 8106
OPTION_UNIT = 8  # option lengths count 8-octet units
PREFIX_OPTION_LEN = 32
PREFIX_FLAG_ON_LINK = 0x80
PREFIX_FLAG_AUTONOMOUS = 0x40
_LINK_ADDRESS_OPTIONS = (OPT_SOURCE_LINK_ADDRESS, OPT_TARGET_LINK_ADDRESS)
# Options the per-frame policy reads in one ND message before calling it malformed (real
# ones carry one or two).  `options()` needs no such bound: each option is 8 bytes or more.
MAX_ND_OPTIONS = 16

REASONS = frozenset({"icmpv6_header", "nd_header", "nd_option"})

_PREFIX = struct.Struct("!BBII4x16s")  # after type and length
_RA_BODY = struct.Struct("!BBHII")


def icmpv6_checksum_ok(src: bytes | memoryview, dst: bytes | memoryview,
                       message: bytes | memoryview) -> bool:
    """Is the ICMPv6 checksum of `message` (from `src` to `dst`) right (RFC 4443 2.3)?"""
    return verifies(pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(message)) + sum16(message))


class Icmpv6(IcmpMessage):
    """A checked view of the ICMPv6 message in `data[offset:end]`."""

    __slots__ = ()
    short_reason = "icmpv6_header"

    @property
    def body(self) -> bytes | memoryview:
        """What follows type, code and checksum (echo: identifier, sequence, data)."""
        return self.rest

    def checksum_ok(self, src: bytes | memoryview, dst: bytes | memoryview) -> bool:
        return icmpv6_checksum_ok(src, dst, self.message)


class Neighbour:
    """A checked view of a neighbour solicitation or advertisement (`message` checked by
    Icmpv6 first)."""

    __slots__ = ("data", "end", "offset")

    def __init__(self, message: Icmpv6) -> None:
        if message.end - message.offset < ND_HEADER_LEN:
            raise Malformed("nd_header", f"{message.end - message.offset}-byte NS/NA")
        self.data = message.data
        self.offset = message.offset
        self.end = message.end

    @property
    def flags(self) -> int:
        """The NA's R/S/O flags (NA_FLAG_*); zero in an NS."""
        return self.data[self.offset + HEADER_LEN]

    @property
    def target(self) -> bytes | memoryview:
        return self.data[self.offset + TARGET_OFFSET:self.offset + TARGET_OFFSET + 16]

    @property
    def options_offset(self) -> int:
        return self.offset + ND_HEADER_LEN

    def options(self) -> list[tuple[int, bytes | memoryview]]:
        return options(self.data, self.offset + ND_HEADER_LEN, self.end)


class RouterAdvertisement:
    """A checked view of a router advertisement (`message` checked by Icmpv6 first)."""

    __slots__ = ("cur_hop_limit", "data", "end", "flags", "offset", "reachable_time",
                 "retrans_timer", "router_lifetime")

    def __init__(self, message: Icmpv6) -> None:
        if message.end - message.offset < RA_HEADER_LEN:
            raise Malformed("nd_header", f"{message.end - message.offset}-byte RA")
        self.data = message.data
        self.offset = message.offset
        self.end = message.end
        (self.cur_hop_limit, self.flags, self.router_lifetime, self.reachable_time,
         self.retrans_timer) = _RA_BODY.unpack_from(message.data, message.offset + HEADER_LEN)

    def options(self) -> list[tuple[int, bytes | memoryview]]:
        return options(self.data, self.offset + RA_HEADER_LEN, self.end)


def options(data: bytes | memoryview, start: int, end: int
            ) -> list[tuple[int, bytes | memoryview]]:
    """The ND options in `data[start:end]`: (type, the whole option) each."""
    found = []
    position = start
    while position < end:
        if position + 2 > end or data[position + 1] == 0:
            raise Malformed("nd_option", f"option at {position - start} of {end - start} bytes")
        stop = position + data[position + 1] * OPTION_UNIT
        if stop > end:
            raise Malformed("nd_option", f"option {data[position]} runs past the end")
        found.append((data[position], data[position:stop]))
        position = stop
    return found


class PrefixInformation:
    """A checked view of a prefix information option (RFC 4861 4.6.2)."""

    __slots__ = ("flags", "preferred_lifetime", "prefix", "prefix_length", "valid_lifetime")

    def __init__(self, option: bytes | memoryview) -> None:
        if len(option) != PREFIX_OPTION_LEN:
            raise Malformed("nd_option", f"prefix information of {len(option)} bytes")
        (self.prefix_length, self.flags, self.valid_lifetime, self.preferred_lifetime,
         self.prefix) = _PREFIX.unpack_from(option, 2)


def nd_link_addresses_match(data: bytes | memoryview, start: int, end: int,
                            mac: bytes | memoryview) -> bool | None:
    """Do all source/target link-layer address options in `data[start:end]` (an ND
    message's options) carry `mac`?  None: the options are malformed (a zero length, one
    running past `end`, more than MAX_ND_OPTIONS)."""
    position = start
    for _ in range(MAX_ND_OPTIONS):
        if position == end:
            return True
        if position + 2 > end:
            return None
        kind, length = data[position], data[position + 1] * OPTION_UNIT
        if length == 0 or position + length > end:
            return None
        if kind in _LINK_ADDRESS_OPTIONS and data[position + 2 : position + 8] != mac:
            return False
        position += length
    return True if position == end else None


# -- building -------------------------------------------------------------------------------

def icmpv6_message(src: bytes, dst: bytes, kind: int, code: int,
                   body: bytes | memoryview) -> bytes:
    """An ICMPv6 message from `src` to `dst` with its checksum (RFC 4443 2.3)."""
    message = bytes([kind, code, 0, 0]) + bytes(body)
    check = checksum(pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(message))
                     + sum16(message))
    return message[:2] + check.to_bytes(2, "big") + message[HEADER_LEN:]


def link_address_option(kind: int, mac: bytes) -> bytes:
    """A source (OPT_SOURCE_LINK_ADDRESS) or target link-layer address option."""
    return struct.pack("!BB6s", kind, 1, mac)


def mtu_option(mtu: int) -> bytes:
    return struct.pack("!BBHI", OPT_MTU, 1, 0, mtu)


def prefix_information_option(prefix: bytes, prefix_length: int, flags: int, valid: int,
                              preferred: int) -> bytes:
    return struct.pack("!BB", OPT_PREFIX_INFORMATION, PREFIX_OPTION_LEN // OPTION_UNIT) \
        + _PREFIX.pack(prefix_length, flags, valid, preferred, prefix)


def rdnss_option(lifetime: int, addresses: list[bytes]) -> bytes:
    """Recursive DNS servers (RFC 8106 5.1)."""
    return struct.pack("!BBHI", OPT_RDNSS, 1 + 2 * len(addresses), 0, lifetime) \
        + b"".join(addresses)


def neighbour_advertisement(src: bytes, dst: bytes, target: bytes, flags: int,
                            mac: bytes) -> bytes:
    """An NA for `target` at `mac` (target link-layer address option), from `src`."""
    body = struct.pack("!B3x16s", flags, target) + link_address_option(OPT_TARGET_LINK_ADDRESS,
                                                                       mac)
    return icmpv6_message(src, dst, NEIGHBOR_ADVERTISEMENT, 0, body)


def neighbour_solicitation(src: bytes, dst: bytes, target: bytes, mac: bytes) -> bytes:
    """An NS for `target`, from `src` at `mac` (source link-layer address option)."""
    body = struct.pack("!4x16s", target) + link_address_option(OPT_SOURCE_LINK_ADDRESS, mac)
    return icmpv6_message(src, dst, NEIGHBOR_SOLICITATION, 0, body)


def router_advertisement(src: bytes, dst: bytes, cur_hop_limit: int, router_lifetime: int,
                         ra_options: bytes, flags: int = 0) -> bytes:
    """An RA (reachable time and retransmission timer unspecified) carrying `ra_options`."""
    body = _RA_BODY.pack(cur_hop_limit, flags, router_lifetime, 0, 0) + ra_options
    return icmpv6_message(src, dst, ROUTER_ADVERTISEMENT, 0, body)


def echo_reply(src: bytes, dst: bytes, request: Icmpv6) -> bytes:
    """The echo reply to `request` (identifier, sequence number and data as they came)."""
    return icmpv6_message(src, dst, ECHO_REPLY, 0, request.body)
