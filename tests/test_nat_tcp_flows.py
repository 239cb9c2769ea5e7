"""The NAT's TCP flow table against scapy-built guest segments: SYNs admitted through the
caps and the deny list, RSTs for segments of no flow, TIME-WAIT replaced by a new SYN, caps
given back when a connection ends, timers run from a heap of deadlines."""

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from netstack.nat.limits import FlowKey, FlowLimits
from netstack.nat.packet import Refused, read_guest_packet
from netstack.nat.tcp import (
    CONNECT_TIMEOUT,
    Abort,
    Close,
    Connect,
    Connected,
    Eof,
    Received,
    Send,
)
from netstack.nat.tcp import Refused as HostRefused
from netstack.nat.tcp_flows import HostCall, TcpTable
from netstack.wire import IPPROTO_TCP
from tests.support.nat import (
    GUEST4,
    GUEST_MAC,
    GW_MAC,
    OTHER4,
    OTHER_MAC,
    REMOTE4,
    guest_frame,
    mac,
    nat_config,
    packed,
)

KEY = FlowKey(IPPROTO_TCP, packed(GUEST4), 40000, packed(REMOTE4), 80)


def table(**limits) -> TcpTable:
    return TcpTable(nat_config(), FlowLimits(**limits))


def segment(t: TcpTable, flags="S", sport=40000, dport=80, seq=1000, ack=0, dst=REMOTE4, now=1.0):
    frame = guest_frame(IP(src=GUEST4, dst=dst) / TCP(sport=sport, dport=dport, flags=flags,
                                                      seq=seq, ack=ack, window=65535))
    return t.guest_segment(read_guest_packet(frame, mac(GW_MAC)), 0, now)


def calls(out):
    return [item.action for item in out if isinstance(item, HostCall)]


def tcp_of(out):
    return [Ether(bytes(item.data))[TCP] for item in out if not isinstance(item, HostCall)]


def test_a_guest_syn_opens_a_connection_that_asks_to_connect_and_holds_a_half_open_place():
    t = table()
    out = segment(t)
    assert calls(out) == [Connect()]
    assert t.limits.held(mac(GUEST_MAC)) == {"flows": 1, "half_open": 1, "buffered": 0}
    out = t.on_host(KEY, Connected(), 1.1)
    [synack] = tcp_of(out)
    assert synack.flags == "SA" and synack.ack == 1001
    assert t.limits.held(mac(GUEST_MAC))["half_open"] == 1  # SYN-RECEIVED is still half-open
    segment(t, flags="A", seq=1001, ack=synack.seq + 1, now=1.2)
    assert t.limits.held(mac(GUEST_MAC)) == {"flows": 1, "half_open": 0, "buffered": 0}


def test_a_segment_of_no_flow_is_answered_by_a_reset_and_counted():
    t = table()
    [rst] = tcp_of(segment(t, flags="A", seq=5, ack=777))
    assert rst.flags == "R" and rst.seq == 777
    assert t.resets_sent == 1 and not t.flows
    assert segment(t, flags="R") == [] and t.drops["no_flow"] == 1


def test_a_refused_connect_resets_the_guest_and_gives_the_caps_back():
    t = table()
    segment(t)
    out = t.on_host(KEY, HostRefused("econnrefused"), 1.1)
    [rst] = tcp_of(out)
    assert "R" in rst.flags and rst.ack == 1001
    assert Close() in calls(out)
    assert not t.flows and t.limits.held(mac(GUEST_MAC))["flows"] == 0


def test_syns_from_one_guest_stop_at_the_half_open_cap():
    t = table(half_open_per_guest=8)
    refused = 0
    for port in range(1000, 1020):
        try:
            segment(t, sport=port)
        except Refused as error:
            assert error.reason == "half_open_limit"
            refused += 1
    assert len(t.flows) == 8 and refused == 12
    assert t.limits.refusals["half_open_limit"] == 12
    assert t.limits.held(mac(GUEST_MAC))["flows"] == 8  # refused SYNs hold no flow either


def test_denied_and_gateway_destinations_are_refused():
    t = table()
    for dst, reason in (("169.254.169.254", "denied"), ("10.77.0.1", "gateway")):
        try:
            segment(t, dst=dst)
        except Refused as error:
            assert error.reason == reason
        else:
            raise AssertionError(f"{dst} admitted")
    assert not t.flows


def test_the_connect_timeout_runs_from_tick_and_only_when_due():
    t = table()
    segment(t, now=1.0)
    assert t.next_deadline() == 1.0 + CONNECT_TIMEOUT
    assert t.tick(2.0) == []
    out = t.tick(1.0 + CONNECT_TIMEOUT)
    assert any(isinstance(a, Abort) for a in calls(out))
    assert not t.flows and t.next_deadline() is None
    assert t.limits.held(mac(GUEST_MAC))["half_open"] == 0


def test_a_new_syn_on_a_time_wait_flow_replaces_it():
    t = table()
    segment(t)
    [synack] = tcp_of(t.on_host(KEY, Connected(), 1.0))
    segment(t, flags="A", seq=1001, ack=synack.seq + 1)
    [fin] = tcp_of(t.on_host(KEY, Eof(), 1.0))
    segment(t, flags="FA", seq=1001, ack=fin.seq + 1)
    assert t.flows[KEY].conn.state == "TIME-WAIT"
    out = segment(t, seq=9000, now=1.5)
    assert calls(out) == [Connect()]
    assert t.flows[KEY].conn.state == "CONNECTING"
    assert t.limits.held(mac(GUEST_MAC))["flows"] == 1


def established(t: TcpTable, sport: int) -> int:
    """Open flow `sport` to REMOTE4:80 through its handshake; returns our next sequence."""
    key = KEY._replace(guest_port=sport)
    segment(t, sport=sport)
    [synack] = tcp_of(t.on_host(key, Connected(), 1.1))
    segment(t, flags="A", sport=sport, seq=1001, ack=synack.seq + 1, now=1.2)
    return synack.seq + 1


def test_bytes_a_connection_holds_are_charged_to_its_guest_and_cap_the_reads_of_its_others():
    t = table(buffered_per_guest=100_000)
    guest = mac(GUEST_MAC)
    ours = established(t, 40000)
    theirs = established(t, 40001)
    other = KEY._replace(guest_port=40001)
    t.on_host(KEY, Received(bytes(60_000)), 1.3)  # held until the guest acknowledges them
    assert t.limits.held(guest)["buffered"] == 60_000
    assert t.read_budget(other) == 40_000  # the guest's cap, not the connection's buffer
    t.on_host(other, Received(bytes(40_000)), 1.3)
    assert t.read_budget(KEY) == 0 and t.guest_limited(KEY)
    frame = guest_frame(IP(src=GUEST4, dst=REMOTE4) / TCP(
        sport=40001, dport=80, flags="PA", seq=1001, ack=theirs, window=65535) / bytes(1000))
    out = t.guest_segment(read_guest_packet(frame, mac(GW_MAC)), 0, 1.4)
    assert any(isinstance(action, Send) for action in calls(out))  # carried, over the cap:
    assert t.limits.refusals["buffer_limit"] >= 1  # counted, bounded by the window
    segment(t, flags="A", seq=1001, ack=ours + 10_000, now=1.5)  # frees 10 000 of 60 000
    assert t.limits.held(guest)["buffered"] == 90_000 and t.read_budget(KEY) == 10_000
    segment(t, flags="R", seq=1001, now=1.6)
    assert t.limits.held(guest)["buffered"] == 40_000  # the reset flow's bytes given back


def test_a_syn_with_fin_is_refused_and_leaves_no_flow_holding_the_guests_cap():
    # A SYN+FIN is dropped by the connection (bad_flags); its flow must not stay in LISTEN,
    # holding one of the guest's flows (and the hub's) for the 2-hour idle timeout.
    t = table(flows_per_guest={IPPROTO_TCP: 4})
    for port in range(40000, 40010):
        with pytest.raises(Refused) as refused:
            segment(t, flags="SF", sport=port)
        assert refused.value.reason == "bad_syn"
    assert not t.flows and t.next_deadline() is None
    assert t.limits.held(mac(GUEST_MAC)) == {"flows": 0, "half_open": 0, "buffered": 0}
    assert calls(segment(t, sport=40000)) == [Connect()]  # the guest still connects


def test_all_guests_buffered_bytes_stop_at_the_hubs_cap_whatever_each_guests_cap_allows():
    # A guest is a MAC and one port may speak for hundreds: each within its own cap, they
    # must not make the hub buffer more than MAX_BUFFERED_BYTES_TOTAL together.
    t = table(buffered_per_guest=100_000, buffered_total=150_000)
    ours = established(t, 40000)
    t.on_host(KEY, Received(bytes(100_000)), 1.3)  # the first guest: its whole cap
    other_key = FlowKey(IPPROTO_TCP, packed(OTHER4), 40000, packed(REMOTE4), 80)

    def other(flags, seq=1000, ack=0):
        frame = guest_frame(IP(src=OTHER4, dst=REMOTE4) / TCP(
            sport=40000, dport=80, flags=flags, seq=seq, ack=ack, window=65535),
            src_mac=OTHER_MAC)
        return t.guest_segment(read_guest_packet(frame, mac(GW_MAC)), 0, 1.2)

    other("S")
    [synack] = tcp_of(t.on_host(other_key, Connected(), 1.1))
    other("A", 1001, synack.seq + 1)
    assert t.read_budget(other_key) == 50_000  # the hub's room, not the guest's 100 000
    t.on_host(other_key, Received(bytes(50_000)), 1.3)
    assert t.limits.host_room() == 0 and t.guest_limited(other_key)
    assert t.limits.held(mac(OTHER_MAC))["buffered"] == 50_000
    segment(t, flags="A", seq=1001, ack=ours + 30_000, now=1.5)  # the first guest frees some
    assert t.read_budget(other_key) == 30_000
