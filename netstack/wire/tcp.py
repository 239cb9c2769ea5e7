"""TCP headers (RFC 9293, flags from RFC 3168): the view of a segment, for what reads ports,
sequence numbers and flags (the NAT next; netstack.offload segments with these offsets).

`Tcp(data, offset, end)` checks that the 20-byte header is there within `end` (the IP
packet's end) and that its data offset covers the header and fits.
Malformed reasons:
  tcp_header  fewer than 20 bytes, data offset below 5, or options past `end`
"""

from __future__ import annotations

from netstack.wire import Malformed

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

REASONS = frozenset({"tcp_header"})


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
