"""netstack.wire's views and builders: fields read back as scapy wrote them, every Malformed
reason reachable, arbitrary bytes give a view or Malformed and nothing else, and the
builders write what scapy reads (and dpkt, which built these replies before, wrote)."""

from __future__ import annotations

import ipaddress

import dpkt
import pytest
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether

from netstack.wire import (
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Malformed,
    arp,
    ethernet,
    icmp,
    icmpv6,
    ipv4,
    ipv6,
    tcp,
    udp,
)
from netstack.wire.arp import Arp
from netstack.wire.ethernet import Ethernet
from netstack.wire.icmp import Icmp
from netstack.wire.icmpv6 import Icmpv6, Neighbour, PrefixInformation, RouterAdvertisement
from netstack.wire.ipv4 import Ipv4
from netstack.wire.ipv6 import Ipv6, walk_chain
from netstack.wire.tcp import Tcp
from netstack.wire.udp import Udp
from tests.support.fuzzing import bounded_given
from tests.support.hostile_frames import fuzz_settings

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
MAC_A_BYTES = bytes.fromhex("02000000000a")
LL_A, LL_B = "fe80::a", "fe80::b"


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def reason(make, *args, **kwargs) -> str:
    with pytest.raises(Malformed) as caught:
        make(*args, **kwargs)
    return caught.value.reason


# -- fields read back as scapy wrote them -----------------------------------------------------

def test_ethernet_view_reads_untagged_and_tagged_frames():
    plain = Ethernet(bytes(Ether(src=MAC_A, dst=MAC_B, type=0x0800) / b"x"))
    assert (plain.dst, plain.src, plain.ethertype) == (bytes.fromhex("02000000000b"),
                                                       MAC_A_BYTES, 0x0800)
    assert plain.payload_offset == 14 and plain.tci is None and plain.vlan_id is None
    assert plain.payload == b"x" and not plain.is_llc
    tagged = Ethernet(bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=42, prio=5) / IPv6()))
    assert (tagged.ethertype, tagged.vlan_id, tagged.tci >> 13, tagged.payload_offset) == \
        (0x86DD, 42, 5, 18)
    stacked = Ethernet(bytes(Ether() / Dot1Q(vlan=1) / Dot1Q(vlan=2) / IP()))
    assert stacked.ethertype == 0x8100 and stacked.ethertype in ethernet.TAG_TYPES
    assert Ethernet(bytes(Ether(type=0x05DC) / b"llc")).is_llc


def test_arp_view_reads_a_request():
    frame = bytes(Ether(src=MAC_A) / ARP(op=1, hwsrc=MAC_A, psrc="10.0.0.1", hwdst=MAC_B,
                                         pdst="10.0.0.2"))
    view = Arp(frame, 14)
    assert view.op == arp.OP_REQUEST and view.is_ethernet_ipv4
    assert (view.sha, view.spa, view.tha, view.tpa) == (
        MAC_A_BYTES, packed("10.0.0.1"), bytes.fromhex("02000000000b"), packed("10.0.0.2"))


def test_ipv4_view_reads_header_fields_and_stops_at_total_length():
    packet = IP(src="10.0.0.1", dst="10.0.0.2", ttl=33, id=0x1234, flags="MF", frag=7,
                options=b"\x01\x01\x01\x00") / UDP(sport=1, dport=2) / b"data"
    frame = bytes(Ether() / packet) + b"\x00" * 10  # Ethernet padding
    view = Ipv4(frame, 14)
    assert (view.header_len, view.total_length, view.ttl, view.identification) == \
        (24, 24 + 12, 33, 0x1234)
    assert view.protocol == IPPROTO_UDP and view.more_fragments and view.is_fragment
    assert view.fragment_offset == 7 and view.header_checksum_ok()
    assert (view.src, view.dst) == (packed("10.0.0.1"), packed("10.0.0.2"))
    assert view.payload_offset == 14 + 24 and view.end == 14 + 36
    assert bytes(view.payload) == bytes(packet)[24:]
    assert view.checksum == IP(bytes(packet)).chksum


def test_ipv6_view_reads_header_fields_and_walks_the_chain():
    packet = IPv6(src=LL_A, dst=LL_B, hlim=9, tc=0xAB, fl=0x12345) / IPv6ExtHdrHopByHop() \
        / IPv6ExtHdrDestOpt() / UDP(sport=5, dport=6)
    frame = bytes(Ether() / packet) + bytes(6)
    view = Ipv6(frame, 14)
    assert (view.hop_limit, view.traffic_class, view.flow_label) == (9, 0xAB, 0x12345)
    assert (view.src, view.dst, view.next_header) == (packed(LL_A), packed(LL_B), 0)
    assert view.payload_length == len(bytes(packet)) - 40 and view.end == 14 + len(packet)
    assert view.chain() == ipv6.Chain(IPPROTO_UDP, 14 + 40 + 16, False, True)
    assert view.payload_offset == 54 and len(view.payload) == view.payload_length


def test_ipv6_chain_notes_fragments_first_and_later():
    first = bytes(IPv6() / IPv6ExtHdrFragment(offset=0, m=1) / ICMPv6EchoRequest())
    later = bytes(IPv6() / IPv6ExtHdrFragment(offset=8, nh=IPPROTO_ICMPV6) / b"12345678")
    assert Ipv6(first).chain() == ipv6.Chain(IPPROTO_ICMPV6, 48, True, True)
    assert Ipv6(later).chain() == ipv6.Chain(IPPROTO_ICMPV6, 48, True, False)


def test_icmp_view_reads_an_echo_request_within_the_ip_packet():
    frame = bytes(Ether() / IP() / ICMP(type=8, id=7, seq=9) / b"ping") + bytes(8)
    ip = Ipv4(frame, 14)
    view = Icmp(frame, ip.payload_offset, ip.end)
    assert (view.type, view.code) == (icmp.ECHO_REQUEST, 0) and view.checksum_ok()
    assert view.rest == b"\x00\x07\x00\x09ping"


def test_icmpv6_views_read_ns_na_ra_and_their_options():
    ns = bytes(IPv6(src=LL_A, dst=LL_B, hlim=255) / ICMPv6ND_NS(tgt=LL_B)
               / ICMPv6NDOptSrcLLAddr(lladdr=MAC_A))
    ip = Ipv6(ns)
    message = Icmpv6(ns, ip.payload_offset, ip.end)
    assert message.type == icmpv6.NEIGHBOR_SOLICITATION and message.checksum_ok(ip.src, ip.dst)
    body = Neighbour(message)
    assert body.target == packed(LL_B)
    assert body.options() == [(icmpv6.OPT_SOURCE_LINK_ADDRESS, b"\x01\x01" + MAC_A_BYTES)]
    na = bytes(ICMPv6ND_NA(tgt=LL_A, R=1, S=1, O=0) / ICMPv6NDOptDstLLAddr(lladdr=MAC_A))
    advert = Neighbour(Icmpv6(na))
    assert advert.flags == icmpv6.NA_FLAG_ROUTER | icmpv6.NA_FLAG_SOLICITED
    assert advert.options_offset == 24
    ra = bytes(ICMPv6ND_RA(chlim=64, routerlifetime=1800, reachabletime=5, retranstimer=6, M=1)
               / ICMPv6NDOptMTU(mtu=1400)
               / ICMPv6NDOptPrefixInfo(prefix="2001:db8::", prefixlen=64, validlifetime=99,
                                       preferredlifetime=50, L=1, A=1)
               / ICMPv6NDOptRDNSS(dns=["2001:db8::53"], lifetime=7))
    router = RouterAdvertisement(Icmpv6(ra))
    assert (router.cur_hop_limit, router.router_lifetime, router.reachable_time,
            router.retrans_timer, router.flags & 0x80) == (64, 1800, 5, 6, 0x80)
    kinds = [kind for kind, _ in router.options()]
    assert kinds == [icmpv6.OPT_MTU, icmpv6.OPT_PREFIX_INFORMATION, icmpv6.OPT_RDNSS]
    prefix = PrefixInformation(router.options()[1][1])
    assert (prefix.prefix, prefix.prefix_length, prefix.valid_lifetime,
            prefix.preferred_lifetime) == (packed("2001:db8::"), 64, 99, 50)
    assert prefix.flags == icmpv6.PREFIX_FLAG_ON_LINK | icmpv6.PREFIX_FLAG_AUTONOMOUS


def test_udp_view_reads_ports_and_stops_at_its_length():
    datagram = bytes(UDP(sport=68, dport=67) / b"hello")
    view = Udp(datagram + b"pad")
    assert (view.src_port, view.dst_port, view.length) == (68, 67, 13)
    assert view.payload == b"hello"
    assert view.checksum == int.from_bytes(datagram[6:8], "big")


def test_tcp_view_reads_ports_sequence_flags_and_options():
    segment = bytes(TCP(sport=80, dport=4000, seq=0xDEADBEEF, ack=5, flags="SA", window=999,
                        options=[("MSS", 1460)]) / b"payload")
    view = Tcp(segment)
    assert (view.src_port, view.dst_port, view.seq, view.ack, view.window) == \
        (80, 4000, 0xDEADBEEF, 5, 999)
    assert view.flags == tcp.SYN | tcp.ACK and view.header_len == 24
    assert view.options == b"\x02\x04\x05\xb4" and view.payload == b"payload"
    assert view.checksum == TCP(segment).chksum


# -- every Malformed reason, each from a crafted packet ------------------------------------

def test_every_ethernet_reason_is_reachable():
    seen = {reason(Ethernet, b"\x00" * 13),
            reason(Ethernet, bytes(Ether(type=0x8100)) + b"\x00\x01")}
    assert seen == ethernet.REASONS


def test_every_arp_reason_is_reachable():
    request = bytes(ARP(op=1))
    seen = {reason(Arp, request[:27]), reason(Arp, bytes(ARP(op=1, hwlen=8)))}
    assert seen == arp.REASONS
    assert Arp(bytes(ARP(op=1, ptype=0x86DD)), ethernet_ipv4=False).op == 1


def test_every_ipv4_reason_is_reachable():
    good = bytes(IP() / b"abcd")
    cases = [good[:19], b"\x65" + good[1:], b"\x44" + good[1:], b"\x4f" + good[1:],
             good[:2] + (19).to_bytes(2, "big") + good[4:],
             good[:2] + (len(good) + 1).to_bytes(2, "big") + good[4:]]
    seen = [reason(Ipv4, case) for case in cases]
    assert seen == ["ipv4_header"] * 4 + ["ipv4_length"] * 2
    assert set(seen) == ipv4.REASONS


def test_every_ipv6_reason_is_reachable():
    good = bytes(IPv6() / IPv6ExtHdrDestOpt() / UDP())
    endless = bytes(IPv6(nh=60, plen=8 * 9) / ((b"\x3c\x00" + bytes(6)) * 9))
    seen = {reason(Ipv6, good[:39]), reason(Ipv6, b"\x40" + good[1:]),
            reason(Ipv6, good[:-1]), reason(Ipv6(endless).chain)}
    assert seen == ipv6.REASONS
    cut = bytes(IPv6(nh=0, plen=4)) + bytes(4)
    assert reason(Ipv6(cut).chain) == "ipv6_extension"
    twice = bytes(IPv6() / IPv6ExtHdrFragment(m=1) / IPv6ExtHdrFragment() / UDP())
    assert reason(Ipv6(twice).chain) == "ipv6_extension"


def test_every_icmp_reason_is_reachable():
    assert {reason(Icmp, b"\x08\x00\x00")} == icmp.REASONS
    assert reason(Icmp, bytes(ICMP()), 0, 3) == "icmp_header"


def test_every_icmpv6_reason_is_reachable():
    ns = bytes(ICMPv6ND_NS(tgt=LL_A))
    ra = bytes(ICMPv6ND_RA())
    bad_options = [b"\x01\x00" + bytes(6), b"\x01\x02" + bytes(6), b"\x01"]
    seen = {reason(Icmpv6, b"\x87\x00\x00"), reason(Neighbour, Icmpv6(ns[:23])),
            reason(RouterAdvertisement, Icmpv6(ra[:15]))}
    seen |= {reason(Neighbour(Icmpv6(ns + option)).options) for option in bad_options}
    seen.add(reason(PrefixInformation, bytes(ICMPv6NDOptPrefixInfo())[:24]))
    assert seen == icmpv6.REASONS


def test_every_udp_reason_is_reachable():
    good = bytes(UDP() / b"abc")
    seen = [reason(Udp, good[:7]), reason(Udp, good[:4] + (7).to_bytes(2, "big") + good[6:]),
            reason(Udp, good[:-1])]
    assert seen == ["udp_header", "udp_length", "udp_length"]
    assert set(seen) == udp.REASONS


def test_every_tcp_reason_is_reachable():
    good = bytes(TCP(options=[("MSS", 1460)]))
    seen = [reason(Tcp, good[:19]), reason(Tcp, good[:12] + b"\x40" + good[13:]),
            reason(Tcp, good[:22])]
    assert seen == ["tcp_header"] * 3 and set(seen) == tcp.REASONS


# -- arbitrary bytes: a view or Malformed, nothing else -----------------------------------

def _read_everything(data: bytes) -> None:
    """Make every view over `data` and read every accessor; only Malformed may escape."""
    for make in (Ethernet, Arp, Ipv4, Ipv6, Icmp, Icmpv6, Udp, Tcp):
        try:
            view = make(data)
        except Malformed as error:
            assert error.reason in _ALL_REASONS
            continue
        for name in dir(view):
            if not name.startswith("_"):
                value = getattr(view, name)
                if callable(value):
                    try:
                        value(bytes(16), bytes(16)) if make is Icmpv6 else value()
                    except Malformed as error:
                        assert error.reason in _ALL_REASONS
    for make in (Neighbour, RouterAdvertisement):
        try:
            body = make(Icmpv6(data))
            body.options()
        except Malformed as error:
            assert error.reason in _ALL_REASONS
    try:
        PrefixInformation(data)
    except Malformed as error:
        assert error.reason in _ALL_REASONS
    if len(data) >= 40:
        chain = walk_chain(data, 0, len(data))
        assert chain is None or chain.position >= 40
    assert icmpv6.nd_link_addresses_match(data, 0, len(data), MAC_A_BYTES) in (True, False, None)


_ALL_REASONS = (ethernet.REASONS | arp.REASONS | ipv4.REASONS | ipv6.REASONS | icmp.REASONS
                | icmpv6.REASONS | udp.REASONS | tcp.REASONS)


@bounded_given(fuzz_settings(100), st.binary(max_size=200))
def test_arbitrary_bytes_give_a_view_or_malformed(data):
    _read_everything(data)
    _read_everything(bytes(memoryview(data)))


@bounded_given(fuzz_settings(100), st.sampled_from([0x45, 0x46, 0x60, 0x4F]),
               st.binary(max_size=120))
def test_arbitrary_ip_like_bytes_give_a_view_or_malformed(first, rest):
    _read_everything(bytes([first]) + rest)


def test_views_over_a_memoryview_read_the_same_fields():
    frame = bytes(Ether() / IPv6(src=LL_A, dst=LL_B) / ICMPv6EchoRequest(data=b"x"))
    view = Ipv6(memoryview(frame), 14)
    assert bytes(view.src) == packed(LL_A) and view.chain().next_header == IPPROTO_ICMPV6


# -- builders: what scapy reads back, what dpkt built ----------------------------------------

def test_arp_builder_writes_what_scapy_reads_and_dpkt_built():
    built = arp.arp_packet(arp.OP_REPLY, MAC_A_BYTES, packed("10.0.0.1"), bytes(6),
                           packed("10.0.0.2"))
    read = ARP(built)
    assert (read.op, read.hwsrc, read.psrc, read.pdst) == (2, MAC_A, "10.0.0.1", "10.0.0.2")
    assert built == bytes(dpkt.arp.ARP(op=2, sha=MAC_A_BYTES, spa=packed("10.0.0.1"),
                                       tha=bytes(6), tpa=packed("10.0.0.2")))
    frame = ethernet.ethernet_frame(b"\xff" * 6, MAC_A_BYTES, 0x0806, built)
    assert Ether(frame).type == 0x0806 and Ether(frame).src == MAC_A


def test_ipv4_echo_reply_builder_is_what_scapy_reads_and_dpkt_built():
    request = Icmp(bytes(ICMP(type=8, id=3, seq=4) / b"ping"))
    message = icmp.echo_reply(request)
    header = ipv4.ipv4_header(packed("10.0.0.1"), packed("10.0.0.2"), 1, len(message))
    read = IP(header + message)
    assert (read.src, read.dst, read.ttl, read[ICMP].type, read[ICMP].id, read[ICMP].seq) == \
        ("10.0.0.1", "10.0.0.2", 64, 0, 3, 4)
    assert read.chksum == IP(bytes(IP(header + message))).chksum
    assert Ipv4(header + message).header_checksum_ok() and Icmp(message).checksum_ok()
    old = dpkt.ip.IP(src=packed("10.0.0.1"), dst=packed("10.0.0.2"), p=1, ttl=64,
                     data=dpkt.icmp.ICMP(type=0, code=0, data=bytes(request.rest)))
    old.len = len(old)
    assert header + message == bytes(old)


def test_icmpv6_builders_write_what_scapy_reads_with_right_checksums():
    src, dst = packed(LL_A), packed(LL_B)
    na = icmpv6.neighbour_advertisement(src, dst, src, icmpv6.NA_FLAG_SOLICITED, MAC_A_BYTES)
    ns = icmpv6.neighbour_solicitation(src, dst, dst, MAC_A_BYTES)
    echo = icmpv6.echo_reply(src, dst, Icmpv6(bytes(ICMPv6EchoRequest(id=1, seq=2, data=b"e"))))
    options = icmpv6.link_address_option(icmpv6.OPT_SOURCE_LINK_ADDRESS, MAC_A_BYTES) \
        + icmpv6.mtu_option(1400) \
        + icmpv6.prefix_information_option(packed("2001:db8::"), 64, 0xC0, 99, 50) \
        + icmpv6.rdnss_option(7, [packed("2001:db8::53")])
    ra = icmpv6.router_advertisement(src, dst, 64, 1800, options)
    for message in (na, ns, echo, ra):
        packet = IPv6(ipv6.ipv6_header(src, dst, IPPROTO_ICMPV6, len(message), 255) + message)
        assert icmpv6.icmpv6_checksum_ok(src, dst, message)
        rebuilt = IPv6(bytes(packet.copy()))
        del rebuilt.payload.cksum
        assert IPv6(bytes(rebuilt)).payload.cksum == packet.payload.cksum
    assert ICMPv6ND_NA(na).tgt == LL_A and ICMPv6ND_NA(na).S == 1
    assert ICMPv6ND_NS(ns).tgt == LL_B and ICMPv6NDOptSrcLLAddr(ns[24:]).lladdr == MAC_A
    assert ICMPv6EchoReply(echo).id == 1 and ICMPv6EchoReply(echo).data == b"e"
    parsed = ICMPv6ND_RA(ra)
    assert parsed.routerlifetime == 1800 and parsed[ICMPv6NDOptMTU].mtu == 1400
    assert parsed[ICMPv6NDOptPrefixInfo].prefix == "2001:db8::"
    assert parsed[ICMPv6NDOptRDNSS].dns == ["2001:db8::53"]
    old = dpkt.icmp6.ICMP6(type=136, code=0, data=na[4:])
    ip6 = dpkt.ip6.IP6(src=src, dst=dst, nxt=58, hlim=255, data=old, plen=len(bytes(old)))
    assert bytes(ip6) == ipv6.ipv6_header(src, dst, IPPROTO_ICMPV6, len(na), 255) + na


@pytest.mark.parametrize("src,dst", [("10.0.0.1", "10.0.0.2"), (LL_A, LL_B)])
def test_udp_builder_checksums_over_the_right_pseudo_header(src, dst):
    payload = b"datagram"
    header = udp.udp_header(packed(src), packed(dst), 68, 67, payload)
    layer = (IP if "." in src else IPv6)(src=src, dst=dst) / UDP(sport=68, dport=67) / payload
    assert header == bytes(layer[UDP])[:8]
    assert Udp(header + payload).dst_port == 67


def test_a_tcp_header_is_found_behind_ipv4_options():
    frame = bytes(Ether() / IP(options=b"\x01\x01\x01\x00") / TCP(dport=443) / b"x")
    ip = Ipv4(frame, 14)
    assert ip.protocol == IPPROTO_TCP
    assert Tcp(frame, ip.payload_offset, ip.end).dst_port == 443
