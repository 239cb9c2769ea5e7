"""The NAT's guest-facing TCP endpoint (netstack/nat/tcp.py), sans-I/O: scapy-built guest
segments through each state transition, the hostile cases (RFC 5961 resets, bogus options,
zero windows), and a hypothesis segment soup checking the invariants."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack.nat import tcp as nat
from netstack.nat.tcp import (
    Abort,
    Close,
    Connect,
    Connected,
    Eof,
    HostError,
    Received,
    Refused,
    Send,
    ShutdownWrite,
    TcpConnection,
    ToGuest,
    Written,
)
from netstack.wire import Malformed
from netstack.wire.tcp import ACK, FIN, OPTION_REASONS, PSH, RST, SYN, Tcp, parse_options
from tests.support.deadline import deadline

GUEST_IP = bytes([10, 77, 0, 10])
REMOTE_IP = bytes([192, 0, 2, 80])
GPORT, RPORT = 40000, 80
ISS = 1_000_000
GISN = 0xFFFFFF00  # the guest's ISN wraps within the first kilobyte: sequence math is modular
T0 = 100.0
M = 0xFFFFFFFF


def seg(seq: int, ack: int = 0, flags: str = "A", window: int = 65535,
        payload: bytes = b"", options: list | None = None) -> Tcp:
    """A guest segment built by scapy, as the NAT hands it over: a checked wire view."""
    pkt = TCP(sport=GPORT, dport=RPORT, seq=seq & M, ack=ack & M, flags=flags, window=window,
              options=options or [])
    return Tcp(bytes(pkt / payload) if payload else bytes(pkt))


def to_guest(out: list) -> list[ToGuest]:
    return [o for o in out if isinstance(o, ToGuest)]


def host(out: list) -> list:
    return [o for o in out if not isinstance(o, ToGuest)]


class Guest:
    """The guest's side of one connection, scripted: it keeps its own SND.NXT and acks."""

    def __init__(self, mss: int = 1460, wscale: int | None = 7, window: int = 65535) -> None:
        self.conn = TcpConnection(GUEST_IP, GPORT, REMOTE_IP, RPORT, T0, iss=ISS)
        self.nxt = GISN
        self.mss = mss
        self.wscale = wscale
        self.window = window
        self.rcv = 0

    def handshake(self) -> list:
        opts = [("MSS", self.mss)] + ([("WScale", self.wscale)] if self.wscale is not None
                                      else [])
        out = self.conn.from_guest(seg(self.nxt, flags="S", options=opts), T0)
        assert out == [Connect()]
        self.nxt = (self.nxt + 1) & M
        synack = self.conn.on_host(Connected(), T0)
        [sa] = synack
        self.rcv = (sa.seq + 1) & M
        out = self.conn.from_guest(seg(self.nxt, self.rcv, "A", self.window), T0 + 0.01)
        assert out == []
        assert self.conn.state == nat.ESTABLISHED
        return synack

    def send(self, data: bytes, now: float = T0 + 1, flags: str = "PA") -> list:
        out = self.conn.from_guest(seg(self.nxt, self.rcv, flags, self.window, data), now)
        self.nxt = (self.nxt + len(data) + ("F" in flags)) & M
        return out

    def ack(self, ack: int, now: float, window: int | None = None) -> list:
        return self.conn.from_guest(
            seg(self.nxt, ack, "A", self.window if window is None else window), now)


def sent_bytes(out: list) -> bytes:
    return b"".join(o.data for o in out if isinstance(o, Send))


# --- handshake --------------------------------------------------------------------------
def test_synack_waits_for_the_host_connect_and_negotiates_mss_and_window_scale():
    g = Guest(mss=1400, wscale=7)
    conn = g.conn
    out = conn.from_guest(seg(GISN, flags="S", options=[("MSS", 1400), ("WScale", 7)]), T0)
    assert out == [Connect()] and conn.state == nat.CONNECTING
    assert conn.from_guest(seg(GISN, flags="S"), T0 + 0.5) == []  # retransmitted SYN: wait
    [sa] = conn.on_host(Connected(), T0 + 1)
    assert sa.flags == SYN | ACK and sa.seq == ISS and sa.ack == (GISN + 1) & M
    opts = parse_options(sa.options)
    assert opts.mss == 1460 and opts.wscale == nat.RCV_WSCALE
    # The bytes are a valid TCP segment from the remote to the guest (scapy recomputes).
    wire = conn.encode(sa)
    pkt = IP(src="192.0.2.80", dst="10.77.0.10", proto=6) / TCP(wire)
    again = IP(bytes(pkt))
    del again[TCP].chksum
    assert IP(bytes(again))[TCP].chksum == TCP(wire).chksum
    assert conn.snd_mss == 1400 and conn.snd_wscale == 7
    assert conn.from_guest(seg(GISN + 1, ISS + 1, "A", 100), T0 + 1.1) == []
    assert conn.state == nat.ESTABLISHED and conn.snd_wnd == 100 << 7


def test_an_unanswered_synack_is_retransmitted_then_the_connection_aborted():
    conn = TcpConnection(GUEST_IP, GPORT, REMOTE_IP, RPORT, T0, iss=ISS)
    conn.from_guest(seg(GISN, flags="S"), T0)
    conn.on_host(Connected(), T0)
    for _ in range(nat.SYNACK_RETRIES):
        [again] = conn.tick(conn.next_deadline())
        assert again.flags == SYN | ACK and again.seq == ISS
    out = conn.tick(conn.next_deadline())
    assert out[0].flags & RST and isinstance(out[1], Abort) and conn.closed


def test_ipv6_segments_carry_a_valid_checksum_and_the_v6_default_mss():
    g6, r6 = bytes.fromhex("fd77" + "00" * 13 + "0a"), bytes.fromhex("20010db8" + "00" * 11 + "50")
    conn = TcpConnection(g6, GPORT, r6, RPORT, T0, iss=ISS)
    conn.from_guest(seg(GISN, flags="S"), T0)
    assert conn.snd_mss == nat.DEFAULT_MSS_V6 and conn.our_mss == 1440
    [sa] = conn.on_host(Connected(), T0)
    wire = conn.encode(sa)
    pkt = IPv6(src="2001:db8::50", dst="fd77::a", nh=6) / TCP(wire)
    rebuilt = IPv6(bytes(pkt))
    del rebuilt[TCP].chksum
    assert IPv6(bytes(rebuilt))[TCP].chksum == TCP(wire).chksum
    assert "[2001:db8::50]:80" in conn.name


def test_a_refused_connect_is_a_reset_to_the_guest():
    conn = TcpConnection(GUEST_IP, GPORT, REMOTE_IP, RPORT, T0, iss=ISS)
    conn.from_guest(seg(GISN, flags="S"), T0)
    out = conn.on_host(Refused("ECONNREFUSED"), T0 + 0.01)
    assert out == [ToGuest(0, (GISN + 1) & M, RST | ACK, 0), Close()]
    assert conn.closed and conn.next_deadline() is None


def test_a_connect_that_never_answers_times_out_with_a_reset():
    conn = TcpConnection(GUEST_IP, GPORT, REMOTE_IP, RPORT, T0, iss=ISS)
    conn.from_guest(seg(GISN, flags="S"), T0)
    assert conn.next_deadline() == T0 + nat.CONNECT_TIMEOUT
    out = conn.tick(T0 + nat.CONNECT_TIMEOUT)
    assert [type(o) for o in out] == [ToGuest, Abort] and out[0].flags & RST
    assert conn.closed


def test_a_first_segment_that_is_not_a_syn_is_answered_with_a_reset():
    conn = TcpConnection(GUEST_IP, GPORT, REMOTE_IP, RPORT, T0, iss=ISS)
    assert conn.from_guest(seg(5, 777, "A"), T0) == [ToGuest(777, 0, RST, 0)]
    assert conn.closed


def test_without_window_scale_from_the_guest_we_offer_none_and_defaults_apply():
    g = Guest(mss=1460, wscale=None)
    [sa] = g.handshake()
    assert parse_options(sa.options).wscale is None and g.conn.rcv_wscale == 0


def test_bogus_syn_options_are_counted_and_ignored():
    conn = TcpConnection(GUEST_IP, GPORT, REMOTE_IP, RPORT, T0, iss=ISS)
    bad = TCP(sport=GPORT, dport=RPORT, seq=GISN, flags="S", dataofs=6) / b""
    raw = bytearray(bytes(bad))
    raw[20:24] = bytes((2, 9, 5, 0))  # MSS option claiming 9 bytes in a 4-byte area
    assert conn.from_guest(Tcp(bytes(raw)), T0) == [Connect()]
    assert conn.counters.bad_option == 1 and conn.snd_mss == nat.DEFAULT_MSS_V4


def test_absurd_mss_and_window_scale_are_clamped_and_counted():
    conn = TcpConnection(GUEST_IP, GPORT, REMOTE_IP, RPORT, T0, iss=ISS)
    conn.from_guest(seg(GISN, flags="S", options=[("MSS", 1), ("WScale", 30)]), T0)
    assert conn.snd_mss == nat.MIN_MSS and conn.snd_wscale == nat.MAX_WSCALE
    assert conn.counters.bad_option == 2


@pytest.mark.parametrize("tso", [False, True])
def test_a_guest_mss_beyond_the_link_is_clamped_to_ours_and_segments_fit_the_mtu(tso):
    # MSS 65535 on a 1500-byte link: no segment may exceed what the link carries (they were
    # dropped too_big), and with TSO a segment is still at least one MSS (it was 0 bytes:
    # TSO_MAX_PAYLOAD // 65535 * 65535, an endless loop of empty segments).
    g = Guest(mss=65535)
    g.conn.tso = tso
    g.handshake()
    assert g.conn.snd_mss == g.conn.our_mss and g.conn.send_quantum >= g.conn.our_mss
    segs = to_guest(g.conn.on_host(Received(b"d" * 4000), T0 + 1))
    assert sum(len(s.payload) for s in segs) == 4000
    assert all(len(s.payload) <= (nat.TSO_MAX_PAYLOAD if tso else g.conn.our_mss)
               for s in segs)


# --- guest -> host ------------------------------------------------------------------------
def test_guest_data_is_sent_to_the_host_and_acked_with_the_window_left():
    g = Guest()
    g.handshake()
    out = g.send(b"hello")
    assert host(out) == [Send(b"hello")]
    [a] = to_guest(out)
    assert a.ack == (GISN + 6) & M
    assert a.window << nat.RCV_WSCALE == nat.RCV_BUFFER - 5 - (nat.RCV_BUFFER - 5) % 8


def test_a_64k_tso_segment_is_one_segment():
    g = Guest()
    g.handshake()
    data = bytes(range(256)) * 250  # 64000 bytes: a full TSO frame's payload
    out = g.send(data)
    assert sent_bytes(out) == data and len(to_guest(out)) == 1


def test_the_window_closes_while_the_host_socket_holds_bytes_and_reopens_on_written():
    g = Guest()
    g.handshake()
    chunk = b"x" * 65535
    for _ in range(4):
        out = g.send(chunk)
    [a] = to_guest(out)  # 4 bytes left: less than one window-scale unit
    assert a.window == 0 and g.conn.host_unwritten == 4 * 65535
    # Only what the earlier promise still covers (under one scale unit) is taken...
    out = g.send(b"z" * 100)
    taken = len(sent_bytes(out))
    assert taken < 8 and g.conn.host_unwritten == nat.RCV_BUFFER - 1
    g.nxt = (g.nxt - 100 + taken) & M
    # ... and past the edge nothing is: dropped, counted, acked at the edge.
    out = g.send(b"z" * 100)
    assert host(out) == [] and g.conn.counters.out_of_window == 1
    assert to_guest(out)[0].ack == (g.nxt - 100) & M
    g.nxt = (g.nxt - 100) & M
    [update] = g.conn.on_host(Written(8192), T0 + 2)
    assert update.window << nat.RCV_WSCALE == 8192 and update.ack == g.nxt


def test_out_of_order_segments_wait_and_are_delivered_once_the_hole_fills():
    g = Guest()
    g.handshake()
    start = g.nxt
    later = g.conn.from_guest(seg(start + 10, g.rcv, "PA", 65535, b"B" * 10), T0 + 1)
    assert host(later) == [] and to_guest(later)[0].ack == start  # a dup ACK for the guest
    assert g.conn.counters.ooo_queued == 1
    out = g.conn.from_guest(seg(start, g.rcv, "PA", 65535, b"A" * 10), T0 + 1)
    assert sent_bytes(out) == b"A" * 10 + b"B" * 10
    assert to_guest(out)[-1].ack == (start + 20) & M


def test_overlapping_and_duplicate_segments_deliver_each_byte_once():
    g = Guest()
    g.handshake()
    s = g.nxt
    out = []
    out += g.conn.from_guest(seg(s, g.rcv, "PA", 65535, b"abcdef"), T0 + 1)
    out += g.conn.from_guest(seg(s + 3, g.rcv, "PA", 65535, b"defghi"), T0 + 1)
    out += g.conn.from_guest(seg(s, g.rcv, "PA", 65535, b"abcdef"), T0 + 1)
    assert sent_bytes(out) == b"abcdefghi" and g.conn.counters.dup_segments == 1


def test_segments_behind_one_hole_merge_into_one_run_however_many_arrive():
    g = Guest()
    g.handshake()
    s = g.nxt
    pieces = [bytes([65 + i % 26]) * 100 for i in range(100)]
    order = list(range(1, 100))
    order[10:20] = reversed(order[10:20])  # some reordering behind the hole, and overlaps
    for i in order:
        g.conn.from_guest(seg(s + 100 * i, g.rcv, "PA", 65535, pieces[i]), T0 + 1)
        g.conn.from_guest(seg(s + 100 * i - 50, g.rcv, "PA", 65535, pieces[i - 1][50:]
                              + pieces[i][:50]), T0 + 1)
    assert len(g.conn._ooo) == 1 and g.conn.counters.ooo_dropped == 0
    out = g.conn.from_guest(seg(s, g.rcv, "PA", 65535, pieces[0]), T0 + 1)
    assert sent_bytes(out) == b"".join(pieces) and g.conn._ooo == []


def test_the_out_of_order_queue_is_bounded():
    g = Guest()
    g.handshake()
    for i in range(nat.OOO_MAX_RUNS + 5):
        g.conn.from_guest(seg(g.nxt + 10 + 20 * i, g.rcv, "PA", 65535, b"q" * 10), T0 + 1)
    assert len(g.conn._ooo) == nat.OOO_MAX_RUNS and g.conn.counters.ooo_dropped == 5


# --- host -> guest ------------------------------------------------------------------------
def test_host_data_is_cut_at_the_guest_mss_within_its_window():
    g = Guest(mss=1000, wscale=0, window=2500)
    g.handshake()
    out = g.conn.on_host(Received(b"d" * 4000), T0 + 1)
    segs = to_guest(out)
    assert [len(s.payload) for s in segs] == [1000, 1000, 500]
    assert g.conn.host_read_budget() == nat.SND_BUFFER - 4000
    out = g.ack((ISS + 1 + 2500) & M, T0 + 1.1)
    assert [len(s.payload) for s in to_guest(out)] == [1000, 500]
    assert g.conn.host_read_budget() == nat.SND_BUFFER - 1500


def test_lost_data_is_retransmitted_with_exponential_backoff_then_aborted():
    g = Guest()
    g.handshake()
    g.conn.on_host(Received(b"lost"), T0 + 1)
    rto = g.conn.rto
    now = T0 + 1
    for i in range(nat.MAX_RETRIES):
        now = g.conn.next_deadline()
        [r] = g.conn.tick(now)
        assert r.payload == b"lost" and g.conn.rto == min(rto * 2 ** (i + 1), nat.RTO_MAX)
    out = g.conn.tick(g.conn.next_deadline())
    assert [type(o) for o in out] == [ToGuest, Abort] and out[0].flags & RST
    assert g.conn.counters.retransmits == nat.MAX_RETRIES and g.conn.closed


def test_three_duplicate_acks_retransmit_the_first_segment_at_once():
    g = Guest(mss=100)
    g.handshake()
    g.conn.on_host(Received(b"p" * 500), T0 + 1)
    for _ in range(2):
        assert g.ack((ISS + 1) & M, T0 + 1.01) == []
    [r] = g.ack((ISS + 1) & M, T0 + 1.01)
    assert r.seq == (ISS + 1) & M and r.payload == b"p" * 100
    [r2] = g.ack((ISS + 101) & M, T0 + 1.02)  # partial ACK: the next hole goes at once
    assert r2.seq == (ISS + 101) & M
    assert g.conn.counters.fast_retransmits == 1


def test_the_rto_follows_measured_rtt():
    g = Guest()
    g.handshake()
    g.conn.on_host(Received(b"r"), T0 + 1)
    g.ack((ISS + 2) & M, T0 + 1.05)
    assert g.conn.rto == pytest.approx(max(nat.RTO_MIN, 0.05 + 4 * 0.025), abs=1e-6)


def test_a_zero_window_is_probed_and_a_window_held_shut_forever_aborts():
    g = Guest(window=0)
    g.handshake()
    out = g.conn.on_host(Received(b"w" * 10), T0 + 1)
    assert to_guest(out) == []
    [probe] = g.conn.tick(g.conn.next_deadline())
    assert probe.payload == b"" and probe.seq == ISS  # below SND.UNA: no byte past the window
    while not g.conn.closed:
        out = g.conn.tick(g.conn.next_deadline())
    assert isinstance(out[-1], Abort) and "zero window" in out[-1].reason
    assert g.conn.counters.window_probes >= 3


def test_an_ignored_older_window_update_never_stretches_the_window_past_its_edge():
    # Found by the segment soup: a window is relative to the ACK that carried it (SND.WL2).
    g = Guest(wscale=0, window=0)
    g.handshake()
    g.conn.from_guest(seg(g.nxt + 2, ISS + 1, "A", 4), T0 + 1)  # window 4, a later seq
    out = g.conn.on_host(Received(b"abcdefgh"), T0 + 1)
    assert [s.payload for s in to_guest(out)] == [b"abcd"]
    out = g.ack((ISS + 5) & M, T0 + 1.1, window=0)  # older seq: its window is not taken
    assert [s.payload for s in to_guest(out) if s.payload] == []
    assert g.conn.max_snd_edge == (ISS + 5) & M


def test_a_reopened_window_sends_the_waiting_data():
    g = Guest(window=0)
    g.handshake()
    g.conn.on_host(Received(b"w" * 10), T0 + 1)
    out = g.ack((ISS + 1) & M, T0 + 2, window=100)
    assert [s.payload for s in to_guest(out)] == [b"w" * 10]


# --- closing ------------------------------------------------------------------------------
def test_guest_closes_first_then_host():
    g = Guest()
    g.handshake()
    out = g.send(b"bye", flags="FPA")
    assert host(out) == [Send(b"bye"), ShutdownWrite()] and g.conn.state == nat.CLOSE_WAIT
    assert g.conn.on_host(Received(b"last"), T0 + 2)[0].payload == b"last"
    [fin] = g.conn.on_host(Eof(), T0 + 2)
    assert fin.flags & FIN and g.conn.state == nat.LAST_ACK
    out = g.ack((ISS + 1 + 4 + 1) & M, T0 + 2.1)
    assert out == [Close()] and g.conn.closed


def test_host_closes_first_then_guest_then_a_short_time_wait():
    g = Guest()
    g.handshake()
    [fin] = g.conn.on_host(Eof(), T0 + 1)
    assert fin.flags == FIN | ACK and g.conn.state == nat.FIN_WAIT_1
    assert g.conn.host_read_budget() == 0
    g.ack((ISS + 2) & M, T0 + 1.1)
    assert g.conn.state == nat.FIN_WAIT_2
    out = g.send(b"", flags="FA", now=T0 + 2)
    assert host(out) == [ShutdownWrite(), Close()] and g.conn.state == nat.TIME_WAIT
    # A retransmitted FIN in TIME-WAIT is acked again.
    [again] = g.conn.from_guest(seg(g.nxt - 1, ISS + 2, "FA"), T0 + 2.5)
    assert again.ack == g.nxt
    assert g.conn.next_deadline() <= T0 + 2 + nat.TIME_WAIT_SECONDS
    g.conn.tick(T0 + 2 + nat.TIME_WAIT_SECONDS)
    assert g.conn.closed


def test_simultaneous_close():
    g = Guest()
    g.handshake()
    g.conn.on_host(Eof(), T0 + 1)
    out = g.conn.from_guest(seg(g.nxt, ISS + 1, "FA"), T0 + 1.1)  # FIN not acking ours
    assert ShutdownWrite() in out and g.conn.state == nat.CLOSING
    out = g.conn.from_guest(seg(g.nxt + 1, ISS + 2, "A"), T0 + 1.2)
    assert out == [Close()] and g.conn.state == nat.TIME_WAIT


def test_a_lost_fin_is_retransmitted():
    g = Guest()
    g.handshake()
    g.conn.on_host(Eof(), T0 + 1)
    [r] = g.conn.tick(g.conn.next_deadline())
    assert r.flags & FIN and r.seq == (ISS + 1) & M


def test_a_host_error_resets_the_guest():
    g = Guest()
    g.handshake()
    out = g.conn.on_host(HostError("ECONNRESET"), T0 + 1)
    assert out[0].flags & RST and out[0].seq == (ISS + 1) & M and out[1] == Close()


def test_idle_connections_are_aborted_after_the_idle_timeout():
    g = Guest()
    g.handshake()
    g.send(b"k", now=T0 + 5)
    assert g.conn.next_deadline() == T0 + 5 + nat.IDLE_TIMEOUT
    out = g.conn.tick(T0 + 5 + nat.IDLE_TIMEOUT)
    assert isinstance(out[-1], Abort) and g.conn.closed


def test_guest_keepalives_are_answered_and_keep_the_connection_alive():
    g = Guest()
    g.handshake()
    now = T0
    for _ in range(3):
        now += nat.IDLE_TIMEOUT - 1
        assert g.conn.tick(now) == []
        [a] = g.conn.from_guest(seg(g.nxt - 1, ISS + 1, "A", payload=b"\0"), now)
        assert a.ack == g.nxt and a.flags == ACK
    assert g.conn.state == nat.ESTABLISHED and g.conn.counters.keepalives == 3


# --- RFC 5961 --------------------------------------------------------------------------
def test_a_reset_at_rcv_nxt_closes_and_aborts_the_host_side():
    g = Guest()
    g.handshake()
    out = g.conn.from_guest(seg(g.nxt, 0, "R"), T0 + 1)
    assert out == [Abort("guest reset")] and g.conn.closed


def test_an_in_window_reset_not_at_rcv_nxt_only_draws_a_challenge_ack():
    g = Guest()
    g.handshake()
    [c] = g.conn.from_guest(seg(g.nxt + 1000, 0, "R"), T0 + 1)
    assert c.flags == ACK and c.ack == g.nxt and g.conn.state == nat.ESTABLISHED


def test_an_out_of_window_reset_or_syn_never_kills_the_connection():
    g = Guest()
    g.handshake()
    assert g.conn.from_guest(seg(g.nxt - 5000, 0, "R"), T0 + 1) == []
    assert g.conn.from_guest(seg(g.nxt + 10_000_000, 0, "R"), T0 + 1) == []
    out = g.conn.from_guest(seg(12345, 0, "S"), T0 + 1)
    assert all(o.flags == ACK for o in to_guest(out))
    out = g.conn.from_guest(seg(g.nxt, 0, "S"), T0 + 1)  # in window: challenge ACK
    assert [o.flags for o in out] == [ACK]
    assert g.conn.state == nat.ESTABLISHED and g.conn.counters.rst_ignored == 2


def test_challenge_acks_are_rate_limited():
    g = Guest()
    g.handshake()
    total = []
    for _ in range(50):
        total += g.conn.from_guest(seg(g.nxt + 1, 0, "R"), T0 + 1)
    assert len(total) == nat.CHALLENGE_ACKS_PER_SECOND
    assert g.conn.counters.challenge_acks_suppressed == 50 - nat.CHALLENGE_ACKS_PER_SECOND


def test_an_ack_for_bytes_never_sent_is_refused():
    g = Guest()
    g.handshake()
    out = g.ack((ISS + 50) & M, T0 + 1)
    assert [o.ack for o in out] == [g.nxt] and g.conn.snd_una == (ISS + 1) & M
    assert g.conn.counters.ack_unsent == 1


def test_syn_with_fin_or_rst_is_dropped():
    conn = TcpConnection(GUEST_IP, GPORT, REMOTE_IP, RPORT, T0, iss=ISS)
    assert conn.from_guest(seg(GISN, flags="SF"), T0) == []
    assert conn.from_guest(seg(GISN, flags="SR"), T0) == []
    assert conn.counters.bad_flags == 2 and conn.state == nat.LISTEN


# --- segment soup -------------------------------------------------------------------------
FLAG_SETS = ["A", "PA", "FA", "R", "RA", "S", "SA", "F", "", "SF", "FPA", "U"]


@st.composite
def soup(draw):
    n = draw(st.integers(1, 40))
    steps = []
    for _ in range(n):
        kind = draw(st.sampled_from(["seg", "seg", "next", "next", "host", "written",
                                     "tick", "flush", "room"]))
        if kind == "next":  # what a live guest sends: in order, acking what it got
            steps.append(("next", draw(st.sampled_from(["PA", "A", "FA"])),
                          draw(st.integers(0, 4000)), draw(st.integers(0, 65535))))
        elif kind == "seg":
            near = draw(st.booleans())
            seq_off = draw(st.integers(-3000, 300_000)) if near else draw(
                st.integers(0, M))
            ack_off = draw(st.integers(-3000, 70_000)) if near else draw(st.integers(0, M))
            steps.append(("seg", seq_off, ack_off, draw(st.sampled_from(FLAG_SETS)),
                          draw(st.integers(0, 65535)), draw(st.integers(0, 3000)),
                          draw(st.sampled_from([[], [("MSS", 0)], [("WScale", 99)],
                                                [("SAck", (1, 2))], [("NOP", None)]]))))
        elif kind == "host":
            steps.append(("host", draw(st.sampled_from(["recv", "eof", "err"])),
                          draw(st.integers(1, 70_000))))
        elif kind == "written":
            steps.append(("written", draw(st.integers(1, 100_000))))
        elif kind == "flush":
            steps.append(("flush",))
        elif kind == "room":  # the table's hold_limit: the guest's room under its cap
            steps.append(("room", draw(st.integers(0, 600_000))))
        else:
            steps.append(("tick", draw(st.floats(0, 200))))
    return steps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(soup(), st.booleans(), st.booleans(), st.booleans())
def test_segment_soup_never_raises_never_oversends_never_acks_unreceived(steps, established,
                                                                         defer, sack):
    with deadline(20):
        g = Guest(mss=536, wscale=2, window=3000)
        if established:
            g.handshake()
        else:
            g.conn.from_guest(seg(GISN, flags="S", options=[("MSS", 536), ("WScale", 2),
                                                           *([("SAckOK", b"")] * sack)]), T0)
        conn = g.conn
        now = T0 + 1
        delivered = 0  # bytes the guest stream has given the host, in order
        fin = 0  # 1 once the guest's FIN was taken (ShutdownWrite)
        for step in steps:
            if step[0] == "seg":
                _, seq_off, ack_off, flags, window, size, opts = step
                s = seg(g.nxt + seq_off, conn.snd_una + ack_off, flags, window,
                        bytes(size), opts)
                out = conn.from_guest(s, now, defer_ack=defer)
            elif step[0] == "next":
                _, flags, size, window = step
                s = seg(conn.rcv_nxt, conn.snd_nxt, flags, window, bytes(size))
                out = conn.from_guest(s, now, defer_ack=defer)
            elif step[0] == "flush":
                out = conn.flush_ack()
            elif step[0] == "room":
                conn.hold_limit = step[1]
                out = conn.window_update()
            elif step[0] == "host":
                if step[1] == "recv":
                    budget = conn.host_read_budget()
                    out = conn.on_host(Received(b"h" * min(budget, step[2])), now) \
                        if budget else []
                elif step[1] == "eof":
                    out = conn.on_host(Eof(), now)
                else:
                    out = conn.on_host(HostError("x"), now) if step[2] % 7 == 0 else []
                if conn.state == nat.CONNECTING:
                    out += conn.on_host(Connected(), now)
            elif step[0] == "written":
                n = min(step[1], conn.host_unwritten)
                out = conn.on_host(Written(n), now) if n else []
            else:
                now += step[1]
                out = conn.tick(now)
            for o in out:
                if isinstance(o, Send):
                    assert not fin
                    delivered += len(o.data)
                elif isinstance(o, ShutdownWrite):
                    assert not fin
                    fin = 1
                elif isinstance(o, ToGuest) and not o.flags & RST:
                    assert len(o.options) <= 40 and len(o.options) % 4 == 0
                    # Never past the furthest edge the guest advertised.
                    end = (o.seq + len(o.payload)) & M
                    assert not o.payload or nat._le(end, conn.max_snd_edge)
                    # Never acks a byte the guest did not send in order (SYN/FIN count one).
                    if conn.state not in (nat.LISTEN, nat.CONNECTING) and o.flags & ACK:
                        assert nat._le(o.ack, (GISN + 1 + delivered + fin) & M)
            # Bounded memory.
            assert len(conn._snd_buf) <= nat.SND_BUFFER
            assert conn.host_unwritten <= nat.RCV_BUFFER + (1 << conn.rcv_wscale)
            assert len(conn._ooo) <= nat.OOO_MAX_RUNS
            assert conn._ooo_bytes <= nat.RCV_BUFFER
            deadline_at = conn.next_deadline()
            assert deadline_at is None or deadline_at >= now - 1e-9 or not conn.closed
        assert conn.from_guest(seg(g.nxt, 0, "A"), now) is not None  # still answering


def test_options_parser_reads_what_scapy_writes():
    raw = bytes(TCP(options=[("MSS", 1400), ("NOP", None), ("WScale", 5), ("SAckOK", b""),
                             ("Timestamp", (7, 9))]))
    opts = parse_options(Tcp(raw).options)
    assert (opts.mss, opts.wscale, opts.sack_permitted, opts.timestamps) == \
        (1400, 5, True, (7, 9))


@pytest.mark.parametrize("options", [
    b"\x02", b"\x02\x01", b"\x02\x09\x05\xb4", b"\x03\x04\x07\x00", b"\x08\x02"])
def test_options_that_cannot_be_walked_or_have_the_wrong_length_are_malformed(options):
    with pytest.raises(Malformed) as caught:
        parse_options(options)
    assert caught.value.reason in OPTION_REASONS


def test_options_parser_skips_unknown_kinds_and_stops_at_end():
    assert parse_options(b"\x1e\x03\x00\x02\x04\x05\xb4\x00\xff").mss == 1460


def test_flags_constants_match_scapy():
    assert TCP(flags="FSRPA").flags.value == FIN | SYN | RST | PSH | ACK
