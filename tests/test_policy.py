"""The switch's port policies, frame by frame, with frames built by scapy: MAC and IP
anti-spoofing (ND targets and link-layer options too), reservations and lease pinning, MAC
and claim limits, stacked VLAN tags, 802.3/LLC, DHCP/RA guards, the flood and service token
buckets, and trusted ports."""

from ipaddress import IPv6Address

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import DHCP6_Advertise
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, LLC, STP, Dot1AD, Dot1Q, Dot3, Ether

from netstack.frame import GSO_TCPV4, Frame
from netstack.policy import PortPolicy
from netstack.port import Port
from netstack.ratelimit import TokenBucket
from netstack.switch import Switch
from tests.support.clock import Clock

MAC_A, MAC_B, MAC_C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
BCAST = "ff:ff:ff:ff:ff:ff"


class Recorder(Port):
    def __init__(self, name, policy=None):
        super().__init__(name, policy=policy)
        self.got = []

    def deliver(self, frames):
        self.got.extend(bytes(f.data) for f in frames)


@pytest.fixture
def net():
    clock = Clock(1000.0)
    switch = Switch(clock=clock)
    a, b = Recorder("a", PortPolicy()), Recorder("b", PortPolicy())
    gateway = Recorder("gw")  # trusted
    for p in (a, b, gateway):
        switch.attach(p)
    return switch, a, b, gateway, clock


def send(switch, port, *packets):
    switch.forward(port, [Frame(bytes(p)) for p in packets])


def ipv4(src_mac, src_ip, dst_ip="10.0.0.254", dst_mac=BCAST):
    return Ether(src=src_mac, dst=dst_mac) / IP(src=src_ip, dst=dst_ip) / ICMP()


def test_a_mac_alive_on_one_port_cannot_be_used_on_another(net):
    switch, a, b, gw, clock = net
    send(switch, a, ipv4(MAC_A, "10.0.0.1"))
    send(switch, b, ipv4(MAC_A, "10.0.0.9"))
    assert b.counters.drops["mac_spoof"] == 1
    assert len(gw.got) == 1
    clock.now += switch.aging + 1  # once it has aged out, the MAC may move
    send(switch, b, ipv4(MAC_A, "10.0.0.9"))
    assert len(gw.got) == 2


def test_mac_limit_counts_new_macs_even_within_one_batch(net):
    switch, a, b, gw, clock = net
    a.policy.mac_limit = 3
    macs = [f"02:00:00:00:01:{i:02x}" for i in range(5)]
    send(switch, a, *[Ether(src=m, dst=BCAST) / ARP(hwsrc=m, psrc="0.0.0.0") for m in macs])
    assert a.counters.drops["mac_limit"] == 2
    assert len(gw.got) == 3


def test_ip_source_is_bound_to_the_first_port_that_uses_it(net):
    switch, a, b, gw, clock = net
    send(switch, a, ipv4(MAC_A, "10.0.0.1"))
    send(switch, b, ipv4(MAC_B, "10.0.0.1"))
    assert b.counters.drops["ip_spoof"] == 1
    send(switch, b, Ether(src=MAC_B, dst=BCAST) / ARP(hwsrc=MAC_B, psrc="10.0.0.1"))
    assert b.counters.drops["ip_spoof"] == 2
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / IPv6(src="fd00::1", dst="ff02::1")
         / ICMPv6EchoRequest())
    send(switch, b, Ether(src=MAC_B, dst=BCAST) / IPv6(src="fd00::1", dst="ff02::1")
         / ICMPv6EchoRequest())
    assert b.counters.drops["ip_spoof"] == 3
    assert len(gw.got) == 2


def test_a_leased_address_belongs_to_its_port_and_never_ages(net):
    switch, a, b, gw, clock = net
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_A, psrc="0.0.0.0"))
    switch.bind_lease(bytes([10, 0, 0, 5]), bytes.fromhex(MAC_A.replace(":", "")))
    clock.now += 10 * switch.aging
    send(switch, b, ipv4(MAC_B, "10.0.0.5"))
    assert b.counters.drops["ip_spoof"] == 1
    switch.unbind_lease(bytes([10, 0, 0, 5]))
    send(switch, b, ipv4(MAC_B, "10.0.0.5"))
    assert b.counters.drops["ip_spoof"] == 1


def test_arp_sender_must_match_the_ethernet_source(net):
    switch, a, b, gw, clock = net
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_C, psrc="10.0.0.1"))
    assert a.counters.drops["arp_spoof"] == 1 and not gw.got


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (Ether(src=MAC_A, dst=BCAST) / IP(src="10.0.0.254", dst="255.255.255.255")
         / UDP(sport=67, dport=68) / BOOTP() / DHCP(options=[("message-type", "offer"), "end"]),
         "dhcp_guard"),
        (Ether(src=MAC_A, dst=BCAST) / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_RA(),
         "ra_guard"),
        (Ether(src=MAC_A, dst=BCAST) / IPv6(src="fe80::1", dst="ff02::1") / IPv6ExtHdrDestOpt()
         / ICMPv6ND_RA(), "ra_guard"),
        (Ether(src=MAC_A, dst=BCAST) / IPv6(src="fe80::1", dst="ff02::1")
         / IPv6ExtHdrFragment(offset=0, m=1) / ICMPv6ND_RA(), "ra_guard"),
        (Ether(src=MAC_A, dst=BCAST) / IPv6(src="fe80::1", dst="fe80::2") / ICMPv6ND_Redirect(),
         "ra_guard"),
        (Ether(src=MAC_A, dst=BCAST) / IPv6(src="fe80::1", dst="ff02::1:2")
         / UDP(sport=547, dport=546) / DHCP6_Advertise(), "dhcp_guard"),
        (Ether(src=MAC_A, dst=BCAST) / Dot1Q(vlan=5) / IP(src="10.0.0.254", dst="10.0.0.1")
         / UDP(sport=67, dport=68), "dhcp_guard"),
        (ipv4(MAC_A, "224.0.0.1"), "bad_source"),
        (ipv4(MAC_A, "0.0.0.0"), "bad_source"),
        (Ether(src=MAC_A, dst=BCAST) / IPv6(src="::", dst="ff02::1") / UDP(), "bad_source"),
        (Ether(src=MAC_A, dst=BCAST, type=0x0800) / b"\x45\x00", "malformed"),
        (Ether(src=MAC_A, dst=BCAST, type=0x86DD) / (b"\x60" * 10), "malformed"),
    ],
)
def test_guards_drop_what_only_the_hub_may_send(net, packet, reason):
    switch, a, b, gw, clock = net
    send(switch, a, packet)
    assert a.counters.drops == {reason: 1}
    assert not gw.got and not b.got


def test_address_acquisition_may_use_unspecified_sources(net):
    switch, a, b, gw, clock = net
    send(switch, a,
         Ether(src=MAC_A, dst=BCAST) / IP(src="0.0.0.0", dst="255.255.255.255")
         / UDP(sport=68, dport=67) / BOOTP() / DHCP(options=[("message-type", "discover"), "end"]),
         Ether(src=MAC_A, dst=BCAST) / IPv6(src="::", dst="ff02::1:ff00:1")
         / ICMPv6ND_NS(tgt="fd00::1"),
         Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_A, psrc="0.0.0.0", pdst="10.0.0.1"))
    assert not a.counters.drops and len(gw.got) == 3


def test_flood_token_bucket_limits_broadcasts_but_not_unicast(net):
    switch, a, b, gw, clock = net
    a.policy.flood = TokenBucket(rate=10.0, burst=5.0, now=clock.now)
    send(switch, b, ipv4(MAC_B, "10.0.0.2"))
    send(switch, a, *[ipv4(MAC_A, "10.0.0.1")] * 8)
    assert a.counters.drops["flood_rate"] == 3
    send(switch, a, *[ipv4(MAC_A, "10.0.0.1", dst_mac=MAC_B)] * 8)
    assert a.counters.drops["flood_rate"] == 3  # unicast is not limited
    clock.now += 0.5  # five tokens come back
    send(switch, a, *[ipv4(MAC_A, "10.0.0.1")] * 6)
    assert a.counters.drops["flood_rate"] == 4


def test_trusted_ports_are_not_policed(net):
    switch, a, b, gw, clock = net
    send(switch, gw, Ether(src=MAC_C, dst=BCAST) / IPv6(src="fe80::1", dst="ff02::1")
         / ICMPv6ND_RA())
    assert len(a.got) == 1 and not gw.counters.drops


def test_forgetting_a_port_frees_its_macs_and_addresses(net):
    switch, a, b, gw, clock = net
    send(switch, a, ipv4(MAC_A, "10.0.0.1"))
    switch.forget(a)
    send(switch, b, ipv4(MAC_A, "10.0.0.1"))
    assert not b.counters.drops


def test_a_lease_takes_an_address_from_a_guest_that_claimed_it_by_hand(net):
    switch, a, b, gw, clock = net
    send(switch, b, ipv4(MAC_B, "10.0.0.7"))  # b configured 10.0.0.7 by hand
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_A, psrc="0.0.0.0"))
    switch.bind_lease(bytes([10, 0, 0, 7]), bytes.fromhex(MAC_A.replace(":", "")))
    send(switch, b, ipv4(MAC_B, "10.0.0.7"))
    send(switch, a, ipv4(MAC_A, "10.0.0.7"))
    assert b.counters.drops["ip_spoof"] == 1 and not a.counters.drops


GW_MAC = "02:76:76:00:00:01"


def reserve_gateway(switch, gw):
    switch.reserve(gw, bytes.fromhex(GW_MAC.replace(":", "")),
                   [bytes([10, 0, 0, 254]), IPv6Address("fd00::fe").packed])


def ns(src_mac, src, target, options=()):
    packet = Ether(src=src_mac, dst="33:33:ff:00:00:01") / IPv6(src=src, dst="ff02::1:ff00:1") \
        / ICMPv6ND_NS(tgt=target)
    for option in options:
        packet = packet / option
    return packet


def na(src_mac, src, target, options=()):
    packet = Ether(src=src_mac, dst=BCAST) / IPv6(src=src, dst="ff02::1") \
        / ICMPv6ND_NA(tgt=target, R=0, S=0, O=1)
    for option in options:
        packet = packet / option
    return packet


def test_a_neighbour_advertisement_for_another_ports_address_is_dropped(net):
    switch, a, b, gw, clock = net
    reserve_gateway(switch, gw)
    send(switch, a, na(MAC_A, "fd00::1", "fd00::1"))  # a's own address: fine
    send(switch, b, na(MAC_B, "fd00::2", "fd00::1"))  # b says it has a's address
    send(switch, b, na(MAC_B, "fd00::2", "fd00::fe"))  # ... or the gateway's
    assert not a.counters.drops
    assert b.counters.drops == {"ip_spoof": 2}
    assert len(gw.got) == 1


def test_duplicate_address_detection_for_another_ports_address_is_dropped(net):
    switch, a, b, gw, clock = net
    send(switch, a, na(MAC_A, "fd00::1", "fd00::1"))
    send(switch, b, ns(MAC_B, "::", "fd00::1"))  # DAD probe for a's address
    assert b.counters.drops == {"ip_spoof": 1}
    send(switch, b, ns(MAC_B, "fd00::2", "fd00::1",  # an ordinary lookup of a's address
                       [ICMPv6NDOptSrcLLAddr(lladdr=MAC_B)]))
    send(switch, b, ns(MAC_B, "::", "fd00::3"))  # DAD for a free address
    assert b.counters.drops == {"ip_spoof": 1}


@pytest.mark.parametrize("packet", [
    ns(MAC_A, "fd00::1", "fd00::2", [ICMPv6NDOptSrcLLAddr(lladdr=MAC_C)]),
    na(MAC_A, "fd00::1", "fd00::1", [ICMPv6NDOptDstLLAddr(lladdr=MAC_C)]),
    na(MAC_A, "fd00::1", "fd00::1", [ICMPv6NDOptDstLLAddr(lladdr=MAC_A),
                                     ICMPv6NDOptDstLLAddr(lladdr=MAC_C)]),
], ids=["ns_source_option", "na_target_option", "second_option"])
def test_nd_link_layer_options_must_name_the_ethernet_source(net, packet):
    switch, a, b, gw, clock = net
    send(switch, a, packet)
    assert a.counters.drops == {"nd_spoof": 1} and not gw.got


@pytest.mark.parametrize("packet", [
    Ether(src=MAC_A, dst=BCAST) / IPv6(src="fd00::1", dst="ff02::1")
    / IPv6ExtHdrFragment(offset=0, m=1) / ICMPv6ND_NA(tgt="fd00::1"),
    Ether(src=MAC_A, dst=BCAST) / IPv6(src="fd00::1", dst="ff02::1")
    / ICMPv6ND_NA(tgt="fd00::1") / (b"\x02\x00" + bytes(6)),  # an option of length 0
    Ether(src=MAC_A, dst=BCAST) / IPv6(src="fd00::1", dst="ff02::1")
    / ICMPv6ND_NA(tgt="fd00::1") / (b"\x02\x02" + bytes(6)),  # running past the end
], ids=["fragmented", "zero_length_option", "option_past_the_end"])
def test_nd_messages_that_cannot_be_read_are_dropped(net, packet):
    switch, a, b, gw, clock = net
    send(switch, a, packet)
    assert a.counters.drops == {"malformed": 1} and not gw.got


def test_a_guest_cannot_claim_the_gateways_addresses(net):
    switch, a, b, gw, clock = net
    reserve_gateway(switch, gw)
    clock.now += 10 * switch.aging
    switch.expire(switch.clock())
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / ARP(op=2, hwsrc=MAC_A, psrc="10.0.0.254"),
         ipv4(MAC_A, "10.0.0.254"),
         Ether(src=MAC_A, dst=BCAST) / IPv6(src="fd00::fe", dst="ff02::1") / ICMPv6EchoRequest(),
         ipv4(GW_MAC, "10.0.0.1"))
    assert a.counters.drops == {"ip_spoof": 3, "mac_spoof": 1} and not gw.got
    switch.bind_lease(bytes([10, 0, 0, 254]), bytes.fromhex(MAC_A.replace(":", "")))
    send(switch, a, ipv4(MAC_A, "10.0.0.254"))
    assert a.counters.drops["ip_spoof"] == 4  # not even by a lease


def test_a_leased_mac_stays_pinned_to_its_port_while_the_lease_runs(net):
    switch, a, b, gw, clock = net
    mac_a = bytes.fromhex(MAC_A.replace(":", ""))
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_A, psrc="0.0.0.0"))
    switch.bind_lease(bytes([10, 0, 0, 5]), mac_a)
    clock.now += 10 * switch.aging  # a silent for much longer than the aging time
    switch.expire(switch.clock())
    send(switch, b, Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_A, psrc="0.0.0.0"))
    assert b.counters.drops == {"mac_spoof": 1}
    switch.unbind_lease(bytes([10, 0, 0, 5]))  # the lease ends: the MAC ages from now
    send(switch, b, Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_A, psrc="0.0.0.0"))
    assert b.counters.drops == {"mac_spoof": 2}
    clock.now += switch.aging + 1
    send(switch, b, Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_A, psrc="0.0.0.0"))
    assert b.counters.drops == {"mac_spoof": 2} and len(gw.got) == 2


def test_a_lease_moving_to_another_mac_unpins_the_old_one(net):
    switch, a, b, gw, clock = net
    mac_a, mac_c = (bytes.fromhex(m.replace(":", "")) for m in (MAC_A, MAC_C))
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_A, psrc="0.0.0.0"),
         Ether(src=MAC_C, dst=BCAST) / ARP(hwsrc=MAC_C, psrc="0.0.0.0"))
    switch.bind_lease(bytes([10, 0, 0, 5]), mac_a)
    switch.bind_lease(bytes([10, 0, 0, 5]), mac_c)
    clock.now += switch.aging + 1
    send(switch, b, Ether(src=MAC_A, dst=BCAST) / ARP(hwsrc=MAC_A, psrc="0.0.0.0"),
         Ether(src=MAC_C, dst=BCAST) / ARP(hwsrc=MAC_C, psrc="0.0.0.0"))
    assert b.counters.drops == {"mac_spoof": 1}  # only the MAC holding the lease is pinned


@pytest.mark.parametrize("tags", [
    Dot1AD(vlan=5) / Dot1Q(vlan=6),
    Dot1Q(vlan=5) / Dot1Q(vlan=6),
    Dot1Q(vlan=5, type=0x88A8) / Dot1Q(vlan=6),
    Dot1Q(vlan=5, type=0x9100) / Dot1Q(vlan=6),
], ids=["802.1ad", "double_802.1q", "802.1ad_inside", "9100_inside"])
def test_stacked_vlan_tags_are_dropped(net, tags):
    switch, a, b, gw, clock = net
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / tags / IP(src="10.0.0.254", dst="10.0.0.1")
         / UDP(sport=67, dport=68))
    assert a.counters.drops == {"vlan_stacked": 1} and not gw.got


def test_an_outer_9100_tag_is_dropped(net):
    switch, a, b, gw, clock = net
    send(switch, a, Ether(src=MAC_A, dst=BCAST, type=0x9100) / Dot1Q(vlan=6)
         / IP(src="10.0.0.254", dst="10.0.0.1"))
    assert a.counters.drops == {"vlan_stacked": 1} and not gw.got


def test_a_single_tag_is_policed_like_an_untagged_frame(net):
    switch, a, b, gw, clock = net
    send(switch, a, ipv4(MAC_A, "10.0.0.1"))
    send(switch, b, Ether(src=MAC_B, dst=BCAST) / Dot1Q(vlan=5) / IP(src="10.0.0.1")
         / ICMP())
    assert b.counters.drops == {"ip_spoof": 1}


def test_claims_per_port_are_bounded(net):
    switch, a, b, gw, clock = net
    limit = a.policy.claim_limit
    assert limit == 64
    sources = [f"10.1.{i // 256}.{i % 256}" for i in range(limit + 50)]
    send(switch, a, *[ipv4(MAC_A, source) for source in sources])
    assert a.counters.drops == {"claim_limit": 50}
    assert len(switch.addresses.owners) == limit == switch.addresses.counts[a]
    send(switch, a, ipv4(MAC_A, sources[0]))  # addresses it holds still work
    assert a.counters.drops == {"claim_limit": 50}
    clock.now += switch.aging + 1
    switch.expire(switch.clock())  # aged claims free the room
    send(switch, a, ipv4(MAC_A, sources[-1]))
    assert a.counters.drops == {"claim_limit": 50} and switch.addresses.counts[a] == 1


def test_a_session_sized_policy_gets_claims_in_proportion():
    assert PortPolicy(mac_limit=256).claim_limit == 1024
    assert PortPolicy(claim_limit=5).claim_limit == 5


def test_router_advertisements_behind_an_authentication_header_are_guarded(net):
    switch, a, b, gw, clock = net
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / IPv6(src="fe80::1", dst="ff02::1")
         / AH(nh=58, payloadlen=1) / ICMPv6ND_RA())
    assert a.counters.drops == {"ra_guard": 1} and not gw.got


def test_only_address_acquisition_may_use_the_unspecified_ipv6_source(net):
    switch, a, b, gw, clock = net
    send(switch, a, Ether(src=MAC_A, dst=BCAST) / IPv6(src="::", dst="ff02::1")
         / ICMPv6EchoRequest(),
         Ether(src=MAC_A, dst=BCAST) / IPv6(src="::", dst="ff02::1")
         / ICMPv6ND_NA(tgt="fd00::9"))
    assert a.counters.drops == {"bad_source": 2} and not gw.got


def test_unknown_unicast_takes_a_flood_token(net):
    switch, a, b, gw, clock = net
    a.policy.flood = TokenBucket(rate=10.0, burst=5.0, now=clock.now)
    send(switch, a, *[ipv4(MAC_A, "10.0.0.1", dst_mac=MAC_C)] * 8)  # MAC_C: nobody's yet
    assert a.counters.drops == {"flood_rate": 3} and len(b.got) == 5
    send(switch, gw, Ether(src=MAC_C, dst=BCAST))  # now C is known: no token needed
    send(switch, a, *[ipv4(MAC_A, "10.0.0.1", dst_mac=MAC_C)] * 8)
    assert a.counters.drops == {"flood_rate": 3} and len(gw.got) == 13


def test_a_flooded_gso_frame_costs_a_flood_token_per_segment(net):
    switch, a, b, gw, clock = net
    a.policy.flood = TokenBucket(rate=10.0, burst=100.0, now=clock.now)
    packet = Ether(src=MAC_A, dst=BCAST) / IP(src="10.0.0.1", dst="10.0.0.2") \
        / TCP(sport=1, dport=2, flags="A") / bytes(14480)  # 10 segments of 1448, or 11
    frame = Frame(bytes(packet), (0, GSO_TCPV4, 54, 1448, 0, 0))
    switch.forward(a, [frame] * 10)
    assert a.counters.drops == {"flood_rate": 1}


def test_frames_to_a_service_port_take_a_service_token(net):
    """The gateway answers each frame to its MAC on the hub's CPU: a port gets
    service_burst of them at once, then service_rate a second; other unicast, and trusted
    ports, are not limited."""
    switch, a, b, gw, clock = net
    service = Recorder("service")
    service.service = True
    switch.attach(service)
    switch.reserve(service, bytes.fromhex("020000000099"), [])
    a.policy.service = TokenBucket(rate=10.0, burst=5.0, now=clock.now)
    echo = ipv4(MAC_A, "10.0.0.1", dst_mac="02:00:00:00:00:99")
    send(switch, a, *[echo] * 8)
    assert a.counters.drops == {"service_rate": 3} and len(service.got) == 5
    send(switch, b, ipv4(MAC_B, "10.0.0.2", dst_mac=MAC_A))
    send(switch, a, *[ipv4(MAC_A, "10.0.0.1", dst_mac=MAC_B)] * 8)
    assert a.counters.drops == {"service_rate": 3} and len(b.got) == 8
    clock.now += 0.5  # five tokens come back
    send(switch, a, *[echo] * 6)
    assert a.counters.drops == {"service_rate": 4}
    send(switch, gw, *[Ether(src=MAC_C, dst="02:00:00:00:00:99")] * 20)
    assert not gw.counters.drops and len(service.got) == 30


def snap(dst: str, src: str, ethertype: int, l3) -> Frame:
    """RFC 1042: an 802.3 length, then LLC AA-AA-03 and a SNAP header naming the EtherType."""
    llc = b"\xaa\xaa\x03\x00\x00\x00" + ethertype.to_bytes(2, "big") + bytes(l3)
    return Frame(bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", ""))
                 + len(llc).to_bytes(2, "big") + llc)


def test_802_3_llc_frames_are_dropped_from_policed_ports(net):
    """SNAP-encapsulated IPv4 and ARP would skip every network-layer check (Windows reads
    them); LLC is nothing a guest needs on this segment."""
    switch, a, b, gw, clock = net
    switch.reserve(gw, bytes.fromhex("020000000099"), [bytes([10, 0, 0, 254])])
    frames = [
        snap(MAC_B, MAC_A, 0x0800, IP(src="10.0.0.254", dst="10.0.0.2") / UDP()),
        snap(MAC_B, MAC_A, 0x0806, ARP(op=2, hwsrc=MAC_A, psrc="10.0.0.254", pdst="10.0.0.2")),
        snap(BCAST, MAC_A, 0x0800, IP(src="10.0.0.254", dst="255.255.255.255")
             / UDP(sport=67, dport=68)),
        Frame(bytes(Dot3(src=MAC_A, dst="01:80:c2:00:00:00") / LLC() / STP())),
        Frame(bytes(Ether(src=MAC_A, dst=MAC_B, type=0x8100) / (b"\x00\x05\x00\x30" + bytes(48)))),
    ]
    switch.forward(a, frames)
    assert a.counters.drops == {"llc": 5} and not b.got and not gw.got
    switch.forward(gw, frames[2:3])  # trusted ports are not policed
    assert len(b.got) == 1


def test_a_vlan_tag_cut_short_is_malformed(net):
    switch, a, b, gw, clock = net
    send(switch, a, Ether(src=MAC_A, dst=BCAST, type=0x8100) / b"\x00\x05")
    assert a.counters.drops == {"malformed": 1} and not b.got
