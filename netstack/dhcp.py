"""The hub's DHCPv4 server (RFC 2131/2132): Ethernet frames in, Ethernet frames out, no sockets.

The gateway port hands `DhcpServer.handle` every IPv4/UDP frame addressed to port 67 and puts
the frames it returns into the switch; its timed work calls `expire`; the hub's shell writes
the state file (`snapshot`, `Snapshot.write` in a worker thread, `persisted`).  It must never
raise on what a guest sends, never hand one address to two MACs (not even across a hub
restart), never give a guest a lease for a MAC other than its own, and never let one client
(a switch port) take more than its budget of messages, declines, table entries or time.

Rules
-----
* Parsing is apart from deciding.  `parse_request` turns bytes into a `DhcpRequest` or raises
  `MalformedRequest(reason)`; it checks every length a guest supplies against the bytes that
  are there (Ethernet, IPv4 header and total length, UDP length, the 240-byte BOOTP header,
  each option's length byte, option overload) and knows nothing of our configuration.
  `handle` catches `MalformedRequest` and nothing else: a bug in the logic is a bug, not a
  dropped frame.
* Every decision about who holds which address lives in the "Decisions" section below, one
  method per message type (`_TRANSITIONS` is the table), and every change of the binding
  table goes through `_commit`, `_set_record`, `_forget`, `_bind`/`_unbind`, each of which
  keeps the indexes (by address, by client identifier, the free set, the heaps) in step;
  `_settle` is the one place that says whether a pool address is free.  `_available` is the
  one place that says whether an address may be given to a client.
* Nothing is acknowledged that is not on disk (when `state_path` is set): the ACK of a grant,
  or of a renewal beyond what is on disk, is held until the shell reports the snapshot that
  contains it written (`persisted`); if the write fails it keeps waiting.  Freeing an address
  (RELEASE, DECLINE, expiry) needs no wait: until written, the file still shows the address
  as held, which errs on the safe side.  So a crash loses at most the changes of the shell's
  write interval (`PERSIST_INTERVAL_SECONDS`), none of them acknowledged.
* No step costs the size of the pool or of a table: `handle` does a few dict lookups and at
  most `MAX_PROBES` heap pops; `expire` pops what expired.  Every table a client can grow has
  a named limit (below "Our own limits").

Theory of operation
-------------------
The path of a frame:

0. `_budget(source MAC).messages.take`: a token from the client's bucket, else the frame is
   ignored unparsed (`rate_limited`).
1. `parse_request`: Ethernet II carrying IPv4 (no VLAN tag: the gateway port strips them),
   an IPv4 header with a valid checksum, not a fragment, UDP 68 -> 67.  The UDP checksum is
   not verified: a guest with virtio-net checksum offload leaves it partial, and the bytes we
   get do not say so.  Then BOOTREQUEST, htype 1 / hlen 6, the magic cookie, options (with
   overload into `file`/`sname`, RFC 2131 4.1, and split options concatenated, RFC 3396).
2. `_refuse`: frames not addressed to us (Ethernet broadcast or our MAC; IP broadcast, the
   subnet broadcast or our address), relayed requests (giaddr != 0: we serve one segment),
   a group or zero source MAC, and a `chaddr` that is not the Ethernet source (a guest must
   not obtain leases for other MACs) are dropped and counted.
3. `_TRANSITIONS[msg_type]` decides and returns the reply, if any, built by `_reply`: options
   in the client's parameter-request order where we have them, trimmed to its maximum message
   size, padded to the 300-byte BOOTP minimum, sent from the gateway address, port 67 -> 68,
   to the destination RFC 2131 4.1 prescribes (`_destination`).

Who a client is.  The *MAC* is the unit of ownership: at most one lease per MAC, an address
held by at most one MAC, and the switch binds addresses to ports by MAC.  The client
identifier (option 61, else chaddr) decides which address a client gets *back*: a client that
comes back with the same identifier (say, a VM re-created with a new MAC) gets its old address
if nobody holds it.  An identifier presented from another MAC never takes an address that is
still leased: client identifiers cross the segment in broadcasts, so honouring them over
the MAC would let one guest take another's address.  A second client on the same MAC (boot
firmware, then the OS) takes over that MAC's lease and keeps its address.

The binding table holds one record (a `Lease`) per MAC.  A record is *bound* while its lease
runs (`on_lease` was called and `on_release` not yet) and *remembered* after it was released
or expired, so the client gets the same address again; a remembered record is forgotten when
its address goes to another client.  Records are therefore at most one per address.

    per address:   free ──DISCOVER──► offered (60 s, to one MAC)
                   free/offered/remembered ──REQUEST, _available──► bound ──ACK
                   bound ──REQUEST (same MAC)──► bound, expiry extended ──ACK
                   bound ──RELEASE / expiry──► remembered ──(other client takes it)──► free
                   bound/offered ──DECLINE──► declined (10 min) ──► free
                   free ──probed, `in_use` by another port──► resting (5 min) ──► free
                   bound ──REQUEST NAKed (reserved elsewhere, pool changed)──► free

Choice of an address on DISCOVER (`_choose`): the MAC's reservation (reservations win; if a
lease from before the reservation still holds it, the reserved client waits, and that lease
is NAKed at its next renewal); else the MAC's bound lease; else the address offered to it a
moment ago; else the address last held by its client identifier; else its remembered
address; else the requested address (option 50); else the lowest free address of the
pool (a set and a heap); else the address remembered longest (a heap by `expires`).  None
left: `pool_exhausted`.  A free address that fails `in_use` (another port sends from it, a
host configured by hand or a guest squatting) rests out of the free set for
`IN_USE_HOLD_SECONDS`, so each such address costs one probe, not one per DISCOVER: a guest
that sends from the lowest free addresses cannot make every DISCOVER probe the same ones and
give up.  A DISCOVER whose probes all met such addresses while free ones remain is counted
`no_offer_in_use` (its retransmission gets an address), not `pool_exhausted`.

Budgets (step 0, before parsing): each client -- the switch port behind the source MAC
(`port_of`), else the MAC -- has a token bucket for messages and may decline at most
`DECLINE_BUDGET` addresses per `DECLINE_WINDOW_SECONDS`; beyond, frames are ignored and
counted (`rate_limited`, `decline_over_budget`).

REQUEST (RFC 2131 4.3.2), told apart by its fields: *selecting* carries our server identifier
and the requested address; a REQUEST for another server's identifier is ignored
(`other_server`).  *Init-reboot* has no server identifier and a requested address;
*renewing* (unicast) and *rebinding* (broadcast) carry `ciaddr`.  We are the only server on
the segment, so we answer all of them authoritatively: ACK if `_available` says the address
may be this client's (also after a hub restart that lost the lease), else NAK.

Persistence: JSON, `{"version": 1, "leases": [...], "declined": [...]}`, bound and
remembered records alike; whether a record is bound is its `expires` compared with the clock
at load.  A renewal that extends a lease by less than `PERSIST_SLACK_SECONDS` beyond what is
on disk is not written (a guest flooding REQUESTs must not turn into an fsync per frame), and
leases loaded as bound get that slack added back, so a loaded lease never ends earlier than
the one the client was given.  A state file that cannot be read or parsed is logged and
renamed `*.corrupt` (never overwritten); a single bad entry is skipped with a warning and the
rest kept.  Offers are not persisted.

INFORM (RFC 2131 3.4) is answered for any `ciaddr`: it grants nothing.

Not served: plain BOOTP (no option 53), relays, VLAN-tagged frames, the requested lease time
(option 51 in a request: everyone gets `lease_seconds`), static routes, PXE.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import ipaddress
import json
import logging
import os
import re
import struct
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import dpkt

from netstack.frame import ETH_ADDR_LEN, ETH_HEADER_LEN, ETH_P_IP, format_mac, parse_mac
from netstack.ratelimit import TokenBucket
from netstack.wire.checksum import sum16, verifies

log = logging.getLogger(__name__)

# --- Numbers from the specs ---------------------------------------------------------------

BROADCAST_MAC = b"\xff" * ETH_ADDR_LEN
IPV4_BROADCAST = IPv4Address("255.255.255.255")
IPV4_UNSPECIFIED = IPv4Address("0.0.0.0")
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")  # RFC 791
IPV4_MIN_HEADER_LEN = IPV4_HEADER.size  # 20
IPV4_FRAG_MASK = 0x3FFF  # MF flag and fragment offset
IPPROTO_UDP = 17
UDP_HEADER = struct.Struct("!HHHH")  # RFC 768
UDP_HEADER_LEN = UDP_HEADER.size  # 8
SERVER_PORT = 67  # RFC 2131 4.1
CLIENT_PORT = 68

# RFC 2131 2: the fixed BOOTP header, then the magic cookie (RFC 2132 2) and the options.
BOOTP_HEADER = struct.Struct("!BBBBIHHIIII16s64s128sI")
BOOTP_HEADER_LEN = BOOTP_HEADER.size  # 240, with the cookie
SNAME_OFFSET, SNAME_LEN = 44, 64
FILE_OFFSET, FILE_LEN = 108, 128
BOOTREQUEST, BOOTREPLY = dpkt.dhcp.DHCP_OP_REQUEST, dpkt.dhcp.DHCP_OP_REPLY
HTYPE_ETHERNET = 1
MAGIC_COOKIE = dpkt.dhcp.DHCP_MAGIC
BROADCAST_FLAG = 0x8000  # RFC 2131 2, figure 2
BOOTP_MIN_LEN = 300  # RFC 951: the vendor area is 64 bytes, so a BOOTP message is >= 300
# RFC 2131 2: a client must accept 576-byte IP datagrams (312 bytes of options).
MIN_MAX_MESSAGE_SIZE = 576
IP_UDP_OVERHEAD = IPV4_MIN_HEADER_LEN + UDP_HEADER_LEN

# RFC 2132 option codes (the numbers dpkt names, under the names the RFC uses).
OPT_PAD = 0
OPT_SUBNET_MASK = dpkt.dhcp.DHCP_OPT_NETMASK  # 1
OPT_ROUTER = dpkt.dhcp.DHCP_OPT_ROUTER  # 3
OPT_DNS = dpkt.dhcp.DHCP_OPT_DNS_SVRS  # 6
OPT_HOSTNAME = dpkt.dhcp.DHCP_OPT_HOSTNAME  # 12
OPT_DOMAIN = dpkt.dhcp.DHCP_OPT_DOMAIN  # 15
OPT_MTU = dpkt.dhcp.DHCP_OPT_MTUSIZE  # 26
OPT_REQUESTED_IP = dpkt.dhcp.DHCP_OPT_REQ_IP  # 50
OPT_LEASE_TIME = dpkt.dhcp.DHCP_OPT_LEASE_SEC  # 51
OPT_OVERLOAD = dpkt.dhcp.DHCP_OPT_OPTIONOVERLOAD  # 52
OPT_MESSAGE_TYPE = dpkt.dhcp.DHCP_OPT_MSGTYPE  # 53
OPT_SERVER_ID = dpkt.dhcp.DHCP_OPT_SERVER_ID  # 54
OPT_PARAM_REQUEST = dpkt.dhcp.DHCP_OPT_PARAM_REQ  # 55
OPT_MESSAGE = dpkt.dhcp.DHCP_OPT_MESSAGE  # 56
OPT_MAX_MESSAGE_SIZE = dpkt.dhcp.DHCP_OPT_MAXMSGSIZE  # 57
OPT_RENEWAL_TIME = dpkt.dhcp.DHCP_OPT_RENEWTIME  # 58 (T1)
OPT_REBINDING_TIME = dpkt.dhcp.DHCP_OPT_REBINDTIME  # 59 (T2)
OPT_CLIENT_ID = dpkt.dhcp.DHCP_OPT_CLIENT_ID  # 61
OPT_END = 255
OPTION_MAX_LEN = 255  # one length byte
CLIENT_ID_MIN_LEN = 2  # RFC 2132 9.14
OVERLOAD_FILE, OVERLOAD_SNAME = 1, 2  # RFC 2132 9.3

DHCPDISCOVER = dpkt.dhcp.DHCPDISCOVER
DHCPOFFER = dpkt.dhcp.DHCPOFFER
DHCPREQUEST = dpkt.dhcp.DHCPREQUEST
DHCPDECLINE = dpkt.dhcp.DHCPDECLINE
DHCPACK = dpkt.dhcp.DHCPACK
DHCPNAK = dpkt.dhcp.DHCPNAK
DHCPRELEASE = dpkt.dhcp.DHCPRELEASE
DHCPINFORM = dpkt.dhcp.DHCPINFORM
CLIENT_MESSAGE_NAMES = {
    DHCPDISCOVER: "discover",
    DHCPREQUEST: "request",
    DHCPDECLINE: "decline",
    DHCPRELEASE: "release",
    DHCPINFORM: "inform",
}

# --- Our own limits -----------------------------------------------------------------------

OFFER_HOLD_SECONDS = 60.0  # an offered address waits this long for the client's REQUEST
DECLINE_HOLD_SECONDS = 600.0  # a declined address (someone else answers ARP for it) rests
# A free address that another port sends from (`in_use`) leaves the free set for this long,
# so the next DISCOVER probes fresh ones (the switch's claims age out after as long).
IN_USE_HOLD_SECONDS = 300.0
PERSIST_SLACK_SECONDS = 60.0  # renewals extending a lease by less than this are not written
MIN_LEASE_SECONDS = 60
MAX_LEASE_SECONDS = 0xFFFFFFFE  # 0xffffffff means "infinite" (RFC 2132 9.2): not offered
MAX_DNS_SERVERS = OPTION_MAX_LEN // 4
MAX_POOL_SIZE = 1 << 16  # the free set holds a number per address: keep it bounded
# The shell writes the state file at most this often, a batch of changes a write, in a worker
# thread; a crash loses at most the changes of this long, and none of them was acknowledged.
PERSIST_INTERVAL_SECONDS = 0.25

# What one client -- a switch port, or a MAC on no known port -- may make the server do.
RATE_PER_SECOND = 4.0  # DHCP messages a second, sustained...
RATE_BURST = 16.0  # ...and at once (a boot: firmware's DORA, then the OS's, retransmissions)
DECLINE_BUDGET = 4  # addresses it may decline...
DECLINE_WINDOW_SECONDS = 600.0  # ...in this long; later DECLINEs are ignored
MAX_CLIENTS_TRACKED = 1024  # budgets kept; the least recently used is dropped first
# Tables of the server a client can grow (its records are bounded by the pool: one a MAC,
# one an address).
MAX_OFFERS = 4096  # offers outstanding; the oldest is dropped first
MAX_DECLINED = 256  # addresses resting at once; DECLINEs beyond are ignored
MAX_PROBES = 8  # free or remembered addresses tried per DISCOVER (others fail `in_use`)
# Free addresses resting because another port uses them are at most the pool (MAX_POOL_SIZE):
# they come out of the free set.
HEAP_SLACK = 1024  # stale heap entries tolerated before a heap is rebuilt
STATE_VERSION = 1
# What we keep of a client's hostname option (RFC 1123 names, and '_' as seen from Windows).
HOSTNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")


# --- Configuration and leases -------------------------------------------------------------


@dataclass(frozen=True)
class DhcpConfig:
    """What the server hands out.  Strings are accepted for addresses and converted."""

    subnet: IPv4Network
    gateway: IPv4Address  # router option and server identifier
    server_mac: bytes  # the source MAC of replies
    pool: tuple[IPv4Address, IPv4Address] | None = None  # default: after the gateway .. last
    lease_seconds: int = 3600
    dns: tuple[IPv4Address, ...] = ()
    mtu: int | None = None  # option 26 when set
    domain: str | None = None
    reservations: Mapping[bytes, IPv4Address] = field(default_factory=dict)  # MAC -> address
    state_path: Path | None = None

    def __post_init__(self) -> None:
        subnet = ipaddress.IPv4Network(self.subnet)
        gateway = IPv4Address(self.gateway)
        set_ = object.__setattr__
        set_(self, "subnet", subnet)
        set_(self, "gateway", gateway)
        if subnet.prefixlen > 30:
            raise ValueError(f"subnet {subnet} has no room for clients (want /30 or larger)")
        if not self.is_host(gateway):
            raise ValueError(f"gateway {gateway} is not a host address of {subnet}")
        if not isinstance(self.server_mac, bytes) or len(self.server_mac) != ETH_ADDR_LEN:
            raise ValueError(f"server_mac must be 6 bytes, got {self.server_mac!r}")
        if self.pool is None:
            last = subnet.broadcast_address - 1
            first = gateway + 1 if gateway < last else subnet.network_address + 1
            if gateway >= last:
                last = gateway - 1
            set_(self, "pool", (first, last))
        else:
            first, last = IPv4Address(self.pool[0]), IPv4Address(self.pool[1])
            if not (self.is_host(first) and self.is_host(last) and first <= last):
                raise ValueError(f"pool {first}..{last} is not a range of hosts of {subnet}")
            set_(self, "pool", (first, last))
        first, last = self.pool
        if int(last) - int(first) + 1 > MAX_POOL_SIZE:
            raise ValueError(f"pool {first}..{last} is larger than {MAX_POOL_SIZE} addresses")
        if not MIN_LEASE_SECONDS <= self.lease_seconds <= MAX_LEASE_SECONDS:
            raise ValueError(
                f"lease_seconds {self.lease_seconds} outside "
                f"{MIN_LEASE_SECONDS}..{MAX_LEASE_SECONDS}"
            )
        dns = tuple(IPv4Address(a) for a in self.dns)
        if len(dns) > MAX_DNS_SERVERS:
            raise ValueError(f"{len(dns)} DNS servers, at most {MAX_DNS_SERVERS} fit in option 6")
        set_(self, "dns", dns)
        if self.mtu is not None and not 68 <= self.mtu <= 0xFFFF:
            raise ValueError(f"mtu {self.mtu} outside 68..65535 (RFC 2132 5.1)")
        if self.domain is not None:
            encoded = self.domain.encode("ascii")  # raises for non-ASCII: use IDNA yourself
            if not 0 < len(encoded) <= OPTION_MAX_LEN:
                raise ValueError(f"domain {self.domain!r} must be 1..255 bytes")
        reservations: dict[bytes, IPv4Address] = {}
        for mac, address in self.reservations.items():
            address = IPv4Address(address)
            if not isinstance(mac, bytes) or len(mac) != ETH_ADDR_LEN:
                raise ValueError(f"reservation key must be a 6-byte MAC, got {mac!r}")
            if not self.is_host(address) or address == gateway:
                raise ValueError(f"reservation {format_mac(mac)} -> {address}: not a client "
                                 f"address of {subnet}")
            if address in reservations.values():
                raise ValueError(f"address {address} reserved twice")
            reservations[mac] = address
        set_(self, "reservations", types.MappingProxyType(reservations))
        if self.state_path is not None:
            set_(self, "state_path", Path(self.state_path))

    def is_host(self, address: IPv4Address) -> bool:
        """In the subnet, and neither its network nor its broadcast address."""
        return (
            address in self.subnet
            and address != self.subnet.network_address
            and address != self.subnet.broadcast_address
        )

    def in_pool(self, address: IPv4Address) -> bool:
        assert self.pool is not None
        return self.pool[0] <= address <= self.pool[1] and address != self.gateway


@dataclass(frozen=True)
class Lease:
    """One client's address.  `expires` is on the server's clock (wall time by default)."""

    mac: bytes
    ip: IPv4Address
    expires: float
    hostname: str | None = None
    client_id: bytes | None = None  # option 61 as the client sent it, if it did


# --- Parsing: bytes to a DhcpRequest, or MalformedRequest ---------------------------------


class MalformedRequest(Exception):
    """A frame we do not serve.  `reason` is the counter name; the message says what was seen."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class DhcpRequest:
    """What `parse_request` found in a client's frame, every field checked."""

    eth_dst: bytes
    eth_src: bytes
    ip_dst: IPv4Address
    msg_type: int
    xid: int
    flags: int
    ciaddr: IPv4Address
    giaddr: IPv4Address
    chaddr: bytes  # the first hlen (6) bytes
    requested_ip: IPv4Address | None = None
    server_id: IPv4Address | None = None
    client_id: bytes | None = None
    hostname: str | None = None  # None if absent or not a plausible host name
    param_request: bytes = b""
    max_message_size: int | None = None


def parse_request(frame: bytes) -> DhcpRequest:
    """Check and decode a client's DHCP frame; raise MalformedRequest for anything else."""
    if len(frame) < ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN + UDP_HEADER_LEN:
        raise MalformedRequest("malformed", f"frame of {len(frame)} bytes is too short")
    eth_dst, eth_src = bytes(frame[0:6]), bytes(frame[6:12])
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype != ETH_P_IP:
        raise MalformedRequest("not_for_us", f"ethertype {ethertype:#06x}, want IPv4")

    ip_at = ETH_HEADER_LEN
    ver_ihl, _tos, total_len, _id, frag, _ttl, proto, _sum, _src, dst = IPV4_HEADER.unpack_from(
        frame, ip_at
    )
    ihl = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or ihl < IPV4_MIN_HEADER_LEN:
        raise MalformedRequest("malformed", f"IPv4 version/IHL byte {ver_ihl:#04x}")
    if total_len < ihl + UDP_HEADER_LEN or ip_at + total_len > len(frame):
        raise MalformedRequest(
            "malformed",
            f"IPv4 total length {total_len} with a {ihl}-byte header in "
            f"{len(frame) - ip_at} bytes",
        )
    if not verifies(sum16(frame[ip_at : ip_at + ihl])):
        raise MalformedRequest("bad_checksum", "IPv4 header checksum does not verify")
    if frag & IPV4_FRAG_MASK:
        raise MalformedRequest("fragment", f"IPv4 fragment (flags/offset {frag:#06x})")
    if proto != IPPROTO_UDP:
        raise MalformedRequest("not_for_us", f"IP protocol {proto}, want UDP")

    udp_at = ip_at + ihl
    sport, dport, udp_len, _udp_sum = UDP_HEADER.unpack_from(frame, udp_at)
    if dport != SERVER_PORT or sport != CLIENT_PORT:
        raise MalformedRequest("not_for_us", f"UDP {sport} -> {dport}, want 68 -> 67")
    if not UDP_HEADER_LEN <= udp_len <= total_len - ihl:
        raise MalformedRequest(
            "malformed", f"UDP length {udp_len} in {total_len - ihl} bytes of IP payload"
        )
    return _parse_bootp(
        bytes(frame[udp_at + UDP_HEADER_LEN : udp_at + udp_len]),
        eth_dst=eth_dst,
        eth_src=eth_src,
        ip_dst=IPv4Address(dst),
    )


def _parse_bootp(msg: bytes, *, eth_dst: bytes, eth_src: bytes, ip_dst: IPv4Address) -> DhcpRequest:
    if len(msg) < BOOTP_HEADER_LEN:
        raise MalformedRequest(
            "malformed", f"BOOTP message of {len(msg)} bytes, want at least {BOOTP_HEADER_LEN}"
        )
    (op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yiaddr, _siaddr, giaddr, chaddr,
     _sname, _file, cookie) = BOOTP_HEADER.unpack_from(msg)  # fmt: skip
    if op != BOOTREQUEST:
        raise MalformedRequest("not_request", f"BOOTP op {op}, want BOOTREQUEST (1)")
    if htype != HTYPE_ETHERNET or hlen != ETH_ADDR_LEN:
        raise MalformedRequest("not_ethernet", f"htype {htype} hlen {hlen}, want 1 and 6")
    if cookie != MAGIC_COOKIE:
        raise MalformedRequest("no_cookie", f"magic cookie {cookie:#010x}")
    options = _parse_options(msg)

    msg_type = _option_int(options, OPT_MESSAGE_TYPE, 1)
    if msg_type is None:
        raise MalformedRequest("bootp", "no DHCP message type: plain BOOTP is not served")
    if msg_type not in CLIENT_MESSAGE_NAMES:
        raise MalformedRequest("bad_message_type", f"message type {msg_type} from a client")
    requested = _option_int(options, OPT_REQUESTED_IP, 4)
    server_id = _option_int(options, OPT_SERVER_ID, 4)
    client_id = options.get(OPT_CLIENT_ID)
    if client_id is not None and not CLIENT_ID_MIN_LEN <= len(client_id) <= OPTION_MAX_LEN:
        raise MalformedRequest("bad_option", f"client identifier of {len(client_id)} bytes")
    return DhcpRequest(
        eth_dst=eth_dst,
        eth_src=eth_src,
        ip_dst=ip_dst,
        msg_type=msg_type,
        xid=xid,
        flags=flags,
        ciaddr=IPv4Address(ciaddr),
        giaddr=IPv4Address(giaddr),
        chaddr=chaddr[:ETH_ADDR_LEN],
        requested_ip=None if requested is None else IPv4Address(requested),
        server_id=None if server_id is None else IPv4Address(server_id),
        client_id=client_id,
        hostname=_hostname(options.get(OPT_HOSTNAME)),
        param_request=options.get(OPT_PARAM_REQUEST, b""),
        max_message_size=_option_int(options, OPT_MAX_MESSAGE_SIZE, 2),
    )


def _parse_options(msg: bytes) -> dict[int, bytes]:
    """The options of a message: main area, then `file` and `sname` if overloaded (RFC 2131
    4.1); an option split into several pieces is their concatenation (RFC 3396)."""
    options: dict[int, bytearray] = {}
    _scan_options(msg[BOOTP_HEADER_LEN:], "options", options)
    overload = options.pop(OPT_OVERLOAD, None)
    if overload is not None:
        if len(overload) != 1 or not 1 <= overload[0] <= OVERLOAD_FILE | OVERLOAD_SNAME:
            raise MalformedRequest("bad_option", f"option overload {bytes(overload)!r}")
        more: dict[int, bytearray] = {}
        if overload[0] & OVERLOAD_FILE:
            _scan_options(msg[FILE_OFFSET : FILE_OFFSET + FILE_LEN], "file", more)
        if overload[0] & OVERLOAD_SNAME:
            _scan_options(msg[SNAME_OFFSET : SNAME_OFFSET + SNAME_LEN], "sname", more)
        more.pop(OPT_OVERLOAD, None)  # only valid in the main area
        for code, value in more.items():
            options.setdefault(code, bytearray()).extend(value)
    return {code: bytes(value) for code, value in options.items()}


def _scan_options(area: bytes, where: str, into: dict[int, bytearray]) -> None:
    i, end = 0, len(area)
    while i < end:
        code = area[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return
        if i + 1 >= end:
            raise MalformedRequest("bad_option", f"option {code} at {where}[{i}] has no length")
        stop = i + 2 + area[i + 1]
        if stop > end:
            raise MalformedRequest(
                "bad_option",
                f"option {code} at {where}[{i}] claims {area[i + 1]} bytes, {end - i - 2} left",
            )
        into.setdefault(code, bytearray()).extend(area[i + 2 : stop])
        i = stop
    # Ran off the end without an END option: tolerated, every option seen was whole.


def _option_int(options: dict[int, bytes], code: int, size: int) -> int | None:
    value = options.get(code)
    if value is None:
        return None
    if len(value) != size:
        raise MalformedRequest("bad_option", f"option {code} of {len(value)} bytes, want {size}")
    return int.from_bytes(value, "big")


def _hostname(value: bytes | None) -> str | None:
    """The client's host name if it is one (it goes into logs and the state file)."""
    if value is None:
        return None
    text = value.rstrip(b"\x00").decode("ascii", errors="replace")
    return text if HOSTNAME_RE.fullmatch(text) else None


# --- The server ---------------------------------------------------------------------------


class _ClientBudget:
    """What one client (a switch port, or a MAC on no known port) may still do: a token
    bucket for its messages, and the times of its last declines."""

    __slots__ = ("declines", "messages")

    def __init__(self, now: float) -> None:
        self.messages = TokenBucket(RATE_PER_SECOND, RATE_BURST, now)
        self.declines: collections.deque[float] = collections.deque(maxlen=DECLINE_BUDGET)

    def may_decline(self, now: float) -> bool:
        declines = self.declines
        return len(declines) < DECLINE_BUDGET or declines[0] <= now - DECLINE_WINDOW_SECONDS


@dataclass
class Snapshot:
    """The binding table at one moment (`DhcpServer.snapshot`), for the shell to write; the
    records are immutable, so encoding and writing may run in a worker thread."""

    path: Path
    generation: int
    records: dict[bytes, Lease]
    encoded: dict[bytes, bytes]  # MAC -> its record as encoded by `encode_lease`
    declined: dict[IPv4Address, float]
    written: dict[bytes, float] = field(default_factory=dict)  # MAC -> expiry, once written

    def write(self) -> None:
        """Replace the state file (blocking: temp file, fsync, rename, fsync of the
        directory).  Raises OSError."""
        _write_atomically(self.path, encode_state(self.encoded.values(), self.declined))
        self.written = {mac: lease.expires for mac, lease in self.records.items()}


class DhcpServer:
    """Leases for one segment.  No sockets, no file writes (the state file is read once, at
    construction); the clock is injectable."""

    def __init__(self, config: DhcpConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.counters: collections.Counter[str] = collections.Counter()
        self.on_lease: Callable[[Lease], None] | None = None
        self.on_release: Callable[[Lease], None] | None = None
        # Is this address in use by someone other than this MAC (say, a host configured by
        # hand that the switch saw sending from it)?  Such an address is not offered or
        # granted: the lease would collide with it.  The hub asks its switch.
        self.in_use: Callable[[IPv4Address, bytes], bool] | None = None
        # Which switch port is this MAC behind (None: unknown)?  Rate and decline budgets
        # are per port, so that a guest changing MACs gains nothing; per MAC without it.
        self.port_of: Callable[[bytes], object | None] | None = None
        # Called when the table changed and should be written (`snapshot`, `persisted`).
        self.on_dirty: Callable[[], None] | None = None
        self._records: dict[bytes, Lease] = {}  # MAC -> bound or remembered lease
        # MAC -> its record encoded for the state file, made when it changes (so a snapshot
        # of a /16 is joined in milliseconds, not encoded in a third of a second).
        self._encoded: dict[bytes, bytes] = {}
        self._bound: set[bytes] = set()  # MACs whose lease runs
        self._by_ip: dict[IPv4Address, bytes] = {}  # address -> MAC of its record
        self._by_client_id: dict[bytes, bytes] = {}  # identifier -> MAC of its latest record
        self._offers: dict[bytes, tuple[IPv4Address, float]] = {}  # MAC -> (address, until)
        self._offered: dict[IPv4Address, bytes] = {}  # address -> MAC it is offered to
        self._declined: dict[IPv4Address, float] = {}  # address -> until
        # Free addresses another port was found sending from, resting until (insertion order
        # is expiry order: one hold for all); bounded by the pool, out of which they come.
        self._in_use_resting: dict[IPv4Address, float] = {}
        self._budgets: collections.OrderedDict[object, _ClientBudget] = (
            collections.OrderedDict())  # port (or MAC) -> budget, least recently used first
        self._reserved_for = {ip: mac for mac, ip in config.reservations.items()}
        first, last = config.pool  # type: ignore[misc]
        self._pool_range = (int(first), int(last))
        self._gateway_number = int(config.gateway)
        excluded = {int(ip) for ip in self._reserved_for} | {self._gateway_number}
        # Pool addresses nobody holds, is offered or rests: a set, and a heap of the same
        # numbers for the lowest one (entries no longer in the set are skipped when popped).
        self._free: set[int] = set(range(int(first), int(last) + 1)) - excluded
        self._free_heap: list[int] = []
        # (expires, MAC) of bound leases and of remembered records; stale entries skipped.
        self._expiries: list[tuple[float, bytes]] = []
        self._remembered: list[tuple[float, bytes]] = []
        self._written: dict[bytes, float] = {}  # MAC -> expiry in the state file
        self._held: dict[bytes, tuple[int, IPv4Address, bytes]] = {}  # ACKs waiting for disk
        self._generation = 0  # changes of the table so far
        self._saved_generation = 0  # changes in the state file
        self._persist_failing = False
        self._exhausted = False  # the pool had no address for the last DISCOVER
        if config.state_path is not None:
            self._load(config.state_path)
        self._free_heap = sorted(self._free)

    # -- public view --

    @property
    def leases(self) -> Mapping[bytes, Lease]:
        """The running leases, MAC -> Lease (a read-only snapshot)."""
        return types.MappingProxyType({mac: self._records[mac] for mac in self._bound})

    def lease_for_ip(self, ip: IPv4Address | str) -> Lease | None:
        mac = self._by_ip.get(IPv4Address(ip))
        return self._records[mac] if mac in self._bound else None

    def handle(self, frame: bytes) -> list[bytes]:
        """One client frame in, the reply frames (zero or one) out.

        Never raises because of what the frame holds; exceptions from `on_lease`/`on_release`
        (the caller's code) do propagate.  An ACK that grants or extends a lease beyond what
        is on disk is not returned here but by `persisted`, once it is written."""
        now = self.clock()
        if not self._budget(bytes(frame[6:12]), now).messages.take(now):
            self.counters["rate_limited"] += 1
            return []
        try:
            request = parse_request(frame)
        except MalformedRequest as error:
            self.counters[error.reason] += 1
            log.debug("DHCP frame dropped: %s", error)
            return []
        refusal = self._refuse(request)
        if refusal is not None:
            self.counters[refusal] += 1
            log.debug("DHCP %s from %s dropped: %s", CLIENT_MESSAGE_NAMES[request.msg_type],
                      format_mac(request.eth_src), refusal)
            return []
        self.counters[CLIENT_MESSAGE_NAMES[request.msg_type]] += 1
        return _TRANSITIONS[request.msg_type](self, request, now)

    def table_sizes(self) -> dict[str, int]:
        """How many entries each table holds (what clients made the server keep)."""
        return {"records": len(self._records), "bound": len(self._bound),
                "offers": len(self._offers), "declined": len(self._declined),
                "budgets": len(self._budgets), "held_acks": len(self._held),
                "free": len(self._free), "in_use_resting": len(self._in_use_resting)}

    def expire(self, now: float) -> None:
        """End leases, offers and declines whose time is up.  The gateway calls this every
        few seconds, never per frame; `now` is on the server's clock (wall time by default:
        expiries outlive the process).  Costs the expired entries, not the table."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires, mac = heapq.heappop(heap)
            lease = self._records.get(mac)
            if lease is None or mac not in self._bound or lease.expires != expires:
                continue  # renewed, released or forgotten since
            self._unbind(mac)
            self.counters["expired"] += 1
            log.info("lease expired: %s %s", format_mac(mac), lease.ip)
            if self.on_release is not None:
                self.on_release(lease)
        for mac in [m for m, (_, until) in self._offers.items() if until <= now]:
            self._drop_offer(mac)
        for ip in [a for a, until in self._declined.items() if until <= now]:
            del self._declined[ip]
            self._settle(ip)
        resting = self._in_use_resting
        while resting:  # oldest first; stops at the first still resting
            ip = next(iter(resting))
            if resting[ip] > now:
                break
            del resting[ip]
            self._settle(ip)

    # -- persistence, for the shell: snapshot, write it (off the event loop), persisted --

    @property
    def dirty(self) -> bool:
        """Has the table changed since the last snapshot that was written?"""
        return self.config.state_path is not None and self._generation != self._saved_generation

    def snapshot(self) -> Snapshot:
        """The table as it is now (copies of two dicts of immutable records)."""
        assert self.config.state_path is not None, "no state file configured"
        return Snapshot(self.config.state_path, self._generation, dict(self._records),
                        dict(self._encoded), dict(self._declined))

    def persisted(self, snapshot: Snapshot) -> list[bytes]:
        """`snapshot` is on disk: the ACKs that waited for it, to be sent now."""
        if self._persist_failing:
            log.info("DHCP leases written to %s again", snapshot.path)
            self._persist_failing = False
        self._saved_generation = max(self._saved_generation, snapshot.generation)
        self._written = snapshot.written
        released = []
        for mac, (generation, ip, ack) in list(self._held.items()):
            if generation > snapshot.generation:
                continue
            del self._held[mac]
            record = self._records.get(mac)
            if record is None or record.ip != ip or mac not in self._bound:
                continue  # declined, NAKed or expired while it waited
            self.counters["ack"] += 1
            released.append(ack)
        return released

    def persist_failed(self, snapshot: Snapshot, error: OSError) -> None:
        """`snapshot` could not be written: its ACKs keep waiting (the shell tries again)."""
        self.counters["persist_failed"] += 1
        if not self._persist_failing:
            log.error("could not write DHCP leases to %s: %s (%d ACKs wait)", snapshot.path,
                      error, len(self._held))
            self._persist_failing = True

    def _mark_dirty(self) -> None:
        self._generation += 1
        if self.on_dirty is not None and self.config.state_path is not None:
            self.on_dirty()

    # -- step 0: what a client may do at all --

    def _budget(self, mac: bytes, now: float) -> _ClientBudget:
        port = self.port_of(mac) if self.port_of is not None else None
        key = mac if port is None else port
        budgets = self._budgets
        budget = budgets.get(key)
        if budget is None:
            if len(budgets) >= MAX_CLIENTS_TRACKED:
                budgets.popitem(last=False)
            budget = budgets[key] = _ClientBudget(now)
        else:
            budgets.move_to_end(key)
        return budget

    # -- step 2: frames we refuse whatever they ask --

    def _refuse(self, request: DhcpRequest) -> str | None:
        config = self.config
        if request.eth_dst not in (BROADCAST_MAC, config.server_mac):
            return "not_for_us"
        if request.ip_dst not in (IPV4_BROADCAST, config.gateway, config.subnet.broadcast_address):
            return "not_for_us"
        if request.eth_src[0] & 1 or request.eth_src == bytes(ETH_ADDR_LEN):
            return "bad_mac"
        if request.chaddr != request.eth_src:
            return "chaddr_mismatch"
        if request.giaddr != IPV4_UNSPECIFIED:
            return "relayed"
        return None

    # -- step 3: decisions, one method per message type --

    def _on_discover(self, request: DhcpRequest, now: float) -> list[bytes]:
        mac = request.chaddr
        ip = self._choose(request, now)
        if ip is None:
            return []
        previous = self._offers.pop(mac, None)
        if previous is not None and previous[0] != ip:
            del self._offered[previous[0]]
            self._settle(previous[0])
        if previous is None and len(self._offers) >= MAX_OFFERS:
            self._drop_offer(next(iter(self._offers)))  # the oldest: its REQUEST may still win
            self.counters["offer_evicted"] += 1
        self._offers[mac] = (ip, now + OFFER_HOLD_SECONDS)
        self._offered[ip] = mac
        self._settle(ip)
        log.debug("offer %s to %s", ip, format_mac(mac))
        self.counters["offer"] += 1
        return [self._reply(request, DHCPOFFER, yiaddr=ip, hostname=self._hostname_for(request))]

    def _on_request(self, request: DhcpRequest, now: float) -> list[bytes]:
        mac = request.chaddr
        if request.server_id is not None:  # SELECTING: the client chose an offer
            if request.server_id != self.config.gateway:
                self._drop_offer(mac)
                self.counters["other_server"] += 1
                return []
            if request.requested_ip is None:
                self.counters["bad_request"] += 1
                return []
            ip = request.requested_ip
        elif request.requested_ip is not None:  # INIT-REBOOT: "may I keep this address?"
            ip = request.requested_ip
        elif request.ciaddr != IPV4_UNSPECIFIED:  # RENEWING (unicast) or REBINDING (broadcast)
            ip = request.ciaddr
        else:
            self.counters["bad_request"] += 1
            return []

        refusal = self._available(ip, request, now)
        if refusal is not None:
            return self._nak(request, ip, refusal, now)
        old = self._records.get(mac)
        renewal = old is not None and old.ip == ip and mac in self._bound
        lease = Lease(
            mac=mac,
            ip=ip,
            expires=now + self.config.lease_seconds,
            hostname=request.hostname or (old.hostname if old is not None and old.ip == ip
                                          else None),
            client_id=request.client_id,
        )
        must_write = not renewal or self._must_write(lease)
        self._commit(lease)
        self._drop_offer(mac)
        if must_write:
            self._mark_dirty()
        if renewal:
            log.debug("lease renewed: %s %s", format_mac(mac), ip)
        else:
            log.info("lease granted: %s %s%s", format_mac(mac), ip,
                     f" ({lease.hostname})" if lease.hostname else "")
        if self.on_lease is not None:
            self.on_lease(lease)
        ack = self._reply(request, DHCPACK, yiaddr=ip, hostname=lease.hostname)
        if must_write and self.config.state_path is not None:
            self._held[mac] = (self._generation, ip, ack)  # sent by `persisted`
            return []
        self.counters["ack"] += 1
        return [ack]

    def _on_decline(self, request: DhcpRequest, now: float) -> list[bytes]:
        mac, ip = request.chaddr, request.requested_ip
        if request.server_id is not None and request.server_id != self.config.gateway:
            self.counters["other_server"] += 1
            return []
        record = self._records.get(mac)
        offered = self._offers.get(mac)
        held = record is not None and record.ip == ip and mac in self._bound
        # Only the address this MAC holds or was offered: a guest must not blacklist others'.
        if ip is None or not (held or (offered is not None and offered[0] == ip)):
            self.counters["decline_unknown"] += 1
            return []
        budget = self._budget(mac, now)
        if not budget.may_decline(now):
            self.counters["decline_over_budget"] += 1
            log.debug("DECLINE of %s by %s ignored: %d declines in %ds already", ip,
                      format_mac(mac), DECLINE_BUDGET, DECLINE_WINDOW_SECONDS)
            return []
        if len(self._declined) >= MAX_DECLINED:
            self.counters["decline_table_full"] += 1
            log.debug("DECLINE of %s by %s ignored: %d addresses rest already", ip,
                      format_mac(mac), MAX_DECLINED)
            return []
        budget.declines.append(now)
        self._declined[ip] = now + DECLINE_HOLD_SECONDS
        self._drop_offer(mac)
        was_bound = record is not None and record.ip == ip and self._forget(mac)
        self._mark_dirty()
        if was_bound and self.on_release is not None:
            self.on_release(record)
        log.warning("address declined (in use on the segment?): %s %s, resting %ds",
                    format_mac(mac), ip, DECLINE_HOLD_SECONDS)
        return []

    def _on_release(self, request: DhcpRequest, now: float) -> list[bytes]:
        mac = request.chaddr
        if request.server_id is not None and request.server_id != self.config.gateway:
            self.counters["other_server"] += 1
            return []
        record = self._records.get(mac)
        if record is None or record.ip != request.ciaddr or mac not in self._bound:
            self.counters["release_unknown"] += 1
            return []
        released = replace(record, expires=now)
        self._set_record(released)  # remembered: the client gets it back next time
        self._unbind(mac)
        self._mark_dirty()
        log.info("lease released: %s %s", format_mac(mac), record.ip)
        if self.on_release is not None:
            self.on_release(released)
        return []

    def _on_inform(self, request: DhcpRequest, now: float) -> list[bytes]:
        # RFC 2131 3.4: configuration only; no lease time, no yiaddr, sent to ciaddr.
        self.counters["ack"] += 1
        return [self._reply(request, DHCPACK, yiaddr=IPV4_UNSPECIFIED, lease=False)]

    def _nak(self, request: DhcpRequest, ip: IPv4Address, reason: str,
             now: float) -> list[bytes]:
        mac = request.chaddr
        record = self._records.get(mac)
        log.debug("NAK %s for %s: %s", ip, format_mac(mac), reason)
        if record is not None and record.ip == ip:
            # The client must stop using it; if its lease ran, it ends now.
            was_bound = self._forget(mac)
            self._mark_dirty()
            if was_bound and self.on_release is not None:
                self.on_release(record)
        self.counters["nak"] += 1
        self.counters[f"nak_{reason}"] += 1
        return [self._reply(request, DHCPNAK, yiaddr=IPV4_UNSPECIFIED, message=reason)]

    # -- the rules on addresses --

    def _available(self, ip: IPv4Address, request: DhcpRequest, now: float) -> str | None:
        """None if `ip` may be this client's now; else why not (a NAK reason)."""
        config, mac = self.config, request.chaddr
        if ip not in config.subnet:
            return "wrong_subnet"
        reserved = config.reservations.get(mac)
        if reserved is not None and ip != reserved:
            return "reserved_elsewhere"  # this client has a fixed address
        if reserved is None and not config.in_pool(ip):
            return "not_ours"
        owner = self._reserved_for.get(ip)
        if owner is not None and owner != mac:
            return "reserved"
        if ip in self._declined:
            return "declined"
        holder = self._by_ip.get(ip)
        if holder is not None and holder != mac and holder in self._bound:
            return "taken"
        offered_to = self._offered.get(ip)
        if offered_to is not None and offered_to != mac:
            return "taken"
        if self.in_use is not None and self.in_use(ip, mac):
            self.counters["in_use_elsewhere"] += 1
            return "in_use"
        return None

    def _choose(self, request: DhcpRequest, now: float) -> IPv4Address | None:
        """The address to offer (see the theory of operation for the order).  A handful of
        dict lookups and at most MAX_PROBES heap pops, whatever the size of the pool."""
        mac, config = request.chaddr, self.config
        reserved = config.reservations.get(mac)
        if reserved is not None:
            if self._available(reserved, request, now) is None:
                return reserved
            self.counters["reservation_in_use"] += 1
            log.warning("reserved address %s for %s is in use or declined; not offering",
                        reserved, format_mac(mac))
            return None
        candidates: list[IPv4Address] = []
        record = self._records.get(mac)
        if record is not None and mac in self._bound:
            candidates.append(record.ip)
        if mac in self._offers:
            candidates.append(self._offers[mac][0])
        if request.client_id is not None:
            same_client = self._by_client_id.get(request.client_id)
            if same_client is not None and same_client not in self._bound:
                candidates.append(self._records[same_client].ip)
        if record is not None:
            candidates.append(record.ip)
        if request.requested_ip is not None:
            candidates.append(request.requested_ip)
        for ip in candidates:
            if self._available(ip, request, now) is None:
                return ip
        ip, in_use = self._lowest_free(request, now)
        if ip is None:
            ip = self._longest_remembered(request, now)
        if ip is not None:
            self._exhausted = False
        elif in_use and self._free:
            # Not exhausted: the addresses probed are used by other ports and now rest; the
            # client's retransmission probes fresh ones.
            self.counters["no_offer_in_use"] += 1
            log.warning("no address for %s this time: the %d free addresses tried are used by "
                        "other ports (resting %ds; %d rest, %d free)", format_mac(mac), in_use,
                        IN_USE_HOLD_SECONDS, len(self._in_use_resting), len(self._free))
        else:
            self.counters["pool_exhausted"] += 1
            if not self._exhausted:  # once until an address is found again: clients retry
                log.warning("pool exhausted: no address for %s (%d addresses resting, used by "
                            "other ports)", format_mac(mac), len(self._in_use_resting))
            self._exhausted = True
        return ip

    def _lowest_free(self, request: DhcpRequest,
                     now: float) -> tuple[IPv4Address | None, int]:
        """The lowest free address `_available` to this client, and how many of those tried
        were in use by other ports (they leave the free set to rest: `IN_USE_HOLD_SECONDS`)."""
        heap, free = self._free_heap, self._free
        tried: list[int] = []
        in_use: list[IPv4Address] = []
        found = None
        while heap and len(tried) + len(in_use) < MAX_PROBES:
            number = heapq.heappop(heap)
            if number not in free or number in tried:
                continue  # taken since it was pushed, or a duplicate entry
            address = IPv4Address(number)
            refusal = self._available(address, request, now)
            if refusal is None:
                found = address
                tried.append(number)
                break
            if refusal == "in_use":
                in_use.append(address)
            else:
                tried.append(number)
        for number in tried:  # still free until the caller takes it
            heapq.heappush(heap, number)
        for address in in_use:
            self._in_use_resting[address] = now + IN_USE_HOLD_SECONDS
            self._settle(address)
            log.info("%s is used by another port: not offered for %ds", address,
                     IN_USE_HOLD_SECONDS)
        return found, len(in_use)

    def _longest_remembered(self, request: DhcpRequest, now: float) -> IPv4Address | None:
        heap = self._remembered
        tried: list[tuple[float, bytes]] = []
        found = None
        while heap and len(tried) < MAX_PROBES:
            entry = heapq.heappop(heap)
            expires, mac = entry
            record = self._records.get(mac)
            if record is None or mac in self._bound or record.expires != expires \
                    or entry in tried:
                continue
            tried.append(entry)
            if self._available(record.ip, request, now) is None:
                found = record.ip
                break
        for entry in tried:
            heapq.heappush(heap, entry)
        return found

    def _hostname_for(self, request: DhcpRequest) -> str | None:
        if request.hostname is not None:
            return request.hostname
        record = self._records.get(request.chaddr)
        return record.hostname if record is not None else None

    # -- the binding table: every change goes through here --

    def _commit(self, lease: Lease) -> None:
        """Make `lease` bound, forgetting the remembered record of its address if another's."""
        mac = lease.mac
        holder = self._by_ip.get(lease.ip)
        if holder is not None and holder != mac:
            assert holder not in self._bound, "_available let a running lease be taken"
            self._forget(holder)
        old = self._records.get(mac)
        was_bound = mac in self._bound
        self._set_record(lease)
        self._bind(mac)
        if old is not None and old.ip != lease.ip and was_bound and self.on_release is not None:
            self.on_release(old)

    def _set_record(self, lease: Lease) -> None:
        """Store `lease` as its MAC's record (its address has no other holder)."""
        old = self._records.get(lease.mac)
        if old is not None:
            self._unindex(old)
        self._records[lease.mac] = lease
        if self.config.state_path is not None:
            self._encoded[lease.mac] = encode_lease(lease)
        self._by_ip[lease.ip] = lease.mac
        if lease.client_id is not None:
            self._by_client_id[lease.client_id] = lease.mac
        self._settle(lease.ip)
        if old is not None and old.ip != lease.ip:
            self._settle(old.ip)

    def _forget(self, mac: bytes) -> bool:
        """Drop `mac`'s record altogether; True if its lease was running."""
        record = self._records.pop(mac)
        self._encoded.pop(mac, None)
        self._unindex(record)
        was_bound = mac in self._bound
        self._bound.discard(mac)
        self._held.pop(mac, None)
        self._settle(record.ip)
        return was_bound

    def _bind(self, mac: bytes) -> None:
        self._bound.add(mac)
        _push_bounded(self._expiries, (self._records[mac].expires, mac), len(self._bound),
                      lambda: [(self._records[m].expires, m) for m in self._bound])

    def _unbind(self, mac: bytes) -> None:
        self._bound.discard(mac)
        self._held.pop(mac, None)
        _push_bounded(self._remembered, (self._records[mac].expires, mac),
                      len(self._records) - len(self._bound),
                      lambda: [(r.expires, m) for m, r in self._records.items()
                               if m not in self._bound])

    def _unindex(self, record: Lease) -> None:
        if self._by_ip.get(record.ip) == record.mac:
            del self._by_ip[record.ip]
        if record.client_id is not None and self._by_client_id.get(record.client_id) == record.mac:
            del self._by_client_id[record.client_id]

    def _settle(self, ip: IPv4Address) -> None:
        """Put a pool address into the free set or take it out, after a change of the tables
        that concerns it: free means no record, no offer, not resting, not reserved."""
        number = int(ip)
        first, last = self._pool_range
        if not first <= number <= last or number == self._gateway_number \
                or ip in self._reserved_for:
            return
        if ip in self._by_ip or ip in self._offered or ip in self._declined \
                or ip in self._in_use_resting:
            self._free.discard(number)
        elif number not in self._free:
            self._free.add(number)
            _push_bounded(self._free_heap, number, len(self._free), lambda: list(self._free))

    def _drop_offer(self, mac: bytes) -> None:
        offer = self._offers.pop(mac, None)
        if offer is not None and self._offered.get(offer[0]) == mac:
            del self._offered[offer[0]]
            self._settle(offer[0])

    def _must_write(self, lease: Lease) -> bool:
        return lease.expires >= self._written.get(lease.mac, 0.0) + PERSIST_SLACK_SECONDS

    # -- replies (step 3) --

    def _reply(
        self,
        request: DhcpRequest,
        msg_type: int,
        *,
        yiaddr: IPv4Address,
        lease: bool = True,
        hostname: str | None = None,
        message: str | None = None,
    ) -> bytes:
        config = self.config
        head: list[tuple[int, bytes]] = [
            (OPT_MESSAGE_TYPE, bytes([msg_type])),
            (OPT_SERVER_ID, config.gateway.packed),
        ]
        extra: list[tuple[int, bytes]] = []
        if msg_type == DHCPNAK:
            if message is not None:
                head.append((OPT_MESSAGE, message.encode("ascii")))
        else:
            if lease:
                seconds = config.lease_seconds
                head += [
                    (OPT_LEASE_TIME, seconds.to_bytes(4, "big")),
                    (OPT_RENEWAL_TIME, (seconds // 2).to_bytes(4, "big")),
                    (OPT_REBINDING_TIME, (seconds * 7 // 8).to_bytes(4, "big")),
                ]
            head += [
                (OPT_SUBNET_MASK, config.subnet.netmask.packed),
                (OPT_ROUTER, config.gateway.packed),
            ]
            offered = {code: value for code, value in self._optional_options(hostname)}
            # RFC 2132 9.8: in the order the client asked for them, then the rest.
            order = [c for c in dict.fromkeys(request.param_request) if c in offered]
            order += [c for c in offered if c not in order]
            extra = [(code, offered[code]) for code in order]
        if request.client_id is not None:  # RFC 6842: echo it
            head.append((OPT_CLIENT_ID, request.client_id))

        budget = max(request.max_message_size or 0, MIN_MAX_MESSAGE_SIZE) - IP_UDP_OVERHEAD
        size = BOOTP_HEADER_LEN + sum(2 + len(v) for _, v in head) + 1
        options = list(head)
        for code, value in extra:  # trimmed from the end to fit the client's maximum
            if size + 2 + len(value) > budget:
                self.counters["option_trimmed"] += 1
                continue
            size += 2 + len(value)
            options.append((code, value))

        dst_mac, dst_ip = self._destination(request, msg_type, yiaddr)
        message_bytes = bytes(
            dpkt.dhcp.DHCP(
                op=BOOTREPLY,
                hrd=HTYPE_ETHERNET,
                hln=ETH_ADDR_LEN,
                xid=request.xid,
                flags=request.flags & BROADCAST_FLAG,
                ciaddr=int(request.ciaddr) if msg_type == DHCPACK else 0,
                yiaddr=int(yiaddr),
                chaddr=request.chaddr,
                opts=options,
            )
        )
        message_bytes = message_bytes.ljust(BOOTP_MIN_LEN, b"\x00")
        # dpkt quirk: UDP.ulen is not filled in by bytes(); set it ourselves.
        udp = dpkt.udp.UDP(sport=SERVER_PORT, dport=CLIENT_PORT,
                           ulen=UDP_HEADER_LEN + len(message_bytes), data=message_bytes)
        ip = dpkt.ip.IP(src=config.gateway.packed, dst=dst_ip.packed, p=IPPROTO_UDP, ttl=64,
                        data=udp)  # bytes() fills in both checksums (sum == 0)
        ethernet = dpkt.ethernet.Ethernet(dst=dst_mac, src=config.server_mac, type=ETH_P_IP,
                                          data=ip)
        return bytes(ethernet)

    def _optional_options(self, hostname: str | None) -> list[tuple[int, bytes]]:
        config = self.config
        options: list[tuple[int, bytes]] = []
        if config.dns:
            options.append((OPT_DNS, b"".join(a.packed for a in config.dns)))
        if config.domain is not None:
            options.append((OPT_DOMAIN, config.domain.encode("ascii")))
        if config.mtu is not None:
            options.append((OPT_MTU, config.mtu.to_bytes(2, "big")))
        if hostname is not None:
            options.append((OPT_HOSTNAME, hostname.encode("ascii")))
        return options

    @staticmethod
    def _destination(request: DhcpRequest, msg_type: int,
                     yiaddr: IPv4Address) -> tuple[bytes, IPv4Address]:
        """RFC 2131 4.1, with giaddr always 0: NAKs are broadcast; replies to a client that
        has an address go to it; a client that asked for broadcast, or whom we give no
        address, gets a broadcast; else unicast to the new address at the client's MAC."""
        if msg_type == DHCPNAK:
            return BROADCAST_MAC, IPV4_BROADCAST
        if request.ciaddr != IPV4_UNSPECIFIED:
            return request.chaddr, request.ciaddr
        if request.flags & BROADCAST_FLAG or yiaddr == IPV4_UNSPECIFIED:
            return BROADCAST_MAC, IPV4_BROADCAST
        return request.chaddr, yiaddr

    # -- loading the state file (once, at construction) --

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as error:
            self._set_aside(path, f"unreadable: {error}")
            return
        try:
            document = json.loads(raw)
            if not isinstance(document, dict):
                raise ValueError(f"top level is {type(document).__name__}, want an object")
            if document.get("version") != STATE_VERSION:
                raise ValueError(f"version {document.get('version')!r}, want {STATE_VERSION}")
            entries, declined = document["leases"], document.get("declined", [])
            if not isinstance(entries, list) or not isinstance(declined, list):
                raise ValueError("'leases' and 'declined' must be lists")
        except (ValueError, KeyError) as error:  # JSONDecodeError and UnicodeError are ValueErrors
            self._set_aside(path, str(error))
            return
        now = self.clock()
        for entry in entries:
            try:
                lease = self._lease_from_json(entry)
            except (ValueError, TypeError, KeyError) as error:
                self.counters["state_entry_skipped"] += 1
                log.warning("%s: skipping lease entry %.200r: %s", path, entry, error)
                continue
            self._load_lease(path, lease, now)
        for entry in declined:
            try:
                ip, until = IPv4Address(entry["ip"]), float(entry["until"])
            except (ValueError, TypeError, KeyError) as error:
                log.warning("%s: skipping declined entry %.200r: %s", path, entry, error)
                continue
            if until > now and ip in self.config.subnet and len(self._declined) < MAX_DECLINED:
                self._declined[ip] = until
                self._settle(ip)
        log.info("%d DHCP leases loaded from %s (%d running)", len(self._records), path,
                 len(self._bound))

    def _lease_from_json(self, entry: object) -> Lease:
        if not isinstance(entry, dict):
            raise TypeError(f"entry is {type(entry).__name__}, want an object")
        ip = IPv4Address(entry["ip"])
        if not self.config.is_host(ip) or ip == self.config.gateway:
            raise ValueError(f"{ip} is not a client address of {self.config.subnet}")
        hostname, client_id = entry.get("hostname"), entry.get("client_id")
        if hostname is not None and not (
            isinstance(hostname, str) and HOSTNAME_RE.fullmatch(hostname)
        ):
            raise ValueError(f"bad hostname {hostname!r}")
        if client_id is not None:
            client_id = bytes.fromhex(client_id)
            if not CLIENT_ID_MIN_LEN <= len(client_id) <= OPTION_MAX_LEN:
                raise ValueError(f"client_id of {len(client_id)} bytes")
        expires = entry["expires"]
        if not isinstance(expires, int | float) or expires != expires:  # NaN
            raise TypeError(f"expires {expires!r} is not a number")
        return Lease(parse_mac(entry["mac"]), ip, float(expires), hostname, client_id)

    def _load_lease(self, path: Path, lease: Lease, now: float) -> None:
        on_disk, bound = lease.expires, lease.expires > now
        if bound:  # what is on disk may lag the lease the client got by the slack
            lease = replace(lease, expires=lease.expires + PERSIST_SLACK_SECONDS)
        for other_mac in (lease.mac, self._by_ip.get(lease.ip)):
            other = self._records.get(other_mac) if other_mac is not None else None
            if other is None:
                continue
            # Never two records for one MAC or one address; a running lease beats a
            # remembered one, a later one an earlier one.
            if (other_mac in self._bound, other.expires) >= (bound, lease.expires):
                log.warning("%s: skipping duplicate lease %s %s", path, format_mac(lease.mac),
                            lease.ip)
                self.counters["state_entry_skipped"] += 1
                return
            self._forget(other_mac)
        self._set_record(lease)
        self._written[lease.mac] = on_disk
        if bound:
            self._bind(lease.mac)
        else:
            self._unbind(lease.mac)

    def _set_aside(self, path: Path, why: str) -> None:
        target = path.with_name(path.name + ".corrupt")
        n = 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt.{n}")
        try:
            os.replace(path, target)
        except OSError as error:
            log.error("DHCP state file %s is %s, and could not be moved aside: %s; "
                      "starting with no leases", path, why, error)
        else:
            log.error("DHCP state file %s is %s; moved to %s, starting with no leases",
                      path, why, target)
        self.counters["state_corrupt"] += 1


def encode_lease(lease: Lease) -> bytes:
    """One entry of the state file's "leases" list."""
    return json.dumps({
        "mac": format_mac(lease.mac),
        "ip": str(lease.ip),
        "expires": lease.expires,
        "hostname": lease.hostname,
        "client_id": None if lease.client_id is None else lease.client_id.hex(),
    }, sort_keys=True, separators=(",", ":")).encode()


def encode_state(leases: Iterable[bytes], declined: Mapping[IPv4Address, float]) -> bytes:
    """The state file's bytes (see "Persistence" above) from encoded leases (`encode_lease`)."""
    rested = json.dumps([{"ip": str(ip), "until": until} for ip, until in declined.items()],
                        separators=(",", ":")).encode()
    return (b'{"declined":' + rested + b',"leases":[' + b",".join(leases)
            + b'],"version":%d}' % STATE_VERSION)


def _push_bounded(heap: list, entry: object, live_count: int,
                  live: Callable[[], list]) -> None:
    """Push `entry` on a heap whose stale entries are skipped when popped; once they make up
    more than half of it, rebuild it from `live` (amortized O(log n) a push)."""
    heapq.heappush(heap, entry)
    if len(heap) > 2 * live_count + HEAP_SLACK:
        heap[:] = live()
        heapq.heapify(heap)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data`: temp file in the same directory, fsync, rename, fsync dir."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# The state transitions, one entry per client message type (RFC 2131 4.3).
_TRANSITIONS: dict[int, Callable[[DhcpServer, DhcpRequest, float], list[bytes]]] = {
    DHCPDISCOVER: DhcpServer._on_discover,
    DHCPREQUEST: DhcpServer._on_request,
    DHCPDECLINE: DhcpServer._on_decline,
    DHCPRELEASE: DhcpServer._on_release,
    DHCPINFORM: DhcpServer._on_inform,
}
