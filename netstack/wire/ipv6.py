"""IPv6 headers (RFC 8200) and the walk of their extension-header chain (section 4): the
view of a packet inside a frame, the walk the switch's policy runs per frame without one,
and the builder of the headers the gateway and a TUN host send.

`Ipv6(data, offset)` checks the version and that the fixed header and the payload its
length announces are there (Ethernet padding after them is allowed); `chain()` then walks
the extension headers to the upper-layer header.  `walk_chain` is that walk on bare offsets
(the hot path), reporting a chain it cannot walk with None instead of raising.
Malformed reasons:
  ipv6_header     fewer than 40 bytes, or version not 6
  ipv6_length     the payload length runs past the bytes present
  ipv6_extension  (chain) a header past the payload, two fragment headers, more than
                  MAX_IPV6_EXTENSIONS
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from netstack.wire import Malformed

IPV6_HEADER_LEN = 40
ADDR_LEN = 16
PAYLOAD_LEN_OFFSET = 4
NEXT_HEADER_OFFSET = 6
HOP_LIMIT_OFFSET = 7
SRC_OFFSET = 8
DST_OFFSET = 24
ANY = bytes(16)
LOOPBACK = bytes(15) + b"\x01"

HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
ESP = 50
AUTHENTICATION = 51
NO_NEXT_HEADER = 59
DESTINATION_OPTIONS = 60
# Extension headers whose length is (Hdr Ext Len + 1) * 8 octets (RFC 8200 4.3-4.6, RFC
# 6275 mobility, RFC 7401 HIP, RFC 5533 shim6, RFC 3692 experimental).
_EIGHT_OCTET_HEADERS = frozenset({HOP_BY_HOP, ROUTING, DESTINATION_OPTIONS, 135, 139, 140,
                                  253, 254})
# How many extension headers we walk before calling the chain malformed (RFC 7112 asks the
# whole chain to be in the first fragment; real chains have two or three).
MAX_IPV6_EXTENSIONS = 8

REASONS = frozenset({"ipv6_header", "ipv6_length", "ipv6_extension"})

_HEADER = struct.Struct("!IHBB16s16s")


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
    next_header = data[offset + NEXT_HEADER_OFFSET]
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


class Ipv6:
    """A checked view of the IPv6 packet at `offset` of `data`."""

    __slots__ = ("data", "end", "offset")

    def __init__(self, data: bytes | memoryview, offset: int = 0) -> None:
        size = len(data) - offset
        if size < IPV6_HEADER_LEN or data[offset] >> 4 != 6:
            raise Malformed("ipv6_header", f"{size} bytes, version byte "
                                           f"{data[offset] if size else None}")
        at = offset + PAYLOAD_LEN_OFFSET
        end = offset + IPV6_HEADER_LEN + ((data[at] << 8) | data[at + 1])
        if end > len(data):
            raise Malformed("ipv6_length", f"payload ends at {end - offset} of {size} bytes")
        self.data = data
        self.offset = offset
        self.end = end

    @property
    def payload_length(self) -> int:
        return self.end - self.offset - IPV6_HEADER_LEN

    @property
    def traffic_class(self) -> int:
        return ((self.data[self.offset] & 0x0F) << 4) | (self.data[self.offset + 1] >> 4)

    @property
    def flow_label(self) -> int:
        o = self.offset
        return ((self.data[o + 1] & 0x0F) << 16) | (self.data[o + 2] << 8) | self.data[o + 3]

    @property
    def next_header(self) -> int:
        return self.data[self.offset + NEXT_HEADER_OFFSET]

    @property
    def hop_limit(self) -> int:
        return self.data[self.offset + HOP_LIMIT_OFFSET]

    @property
    def src(self) -> bytes | memoryview:
        return self.data[self.offset + SRC_OFFSET:self.offset + SRC_OFFSET + ADDR_LEN]

    @property
    def dst(self) -> bytes | memoryview:
        return self.data[self.offset + DST_OFFSET:self.offset + DST_OFFSET + ADDR_LEN]

    @property
    def payload_offset(self) -> int:
        return self.offset + IPV6_HEADER_LEN

    @property
    def payload(self) -> bytes | memoryview:
        return self.data[self.offset + IPV6_HEADER_LEN:self.end]

    def chain(self) -> Chain:
        """The end of the extension-header chain, within the payload."""
        chain = walk_chain(self.data, self.offset, self.end)
        if chain is None:
            raise Malformed("ipv6_extension", f"next header {self.next_header}")
        return chain


def ipv6_header(src: bytes, dst: bytes, next_header: int, payload_len: int,
                hop_limit: int) -> bytes:
    """A 40-byte IPv6 header: traffic class and flow label 0."""
    return _HEADER.pack(6 << 28, payload_len, next_header, hop_limit, src, dst)
