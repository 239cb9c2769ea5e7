"""The active open of the NAT's TCP core (port forwards: we send the SYN to the guest),
sans-I/O against scapy-built guest segments: SYN out with our options, the guest's SYN/ACK
in, its RST, SYN retries running out, hostile SYN/ACKs; and the flow table's forward flows
(a gateway port no flow uses, the guest's caps, DNS over TCP's kind)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from netstack.nat import tcp as nat
from netstack.nat.forward import FORWARD_PORTS
from netstack.nat.limits import FlowKey, FlowLimits
from netstack.nat.packet import Refused, read_guest_packet
from netstack.nat.tcp import (
    Abort,
    Eof,
    Established,
    HostError,
    Received,
    Send,
    TcpConnection,
    ToGuest,
)
from netstack.nat.tcp_flows import DNS, FORWARD, OUTGOING, HostCall, TcpTable
from netstack.wire import IPPROTO_TCP
from netstack.wire.tcp import ACK, PSH, RST, SYN, Tcp, parse_options
from tests.support.deadline import deadline
from tests.support.nat import GUEST4, GUEST_MAC, GW4, GW_MAC, guest_frame, mac, nat_config, packed

GUEST_IP = bytes([10, 77, 0, 10])
GATEWAY_IP = bytes([10, 77, 0, 1])
GPORT, OURPORT = 22, 40001
ISS = 5_000
GISN = 0xFFFFFFF0  # the guest's ISN wraps at once
T0 = 10.0
M = 0xFFFFFFFF


def seg(seq: int, ack: int = 0, flags: str = "SA", window: int = 65535,
        payload: bytes = b"", options: list | None = None) -> Tcp:
    pkt = TCP(sport=GPORT, dport=OURPORT, seq=seq & M, ack=ack & M, flags=flags,
              window=window, options=options or [])
    return Tcp(bytes(pkt / payload) if payload else bytes(pkt))


def opened() -> tuple[TcpConnection, ToGuest]:
    conn = TcpConnection(GUEST_IP, GPORT, GATEWAY_IP, OURPORT, T0, mss=1460, iss=ISS)
    [syn] = conn.open_to_guest(T0)
    return conn, syn


def test_the_active_open_sends_a_syn_with_our_mss_and_window_scale_offered():
    conn, syn = opened()
    assert conn.state == nat.SYN_SENT
    assert syn.flags == SYN and syn.seq == ISS and syn.window == 65535
    options = parse_options(syn.options)
    assert options.mss == 1460 and options.wscale == nat.RCV_WSCALE
    assert conn.host_read_budget() == 0  # nothing read from the host before the guest accepts
    wire = conn.encode(syn)  # a valid segment from the gateway's port to the guest's
    pkt = IP(bytes(IP(src="10.77.0.1", dst="10.77.0.10", proto=6) / TCP(wire)))
    assert (pkt[TCP].sport, pkt[TCP].dport) == (OURPORT, GPORT)
    del pkt[TCP].chksum
    assert IP(bytes(pkt))[TCP].chksum == TCP(wire).chksum


def test_the_guests_synack_is_answered_with_an_ack_and_the_host_side_told_established():
    conn, _ = opened()
    out = conn.from_guest(seg(GISN, ISS + 1, "SA", 1000, options=[("MSS", 1400),
                                                                  ("WScale", 7)]), T0 + 0.01)
    [ack, established] = out
    assert isinstance(established, Established) and conn.state == nat.ESTABLISHED
    assert ack.flags == ACK and ack.seq == ISS + 1 and ack.ack == (GISN + 1) & M
    assert conn.snd_mss == 1400 and conn.snd_wscale == 7 and conn.rcv_wscale == nat.RCV_WSCALE
    assert conn.snd_wnd == 1000  # a SYN/ACK's window is never scaled
    assert ack.window << conn.rcv_wscale >= 65535  # our window is scaled from now on
    # Then it is the same relay as a connection the guest opened: data both ways.
    out = conn.on_host(Received(b"hello"), T0 + 0.02)
    [data] = [o for o in out if isinstance(o, ToGuest)]
    assert data.payload == b"hello" and data.flags == ACK | PSH
    out = conn.from_guest(seg(GISN + 1, ISS + 6, "PA", 1000, b"world"), T0 + 0.03)
    assert Send(b"world") in out
    assert conn.on_host(Eof(), T0 + 0.04)[0].flags & nat.FIN


def test_a_synack_without_window_scale_leaves_both_sides_unscaled():
    conn, _ = opened()
    conn.from_guest(seg(GISN, ISS + 1, "SA", 5000, options=[("MSS", 1200)]), T0)
    assert conn.rcv_wscale == 0 and conn.snd_wscale == 0 and conn.snd_mss == 1200


def test_the_guests_reset_refuses_the_connection():
    conn, _ = opened()
    out = conn.from_guest(seg(0, ISS + 1, "RA", 0), T0 + 0.01)
    assert out == [Abort(nat.REFUSED_BY_GUEST)] and conn.closed


def test_a_reset_that_acknowledges_nothing_or_the_wrong_thing_is_ignored():
    conn, _ = opened()
    assert conn.from_guest(seg(0, 0, "R", 0), T0) == []
    assert conn.from_guest(seg(0, ISS + 99, "RA", 0), T0) == []
    assert conn.state == nat.SYN_SENT
    assert conn.counters.rst_ignored == 1 and conn.counters.ack_unsent == 1


def test_a_synack_acknowledging_something_else_draws_a_reset_and_we_keep_waiting():
    conn, _ = opened()
    for wrong in (ISS, ISS + 2, ISS - 100, ISS + 1 + 2**31):
        [rst] = conn.from_guest(seg(GISN, wrong, "SA"), T0)
        assert rst.flags == RST and rst.seq == wrong & M
    assert conn.state == nat.SYN_SENT and conn.counters.ack_unsent == 4
    out = conn.from_guest(seg(GISN, ISS + 1, "SA"), T0 + 0.1)  # the real one still works
    assert isinstance(out[-1], Established)


def test_a_bare_syn_or_a_bare_ack_or_syn_fin_is_not_an_answer():
    conn, _ = opened()
    assert conn.from_guest(seg(GISN, 0, "S"), T0) == []  # no simultaneous open
    assert conn.from_guest(seg(GISN, ISS + 1, "A"), T0) == []
    assert conn.from_guest(seg(GISN, ISS + 1, "SFA"), T0) == []
    assert conn.state == nat.SYN_SENT and conn.counters.bad_flags == 3


def test_a_synack_with_bad_options_is_taken_with_the_defaults_and_counted():
    conn, _ = opened()
    raw = bytearray(bytes(TCP(sport=GPORT, dport=OURPORT, seq=GISN, ack=ISS + 1, flags="SA",
                              window=512, options=[("NOP", None)] * 4)))
    raw[20:24] = bytes((2, 9, 5, 0))  # an MSS option claiming 9 bytes in a 4-byte area
    garbage = Tcp(bytes(raw))
    out = conn.from_guest(garbage, T0)
    assert isinstance(out[-1], Established)
    assert conn.counters.bad_option == 1
    assert conn.snd_mss == nat.DEFAULT_MSS_V4 and conn.snd_wscale == 0 and conn.rcv_wscale == 0


def test_a_synack_with_a_tiny_mss_and_a_huge_window_scale_is_clamped():
    conn, _ = opened()
    conn.from_guest(seg(GISN, ISS + 1, "SA", options=[("MSS", 1), ("WScale", 40)]), T0)
    assert conn.snd_mss == nat.MIN_MSS and conn.snd_wscale == nat.MAX_WSCALE
    assert conn.counters.bad_option == 2


def test_an_unanswered_syn_is_retried_with_backoff_then_given_up_without_a_reset():
    conn, _ = opened()
    times = []
    for _ in range(nat.SYN_RETRIES):
        at = conn.next_deadline()
        times.append(at)
        [again] = conn.tick(at)
        assert again.flags == SYN and again.seq == ISS
    gaps = [b - a for a, b in zip([T0, *times], times, strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # backoff
    out = conn.tick(conn.next_deadline())
    assert out == [Abort(nat.SYN_TIMEOUT)] and conn.closed  # the guest never spoke: no RST
    assert conn.counters.retransmits == nat.SYN_RETRIES


def test_the_host_side_failing_before_the_guest_answers_resets_the_guest_in_order():
    conn, _ = opened()
    out = conn.on_host(HostError("econnreset"), T0)
    assert out[0].flags == RST and out[0].seq == ISS + 1 and conn.closed


# -- the flow table ------------------------------------------------------------------------

def frame_to(t: TcpTable, frame) -> list:
    return t.guest_segment(read_guest_packet(frame, mac(GW_MAC)), 0, T0)


def test_a_forward_flow_comes_from_the_gateway_and_a_port_no_flow_uses():
    t = TcpTable(nat_config(), FlowLimits())
    keys = set()
    for _ in range(50):
        key, out = t.open_forward(mac(GUEST_MAC), packed(GUEST4), 22, T0)
        [syn] = [Ether(bytes(o.data)) for o in out if not isinstance(o, HostCall)]
        assert syn[IP].src == GW4 and syn[IP].dst == GUEST4 and syn[TCP].flags == "S"
        assert syn[TCP].sport == key.remote_port in FORWARD_PORTS and syn[TCP].dport == 22
        keys.add(key)
    assert len(keys) == 50 and all(t.kind(key) == FORWARD for key in keys)
    # Forward flows are the guest's flows, not its half-open SYNs.
    assert t.limits.held(mac(GUEST_MAC)) == {"flows": 50, "half_open": 0, "buffered": 0}


def test_the_guests_synack_on_a_forward_flow_establishes_it_through_the_table():
    t = TcpTable(nat_config(), FlowLimits())
    key, out = t.open_forward(mac(GUEST_MAC), packed(GUEST4), 22, T0)
    syn = next(Ether(bytes(o.data)) for o in out if not isinstance(o, HostCall))[TCP]
    out = frame_to(t, guest_frame(IP(src=GUEST4, dst=GW4) / TCP(
        sport=22, dport=key.remote_port, flags="SA", seq=7, ack=syn.seq + 1)))
    assert [c.action for c in out if isinstance(c, HostCall)] == [Established()]
    assert t.flows[key].conn.state == nat.ESTABLISHED


def test_forward_flows_stop_at_half_the_guests_flow_cap_and_the_guest_keeps_the_rest():
    limits = FlowLimits(flows_per_guest={IPPROTO_TCP: 6})
    t = TcpTable(nat_config(), limits)
    for _ in range(3):
        t.open_forward(mac(GUEST_MAC), packed(GUEST4), 22, T0)
    try:
        t.open_forward(mac(GUEST_MAC), packed(GUEST4), 22, T0)
    except Refused as refused:
        assert refused.reason == "flow_limit"
    else:
        raise AssertionError("a fourth flow was admitted")
    assert limits.refusals["flow_limit"] == 1 and len(t.flows) == 3
    for port in range(4000, 4003):  # the guest's own connections out still open
        frame_to(t, guest_frame(IP(src=GUEST4, dst="198.51.100.7") / TCP(
            sport=port, dport=80, flags="S")))
    assert len(t.flows) == 6


def test_a_guest_syn_to_the_gateways_port_53_is_dns_over_tcp_only_with_resolvers():
    syn = guest_frame(IP(src=GUEST4, dst=GW4) / TCP(sport=4000, dport=53, flags="S"))
    with_dns = TcpTable(nat_config(), FlowLimits(), dns_over_tcp=True)
    frame_to(with_dns, syn)
    key = FlowKey(IPPROTO_TCP, packed(GUEST4), 4000, packed(GW4), 53)
    assert with_dns.kind(key) == DNS
    without = TcpTable(nat_config(), FlowLimits())
    try:
        frame_to(without, syn)
    except Refused as refused:
        assert refused.reason == "gateway"
    else:
        raise AssertionError("port 53 of the gateway was opened without resolvers")
    other = guest_frame(IP(src=GUEST4, dst="198.51.100.7") / TCP(sport=4001, dport=53,
                                                                  flags="S"))
    frame_to(with_dns, other)
    assert with_dns.kind(FlowKey(IPPROTO_TCP, packed(GUEST4), 4001,
                                 packed("198.51.100.7"), 53)) == OUTGOING


# -- hostile segment soup in SYN-SENT -----------------------------------------------------

FLAG_SETS = ["S", "SA", "A", "R", "RA", "F", "FA", "SF", "SR", "PA", "", "SAU", "SAE"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FLAG_SETS),
                          st.integers(0, M),
                          st.one_of(st.just(ISS + 1), st.integers(0, M)),
                          st.integers(0, 65535),
                          st.binary(max_size=64),
                          st.sampled_from([[], [("MSS", 0)], [("WScale", 255)],
                                           [("MSS", 65535), ("WScale", 14)], [("SAckOK", b"")]])),
                max_size=20))
def test_no_segment_soup_in_syn_sent_raises_or_opens_without_a_synack_acking_our_syn(segments):
    with deadline(5):
        conn, _ = opened()
        for flags, seq, ack, window, payload, options in segments:
            before = conn.state
            out = conn.from_guest(seg(seq, ack, flags, window, payload, options), T0)
            if before != nat.SYN_SENT:
                continue
            synack_ours = set(flags) >= {"S", "A"} and not set(flags) & {"R", "F"} \
                and ack == ISS + 1
            rst_ours = "R" in flags and "A" in flags and "S" not in flags and ack == ISS + 1
            if conn.state == nat.ESTABLISHED:
                assert synack_ours and isinstance(out[-1], Established)
                assert conn.rcv_nxt == (seq + 1) & M and conn.snd_mss >= nat.MIN_MSS
                assert conn.snd_wscale <= nat.MAX_WSCALE
            elif conn.closed:
                assert rst_ours and out == [Abort(nat.REFUSED_BY_GUEST)]
            else:
                assert conn.state == nat.SYN_SENT and not (synack_ours or rst_ours)
                assert all(o.flags == RST and o.seq == ack & M for o in out)  # resets only
