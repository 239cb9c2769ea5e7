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
             IPv4 version 4, IHL >= 5, total length within the frame               malformed
             IPv4 header checksum                                               bad_checksum
             not a fragment                                                          fragment
             UDP, from the sender's DHCP port to the receiver's (68 -> 67, 67 -> 68) not_for_us
             UDP length within the IP payload                                       malformed
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
from netstack.wire import Malformed
from netstack.wire.checksum import (
    internet_checksum,
    pseudo_header_sum,
    sum16,
    udp_checksum,
    verifies,
)

# --- IPv4 and UDP, as far as DHCP needs them (RFC 791, RFC 768) ----------------------------

IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV4_MIN_HEADER_LEN = IPV4_HEADER.size  # 20
IPV4_VERSION_IHL = 0x45  # version 4, a 20-byte header: what we send
IPV4_FRAG_MASK = 0x3FFF  # MF flag and fragment offset
IPV4_TTL = 64
IPPROTO_UDP = 17
UDP_HEADER = struct.Struct("!HHHH")
UDP_HEADER_LEN = UDP_HEADER.size  # 8
IP_UDP_OVERHEAD = IPV4_MIN_HEADER_LEN + UDP_HEADER_LEN
BROADCAST_MAC = b"\xff" * ETH_ADDR_LEN
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

    @property
    def xid(self) -> int:
        return int.from_bytes(self.raw[XID_OFFSET:XID_OFFSET + 4], "big")

    @property
    def secs(self) -> int:
        return int.from_bytes(self.raw[SECS_OFFSET:SECS_OFFSET + 2], "big")

    @property
    def flags(self) -> int:
        return int.from_bytes(self.raw[FLAGS_OFFSET:FLAGS_OFFSET + 2], "big")

    @property
    def ciaddr(self) -> IPv4Address:
        return IPv4Address(self.raw[CIADDR_OFFSET:CIADDR_OFFSET + 4])

    @property
    def yiaddr(self) -> IPv4Address:
        return IPv4Address(self.raw[YIADDR_OFFSET:YIADDR_OFFSET + 4])

    @property
    def siaddr(self) -> IPv4Address:
        return IPv4Address(self.raw[SIADDR_OFFSET:SIADDR_OFFSET + 4])

    @property
    def giaddr(self) -> IPv4Address:
        return IPv4Address(self.raw[GIADDR_OFFSET:GIADDR_OFFSET + 4])

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
        (ethertype,) = struct.unpack_from("!H", frame, 12)
        if ethertype != ETH_P_IP:
            raise Malformed("not_for_us", f"ethertype {ethertype:#06x}, want IPv4")
        ip_at = ETH_HEADER_LEN
        ver_ihl, _tos, total_len, _id, frag, _ttl, proto, _sum, src, dst = \
            IPV4_HEADER.unpack_from(frame, ip_at)
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < IPV4_MIN_HEADER_LEN:
            raise Malformed("malformed", f"IPv4 version/IHL byte {ver_ihl:#04x}")
        if total_len < ihl + UDP_HEADER_LEN or ip_at + total_len > len(frame):
            raise Malformed("malformed", f"IPv4 total length {total_len} with a {ihl}-byte "
                                         f"header in {len(frame) - ip_at} bytes")
        if not verifies(sum16(frame[ip_at:ip_at + ihl])):
            raise Malformed("bad_checksum", "IPv4 header checksum does not verify")
        if frag & IPV4_FRAG_MASK:
            raise Malformed("fragment", f"IPv4 fragment (flags/offset {frag:#06x})")
        if proto != IPPROTO_UDP:
            raise Malformed("not_for_us", f"IP protocol {proto}, want UDP")
        udp_at = ip_at + ihl
        sport, dport, udp_len, udp_sum = UDP_HEADER.unpack_from(frame, udp_at)
        want = _PORTS[op]
        if (sport, dport) != want:
            raise Malformed("not_for_us", f"UDP {sport} -> {dport}, want {want[0]} -> {want[1]}")
        if not UDP_HEADER_LEN <= udp_len <= total_len - ihl:
            raise Malformed("malformed", f"UDP length {udp_len} in {total_len - ihl} bytes of "
                                         "IP payload")
        udp = frame[udp_at:udp_at + udp_len]
        if verify_udp_checksum and udp_sum and not verifies(
                pseudo_header_sum(src, dst, IPPROTO_UDP, udp_len) + sum16(udp)):
            raise Malformed("bad_checksum", "UDP checksum does not verify")
        self.message = DhcpMessage(udp[UDP_HEADER_LEN:], op)
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
    udp_len = UDP_HEADER_LEN + len(message)
    src, dst = ip_src.packed, ip_dst.packed
    total = pseudo_header_sum(src, dst, IPPROTO_UDP, udp_len) + sport + dport + udp_len \
        + sum16(message)
    udp = UDP_HEADER.pack(sport, dport, udp_len, udp_checksum(total))
    header = bytearray(IPV4_HEADER.pack(IPV4_VERSION_IHL, 0, IPV4_MIN_HEADER_LEN + udp_len, 0,
                                        0, IPV4_TTL, IPPROTO_UDP, 0, src, dst))
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return eth_dst + eth_src + ETHERTYPE_IP + bytes(header) + udp + message
