"""The gateway port against scapy-built requests: ARP, ICMP echo, neighbour discovery, ICMPv6
echo and router advertisements; replies re-parsed by scapy with their checksums verified;
garbage dropped and counted, never raised."""

import ipaddress
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH, ESP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from netstack.frame import Frame
from netstack.gateway.port import GatewayConfig, GatewayPort
from netstack.neighbour import link_local_from_mac
from netstack.policy import DEFAULT_SERVICE_BURST, DEFAULT_SERVICE_RATE, PortPolicy
from netstack.port import OUTBOX_FRAMES, QueuedPort
from netstack.switch import Switch
from tests.support.clock import Clock

GW_MAC = "02:76:76:00:00:01"
GUEST = "52:54:00:00:00:01"
CONFIG = GatewayConfig(
    mac=bytes.fromhex(GW_MAC.replace(":", "")),
    ipv4=ipaddress.IPv4Interface("10.77.0.1/24"),
    ipv6_prefix=ipaddress.IPv6Network("fd77::/64"),
    mtu=1400,
)
LINK_LOCAL = str(link_local_from_mac(CONFIG.mac))


def gateway():
    return GatewayPort(CONFIG, clock=Clock(100.0))


def ask(gw, packet):
    gw.deliver([Frame(bytes(packet))])
    return [Ether(bytes(f.data)) for f in gw.take_outbox()]


def checksums_valid(packet) -> bool:
    """Rebuild with scapy's own checksums and compare."""
    rebuilt = packet.copy()
    for layer in (IP, ICMP, ICMPv6EchoReply, ICMPv6ND_NA, ICMPv6ND_RA):
        if layer in rebuilt:
            if layer in (IP, ICMP):
                del rebuilt[layer].chksum
            else:
                del rebuilt[layer].cksum
    return bytes(Ether(bytes(rebuilt))) == bytes(packet)


def test_arp_request_for_the_gateway_is_answered():
    (reply,) = ask(gateway(), Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff")
                   / ARP(op=1, hwsrc=GUEST, psrc="10.77.0.5", pdst="10.77.0.1"))
    assert reply[ARP].op == 2 and reply[ARP].hwsrc == GW_MAC and reply[ARP].psrc == "10.77.0.1"
    assert reply.dst == GUEST and reply[ARP].pdst == "10.77.0.5"


def test_arp_for_other_addresses_is_ignored():
    assert ask(gateway(), Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff")
               / ARP(op=1, hwsrc=GUEST, psrc="10.77.0.5", pdst="10.77.0.9")) == []


def test_icmp_echo_is_answered_with_the_same_payload():
    gw = gateway()
    (reply,) = ask(gw, Ether(src=GUEST, dst=GW_MAC) / IP(src="10.77.0.5", dst="10.77.0.1")
                   / ICMP(id=7, seq=3) / b"payload!")
    assert reply[IP].src == "10.77.0.1" and reply[IP].dst == "10.77.0.5"
    assert reply[ICMP].type == 0 and reply[ICMP].id == 7 and reply[ICMP].seq == 3
    assert bytes(reply[ICMP].payload) == b"payload!"
    assert checksums_valid(reply)
    assert gw.services["icmp_echo"] == 1


def test_icmp_with_a_bad_checksum_is_dropped_and_counted():
    gw = gateway()
    assert ask(gw, Ether(src=GUEST, dst=GW_MAC) / IP(src="10.77.0.5", dst="10.77.0.1")
               / ICMP(chksum=0x1234)) == []
    assert gw.counters.drops["bad_checksum"] == 1


def test_neighbour_solicitation_for_the_router_address():
    (reply,) = ask(gateway(), Ether(src=GUEST, dst="33:33:ff:00:00:01")
                   / IPv6(src="fd77::5", dst="ff02::1:ff00:1", hlim=255)
                   / ICMPv6ND_NS(tgt="fd77::1"))
    na = reply[ICMPv6ND_NA]
    assert na.tgt == "fd77::1" and na.R == 1 and na.S == 1 and na.O == 1
    assert reply[IPv6].dst == "fd77::5" and reply[IPv6].hlim == 255
    assert bytes(na.payload)[2:8] == CONFIG.mac  # target link-layer address option
    assert checksums_valid(reply)


def solicit_router(options=None, src="fd77::5", **icmp_fields):
    """A neighbour solicitation for the router address (scapy fills lengths and checksum,
    `options` raw bytes included)."""
    return (Ether(src=GUEST, dst="33:33:ff:00:00:01")
            / IPv6(src=src, dst="ff02::1:ff00:1", hlim=255)
            / ICMPv6ND_NS(tgt="fd77::1", **icmp_fields)
            / (Raw(options) if options is not None else ICMPv6NDOptSrcLLAddr(lladdr=GUEST)))


def test_a_solicitation_with_a_bad_icmpv6_checksum_is_dropped_and_a_good_one_answered():
    gw = gateway()
    good = solicit_router()
    right = ICMPv6ND_NS(bytes(good[ICMPv6ND_NS])).cksum
    assert ask(gw, solicit_router(cksum=right ^ 0x5555)) == []
    assert gw.counters.drops == {"bad_checksum": 1}
    (reply,) = ask(gw, good)
    assert reply[ICMPv6ND_NA].tgt == "fd77::1" and reply.dst == GUEST
    assert gw.services["neighbour_advertisement"] == 1


@pytest.mark.parametrize("packet", [
    solicit_router(b"\x01\x01" + bytes.fromhex(GUEST.replace(":", "")) + b"\x0e\x00" + bytes(6)),
    solicit_router(b"\x01\x01" + bytes.fromhex(GUEST.replace(":", "")) + b"\x0e\x02" + bytes(6)),
    solicit_router(b"\x01\x01" + bytes.fromhex("333300000001")),
    solicit_router(src="::"),
    solicit_router(code=1),
], ids=["zero_length_option", "option_past_the_end", "multicast_link_address",
        "dad_with_link_address", "nonzero_code"])
def test_solicitations_the_l3_host_refuses_the_gateway_refuses_too(packet):
    gw = gateway()
    assert ask(gw, packet) == []
    assert sum(gw.counters.drops.values()) == 1
    assert gw.services["neighbour_advertisement"] == 0


def test_arp_that_is_not_ethernet_ipv4_or_from_a_multicast_sender_is_malformed():
    gw = gateway()
    for arp in (ARP(op=1, hwtype=6, hwsrc=GUEST, psrc="10.77.0.5", pdst="10.77.0.1"),
                ARP(op=1, hwsrc="01:00:5e:00:00:01", psrc="10.77.0.5", pdst="10.77.0.1")):
        assert ask(gw, Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff") / arp) == []
    assert gw.counters.drops == {"malformed": 2}


def test_duplicate_address_detection_for_our_address_is_answered_to_all_nodes():
    (reply,) = ask(gateway(), Ether(src=GUEST, dst="33:33:ff:00:00:01")
                   / IPv6(src="::", dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt="fd77::1"))
    assert reply[IPv6].dst == "ff02::1" and reply[ICMPv6ND_NA].S == 0


def test_icmpv6_echo_to_link_local_and_router_address():
    for address in (LINK_LOCAL, "fd77::1"):
        (reply,) = ask(gateway(), Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst=address)
                       / ICMPv6EchoRequest(id=1, seq=2, data=b"hi"))
        assert reply[ICMPv6EchoReply].data == b"hi" and reply[IPv6].src == address
        assert checksums_valid(reply)


def test_router_solicitation_gets_an_advertisement_with_prefix_and_mtu():
    gw = gateway()
    (reply,) = ask(gw, Ether(src=GUEST, dst="33:33:00:00:00:02")
                   / IPv6(src="fe80::5054:ff:fe00:1", dst="ff02::2", hlim=255) / ICMPv6ND_RS())
    ra = reply[ICMPv6ND_RA]
    assert reply[IPv6].src == LINK_LOCAL and reply[IPv6].hlim == 255
    assert ra.routerlifetime > 0
    assert reply[ICMPv6NDOptPrefixInfo].prefix == "fd77::"
    assert reply[ICMPv6NDOptPrefixInfo].A == 1 and reply[ICMPv6NDOptPrefixInfo].L == 1
    assert reply[ICMPv6NDOptMTU].mtu == 1400
    assert checksums_valid(reply)
    # a second solicitation right away is rate limited
    assert ask(gw, Ether(src=GUEST, dst="33:33:00:00:00:02")
               / IPv6(src="fe80::5054:ff:fe00:1", dst="ff02::2", hlim=255) / ICMPv6ND_RS()) == []


def test_nd_messages_with_a_forwarded_hop_limit_are_refused():
    gw = gateway()
    assert ask(gw, Ether(src=GUEST, dst="33:33:00:00:00:02")
               / IPv6(src="fe80::5054:ff:fe00:1", dst="ff02::2", hlim=64) / ICMPv6ND_RS()) == []
    assert gw.counters.drops["nd_hop_limit"] == 1


def test_periodic_advertisements_come_quickly_first_then_slowly():
    gw = gateway()
    clock = gw.clock
    times = []
    while len(times) < 6:
        clock.now = gw.next_deadline()
        gw.tick(clock.now)
        if gw.take_outbox():
            times.append(clock.now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] <= 16 and max(gaps) >= 200


def test_timed_work_runs_at_the_time_passed_and_expires_leases_on_the_servers_clock():
    class RecordingDhcp:
        counters = {}

        def __init__(self):
            self.expired_at = []

        def clock(self):
            return 1_700_000_000.0  # the server's wall clock, not the gateway's

        def expire(self, now):
            self.expired_at.append(now)

    dhcp = RecordingDhcp()
    gw = GatewayPort(CONFIG, dhcp=dhcp, clock=Clock(0.0))
    for now in (100.0, 105.0, 109.9, 110.0):
        gw.tick(now)
    assert dhcp.expired_at == [1_700_000_000.0] * 2  # at 100 and, HOUSEKEEPING_SECONDS on, 110
    assert gw.next_deadline() <= 120.0


def test_frames_for_other_hosts_are_ignored():
    gw = gateway()
    assert ask(gw, Ether(src=GUEST, dst="52:54:00:00:00:99") / IP(src="10.77.0.5",
                                                                  dst="10.77.0.9") / ICMP()) == []
    assert not gw.counters.drops


def test_dhcp_frames_go_to_the_dhcp_service():
    class FakeDhcp:
        counters = {}

        def __init__(self):
            self.got = []

        def handle(self, frame):
            self.got.append(frame)
            return [b"reply-frame"]

        def expire(self, now):
            pass

    dhcp = FakeDhcp()
    gw = GatewayPort(CONFIG, dhcp=dhcp, clock=Clock(100.0))
    packet = Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255") \
        / UDP(sport=68, dport=67) / (b"x" * 10)
    gw.deliver([Frame(bytes(packet))])
    assert dhcp.got == [bytes(packet)]
    assert [bytes(f.data) for f in gw.take_outbox()] == [b"reply-frame"]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # caplog: cleared below
@given(st.binary(max_size=200), st.sampled_from([b"\x08\x00", b"\x08\x06", b"\x86\xdd"]))
def test_garbage_gets_no_reply_and_no_unexpected_error(caplog, payload, ethertype):
    """Random bytes after an ARP/IPv4/IPv6 header are found wanting by the parser: no reply,
    and never the catch-all that logs a traceback (which would mean an unchecked length)."""
    caplog.clear()
    gw = gateway()
    gw.deliver([Frame(CONFIG.mac + bytes.fromhex("525400000001") + ethertype + payload)])
    assert gw.take_outbox() == []
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def echo6(*extensions, dst="fd77::1"):
    packet = Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst=dst)
    for extension in extensions:
        packet = packet / extension
    return packet / ICMPv6EchoRequest(id=1, seq=2, data=b"hi")


@pytest.mark.parametrize("extension", [
    IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(), AH(nh=58, payloadlen=1),
    ESP(spi=1),
], ids=["destination_options", "hop_by_hop", "routing", "ah", "esp"])
def test_a_fragment_with_any_extension_header_behind_it_is_counted_not_answered(extension):
    """Fragment + destination options made dpkt raise AttributeError, which killed the hub."""
    gw = gateway()
    for offset in (0, 5):
        gw.deliver([Frame(bytes(echo6(IPv6ExtHdrFragment(offset=offset, m=1), extension)))])
    assert gw.take_outbox() == []
    assert gw.counters.drops == {"fragment": 2}


def test_echo_behind_a_sane_extension_header_chain_is_answered():
    (reply,) = ask(gateway(), echo6(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()))
    assert reply[ICMPv6EchoReply].data == b"hi" and checksums_valid(reply)


@pytest.mark.parametrize("raw", [
    # a destination options header running past the end of the payload
    bytes(Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst="fd77::1", nh=60, plen=8))
    + b"\x3a\x05" + bytes(6),
    # nine hop-by-hop headers
    bytes(Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst="fd77::1", nh=0, plen=80))
    + bytes(80),
    # two fragment headers
    bytes(echo6(IPv6ExtHdrFragment(), IPv6ExtHdrFragment())),
    # a payload length beyond the frame
    bytes(Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst="fd77::1", plen=500)
          / ICMPv6EchoRequest()),
], ids=["header_past_the_end", "nine_extension_headers", "two_fragment_headers",
        "payload_past_the_frame"])
def test_unwalkable_ipv6_headers_are_counted_malformed(raw):
    gw = gateway()
    gw.deliver([Frame(raw)])
    assert gw.take_outbox() == [] and gw.counters.drops == {"malformed": 1}


def test_icmpv6_with_a_bad_checksum_is_not_answered():
    gw = gateway()
    assert ask(gw, Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst="fd77::1")
               / ICMPv6EchoRequest(cksum=0x1234)) == []
    assert gw.counters.drops == {"bad_checksum": 1}


def test_ipv4_fragments_and_tagged_frames_are_not_answered():
    gw = gateway()
    assert ask(gw, Ether(src=GUEST, dst=GW_MAC) / IP(src="10.77.0.5", dst="10.77.0.1", flags="MF")
               / ICMP() / b"part") == []
    assert ask(gw, Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=3)
               / ARP(op=1, hwsrc=GUEST, psrc="10.77.0.5", pdst="10.77.0.1")) == []
    assert gw.counters.drops == {"fragment": 1}


def test_an_unexpected_exception_costs_one_frame_and_one_traceback(caplog):
    class BrokenDhcp:
        counters = {}

        def handle(self, frame):
            raise RuntimeError("a bug in a service")

        def expire(self, now):
            pass

    gw = GatewayPort(CONFIG, dhcp=BrokenDhcp(), clock=Clock(100.0))
    discover = Frame(bytes(Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff")
                           / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
                           / (b"x" * 10)))
    ping = Frame(bytes(echo6()))
    gw.deliver([discover, ping, discover, discover])
    assert gw.counters.drops == {"malformed": 3}
    assert len(gw.take_outbox()) == 1  # the ping in the same batch is answered
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "gateway" in tracebacks[0].getMessage()


def test_the_gateway_lists_its_addresses_for_the_switch_to_reserve():
    assert sorted(gateway().addresses) == sorted([
        ipaddress.ip_address("10.77.0.1").packed, ipaddress.ip_address("fd77::1").packed,
        ipaddress.ip_address(LINK_LOCAL).packed])


def test_replies_waiting_for_the_shell_are_bounded():
    gw = gateway()
    request = Frame(bytes(Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff")
                          / ARP(op=1, hwsrc=GUEST, psrc="10.77.0.5", pdst="10.77.0.1")))
    gw.deliver([request] * (OUTBOX_FRAMES + 10))
    assert len(gw.take_outbox()) == OUTBOX_FRAMES
    assert gw.counters.drops == {"outbox_full": 10}


def test_a_guest_pinging_the_gateway_flat_out_gets_its_service_rate_of_answers():
    """Unicast to the gateway takes no flood token, but the hub's CPU answers every frame: a
    policed port gets service_burst answers at once and service_rate a second, while a
    normal burst (a guest booting, a ping every second for a minute) is answered whole."""
    clock = Clock(100.0)
    switch = Switch(clock=clock)
    gw = GatewayPort(CONFIG, clock=clock)
    guest = QueuedPort("guest", policy=PortPolicy())
    switch.attach(gw)
    switch.attach(guest)
    switch.reserve(gw, gw.mac, gw.addresses)
    arp = Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=GUEST, psrc="10.77.0.5",
                                                         pdst="10.77.0.1")
    echo = Ether(src=GUEST, dst=GW_MAC) / IP(src="10.77.0.5", dst="10.77.0.1") / ICMP() \
        / bytes(1400)
    switch.forward(guest, [Frame(bytes(arp))] + [Frame(bytes(echo))] * 60)
    assert len(gw.take_outbox()) == 61 and not guest.counters.drops
    clock.now += 60
    switch.forward(guest, [Frame(bytes(echo))] * 5000)
    assert len(gw.take_outbox()) == DEFAULT_SERVICE_BURST
    clock.now += 1
    switch.forward(guest, [Frame(bytes(echo))] * 5000)
    assert len(gw.take_outbox()) == DEFAULT_SERVICE_RATE
    assert guest.counters.drops == {"service_rate": 10000 - DEFAULT_SERVICE_BURST
                                    - DEFAULT_SERVICE_RATE}
