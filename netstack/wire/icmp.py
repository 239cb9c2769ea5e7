"""ICMP for IPv4 (RFC 792): the view of a message and the builder of the echo reply the
gateway answers a ping with.

`Icmp(data, offset, end)` checks that the 4-byte type/code/checksum header is there within
`end` (the IPv4 packet's end, so Ethernet padding is not part of the message); what follows
is `rest` (for echo: identifier, sequence number and data, echoed back as they came).
Malformed reasons:
  icmp_header  fewer than 4 bytes
"""

from __future__ import annotations

from netstack.wire import Malformed
from netstack.wire.checksum import internet_checksum, sum16, verifies

HEADER_LEN = 4
ECHO_REPLY = 0
ECHO_REQUEST = 8
DEST_UNREACHABLE = 3
TIME_EXCEEDED = 11
CODE_FRAGMENTATION_NEEDED = 4  # of DEST_UNREACHABLE: the next-hop MTU follows (RFC 1191)

REASONS = frozenset({"icmp_header"})


class IcmpMessage:
    """Type, code, checksum and what follows: the layout ICMP and ICMPv6 share (RFC 4443
    2.1), a checked view of `data[offset:end]`."""

    __slots__ = ("data", "end", "offset")
    short_reason = "icmp_header"

    def __init__(self, data: bytes | memoryview, offset: int = 0, end: int | None = None
                 ) -> None:
        end = len(data) if end is None else min(end, len(data))
        if end - offset < HEADER_LEN:
            raise Malformed(self.short_reason, f"{end - offset} bytes")
        self.data = data
        self.offset = offset
        self.end = end

    @property
    def type(self) -> int:
        return self.data[self.offset]

    @property
    def code(self) -> int:
        return self.data[self.offset + 1]

    @property
    def checksum(self) -> int:
        return (self.data[self.offset + 2] << 8) | self.data[self.offset + 3]

    @property
    def rest(self) -> bytes | memoryview:
        """What follows type, code and checksum (echo: identifier, sequence, data)."""
        return self.data[self.offset + HEADER_LEN:self.end]

    @property
    def message(self) -> bytes | memoryview:
        return self.data[self.offset:self.end]


class Icmp(IcmpMessage):
    """A checked view of the ICMP (IPv4) message in `data[offset:end]`."""

    __slots__ = ()

    def checksum_ok(self) -> bool:
        return verifies(sum16(self.message))


def icmp_message(kind: int, code: int, rest: bytes | memoryview) -> bytes:
    """An ICMP message with its checksum."""
    body = bytes(rest)
    check = internet_checksum(bytes([kind, code, 0, 0]) + body)
    return bytes([kind, code]) + check.to_bytes(2, "big") + body


def echo_reply(request: Icmp) -> bytes:
    """The echo reply to `request`: its identifier, sequence number and data."""
    return icmp_message(ECHO_REPLY, 0, request.rest)
