"""UDP port forwards' flow table (netstack/nat/udp_forward.py), sans-I/O: a client's datagram
reaches the guest from the gateway and a free port, the guest's answer goes back to that
client, caps per forward and per guest, the unknown neighbour, idle expiry."""

from __future__ import annotations

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netstack.nat.forward import FORWARD_PORTS
from netstack.nat.limits import MAX_FLOWS_PER_GUEST, FlowKey, FlowLimits
from netstack.nat.packet import Refused, read_guest_packet
from netstack.nat.udp import UdpTable
from netstack.nat.udp_forward import SendToClient, UdpForwards
from netstack.wire import IPPROTO_UDP
from tests.support.nat import (
    GUEST4,
    GUEST_MAC,
    GW4,
    GW_MAC,
    OTHER_MAC,
    checksums_valid,
    guest_frame,
    mac,
    nat_config,
    packed,
)

CLIENT = ("198.51.100.9", 5555)


def table(per_forward: int = 256, taken: frozenset = frozenset(), **limits) -> UdpForwards:
    return UdpForwards(nat_config(), FlowLimits(**limits), [(packed(GUEST4), 53)],
                       lambda key: key in taken, idle_seconds=30.0, per_forward=per_forward)


def answer(t: UdpForwards, port: int, payload: bytes, src_mac: str = GUEST_MAC, now=2.0):
    frame = guest_frame(IP(src=GUEST4, dst=GW4) / UDP(sport=53, dport=port) / payload,
                        src_mac=src_mac)
    return t.guest_datagram(read_guest_packet(frame, mac(GW_MAC)), 0, now)


def test_a_clients_datagram_reaches_the_guest_and_the_answer_goes_back_to_that_client():
    t = table()
    frame = t.from_client(0, CLIENT, b"query", mac(GUEST_MAC), 1.0)
    assert checksums_valid(frame)
    pkt = Ether(bytes(frame.data))
    assert pkt[IP].src == GW4 and pkt[IP].dst == GUEST4 and pkt[UDP].dport == 53
    port = pkt[UDP].sport
    assert port in FORWARD_PORTS and bytes(pkt[UDP].payload) == b"query"
    assert answer(t, port, b"reply") == SendToClient(0, CLIENT, b"reply")
    # The same client keeps its flow; another client gets another port.
    again = Ether(bytes(t.from_client(0, CLIENT, b"q2", mac(GUEST_MAC), 1.5).data))
    other = Ether(bytes(t.from_client(0, ("198.51.100.9", 5556), b"q", mac(GUEST_MAC),
                                      1.5).data))
    assert again[UDP].sport == port and other[UDP].sport != port
    assert t.limits.held(mac(GUEST_MAC))["flows"] == 2


def test_a_guest_datagram_to_the_gateway_of_no_forward_flow_is_left_to_the_udp_table():
    t = table()
    assert answer(t, 40000, b"x") is None


def test_an_answer_from_another_mac_is_refused():
    t = table()
    port = Ether(bytes(t.from_client(0, CLIENT, b"q", mac(GUEST_MAC), 1.0).data))[UDP].sport
    try:
        answer(t, port, b"spoof", src_mac=OTHER_MAC)
    except Refused as refused:
        assert refused.reason == "guest_mac"
    else:
        raise AssertionError("a spoofed answer was carried")


def test_the_port_picked_never_collides_with_another_tables_flow():
    busy = frozenset(FlowKey(IPPROTO_UDP, packed(GUEST4), 53, packed(GW4), port)
                     for port in FORWARD_PORTS[:-1])
    t = table(taken=busy)
    frame = t.from_client(0, CLIENT, b"q", mac(GUEST_MAC), 1.0)
    assert Ether(bytes(frame.data))[UDP].sport == FORWARD_PORTS[-1]
    assert t.from_client(0, ("198.51.100.9", 1), b"q", mac(GUEST_MAC), 1.0) is None
    assert t.drops["no_port"] == 1


def test_an_unknown_neighbour_drops_the_datagram_counted():
    t = table()
    assert t.from_client(0, CLIENT, b"q", None, 1.0) is None
    assert t.drops["no_neighbour"] == 1 and not t.flows


def test_clients_stop_at_the_forwards_cap_and_at_the_guests_cap():
    t = table(per_forward=3)
    for n in range(5):
        t.from_client(0, ("198.51.100.9", 1000 + n), b"q", mac(GUEST_MAC), 1.0)
    assert len(t.flows) == 3 and t.drops["forward_limit"] == 2
    t = table(flows_per_guest={IPPROTO_UDP: 4})  # forwards take at most half of it
    for n in range(5):
        t.from_client(0, ("198.51.100.9", 1000 + n), b"q", mac(GUEST_MAC), 1.0)
    assert len(t.flows) == 2 and t.drops["flow_limit"] == 3


def test_ten_thousand_clients_of_a_forward_leave_the_guest_half_its_udp_flows():
    # Outside clients (their source ports are theirs to pick, or to spoof) must not take
    # every UDP flow of the guest: its own datagrams out still open flows.
    limits = FlowLimits()
    t = UdpForwards(nat_config(), limits, [(packed(GUEST4), 53)], lambda key: False)
    for n in range(10_000):
        t.from_client(0, ("198.51.100.9", 1024 + n), b"q", mac(GUEST_MAC), 1.0)
    cap = MAX_FLOWS_PER_GUEST[IPPROTO_UDP]
    assert len(t.flows) == cap // 2 and t.drops["flow_limit"] == 10_000 - cap // 2
    udp = UdpTable(nat_config(), limits)
    for port in range(40000, 40000 + cap // 2):
        frame = guest_frame(IP(src=GUEST4, dst="198.51.100.7") / UDP(sport=port, dport=9))
        assert udp.guest_datagram(read_guest_packet(frame, mac(GW_MAC)), 0, 1.0)
    assert limits.held(mac(GUEST_MAC))["flows"] == cap


def test_an_idle_client_flow_expires_and_gives_its_places_back():
    t = table(per_forward=1)
    t.from_client(0, CLIENT, b"q", mac(GUEST_MAC), 1.0)
    assert t.next_deadline() == 31.0
    assert t.tick(30.9) == 0
    assert t.tick(31.0) == 1
    assert not t.flows and not t.clients and not t.active
    assert t.limits.held(mac(GUEST_MAC))["flows"] == 0
    assert t.from_client(0, ("198.51.100.9", 7), b"q", mac(GUEST_MAC), 32.0) is not None
