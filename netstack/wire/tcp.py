"""TCP headers (RFC 9293, flags from RFC 3168): the view of a segment, for what reads ports,
sequence numbers and flags (the NAT; netstack.offload segments with these offsets), the
options a SYN negotiates, and the builder of the segments the NAT sends.

`Tcp(data, offset, end)` checks that the 20-byte header is there within `end` (the IP
packet's end) and that its data offset covers the header and fits.  `parse_options` reads
MSS, window scale, SACK-permitted and timestamps, skipping kinds it does not know.
Malformed reasons (the view's, then parse_options's):
  tcp_header  fewer than 20 bytes, data offset below 5, or options past `end`
  tcp_option  an option whose length byte is missing, below 2, past the options' end, or
              wrong for its kind
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from netstack.wire import IPPROTO_TCP, Malformed
from netstack.wire.checksum import checksum, pseudo_header_sum, sum16

MIN_HEADER_LEN = 20
SRC_PORT_OFFSET = 0
DST_PORT_OFFSET = 2
SEQ_OFFSET = 4
ACK_OFFSET = 8
DATA_OFFSET_OFFSET = 12  # the data offset, in 32-bit words, in the high nibble
FLAGS_OFFSET = 13
WINDOW_OFFSET = 14
CHECKSUM_OFFSET = 16
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2  # RFC 9293 3.2
OPT_WSCALE = 3  # RFC 7323 2
OPT_SACK_PERMITTED = 4  # RFC 2018
OPT_TIMESTAMPS = 8  # RFC 7323 3
_OPTION_LEN = {OPT_MSS: 4, OPT_WSCALE: 3, OPT_SACK_PERMITTED: 2, OPT_TIMESTAMPS: 10}

REASONS = frozenset({"tcp_header"})  # the view's
OPTION_REASONS = frozenset({"tcp_option"})  # parse_options's

_HEADER = struct.Struct("!HHIIBBHHH")


class Tcp:
    """A checked view of the TCP segment in `data[offset:end]`."""

    __slots__ = ("data", "end", "header_len", "offset")

    def __init__(self, data: bytes | memoryview, offset: int = 0, end: int | None = None
                 ) -> None:
        end = len(data) if end is None else min(end, len(data))
        size = end - offset
        if size < MIN_HEADER_LEN:
            raise Malformed("tcp_header", f"{size} bytes")
        header_len = (data[offset + DATA_OFFSET_OFFSET] >> 4) * 4
        if not MIN_HEADER_LEN <= header_len <= size:
            raise Malformed("tcp_header", f"data offset {header_len} bytes, {size} present")
        self.data = data
        self.offset = offset
        self.end = end
        self.header_len = header_len

    def _u16(self, at: int) -> int:
        return (self.data[self.offset + at] << 8) | self.data[self.offset + at + 1]

    def _u32(self, at: int) -> int:
        return int.from_bytes(self.data[self.offset + at:self.offset + at + 4], "big")

    @property
    def src_port(self) -> int:
        return self._u16(SRC_PORT_OFFSET)

    @property
    def dst_port(self) -> int:
        return self._u16(DST_PORT_OFFSET)

    @property
    def seq(self) -> int:
        return self._u32(SEQ_OFFSET)

    @property
    def ack(self) -> int:
        return self._u32(ACK_OFFSET)

    @property
    def flags(self) -> int:
        return self.data[self.offset + FLAGS_OFFSET]

    @property
    def window(self) -> int:
        return self._u16(WINDOW_OFFSET)

    @property
    def checksum(self) -> int:
        return self._u16(CHECKSUM_OFFSET)

    @property
    def options(self) -> bytes | memoryview:
        return self.data[self.offset + MIN_HEADER_LEN:self.offset + self.header_len]

    @property
    def payload(self) -> bytes | memoryview:
        return self.data[self.offset + self.header_len:self.end]


class TcpOptions(NamedTuple):
    """The options of one segment that the NAT reads (None: absent)."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamps: tuple[int, int] | None = None


def parse_options(options: bytes | memoryview) -> TcpOptions:
    """The known options in a header's option bytes; unknown kinds are skipped by their
    length.  A length that cannot be walked, or a known kind with the wrong length, raises
    Malformed("tcp_option")."""
    mss = wscale = timestamps = None
    sack_permitted = False
    at, end = 0, len(options)
    while at < end:
        kind = options[at]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            at += 1
            continue
        if at + 1 >= end:
            raise Malformed("tcp_option", f"kind {kind} without a length at {at}")
        length = options[at + 1]
        if length < 2 or at + length > end:
            raise Malformed("tcp_option", f"kind {kind} length {length} at {at} of {end}")
        want = _OPTION_LEN.get(kind)
        if want is not None and length != want:
            raise Malformed("tcp_option", f"kind {kind} length {length}, {want} expected")
        if kind == OPT_MSS:
            mss = (options[at + 2] << 8) | options[at + 3]
        elif kind == OPT_WSCALE:
            wscale = options[at + 2]
        elif kind == OPT_SACK_PERMITTED:
            sack_permitted = True
        elif kind == OPT_TIMESTAMPS:
            timestamps = (int.from_bytes(options[at + 2:at + 6], "big"),
                          int.from_bytes(options[at + 6:at + 10], "big"))
        at += length
    return TcpOptions(mss, wscale, sack_permitted, timestamps)


def tcp_segment(src: bytes, dst: bytes, src_port: int, dst_port: int, seq: int, ack: int,
                flags: int, window: int, options: bytes = b"", payload: bytes = b"") -> bytes:
    """A TCP segment with its checksum over the IPv4 or IPv6 pseudo-header of src/dst;
    `options` must already be padded to a multiple of 4 bytes."""
    header_len = MIN_HEADER_LEN + len(options)
    header = _HEADER.pack(src_port, dst_port, seq, ack, (header_len // 4) << 4, flags, window,
                          0, 0) + options
    total = pseudo_header_sum(src, dst, IPPROTO_TCP, header_len + len(payload)) \
        + sum16(header) + sum16(payload)
    return header[:CHECKSUM_OFFSET] + checksum(total).to_bytes(2, "big") \
        + header[CHECKSUM_OFFSET + 2:] + payload
