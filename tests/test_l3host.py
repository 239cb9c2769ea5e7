"""L3Host, a TUN host's link layer on the segment: next hops, ARP and neighbour discovery both
ways (also against the hub's own gateway port), SLAAC from the hub's router advertisements,
offload metadata across the Ethernet header, bounded queues, and garbage never raising.
Packets are built with scapy; every frame L3Host builds is re-parsed by scapy with its
checksums verified."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

import pytest
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import ARP, Ether

from netstack.frame import GSO_TCPV4, HDR_F_NEEDS_CSUM, PLAIN, Frame, OffloadInfo
from netstack.gateway.port import GatewayConfig, GatewayPort
from netstack.gateway.ra import RouterAdvertiser
from netstack.host.l3host import L3Host
from netstack.host.neighbour_cache import (
    MAX_QUEUED,
    MAX_QUEUED_PER_DESTINATION,
    REACHABLE_SECONDS,
)
from netstack.neighbour import link_local_from_mac
from tests.support.clock import Clock
from tests.support.fuzzing import bounded_given
from tests.support.hostile_frames import fuzz_settings, garbled

HOST_MAC = bytes.fromhex("02686f737401")
GW_MAC = bytes.fromhex("027676000001")
PEER_MAC = bytes.fromhex("525400000002")
HOST, GATEWAY, PEER = "10.77.0.2", "10.77.0.1", "10.77.0.5"
PREFIX = IPv6Network("fd77::/64")
HOST_LL = str(link_local_from_mac(HOST_MAC))
GW_LL = str(link_local_from_mac(GW_MAC))
PEER_LL = str(link_local_from_mac(PEER_MAC))
SLAAC_ADDRESS = IPv6Address(PREFIX.network_address.packed[:8] + link_local_from_mac(HOST_MAC)
                            .packed[8:])


def hexmac(mac: bytes) -> str:
    return mac.hex(":")


def make_host(clock: Clock | None = None, **overrides) -> L3Host:
    settings_ = dict(ipv4=IPv4Interface(f"{HOST}/24"), gateway4=IPv4Address(GATEWAY))
    settings_.update(overrides)
    return L3Host(HOST_MAC, clock=clock or Clock(100.0), **settings_)


def parse(frame: Frame) -> Ether:
    """A frame L3Host built, as scapy sees it, with IP/ICMPv6 checksums verified."""
    packet = Ether(bytes(frame.data))
    assert packet.src == hexmac(HOST_MAC)
    rebuilt = packet.copy()
    for layer, field in ((IP, "chksum"), (ICMPv6ND_NS, "cksum"), (ICMPv6ND_NA, "cksum"),
                         (UDP, "chksum"), (TCP, "chksum")):
        if layer in rebuilt:
            delattr(rebuilt[layer], field)
    rebuilt = Ether(bytes(rebuilt))
    for layer, field in ((IP, "chksum"), (ICMPv6ND_NS, "cksum"), (ICMPv6ND_NA, "cksum")):
        if layer in packet:
            assert getattr(rebuilt[layer], field) == getattr(packet[layer], field), layer
    return packet


def udp4(dst: str, payload: bytes = b"hello") -> bytes:
    return bytes(IP(src=HOST, dst=dst) / UDP(sport=1234, dport=5678) / payload)


def udp6(dst: str, src: str = "fd77::2", payload: bytes = b"hello") -> bytes:
    return bytes(IPv6(src=src, dst=dst) / UDP(sport=1234, dport=5678) / payload)


def arp_reply(sender_ip: str, sender_mac: bytes, target_ip: str = HOST) -> Frame:
    return Frame(bytes(Ether(src=hexmac(sender_mac), dst=hexmac(HOST_MAC))
                       / ARP(op=2, hwsrc=hexmac(sender_mac), psrc=sender_ip,
                             hwdst=hexmac(HOST_MAC), pdst=target_ip)))


def from_segment(host: L3Host, packet) -> tuple[list, list[Ether]]:
    packets, frames = host.from_segment(Frame(bytes(packet)))
    return packets, [parse(f) for f in frames]


# --- IPv4: next hops and ARP -------------------------------------------------------------------


def test_a_packet_waits_for_arp_and_leaves_as_a_frame_to_the_neighbours_mac():
    host = make_host()
    first, second = udp4(PEER, b"one"), udp4(PEER, b"two")
    (request,) = [parse(f) for f in host.from_host(first)]
    assert request.dst == "ff:ff:ff:ff:ff:ff" and request[ARP].op == 1
    assert request[ARP].pdst == PEER and request[ARP].psrc == HOST
    assert request[ARP].hwsrc == hexmac(HOST_MAC)
    assert host.from_host(second) == []  # queued, and no second request within a second
    packets, frames = host.from_segment(arp_reply(PEER, PEER_MAC))
    assert packets == []
    assert [bytes(f.data) for f in frames] == [
        PEER_MAC + HOST_MAC + b"\x08\x00" + first,
        PEER_MAC + HOST_MAC + b"\x08\x00" + second,
    ]
    assert host.neighbour(IPv4Address(PEER)) == PEER_MAC
    (frame,) = host.from_host(first)  # now at once
    assert parse(frame).dst == hexmac(PEER_MAC) and parse(frame)[UDP].load == b"one"
    assert host.counters["released"] == 2


def test_off_link_destinations_go_to_the_gateway_as_the_hub_answers_for_it():
    host = make_host()
    gateway = GatewayPort(GatewayConfig(mac=GW_MAC, ipv4=IPv4Interface(f"{GATEWAY}/24")),
                          clock=Clock(100.0))
    (request,) = host.from_host(udp4("8.8.8.8"))
    assert parse(request)[ARP].pdst == GATEWAY
    gateway.deliver([request])
    (answer,) = gateway.take_outbox()
    packets, frames = host.from_segment(answer)
    (frame,) = frames
    packet = parse(frame)
    assert packet.dst == hexmac(GW_MAC) and packet[IP].dst == "8.8.8.8"


def test_off_link_without_a_gateway_and_unicast_without_an_address_are_dropped():
    host = make_host(gateway4=None)
    assert host.from_host(udp4("8.8.8.8")) == []
    assert host.counters["no_route4"] == 1
    host = make_host(ipv4=None, gateway4=None)
    assert host.from_host(udp4(PEER)) == []
    assert host.counters["no_ipv4_address"] == 1


@pytest.mark.parametrize(("dst", "mac"), [
    ("255.255.255.255", "ff:ff:ff:ff:ff:ff"),
    ("10.77.0.255", "ff:ff:ff:ff:ff:ff"),
    ("224.0.0.251", "01:00:5e:00:00:fb"),
    ("239.255.130.7", "01:00:5e:7f:82:07"),
])
def test_ipv4_broadcast_and_multicast_map_to_a_mac_without_resolution(dst, mac):
    (frame,) = make_host().from_host(udp4(dst))
    assert parse(frame).dst == mac


def test_resolution_retries_once_a_second_then_drops_the_queue():
    clock = Clock(100.0)
    host = make_host(clock)
    assert len(host.from_host(udp4(PEER))) == 1
    assert host.next_deadline() == clock.now + 1
    start = clock.now
    clock.now = start + 0.5
    assert host.from_host(udp4(PEER)) == [] and host.tick(host.clock()) == []
    for second in (1, 2):
        clock.now = start + second
        (retry,) = host.tick(host.clock())
        assert parse(retry)[ARP].pdst == PEER
    clock.now = start + 3
    assert host.tick(host.clock()) == []
    assert host.counters["resolution_failed"] == 1
    assert host.counters["unresolved_dropped"] == 2
    assert host.next_deadline() is None
    assert host.from_segment(arp_reply(PEER, PEER_MAC))[1] == []  # nothing waits any more


def test_queues_are_bounded_per_destination_and_overall():
    host = make_host()
    packets = [udp4(PEER, bytes([n])) for n in range(MAX_QUEUED_PER_DESTINATION + 4)]
    for packet in packets:
        host.from_host(packet)
    _, frames = host.from_segment(arp_reply(PEER, PEER_MAC))
    assert [parse(f)[UDP].load for f in frames] == [bytes([n]) for n in range(4, 20)]
    assert host.counters["queue_full_dropped"] == 4

    host = make_host(ipv4=IPv4Interface(f"{HOST}/16"))
    destinations = MAX_QUEUED // MAX_QUEUED_PER_DESTINATION + 4
    for n in range(destinations):
        for _ in range(MAX_QUEUED_PER_DESTINATION):
            host.from_host(udp4(f"10.77.1.{n + 1}"))
    assert host.counters["queued"] == MAX_QUEUED
    assert host.counters["queue_full_dropped"] == 4 * MAX_QUEUED_PER_DESTINATION
    assert host.counters["solicit_sent"] == destinations  # still resolved, if not queued


def test_answers_arp_for_its_address_and_learns_the_asker():
    host = make_host()
    request = Ether(src=hexmac(PEER_MAC), dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=hexmac(PEER_MAC), psrc=PEER, pdst=HOST)
    packets, (reply,) = from_segment(host, request)
    assert packets == []
    assert reply.dst == hexmac(PEER_MAC) and reply[ARP].op == 2
    assert reply[ARP].psrc == HOST and reply[ARP].hwsrc == hexmac(HOST_MAC)
    assert reply[ARP].pdst == PEER and reply[ARP].hwdst == hexmac(PEER_MAC)
    (frame,) = host.from_host(udp4(PEER))
    assert parse(frame).dst == hexmac(PEER_MAC)


def test_arp_for_others_is_not_answered_nor_learned_and_claims_to_our_address_are_refused():
    host = make_host()
    request = Ether(src=hexmac(PEER_MAC), dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=hexmac(PEER_MAC), psrc=PEER, pdst="10.77.0.9")
    assert from_segment(host, request) == ([], [])
    assert host.neighbour(IPv4Address(PEER)) is None
    claim = Ether(src=hexmac(PEER_MAC), dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=2, hwsrc=hexmac(PEER_MAC), psrc=HOST, pdst=HOST)
    assert from_segment(host, claim) == ([], [])
    assert host.counters["arp_address_conflict"] == 1


def test_neighbour_entries_are_refreshed_by_unicast_probes_and_age_out():
    clock = Clock(100.0)
    host = make_host(clock)
    host.from_host(udp4(PEER))
    host.from_segment(arp_reply(PEER, PEER_MAC))
    clock.now += REACHABLE_SECONDS - 10
    frame, probe = host.from_host(udp4(PEER))
    assert parse(frame).dst == hexmac(PEER_MAC)
    assert parse(probe).dst == hexmac(PEER_MAC) and parse(probe)[ARP].pdst == PEER
    assert len(host.from_host(udp4(PEER))) == 1  # one probe a second
    clock.now += 10
    (request,) = host.from_host(udp4(PEER))  # expired: resolved again
    assert parse(request).dst == "ff:ff:ff:ff:ff:ff"


def test_configuring_ipv4_announces_it_and_forgets_the_old_subnet():
    host = make_host(ipv4=None, gateway4=None)
    (announce,) = host.configure_ipv4(IPv4Interface("10.88.0.7/24"), IPv4Address("10.88.0.1"))
    packet = parse(announce)
    assert packet[ARP].psrc == packet[ARP].pdst == "10.88.0.7"
    assert packet.dst == "ff:ff:ff:ff:ff:ff"
    host.from_host(udp4("10.88.0.9"))
    assert host.configure_ipv4(None) == []
    assert host.counters["reconfigured_dropped"] == 1
    assert host.from_host(udp4("10.88.0.9")) == []


# --- frames from the segment to the TUN --------------------------------------------------------


def test_frames_to_our_mac_become_packets_with_ethernet_padding_trimmed():
    host = make_host()
    packet = IP(src=PEER, dst=HOST) / UDP(sport=1, dport=2) / b"x"  # 29 bytes: padded to 60
    frame = Frame(bytes(Ether(src=hexmac(PEER_MAC), dst=hexmac(HOST_MAC)) / packet)
                  .ljust(60, b"\x00"))
    assert host.from_segment(frame) == ([(bytes(packet), PLAIN)], [])
    packet6 = IPv6(src="fd77::5", dst="fd77::2") / UDP(sport=1, dport=2) / b"y"
    frame6 = Frame(bytes(Ether(src=hexmac(PEER_MAC), dst=hexmac(HOST_MAC)) / packet6))
    assert host.from_segment(frame6) == ([(bytes(packet6), PLAIN)], [])


def test_broadcast_and_multicast_reach_the_host_but_others_unicast_does_not():
    host = make_host()
    bcast = Ether(src=hexmac(PEER_MAC), dst="ff:ff:ff:ff:ff:ff") / IP(
        src=PEER, dst="10.77.0.255") / UDP(sport=1, dport=2)
    mcast6 = Ether(src=hexmac(PEER_MAC), dst="33:33:00:00:00:fb") / IPv6(
        src=PEER_LL, dst="ff02::fb") / UDP(sport=5353, dport=5353)
    assert len(from_segment(host, bcast)[0]) == 1
    assert len(from_segment(host, mcast6)[0]) == 1
    other = Ether(src=hexmac(PEER_MAC), dst="52:54:00:00:00:09") / IP(src=PEER, dst="10.77.0.9")
    unicast_ip_in_broadcast = Ether(src=hexmac(PEER_MAC), dst="ff:ff:ff:ff:ff:ff") / IP(
        src=PEER, dst=HOST)
    assert from_segment(host, other) == ([], [])
    assert from_segment(host, unicast_ip_in_broadcast) == ([], [])
    assert host.counters["not_for_us"] == 2


def test_offload_metadata_is_shifted_by_the_ethernet_header_both_ways():
    host = make_host()
    host.from_host(udp4(PEER))
    host.from_segment(arp_reply(PEER, PEER_MAC))
    segment = bytes(IP(src=HOST, dst=PEER) / TCP(sport=1, dport=2) / (b"z" * 3000))
    offload = OffloadInfo(HDR_F_NEEDS_CSUM, GSO_TCPV4, 40, 1448, 20, 16)
    (frame,) = host.from_host(segment, offload)
    assert frame.offload == OffloadInfo(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)
    assert bytes(frame.data[14:]) == segment
    (plain,) = host.from_host(udp4(PEER))
    assert plain.offload is PLAIN
    echoed = Frame(HOST_MAC + PEER_MAC + bytes(frame.data[12:]), frame.offload)  # as received
    packets, frames = host.from_segment(echoed)
    assert packets == [(segment, offload)] and frames == []
    broken = Frame(bytes(echoed.data), OffloadInfo(HDR_F_NEEDS_CSUM, 0, 0, 0, 4, 16))
    assert host.from_segment(broken) == ([], [])
    assert host.counters["malformed_offload"] == 1


# --- IPv6: neighbour discovery and SLAAC --------------------------------------------------------


def ns_from_peer(target: str, src: str = "fd77::5", dst: str | None = None,
                 with_lla: bool = True) -> Ether:
    dst = dst or "ff02::1:ff" + IPv6Address(target).exploded[-7:]
    packet = Ether(src=hexmac(PEER_MAC), dst="33:33:ff:00:00:01") / IPv6(
        src=src, dst=dst, hlim=255) / ICMPv6ND_NS(tgt=target)
    if with_lla:
        packet /= ICMPv6NDOptSrcLLAddr(lladdr=hexmac(PEER_MAC))
    return packet


def test_ndp_resolves_a_neighbour_and_answers_solicitations():
    host = make_host(ipv6=IPv6Interface("fd77::2/64"))
    packet = udp6("fd77::5")
    (ns,) = [parse(f) for f in host.from_host(packet)]
    assert ns.dst == "33:33:ff:00:00:05" and ns[IPv6].dst == "ff02::1:ff00:5"
    assert ns[IPv6].hlim == 255 and ns[IPv6].src == "fd77::2"
    assert ns[ICMPv6ND_NS].tgt == "fd77::5"
    assert ns[ICMPv6NDOptSrcLLAddr].lladdr == hexmac(HOST_MAC)
    na = Ether(src=hexmac(PEER_MAC), dst=hexmac(HOST_MAC)) / IPv6(
        src="fd77::5", dst="fd77::2", hlim=255) / ICMPv6ND_NA(
        tgt="fd77::5", R=0, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=hexmac(PEER_MAC))
    _, frames = host.from_segment(Frame(bytes(na)))
    assert [bytes(f.data) for f in frames] == [PEER_MAC + HOST_MAC + b"\x86\xdd" + packet]

    for target in ("fd77::2", HOST_LL):
        packets, (answer,) = from_segment(host, ns_from_peer(target, src=PEER_LL))
        assert packets == []
        assert answer.dst == hexmac(PEER_MAC) and answer[IPv6].dst == PEER_LL
        assert answer[IPv6].src == target and answer[IPv6].hlim == 255
        advert = answer[ICMPv6ND_NA]
        assert (advert.tgt, advert.R, advert.S, advert.O) == (target, 0, 1, 1)
        assert answer[ICMPv6NDOptDstLLAddr].lladdr == hexmac(HOST_MAC)
    assert host.neighbour(IPv6Address(PEER_LL)) == PEER_MAC  # learned from the NS
    assert from_segment(host, ns_from_peer("fd77::9")) == ([], [])
    assert host.counters["ns_not_ours"] == 1


def test_a_dad_probe_for_our_address_is_defended():
    host = make_host(ipv6=IPv6Interface("fd77::2/64"))
    _, (answer,) = from_segment(host, ns_from_peer("fd77::2", src="::", with_lla=False))
    assert answer[IPv6].dst == "ff02::1" and answer.dst == "33:33:00:00:00:01"
    assert answer[ICMPv6ND_NA].S == 0 and answer[ICMPv6ND_NA].O == 1
    assert host.counters["dad_conflict"] == 1


def test_nd_with_a_bad_hop_limit_or_checksum_is_dropped():
    host = make_host(ipv6=IPv6Interface("fd77::2/64"))
    low = ns_from_peer("fd77::2")
    low[IPv6].hlim = 64
    bad = bytearray(bytes(ns_from_peer("fd77::2")))
    bad[56] ^= 0xFF  # the ICMPv6 checksum
    assert from_segment(host, low) == ([], [])
    assert host.from_segment(Frame(bytes(bad))) == ([], [])
    assert host.counters["malformed_nd_hop_limit"] == 1
    assert host.counters["malformed_icmpv6_checksum"] == 1


def hub_router_advertisement() -> Frame:
    dns = (IPv6Address("fd77::53"),)
    return RouterAdvertiser(GW_MAC, PREFIX, 1400, dns).advertisement()


def test_slaac_from_the_hubs_router_advertisement():
    clock = Clock(100.0)
    host = make_host(clock)
    formed = []
    host.on_slaac = formed.append
    packets, frames = host.from_segment(hub_router_advertisement())
    assert packets == [] and frames == []
    assert formed == [IPv6Interface(f"{SLAAC_ADDRESS}/64")]
    assert IPv6Interface(f"{SLAAC_ADDRESS}/64") in host.ipv6_addresses
    assert host.router6 == IPv6Address(GW_LL) and host.mtu6 == 1400
    assert host.dns6 == [IPv6Address("fd77::53")]
    assert host.neighbour(IPv6Address(GW_LL)) == GW_MAC  # from the RA's source LLA
    # Off-link goes to the router at once; on-link (the prefix) is resolved itself.
    (frame,) = host.from_host(udp6("2001:db8::1", src=str(SLAAC_ADDRESS)))
    assert parse(frame).dst == hexmac(GW_MAC)
    (ns,) = host.from_host(udp6("fd77::5", src=str(SLAAC_ADDRESS)))
    assert parse(ns)[ICMPv6ND_NS].tgt == "fd77::5" and parse(ns)[IPv6].src == str(SLAAC_ADDRESS)
    # The SLAAC address is answered for; the asker's address from its NS releases the packet.
    _, (released, answer) = from_segment(host, ns_from_peer(str(SLAAC_ADDRESS)))
    assert released.dst == hexmac(PEER_MAC) and released[IPv6].dst == "fd77::5"
    assert answer[ICMPv6ND_NA].tgt == str(SLAAC_ADDRESS)
    # Repeated RAs form nothing new.
    host.from_segment(hub_router_advertisement())
    assert len(formed) == 1


def test_the_gateway_resolves_our_ns_for_the_router():
    host = make_host(ipv6=IPv6Interface("fd77::2/64"), gateway6=IPv6Address("fd77::1"))
    gateway = GatewayPort(GatewayConfig(mac=GW_MAC, ipv6_prefix=PREFIX), clock=Clock(100.0))
    (ns,) = host.from_host(udp6("2001:db8::1"))
    gateway.deliver([ns])
    (na,) = gateway.take_outbox()
    _, (frame,) = host.from_segment(na)
    assert parse(frame).dst == hexmac(GW_MAC) and parse(frame)[IPv6].dst == "2001:db8::1"


def scapy_ra(valid: int, preferred: int, lifetime: int = 1800, src: str = GW_LL,
             hlim: int = 255) -> Ether:
    return (Ether(src=hexmac(GW_MAC), dst="33:33:00:00:00:01")
            / IPv6(src=src, dst="ff02::1", hlim=hlim)
            / ICMPv6ND_RA(routerlifetime=lifetime)
            / ICMPv6NDOptSrcLLAddr(lladdr=hexmac(GW_MAC))
            / ICMPv6NDOptMTU(mtu=1280)
            / ICMPv6NDOptPrefixInfo(prefix="fd99::", prefixlen=64, L=1, A=1,
                                    validlifetime=valid, preferredlifetime=preferred))


def test_slaac_addresses_and_routers_expire_and_short_lifetimes_obey_the_two_hour_rule():
    clock = Clock(100.0)
    host = make_host(clock)
    lost = []
    host.on_slaac_lost = lost.append
    from_segment(host, scapy_ra(valid=10000, preferred=5000, lifetime=600))
    address = IPv6Interface(f"fd99::{str(SLAAC_ADDRESS).split('::')[1]}/64")
    assert address in host.ipv6_addresses
    from_segment(host, scapy_ra(valid=60, preferred=30, lifetime=600))  # only down to 2 h
    start = clock.now
    assert host.next_deadline() == start + 60  # the on-link prefix (no two-hour rule)
    clock.now = start + 60
    host.tick(host.clock())
    (frame,) = host.from_host(udp6("fd99::5"))  # off-link now: through the router
    assert parse(frame).dst == hexmac(GW_MAC)
    assert host.next_deadline() == start + 600  # the router
    clock.now = start + 600
    host.tick(host.clock())
    assert host.router6 is None
    assert host.next_deadline() == start + 7200
    clock.now = start + 7200
    host.tick(host.clock())
    assert lost == [address] and address not in host.ipv6_addresses
    assert host.from_host(udp6("2001:db8::1")) == []
    assert host.counters["no_route6"] == 1


def test_router_advertisements_from_non_link_local_or_with_hop_limit_below_255_are_ignored():
    host = make_host()
    assert from_segment(host, scapy_ra(100, 50, src="fd77::1")) == ([], [])
    assert from_segment(host, scapy_ra(100, 50, hlim=64)) == ([], [])
    assert host.router6 is None and len(host.ipv6_addresses) == 1


def test_a_zero_router_lifetime_withdraws_the_router():
    host = make_host()
    from_segment(host, scapy_ra(100, 50))
    assert host.router6 == IPv6Address(GW_LL)
    from_segment(host, scapy_ra(100, 50, lifetime=0))
    assert host.router6 is None


def test_ipv6_multicast_maps_to_33_33():
    (frame,) = make_host().from_host(udp6("ff02::fb"))
    assert parse(frame).dst == "33:33:00:00:00:fb"


def test_a_multicast_mac_is_refused():
    with pytest.raises(ValueError, match="unicast"):
        L3Host(b"\x01\x00\x5e\x00\x00\x01")


# --- garbage ------------------------------------------------------------------------------------


def seeds() -> list[bytes]:
    host_mac, peer = hexmac(HOST_MAC), hexmac(PEER_MAC)
    return [
        bytes(arp_reply(PEER, PEER_MAC).data),
        bytes(ns_from_peer("fd77::2")),
        bytes(hub_router_advertisement().data),
        bytes(scapy_ra(100, 50)),
        bytes(Ether(src=peer, dst=host_mac) / IPv6(src="fd77::5", dst="fd77::2", hlim=255)
              / ICMPv6ND_NA(tgt="fd77::5", S=1) / ICMPv6NDOptDstLLAddr(lladdr=peer)),
        bytes(Ether(src=peer, dst=host_mac) / IP(src=PEER, dst=HOST) / UDP() / b"data"),
    ]


@bounded_given(fuzz_settings(500), st.data())
def test_garbage_from_the_segment_never_raises(data):
    host = make_host(ipv6=IPv6Interface("fd77::2/64"))
    host.from_host(udp6("fd77::5"))
    host.from_host(udp4(PEER))
    frame = data.draw(garbled(st.sampled_from(seeds()), max_size=200, max_mutations=6))
    offload = OffloadInfo(*data.draw(st.tuples(st.sampled_from([0, 1, 2]), st.integers(0, 5),
                                               *[st.integers(0, 0xFFFF)] * 4)))
    packets, frames = host.from_segment(Frame(frame, offload))
    for f in frames:
        Ether(bytes(f.data))
    host.tick(host.clock() + data.draw(st.floats(0, 10000)))


@bounded_given(fuzz_settings(300), st.binary(max_size=80), st.tuples(*[st.integers(0, 0xFFFF)] * 6))
def test_garbage_from_the_host_never_raises(packet, offload):
    host = make_host(ipv6=IPv6Interface("fd77::2/64"), gateway6=IPv6Address("fd77::1"))
    for frame in host.from_host(packet, OffloadInfo(*offload)):
        assert bytes(frame.data[6:12]) == HOST_MAC
