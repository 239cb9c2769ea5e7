"""What makes the NAT's TCP fast, and that it stays correct: a guest's TSO frame is one segment
to the core, segments toward a guest leave as TSO frames with the metadata virtio expects (and
the switch cuts them for a port without TSO into segments a guest verifies), in-order data is
acknowledged once per batch while anything out of order is acknowledged at once, and the
window a connection offers shrinks to what its guest may still make the NAT hold."""

import random

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from netstack.frame import (
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    HDR_F_NEEDS_CSUM,
    Frame,
    Offload,
    OffloadInfo,
)
from netstack.nat.limits import FlowKey, FlowLimits
from netstack.nat.packet import Refused, read_guest_packet
from netstack.nat.tcp import (
    ACK_STRETCH,
    RCV_BUFFER,
    TSO_MAX_PAYLOAD,
    Connected,
    Received,
    Send,
    TcpConnection,
    ToGuest,
    Written,
)
from netstack.nat.tcp_flows import HostCall, TcpTable
from netstack.offload import adapt
from netstack.port import Port
from netstack.switch import Switch
from netstack.wire import IPPROTO_TCP
from netstack.wire.tcp import Tcp
from tests.support.nat import (
    GUEST4,
    GUEST6,
    GUEST_MAC,
    GW_MAC,
    REMOTE4,
    REMOTE6,
    guest_frame,
    mac,
    nat_config,
    packed,
)

KEY = FlowKey(IPPROTO_TCP, packed(GUEST4), 40000, packed(REMOTE4), 80)


def frames_of(out):
    return [item for item in out if not isinstance(item, HostCall)]


def calls(out):
    return [item.action for item in out if isinstance(item, HostCall)]


def segment(t: TcpTable, flags="A", seq=1001, ack=0, payload=b"", sport=40000, now=1.0,
            offload=None, defer_ack=False, src=GUEST4, dst=REMOTE4):
    ip = IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)
    options = [("MSS", 1460 if ":" not in src else 1440)] if flags == "S" else []
    frame = guest_frame(ip / TCP(sport=sport, dport=80, flags=flags, seq=seq, ack=ack,
                                 window=65535, options=options) / payload, offload=offload)
    return t.guest_segment(read_guest_packet(frame, mac(GW_MAC)), frame.offload[0], now,
                           defer_ack=defer_ack)


def established(t: TcpTable, sport=40000, src=GUEST4, dst=REMOTE4) -> int:
    """Handshake flow `sport`; the ISS+1 the guest acknowledges."""
    segment(t, flags="S", seq=1000, sport=sport, src=src, dst=dst)
    key = FlowKey(IPPROTO_TCP, packed(src), sport, packed(dst), 80)
    [synack] = [Ether(bytes(f.data))[TCP] for f in frames_of(t.on_host(key, Connected(), 1.0))]
    segment(t, seq=1001, ack=synack.seq + 1, sport=sport, src=src, dst=dst)
    return synack.seq + 1


# -- guest TSO in --------------------------------------------------------------------------

@pytest.mark.parametrize(("src", "dst", "gso", "l4"), [(GUEST4, REMOTE4, GSO_TCPV4, 34),
                                                      (GUEST6, REMOTE6, GSO_TCPV6, 54)])
def test_a_guest_tso_frame_with_a_partial_checksum_is_one_64_kib_segment_to_the_core(
        src, dst, gso, l4):
    t = TcpTable(nat_config(), FlowLimits())
    ours = established(t, src=src, dst=dst)
    payload = random.Random(1).randbytes(65000 if gso == GSO_TCPV4 else 65400)
    # The checksum field holds the pseudo-header sum only, as a guest's TSO leaves it.
    offload = OffloadInfo(HDR_F_NEEDS_CSUM, gso, l4 + 20, 1448, l4, 16)
    out = segment(t, flags="PA", seq=1001, ack=ours, payload=payload, offload=offload,
                  src=src, dst=dst)
    assert calls(out) == [Send(payload)]
    [ack] = [Ether(bytes(f.data))[TCP] for f in frames_of(out)]
    assert ack.ack == 1001 + len(payload)


def test_udp_gso_and_a_gso_type_of_the_other_ip_version_are_refused():
    t = TcpTable(nat_config(), FlowLimits())
    udp = guest_frame(IP(src=GUEST4, dst=REMOTE4) / UDP(sport=5, dport=53) / (b"x" * 3000),
                      offload=OffloadInfo(HDR_F_NEEDS_CSUM, GSO_UDP_L4, 42, 1000, 34, 6))
    with pytest.raises(Refused) as refused:
        read_guest_packet(udp, mac(GW_MAC))
    assert refused.value.reason == "gso"
    v6_on_v4 = guest_frame(IP(src=GUEST4, dst=REMOTE4) / TCP() / (b"x" * 3000),
                           offload=OffloadInfo(HDR_F_NEEDS_CSUM, GSO_TCPV6, 54, 1448, 34, 16))
    with pytest.raises(Refused) as refused:
        read_guest_packet(v6_on_v4, mac(GW_MAC))
    assert refused.value.reason == "gso"
    assert not t.flows


# -- TSO toward the guest ------------------------------------------------------------------

class Recorder(Port):
    def __init__(self, name: str, accepts: Offload = Offload.NONE) -> None:
        super().__init__(name, accepts)
        self.got: list[Frame] = []

    def deliver(self, frames: list[Frame]) -> None:
        self.got.extend(frames)


def test_host_bytes_leave_as_tso_frames_the_switch_cuts_into_checksummed_segments_for_a_port_without_tso():  # noqa: E501
    t = TcpTable(nat_config(), FlowLimits())
    ours = established(t)
    data = random.Random(2).randbytes(200_000)
    out = t.on_host(KEY, Received(data), 1.1)
    frames = frames_of(out)
    # The guest's window (65535, unscaled) allows 65535 bytes: one TSO frame of 44 MSS-sized
    # pieces and the rest of the window in a second one.
    assert [len(Ether(bytes(f.data))[TCP].payload) for f in frames] == [64240, 1295]
    tso = frames[0]
    assert tso.offload == (HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1460, 34, 16)
    assert len(tso.data) - 54 <= TSO_MAX_PAYLOAD
    assert frames[1].offload[1] == 0  # one MSS or less: a plain segment
    # Through a switch, from a port like the gateway to a guest port without TSO.
    switch = Switch()
    gateway, plain, taker = Recorder("gw"), Recorder("guest"), \
        Recorder("tso", Offload.CSUM | Offload.TSO4 | Offload.TSO6)
    for port in (gateway, plain, taker):
        switch.attach(port)
    switch.forward(plain, [Frame(bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")))])
    switch.forward(taker, [Frame(bytes(Ether(src="52:54:00:00:00:99",
                                             dst="ff:ff:ff:ff:ff:ff")))])
    plain.got.clear()  # the other port's broadcast
    switch.forward(gateway, frames)
    assert len(plain.got) == 44 + 1
    got = b""
    seq = ours
    for frame in plain.got:
        assert frame.offload[1] == 0 and len(frame.data) <= 14 + 1500
        packet = Ether(bytes(frame.data))
        rebuilt = packet.copy()
        del rebuilt[IP].chksum, rebuilt[TCP].chksum
        assert bytes(Ether(bytes(rebuilt))) == bytes(packet)  # checksums complete and right
        assert packet[TCP].seq == seq
        seq += len(packet[TCP].payload)
        got += bytes(packet[TCP].payload)
    assert got == data[:65535]
    # A port that takes TSO gets the frame whole (the same frame, not cut).
    switch.forward(gateway, [Frame(bytes(Ether(dst="52:54:00:00:00:99", src=GW_MAC))
                                   + bytes(tso.data)[14:], tso.offload)])
    assert taker.got[-1].offload[1] == GSO_TCPV4


def test_a_tso_frame_to_an_ipv6_guest_has_tcpv6_metadata_and_segments_verify():
    t = TcpTable(nat_config(), FlowLimits())
    established(t, src=GUEST6, dst=REMOTE6)
    key6 = FlowKey(IPPROTO_TCP, packed(GUEST6), 40000, packed(REMOTE6), 80)
    frames = frames_of(t.on_host(key6, Received(bytes(30_000)), 1.1))
    [tso] = frames
    assert tso.offload == (HDR_F_NEEDS_CSUM, GSO_TCPV6, 74, 1440, 54, 16)
    pieces = adapt(tso, Offload.NONE)
    assert len(pieces) == -(-30_000 // 1440)
    for piece in pieces:
        packet = Ether(bytes(piece.data))
        rebuilt = packet.copy()
        del rebuilt[TCP].chksum
        assert bytes(Ether(bytes(rebuilt))) == bytes(packet)


def test_without_tso_segments_toward_the_guest_are_cut_at_its_mss():
    t = TcpTable(nat_config(tso=False), FlowLimits())
    established(t)
    frames = frames_of(t.on_host(KEY, Received(bytes(10_000)), 1.1))
    assert all(f.offload[1] == 0 and len(f.data) <= 1514 for f in frames)
    assert len(frames) == -(-10_000 // 1460)


# -- ACKs per batch -------------------------------------------------------------------------

def connection() -> TcpConnection:
    conn = TcpConnection(packed(GUEST4), 40000, packed(REMOTE4), 80, 0.0, iss=5000)
    syn = Tcp(bytes(TCP(sport=40000, dport=80, flags="S", seq=1000, window=65535)))
    conn.from_guest(syn, 0.0)
    conn.on_host(Connected(), 0.0)
    conn.from_guest(Tcp(bytes(TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001,
                                  window=65535))), 0.0)
    return conn


def data(seq: int, n: int = 1000, flags: str = "A") -> Tcp:
    return Tcp(bytes(TCP(sport=40000, dport=80, flags=flags, seq=seq, ack=5001,
                         window=65535) / bytes(n)))


def acks(out):
    return [o for o in out if isinstance(o, ToGuest)]


def test_in_order_data_of_a_batch_is_acknowledged_once_at_its_end():
    conn = connection()
    out = []
    for i in range(10):
        out += conn.from_guest(data(1001 + i * 1000), 0.1, defer_ack=True)
    assert not acks(out) and conn.ack_owed
    assert [o.data for o in out if isinstance(o, Send)] == [bytes(1000)] * 10
    [ack] = conn.flush_ack()
    assert ack.ack == 11001 and not conn.ack_owed
    assert conn.flush_ack() == []


def test_out_of_order_data_a_filled_hole_and_a_fin_are_acknowledged_at_once_in_a_batch():
    conn = connection()
    conn.from_guest(data(1001), 0.1, defer_ack=True)
    # A hole: 2001..3000 is lost; the next segments draw immediate duplicate ACKs (the
    # guest's fast retransmit counts them), the first also carrying the owed ACK.
    dups = [acks(conn.from_guest(data(3001 + i * 1000), 0.1, defer_ack=True))
            for i in range(3)]
    assert [[a.ack for a in d] for d in dups] == [[2001], [2001], [2001]]
    # The retransmission fills the hole: acknowledged at once, everything delivered.
    [filled] = acks(conn.from_guest(data(2001), 0.2, defer_ack=True))
    assert filled.ack == 6001 and not conn.ack_owed
    [fin_ack] = acks(conn.from_guest(data(6001, 10, "FA"), 0.3, defer_ack=True))
    assert fin_ack.ack == 6012


def test_a_batch_longer_than_the_ack_stretch_is_acknowledged_within_it():
    conn = connection()
    out = []
    seq = 1001
    while seq - 1001 < 2 * ACK_STRETCH:
        out += conn.from_guest(data(seq, 1448), 0.1, defer_ack=True)
        seq += 1448
    assert 1 <= len(acks(out)) <= 2 * ACK_STRETCH // 1448
    sent = [a.ack for a in acks(out)]
    assert all(b - a <= ACK_STRETCH + 1448 for a, b in zip([1001, *sent], sent, strict=False))


# -- the window within the guest's cap -----------------------------------------------------

def window_of(frame) -> int:
    return Ether(bytes(frame.data))[TCP].window


def test_the_window_offered_shrinks_to_the_guests_room_and_reopens_when_it_is_given_back():
    cap = 100_000
    t = TcpTable(nat_config(), FlowLimits(buffered_per_guest=cap))
    ours = established(t)  # no window scaling offered: windows are bytes
    # Flow 1's host socket takes nothing yet: 60 000 bytes held for it.
    out = segment(t, flags="PA", seq=1001, ack=ours, payload=bytes(60_000))
    assert calls(out) == [Send(bytes(60_000))]
    assert t.limits.held(mac(GUEST_MAC))["buffered"] == 60_000
    [ack] = frames_of(out)
    assert window_of(ack) <= cap - 60_000
    # A second flow of the same guest is offered no more than the guest's room.
    other = established(t, sport=40001)
    out = segment(t, flags="PA", seq=1001, ack=other, payload=bytes(30_000), sport=40001)
    [ack2] = frames_of(out)
    assert window_of(ack2) <= cap - 90_000 < RCV_BUFFER
    # Flow 1's socket takes its bytes: the guest's room grows, flow 2 hears of it.
    t.on_host(KEY, Written(60_000), 1.2)
    assert t.credited == {mac(GUEST_MAC)}
    [update] = [f for f in frames_of(t.reopen(mac(GUEST_MAC)))
                if Ether(bytes(f.data))[TCP].dport == 40001]
    assert window_of(update) > window_of(ack2)


# -- SACK blocks (receiver side) -----------------------------------------------------------

def sack_connection() -> TcpConnection:
    conn = TcpConnection(packed(GUEST4), 40000, packed(REMOTE4), 80, 0.0, iss=5000)
    syn = TCP(sport=40000, dport=80, flags="S", seq=1000, window=65535,
              options=[("MSS", 1460), ("SAckOK", b"")])
    conn.from_guest(Tcp(bytes(syn)), 0.0)
    [synack] = acks(conn.on_host(Connected(), 0.0))
    assert ("SAckOK", b"") in TCP(conn.encode(synack)).options
    conn.from_guest(Tcp(bytes(TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001,
                                  window=65535))), 0.0)
    return conn


def sack_of(conn: TcpConnection, seg: ToGuest):
    return dict(TCP(conn.encode(seg)).options).get("SAck")


def test_dup_acks_carry_sack_blocks_latest_run_first_when_the_guest_offered_sack():
    conn = sack_connection()
    conn.from_guest(data(1001), 0.1)
    [first] = acks(conn.from_guest(data(3001), 0.1))  # 2001..3000 lost
    assert first.ack == 2001 and sack_of(conn, first) == (3001, 4001)
    [second] = acks(conn.from_guest(data(6001), 0.1))  # and 4001..6000
    assert sack_of(conn, second) == (6001, 7001, 3001, 4001)
    [joined] = acks(conn.from_guest(data(4001), 0.1))  # one run 3001..5000 now
    assert sack_of(conn, joined) == (3001, 5001, 6001, 7001)
    [filled] = acks(conn.from_guest(data(2001), 0.2))
    assert filled.ack == 5001 and sack_of(conn, filled) == (6001, 7001)
    [done] = acks(conn.from_guest(data(5001), 0.2))
    assert done.ack == 7001 and sack_of(conn, done) is None


def test_without_sack_permitted_no_ack_carries_sack_blocks():
    conn = connection()
    conn.from_guest(data(1001), 0.1)
    [dup] = acks(conn.from_guest(data(3001), 0.1))
    assert dup.options == b"" and not conn.sack_ok


def test_reads_from_the_host_come_in_whole_tso_segments_so_each_makes_one_frame():
    t = TcpTable(nat_config(), FlowLimits())
    established(t)
    assert t.read_size(KEY, 65536) == 44 * 1460  # not 64240 + a 1296-byte tail frame
    assert t.read_size(KEY, 3 * 64240 + 5) == 3 * 64240
    assert t.read_size(KEY, 1000) == 1000
    [frame] = frames_of(t.on_host(KEY, Received(bytes(t.read_size(KEY, 65536))), 1.1))
    assert frame.offload[1] == GSO_TCPV4
