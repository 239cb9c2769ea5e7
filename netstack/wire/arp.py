"""ARP for IPv4 over Ethernet (RFC 826): the view of a request or reply, and the builder of
the ones the gateway and a TUN host send.

`Arp(data, offset)` checks that the 28 bytes of an Ethernet/IPv4 ARP packet are there and,
unless told `ethernet_ipv4=False` (the switch's policy polices the sender fields of any
28-byte ARP, whatever it claims to carry), that it says so (htype 1, ptype IPv4, 6/4).
Malformed reasons:
  arp_header  fewer than 28 bytes
  arp_format  not Ethernet/IPv4 (hardware type, protocol type or address lengths)
"""

from __future__ import annotations

import struct

from netstack.frame import ETH_P_IP
from netstack.wire import Malformed

ARP_LEN = 28  # the Ethernet/IPv4 packet
HTYPE_ETHERNET = 1
OP_REQUEST = 1
OP_REPLY = 2
OP_OFFSET = 6
SHA_OFFSET = 8  # sender hardware address
SPA_OFFSET = 14  # sender protocol address
THA_OFFSET = 18
TPA_OFFSET = 24
_ETHERNET_IPV4 = struct.pack("!HHBB", HTYPE_ETHERNET, ETH_P_IP, 6, 4)

REASONS = frozenset({"arp_header", "arp_format"})


class Arp:
    """A checked view of the ARP packet at `offset` of `data`."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes | memoryview, offset: int = 0, *,
                 ethernet_ipv4: bool = True) -> None:
        if len(data) < offset + ARP_LEN:
            raise Malformed("arp_header", f"{len(data) - offset} bytes")
        if ethernet_ipv4 and data[offset:offset + 6] != _ETHERNET_IPV4:
            raise Malformed("arp_format", f"hardware/protocol fields "
                                          f"{bytes(data[offset:offset + 6]).hex()}")
        self.data = data
        self.offset = offset

    @property
    def is_ethernet_ipv4(self) -> bool:
        return self.data[self.offset:self.offset + 6] == _ETHERNET_IPV4

    @property
    def op(self) -> int:
        at = self.offset + OP_OFFSET
        return (self.data[at] << 8) | self.data[at + 1]

    @property
    def sha(self) -> bytes | memoryview:
        return self.data[self.offset + SHA_OFFSET:self.offset + SHA_OFFSET + 6]

    @property
    def spa(self) -> bytes | memoryview:
        return self.data[self.offset + SPA_OFFSET:self.offset + SPA_OFFSET + 4]

    @property
    def tha(self) -> bytes | memoryview:
        return self.data[self.offset + THA_OFFSET:self.offset + THA_OFFSET + 6]

    @property
    def tpa(self) -> bytes | memoryview:
        return self.data[self.offset + TPA_OFFSET:self.offset + TPA_OFFSET + 4]


def arp_packet(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    """An Ethernet/IPv4 ARP request (OP_REQUEST) or reply (OP_REPLY), 28 bytes."""
    return _ETHERNET_IPV4 + struct.pack("!H6s4s6s4s", op, sha, spa, tha, tpa)
