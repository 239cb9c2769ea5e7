"""The switch's port policies, frame by frame, with frames built by scapy: MAC and IP
anti-spoofing, MAC limit, DHCP/RA guards, the flood token bucket, and trusted ports."""

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import DHCP6_Advertise
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether

from netstack.frame import Frame
from netstack.policy import PortPolicy
from netstack.port import Port
from netstack.switch import Switch

MAC_A, MAC_B, MAC_C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
BCAST = "ff:ff:ff:ff:ff:ff"


class Recorder(Port):
    def __init__(self, name, policy=None):
        super().__init__(name, policy=policy)
        self.got = []

    def deliver(self, frames):
        self.got.extend(bytes(f.data) for f in frames)


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def net():
    clock = Clock()
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
    a.policy.flood_rate, a.policy.flood_burst, a.policy.tokens = 10.0, 5.0, 5.0
    a.policy.refilled = clock.now
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
