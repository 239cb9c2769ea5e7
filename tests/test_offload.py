"""Software offloads (netstack/offload.py) against scapy as the independent reference.

Super-packets are built with scapy and put in the form a guest hands them over (the L4
checksum field holding the pseudo-header sum, computed here with a plain per-word loop);
every output is re-parsed with scapy and its checksums compared with scapy's own.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Packet

from netstack.frame import (
    ALL_OFFLOADS,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    PLAIN,
    Frame,
    Offload,
    needed_offloads,
)
from netstack.offload import (
    MAX_GSO_SEGMENTS,
    MIN_GSO_SIZE,
    REASONS,
    UDP_MAX_SEGMENTS,
    OffloadError,
    adapt,
    check_offload,
    complete_checksum,
    segment,
)

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
V4 = dict(src="10.0.0.1", dst="10.0.0.2")
V6 = dict(src="fd00::1", dst="fd00::2")
FIN, PSH, CWR = 0x01, 0x08, 0x80
TCP_ECN_GSO = GSO_TCPV4 | GSO_ECN


def payload_bytes(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


# --- the reference: a plain ones' complement sum, nothing shared with the code under test


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header(ip: Packet, proto: int, l4_len: int) -> bytes:
    header = ip.original or bytes(ip)
    if isinstance(ip, IP):
        return header[12:20] + struct.pack(">BBH", 0, proto, l4_len)
    return header[8:40] + struct.pack(">I3xB", l4_len, proto)


def guest_form(pkt: Packet, gso_type: int, gso_size: int, l4cls: type = TCP,
               flags: int = HDR_F_NEEDS_CSUM) -> Frame:
    """The frame as a guest driver hands it over: L4 checksum = the pseudo-header sum."""
    data = bytearray(bytes(pkt))
    l4_len = len(bytes(pkt[l4cls]))
    l4 = len(data) - l4_len
    ip = pkt[IP] if IP in pkt else pkt[IPv6]
    proto = 6 if l4cls is TCP else 17
    field = l4 + (16 if l4cls is TCP else 6)
    struct.pack_into(">H", data, field, ones_sum(pseudo_header(ip, proto, l4_len)))
    return Frame(bytes(data), (flags, gso_type, 0, gso_size, l4, field - l4))


def l4_checksum_ok(data: bytes, l4cls: type) -> bool:
    """scapy recomputes the checksum and gets the value we wrote (0 and 0xFFFF are the same
    ones' complement number; UDP spells it 0xFFFF, TCP 0)."""
    pkt = Ether(data)
    ours = pkt[l4cls].chksum
    del pkt[l4cls].chksum
    theirs = Ether(bytes(pkt))[l4cls].chksum
    return ours == theirs or {ours, theirs} == {0, 0xFFFF}


def l4_sum_ok(data: bytes, l4cls: type) -> bool:
    """The receiver's check, without scapy rebuilding anything: the ones' complement sum of
    pseudo-header and L4 bytes is 0xFFFF (for headers scapy would not re-serialize as is)."""
    pkt = Ether(data)
    ip = pkt[IP] if IP in pkt else pkt[IPv6]
    l4_bytes = pkt[l4cls].original
    return ones_sum(pseudo_header(ip, 6 if l4cls is TCP else 17, len(l4_bytes))
                    + l4_bytes) == 0xFFFF


def ip_checksum_ok(data: bytes) -> bool:
    pkt = Ether(data)
    ours = pkt[IP].chksum
    del pkt[IP].chksum
    return Ether(bytes(pkt))[IP].chksum == ours


def check_tcp_segments(original: Frame, segments: list[Frame], mss: int) -> None:
    """Every property a receiver relies on, segment by segment."""
    orig = Ether(bytes(original.data))
    ipcls = IP if IP in orig else IPv6
    payload = bytes(orig[TCP].payload)
    header_len = len(original.data) - len(payload)
    got = b""
    for i, seg in enumerate(segments):
        data = bytes(seg.data)
        assert seg.offload == PLAIN
        assert len(data) <= header_len + mss
        pkt = Ether(data)
        tcp = pkt[TCP]
        assert tcp.seq == (orig[TCP].seq + len(got)) % 2**32
        assert tcp.ack == orig[TCP].ack
        want_flags = int(orig[TCP].flags)
        if i != len(segments) - 1:
            want_flags &= ~(FIN | PSH)
        if i:
            want_flags &= ~CWR
        assert int(tcp.flags) == want_flags, f"segment {i}"
        assert tcp.options == orig[TCP].options
        got += bytes(tcp.payload)
        assert l4_checksum_ok(data, TCP), f"segment {i} TCP checksum"
        if ipcls is IP:
            assert pkt[IP].len == len(bytes(pkt[IP]))
            assert pkt[IP].id == (orig[IP].id + i) % 65536
            assert pkt[IP].flags == orig[IP].flags
            assert ip_checksum_ok(data), f"segment {i} IP checksum"
        else:
            assert pkt[IPv6].plen == len(bytes(pkt[IPv6].payload))
        if i != len(segments) - 1:
            assert len(bytes(tcp.payload)) == mss
    assert got == payload
    assert len(segments) == max(1, -(-len(payload) // mss))


def tcp4(n: int, *, flags: str = "PA", seq: int = 1000, ip_id: int = 7, **ip) -> Packet:
    return (Ether(**MAC) / IP(**V4, id=ip_id, flags="DF", **ip)
            / TCP(sport=40000, dport=5201, seq=seq, ack=99, flags=flags,
                  options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
            / payload_bytes(n))


def tcp6(n: int, *, flags: str = "PA", seq: int = 1000) -> Packet:
    return (Ether(**MAC) / IPv6(**V6) / TCP(sport=40000, dport=5201, seq=seq, ack=99,
                                           flags=flags) / payload_bytes(n))


# --- fast paths and pass-through


def test_plain_frame_comes_back_itself_without_parsing() -> None:
    frame = Frame(b"not even ethernet")
    assert adapt(frame, Offload.NONE)[0] is frame
    zeros = Frame(b"x", (0, 0, 0, 0, 0, 0))  # an unpacked header, not the PLAIN object
    assert adapt(zeros, Offload.NONE)[0] is zeros
    valid = Frame(b"x", (HDR_F_DATA_VALID, 0, 0, 0, 0, 0))
    assert adapt(valid, Offload.NONE)[0] is valid


def test_port_accepting_the_offloads_gets_the_frame_itself() -> None:
    frame = guest_form(tcp4(5000), GSO_TCPV4, 1448)
    assert adapt(frame, ALL_OFFLOADS)[0] is frame
    assert adapt(frame, Offload.TSO4 | Offload.CSUM)[0] is frame
    partial = guest_form(tcp4(100), GSO_NONE, 0)
    assert adapt(partial, Offload.CSUM)[0] is partial


# --- TCP segmentation


@pytest.mark.parametrize("payload_len", [0, 1, 1447, 1448, 1449, 1448 * 7, 10001, 65000])
def test_tso4_segments_match_scapy(payload_len: int) -> None:
    frame = guest_form(tcp4(payload_len), GSO_TCPV4, 1448)
    check_tcp_segments(frame, adapt(frame, Offload.NONE), 1448)


@pytest.mark.parametrize("payload_len", [1, 1220, 9999, 63000])
def test_tso6_segments_match_scapy(payload_len: int) -> None:
    frame = guest_form(tcp6(payload_len), GSO_TCPV6, 1220)
    check_tcp_segments(frame, adapt(frame, Offload.TSO4), 1220)


def test_gso_size_larger_than_payload_gives_one_plain_segment() -> None:
    frame = guest_form(tcp4(1000, flags="FPA"), GSO_TCPV4, 1448)
    (seg,) = segment(frame)
    check_tcp_segments(frame, [seg], 1448)
    assert int(Ether(seg.data)[TCP].flags) & FIN


def test_odd_mss_keeps_checksums_right() -> None:
    frame = guest_form(tcp4(5001), GSO_TCPV4, 999)
    check_tcp_segments(frame, segment(frame), 999)


def test_fin_and_psh_only_on_the_last_segment() -> None:
    frame = guest_form(tcp4(4000, flags="FPA"), GSO_TCPV4, 1000)
    segments = segment(frame)
    flags = [int(Ether(s.data)[TCP].flags) for s in segments]
    assert [f & (FIN | PSH) for f in flags] == [0, 0, 0, FIN | PSH]
    check_tcp_segments(frame, segments, 1000)


def test_cwr_only_on_the_first_segment_with_ecn() -> None:
    frame = guest_form(tcp4(4000, flags="CEA"), TCP_ECN_GSO, 1000)
    assert adapt(frame, Offload.TSO4 | Offload.CSUM | Offload.ECN)[0] is frame
    segments = adapt(frame, Offload.TSO4 | Offload.CSUM)  # no ECN: must segment
    flags = [int(Ether(s.data)[TCP].flags) for s in segments]
    assert [f & CWR for f in flags] == [CWR, 0, 0, 0]
    check_tcp_segments(frame, [Frame(s.data) for s in segments_completed(segments)], 1000)


def segments_completed(segments: list[Frame]) -> list[Frame]:
    return [complete_checksum(s) for s in segments]


def test_sequence_number_and_ip_id_wrap() -> None:
    frame = guest_form(tcp4(5000, seq=2**32 - 2000, ip_id=65534), GSO_TCPV4, 1448)
    segments = segment(frame)
    assert [Ether(s.data)[IP].id for s in segments] == [65534, 65535, 0, 1]
    check_tcp_segments(frame, segments, 1448)


def test_ipv4_options_are_copied_into_every_segment() -> None:
    pkt = tcp4(3000, options=[b"\x94\x04\x00\x00"])  # router alert
    frame = guest_form(pkt, GSO_TCPV4, 1000)
    segments = segment(frame)
    assert all(Ether(s.data)[IP].ihl == 6 for s in segments)
    check_tcp_segments(frame, segments, 1000)


@pytest.mark.parametrize("tags", [[Dot1Q(vlan=5)], [Dot1AD(vlan=7), Dot1Q(vlan=5)]])
def test_vlan_tagged_tso(tags: list[Packet]) -> None:
    inner = tcp4(5000)
    pkt = Ether(**MAC)
    for tag in tags:
        pkt = pkt / tag
    pkt = pkt / inner[IP]
    frame = guest_form(pkt, GSO_TCPV4, 1448)
    segments = segment(frame)
    assert all(Ether(s.data)[Dot1Q].vlan == 5 for s in segments)
    check_tcp_segments(frame, segments, 1448)


def test_ipv6_hop_by_hop_and_destination_options_are_walked() -> None:
    pkt = (Ether(**MAC) / IPv6(**V6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
           / TCP(sport=1, dport=2, seq=5, flags="A") / payload_bytes(4000))
    frame = guest_form(pkt, GSO_TCPV6, 1400)
    segments = segment(frame)
    assert all(IPv6ExtHdrDestOpt in Ether(s.data) for s in segments)
    check_tcp_segments(frame, segments, 1400)


def test_frame_data_may_be_a_memoryview() -> None:
    frame = guest_form(tcp4(5000), GSO_TCPV4, 1448)
    as_view = Frame(memoryview(bytearray(frame.data)), frame.offload)
    assert [s.data for s in segment(as_view)] == [s.data for s in segment(frame)]


def test_gso_without_needs_csum_ignores_the_checksum_field() -> None:
    frame = Frame(bytes(tcp4(4000)), (0, GSO_TCPV4, 0, 1448, 0, 0))  # full checksum inside
    check_tcp_segments(frame, segment(frame), 1448)


def test_csum_capable_port_gets_partial_segments() -> None:
    frame = guest_form(tcp4(10001), GSO_TCPV4, 1448)
    segments = adapt(frame, Offload.CSUM)
    l4 = len(frame.data) - len(bytes(Ether(frame.data)[TCP]))
    for seg in segments:
        assert seg.offload == (HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, 16)
        pkt = Ether(seg.data)
        want = ones_sum(pseudo_header(pkt[IP], 6, len(bytes(pkt[TCP]))))
        assert pkt[TCP].chksum == want
        assert ip_checksum_ok(bytes(seg.data))
    check_tcp_segments(frame, segments_completed(segments), 1448)


# --- checksum completion


@pytest.mark.parametrize("n", [0, 1, 2, 3, 1400, 1401, 60000])
@pytest.mark.parametrize("l3", ["ipv4", "ipv6"])
@pytest.mark.parametrize("l4cls", [TCP, UDP])
def test_complete_checksum_matches_scapy(n: int, l3: str, l4cls: type) -> None:
    ip = IP(**V4) if l3 == "ipv4" else IPv6(**V6)
    pkt = Ether(**MAC) / ip / l4cls(sport=1, dport=2) / payload_bytes(n)
    frame = guest_form(pkt, GSO_NONE, 0, l4cls)
    (done,) = adapt(frame, Offload.TSO4 | Offload.TSO6)
    assert done.offload == PLAIN
    assert l4_checksum_ok(bytes(done.data), l4cls)
    assert bytes(done.data) == bytes(pkt) or Ether(done.data)[l4cls].chksum == 0xFFFF


def test_complete_checksum_never_writes_zero() -> None:
    # A UDP datagram whose true checksum is 0: crafted by choosing two payload bytes.
    pkt = Ether(**MAC) / IP(**V4) / UDP(sport=1, dport=2) / b"\0\0"
    frame = guest_form(pkt, GSO_NONE, 0, UDP)
    need = (0xFFFF - ones_sum(bytes(frame.data)[frame.offload[4]:])) & 0xFFFF
    data = bytes(frame.data)[:-2] + struct.pack(">H", need)
    (done,) = adapt(Frame(data, frame.offload), Offload.NONE)
    assert Ether(done.data)[UDP].chksum == 0xFFFF
    assert l4_checksum_ok(bytes(done.data), UDP)


def test_complete_checksum_of_a_frame_without_needs_csum_is_the_frame() -> None:
    frame = Frame(b"abc", (HDR_F_DATA_VALID, 0, 0, 0, 0, 0))
    assert complete_checksum(frame) is frame


# --- UDP: USO and UFO


@pytest.mark.parametrize("ipcls", [IP, IPv6])
@pytest.mark.parametrize("payload_len", [1, 1200, 1201, 12000, 12345])
def test_uso_datagrams_match_scapy(ipcls: type, payload_len: int) -> None:
    ip = ipcls(**(V4 if ipcls is IP else V6))
    pkt = Ether(**MAC) / ip / UDP(sport=4000, dport=53) / payload_bytes(payload_len)
    frame = guest_form(pkt, GSO_UDP_L4, 1200, UDP)
    datagrams = adapt(frame, Offload.TSO4 | Offload.TSO6 | Offload.UFO)
    header_len = len(frame.data) - payload_len
    got = b""
    for i, dg in enumerate(datagrams):
        data = bytes(dg.data)
        assert dg.offload == PLAIN and len(data) <= header_len + 1200
        q = Ether(data)
        assert q[UDP].len == len(bytes(q[UDP]))
        assert l4_checksum_ok(data, UDP)
        if ipcls is IP:
            assert q[IP].id == (ip.id + i) % 65536 and ip_checksum_ok(data)
        got += bytes(q[UDP].payload)
    assert got == payload_bytes(payload_len)
    assert len(datagrams) == -(-payload_len // 1200)


def test_uso_partial_for_csum_capable_port() -> None:
    pkt = Ether(**MAC) / IPv6(**V6) / UDP(sport=4000, dport=53) / payload_bytes(5000)
    frame = guest_form(pkt, GSO_UDP_L4, 1200, UDP)
    datagrams = adapt(frame, Offload.CSUM)
    assert [len(Ether(bytes(d.data))[UDP].payload) for d in datagrams] == [1200] * 4 + [200]
    assert b"".join(bytes(Ether(bytes(d.data))[UDP].payload) for d in datagrams) \
        == payload_bytes(5000)
    assert all(d.offload[0] == HDR_F_NEEDS_CSUM and d.offload[1] == GSO_NONE for d in datagrams)
    assert all(l4_checksum_ok(bytes(complete_checksum(d).data), UDP) for d in datagrams)


def test_uso_refuses_more_than_linux_segment_limit() -> None:
    pkt = Ether(**MAC) / IP(**V4) / UDP(sport=1, dport=2) / payload_bytes(UDP_MAX_SEGMENTS + 1)
    with pytest.raises(OffloadError) as err:
        segment(guest_form(pkt, GSO_UDP_L4, 1, UDP))
    assert err.value.reason == "too_many_segments"


def reassemble_v4(fragments: list[Frame]) -> tuple[bytes, list[Packet]]:
    pkts = [Ether(f.data) for f in fragments]
    data = b""
    for p in pkts:
        assert p[IP].frag * 8 == len(data)
        data += bytes(p[IP].payload)
    return data, pkts


@pytest.mark.parametrize("gso_size", [1480, 1000, 1203])
def test_ufo_ipv4_fragments_reassemble_to_a_valid_datagram(gso_size: int) -> None:
    pkt = Ether(**MAC) / IP(**V4, id=4242, flags="DF") / UDP(sport=9, dport=9) / payload_bytes(8000)
    frame = guest_form(pkt, GSO_UDP, gso_size, UDP)
    fragments = adapt(frame, Offload.CSUM | Offload.TSO4)
    datagram, pkts = reassemble_v4(fragments)
    assert [int(p[IP].flags) for p in pkts] == [1] * (len(pkts) - 1) + [0]  # MF, DF cleared
    assert {p[IP].id for p in pkts} == {4242}
    assert all(ip_checksum_ok(bytes(f.data)) and f.offload == PLAIN for f in fragments)
    assert all(len(bytes(p[IP].payload)) <= gso_size for p in pkts)
    whole = Ether(**MAC) / IP(**V4, id=4242) / UDP(datagram)
    assert bytes(whole[UDP].payload) == payload_bytes(8000)
    assert l4_checksum_ok(bytes(whole), UDP)


def test_ufo_ipv6_fragments_carry_a_fragment_header() -> None:
    pkt = Ether(**MAC) / IPv6(**V6) / UDP(sport=9, dport=9) / payload_bytes(5000)
    frame = guest_form(pkt, GSO_UDP, 1448, UDP)
    fragments = segment(frame)
    pkts = [Ether(f.data) for f in fragments]
    assert len({p[IPv6ExtHdrFragment].id for p in pkts}) == 1
    assert [p[IPv6ExtHdrFragment].m for p in pkts] == [1] * (len(pkts) - 1) + [0]
    data = b""
    for p in pkts:
        assert p[IPv6ExtHdrFragment].offset * 8 == len(data)
        assert p[IPv6].plen == len(bytes(p[IPv6].payload))
        data += bytes(p[IPv6ExtHdrFragment].payload)
    whole = Ether(**MAC) / IPv6(**V6) / UDP(data)
    assert bytes(whole[UDP].payload) == payload_bytes(5000)
    assert l4_checksum_ok(bytes(whole), UDP)


def test_ufo_that_fits_is_one_unfragmented_datagram() -> None:
    pkt = Ether(**MAC) / IP(**V4, flags="DF") / UDP(sport=9, dport=9) / payload_bytes(500)
    (out,) = segment(guest_form(pkt, GSO_UDP, 1480, UDP))
    assert bytes(out.data) == bytes(pkt)


# --- refusals


def tcp4_bytes(n: int = 3000) -> bytearray:
    return bytearray(guest_form(tcp4(n), GSO_TCPV4, 1448).data)


def with_bytes(offset: int, value: bytes, n: int = 3000) -> bytes:
    data = tcp4_bytes(n)
    data[offset:offset + len(value)] = value
    return bytes(data)


TSO4 = (HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, 1448, 34, 16)
REFUSALS = [
    ("truncated", b"\x02" * 10, TSO4),
    ("truncated", with_bytes(16, b"\x00\x1a")[:40], TSO4),
    ("not_ip", with_bytes(12, b"\x08\x06"), TSO4),
    ("ip_version", with_bytes(14, b"\x65"), TSO4),
    ("ip_header", with_bytes(14, b"\x43"), TSO4),
    ("truncated", with_bytes(14, b"\x4f", 0)[:60], TSO4),
    ("ip_length", with_bytes(16, b"\x00\x30"), TSO4),
    ("ip_fragment", with_bytes(20, b"\x20\x00"), TSO4),
    ("not_tcp", with_bytes(23, b"\x11"), TSO4),
    ("tcp_header", with_bytes(46, b"\x40"), TSO4),
    ("gso_size", bytes(tcp4_bytes()), (HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 34, 16)),
    ("gso_mismatch", bytes(tcp4_bytes()), (HDR_F_NEEDS_CSUM, GSO_TCPV6, 0, 1448, 34, 16)),
    ("gso_type", bytes(tcp4_bytes()), (HDR_F_NEEDS_CSUM, 2, 0, 1448, 34, 16)),
    ("gso_type", bytes(tcp4_bytes()), (HDR_F_NEEDS_CSUM, GSO_UDP_L4 | GSO_ECN, 0, 1448, 34, 6)),
    ("not_udp", bytes(tcp4_bytes()), (HDR_F_NEEDS_CSUM, GSO_UDP_L4, 0, 1448, 34, 6)),
    ("csum_start", bytes(tcp4_bytes()), (HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, 1448, 30, 16)),
    ("csum_offset", bytes(tcp4_bytes()), (HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, 1448, 34, 6)),
    ("csum_start", b"\0" * 60, (HDR_F_NEEDS_CSUM, 0, 0, 0, 60, 0)),
    ("csum_offset", b"\0" * 60, (HDR_F_NEEDS_CSUM, 0, 0, 0, 50, 9)),
    ("too_many_segments", bytes(tcp4_bytes(3000)), (HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, 1, 34, 16)),
    ("vlan", bytes(Ether(**MAC) / Dot1Q() / Dot1Q() / Dot1Q() / IP() / TCP()), TSO4),
    ("ipv6_ext", bytes(Ether(**MAC) / IPv6(**V6) / IPv6ExtHdrRouting() / TCP()),
     (0, GSO_TCPV6, 0, 1000, 0, 0)),
    ("ipv6_ext", bytes(Ether(**MAC) / IPv6(**V6) / IPv6ExtHdrFragment() / UDP()),
     (0, GSO_UDP_L4, 0, 1000, 0, 0)),
    ("ipv6_ext",
     bytes(Ether(**MAC) / IPv6(**V6) / IPv6ExtHdrDestOpt() / UDP() / payload_bytes(3000)),
     (0, GSO_UDP, 0, 1000, 0, 0)),
    ("udp_length", bytes(Ether(**MAC) / IP() / UDP(len=9) / payload_bytes(3000)),
     (0, GSO_UDP_L4, 0, 1000, 0, 0)),
    ("gso_size", bytes(Ether(**MAC) / IP() / UDP() / payload_bytes(3000)),
     (0, GSO_UDP, 0, 7, 0, 0)),
]


@pytest.mark.parametrize(("reason", "data", "offload"), REFUSALS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSALS)])
def test_malformed_frames_are_refused_with_a_reason(reason: str, data: bytes,
                                                    offload: tuple) -> None:
    with pytest.raises(OffloadError) as err:
        adapt(Frame(data, offload), Offload.NONE)
    assert err.value.reason == reason
    assert reason in REASONS
    assert str(err.value).startswith(reason + ": ")


def test_complete_checksum_refuses_gso_frames() -> None:
    with pytest.raises(OffloadError) as err:
        complete_checksum(guest_form(tcp4(3000), GSO_TCPV4, 1448))
    assert err.value.reason == "needs_segmentation"


def test_unknown_gso_type_is_refused_even_by_a_port_accepting_everything() -> None:
    with pytest.raises(OffloadError) as err:
        adapt(Frame(bytes(tcp4_bytes()), (0, 9, 0, 1448, 0, 0)), ALL_OFFLOADS)
    assert err.value.reason == "gso_type"


# --- hostile input: only OffloadError, and every output well formed and bounded


BUILDERS = {  # name: (builder, the GSO types that fit it, L4 offset, checksum offset)
    "tcp4": (lambda n: tcp4(n), [GSO_TCPV4, GSO_TCPV4 | GSO_ECN], 34, 16),
    "tcp6": (lambda n: tcp6(n), [GSO_TCPV6, GSO_TCPV6 | GSO_ECN], 54, 16),
    "udp4": (lambda n: Ether(**MAC) / IP(**V4) / UDP(sport=1, dport=2) / payload_bytes(n),
             [GSO_UDP, GSO_UDP_L4, GSO_NONE], 34, 6),
    "udp6": (lambda n: Ether(**MAC) / IPv6(**V6) / UDP(sport=1, dport=2) / payload_bytes(n),
             [GSO_UDP, GSO_UDP_L4, GSO_NONE], 54, 6),
    "vlan": (lambda n: Ether(**MAC) / Dot1Q(vlan=3) / tcp4(n)[IP], [GSO_TCPV4, GSO_NONE], 38, 16),
}
GSO_CHOICES = [GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, GSO_UDP_L4, GSO_TCPV4 | GSO_ECN,
               GSO_UDP | GSO_ECN, 2, 0x7F, 0xFF]


@st.composite
def hostile_frames(draw: st.DrawFn) -> Frame:
    """Mostly well-formed super-packets with a few bytes or metadata fields gone wrong."""
    build, gso_types, l4, csum_offset = BUILDERS[draw(st.sampled_from(sorted(BUILDERS)))]
    data = bytearray(bytes(build(draw(st.integers(0, 4000)))))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2]))):
        where = draw(st.integers(0, min(len(data) - 1, 80)))
        data[where:where + 2] = draw(st.binary(min_size=1, max_size=2))
    if draw(st.integers(0, 5)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    anything = st.integers(0, 0xFFFF)

    def mostly(value: int) -> st.SearchStrategy[int]:
        return st.one_of(st.just(value), st.just(value), st.just(value), anything)

    offload = (draw(st.sampled_from([HDR_F_NEEDS_CSUM, HDR_F_NEEDS_CSUM, 0, 2, 3])),
               draw(st.one_of(*[st.sampled_from(gso_types)] * 3, st.sampled_from(GSO_CHOICES))),
               draw(anything),
               draw(st.integers(1, 3000) | anything),
               draw(mostly(l4)),
               draw(mostly(csum_offset)))
    return Frame(bytes(data), offload)


def assert_well_formed(frame: Frame, outputs: list[Frame]) -> None:
    assert 1 <= len(outputs) <= MAX_GSO_SEGMENTS
    if outputs[0] is frame:
        return
    gso_type = frame.offload[1]
    for out in outputs:
        data = bytes(out.data)
        assert len(data) <= len(frame.data) + 8
        if gso_type and len(outputs) > 1:
            assert len(data) <= len(frame.data) - (len(outputs) - 1) + 8
        if out.offload != PLAIN:
            assert out.offload[0] == HDR_F_NEEDS_CSUM and out.offload[1] == GSO_NONE
            out = complete_checksum(out)
            data = bytes(out.data)
        pkt = Ether(data)
        if IPv6ExtHdrFragment in pkt:
            continue
        if IP in pkt and not pkt[IP].flags.MF and pkt[IP].frag == 0 and pkt[IP].ihl >= 5:
            if gso_type:
                assert ip_checksum_ok(data)
            for l4cls in (TCP, UDP):
                if l4cls in pkt and gso_type:
                    assert l4_sum_ok(data, l4cls)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=hostile_frames(),
       accepts=st.sampled_from([0, int(Offload.CSUM)]) | st.integers(0, int(ALL_OFFLOADS)))
def test_hostile_frames_give_only_offload_errors_or_valid_frames(frame: Frame,
                                                                  accepts: int) -> None:
    try:
        outputs = adapt(frame, Offload(accepts))
    except OffloadError as err:
        assert err.reason in REASONS
        return
    assert_well_formed(frame, outputs)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200),
       offload=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF),
                         st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                         st.integers(0, 0xFFFF)))
def test_random_bytes_give_only_offload_errors(data: bytes, offload: tuple) -> None:
    try:
        outputs = adapt(Frame(data, offload), Offload.NONE)
    except OffloadError as err:
        assert err.reason in REASONS
        return
    assert all(isinstance(out, Frame) for out in outputs)


CSUM, TSO4 = Offload.CSUM, Offload.TSO4
# What a receiver must accept to take a frame as it is, written out from virtio 1.x 5.1.3.1
# (every GSO offload needs checksum offload) and Linux's NETIF_F_TSO_ECN: the oracle for
# netstack.frame.needed_offloads, the one GSO -> offload mapping the switch, offload.adapt
# and virtio/net.py use.
NEEDS = [
    (GSO_NONE, 0, Offload.NONE),
    (GSO_NONE, HDR_F_NEEDS_CSUM, CSUM),
    (GSO_TCPV4, 0, TSO4 | CSUM),
    (GSO_TCPV4, HDR_F_NEEDS_CSUM, TSO4 | CSUM),
    (GSO_TCPV4 | GSO_ECN, 0, TSO4 | CSUM | Offload.ECN),
    (GSO_TCPV4 | GSO_ECN, HDR_F_NEEDS_CSUM, TSO4 | CSUM | Offload.ECN),
    (GSO_TCPV6, HDR_F_NEEDS_CSUM, Offload.TSO6 | CSUM),
    (GSO_UDP, HDR_F_NEEDS_CSUM, Offload.UFO | CSUM),
    (GSO_UDP_L4, HDR_F_NEEDS_CSUM, Offload.USO | CSUM),
]


@pytest.mark.parametrize(("gso_type", "flags", "need"), NEEDS)
def test_needed_offloads_is_what_virtio_says_a_receiver_must_accept(
        gso_type: int, flags: int, need: Offload) -> None:
    assert needed_offloads(flags, gso_type) == need


@pytest.mark.parametrize("gso_type", [2, 6, 0x42, 2 | GSO_ECN])
def test_needed_offloads_of_an_unknown_gso_type_is_none(gso_type: int) -> None:
    assert needed_offloads(HDR_F_NEEDS_CSUM, gso_type) is None


@pytest.mark.parametrize(("gso_type", "flags", "need"), NEEDS[:6])
def test_a_frame_passes_through_exactly_when_the_port_accepts_what_it_needs(
        gso_type: int, flags: int, need: Offload) -> None:
    frame = guest_form(tcp4(3000), gso_type, 1448 if gso_type else 0, flags=flags)
    for accepts in range(int(ALL_OFFLOADS) + 1):
        takes_it = not need & ~Offload(accepts)
        assert (adapt(frame, Offload(accepts))[0] is frame) == takes_it, accepts


# --- check_offload: the metadata a frame may enter the switch with


def test_check_offload_passes_what_linux_guests_and_tap_devices_send() -> None:
    for frame in (guest_form(tcp4(3000), GSO_TCPV4, 1448), guest_form(tcp6(3000), GSO_TCPV6, 1428),
                  guest_form(tcp4(3000), TCP_ECN_GSO, MIN_GSO_SIZE),
                  guest_form(tcp4(100), GSO_NONE, 0),
                  guest_form(Ether(**MAC) / IP(**V4) / UDP() / payload_bytes(900), GSO_UDP_L4,
                             8, UDP)):  # USO: UDP_MAX_SEGMENTS bounds it, not gso_size
        assert check_offload(frame.offload, len(frame.data)) is None
    assert check_offload((HDR_F_DATA_VALID, GSO_NONE, 0, 0, 0, 0), 60) is None
    assert check_offload(PLAIN, 60) is None


@pytest.mark.parametrize(("offload", "reason"), [
    ((0xFF, GSO_TCPV4, 65535, 1448, 34, 16), "flags"),
    ((HDR_F_NEEDS_CSUM | 4, GSO_NONE, 0, 0, 34, 16), "flags"),  # RSC_INFO: receive side only
    ((HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 1000, 6), "csum_start"),
    ((HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 65000), "csum_offset"),
    ((HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 1000 - 34 - 1), "csum_offset"),
    ((HDR_F_NEEDS_CSUM, 0x42, 0, 1448, 34, 16), "gso_type"),
    ((HDR_F_NEEDS_CSUM, GSO_ECN, 0, 1448, 34, 16), "gso_type"),
    ((HDR_F_NEEDS_CSUM, GSO_UDP_L4 | GSO_ECN, 0, 1448, 34, 6), "gso_type"),
    ((HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 34, 16), "gso_size"),
    ((HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, MIN_GSO_SIZE - 1, 34, 16), "gso_size"),
    ((HDR_F_NEEDS_CSUM, GSO_TCPV6, 0, 1, 54, 16), "gso_size"),
    ((0, GSO_UDP, 0, 32, 0, 0), "gso_size"),
    ((HDR_F_NEEDS_CSUM, GSO_UDP_L4, 0, 0, 34, 6), "gso_size"),
])
def test_check_offload_refuses_metadata_no_sender_may_set(offload: tuple, reason: str) -> None:
    assert check_offload(offload, 1000) == reason
    assert reason in REASONS
