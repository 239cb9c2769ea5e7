"""The NAT proof's outside DNS server (tests/support/outside.py `dns_answer`), read back by
scapy: A and AAAA for its name, NXDOMAIN for others, FORMERR for junk, silence for responses."""

from __future__ import annotations

from scapy.layers.dns import DNS, DNSQR

from tests.support.outside import NAME, dns_answer

V4, V6 = "192.0.2.7", "2001:db8::7"


def ask(qname: str, qtype: str) -> DNS:
    answer = dns_answer(bytes(DNS(id=4242, rd=1, qd=DNSQR(qname=qname, qtype=qtype))),
                        NAME, V4, V6)
    assert answer is not None
    return DNS(answer)


def test_its_name_has_an_a_and_an_aaaa_record_case_insensitively():
    for qtype, address in (("A", V4), ("AAAA", V6)):
        reply = ask(NAME.upper(), qtype)
        assert (reply.id, reply.qr, reply.rd, reply.rcode, reply.ancount) == (4242, 1, 1, 0, 1)
        assert reply.an[0].rdata == address and reply.qd[0].qname == NAME.upper().encode() + b"."


def test_other_types_of_its_name_are_empty_and_other_names_do_not_exist():
    assert (ask(NAME, "MX").rcode, ask(NAME, "MX").ancount) == (0, 0)
    assert ask("elsewhere.vv.test", "A").rcode == 3


def test_junk_gets_formerr_and_responses_or_short_packets_get_nothing():
    reply = DNS(dns_answer(b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x40abc", NAME, V4, V6))
    assert (reply.id, reply.rcode) == (0x1234, 1)
    response = bytes(DNS(id=1, qr=1, qd=DNSQR(qname=NAME)))
    assert dns_answer(response, NAME, V4, V6) is None
    assert dns_answer(b"\x00" * 11, NAME, V4, V6) is None
