"""The one frame type of vhostvpn: an Ethernet frame plus its virtio-net offload metadata.

Every hop (vhost-user rings, the switch, TUN/TAP with IFF_VNET_HDR, the wire) speaks this
shape, so a 64 KiB TSO frame from one guest can reach another guest unsegmented.  The
metadata mirrors `struct virtio_net_hdr` (virtio 1.x, 5.1.6); the frame bytes are never
parsed here.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from typing import NamedTuple

ETH_HEADER_LEN = 14
ETH_ADDR_LEN = 6
VLAN_TAG_LEN = 4
# The largest legal frame: a 64 KiB TSO super-frame (the IP datagram limit) behind an
# Ethernet header and two VLAN tags.  The one limit of the data path: the switch drops longer
# frames (`oversize`), the vhost-user device refuses them (virtio/spec.py MAX_FRAME) and the
# wire codec does too (tunnel/wire.py MAX_FRAME).
MAX_FRAME_LEN = 65535 + ETH_HEADER_LEN + 2 * VLAN_TAG_LEN

# EtherTypes (linux/if_ether.h names), as ints for struct and as the two bytes at
# offset 12, which the per-frame checks compare slices against without unpacking.
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100  # 802.1Q customer (VLAN) tag
ETH_P_8021AD = 0x88A8  # 802.1ad service tag
ETH_P_QINQ1 = 0x9100  # the pre-standard service tag
ETHERTYPE_IP = ETH_P_IP.to_bytes(2, "big")
ETHERTYPE_ARP = ETH_P_ARP.to_bytes(2, "big")
ETHERTYPE_IPV6 = ETH_P_IPV6.to_bytes(2, "big")
ETHERTYPE_8021Q = ETH_P_8021Q.to_bytes(2, "big")
ETHERTYPE_8021AD = ETH_P_8021AD.to_bytes(2, "big")
ETHERTYPE_QINQ1 = ETH_P_QINQ1.to_bytes(2, "big")

# struct virtio_net_hdr (with num_buffers: 12 bytes whenever VERSION_1 or MRG_RXBUF): the
# header every hop uses (vhost-user rings, TUNSETVNETHDRSZ), so one is copied through unchanged.
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")
VIRTIO_NET_HDR_LEN = VIRTIO_NET_HDR.size

# virtio_net_hdr.flags
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4

# virtio_net_hdr.gso_type
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80


class Offload(enum.IntFlag):
    """What a receiving port accepts beyond a plain, fully checksummed frame."""

    NONE = 0
    CSUM = 1  # partial checksums (NEEDS_CSUM with csum_start/csum_offset)
    TSO4 = 2
    TSO6 = 4
    ECN = 8
    UFO = 16
    USO = 32


ALL_OFFLOADS = Offload.CSUM | Offload.TSO4 | Offload.TSO6 | Offload.ECN | Offload.UFO | Offload.USO

# The one GSO -> offload mapping: what a receiver must accept to take a frame of each GSO type
# as it is (every segmentation offload depends on checksum offload, virtio 1.x 5.1.3.1), as
# plain ints: IntFlag arithmetic costs ~0.7 us an operation and the data path asks per frame.
GSO_NEEDS = {
    GSO_NONE: 0,
    GSO_TCPV4: int(Offload.TSO4 | Offload.CSUM),
    GSO_TCPV6: int(Offload.TSO6 | Offload.CSUM),
    GSO_UDP: int(Offload.UFO | Offload.CSUM),
    GSO_UDP_L4: int(Offload.USO | Offload.CSUM),
}
_CSUM = int(Offload.CSUM)
_ECN = int(Offload.ECN)


def needed_offloads(flags: int, gso_type: int) -> int | None:
    """What a receiver must accept (Offload bits, as an int) to take a frame whose
    virtio_net_hdr has these `flags` and `gso_type` as it is; None for an unknown GSO type,
    which nobody can take."""
    need = GSO_NEEDS.get(gso_type & ~GSO_ECN)
    if need is None:
        return None
    if gso_type & GSO_ECN:
        need |= _ECN
    if flags & HDR_F_NEEDS_CSUM:
        need |= _CSUM
    return need


class OffloadInfo(NamedTuple):
    """The offload half of a virtio_net_hdr, exactly as it is laid out there."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0


# A frame with complete checksums and no segmentation: the metadata of most frames, shared.
PLAIN = OffloadInfo()


class Frame:
    """An Ethernet frame (bytes-like, never mutated) and the offload metadata travelling with it.

    `offload` is an OffloadInfo (or the plain 6-tuple unpacked from a virtio_net_hdr, which is
    the same thing): the hot path hands the unpacked header over without rebuilding it.
    """

    __slots__ = ("data", "offload")

    def __init__(self, data: bytes | memoryview, offload: tuple = PLAIN) -> None:
        self.data = data
        self.offload = offload

    def pack_virtio_header(self, into: memoryview, offset: int, num_buffers: int) -> None:
        """Write this frame's 12-byte virtio_net_hdr at `offset` of `into`."""
        VIRTIO_NET_HDR.pack_into(into, offset, *self.offload, num_buffers)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Frame(len={len(self.data)}, {OffloadInfo(*self.offload)})"


QEMU_OUI = b"\x52\x54\x00"  # the prefix QEMU gives its NICs' MACs


def stable_mac(seed: str, oui: bytes | None = None) -> bytes:
    """A MAC derived from `seed` (a host's identity, a socket path, a subnet), the same on
    every run so neighbours' ARP caches stay right across restarts.  With `oui`, its three
    bytes and three of the digest; without, six bytes marked unicast, locally administered."""
    digest = hashlib.sha256(seed.encode()).digest()
    if oui is not None:
        if len(oui) != 3:
            raise ValueError(f"an OUI is three bytes, not {len(oui)}")
        return oui + digest[:3]
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """Parse 'aa:bb:cc:dd:ee:ff'; raise ValueError naming the bad input."""
    parts = text.split(":")
    if len(parts) != ETH_ADDR_LEN or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address (want aa:bb:cc:dd:ee:ff): {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address (want aa:bb:cc:dd:ee:ff): {text!r}") from None
