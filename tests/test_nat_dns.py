"""The gateway's DNS forwarder core against scapy-built queries: queries forwarded with an id
of ours, answers back to the guest with its own id (read by scapy, checksums recomputed),
answers that do not match dropped, upstreams tried in turn on timeout, SERVFAIL at the end,
bounded pending queries, resolv.conf parsing, and hostile answers that never raise."""

import ipaddress
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from netstack.nat.dns import (
    MAX_PENDING_PER_GUEST,
    QUERY_TIMEOUT_SECONDS,
    DnsForwarder,
    SendQuery,
    parse_resolv_conf,
)
from netstack.nat.limits import FlowLimits
from netstack.nat.udp import UdpTable
from tests.support.nat import (
    GUEST4,
    GUEST6,
    GUEST_MAC,
    GW4,
    GW6,
    GW_MAC,
    OTHER4,
    OTHER_MAC,
    checksums_valid,
    guest_frame,
    nat_config,
)

UP1 = ipaddress.ip_address("127.0.0.53")
UP2 = ipaddress.ip_address("2001:db8::53")


def forwarder(upstreams=(UP1, UP2), **changes):
    ids = itertools.count(0x1000)
    dns = DnsForwarder(nat_config(**changes), list(upstreams), random_id=lambda: next(ids))
    return dns, UdpTable(dns.config, FlowLimits(), dns=dns)


def query(qid=0xBEEF, name="example.org", src=GUEST4, dst=GW4, sport=33333, mac=GUEST_MAC):
    ip = IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)
    return guest_frame(ip / UDP(sport=sport, dport=53) / DNS(id=qid, rd=1, qd=DNSQR(qname=name)),
                       src_mac=mac)


def answer_to(sent: SendQuery, address="93.184.215.14", **dns) -> bytes:
    asked = DNS(sent.payload)
    return bytes(DNS(id=asked.id, qr=1, rd=1, ra=1, qd=asked.qd,
                     an=DNSRR(rrname=asked.qd[0].qname, rdata=address), **dns))


def test_query_to_the_gateway_is_forwarded_with_an_id_of_ours():
    dns, udp = forwarder()
    (sent,) = udp.from_guest(query(qid=0xBEEF), now=1.0)
    assert sent.upstream == UP1
    asked = DNS(sent.payload)
    assert asked.id == 0x1000 and asked.qd[0].qname == b"example.org."
    assert not udp.flows  # DNS to the gateway opens no flow of its own


def test_answer_goes_back_to_the_guest_with_its_id_from_the_gateway():
    dns, udp = forwarder()
    (sent,) = udp.from_guest(query(qid=0xBEEF), now=1.0)
    frame = dns.answer(UP1, answer_to(sent), now=1.1)
    packet = Ether(bytes(frame.data))
    assert packet.dst == GUEST_MAC and packet.src == GW_MAC
    assert (packet[IP].src, packet[IP].dst) == (GW4, GUEST4)
    assert (packet[UDP].sport, packet[UDP].dport) == (53, 33333)
    assert packet[DNS].id == 0xBEEF and packet[DNS].an[0].rdata == "93.184.215.14"
    assert checksums_valid(frame) and not dns.pending


def test_ipv6_guest_asks_the_gateways_ipv6_address():
    dns, udp = forwarder()
    (sent,) = udp.from_guest(query(src=GUEST6, dst=GW6), now=1.0)
    frame = dns.answer(UP1, answer_to(sent), now=1.1)
    packet = Ether(bytes(frame.data))
    assert (packet[IPv6].src, packet[IPv6].dst) == (GW6, GUEST6) and checksums_valid(frame)


def test_answers_that_do_not_match_a_query_in_flight_are_dropped():
    dns, udp = forwarder()
    (sent,) = udp.from_guest(query(), now=1.0)
    good = answer_to(sent)
    assert dns.answer(UP2, good, now=1.1) is None  # not where the query went
    assert dns.answer(UP1, b"\x10\x00\x81", now=1.1) is None  # no whole header
    assert dns.answer(UP1, b"\x99\x99" + good[2:], now=1.1) is None  # an id never given
    assert dns.answer(UP1, sent.payload, now=1.1) is None  # a query, not a response
    assert dns.drops == {"wrong_upstream": 1, "answer_header": 1, "unknown_id": 1,
                         "not_response": 1}
    assert dns.answer(UP1, good, now=1.2) is not None
    assert dns.answer(UP1, good, now=1.3) is None  # the second copy: already answered


def test_unanswered_query_goes_to_the_next_upstream_then_servfail():
    dns, udp = forwarder()
    (sent,) = udp.from_guest(query(qid=0x0102), now=1.0)
    assert dns.next_deadline() == 1.0 + QUERY_TIMEOUT_SECONDS
    assert dns.tick(1.0 + QUERY_TIMEOUT_SECONDS - 0.1) == []
    (retry,) = dns.tick(1.0 + QUERY_TIMEOUT_SECONDS)
    assert retry == SendQuery(UP2, sent.payload)
    assert dns.preferred == 1  # the next query starts where answers come from
    (later,) = udp.from_guest(query(sport=4444), now=4.0)
    assert later.upstream == UP2
    (servfail, _) = sorted(dns.tick(10.0), key=lambda item: isinstance(item, SendQuery))
    packet = Ether(bytes(servfail.data))
    assert packet[DNS].id == 0x0102 and packet[DNS].qr == 1 and packet[DNS].rcode == 2
    assert checksums_valid(servfail) and dns.drops["timeout"] == 1


def test_an_answer_too_long_for_the_guest_becomes_a_truncated_answer():
    dns, udp = forwarder(mtu=576)
    (sent,) = udp.from_guest(query(qid=0x0A0B), now=1.0)
    long_answer = answer_to(sent, ar=DNSRR(rrname="x.", type="TXT", rdata="y" * 250)
                            / DNSRR(rrname="z.", type="TXT", rdata="w" * 250))
    frame = dns.answer(UP1, long_answer, now=1.1)
    packet = Ether(bytes(frame.data))
    assert packet[DNS].id == 0x0A0B and packet[DNS].tc == 1 and packet[DNS].ancount == 0
    assert checksums_valid(frame)


def test_pending_queries_per_guest_are_bounded():
    dns, udp = forwarder()
    for port in range(MAX_PENDING_PER_GUEST):
        assert udp.from_guest(query(sport=1000 + port), now=1.0)
    assert udp.from_guest(query(sport=9999), now=1.0) == []
    assert udp.drops["pending_limit"] == 1
    assert udp.from_guest(query(src=OTHER4, mac=OTHER_MAC), now=1.0)  # not the others'


def test_queries_the_forwarder_does_not_carry_are_counted():
    dns, udp = forwarder()
    response = guest_frame(IP(src=GUEST4, dst=GW4) / UDP(sport=5, dport=53) / DNS(qr=1))
    short = guest_frame(IP(src=GUEST4, dst=GW4) / UDP(sport=5, dport=53) / (b"\x00" * 11))
    assert udp.from_guest(response, now=1.0) == [] and udp.from_guest(short, now=1.0) == []
    assert udp.drops["not_query"] == 1 and udp.drops["dns_header"] == 1
    _, none = forwarder(upstreams=())
    assert none.from_guest(query(), now=1.0) == [] and none.drops["no_upstream"] == 1


def test_resolv_conf_gives_nameservers_in_order_keeping_the_loopback_stub():
    text = """# generated by systemd-resolved
nameserver 127.0.0.53
options edns0 trust-ad
search lan
nameserver  192.0.2.53 # the router
;nameserver 198.51.100.1
nameserver not-an-address
nameserver 127.0.0.53
nameserver fe80::1%eth0
nameserver 2001:db8::1
"""
    assert parse_resolv_conf(text) == [ipaddress.ip_address("127.0.0.53"),
                                       ipaddress.ip_address("192.0.2.53"),
                                       ipaddress.ip_address("fe80::1%eth0")]
    assert parse_resolv_conf("search example\n") == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_arbitrary_answers_and_queries_never_raise_and_stay_bounded(blob, as_answer):
    dns, udp = forwarder()
    (sent,) = udp.from_guest(query(), now=1.0)
    if as_answer:
        message = sent.payload[:2] + blob if blob[:1] == b"\x00" else blob
        frame = dns.answer(UP1, message, now=1.1)
        assert frame is None or checksums_valid(frame)
    else:
        udp.from_guest(guest_frame(IP(src=GUEST4, dst=GW4) / UDP(sport=7, dport=53) / blob),
                       now=1.0)
    dns.tick(100.0)
    dns.tick(200.0)
    assert not dns.pending and not dns.per_owner
