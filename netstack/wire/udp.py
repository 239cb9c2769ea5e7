"""UDP (RFC 768): the view of a datagram and the builder of a header with its checksum over
the IPv4 or IPv6 pseudo-header.

`Udp(data, offset, end)` checks that the 8-byte header is there within `end` (the IP
packet's end) and that the length field covers the header and fits; `payload` is what the
length field says, whatever follows within `end` is not part of it.
Malformed reasons:
  udp_header  fewer than 8 bytes
  udp_length  length field below 8 or past `end`
"""

from __future__ import annotations

import struct

from netstack.wire import IPPROTO_UDP, Malformed
from netstack.wire.checksum import pseudo_header_sum, sum16, udp_checksum

HEADER_LEN = 8
SRC_PORT_OFFSET = 0
DST_PORT_OFFSET = 2
LENGTH_OFFSET = 4
CHECKSUM_OFFSET = 6

REASONS = frozenset({"udp_header", "udp_length"})

_HEADER = struct.Struct("!HHHH")


class Udp:
    """A checked view of the UDP datagram in `data[offset:end]`."""

    __slots__ = ("data", "end", "offset")

    def __init__(self, data: bytes | memoryview, offset: int = 0, end: int | None = None
                 ) -> None:
        end = len(data) if end is None else min(end, len(data))
        if end - offset < HEADER_LEN:
            raise Malformed("udp_header", f"{end - offset} bytes")
        length = (data[offset + LENGTH_OFFSET] << 8) | data[offset + LENGTH_OFFSET + 1]
        if not HEADER_LEN <= length <= end - offset:
            raise Malformed("udp_length", f"length {length}, {end - offset} bytes present")
        self.data = data
        self.offset = offset
        self.end = offset + length

    @property
    def src_port(self) -> int:
        return (self.data[self.offset] << 8) | self.data[self.offset + 1]

    @property
    def dst_port(self) -> int:
        return (self.data[self.offset + DST_PORT_OFFSET] << 8) \
            | self.data[self.offset + DST_PORT_OFFSET + 1]

    @property
    def length(self) -> int:
        return self.end - self.offset

    @property
    def checksum(self) -> int:
        return (self.data[self.offset + CHECKSUM_OFFSET] << 8) \
            | self.data[self.offset + CHECKSUM_OFFSET + 1]

    @property
    def payload(self) -> bytes | memoryview:
        return self.data[self.offset + HEADER_LEN:self.end]


def udp_header(src: bytes, dst: bytes, src_port: int, dst_port: int,
               payload: bytes | memoryview) -> bytes:
    """The 8-byte header of a datagram carrying `payload` from `src` to `dst` (IPv4 or IPv6
    addresses: the pseudo-header follows their length), checksum included."""
    length = HEADER_LEN + len(payload)
    header = _HEADER.pack(src_port, dst_port, length, 0)
    total = pseudo_header_sum(src, dst, IPPROTO_UDP, length) + sum16(header) + sum16(payload)
    return header[:CHECKSUM_OFFSET] + udp_checksum(total).to_bytes(2, "big")
