"""IPv6 headers read from a frame with every bound checked: the extension-header chain (RFC
8200 section 4) and neighbour discovery options (RFC 4861 section 4.6).

Shared by the port policy (netstack.policy), which must find the upper-layer header behind
any chain a guest builds, and the gateway (netstack.gateway), which answers only when the
chain is sane.  Fixed-offset reads of bytes or memoryviews; no dpkt, nothing allocated
beyond the result.  A chain or option list we cannot walk is reported, never raised.
"""

from __future__ import annotations

from typing import NamedTuple

from netstack.wire.checksum import pseudo_header_sum, sum16, verifies

IPV6_HEADER_LEN = 40
HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
ESP = 50
AUTHENTICATION = 51
IPPROTO_ICMPV6 = 58
NO_NEXT_HEADER = 59
DESTINATION_OPTIONS = 60
# Extension headers whose length is (Hdr Ext Len + 1) * 8 octets (RFC 8200 4.3-4.6, RFC
# 6275 mobility, RFC 7401 HIP, RFC 5533 shim6, RFC 3692 experimental).
_EIGHT_OCTET_HEADERS = frozenset({HOP_BY_HOP, ROUTING, DESTINATION_OPTIONS, 135, 139, 140,
                                  253, 254})
# How many extension headers we walk before calling the chain malformed (RFC 7112 asks the
# whole chain to be in the first fragment; real chains have two or three).
MAX_IPV6_EXTENSIONS = 8

ND_OPTION_SOURCE_LINK_ADDRESS = 1
ND_OPTION_TARGET_LINK_ADDRESS = 2
_LINK_ADDRESS_OPTIONS = (ND_OPTION_SOURCE_LINK_ADDRESS, ND_OPTION_TARGET_LINK_ADDRESS)
# Options we read in one ND message before calling it malformed (real ones carry one or two).
MAX_ND_OPTIONS = 16


class Chain(NamedTuple):
    """Where an IPv6 packet's header chain ends."""

    next_header: int  # the upper-layer protocol (or ESP / no next header: nothing to read)
    position: int  # offset of that header in the frame
    fragmented: bool  # a fragment header was on the way
    first_fragment: bool  # offset 0: the upper-layer header is here (also when unfragmented)


def walk_chain(data: bytes | memoryview, offset: int, end: int) -> Chain | None:
    """Walk the extension headers of the IPv6 header at `offset`, reading no byte at or past
    `end` (the caller has checked `offset + 40 <= end <= len(data)`).  None: malformed (a
    header past the end, two fragment headers, more than MAX_IPV6_EXTENSIONS)."""
    next_header = data[offset + 6]
    position = offset + IPV6_HEADER_LEN
    fragmented = False
    for _ in range(MAX_IPV6_EXTENSIONS + 1):
        if next_header in _EIGHT_OCTET_HEADERS:
            if position + 8 > end:
                return None
            next_header, position = data[position], position + (data[position + 1] + 1) * 8
        elif next_header == AUTHENTICATION:  # RFC 4302 2.2: length in 4-octet units, minus 2
            if position + 12 > end:
                return None
            next_header, position = data[position], position + (data[position + 1] + 2) * 4
        elif next_header == FRAGMENT:
            if fragmented or position + 8 > end:
                return None
            fragmented = True
            first = int.from_bytes(data[position + 2 : position + 4], "big") >> 3 == 0
            next_header, position = data[position], position + 8
            if not first:  # later fragments carry no upper-layer header
                return Chain(next_header, position, True, False)
        else:
            if position > end:
                return None
            return Chain(next_header, position, fragmented, True)
    return None


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
        kind, length = data[position], data[position + 1] * 8
        if length == 0 or position + length > end:
            return None
        if kind in _LINK_ADDRESS_OPTIONS and data[position + 2 : position + 8] != mac:
            return False
        position += length
    return True if position == end else None


def icmpv6_checksum_ok(src: bytes, dst: bytes, message: bytes) -> bool:
    """Is the ICMPv6 checksum of `message` (from `src` to `dst`) right (RFC 4443 2.3)?"""
    return verifies(pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(message)) + sum16(message))
