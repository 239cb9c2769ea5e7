"""DHCPv4 on the wire (RFC 2131, 2132, 3396): the one codec of the hub's server
(netstack/gateway/dhcp_server.py) and the TUN host's client (netstack/host/dhcp_client.py).

`DhcpFrame` is a checked view over an Ethernet frame that carries a DHCP message in one
direction (`op`: BOOTREQUEST client -> server, BOOTREPLY server -> client); `DhcpMessage` is
the view over the message itself.  Both check every length the sender supplies against the
bytes that are there when they are made, and raise `Malformed(reason)` with a reason from
the closed set below; after that their fields are plain reads.  `build_frame` writes a
message in its frame.  This module knows the format, not the roles: which messages a role
accepts, which options it needs and what it does with them are the callers' business.

Checks, in order, and their reasons:

  frame      at least Ethernet + IPv4 + UDP headers                                 malformed
             EtherType IPv4 (no VLAN tag: the gateway strips them)                 not_for_us
             IPv4 version 4, IHL >= 5, total length within the frame
             (netstack.wire.ipv4's checks, its reason in the detail)               malformed
             IPv4 header checksum                                               bad_checksum
             not a fragment                                                          fragment
             UDP, from the sender's DHCP port to the receiver's (68 -> 67, 67 -> 68) not_for_us
             UDP length within the IP payload (netstack.wire.udp's)                 malformed
             the UDP checksum, when the caller asks (0: none sent)              bad_checksum
  message    at least the 240-byte BOOTP header with the cookie                     malformed
             op is the direction's                                  not_request / not_reply
             htype 1, hlen 6 (Ethernet)                                          not_ethernet
             the magic cookie                                                       no_cookie
             each option's length byte within its area; overload (52) of one byte
             1..3, its areas (`file`, `sname`) scanned the same way                bad_option
             a message type (53) ...                                                     bootp
             ... of one byte                                                       bad_option

An option split into several pieces is their concatenation (RFC 3396), in the order main
area, `file`, `sname` (RFC 2131 4.1).  Options that run off the end of their area without
an END are tolerated: every option seen was whole.  The typed option reads
(`option_int`, `option_address`, `option_addresses`, `client_id`) raise `Malformed
("bad_option")` for a value of the wrong size; a caller that tolerates a bad optional
option catches that.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from ipaddress import IPv4Address

from netstack.frame import ETH_ADDR_LEN, ETH_HEADER_LEN, ETH_P_IP, ETHERTYPE_IP
from netstack.wire import IPPROTO_UDP, Malformed
from netstack.wire.checksum import pseudo_header_sum, sum16, verifies
from netstack.wire.ethernet import ethernet_frame
from netstack.wire.ipv4 import MIN_HEADER_LEN as IPV4_MIN_HEADER_LEN
from netstack.wire.ipv4 import Ipv4, ipv4_header
from netstack.wire.udp import HEADER_LEN as UDP_HEADER_LEN
from netstack.wire.udp import Udp, udp_header

IP_UDP_OVERHEAD = IPV4_MIN_HEADER_LEN + UDP_HEADER_LEN
IPV4_BROADCAST = IPv4Address("255.255.255.255")
IPV4_UNSPECIFIED = IPv4Address("0.0.0.0")

# --- BOOTP (RFC 951, RFC 2131 2) ---------------------------------------------------------

SERVER_PORT, CLIENT_PORT = 67, 68  # RFC 2131 4.1
# op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
# file, then the magic cookie (RFC 2132 2) and the options.
BOOTP_HEADER = struct.Struct("!BBBBIHHIIII16s64s128sI")
BOOTP_HEADER_LEN = BOOTP_HEADER.size  # 240, with the cookie
XID_OFFSET, SECS_OFFSET, FLAGS_OFFSET = 4, 8, 10
CIADDR_OFFSET, YIADDR_OFFSET, SIADDR_OFFSET, GIADDR_OFFSET = 12, 16, 20, 24
CHADDR_OFFSET = 28
SNAME_OFFSET, SNAME_LEN = 44, 64
FILE_OFFSET, FILE_LEN = 108, 128
COOKIE_OFFSET = 236
BOOTREQUEST, BOOTREPLY = 1, 2
HTYPE_ETHERNET = 1
MAGIC_COOKIE = 0x63825363
BROADCAST_FLAG = 0x8000  # RFC 2131 2, figure 2
BOOTP_MIN_LEN = 300  # RFC 951: the vendor area is 64 bytes, so a message is >= 300
# RFC 2131 2: a client must accept 576-byte IP datagrams (312 bytes of options).
MIN_MAX_MESSAGE_SIZE = 576

# --- Options (RFC 2132) -------------------------------------------------------------------

OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN = 15
OPT_MTU = 26
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57
OPT_RENEWAL_TIME = 58  # T1
OPT_REBINDING_TIME = 59  # T2
OPT_CLIENT_ID = 61
OPT_END = 255
OPTION_MAX_LEN = 255  # one length byte
CLIENT_ID_MIN_LEN = 2  # RFC 2132 9.14
OVERLOAD_FILE, OVERLOAD_SNAME = 1, 2  # RFC 2132 9.3
INFINITE_LEASE = 0xFFFFFFFF  # RFC 2132 9.2
MIN_MTU = 68  # RFC 2132 5.1

DHCPDISCOVER, DHCPOFFER, DHCPREQUEST, DHCPDECLINE = 1, 2, 3, 4
DHCPACK, DHCPNAK, DHCPRELEASE, DHCPINFORM = 5, 6, 7, 8

# Every reason a view raises Malformed with (the table at the top).
REASONS = frozenset({"malformed", "not_for_us", "bad_checksum", "fragment", "not_request",
                     "not_reply", "not_ethernet", "no_cookie", "bad_option", "bootp"})
_PORTS = {BOOTREQUEST: (CLIENT_PORT, SERVER_PORT), BOOTREPLY: (SERVER_PORT, CLIENT_PORT)}
_WRONG_OP = {BOOTREQUEST: "not_request", BOOTREPLY: "not_reply"}
_OP_NAMES = {BOOTREQUEST: "BOOTREQUEST (1)", BOOTREPLY: "BOOTREPLY (2)"}


def _int_field(offset: int, size: int) -> property:
    """A big-endian number of the fixed header, as a property of `DhcpMessage`."""
    return property(lambda message: int.from_bytes(message.raw[offset:offset + size], "big"))


def _address_field(offset: int) -> property:
    """An IPv4 address of the fixed header, as a property of `DhcpMessage`."""
    return property(lambda message: IPv4Address(message.raw[offset:offset + 4]))


class DhcpMessage:
    """A checked view over a DHCP message (a UDP payload) travelling in direction `op`."""

    __slots__ = ("msg_type", "options", "raw")

    def __init__(self, raw: bytes | memoryview, op: int) -> None:
        if len(raw) < BOOTP_HEADER_LEN:
            raise Malformed("malformed", f"BOOTP message of {len(raw)} bytes, want at least "
                                         f"{BOOTP_HEADER_LEN}")
        raw = bytes(raw)
        if raw[0] != op:
            raise Malformed(_WRONG_OP[op], f"BOOTP op {raw[0]}, want {_OP_NAMES[op]}")
        if raw[1] != HTYPE_ETHERNET or raw[2] != ETH_ADDR_LEN:
            raise Malformed("not_ethernet", f"htype {raw[1]} hlen {raw[2]}, want 1 and 6")
        (cookie,) = struct.unpack_from("!I", raw, COOKIE_OFFSET)
        if cookie != MAGIC_COOKIE:
            raise Malformed("no_cookie", f"magic cookie {cookie:#010x}")
        self.raw = raw
        self.options = parse_options(raw)
        msg_type = self.options.get(OPT_MESSAGE_TYPE)
        if msg_type is None:
            raise Malformed("bootp", "no DHCP message type: plain BOOTP")
        if len(msg_type) != 1:
            raise Malformed("bad_option", f"message type of {len(msg_type)} bytes, want 1")
        self.msg_type = msg_type[0]

    # -- the fixed header --

    xid = _int_field(XID_OFFSET, 4)
    secs = _int_field(SECS_OFFSET, 2)
    flags = _int_field(FLAGS_OFFSET, 2)
    ciaddr = _address_field(CIADDR_OFFSET)
    yiaddr = _address_field(YIADDR_OFFSET)
    siaddr = _address_field(SIADDR_OFFSET)
    giaddr = _address_field(GIADDR_OFFSET)

    @property
    def chaddr(self) -> bytes:
        """The client's MAC: the first hlen (6) bytes of the 16-byte field."""
        return self.raw[CHADDR_OFFSET:CHADDR_OFFSET + ETH_ADDR_LEN]

    # -- typed options: None when absent, Malformed("bad_option") when of the wrong size --

    def option_int(self, code: int, size: int) -> int | None:
        value = self.options.get(code)
        if value is None:
            return None
        if len(value) != size:
            raise Malformed("bad_option", f"option {code} of {len(value)} bytes, want {size}")
        return int.from_bytes(value, "big")

    def option_address(self, code: int) -> IPv4Address | None:
        value = self.option_int(code, 4)
        return None if value is None else IPv4Address(value)

    def option_addresses(self, code: int) -> list[IPv4Address]:
        """A list of addresses (routers, DNS servers); empty when absent."""
        value = self.options.get(code, b"")
        if len(value) % 4:
            raise Malformed("bad_option", f"option {code} of {len(value)} bytes, want 4 each")
        return [IPv4Address(value[i:i + 4]) for i in range(0, len(value), 4)]

    def client_id(self) -> bytes | None:
        """Option 61 as sent (RFC 2132 9.14: a type byte and at least one more)."""
        value = self.options.get(OPT_CLIENT_ID)
        if value is not None and not CLIENT_ID_MIN_LEN <= len(value) <= OPTION_MAX_LEN:
            raise Malformed("bad_option", f"client identifier of {len(value)} bytes")
        return value


class DhcpFrame:
    """A checked view over an Ethernet frame carrying a DHCP message in direction `op`.

    `verify_udp_checksum`: check the UDP checksum too (unless the sender sent none).  Only a
    caller that knows the checksum is complete may ask: a guest using virtio-net checksum
    offload leaves it partial, and the bytes do not say so."""

    __slots__ = ("eth_dst", "eth_src", "ip_dst", "ip_src", "message")

    def __init__(self, frame: bytes | memoryview, op: int, *,
                 verify_udp_checksum: bool = False) -> None:
        if len(frame) < ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN + UDP_HEADER_LEN:
            raise Malformed("malformed", f"frame of {len(frame)} bytes is too short")
        if frame[12:14] != ETHERTYPE_IP:
            raise Malformed("not_for_us", f"ethertype {bytes(frame[12:14]).hex()}, want IPv4 "
                                          "(untagged)")
        try:
            ip = Ipv4(frame, ETH_HEADER_LEN)
        except Malformed as error:  # the counter DHCP has always had for lengths that lie
            raise Malformed("malformed", str(error)) from None
        if not ip.header_checksum_ok():
            raise Malformed("bad_checksum", "IPv4 header checksum does not verify")
        if ip.is_fragment:
            raise Malformed("fragment", "IPv4 fragment")
        if ip.protocol != IPPROTO_UDP:
            raise Malformed("not_for_us", f"IP protocol {ip.protocol}, want UDP")
        try:
            udp = Udp(frame, ip.payload_offset, ip.end)
        except Malformed as error:
            raise Malformed("malformed", str(error)) from None
        want = _PORTS[op]
        if (udp.src_port, udp.dst_port) != want:
            raise Malformed("not_for_us", f"UDP {udp.src_port} -> {udp.dst_port}, want "
                                          f"{want[0]} -> {want[1]}")
        src, dst = bytes(ip.src), bytes(ip.dst)
        if verify_udp_checksum and udp.checksum and not verifies(
                pseudo_header_sum(src, dst, IPPROTO_UDP, udp.length)
                + sum16(frame[udp.offset:udp.end])):
            raise Malformed("bad_checksum", "UDP checksum does not verify")
        self.message = DhcpMessage(udp.payload, op)
        self.eth_dst = bytes(frame[0:ETH_ADDR_LEN])
        self.eth_src = bytes(frame[ETH_ADDR_LEN:2 * ETH_ADDR_LEN])
        self.ip_src = IPv4Address(src)
        self.ip_dst = IPv4Address(dst)


def parse_options(raw: bytes) -> dict[int, bytes]:
    """The options of a message: main area, then `file` and `sname` if overloaded (RFC 2131
    4.1); an option split into several pieces is their concatenation (RFC 3396)."""
    options: dict[int, bytearray] = {}
    _scan_options(raw, BOOTP_HEADER_LEN, len(raw), "options", options)
    overload = options.pop(OPT_OVERLOAD, None)
    if overload is not None:
        if len(overload) != 1 or not 1 <= overload[0] <= OVERLOAD_FILE | OVERLOAD_SNAME:
            raise Malformed("bad_option", f"option overload {bytes(overload)!r}")
        more: dict[int, bytearray] = {}
        if overload[0] & OVERLOAD_FILE:
            _scan_options(raw, FILE_OFFSET, FILE_OFFSET + FILE_LEN, "file", more)
        if overload[0] & OVERLOAD_SNAME:
            _scan_options(raw, SNAME_OFFSET, SNAME_OFFSET + SNAME_LEN, "sname", more)
        more.pop(OPT_OVERLOAD, None)  # only valid in the main area
        for code, value in more.items():
            options.setdefault(code, bytearray()).extend(value)
    return {code: bytes(value) for code, value in options.items()}


def _scan_options(raw: bytes, start: int, end: int, where: str,
                  into: dict[int, bytearray]) -> None:
    i = start
    while i < end:
        code = raw[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return
        if i + 1 >= end:
            raise Malformed("bad_option", f"option {code} at {where}[{i - start}] has no length")
        stop = i + 2 + raw[i + 1]
        if stop > end:
            raise Malformed("bad_option", f"option {code} at {where}[{i - start}] claims "
                                          f"{raw[i + 1]} bytes, {end - i - 2} left")
        into.setdefault(code, bytearray()).extend(raw[i + 2:stop])
        i = stop


def build_frame(
    op: int,
    options: Iterable[tuple[int, bytes]],
    *,
    xid: int,
    chaddr: bytes,
    eth_src: bytes,
    eth_dst: bytes,
    ip_src: IPv4Address,
    ip_dst: IPv4Address,
    flags: int = 0,
    secs: int = 0,
    ciaddr: IPv4Address = IPV4_UNSPECIFIED,
    yiaddr: IPv4Address = IPV4_UNSPECIFIED,
) -> bytes:
    """An Ethernet frame carrying a DHCP message in direction `op`: the BOOTP header, the
    cookie, `options` in the order given, END, zero padding to BOOTP_MIN_LEN; in UDP from the
    sender's port to the receiver's, in IPv4 (TTL 64), both checksums computed.  A value of
    more than OPTION_MAX_LEN bytes is the caller's bug (ValueError)."""
    parts = [BOOTP_HEADER.pack(op, HTYPE_ETHERNET, ETH_ADDR_LEN, 0, xid, secs, flags,
                               int(ciaddr), int(yiaddr), 0, 0, chaddr, b"", b"", MAGIC_COOKIE)]
    for code, value in options:
        if len(value) > OPTION_MAX_LEN:
            raise ValueError(f"option {code} of {len(value)} bytes, at most {OPTION_MAX_LEN}")
        parts.append(bytes((code, len(value))) + value)
    parts.append(bytes((OPT_END,)))
    message = b"".join(parts).ljust(BOOTP_MIN_LEN, b"\x00")
    sport, dport = _PORTS[op]
    src, dst = ip_src.packed, ip_dst.packed
    udp = udp_header(src, dst, sport, dport, message) + message
    return ethernet_frame(eth_dst, eth_src, ETH_P_IP,
                          ipv4_header(src, dst, IPPROTO_UDP, len(udp)) + udp)
