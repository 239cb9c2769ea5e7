"""Software offloads: finish partial checksums and cut GSO super-frames (TSO, UFO, USO).

The switch calls `adapt(frame, port.accepts)` for each frame bound to a port that cannot take
the frame's offloads as they are.  Bytes in, frames out, no I/O.  It never trusts a
guest-supplied offset: every header is parsed and checked here, and anything malformed raises
`OffloadError` (with a short `reason` to count drops by), never another exception.
Before that, `check_offload` vets the metadata of every frame entering the switch.

Theory of operation
-------------------
The metadata is a virtio_net_hdr (virtio 1.x 5.1.6.2) with Linux's meaning
(include/linux/virtio_net.h, net/ipv4/tcp_offload.c, net/ipv4/udp_offload.c):

* NEEDS_CSUM: the 16-bit field at csum_start + csum_offset holds the pseudo-header sum; the
  device completes the ones' complement sum from csum_start to the end of the frame.
* gso_type TCPV4/TCPV6, gso_size = MSS: a TCP super-packet; cut the payload into MSS pieces.
  Sequence numbers advance by the bytes before each piece; FIN and PSH stay on the last
  segment only, CWR on the first only (Linux clears CWR on later segments whether or not the
  GSO_ECN bit is set); IPv4 gets its own total length, header checksum and an ID that grows
  by one per segment; IPv6 gets its payload length.
* GSO_UDP (UFO): one UDP datagram, checksummed whole, then IP-fragmented: IPv4 fragments
  keep the ID and carry offset/MF (DF is cleared, as Linux does); IPv6 fragments get a
  fragment header with a fresh 32-bit identification.
* GSO_UDP_L4 (USO): the UDP payload is cut into gso_size pieces, each its own datagram with
  its own UDP length and checksum; IPv4 IDs grow by one per datagram.
* hdr_len is a hint and is ignored: headers are parsed here (Ethernet, up to two VLAN tags,
  IPv4 with options, IPv6 with hop-by-hop/destination options, TCP with options, UDP).

The path of a frame through `adapt`:
  1. plain metadata (no NEEDS_CSUM, no GSO): returned as it is, nothing parsed;
  2. the port accepts everything the frame needs (`netstack.frame.needed_offloads`):
     returned as is;
  3. no GSO, only CSUM missing: `complete_checksum`, one pass over csum_start..end;
  4. GSO the port cannot take: `segment`.  When the port accepts CSUM the segments leave with
     NEEDS_CSUM and a pseudo-header sum (no pass over the payload: the port's checksum
     offload finishes it, as Linux's software GSO does for a device with HW_CSUM); otherwise
     every segment is fully checksummed and PLAIN.  UFO fragments are always PLAIN: a
     datagram's checksum covers all its fragments, so only software can compute it.

Bounds: an output frame is at most the input's headers plus gso_size bytes (plus the 8-byte
fragment header for IPv6 UFO); a frame yields at most MAX_GSO_SEGMENTS pieces
(UDP_MAX_SEGMENTS for USO, Linux's limit).  What is refused, by reason: see REASONS.

Checksums are computed with big-integer arithmetic: int.from_bytes of a whole buffer is
congruent, modulo 0xFFFF, to the ones' complement sum of its 16-bit big-endian words (since
2**16 == 1 mod 0xFFFF), so one C-speed conversion and a few folds replace a per-word loop.
"""

from __future__ import annotations

import itertools
import random
import struct
from typing import NamedTuple

from netstack.frame import (
    ETH_HEADER_LEN,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    PLAIN,
    VLAN_TAG_LEN,
    Frame,
    Offload,
    needed_offloads,
)
from netstack.wire import IPPROTO_TCP, IPPROTO_UDP
from netstack.wire.checksum import checksum, folded, sum16, udp_checksum
from netstack.wire.ethernet import ETHERTYPE_OFFSET as ETH_TYPE_OFFSET
from netstack.wire.ipv4 import CHECKSUM_OFFSET as IPV4_CSUM_OFFSET
from netstack.wire.ipv4 import FLAG_MF as IP_MF
from netstack.wire.ipv4 import FRAGMENT_OFFSET as IPV4_FRAG_OFFSET
from netstack.wire.ipv4 import FRAGMENT_OFFSET_MASK as IP_FRAG_OFFSET_MASK
from netstack.wire.ipv4 import ID_OFFSET as IPV4_ID_OFFSET
from netstack.wire.ipv4 import MIN_HEADER_LEN as IPV4_MIN_HDR_LEN
from netstack.wire.ipv4 import PROTOCOL_OFFSET as IPV4_PROTO_OFFSET
from netstack.wire.ipv4 import SRC_OFFSET as IPV4_ADDRS_OFFSET
from netstack.wire.ipv4 import TOTAL_LEN_OFFSET as IPV4_TOT_LEN_OFFSET
from netstack.wire.ipv6 import DESTINATION_OPTIONS as IPPROTO_DSTOPTS
from netstack.wire.ipv6 import FRAGMENT as IPPROTO_FRAGMENT
from netstack.wire.ipv6 import HOP_BY_HOP as IPPROTO_HOPOPTS
from netstack.wire.ipv6 import IPV6_HEADER_LEN as IPV6_HDR_LEN
from netstack.wire.ipv6 import NEXT_HEADER_OFFSET as IPV6_NEXT_HDR_OFFSET
from netstack.wire.ipv6 import PAYLOAD_LEN_OFFSET as IPV6_PAYLOAD_LEN_OFFSET
from netstack.wire.ipv6 import SRC_OFFSET as IPV6_ADDRS_OFFSET
from netstack.wire.tcp import CHECKSUM_OFFSET as TCP_CSUM_OFFSET
from netstack.wire.tcp import CWR as TCP_CWR
from netstack.wire.tcp import DATA_OFFSET_OFFSET as TCP_DOFF_OFFSET
from netstack.wire.tcp import FIN as TCP_FIN
from netstack.wire.tcp import FLAGS_OFFSET as TCP_FLAGS_OFFSET
from netstack.wire.tcp import MIN_HEADER_LEN as TCP_MIN_HDR_LEN
from netstack.wire.tcp import PSH as TCP_PSH
from netstack.wire.tcp import SEQ_OFFSET as TCP_SEQ_OFFSET
from netstack.wire.udp import CHECKSUM_OFFSET as UDP_CSUM_OFFSET
from netstack.wire.udp import HEADER_LEN as UDP_HDR_LEN
from netstack.wire.udp import LENGTH_OFFSET as UDP_LEN_OFFSET

# Header offsets and numbers are netstack.wire's (one home for the formats), under the names
# this module has always used; the parse below stays inline (see _parse).
MAX_VLAN_TAGS = 2  # QinQ: an S-tag and a C-tag
IPV4_ADDRS_LEN = 8  # source then destination, 4 bytes each
IP_FRAG_UNIT = 8  # fragment offsets count 8-byte units (RFC 791, RFC 8200)
IPV6_ADDRS_LEN = 32  # source then destination, 16 bytes each
IPV6_EXT_UNIT = 8  # Hdr Ext Len counts 8-octet units beyond the first 8
IPV6_FRAG_HDR_LEN = 8
IPV6_FRAG_MORE = 1
MAX_IPV6_EXT_HEADERS = 8

# Work bounds.  A 64 KiB super-packet at Linux's smallest MSS (tcp_min_snd_mss, 48) is 1366
# segments; UDP_MAX_SEGMENTS is include/linux/udp.h's (virtio_net_hdr_to_skb enforces it).
MAX_GSO_SEGMENTS = 2048
UDP_MAX_SEGMENTS = 128
# The smallest gso_size `check_offload` lets into the switch for TSO and UFO: Linux's
# TCP_MIN_MSS (include/net/tcp.h), the smallest MSS a program may set (TCP_MAXSEG).  At most
# 745 segments per 64 KiB frame instead of 2048 at gso_size 32; real links carry at least
# 536 (IPv4) or 1220 (IPv6).  USO needs no floor: UDP_MAX_SEGMENTS bounds it.
MIN_GSO_SIZE = 88
# Offload flags a sender may set: NEEDS_CSUM, and DATA_VALID (a TAP device's kernel sets it
# on checksums it verified).  RSC_INFO and unknown bits mean nothing on the way in.
_SENDER_FLAGS = HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID

# Why a frame was refused: OffloadError.reason is always one of these.
REASONS = frozenset({
    "truncated",          # a header runs past the end of the frame
    "vlan",               # more than MAX_VLAN_TAGS tags
    "not_ip",             # GSO on a frame that is neither IPv4 nor IPv6
    "ip_version",         # version nibble disagrees with the EtherType
    "ip_header",          # IPv4 IHL below 5
    "ip_length",          # IPv4 total length / IPv6 payload length != bytes present
    "ip_fragment",        # GSO on an IP fragment
    "ipv6_ext",           # an IPv6 extension header we do not walk (routing, fragment, ...)
    "gso_mismatch",       # TCPV4 on IPv6 or TCPV6 on IPv4
    "not_tcp",            # TCP GSO on another protocol
    "not_udp",            # UDP GSO on another protocol
    "tcp_header",         # TCP data offset below 5
    "udp_length",         # UDP length != bytes present
    "gso_type",           # unknown GSO type, or ECN on UDP GSO
    "gso_size",           # gso_size 0, below one 8-byte fragment unit for UFO, or (check_offload)
                          # below MIN_GSO_SIZE for TSO and UFO
    "too_many_segments",  # more than MAX_GSO_SEGMENTS (UDP_MAX_SEGMENTS for USO)
    "csum_start",         # csum_start outside the frame, or not the L4 header of a GSO frame
    "csum_offset",        # checksum field outside the frame, or not the L4 checksum field
    "needs_segmentation", # complete_checksum asked to finish a GSO frame
    "flags",              # (check_offload) a flag bit a sender may not set
})

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U16X2 = struct.Struct(">HH")
_IPV6_FRAG_HDR = struct.Struct(">BBHI")

_GSO_TYPES = frozenset({GSO_TCPV4, GSO_TCPV6, GSO_UDP, GSO_UDP_L4})
_TCP_TYPES = frozenset({GSO_TCPV4, GSO_TCPV6})
_CSUM = int(Offload.CSUM)

# A fresh IPv6 fragment identification per UFO datagram (RFC 7739: not predictable).
_ipv6_frag_ids = itertools.count(random.getrandbits(32))


class OffloadError(Exception):
    """A frame adapt/segment/complete_checksum refuses.  `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Header parsing: one pass, every length checked against the frame


class _Headers(NamedTuple):
    l3: int  # offset of the IP header
    l4: int  # offset of the TCP/UDP header (after IPv6 extension headers)
    payload: int  # offset of the L4 payload
    ipv4: bool
    addr_sum: int  # sum16 of source and destination addresses (for the pseudo-header)


def _parse(data: memoryview, gso_type: int) -> _Headers:
    """Parse Ethernet / IP / TCP or UDP for GSO type `gso_type`; raise OffloadError if bad.

    Inline, not netstack.wire's views: once per GSO frame, 1.16 us here vs 1.81 us through
    views (+8% of segment() for a 2-segment TSO frame), and its checks (two tags, exact
    lengths, only hop-by-hop/destination options) and reasons (REASONS) are segmentation's."""
    size = len(data)
    if size < ETH_HEADER_LEN:
        raise OffloadError("truncated", f"frame of {size} bytes has no Ethernet header")
    ethertype = _U16.unpack_from(data, ETH_TYPE_OFFSET)[0]
    l3 = ETH_HEADER_LEN
    tags = 0
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD):
        tags += 1
        if tags > MAX_VLAN_TAGS:
            raise OffloadError("vlan", f"more than {MAX_VLAN_TAGS} VLAN tags")
        if size < l3 + VLAN_TAG_LEN:
            raise OffloadError("truncated", f"VLAN tag at {l3} past the end ({size} bytes)")
        ethertype = _U16.unpack_from(data, l3 + 2)[0]
        l3 += VLAN_TAG_LEN

    if ethertype == ETH_P_IP:
        if gso_type == GSO_TCPV6:
            raise OffloadError("gso_mismatch", "TCPV6 GSO on an IPv4 packet")
        if size < l3 + IPV4_MIN_HDR_LEN:
            raise OffloadError("truncated", f"IPv4 header at {l3} past the end ({size} bytes)")
        version_ihl = data[l3]
        if version_ihl >> 4 != 4:
            raise OffloadError("ip_version", f"version {version_ihl >> 4} under EtherType IPv4")
        ihl = (version_ihl & 0x0F) * 4
        if ihl < IPV4_MIN_HDR_LEN:
            raise OffloadError("ip_header", f"IPv4 header length {ihl}, want >= 20")
        l4 = l3 + ihl
        if size < l4:
            raise OffloadError("truncated", f"IPv4 header of {ihl} bytes past the end")
        total_len = _U16.unpack_from(data, l3 + IPV4_TOT_LEN_OFFSET)[0]
        if total_len != size - l3:
            raise OffloadError("ip_length", f"IPv4 total length {total_len}, "
                               f"{size - l3} bytes present")
        if _U16.unpack_from(data, l3 + IPV4_FRAG_OFFSET)[0] & (IP_MF | IP_FRAG_OFFSET_MASK):
            raise OffloadError("ip_fragment", "GSO on an IPv4 fragment")
        proto = data[l3 + IPV4_PROTO_OFFSET]
        addrs = l3 + IPV4_ADDRS_OFFSET
        addr_sum = sum16(data[addrs:addrs + IPV4_ADDRS_LEN]) % 0xFFFF
        ipv4 = True
    elif ethertype == ETH_P_IPV6:
        if gso_type == GSO_TCPV4:
            raise OffloadError("gso_mismatch", "TCPV4 GSO on an IPv6 packet")
        if size < l3 + IPV6_HDR_LEN:
            raise OffloadError("truncated", f"IPv6 header at {l3} past the end ({size} bytes)")
        if data[l3] >> 4 != 6:
            raise OffloadError("ip_version", f"version {data[l3] >> 4} under EtherType IPv6")
        payload_len = _U16.unpack_from(data, l3 + IPV6_PAYLOAD_LEN_OFFSET)[0]
        if payload_len != size - l3 - IPV6_HDR_LEN:
            raise OffloadError("ip_length", f"IPv6 payload length {payload_len}, "
                               f"{size - l3 - IPV6_HDR_LEN} bytes present")
        proto = data[l3 + IPV6_NEXT_HDR_OFFSET]
        l4 = l3 + IPV6_HDR_LEN
        # Hop-by-hop (first only) and destination options are copied into every segment
        # unchanged.  Routing headers change the pseudo-header's destination and fragment
        # headers make GSO meaningless: refused.
        for _ in range(MAX_IPV6_EXT_HEADERS):
            if proto == IPPROTO_DSTOPTS or (proto == IPPROTO_HOPOPTS
                                            and l4 == l3 + IPV6_HDR_LEN):
                if size < l4 + IPV6_EXT_UNIT:
                    raise OffloadError("truncated", f"IPv6 extension header at {l4} "
                                       f"past the end ({size} bytes)")
                proto = data[l4]
                l4 += (data[l4 + 1] + 1) * IPV6_EXT_UNIT
            else:
                break
        else:
            raise OffloadError("ipv6_ext", f"more than {MAX_IPV6_EXT_HEADERS} extension headers")
        if size < l4:
            raise OffloadError("truncated", f"IPv6 extension headers end at {l4}, "
                               f"past the end ({size} bytes)")
        if proto not in (IPPROTO_TCP, IPPROTO_UDP):
            raise OffloadError("ipv6_ext", f"next header {proto} (only TCP/UDP after "
                               "hop-by-hop and destination options)")
        addrs = l3 + IPV6_ADDRS_OFFSET
        addr_sum = sum16(data[addrs:addrs + IPV6_ADDRS_LEN]) % 0xFFFF
        ipv4 = False
    else:
        raise OffloadError("not_ip", f"GSO on EtherType {ethertype:#06x}")

    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        if proto != IPPROTO_TCP:
            raise OffloadError("not_tcp", f"TCP GSO on IP protocol {proto}")
        if size < l4 + TCP_MIN_HDR_LEN:
            raise OffloadError("truncated", f"TCP header at {l4} past the end ({size} bytes)")
        tcp_len = (data[l4 + TCP_DOFF_OFFSET] >> 4) * 4
        if tcp_len < TCP_MIN_HDR_LEN:
            raise OffloadError("tcp_header", f"TCP header length {tcp_len}, want >= 20")
        if size < l4 + tcp_len:
            raise OffloadError("truncated", f"TCP header of {tcp_len} bytes past the end")
        return _Headers(l3, l4, l4 + tcp_len, ipv4, addr_sum)

    if proto != IPPROTO_UDP:
        raise OffloadError("not_udp", f"UDP GSO on IP protocol {proto}")
    if size < l4 + UDP_HDR_LEN:
        raise OffloadError("truncated", f"UDP header at {l4} past the end ({size} bytes)")
    udp_len = _U16.unpack_from(data, l4 + UDP_LEN_OFFSET)[0]
    if udp_len != size - l4:
        raise OffloadError("udp_length", f"UDP length {udp_len}, {size - l4} bytes present")
    return _Headers(l3, l4, l4 + UDP_HDR_LEN, ipv4, addr_sum)


def _check_partial(offload: tuple, headers: _Headers, csum_offset: int) -> None:
    """A GSO frame that also says NEEDS_CSUM must point at the L4 checksum we found."""
    if offload[0] & HDR_F_NEEDS_CSUM:
        if offload[4] != headers.l4:
            raise OffloadError("csum_start", f"csum_start {offload[4]}, "
                               f"L4 header at {headers.l4}")
        if offload[5] != csum_offset:
            raise OffloadError("csum_offset", f"csum_offset {offload[5]}, want {csum_offset}")


def _segment_count(payload_len: int, piece: int, limit: int) -> int:
    count = max(1, -(-payload_len // piece))
    if count > limit:
        raise OffloadError("too_many_segments", f"{payload_len} bytes in pieces of {piece} "
                           f"make {count} segments, limit {limit}")
    return count


def _ipv4_header_base(hdr: bytearray, l3: int, l4: int) -> int:
    """Zero the IPv4 checksum in `hdr`; return the header's sum without total length and ID
    (added per segment)."""
    _U16.pack_into(hdr, l3 + IPV4_CSUM_OFFSET, 0)
    total_len, ip_id = _U16X2.unpack_from(hdr, l3 + IPV4_TOT_LEN_OFFSET)
    return (sum16(hdr[l3:l4]) - total_len - ip_id) % 0xFFFF


# ---------------------------------------------------------------------------------------------
# Checking metadata on the way in


def check_offload(offload: tuple, length: int) -> str | None:
    """Is the offload metadata of a `length`-byte frame fit to enter the switch?  None if it
    is, else the reason (one of REASONS) to drop it for.  Reads the six fields only, never the
    frame: what the frame's headers say is `adapt`'s business, if it is ever segmented.

    The switch checks every frame that is not PLAIN as it enters, whoever sent it (a guest's
    TX path, a tunnel session, a TAP device); a vhost-user port also refuses offloads its
    guest did not negotiate, before this."""
    flags, gso_type, _, gso_size, csum_start, csum_offset = offload
    if flags & ~_SENDER_FLAGS:
        return "flags"
    if flags & HDR_F_NEEDS_CSUM:
        if csum_start >= length:
            return "csum_start"
        if csum_start + csum_offset + 2 > length:
            return "csum_offset"
    if gso_type == GSO_NONE:
        return None
    base_type = gso_type & ~GSO_ECN
    if base_type not in _GSO_TYPES or (gso_type & GSO_ECN and base_type not in _TCP_TYPES):
        return "gso_type"
    if gso_size == 0 or (gso_size < MIN_GSO_SIZE and base_type != GSO_UDP_L4):
        return "gso_size"
    return None


# ---------------------------------------------------------------------------------------------
# The building blocks, in the order adapt uses them


def complete_checksum(frame: Frame) -> Frame:
    """Finish a NEEDS_CSUM frame's checksum; return a new PLAIN frame (or `frame` itself when
    it needs nothing).  Generic, like the device in the virtio spec: no header is parsed."""
    offload = frame.offload
    flags, gso_type, _, _, csum_start, csum_offset = offload
    if not flags & HDR_F_NEEDS_CSUM:
        return frame
    if gso_type != GSO_NONE:
        raise OffloadError("needs_segmentation", f"gso_type {gso_type:#x}: use segment()")
    data = memoryview(frame.data)
    size = len(data)
    if csum_start >= size:
        raise OffloadError("csum_start", f"csum_start {csum_start} in a {size}-byte frame")
    field = csum_start + csum_offset
    if field + 2 > size:
        raise OffloadError("csum_offset", f"checksum field at {field} in a {size}-byte frame")
    # The field holds the pseudo-header sum and is part of the summed range: no need to
    # zero it.  0xFFFF for a computed 0, as Linux's skb_checksum_help (valid for TCP too).
    check = udp_checksum(sum16(data[csum_start:]))
    return Frame(b"".join((data[:field], _U16.pack(check), data[field + 2:])))


def segment(frame: Frame, *, csum_partial: bool = False) -> list[Frame]:
    """Cut a GSO frame into wire-sized frames (TSO, UFO, USO); finish the checksum of a
    non-GSO NEEDS_CSUM frame.  With `csum_partial`, TCP and USO segments keep NEEDS_CSUM and
    a pseudo-header sum for the receiver's checksum offload to finish; otherwise, and
    always for UFO fragments, every output is fully checksummed and PLAIN."""
    offload = frame.offload
    gso_type = offload[1]
    if gso_type == GSO_NONE:
        return [complete_checksum(frame)]
    base_type = gso_type & ~GSO_ECN
    if base_type not in _GSO_TYPES:
        raise OffloadError("gso_type", f"unknown gso_type {gso_type:#x}")
    gso_size = offload[3]
    if gso_size == 0:
        raise OffloadError("gso_size", "gso_size 0 on a GSO frame")
    data = memoryview(frame.data)
    if base_type in (GSO_TCPV4, GSO_TCPV6):
        headers = _parse(data, base_type)
        _check_partial(offload, headers, TCP_CSUM_OFFSET)
        return _segment_tcp(data, headers, gso_size, csum_partial)
    if gso_type & GSO_ECN:
        raise OffloadError("gso_type", f"ECN on UDP gso_type {gso_type:#x}")
    headers = _parse(data, base_type)
    _check_partial(offload, headers, UDP_CSUM_OFFSET)
    if base_type == GSO_UDP_L4:
        return _segment_udp(data, headers, gso_size, csum_partial)
    return _fragment_udp(data, headers, gso_size)


def adapt(frame: Frame, accepts: Offload) -> list[Frame]:
    """The frames to hand a port that accepts `accepts`: `[frame]` itself when the port can
    take it, else its checksum completed or its segments.  Raises OffloadError."""
    offload = frame.offload
    if offload is PLAIN:
        return [frame]
    flags, gso_type = offload[0], offload[1]
    if gso_type == GSO_NONE:
        if not flags & HDR_F_NEEDS_CSUM or int.__and__(accepts, _CSUM):
            return [frame]
        return [complete_checksum(frame)]
    need = needed_offloads(flags, gso_type)
    if need is None:
        raise OffloadError("gso_type", f"unknown gso_type {gso_type:#x}")
    if not need & ~int(accepts):
        return [frame]
    return segment(frame, csum_partial=bool(int.__and__(accepts, _CSUM)))


# ---------------------------------------------------------------------------------------------
# Segmentation proper


def _ip_fields(hdr: bytearray, h: _Headers) -> tuple[int, int, int, int]:
    """What every segment's IP header starts from, read once per super-frame: IPv4's first
    ID, header sum base and header length (IPv6: 0, 0, 0), and IPv6's extension length."""
    if h.ipv4:
        return (_U16.unpack_from(hdr, h.l3 + IPV4_ID_OFFSET)[0],
                _ipv4_header_base(hdr, h.l3, h.l4), h.l4 - h.l3, 0)
    return 0, 0, 0, h.l4 - h.l3 - IPV6_HDR_LEN


def _segment_tcp(data: memoryview, h: _Headers, mss: int, csum_partial: bool) -> list[Frame]:
    l3, l4, start = h.l3, h.l4, h.payload
    payload_len = len(data) - start
    count = _segment_count(payload_len, mss, MAX_GSO_SEGMENTS)
    tcp_len = start - l4
    hdr = bytearray(data[:start])  # the headers, patched per segment

    seq0 = _U32.unpack_from(hdr, l4 + TCP_SEQ_OFFSET)[0]
    flags0 = hdr[l4 + TCP_FLAGS_OFFSET]
    # The TCP header's sum without sequence number, flags byte and checksum: those change.
    _U32.pack_into(hdr, l4 + TCP_SEQ_OFFSET, 0)
    hdr[l4 + TCP_FLAGS_OFFSET] = 0
    _U16.pack_into(hdr, l4 + TCP_CSUM_OFFSET, 0)
    tcp_base = (sum16(hdr[l4:start]) + h.addr_sum + IPPROTO_TCP) % 0xFFFF
    ip_id0, ip_base, ip_hdr_len, ext_len = _ip_fields(hdr, h)
    offload = (HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, TCP_CSUM_OFFSET) if csum_partial else PLAIN

    segments = []
    last = count - 1
    for i in range(count):
        begin = start + i * mss
        end = min(begin + mss, len(data))
        flags = flags0
        if i != last:
            flags &= ~(TCP_FIN | TCP_PSH)
        if i:
            flags &= ~TCP_CWR
        seq = (seq0 + i * mss) & 0xFFFFFFFF
        seg_tcp_len = tcp_len + end - begin
        hdr[l4 + TCP_FLAGS_OFFSET] = flags
        _U32.pack_into(hdr, l4 + TCP_SEQ_OFFSET, seq)
        if h.ipv4:
            total_len = ip_hdr_len + seg_tcp_len
            ip_id = (ip_id0 + i) & 0xFFFF
            _U16X2.pack_into(hdr, l3 + IPV4_TOT_LEN_OFFSET, total_len, ip_id)
            _U16.pack_into(hdr, l3 + IPV4_CSUM_OFFSET, checksum(ip_base + total_len + ip_id))
        else:
            _U16.pack_into(hdr, l3 + IPV6_PAYLOAD_LEN_OFFSET, ext_len + seg_tcp_len)
        if csum_partial:
            check = folded(h.addr_sum + IPPROTO_TCP + seg_tcp_len)
        else:
            check = checksum(tcp_base + seg_tcp_len + (seq >> 16) + (seq & 0xFFFF) + flags
                              + sum16(data[begin:end]))
        _U16.pack_into(hdr, l4 + TCP_CSUM_OFFSET, check)
        segments.append(Frame(b"".join((hdr, data[begin:end])), offload))
    return segments


def _segment_udp(data: memoryview, h: _Headers, gso_size: int,
                 csum_partial: bool) -> list[Frame]:
    """USO: one datagram per gso_size bytes of UDP payload."""
    l3, l4, start = h.l3, h.l4, h.payload
    payload_len = len(data) - start
    count = _segment_count(payload_len, gso_size, UDP_MAX_SEGMENTS)
    hdr = bytearray(data[:start])
    ports_sum = sum(_U16X2.unpack_from(hdr, l4))
    ip_id0, ip_base, ip_hdr_len, ext_len = _ip_fields(hdr, h)
    offload = (HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, UDP_CSUM_OFFSET) if csum_partial else PLAIN

    datagrams = []
    for i in range(count):
        begin = start + i * gso_size
        end = min(begin + gso_size, len(data))
        udp_len = UDP_HDR_LEN + end - begin
        _U16.pack_into(hdr, l4 + UDP_LEN_OFFSET, udp_len)
        if h.ipv4:
            total_len = ip_hdr_len + udp_len
            ip_id = (ip_id0 + i) & 0xFFFF
            _U16X2.pack_into(hdr, l3 + IPV4_TOT_LEN_OFFSET, total_len, ip_id)
            _U16.pack_into(hdr, l3 + IPV4_CSUM_OFFSET, checksum(ip_base + total_len + ip_id))
        else:
            _U16.pack_into(hdr, l3 + IPV6_PAYLOAD_LEN_OFFSET, ext_len + udp_len)
        pseudo = h.addr_sum + IPPROTO_UDP + udp_len
        if csum_partial:
            check = folded(pseudo)
        else:
            # pseudo-header + ports + length + (checksum 0) + payload
            check = udp_checksum(pseudo + ports_sum + udp_len + sum16(data[begin:end]))
        _U16.pack_into(hdr, l4 + UDP_CSUM_OFFSET, check)
        datagrams.append(Frame(b"".join((hdr, data[begin:end])), offload))
    return datagrams


def _fragment_udp(data: memoryview, h: _Headers, gso_size: int) -> list[Frame]:
    """UFO: checksum the whole datagram, then fragment it at the IP layer."""
    l3, l4 = h.l3, h.l4
    udp_len = len(data) - l4
    udp_hdr = bytearray(data[l4:h.payload])
    _U16.pack_into(udp_hdr, UDP_CSUM_OFFSET, 0)
    check = udp_checksum(h.addr_sum + IPPROTO_UDP + udp_len + sum16(udp_hdr)
                          + sum16(data[h.payload:]))
    _U16.pack_into(udp_hdr, UDP_CSUM_OFFSET, check)
    if udp_len <= gso_size:  # fits: one datagram, not fragmented
        hdr = bytearray(data[:l4])
        if h.ipv4:
            ip_base = _ipv4_header_base(hdr, l3, l4)
            total_len, ip_id = _U16X2.unpack_from(hdr, l3 + IPV4_TOT_LEN_OFFSET)
            _U16.pack_into(hdr, l3 + IPV4_CSUM_OFFSET, checksum(ip_base + total_len + ip_id))
        return [Frame(b"".join((hdr, udp_hdr, data[h.payload:])))]

    piece = gso_size - gso_size % IP_FRAG_UNIT  # every fragment but the last: 8-byte units
    if piece == 0:
        raise OffloadError("gso_size", f"gso_size {gso_size} below one fragment unit (8)")
    count = _segment_count(udp_len, piece, MAX_GSO_SEGMENTS)
    datagram = memoryview(b"".join((udp_hdr, data[h.payload:])))  # the fragmentable part
    fragments = []
    if h.ipv4:
        hdr = bytearray(data[:l4])
        ip_hdr_len = l4 - l3
        _U16.pack_into(hdr, l3 + IPV4_FRAG_OFFSET, 0)  # DF cleared, as Linux's UFO does
        ip_base = _ipv4_header_base(hdr, l3, l4)  # ID fixed: leave it in the base
        ip_id = _U16.unpack_from(data, l3 + IPV4_ID_OFFSET)[0]
        ip_base += ip_id
        for i in range(count):
            offset = i * piece
            chunk = datagram[offset:offset + piece]
            total_len = ip_hdr_len + len(chunk)
            frag = offset // IP_FRAG_UNIT | (IP_MF if i != count - 1 else 0)
            _U16.pack_into(hdr, l3 + IPV4_TOT_LEN_OFFSET, total_len)
            _U16.pack_into(hdr, l3 + IPV4_FRAG_OFFSET, frag)
            _U16.pack_into(hdr, l3 + IPV4_CSUM_OFFSET, checksum(ip_base + total_len + frag))
            fragments.append(Frame(b"".join((hdr, chunk))))
        return fragments

    if l4 != l3 + IPV6_HDR_LEN:
        raise OffloadError("ipv6_ext", "IPv6 UFO with extension headers")
    hdr = bytearray(data[:l4])
    hdr[l3 + IPV6_NEXT_HDR_OFFSET] = IPPROTO_FRAGMENT
    ident = next(_ipv6_frag_ids) & 0xFFFFFFFF
    frag_hdr = bytearray(IPV6_FRAG_HDR_LEN)
    for i in range(count):
        offset = i * piece
        chunk = datagram[offset:offset + piece]
        _U16.pack_into(hdr, l3 + IPV6_PAYLOAD_LEN_OFFSET, IPV6_FRAG_HDR_LEN + len(chunk))
        more = IPV6_FRAG_MORE if i != count - 1 else 0
        _IPV6_FRAG_HDR.pack_into(frag_hdr, 0, IPPROTO_UDP, 0, offset | more, ident)
        fragments.append(Frame(b"".join((hdr, frag_hdr, chunk))))
    return fragments
