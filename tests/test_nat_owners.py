"""The NAT's caps count per owner -- the switch port a guest's frames came in on -- not per
MAC: many MACs on one port share one guest's flows, half-open connections, buffered bytes,
DNS queries, forwarded share and ICMP error rate, another port keeps its own, and what a
flow took goes back to the port that admitted it even after its MAC moved or aged out; the
shell's status names each port's holdings.  The MAC table here is a dict, as the hub's switch
answers (tests/test_hub_nat.py runs the real one)."""

import ipaddress
import itertools

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from netstack.nat.dns import MAX_PENDING_PER_GUEST, DnsForwarder
from netstack.nat.icmp import ERRORS_BURST, ErrorReporter, HostError
from netstack.nat.limits import FlowKey, FlowLimits
from netstack.nat.packet import Refused, read_guest_packet
from netstack.nat.tcp import Connected, Received
from netstack.nat.tcp_flows import HostCall, TcpTable
from netstack.nat.udp import UdpTable
from netstack.nat.udp_forward import UdpForwards
from netstack.port import Port
from netstack.wire import IPPROTO_TCP, IPPROTO_UDP
from tests.support.nat import GUEST4, GW4, GW_MAC, REMOTE4, guest_frame, mac, nat_config, packed
from tunnel.nat import NatShell

VM1, VM2 = "vm1", "vm2"  # two ports' names: the owners
MACS = [f"52:54:00:00:01:{n:02x}" for n in range(16)]  # one port's MAC limit's worth
ALONE = "52:54:00:00:02:01"  # the MAC on the other port


class MacTable:
    """The port each MAC is on (a MAC on none is its own owner, as the hub's shell says)."""

    def __init__(self) -> None:
        self.at = {mac(text): VM1 for text in MACS} | {mac(ALONE): VM2}

    def owner_of(self, guest_mac: bytes):
        return self.at.get(guest_mac, guest_mac)


def limits(table: MacTable, **caps) -> FlowLimits:
    return FlowLimits(owner_of=table.owner_of, **caps)


def datagram(src_mac: str, sport: int, dport: int = 5000, dst: str = REMOTE4):
    return guest_frame(IP(src=GUEST4, dst=dst) / UDP(sport=sport, dport=dport) / b"x",
                       src_mac=src_mac)


def test_sixteen_macs_on_one_port_share_one_guests_udp_flows_and_another_port_keeps_its_own():
    macs = MacTable()
    udp = UdpTable(nat_config(), limits(macs, flows_per_guest={IPPROTO_UDP: 8}))
    for n, src_mac in enumerate(MACS):
        udp.from_guest(datagram(src_mac, 40000 + n), now=1.0)
    assert len(udp.flows) == 8 and udp.drops["flow_limit"] == 8
    assert udp.limits.held(VM1)["flows"] == 8
    assert udp.from_guest(datagram(ALONE, 41000), now=1.0)  # the other port's first flow
    assert udp.limits.held(VM2)["flows"] == 1 and udp.limits.owners == 2


def test_a_flow_gives_its_place_back_to_the_port_that_admitted_it_after_its_mac_moved():
    macs = MacTable()
    udp = UdpTable(nat_config(), limits(macs), idle_seconds=10.0)
    moving = mac(MACS[0])
    udp.from_guest(datagram(MACS[0], 40000), now=1.0)
    macs.at[moving] = VM2  # the MAC moved: its old flow stays VM1's, its new one is VM2's
    udp.from_guest(datagram(MACS[0], 40001), now=2.0)
    assert udp.limits.held(VM1)["flows"] == 1 and udp.limits.held(VM2)["flows"] == 1
    del macs.at[moving]  # aged out of the table: a new flow is the MAC's own
    udp.from_guest(datagram(MACS[0], 40002), now=3.0)
    assert udp.limits.held(moving)["flows"] == 1
    udp.tick(20.0)
    assert not udp.flows and udp.limits.total == 0 and udp.limits.owners == 0


def syn(table: TcpTable, src_mac: str, sport: int, flags="S", seq=1000, ack=0, now=1.0):
    frame = guest_frame(IP(src=GUEST4, dst=REMOTE4) / TCP(
        sport=sport, dport=80, flags=flags, seq=seq, ack=ack, window=65535), src_mac=src_mac)
    return table.guest_segment(read_guest_packet(frame, mac(GW_MAC)), 0, now)


def refusals(tcp: TcpTable, macs: list[str], first_port: int) -> list[str]:
    """SYNs from each of `macs`: why each refused one was refused."""
    refused = []
    for n, src_mac in enumerate(macs):
        try:
            syn(tcp, src_mac, first_port + n)
        except Refused as error:
            refused.append(error.reason)
    return refused


def test_one_ports_macs_share_its_half_open_connections_and_tcp_flows():
    macs = MacTable()
    tcp = TcpTable(nat_config(), limits(macs, half_open_per_guest=4,
                                        flows_per_guest={IPPROTO_TCP: 8}))
    assert refusals(tcp, MACS[:8], 40000) == ["half_open_limit"] * 4
    assert tcp.limits.held(VM1) == {"flows": 4, "half_open": 4, "buffered": 0}
    syn(tcp, ALONE, 41000)  # the other port still connects
    assert tcp.limits.held(VM2) == {"flows": 1, "half_open": 1, "buffered": 0}
    for n, src_mac in enumerate(MACS[:4]):  # VM1's four come up: half-open places free
        key = FlowKey(IPPROTO_TCP, packed(GUEST4), 40000 + n, packed(REMOTE4), 80)
        [synack] = [Ether(bytes(item.data))[TCP] for item in tcp.on_host(key, Connected(), 1.1)
                    if not isinstance(item, HostCall)]
        syn(tcp, src_mac, 40000 + n, flags="A", seq=1001, ack=synack.seq + 1, now=1.2)
    assert tcp.limits.held(VM1) == {"flows": 4, "half_open": 0, "buffered": 0}
    assert refusals(tcp, MACS[8:], 40100) == ["flow_limit"] * 4  # its 8 flows, whoever's


def established(tcp: TcpTable, src_mac: str, sport: int) -> FlowKey:
    key = FlowKey(IPPROTO_TCP, packed(GUEST4), sport, packed(REMOTE4), 80)
    syn(tcp, src_mac, sport)
    [synack] = [Ether(bytes(item.data))[TCP] for item in tcp.on_host(key, Connected(), 1.1)
                if not isinstance(item, HostCall)]
    syn(tcp, src_mac, sport, flags="A", seq=1001, ack=synack.seq + 1, now=1.2)
    return key


def test_bytes_one_mac_holds_take_the_room_of_the_other_macs_on_its_port_not_of_other_ports():
    macs = MacTable()
    tcp = TcpTable(nat_config(), limits(macs, buffered_per_guest=100_000))
    first = established(tcp, MACS[0], 40000)
    second = established(tcp, MACS[1], 40001)
    elsewhere = established(tcp, ALONE, 40002)
    tcp.on_host(first, Received(bytes(100_000)), 1.3)  # held until the guest acknowledges
    assert tcp.limits.held(VM1)["buffered"] == 100_000
    assert tcp.read_budget(second) == 0 and tcp.guest_limited(second)
    assert tcp.read_budget(elsewhere) > 0 and not tcp.guest_limited(elsewhere)
    macs.at[mac(MACS[0])] = VM2  # moved: its flow's bytes stay VM1's until it ends
    syn(tcp, MACS[0], 40000, flags="R", seq=1001, now=1.4)
    assert tcp.limits.held(VM1)["buffered"] == 0 and VM1 in tcp.credited
    assert tcp.limits.held(VM2)["buffered"] == 0 and tcp.read_budget(second) > 0


def dns_query(src_mac: str, qid: int):
    return guest_frame(IP(src=GUEST4, dst=GW4) / UDP(sport=33333, dport=53)
                       / DNS(id=qid, rd=1, qd=DNSQR(qname="example.org")), src_mac=src_mac)


def test_dns_queries_in_flight_are_capped_per_port():
    macs = MacTable()
    ids = itertools.count(0x1000)
    dns = DnsForwarder(nat_config(), [ipaddress.ip_address("127.0.0.53")],
                       random_id=lambda: next(ids), owner_of=macs.owner_of)
    udp = UdpTable(dns.config, limits(macs), dns=dns)
    sent = [udp.from_guest(dns_query(MACS[n % 16], n), now=1.0)
            for n in range(MAX_PENDING_PER_GUEST + 8)]
    assert sum(map(len, sent)) == MAX_PENDING_PER_GUEST  # 2 of each of its 16 MACs
    assert udp.drops["pending_limit"] == 8 and dns.per_owner == {VM1: MAX_PENDING_PER_GUEST}
    assert udp.from_guest(dns_query(ALONE, 1), now=1.0)  # the other port asks
    macs.at[mac(MACS[0])] = VM2
    dns.tick(100.0)  # every query times out: each place goes back to its own port
    dns.tick(200.0)
    assert not dns.pending and not dns.per_owner


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_a_forwarded_flow_counts_against_the_port_the_guests_mac_is_on_when_it_opens(protocol):
    # Forwarded flows are admitted while the guest holds less than half its cap: the guest
    # is the port, so its other MACs' flows count toward that half too.
    macs = MacTable()
    caps = {IPPROTO_TCP: 4, IPPROTO_UDP: 4}
    shared = limits(macs, flows_per_guest=caps)
    udp = UdpTable(nat_config(), shared)
    target = mac(MACS[0])
    if protocol == "tcp":
        tcp = TcpTable(nat_config(), shared)
        for n in (1, 2):
            syn(tcp, MACS[n], 40000 + n)  # two of VM1's other MACs: half its cap

        def open_forward():
            try:
                tcp.open_forward(target, packed(GUEST4), 22, now=1.0)
            except Refused:
                return False
            return True
    else:
        forwards = UdpForwards(nat_config(), shared, [(packed(GUEST4), 53)],
                               lambda key: key in udp.flows)
        for n in (1, 2):
            udp.from_guest(datagram(MACS[n], 40000 + n), now=1.0)
        clients = (("198.51.100.9", port) for port in itertools.count(5000))

        def open_forward():
            return forwards.from_client(0, next(clients), b"q", target, 1.0) is not None
    assert not open_forward()  # VM1 holds half its cap already
    macs.at[target] = VM2  # the guest's MAC is on another port now: that port's share
    assert open_forward() and open_forward() and not open_forward()
    proto = IPPROTO_TCP if protocol == "tcp" else IPPROTO_UDP
    assert shared.by_owner()[VM2]["flows"] == {proto: 2}
    assert shared.by_owner()[VM1]["flows"] == {proto: 2}


def test_status_names_each_ports_holdings_and_counts_a_mac_on_no_port_by_itself():
    first, second = Port("vm.sock"), Port("vm.sock")  # a port made anew under its old name
    at = {mac(MACS[0]): first, mac(MACS[1]): second}
    shell = NatShell(nat_config(), lambda frames: None, upstreams=[], port_of=at.get)
    for src_mac in (MACS[0], MACS[1], ALONE):
        owner = shell.limits.owner_of(mac(src_mac))
        assert shell.limits.admit(owner, IPPROTO_UDP)
    ports = shell.status()["ports"]
    assert ports["vm.sock"]["flows"] == {"udp": 1} and ports["vm.sock#2"]["flows"] == {"udp": 1}
    assert ports[ALONE] == {"flows": {"udp": 1}, "half_open": 0, "buffered": 0,
                            "dns_pending": 0, "lingering": 0, "macs": {}}


def test_icmp_errors_to_one_ports_macs_share_its_rate_another_port_has_its_own():
    reporter = ErrorReporter(nat_config())
    key = FlowKey(IPPROTO_UDP, packed(GUEST4), 40000, packed(REMOTE4), 5000)
    unreachable = HostError(3, 3, 0, packed(REMOTE4))
    sent = [reporter.error_frame(key, mac(MACS[n % 16]), unreachable, b"", 5.0, VM1)
            for n in range(int(ERRORS_BURST) + 5)]
    assert sum(frame is not None for frame in sent) == ERRORS_BURST
    assert reporter.drops["error_rate"] == 5 and list(reporter.buckets) == [VM1]
    assert reporter.error_frame(key, mac(ALONE), unreachable, b"", 5.0, VM2) is not None
