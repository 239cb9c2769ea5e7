"""The NAT's UDP flow table against scapy-built guest datagrams: the host-socket actions it
asks for, the frames it sends back (read by scapy, checksums recomputed), its caps, idle
expiry on an injected clock, denied destinations, and hostile bytes that never raise."""

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from netstack.frame import GSO_UDP_L4, HDR_F_NEEDS_CSUM, Frame, OffloadInfo
from netstack.nat.limits import FlowKey, FlowLimits
from netstack.nat.udp import UDP_IDLE_SECONDS, CloseSocket, OpenSocket, SendDatagram, UdpTable
from netstack.wire import IPPROTO_UDP
from netstack.wire.ipv4 import LOOPBACK
from netstack.wire.ipv6 import LOOPBACK as LOOPBACK6
from tests.support.nat import (
    GUEST4,
    GUEST6,
    GUEST_MAC,
    GW4,
    GW6,
    GW_MAC,
    OTHER_MAC,
    REMOTE4,
    REMOTE6,
    checksums_valid,
    guest_frame,
    mac,
    nat_config,
    packed,
)

KEY4 = FlowKey(IPPROTO_UDP, packed(GUEST4), 40000, packed(REMOTE4), 5000)
KEY6 = FlowKey(IPPROTO_UDP, packed(GUEST6), 40000, packed(REMOTE6), 5000)


def table(**changes) -> UdpTable:
    limits = changes.pop("limits", None) or FlowLimits()
    return UdpTable(nat_config(**changes), limits)


def datagram4(payload=b"hello", dst=REMOTE4, sport=40000, dport=5000, ttl=64, **ip):
    return guest_frame(IP(src=GUEST4, dst=dst, ttl=ttl, **ip) / UDP(sport=sport, dport=dport)
                       / Raw(payload))


def datagram6(payload=b"hello", dst=REMOTE6, sport=40000, dport=5000):
    return guest_frame(IPv6(src=GUEST6, dst=dst, hlim=64) / UDP(sport=sport, dport=dport)
                       / Raw(payload))


def test_first_datagram_opens_a_connected_socket_and_sends_the_payload():
    udp = table()
    actions = udp.from_guest(datagram4(b"hello"), now=10.0)
    assert actions == [OpenSocket(KEY4, packed(REMOTE4), 5000),
                       SendDatagram(KEY4, b"hello", 63)]
    assert udp.from_guest(datagram4(b"again"), now=11.0) == [SendDatagram(KEY4, b"again", 63)]
    assert udp.limits.held(mac(GUEST_MAC))["flows"] == 1


def test_ipv6_datagram_opens_its_flow():
    udp = table()
    assert udp.from_guest(datagram6(b"six"), now=1.0) == [
        OpenSocket(KEY6, packed(REMOTE6), 5000), SendDatagram(KEY6, b"six", 63)]


def test_host_datagram_reaches_the_guest_from_the_remote_with_right_checksums():
    udp = table()
    udp.from_guest(datagram4(), now=1.0)
    frame = udp.from_host(KEY4, b"answer", now=2.0)
    packet = Ether(bytes(frame.data))
    assert packet.src == GW_MAC and packet.dst == GUEST_MAC
    assert (packet[IP].src, packet[IP].dst) == (REMOTE4, GUEST4)
    assert (packet[UDP].sport, packet[UDP].dport) == (5000, 40000)
    assert bytes(packet[UDP].payload) == b"answer"
    assert checksums_valid(frame)


def test_host_datagram_over_ipv6_reaches_the_guest_with_right_checksums():
    udp = table()
    udp.from_guest(datagram6(), now=1.0)
    frame = udp.from_host(KEY6, b"six back", now=2.0)
    packet = Ether(bytes(frame.data))
    assert (packet[IPv6].src, packet[IPv6].dst) == (REMOTE6, GUEST6)
    assert bytes(packet[UDP].payload) == b"six back"
    assert checksums_valid(frame)


def test_host_datagram_for_an_unknown_flow_is_counted_not_sent():
    udp = table()
    assert udp.from_host(KEY4, b"late", now=1.0) is None
    assert udp.drops["no_flow"] == 1


def test_host_datagram_longer_than_the_guest_mtu_is_dropped_and_counted():
    udp = table(mtu=1280)
    udp.from_guest(datagram4(), now=1.0)
    assert udp.from_host(KEY4, bytes(1280 - 28), now=2.0) is not None
    assert udp.from_host(KEY4, bytes(1280 - 27), now=2.0) is None
    assert udp.drops["too_big"] == 1


def test_wrong_udp_checksum_is_dropped_and_counted():
    frame = bytearray(datagram4(b"payload").data)
    frame[-1] ^= 0xFF
    udp = table()
    assert udp.from_guest(Frame(bytes(frame)), now=1.0) == []
    assert udp.drops["udp_checksum"] == 1 and not udp.flows


def test_partial_checksum_under_needs_csum_is_accepted():
    plain = Ether(bytes(datagram4(b"offloaded").data))
    plain[UDP].chksum = 0x1234  # what a guest leaves there: the pseudo-header sum, not ours
    offload = OffloadInfo(HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    actions = table().from_guest(Frame(bytes(plain), offload), now=1.0)
    assert actions[-1] == SendDatagram(KEY4, b"offloaded", 63)


def test_zero_checksum_is_no_checksum_over_ipv4_but_refused_over_ipv6():
    four = Ether(bytes(datagram4().data))
    four[UDP].chksum = 0
    six = Ether(bytes(datagram6().data))
    six[UDP].chksum = 0
    udp = table()
    assert len(udp.from_guest(Frame(bytes(four)), now=1.0)) == 2
    assert udp.from_guest(Frame(bytes(six)), now=1.0) == []
    assert udp.drops["udp_checksum"] == 1


def test_denied_destinations_are_refused_and_counted():
    udp = table()
    for dst in ("127.0.0.1", "0.0.0.0", "169.254.169.254", "224.0.0.251", "255.255.255.255",
                "192.0.2.9"):  # the last: the operator's --nat-deny
        assert udp.from_guest(datagram4(dst=dst), now=1.0) == [], dst
    for dst in ("::1", "::ffff:127.0.0.1", "fe80::1", "ff02::fb"):
        assert udp.from_guest(datagram6(dst=dst), now=1.0) == [], dst
    assert udp.drops["denied"] == 10 and not udp.flows


def test_gateway_address_is_refused_without_map_host_loopback():
    udp = table()
    assert udp.from_guest(datagram4(dst=GW4, dport=8080), now=1.0) == []
    assert udp.from_guest(datagram6(dst=GW6, dport=8080), now=1.0) == []
    assert udp.drops["gateway"] == 2


def test_gateway_address_reaches_the_hub_loopback_with_map_host_loopback():
    udp = table(map_host_loopback=True)
    open_socket, send = udp.from_guest(datagram4(dst=GW4, dport=8080), now=1.0)
    assert open_socket.host_ip == LOOPBACK and open_socket.host_port == 8080
    assert open_socket.key.remote_ip == packed(GW4)  # the guest still sees the gateway
    frame = udp.from_host(open_socket.key, b"from loopback", now=2.0)
    assert Ether(bytes(frame.data))[IP].src == GW4
    open_socket, _ = udp.from_guest(datagram6(dst=GW6, dport=8080), now=1.0)
    assert open_socket.host_ip == LOOPBACK6 and open_socket.key.remote_ip == packed(GW6)


def test_flows_per_guest_are_capped_and_refusals_counted():
    limits = FlowLimits(flows_per_guest={IPPROTO_UDP: 3})
    udp = table(limits=limits)
    for port in range(3):
        assert len(udp.from_guest(datagram4(sport=1000 + port), now=1.0)) == 2
    assert udp.from_guest(datagram4(sport=2000), now=1.0) == []
    assert udp.drops["flow_limit"] == 1 and limits.refusals["flow_limit"] == 1
    other = guest_frame(IP(src="10.77.0.11", dst=REMOTE4) / UDP(sport=1, dport=2),
                        src_mac=OTHER_MAC)
    assert len(udp.from_guest(other, now=1.0)) == 2  # another guest has its own cap


def test_idle_flows_expire_on_tick_and_free_their_share():
    limits = FlowLimits(flows_per_guest={IPPROTO_UDP: 1})
    udp = table(limits=limits)
    udp.from_guest(datagram4(), now=100.0)
    assert udp.next_deadline() == 100.0 + UDP_IDLE_SECONDS
    assert udp.tick(100.0 + UDP_IDLE_SECONDS - 1) == []
    udp.from_host(KEY4, b"keeps it alive", now=150.0)
    assert udp.tick(100.0 + UDP_IDLE_SECONDS + 1) == []
    assert udp.tick(150.0 + UDP_IDLE_SECONDS) == [CloseSocket(KEY4)]
    assert not udp.flows and limits.total == 0 and limits.owners == 0
    assert len(udp.from_guest(datagram4(sport=1), now=400.0)) == 2


def test_open_failure_forgets_the_flow_and_its_share():
    udp = table()
    udp.from_guest(datagram4(), now=1.0)
    udp.open_failed(KEY4, "enetunreach")
    assert not udp.flows and udp.limits.total == 0 and udp.drops["open_enetunreach"] == 1


def test_frames_the_table_does_not_carry_are_counted_by_reason():
    udp = table()
    cases = {
        "not_routed": Frame(bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                                  / IP(src=GUEST4, dst=REMOTE4) / UDP())),
        "vlan": Frame(bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / Dot1Q(vlan=5)
                            / IP(src=GUEST4, dst=REMOTE4) / UDP())),
        "fragment": datagram4(flags="MF"),
        "ttl_expired": datagram4(ttl=1),
        "port_zero": datagram4(sport=0),
        "bad_source": guest_frame(IP(src="0.0.0.0", dst=REMOTE4) / UDP(sport=68, dport=67)),
        "gso": Frame(datagram4().data, OffloadInfo(0, GSO_UDP_L4, 42, 1000, 34, 6)),
        "not_udp": guest_frame(IP(src=GUEST4, dst=REMOTE4, proto=6) / Raw(bytes(20))),
    }
    cases["fragment6"] = guest_frame(IPv6(src=GUEST6, dst=REMOTE6) / IPv6ExtHdrFragment(m=1)
                                     / UDP() / Raw(b"x"))
    for reason, frame in cases.items():
        assert udp.from_guest(frame, now=1.0) == [], reason
        assert udp.drops[reason.rstrip("6")] >= 1, reason
    assert not udp.flows


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2), st.integers(0, 0xFF))
def test_arbitrary_bytes_as_a_guest_frame_never_raise(tail, kind, flags):
    heads = [b"", bytes(Ether(src=GUEST_MAC, dst=GW_MAC, type=0x0800)),
             bytes(Ether(src=GUEST_MAC, dst=GW_MAC, type=0x86DD))]
    udp = table()
    actions = udp.from_guest(Frame(heads[kind] + tail, OffloadInfo(flags)), now=1.0)
    assert bool(actions) != (sum(udp.drops.values()) == 1)  # carried, or one drop counted


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 65535), st.binary(max_size=1600)), max_size=40))
def test_host_datagrams_of_any_size_never_raise_and_flows_stay_bounded(datagrams):
    limits = FlowLimits(flows_per_guest={IPPROTO_UDP: 8})
    udp = table(limits=limits, mtu=1500)
    for port, payload in datagrams:
        udp.from_guest(datagram4(sport=port), now=1.0)
        frame = udp.from_host(KEY4._replace(guest_port=port), payload, now=2.0)
        assert frame is None or len(frame.data) <= 1514
    assert len(udp.flows) <= 8
