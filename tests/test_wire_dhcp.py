"""The DHCP codec (netstack/wire/dhcp.py): messages built by scapy the way real clients and
servers build them read back field by field; every drop reason is reachable by the frame
that should cause it; frames we build are what scapy reads, checksums included; and
arbitrary bytes give a view or `Malformed` with a known reason, nothing else."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netstack.wire import Malformed
from netstack.wire.checksum import internet_checksum
from netstack.wire.dhcp import (
    BOOTP_MIN_LEN,
    BOOTREPLY,
    BOOTREQUEST,
    OPT_CLIENT_ID,
    OPT_DNS,
    OPT_HOSTNAME,
    OPT_LEASE_TIME,
    OPT_MESSAGE_TYPE,
    OPT_PARAM_REQUEST,
    OPT_REQUESTED_IP,
    OPT_ROUTER,
    OPT_SERVER_ID,
    REASONS,
    DhcpFrame,
    DhcpMessage,
    build_frame,
)
from tests.support.fuzzing import bounded_given
from tests.support.hostile_frames import fuzz_settings

CLIENT_MAC = bytes.fromhex("525400123401")
SERVER_MAC = bytes.fromhex("02000000aa01")
SERVER = IPv4Address("10.77.0.1")


def request(options=(), *, op: int = 1, sport: int = 68, dport: int = 67, **bootp) -> bytes:
    """A DISCOVER as udhcpc sends it, with `options` after the message type."""
    fields = {"op": op, "chaddr": CLIENT_MAC, "xid": 0x1234ABCD} | bootp
    return bytes(Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff")
                 / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=sport, dport=dport)
                 / BOOTP(**fields)
                 / DHCP(options=[("message-type", "discover"), *options, "end"]))


def reply() -> bytes:
    """An ACK as a server sends it (scapy computes both checksums)."""
    return bytes(Ether(src=SERVER_MAC, dst=CLIENT_MAC)
                 / IP(src=str(SERVER), dst="10.77.0.2") / UDP(sport=67, dport=68)
                 / BOOTP(op=2, chaddr=CLIENT_MAC, xid=99, yiaddr="10.77.0.2", ciaddr="10.77.0.2",
                         siaddr="10.77.0.1", flags=0x8000, secs=3)
                 / DHCP(options=[("message-type", "ack"), ("server_id", str(SERVER)),
                                 ("lease_time", 3600), ("router", str(SERVER)),
                                 ("name_server", "10.77.0.53", "9.9.9.9"), "end"]))


def raw_frame(message: bytes, *, sport: int = 68, dport: int = 67, frag: int = 0,
              udp_sum: int = 0) -> bytes:
    """Ethernet/IPv4/UDP around any bytes, with correct lengths and IP header checksum."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(message), udp_sum) + message
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, frag, 64, 17,
                                   0, bytes(4), b"\xff" * 4))
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return b"\xff" * 6 + CLIENT_MAC + b"\x08\x00" + bytes(header) + udp


def bootp(options: bytes, *, op: int = 1, sname: bytes = b"", file: bytes = b"") -> bytes:
    return (struct.pack("!BBBBIHHIIII", op, 1, 6, 0, 7, 0, 0, 0, 0, 0, 0)
            + CLIENT_MAC.ljust(16, b"\x00") + sname.ljust(64, b"\x00")
            + file.ljust(128, b"\x00") + b"\x63\x82\x53\x63" + options)


def fix_ip_checksum(frame: bytes) -> bytes:
    header = bytearray(frame[14:34])
    header[10:12] = b"\x00\x00"
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return frame[:14] + bytes(header) + frame[34:]


# --- What real messages read as -----------------------------------------------------------


def test_a_clients_request_built_by_scapy_reads_field_by_field():
    frame = request([("requested_addr", "10.77.0.9"), ("server_id", "10.77.0.1"),
                     ("client_id", b"\x01" + CLIENT_MAC), ("param_req_list", [1, 3, 6, 15]),
                     ("max_dhcp_size", 1472), ("hostname", b"alpine")],
                    ciaddr="10.77.0.4", flags=0x8000, secs=12)
    view = DhcpFrame(frame, BOOTREQUEST)
    assert (view.eth_src, view.eth_dst) == (CLIENT_MAC, b"\xff" * 6)
    assert (view.ip_src, view.ip_dst) == (IPv4Address("0.0.0.0"), IPv4Address("255.255.255.255"))
    message = view.message
    assert (message.msg_type, message.xid, message.flags, message.secs) == (1, 0x1234ABCD,
                                                                            0x8000, 12)
    assert message.ciaddr == IPv4Address("10.77.0.4") and message.chaddr == CLIENT_MAC
    assert message.giaddr == message.yiaddr == message.siaddr == IPv4Address("0.0.0.0")
    assert message.option_address(OPT_REQUESTED_IP) == IPv4Address("10.77.0.9")
    assert message.option_address(OPT_SERVER_ID) == SERVER
    assert message.client_id() == b"\x01" + CLIENT_MAC
    assert message.options[OPT_PARAM_REQUEST] == bytes([1, 3, 6, 15])
    assert message.option_int(57, 2) == 1472
    assert message.options[OPT_HOSTNAME] == b"alpine"
    assert message.option_int(OPT_LEASE_TIME, 4) is None


def test_a_servers_reply_built_by_scapy_reads_with_its_udp_checksum_verified():
    view = DhcpFrame(reply(), BOOTREPLY, verify_udp_checksum=True)
    message = view.message
    assert message.msg_type == 5 and message.xid == 99 and message.secs == 3
    assert message.yiaddr == message.ciaddr == IPv4Address("10.77.0.2")
    assert message.siaddr == SERVER
    assert view.ip_src == SERVER and view.eth_src == SERVER_MAC
    assert message.option_int(OPT_LEASE_TIME, 4) == 3600
    assert message.option_addresses(OPT_ROUTER) == [SERVER]
    assert message.option_addresses(OPT_DNS) == [IPv4Address("10.77.0.53"),
                                                  IPv4Address("9.9.9.9")]
    assert message.option_addresses(OPT_HOSTNAME) == []  # absent


def test_udp_checksum_zero_means_none_sent_and_is_accepted():
    frame = bytearray(reply())
    frame[40:42] = b"\x00\x00"
    assert DhcpFrame(bytes(frame), BOOTREPLY, verify_udp_checksum=True).message.msg_type == 5


def test_overloaded_options_are_read_from_file_then_sname_and_split_options_joined():
    options = b"\x35\x01\x01\x0c\x02ab\x34\x01\x03\xff"
    file = b"\x0c\x02cd\x34\x01\x01\x37\x01\x01\xff"  # an overload here is not honoured
    sname = b"\x0c\x02ef\x37\x01\x03\xff"
    message = DhcpFrame(raw_frame(bootp(options, file=file, sname=sname)), BOOTREQUEST).message
    assert message.options[OPT_HOSTNAME] == b"abcdef"
    assert message.options[OPT_PARAM_REQUEST] == b"\x01\x03"
    assert 52 not in message.options


def test_options_without_an_end_and_pads_are_read():
    message = DhcpMessage(bootp(b"\x00\x00\x35\x01\x03\x00\x0c\x01x"), BOOTREQUEST)
    assert message.msg_type == 3 and message.options[OPT_HOSTNAME] == b"x"


# --- Every reason, by the frame that causes it -----------------------------------------------


def with_byte(frame: bytes, at: int, value: bytes) -> bytes:
    return frame[:at] + value + frame[at + len(value):]


BOOTP_AT = 14 + 20 + 8
GOOD = raw_frame(bootp(b"\x35\x01\x01\xff"))

CASES = [
    ("malformed", GOOD[:41], BOOTREQUEST),  # shorter than the three headers
    ("not_for_us", with_byte(GOOD, 12, b"\x86\xdd"), BOOTREQUEST),  # not IPv4
    ("malformed", fix_ip_checksum(with_byte(GOOD, 14, b"\x44")), BOOTREQUEST),  # IHL 4
    ("malformed", fix_ip_checksum(with_byte(GOOD, 14, b"\x65")), BOOTREQUEST),  # version 6
    ("malformed", GOOD[:200], BOOTREQUEST),  # total length beyond the frame
    ("malformed", fix_ip_checksum(with_byte(GOOD, 16, b"\x00\x1b")), BOOTREQUEST),  # < 20 + 8
    ("bad_checksum", with_byte(GOOD, 24, b"\x12\x34"), BOOTREQUEST),
    ("fragment", raw_frame(bootp(b"\x35\x01\x01\xff"), frag=0x2000), BOOTREQUEST),
    ("fragment", raw_frame(bootp(b"\x35\x01\x01\xff"), frag=0x0001), BOOTREQUEST),
    ("not_for_us", fix_ip_checksum(with_byte(GOOD, 23, b"\x06")), BOOTREQUEST),  # TCP
    ("not_for_us", GOOD, BOOTREPLY),  # 68 -> 67 read as a server's reply
    ("not_for_us", raw_frame(bootp(b"\x35\x01\x01\xff"), sport=1234), BOOTREQUEST),
    ("malformed", with_byte(GOOD, 38, b"\x00\x07"), BOOTREQUEST),  # UDP length < 8
    ("malformed", with_byte(GOOD, 38, b"\xff\xff"), BOOTREQUEST),  # UDP length > IP payload
    ("malformed", raw_frame(bootp(b"")[:239]), BOOTREQUEST),  # BOOTP header cut short
    ("not_request", raw_frame(bootp(b"\x35\x01\x01\xff", op=2)), BOOTREQUEST),
    ("not_reply", raw_frame(bootp(b"\x35\x01\x02\xff"), sport=67, dport=68), BOOTREPLY),
    ("not_ethernet", with_byte(GOOD, BOOTP_AT + 1, b"\x06"), BOOTREQUEST),  # htype
    ("not_ethernet", with_byte(GOOD, BOOTP_AT + 2, b"\x10"), BOOTREQUEST),  # hlen
    ("no_cookie", with_byte(GOOD, BOOTP_AT + 236, b"\x63\x82\x53\x64"), BOOTREQUEST),
    ("bad_option", raw_frame(bootp(b"\x35")), BOOTREQUEST),  # a code and no length
    ("bad_option", raw_frame(bootp(b"\x35\x01")), BOOTREQUEST),  # length past the end
    ("bad_option", raw_frame(bootp(b"\x35\x01\x01\x0c\x20ab\xff")), BOOTREQUEST),
    ("bad_option", raw_frame(bootp(b"\x35\x02\x01\x01\xff")), BOOTREQUEST),  # type of 2 bytes
    ("bad_option", raw_frame(bootp(b"\x35\x01\x01\x34\x01\x04\xff")), BOOTREQUEST),  # overload 4
    ("bad_option", raw_frame(bootp(b"\x35\x01\x01\x34\x01\x00\xff")), BOOTREQUEST),  # overload 0
    ("bad_option", raw_frame(bootp(b"\x35\x01\x01\x34\x02\x01\x01\xff")), BOOTREQUEST),
    ("bad_option", raw_frame(bootp(b"\x35\x01\x01\x34\x01\x01\xff", file=b"\x0c\x7f" + b"x" * 126)),
     BOOTREQUEST),  # an option in `file` claims more than the field holds
    ("bad_option", raw_frame(bootp(b"\x35\x01\x01\x34\x01\x02\xff", sname=b"\x00" * 63 + b"\x0c")),
     BOOTREQUEST),  # the last byte of `sname` is a code without a length
    ("bootp", raw_frame(bootp(b"\x0c\x03abc\xff")), BOOTREQUEST),  # no message type
    ("bootp", raw_frame(bootp(b"")), BOOTREQUEST),
]


@pytest.mark.parametrize(("reason", "frame", "op"), CASES)
def test_each_broken_frame_raises_malformed_with_its_reason(reason, frame, op):
    with pytest.raises(Malformed) as error:
        DhcpFrame(frame, op)
    assert error.value.reason == reason, error.value


def test_a_bad_udp_checksum_counts_only_when_verification_is_asked_for():
    """scapy's request carries a real checksum; broken, it is refused only when asked (the
    server cannot ask: a guest's offloaded checksum is partial)."""
    broken = with_byte(request(), 40, b"\x00\x01")
    assert DhcpFrame(broken, BOOTREQUEST).message.msg_type == 1
    assert DhcpFrame(request(), BOOTREQUEST, verify_udp_checksum=True).message.msg_type == 1
    with pytest.raises(Malformed, match="UDP checksum") as error:
        DhcpFrame(broken, BOOTREQUEST, verify_udp_checksum=True)
    assert error.value.reason == "bad_checksum"


def test_every_reason_of_the_codec_is_reachable_by_a_case_above():
    assert {reason for reason, _, _ in CASES} == REASONS


@pytest.mark.parametrize(
    ("options", "read"),
    [
        (b"\x32\x03\x0a\x00\x00", lambda m: m.option_address(OPT_REQUESTED_IP)),
        (b"\x36\x05\x0a\x00\x00\x01\x00", lambda m: m.option_address(OPT_SERVER_ID)),
        (b"\x33\x02\x00\x01", lambda m: m.option_int(OPT_LEASE_TIME, 4)),
        (b"\x03\x06\x0a\x00\x00\x01\x00\x00", lambda m: m.option_addresses(OPT_ROUTER)),
        (b"\x3d\x01\x01", lambda m: m.client_id()),
        (b"\x3d\xff" + b"\x01" * 255 + b"\x3d\x01\x01", lambda m: m.client_id()),  # 256 joined
    ],
)
def test_a_typed_option_of_the_wrong_size_raises_bad_option(options, read):
    message = DhcpMessage(bootp(b"\x35\x01\x01" + options + b"\xff"), BOOTREQUEST)
    with pytest.raises(Malformed) as error:
        read(message)
    assert error.value.reason == "bad_option"


# --- What we build ------------------------------------------------------------------------


def test_a_built_reply_is_what_scapy_reads_with_both_checksums_right():
    frame = build_frame(BOOTREPLY, [(OPT_MESSAGE_TYPE, b"\x02"), (OPT_SERVER_ID, SERVER.packed),
                                    (OPT_CLIENT_ID, b"\x01" + CLIENT_MAC)],
                        xid=0xCAFE, chaddr=CLIENT_MAC, flags=0x8000,
                        yiaddr=IPv4Address("10.77.0.7"), eth_src=SERVER_MAC,
                        eth_dst=b"\xff" * 6, ip_src=SERVER,
                        ip_dst=IPv4Address("255.255.255.255"))
    packet = Ether(frame)
    assert (packet[UDP].sport, packet[UDP].dport) == (67, 68)
    assert packet[IP].ttl == 64 and packet[IP].len == len(frame) - 14
    assert len(packet[UDP].payload) == BOOTP_MIN_LEN  # padded
    fresh = packet.copy()
    del fresh[IP].chksum
    del fresh[UDP].chksum
    fresh = Ether(bytes(fresh))
    assert (fresh[IP].chksum, fresh[UDP].chksum) == (packet[IP].chksum, packet[UDP].chksum)
    assert packet[BOOTP].op == 2 and packet[BOOTP].xid == 0xCAFE
    assert packet[BOOTP].yiaddr == "10.77.0.7" and packet[BOOTP].chaddr[:6] == CLIENT_MAC
    assert packet[DHCP].options[:3] == [("message-type", 2), ("server_id", "10.77.0.1"),
                                        ("client_id", b"\x01" + CLIENT_MAC)]
    view = DhcpFrame(frame, BOOTREPLY, verify_udp_checksum=True)
    assert view.message.client_id() == b"\x01" + CLIENT_MAC and view.message.flags == 0x8000


def test_a_built_request_reads_back_through_the_view():
    frame = build_frame(BOOTREQUEST, [(OPT_MESSAGE_TYPE, b"\x03"), (OPT_HOSTNAME, b"h" * 255)],
                        xid=5, chaddr=CLIENT_MAC, secs=9, ciaddr=IPv4Address("10.77.0.2"),
                        eth_src=CLIENT_MAC, eth_dst=SERVER_MAC,
                        ip_src=IPv4Address("10.77.0.2"), ip_dst=SERVER)
    view = DhcpFrame(frame, BOOTREQUEST, verify_udp_checksum=True)
    assert (view.message.msg_type, view.message.secs) == (3, 9)
    assert view.message.options[OPT_HOSTNAME] == b"h" * 255
    assert Ether(frame)[UDP].sport == 68


def test_an_option_longer_than_its_length_byte_is_refused_when_building():
    with pytest.raises(ValueError, match="256 bytes"):
        build_frame(BOOTREPLY, [(OPT_HOSTNAME, b"h" * 256)], xid=1, chaddr=CLIENT_MAC,
                    eth_src=SERVER_MAC, eth_dst=CLIENT_MAC, ip_src=SERVER, ip_dst=SERVER)


# --- Arbitrary bytes ----------------------------------------------------------------------


def read_all(view: DhcpFrame) -> None:
    message = view.message
    reads = [(message.option_int, (code, size)) for code in message.options for size in (1, 2, 4)]
    reads += [(read, (code,)) for code in message.options
              for read in (message.option_address, message.option_addresses)]
    for read, args in [*reads, (message.client_id, ())]:
        try:
            read(*args)
        except Malformed as error:
            assert error.reason == "bad_option"
    assert message.xid >= 0 and len(message.chaddr) == 6
    assert message.ciaddr.version == message.yiaddr.version == message.giaddr.version == 4


def parse_or_malformed(frame: bytes, op: int, verify: bool) -> None:
    try:
        view = DhcpFrame(frame, op, verify_udp_checksum=verify)
    except Malformed as error:
        assert error.reason in REASONS, error
        return
    read_all(view)


@bounded_given(fuzz_settings(400), st.binary(max_size=700),
               st.sampled_from([BOOTREQUEST, BOOTREPLY]), st.booleans())
def test_arbitrary_bytes_give_a_view_or_malformed_only(data, op, verify):
    parse_or_malformed(data, op, verify)


@bounded_given(fuzz_settings(400), st.binary(max_size=600), st.integers(0, 3),
               st.binary(max_size=64), st.binary(max_size=128))
def test_arbitrary_options_in_a_valid_frame_give_a_view_or_malformed_only(options, overload,
                                                                          sname, file):
    """Past the IP and UDP checks, into the option scanner and its overload areas."""
    head = b"\x35\x01\x01" + (bytes([0x34, 1, overload]) if overload else b"")
    parse_or_malformed(raw_frame(bootp(head + options, sname=sname, file=file)), BOOTREQUEST,
                       False)
