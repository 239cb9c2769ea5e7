"""The NAT's ICMP against scapy-built guest pings: ping-socket actions, echo replies with the
guest's identifier restored (checksums recomputed by scapy), caps and expiry on an injected
clock, and the ICMP errors the host learns mapped back to the guest quoting its datagram,
rate limited."""

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, IPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from netstack.frame import Frame
from netstack.nat.icmp import (
    ERRORS_BURST,
    ICMP_IDLE_SECONDS,
    ClosePingSocket,
    EchoTable,
    ErrorReporter,
    HostError,
    OpenPingSocket,
    SendEcho,
)
from netstack.nat.limits import FlowKey, FlowLimits
from netstack.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP
from tests.support.nat import (
    GUEST4,
    GUEST6,
    GUEST_MAC,
    GW4,
    GW_MAC,
    REMOTE4,
    REMOTE6,
    checksums_valid,
    guest_frame,
    mac,
    nat_config,
    packed,
)

KEY4 = FlowKey(IPPROTO_ICMP, packed(GUEST4), 0x1234, packed(REMOTE4), 0)
KEY6 = FlowKey(IPPROTO_ICMPV6, packed(GUEST6), 0x1234, packed(REMOTE6), 0)
UDP4 = FlowKey(IPPROTO_UDP, packed(GUEST4), 40000, packed(REMOTE4), 5000)
UDP6 = FlowKey(IPPROTO_UDP, packed(GUEST6), 40000, packed(REMOTE6), 5000)
ROUTER4 = "203.0.113.1"


def echo_table(**changes) -> EchoTable:
    limits = changes.pop("limits", None) or FlowLimits()
    return EchoTable(nat_config(**changes), limits)


def ping4(seq=1, dst=REMOTE4, ident=0x1234, data=b"abcdefgh", ttl=64, **icmp):
    return guest_frame(IP(src=GUEST4, dst=dst, ttl=ttl)
                       / ICMP(type=8, id=ident, seq=seq, **icmp) / Raw(data))


def ping6(seq=1, dst=REMOTE6, ident=0x1234, data=b"abcdefgh"):
    return guest_frame(IPv6(src=GUEST6, dst=dst) / ICMPv6EchoRequest(id=ident, seq=seq,
                                                                     data=data))


def test_first_echo_request_opens_a_ping_socket_and_sends_it():
    table = echo_table()
    open_socket, send = table.from_guest(ping4(seq=7), now=1.0)
    assert open_socket == OpenPingSocket(KEY4)
    sent = ICMP(send.message)
    assert (sent.type, sent.code, sent.id, sent.seq) == (8, 0, 0x1234, 7)
    assert bytes(sent.payload) == b"abcdefgh" and send.ttl == 63
    assert table.from_guest(ping4(seq=8), now=2.0) == [SendEcho(KEY4, send.message[:6]
                                                                + b"\x00\x08abcdefgh", 63)]


def test_echo_reply_goes_to_the_guest_with_its_own_identifier():
    table = echo_table()
    table.from_guest(ping4(), now=1.0)
    kernel_reply = bytes(ICMP(type=0, id=0x9999, seq=1) / Raw(b"abcdefgh"))  # id rewritten
    frame = table.from_host(KEY4, kernel_reply, now=1.5)
    packet = Ether(bytes(frame.data))
    assert packet.dst == GUEST_MAC and packet.src == GW_MAC
    assert (packet[IP].src, packet[IP].dst) == (REMOTE4, GUEST4)
    assert (packet[ICMP].type, packet[ICMP].id, packet[ICMP].seq) == (0, 0x1234, 1)
    assert bytes(packet[ICMP].payload) == b"abcdefgh"
    assert checksums_valid(frame)


def test_icmpv6_echo_round_trip_restores_the_identifier_with_right_checksums():
    table = echo_table()
    open_socket, send = table.from_guest(ping6(), now=1.0)
    assert open_socket == OpenPingSocket(KEY6) and send.message[0] == 128
    kernel_reply = bytes(ICMPv6EchoReply(id=0x4242, seq=1, data=b"abcdefgh"))
    frame = table.from_host(KEY6, kernel_reply, now=1.5)
    packet = Ether(bytes(frame.data))
    assert (packet[IPv6].src, packet[IPv6].dst) == (REMOTE6, GUEST6)
    assert packet[ICMPv6EchoReply].id == 0x1234 and packet[ICMPv6EchoReply].data == b"abcdefgh"
    assert checksums_valid(frame)


def test_what_is_not_an_echo_reply_from_the_ping_socket_is_dropped():
    table = echo_table()
    table.from_guest(ping4(), now=1.0)
    assert table.from_host(KEY4, bytes(ICMP(type=8)), now=1.0) is None
    assert table.from_host(KEY4, b"\x00\x00", now=1.0) is None
    assert table.from_host(KEY4._replace(guest_port=1), bytes(ICMP(type=0)), now=1.0) is None
    assert table.drops == {"not_echo_reply": 2, "no_flow": 1}


def test_requests_the_nat_does_not_carry_are_counted_by_reason():
    table = echo_table()
    bad = bytearray(ping4().data)
    bad[-1] ^= 1
    cases = {
        "icmp_checksum": Frame(bytes(bad)),
        "denied": ping4(dst="169.254.169.254"),
        "gateway": ping4(dst=GW4),
        "ttl_expired": ping4(ttl=1),
        "not_echo": ping4(code=1),
        "echo_header": guest_frame(IP(src=GUEST4, dst=REMOTE4, proto=1)
                                   / Raw(b"\x08\x00\xf7\xff")),
    }
    for reason, frame in cases.items():
        assert table.from_guest(frame, now=1.0) == [], reason
        assert table.drops[reason] == 1, reason
    assert not table.flows


def test_echo_flows_are_capped_per_guest_and_expire_when_idle():
    limits = FlowLimits(flows_per_guest={IPPROTO_ICMP: 2})
    table = echo_table(limits=limits)
    assert len(table.from_guest(ping4(ident=1), now=10.0)) == 2
    assert len(table.from_guest(ping4(ident=2), now=20.0)) == 2
    assert table.from_guest(ping4(ident=3), now=20.0) == []
    assert table.drops["flow_limit"] == 1
    first = KEY4._replace(guest_port=1)
    assert table.tick(10.0 + ICMP_IDLE_SECONDS) == [ClosePingSocket(first)]
    assert len(table.from_guest(ping4(ident=3), now=75.0)) == 2
    table.open_failed(KEY4._replace(guest_port=3), "eacces")
    assert table.drops["open_eacces"] == 1 and limits.total == 1


def error(kind, code, info=0, offender=None):
    return HostError(kind, code, info, None if offender is None else packed(offender))


def test_port_unreachable_quotes_the_guests_datagram():
    reporter = ErrorReporter(nat_config())
    frame = reporter.error_frame(UDP4, mac(GUEST_MAC), error(3, 3, offender=REMOTE4),
                                 b"the query", now=1.0)
    packet = Ether(bytes(frame.data))
    assert (packet[IP].src, packet[IP].dst) == (REMOTE4, GUEST4)
    assert (packet[ICMP].type, packet[ICMP].code) == (3, 3)
    assert (packet[IPerror].src, packet[IPerror].dst) == (GUEST4, REMOTE4)
    assert (packet[UDPerror].sport, packet[UDPerror].dport) == (40000, 5000)
    assert bytes(packet[UDPerror].payload) == b"the query"
    assert checksums_valid(frame)


def test_time_exceeded_comes_from_the_router_that_said_so():
    reporter = ErrorReporter(nat_config())
    frame = reporter.error_frame(UDP4, mac(GUEST_MAC), error(11, 0, offender=ROUTER4), b"x",
                                 now=1.0)
    packet = Ether(bytes(frame.data))
    assert packet[IP].src == ROUTER4 and packet[ICMP].type == 11
    assert checksums_valid(frame)


def test_an_offender_in_a_denied_network_is_replaced_by_the_remote():
    reporter = ErrorReporter(nat_config())
    frame = reporter.error_frame(UDP4, mac(GUEST_MAC), error(3, 1, offender="127.0.0.1"), b"",
                                 now=1.0)
    assert Ether(bytes(frame.data))[IP].src == REMOTE4


def test_icmpv6_errors_quote_the_guests_datagram_with_right_checksums():
    reporter = ErrorReporter(nat_config())
    unreachable = reporter.error_frame(UDP6, mac(GUEST_MAC), error(1, 4), b"six", now=1.0)
    packet = Ether(bytes(unreachable.data))
    assert packet[ICMPv6DestUnreach].code == 4 and packet[IPv6].src == REMOTE6
    assert packet[IPerror6].src == GUEST6 and bytes(packet[UDPerror].payload) == b"six"
    assert checksums_valid(unreachable)
    too_big = reporter.error_frame(UDP6, mac(GUEST_MAC), error(2, 0, info=1400), bytes(3000),
                                   now=1.0)
    packet = Ether(bytes(too_big.data))
    assert packet[ICMPv6PacketTooBig].mtu == 1400 and len(packet[IPv6]) == 1280
    assert checksums_valid(too_big, quoted=False)
    exceeded = reporter.error_frame(KEY6, mac(GUEST_MAC), error(3, 0),
                                    bytes(ICMPv6EchoRequest(id=9, seq=4)), now=1.0)
    packet = Ether(bytes(exceeded.data))
    assert ICMPv6TimeExceeded in packet and checksums_valid(exceeded)


def test_fragmentation_needed_carries_the_mtu_and_an_ipv4_error_fits_576_bytes():
    reporter = ErrorReporter(nat_config())
    frame = reporter.error_frame(UDP4, mac(GUEST_MAC), error(3, 4, info=1400), bytes(2000),
                                 now=1.0)
    packet = Ether(bytes(frame.data))
    assert packet[ICMP].nexthopmtu == 1400 and len(packet[IP]) == 576
    assert checksums_valid(frame, quoted=False)


def test_unmapped_error_types_are_counted_not_sent():
    reporter = ErrorReporter(nat_config())
    assert reporter.error_frame(UDP4, mac(GUEST_MAC), error(5, 0), b"", now=1.0) is None
    assert reporter.error_frame(UDP4, mac(GUEST_MAC), error(11, 9), b"", now=1.0) is None
    assert reporter.drops["unmapped"] == 2


def test_errors_to_one_guest_are_rate_limited_and_the_bucket_forgotten_once_full():
    reporter = ErrorReporter(nat_config())
    sent = [reporter.error_frame(UDP4, mac(GUEST_MAC), error(3, 3), b"", now=5.0)
            for _ in range(int(ERRORS_BURST) + 5)]
    assert sum(frame is not None for frame in sent) == ERRORS_BURST
    assert reporter.drops["error_rate"] == 5
    other = reporter.error_frame(UDP4, mac("52:54:00:00:00:0b"), error(3, 3), b"", now=5.0)
    assert other is not None  # another guest's budget is its own
    reporter.tick(5.0 + 60)
    assert reporter.buckets == {}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_arbitrary_bytes_as_guest_frames_or_host_replies_never_raise(tail, six):
    table = echo_table()
    head = bytes(Ether(src=GUEST_MAC, dst=GW_MAC, type=0x86DD if six else 0x0800))
    actions = table.from_guest(Frame(head + tail), now=1.0)
    assert bool(actions) != (sum(table.drops.values()) == 1)
    table.from_guest(ping6() if six else ping4(), now=1.0)
    frame = table.from_host(KEY6 if six else KEY4, tail, now=2.0)
    assert frame is None or checksums_valid(frame)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFFFFFF),
       st.binary(max_size=70000), st.booleans())
def test_any_host_error_is_mapped_or_counted_and_never_oversized(kind, code, info, payload,
                                                                 six):
    reporter = ErrorReporter(nat_config())
    frame = reporter.error_frame(UDP6 if six else UDP4, mac(GUEST_MAC),
                                 HostError(kind, code, info, None), payload, now=1.0)
    assert frame is None or len(frame.data) <= 14 + (1280 if six else 576)
    assert (frame is None) == (sum(reporter.drops.values()) == 1)
