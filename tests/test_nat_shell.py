"""The NAT's Trio shell (tunnel/nat.py) against the real thing: real host sockets in a network
namespace (the hub's host) joined by a veth to another (the outside), where a UDP echo
server, a DNS responder and the kernel's ping and port-unreachable answer.  Guest frames are
built by scapy and fed to the shell; what it delivers to the guest is read back by scapy."""

from __future__ import annotations

import ipaddress
import logging
import resource
import socket

import trio
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, UDP, UDPerror
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6

from netstack.frame import Frame
from netstack.nat.dns import QUERY_TIMEOUT_SECONDS
from netstack.nat.limits import MAX_FLOWS_PER_GUEST, FlowKey
from netstack.wire import IPPROTO_UDP
from tests.support.nat import (
    GUEST4,
    GUEST6,
    GUEST_MAC,
    GW4,
    OTHER4,
    OTHER_MAC,
    guest_frame,
    packed,
)
from tests.support.nat_netns import hub_and_outside
from tests.support.nat_shell import (
    ANSWER,
    CLOSED_PORT,
    ECHO_PORT,
    OUT4,
    OUT6,
    needs_netns,
    open_fds,
    run_in_hub,
)
from tunnel.nat import LOCAL_RESOLVERS, read_upstreams

pytestmark = needs_netns


def udp4(payload: bytes, sport: int = 40000, dport: int = ECHO_PORT, dst: str = OUT4,
         ttl: int = 64, src: str = GUEST4, src_mac: str = GUEST_MAC):
    return guest_frame(IP(src=src, dst=dst, ttl=ttl) / UDP(sport=sport, dport=dport) / payload,
                       src_mac=src_mac)


def test_a_guest_datagram_goes_out_with_its_ttl_and_the_answer_comes_back_as_a_frame():
    async def test(shell, guest):
        shell.from_guest(udp4(b"hello", ttl=17))
        reply = await guest.next()
        assert (reply[IP].src, reply[IP].dst) == (OUT4, GUEST4)
        assert (reply[UDP].sport, reply[UDP].dport) == (ECHO_PORT, 40000)
        assert bytes(reply[UDP].payload) == b"hello"
        assert reply.dst == GUEST_MAC
        assert shell.ttls == [16]  # the guest's TTL less the NAT's hop
        shell.from_guest(guest_frame(IPv6(src=GUEST6, dst=OUT6) / UDP(sport=40001,
                                                                     dport=ECHO_PORT) / b"v6"))
        reply6 = await guest.next()
        assert (reply6[IPv6].src, reply6[IPv6].dst, bytes(reply6[UDP].payload)) \
            == (OUT6, GUEST6, b"v6")

    with hub_and_outside() as names:
        run_in_hub(names, test)


def test_an_idle_flow_is_closed_and_its_socket_with_it():
    async def test(shell, guest):
        before = open_fds()
        shell.from_guest(udp4(b"once"))
        await guest.next()
        assert len(shell.sockets) == 1
        assert open_fds() == before + 1
        with trio.fail_after(5):
            while shell.sockets:
                await trio.sleep(0.05)
        assert open_fds() == before
        assert shell.limits.held(bytes.fromhex(GUEST_MAC.replace(":", "")))["flows"] == 0

    with hub_and_outside() as names:
        run_in_hub(names, test, udp_idle_seconds=0.3)


def test_a_port_unreachable_from_the_outside_becomes_an_icmp_error_to_the_guest():
    async def test(shell, guest):
        shell.from_guest(udp4(b"anyone?", sport=40002, dport=CLOSED_PORT))
        error = await guest.next()
        assert (error[IP].src, error[IP].dst) == (OUT4, GUEST4)
        assert (error[ICMP].type, error[ICMP].code) == (3, 3)
        assert (error[UDPerror].sport, error[UDPerror].dport) == (40002, CLOSED_PORT)
        assert bytes(error[UDPerror].payload) == b"anyone?"
        assert shell.errors.sent == {"3/3": 1}
        assert shell.sockets  # the flow lives on: the guest decides

    with hub_and_outside() as names:
        run_in_hub(names, test)


def test_a_ping_goes_out_through_a_ping_socket_and_the_reply_keeps_the_guest_identifier():
    async def test(shell, guest):
        assert shell.echo_on == {4: True, 6: True}
        shell.from_guest(guest_frame(IP(src=GUEST4, dst=OUT4) / ICMP(id=0x4242, seq=3)
                                     / b"ping4"))
        reply = await guest.next()
        assert (reply[IP].src, reply[IP].dst) == (OUT4, GUEST4)
        assert (reply[ICMP].type, reply[ICMP].id, reply[ICMP].seq) == (0, 0x4242, 3)
        assert bytes(reply[ICMP].payload) == b"ping4"
        shell.from_guest(guest_frame(IPv6(src=GUEST6, dst=OUT6)
                                     / ICMPv6EchoRequest(id=0x4343, seq=4, data=b"ping6")))
        reply6 = await guest.next()
        assert reply6[ICMPv6EchoReply].id == 0x4343
        assert reply6[ICMPv6EchoReply].data == b"ping6"

    with hub_and_outside() as names:
        run_in_hub(names, test)


def test_when_ping_group_range_forbids_ping_sockets_one_line_says_so_and_udp_still_works(
        caplog):
    async def test(shell, guest):
        assert shell.echo_on == {4: False, 6: False}
        shell.from_guest(guest_frame(IP(src=GUEST4, dst=OUT4) / ICMP(id=1, seq=1)))
        shell.from_guest(udp4(b"still here"))
        reply = await guest.next()
        assert bytes(reply[UDP].payload) == b"still here"
        assert shell.drops["echo_off"] == 1

    caplog.set_level(logging.WARNING, logger="tunnel.nat")
    with hub_and_outside(ping_groups=None) as names:  # the default, "1 0": nobody
        run_in_hub(names, test)
    lines = [r.getMessage() for r in caplog.records if "ping_group_range" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "ICMP and ICMPv6 echo through the NAT is off" in lines[0]


def test_a_dns_query_to_the_gateway_is_answered_by_the_upstream_with_the_guest_id():
    async def test(shell, guest):
        query = DNS(id=0x1234, rd=1, qd=DNSQR(qname="example.test"))
        shell.from_guest(guest_frame(IP(src=GUEST4, dst=GW4) / UDP(sport=5353, dport=53)
                                     / query))
        reply = await guest.next()
        assert (reply[IP].src, reply[UDP].sport, reply[UDP].dport) == (GW4, 53, 5353)
        assert reply[DNS].id == 0x1234 and reply[DNS].qr == 1
        assert reply[DNS].an[0].rdata == ANSWER
        assert shell.dns.answered == 1

    with hub_and_outside() as names:
        run_in_hub(names, test)


def test_a_query_no_upstream_answers_gets_servfail_at_the_timeout():
    async def test(shell, guest):
        query = DNS(id=0x0BAD, rd=1, qd=DNSQR(qname="example.test"))
        shell.from_guest(guest_frame(IP(src=GUEST4, dst=GW4) / UDP(sport=5353, dport=53)
                                     / query))
        reply = await guest.next(seconds=QUERY_TIMEOUT_SECONDS + 3)
        assert (reply[DNS].id, reply[DNS].qr, reply[DNS].rcode) == (0x0BAD, 1, 2)
        assert shell.drops["upstream_icmp"] == 1  # its port unreachable, counted
        assert shell.dns.drops["timeout"] == 1

    with hub_and_outside() as names:
        run_in_hub(names, test, upstreams=OUT6)  # nothing listens on the outside's :53 there


def test_resolv_conf_gives_the_upstreams_and_no_nameserver_means_the_local_machine(
        tmp_path, caplog):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\nnameserver 10.9.9.9\nnameserver fdcb::53\n")
    assert read_upstreams(conf) == [ipaddress.ip_address("10.9.9.9"),
                                    ipaddress.ip_address("fdcb::53")]
    conf.write_text("search example.test\n")
    assert read_upstreams(conf) == list(LOCAL_RESOLVERS)
    assert read_upstreams(tmp_path / "missing") == list(LOCAL_RESOLVERS)
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]


def test_ten_thousand_flows_from_one_guest_stop_at_its_cap_with_the_fds_bounded():
    cap = MAX_FLOWS_PER_GUEST[IPPROTO_UDP]

    async def test(shell, guest):
        before = open_fds()
        template = bytearray(udp4(b"x", sport=1, dport=ECHO_PORT).data)
        template[40:42] = b"\x00\x00"  # no UDP checksum (IPv4 allows it): ports vary below
        for port in range(1024, 11024):
            template[34:36] = port.to_bytes(2, "big")
            shell.from_guest(Frame(bytes(template)))
        assert len(shell.sockets) == cap
        assert open_fds() <= before + cap
        assert shell.limits.refusals["flow_limit"] == 10000 - cap
        for _ in range(cap):
            await guest.next()  # every admitted flow answered
        shell.from_guest(udp4(b"other", src=OTHER4, src_mac=OTHER_MAC))  # another guest
        reply = await guest.next()
        assert (reply[IP].dst, bytes(reply[UDP].payload)) == (OTHER4, b"other")

    with hub_and_outside() as names:
        run_in_hub(names, test, seconds=60)


def test_out_of_file_descriptors_a_new_flow_is_refused_and_counted():
    async def test(shell, guest):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 2, hard))
        try:
            for port in range(41000, 41010):
                shell.from_guest(udp4(b"fd?", sport=port))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert shell.udp.drops["open_emfile"] > 0
        assert len(shell.sockets) + shell.udp.drops["open_emfile"] == 10
        assert len(shell.udp.flows) == len(shell.sockets)  # refused flows gave back their place
        shell.from_guest(udp4(b"later", sport=41000 + len(shell.sockets) + 1))
        while (reply := await guest.next())[UDP].dport != 41000 + len(shell.sockets):
            pass
        assert bytes(reply[UDP].payload) == b"later"

    with hub_and_outside() as names:
        run_in_hub(names, test)


def test_a_socket_error_mid_flow_closes_that_flow_only():
    async def test(shell, guest):
        for port in (42001, 42002):
            shell.from_guest(udp4(b"first", sport=port))
            await guest.next()
        broken = FlowKey(IPPROTO_UDP, packed(GUEST4), 42001, packed(OUT4), ECHO_PORT)
        shell.sockets[broken].sock.shutdown(socket.SHUT_WR)  # its next send fails: EPIPE
        shell.from_guest(udp4(b"second", sport=42001))
        shell.from_guest(udp4(b"second", sport=42002))
        reply = await guest.next()
        assert (reply[UDP].dport, bytes(reply[UDP].payload)) == (42002, b"second")
        assert shell.socket_errors == {"epipe": 1}
        assert broken not in shell.sockets and broken not in shell.udp.flows
        shell.from_guest(udp4(b"again", sport=42001))  # a new flow, a new socket
        reply = await guest.next()
        assert (reply[UDP].dport, bytes(reply[UDP].payload)) == (42001, b"again")

    with hub_and_outside() as names:
        run_in_hub(names, test)
