"""Ethernet II frames (IEEE 802.3) with at most one 802.1Q customer tag: the view every
parser above the frame starts from, and the header the reply builders put on.

`Ethernet(data)` checks that the header (and a customer tag, if there is one) is present;
then `ethertype` is the type behind it and `payload_offset` where that payload starts.  A
second tag, or a service tag (802.1ad), shows as its own EtherType: the view does not walk
tag stacks (the switch's policy refuses them; netstack.offload walks two for segmentation).
Malformed reasons:
  ethernet_header  fewer than 14 bytes
  vlan_tag         an 802.1Q tag cut short
"""

from __future__ import annotations

from netstack.frame import (
    ETH_ADDR_LEN,
    ETH_HEADER_LEN,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_QINQ1,
    VLAN_TAG_LEN,
)
from netstack.wire import Malformed

DST_OFFSET = 0
SRC_OFFSET = 6
ETHERTYPE_OFFSET = 12
TCI_OFFSET = 14  # the tag control information of an 802.1Q tag (PCP, DEI, VLAN ID)
INNER_ETHERTYPE_OFFSET = 16
VLAN_ID_MASK = 0x0FFF
# EtherTypes start here; a smaller value in the type field is an 802.3 length (LLC follows).
ETHERTYPE_MIN = 0x0600
# EtherTypes that announce a tag (802.1Q, 802.1ad, the pre-standard QinQ).
TAG_TYPES = frozenset({ETH_P_8021Q, ETH_P_8021AD, ETH_P_QINQ1})
BROADCAST = b"\xff" * ETH_ADDR_LEN

REASONS = frozenset({"ethernet_header", "vlan_tag"})


class Ethernet:
    """A checked view of the Ethernet header at the start of `data`."""

    __slots__ = ("data", "ethertype", "payload_offset", "tci")

    def __init__(self, data: bytes | memoryview) -> None:
        size = len(data)
        if size < ETH_HEADER_LEN:
            raise Malformed("ethernet_header", f"{size}-byte frame")
        ethertype = (data[ETHERTYPE_OFFSET] << 8) | data[ETHERTYPE_OFFSET + 1]
        self.tci: int | None = None
        self.payload_offset = ETH_HEADER_LEN
        if ethertype == ETH_P_8021Q:
            if size < ETH_HEADER_LEN + VLAN_TAG_LEN:
                raise Malformed("vlan_tag", f"{size}-byte frame with an 802.1Q tag")
            self.tci = (data[TCI_OFFSET] << 8) | data[TCI_OFFSET + 1]
            ethertype = (data[INNER_ETHERTYPE_OFFSET] << 8) | data[INNER_ETHERTYPE_OFFSET + 1]
            self.payload_offset += VLAN_TAG_LEN
        self.data = data
        self.ethertype = ethertype  # behind the customer tag, if any

    @property
    def dst(self) -> bytes | memoryview:
        return self.data[DST_OFFSET:DST_OFFSET + ETH_ADDR_LEN]

    @property
    def src(self) -> bytes | memoryview:
        return self.data[SRC_OFFSET:SRC_OFFSET + ETH_ADDR_LEN]

    @property
    def vlan_id(self) -> int | None:
        return None if self.tci is None else self.tci & VLAN_ID_MASK

    @property
    def is_llc(self) -> bool:
        """An 802.3 length where the EtherType belongs (LLC or SNAP follows)."""
        return self.ethertype < ETHERTYPE_MIN

    @property
    def payload(self) -> bytes | memoryview:
        return self.data[self.payload_offset:]


def ethernet_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    """An untagged Ethernet frame around `payload` (no padding: the device pads)."""
    return b"".join((dst, src, ethertype.to_bytes(2, "big"), payload))
