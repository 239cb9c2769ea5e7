"""IPv4 headers (RFC 791): the view of a packet inside a frame, the offsets the per-frame
paths read without one, and the builder of the headers the gateway sends.

`Ipv4(data, offset)` checks the version, that the header (options included) is there and
that the total length covers the header and fits in `data`; Ethernet padding after the
packet is allowed and is not part of `payload`.
Malformed reasons:
  ipv4_header  fewer than 20 bytes, version not 4, IHL below 5, or options past the end
  ipv4_length  total length shorter than the header or longer than the bytes present
"""

from __future__ import annotations

import struct

from netstack.wire import Malformed
from netstack.wire.checksum import internet_checksum, sum16, verifies

MIN_HEADER_LEN = 20
ADDR_LEN = 4
TOTAL_LEN_OFFSET = 2
ID_OFFSET = 4
FRAGMENT_OFFSET = 6  # flags and fragment offset
TTL_OFFSET = 8
PROTOCOL_OFFSET = 9
CHECKSUM_OFFSET = 10
SRC_OFFSET = 12
DST_OFFSET = 16
FLAG_DF = 0x4000
FLAG_MF = 0x2000
FRAGMENT_OFFSET_MASK = 0x1FFF
DEFAULT_TTL = 64
ANY = bytes(4)
LOOPBACK = b"\x7f\x00\x00\x01"
BROADCAST = b"\xff\xff\xff\xff"

REASONS = frozenset({"ipv4_header", "ipv4_length"})

_HEADER = struct.Struct("!BBHHHBBH4s4s")


def header_len(data: bytes | memoryview, offset: int) -> int:
    """The header length the IHL at `offset` claims (the caller checked the byte is there)."""
    return (data[offset] & 0x0F) * 4


class Ipv4:
    """A checked view of the IPv4 packet at `offset` of `data`."""

    __slots__ = ("data", "end", "header_len", "offset")

    def __init__(self, data: bytes | memoryview, offset: int = 0) -> None:
        size = len(data) - offset
        if size < MIN_HEADER_LEN:
            raise Malformed("ipv4_header", f"{size} bytes")
        first = data[offset]
        ihl = (first & 0x0F) * 4
        if first >> 4 != 4 or ihl < MIN_HEADER_LEN or ihl > size:
            raise Malformed("ipv4_header", f"version/IHL byte {first:#04x} in {size} bytes")
        total = (data[offset + TOTAL_LEN_OFFSET] << 8) | data[offset + TOTAL_LEN_OFFSET + 1]
        if not ihl <= total <= size:
            raise Malformed("ipv4_length", f"total length {total}, header {ihl}, "
                                           f"{size} bytes present")
        self.data = data
        self.offset = offset
        self.header_len = ihl
        self.end = offset + total

    def _u16(self, at: int) -> int:
        return (self.data[self.offset + at] << 8) | self.data[self.offset + at + 1]

    @property
    def total_length(self) -> int:
        return self.end - self.offset

    @property
    def identification(self) -> int:
        return self._u16(ID_OFFSET)

    @property
    def more_fragments(self) -> bool:
        return bool(self._u16(FRAGMENT_OFFSET) & FLAG_MF)

    @property
    def fragment_offset(self) -> int:
        """In 8-byte units."""
        return self._u16(FRAGMENT_OFFSET) & FRAGMENT_OFFSET_MASK

    @property
    def is_fragment(self) -> bool:
        return bool(self._u16(FRAGMENT_OFFSET) & (FLAG_MF | FRAGMENT_OFFSET_MASK))

    @property
    def ttl(self) -> int:
        return self.data[self.offset + TTL_OFFSET]

    @property
    def protocol(self) -> int:
        return self.data[self.offset + PROTOCOL_OFFSET]

    @property
    def checksum(self) -> int:
        return self._u16(CHECKSUM_OFFSET)

    @property
    def src(self) -> bytes | memoryview:
        return self.data[self.offset + SRC_OFFSET:self.offset + SRC_OFFSET + ADDR_LEN]

    @property
    def dst(self) -> bytes | memoryview:
        return self.data[self.offset + DST_OFFSET:self.offset + DST_OFFSET + ADDR_LEN]

    @property
    def payload_offset(self) -> int:
        return self.offset + self.header_len

    @property
    def header(self) -> bytes | memoryview:
        return self.data[self.offset:self.offset + self.header_len]

    @property
    def payload(self) -> bytes | memoryview:
        return self.data[self.offset + self.header_len:self.end]

    def header_checksum_ok(self) -> bool:
        return verifies(sum16(self.header))


def ipv4_header(src: bytes, dst: bytes, protocol: int, payload_len: int, *,
                ttl: int = DEFAULT_TTL, identification: int = 0, flags: int = 0) -> bytes:
    """A 20-byte IPv4 header (no options) with its checksum."""
    header = _HEADER.pack(0x45, 0, MIN_HEADER_LEN + payload_len, identification, flags, ttl,
                          protocol, 0, src, dst)
    return header[:CHECKSUM_OFFSET] + internet_checksum(header).to_bytes(2, "big") \
        + header[CHECKSUM_OFFSET + 2:]
