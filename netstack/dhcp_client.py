"""A DHCPv4 client (RFC 2131/2132) for `vhostvpn host --tun`: Ethernet frames in, frames out.

The host joins the segment with its own MAC (netstack.l3host); this client gets that MAC
an address from the segment's DHCP server (netstack.dhcp on the hub).  No sockets, no
clock: every call takes `now` (monotonic seconds), `next_deadline()` says when `tick` is
due.  The shell hands `handle` the frames for which `is_dhcp_reply` is true (before
L3Host sees them: a DHCP reply must not reach the host's kernel) and sends what comes
back; `on_bound(lease)` and `on_lost()` tell it to configure or unconfigure the TUN.

Theory of operation (RFC 2131 4.4, figure 5)
---------------------------------------------
    INIT ──DISCOVER (broadcast)──► SELECTING ──OFFER──► REQUESTING ──ACK──► BOUND
    REQUESTING ──NAK, or no answer after REQUEST_ATTEMPTS──► INIT
    BOUND ──T1──► RENEWING: REQUEST unicast to the server (ciaddr set)
    RENEWING ──T2──► REBINDING: REQUEST broadcast (ciaddr set)
    RENEWING/REBINDING ──ACK──► BOUND (times restart)      ──NAK──► INIT (on_lost)
    any bound state ──lease expiry──► INIT (on_lost), a new DISCOVER at once

* Retransmission (4.1): 4, 8, 16, 32, 64, 64 ... seconds, each randomized by a uniform
  -1..+1 s.  In RENEWING/REBINDING (4.4.5): half the time left until T2 / until expiry,
  at least 60 s, never past the state's end.  A new transaction gets a new random xid;
  retransmissions keep it, and the REQUEST that answers an OFFER keeps the OFFER's.
* The lease runs from when its REQUEST was first sent (4.4.1), so it never ends later
  than the server thinks.  T1 and T2 default to 0.5 and 0.875 of the lease (4.4.5) and are
  replaced by the defaults when they are not 0 < T1 <= T2 <= lease.
* After a NAK the first DISCOVER goes at once; consecutive NAKs wait 4, 8, ... 64 s, so a
  confused server cannot make us spin.
* Renewal is sent to the server's MAC as the last ACK's Ethernet source showed it (on the
  hub, the gateway's MAC): the client needs no ARP of its own.

What it accepts: a frame to our MAC or broadcast; IPv4 (header checksum valid, not a
fragment), UDP 67 -> 68 with a valid checksum (unless 0 or left partial by checksum
offload); a BOOTREPLY for Ethernet with our xid, our chaddr, the magic cookie and a DHCP
message type; options checked against their lengths (with overload, RFC 2131 4.1).  An
OFFER needs a usable address and a server identifier, an ACK a lease time; the answer
must fit the state we are in.  Everything else is dropped and counted, never raised.

Not done: the initial 1-10 s random wait (4.4.1: we are one client, not a boot storm),
collecting several OFFERs (we take the first), ARP-probing the offered address and
DECLINE, INIT-REBOOT, INFORM, the broadcast flag (we receive unicast to our MAC).
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import dpkt

from netstack.frame import (
    ETH_ADDR_LEN,
    ETH_HEADER_LEN,
    ETH_P_IP,
    ETHERTYPE_IP,
    HDR_F_NEEDS_CSUM,
    Frame,
)
from netstack.wire.checksum import pseudo_header_sum, sum16, verifies

# --- Numbers from the specs ---------------------------------------------------------------

BROADCAST_MAC = b"\xff" * ETH_ADDR_LEN
IPV4_BROADCAST = IPv4Address("255.255.255.255")
IPV4_UNSPECIFIED = IPv4Address("0.0.0.0")
IPV4_MIN_HEADER_LEN = 20
IPV4_FRAG_MASK = 0x3FFF  # MF and the fragment offset
IPPROTO_UDP = 17
UDP_HEADER_LEN = 8
SERVER_PORT, CLIENT_PORT = 67, 68
BOOTP_HEADER = struct.Struct("!BBBBIHHIIII16s64s128sI")
BOOTP_HEADER_LEN = BOOTP_HEADER.size  # 240, with the magic cookie
SNAME_OFFSET, SNAME_LEN = 44, 64
FILE_OFFSET, FILE_LEN = 108, 128
BOOTREQUEST, BOOTREPLY = 1, 2
HTYPE_ETHERNET = 1
MAGIC_COOKIE = dpkt.dhcp.DHCP_MAGIC
BOOTP_MIN_LEN = 300  # RFC 951: some servers drop shorter messages

OPT_PAD, OPT_END = 0, 255
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
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_CLIENT_ID = 61
OVERLOAD_FILE, OVERLOAD_SNAME = 1, 2

DHCPDISCOVER, DHCPOFFER, DHCPREQUEST, DHCPDECLINE = 1, 2, 3, 4
DHCPACK, DHCPNAK, DHCPRELEASE = 5, 6, 7
INFINITE_LEASE = 0xFFFFFFFF  # RFC 2132 9.2
MIN_MTU = 68  # RFC 2132 5.1

# RFC 2131 4.1 and 4.4.5.
FIRST_RETRANSMIT = 4.0
MAX_RETRANSMIT = 64.0
RETRANSMIT_JITTER = 1.0
MIN_RENEW_RETRANSMIT = 60.0
T1_FRACTION, T2_FRACTION = 0.5, 0.875

# --- Our own choices ----------------------------------------------------------------------

REQUEST_ATTEMPTS = 4  # REQUESTs answering an OFFER before starting over
MAX_MESSAGE_SIZE = 1500  # option 57: what we accept
PARAMETERS = bytes([OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_DOMAIN, OPT_MTU,
                    OPT_LEASE_TIME, OPT_SERVER_ID, OPT_RENEWAL_TIME, OPT_REBINDING_TIME])

INIT, SELECTING, REQUESTING = "init", "selecting", "requesting"
BOUND, RENEWING, REBINDING = "bound", "renewing", "rebinding"
STOPPED = "stopped"  # before start() and after release()


@dataclass(frozen=True)
class DhcpLease:
    """What an ACK gave us.  Times are absolute, on the caller's clock (`now`)."""

    address: IPv4Interface
    server: IPv4Address  # the server identifier
    server_mac: bytes
    router: IPv4Address | None
    dns: tuple[IPv4Address, ...]
    mtu: int | None
    domain: str | None
    lease_seconds: int  # as granted; INFINITE_LEASE for an infinite one
    obtained: float
    renew_at: float  # T1
    rebind_at: float  # T2
    expires: float


def is_dhcp_reply(frame: Frame) -> bool:
    """Whether `frame` is IPv4/UDP from port 67 to port 68 (fixed offsets, nothing checked)."""
    data = frame.data
    if len(data) < ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN + UDP_HEADER_LEN \
            or data[12:14] != ETHERTYPE_IP or data[23] != IPPROTO_UDP:
        return False
    udp_at = ETH_HEADER_LEN + (data[14] & 0x0F) * 4
    return bytes(data[udp_at:udp_at + 4]) == b"\x00\x43\x00\x44"


class _Drop(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Reply:
    msg_type: int
    xid: int
    yiaddr: IPv4Address
    eth_src: bytes
    ip_src: IPv4Address
    options: dict[int, bytes]


class DhcpClient:
    """One MAC's lease.  Call `start`, then `handle`/`tick` as frames and deadlines come."""

    def __init__(
        self,
        mac: bytes,
        *,
        hostname: str | None = None,
        rng: random.Random | None = None,
        on_bound: Callable[[DhcpLease], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        if not isinstance(mac, bytes) or len(mac) != ETH_ADDR_LEN or mac[0] & 1:
            raise ValueError(f"mac must be 6 bytes of a unicast address, got {mac!r}")
        if hostname is not None and not 0 < len(hostname.encode("ascii")) <= 255:
            raise ValueError(f"hostname {hostname!r} must be 1..255 ASCII bytes")
        self.mac = mac
        self.hostname = hostname
        self.rng = rng or random.Random()
        self.on_bound = on_bound
        self.on_lost = on_lost
        self.counters: Counter[str] = Counter()
        self.state = STOPPED
        self.lease: DhcpLease | None = None
        self.xid = 0
        self._deadline: float | None = None
        self._attempts = 0  # transmissions of the current message
        self._began = 0.0  # when the current transaction began (the secs field, the lease)
        self._offer: tuple[IPv4Address, IPv4Address] | None = None  # (address, server id)
        self._naks = 0  # in a row

    # -- the caller's interface -------------------------------------------------------------

    def start(self, now: float) -> list[Frame]:
        """Begin (or begin again): DISCOVER."""
        self.counters["start"] += 1
        return self._discover(now)

    def release(self, now: float) -> list[Frame]:
        """Give the lease back (RELEASE, unicast to the server) and stop."""
        lease, frames = self.lease, []
        if lease is not None and self.state in (BOUND, RENEWING, REBINDING):
            self.xid = self._new_xid()
            self.counters["release"] += 1
            frames.append(self._message(DHCPRELEASE, now, ciaddr=lease.address.ip,
                                        server_id=lease.server, to_server=True))
        self.state, self._deadline = STOPPED, None
        self._lose()
        return frames

    def handle(self, frame: Frame, now: float) -> list[Frame]:
        """A frame from the segment (one `is_dhcp_reply` accepts): the frames to send."""
        try:
            reply = self._parse(frame)
        except _Drop as drop:
            self.counters[drop.reason] += 1
            return []
        if reply.xid != self.xid or self.state not in _TRANSITIONS:
            self.counters["unexpected"] += 1
            return []
        transition = _TRANSITIONS[self.state].get(reply.msg_type)
        if transition is None:
            self.counters[f"unexpected_type_{reply.msg_type}"] += 1
            return []
        return transition(self, reply, now)

    def tick(self, now: float) -> list[Frame]:
        """Retransmit, or move on to RENEWING, REBINDING or INIT, when due."""
        if self._deadline is None or now < self._deadline:
            return []
        lease, state = self.lease, self.state
        if state in (BOUND, RENEWING, REBINDING):
            assert lease is not None
            if now >= lease.expires:
                self.counters["expired"] += 1
                self._lose()
                return self._discover(now)
            if now >= lease.rebind_at and state != REBINDING:
                self.state, self._attempts, self.xid = REBINDING, 0, self._new_xid()
                self._began = now
                return self._renew(now)
            if state == BOUND:
                self.state, self._attempts, self.xid = RENEWING, 0, self._new_xid()
                self._began = now
            return self._renew(now)
        if state == REQUESTING and self._attempts >= REQUEST_ATTEMPTS:
            self.counters["request_timeout"] += 1
            return self._discover(now)
        if state == REQUESTING:
            return self._request_offer(now)
        return self._discover(now, retransmit=state == SELECTING)

    def next_deadline(self) -> float | None:
        return self._deadline

    # -- transitions on replies (one method per state and message type) ------------------------

    def _selecting_offer(self, reply: _Reply, now: float) -> list[Frame]:
        server_id = self._option_address(reply.options, OPT_SERVER_ID)
        if server_id is None or not _usable(reply.yiaddr):
            self.counters["bad_offer"] += 1
            return []
        self.counters["offer"] += 1
        self._offer = (reply.yiaddr, server_id)
        self.state, self._attempts, self._began = REQUESTING, 0, now
        return self._request_offer(now)

    def _ack(self, reply: _Reply, now: float) -> list[Frame]:
        lease = self._lease_from(reply, now)
        if lease is None:
            return []
        if self.lease is not None and self.lease.address != lease.address:
            self._lose()  # a renewal that moved us: the old address is gone
        self.counters["ack"] += 1
        self.lease, self.state, self._naks, self._attempts = lease, BOUND, 0, 0
        self._deadline = None if lease.renew_at == float("inf") else lease.renew_at
        if self.on_bound is not None:
            self.on_bound(lease)
        return []

    def _nak(self, reply: _Reply, now: float) -> list[Frame]:
        server_id = self._option_address(reply.options, OPT_SERVER_ID)
        expected = self._offer[1] if self.state == REQUESTING and self._offer else None
        if expected is not None and server_id not in (None, expected):
            self.counters["nak_other_server"] += 1
            return []
        self.counters["nak"] += 1
        self._naks += 1
        self._lose()
        if self._naks == 1:
            return self._discover(now)
        self.state, self._attempts = INIT, 0
        self._deadline = now + min(FIRST_RETRANSMIT * 2 ** (self._naks - 2), MAX_RETRANSMIT)
        return []

    # -- sending -----------------------------------------------------------------------------

    def _discover(self, now: float, *, retransmit: bool = False) -> list[Frame]:
        if not retransmit:
            self.state, self._attempts, self._began = SELECTING, 0, now
            self.xid, self._offer = self._new_xid(), None
        self._schedule(now, self._backoff())
        self.counters["discover"] += 1
        return [self._message(DHCPDISCOVER, now)]

    def _request_offer(self, now: float) -> list[Frame]:
        assert self._offer is not None
        address, server_id = self._offer
        self._schedule(now, self._backoff())
        self.counters["request"] += 1
        return [self._message(DHCPREQUEST, now, requested=address, server_id=server_id)]

    def _renew(self, now: float) -> list[Frame]:
        """A REQUEST with ciaddr: unicast to the server in RENEWING, broadcast in REBINDING."""
        lease = self.lease
        assert lease is not None
        end = lease.rebind_at if self.state == RENEWING else lease.expires
        self._deadline = min(now + max((end - now) / 2, MIN_RENEW_RETRANSMIT), end)
        self._attempts += 1
        self.counters[self.state] += 1
        return [self._message(DHCPREQUEST, now, ciaddr=lease.address.ip,
                              to_server=self.state == RENEWING)]

    def _backoff(self) -> float:
        delay = min(FIRST_RETRANSMIT * 2 ** self._attempts, MAX_RETRANSMIT)
        return delay + self.rng.uniform(-RETRANSMIT_JITTER, RETRANSMIT_JITTER)

    def _schedule(self, now: float, delay: float) -> None:
        self._attempts += 1
        self._deadline = now + delay

    def _message(self, msg_type: int, now: float, *, ciaddr: IPv4Address = IPV4_UNSPECIFIED,
                 requested: IPv4Address | None = None, server_id: IPv4Address | None = None,
                 to_server: bool = False) -> Frame:
        options: list[tuple[int, bytes]] = [(OPT_MESSAGE_TYPE, bytes([msg_type])),
                                            (OPT_CLIENT_ID, b"\x01" + self.mac)]
        if requested is not None:
            options.append((OPT_REQUESTED_IP, requested.packed))
        if server_id is not None:
            options.append((OPT_SERVER_ID, server_id.packed))
        if msg_type != DHCPRELEASE:
            options.append((OPT_MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE.to_bytes(2, "big")))
            if self.hostname is not None:
                options.append((OPT_HOSTNAME, self.hostname.encode("ascii")))
            options.append((OPT_PARAM_REQUEST, PARAMETERS))
        secs = min(int(now - self._began), 0xFFFF) if msg_type != DHCPRELEASE else 0
        message = bytes(dpkt.dhcp.DHCP(op=BOOTREQUEST, hrd=HTYPE_ETHERNET, hln=ETH_ADDR_LEN,
                                       xid=self.xid, secs=max(secs, 0), flags=0,
                                       ciaddr=int(ciaddr), chaddr=self.mac, opts=options))
        message = message.ljust(BOOTP_MIN_LEN, b"\x00")
        if to_server:
            assert self.lease is not None
            eth_dst, ip_dst = self.lease.server_mac, self.lease.server
        else:
            eth_dst, ip_dst = BROADCAST_MAC, IPV4_BROADCAST
        # dpkt quirk: UDP.ulen is not filled in by bytes(); set it ourselves.
        udp = dpkt.udp.UDP(sport=CLIENT_PORT, dport=SERVER_PORT,
                           ulen=UDP_HEADER_LEN + len(message), data=message)
        ip = dpkt.ip.IP(src=ciaddr.packed, dst=ip_dst.packed, p=IPPROTO_UDP, ttl=64, data=udp)
        ethernet = dpkt.ethernet.Ethernet(dst=eth_dst, src=self.mac, type=ETH_P_IP, data=ip)
        return Frame(bytes(ethernet))

    def _new_xid(self) -> int:
        return self.rng.getrandbits(32)

    def _lose(self) -> None:
        if self.lease is None:
            return
        self.lease = None
        self.counters["lost"] += 1
        if self.on_lost is not None:
            self.on_lost()

    # -- the lease from an ACK ---------------------------------------------------------------

    def _lease_from(self, reply: _Reply, now: float) -> DhcpLease | None:
        options = reply.options
        seconds = self._option_int(options, OPT_LEASE_TIME, 4)
        if seconds is None or seconds == 0 or not _usable(reply.yiaddr):
            self.counters["bad_ack"] += 1
            return None
        if self.state in (RENEWING, REBINDING) and self.lease is not None:
            server = self._option_address(options, OPT_SERVER_ID) or self.lease.server
        else:
            server = self._option_address(options, OPT_SERVER_ID) or reply.ip_src
        start = self._began  # RFC 2131 4.4.1: from when the REQUEST was first sent
        if seconds == INFINITE_LEASE:
            renew = rebind = expires = float("inf")
        else:
            t1 = self._option_int(options, OPT_RENEWAL_TIME, 4)
            t2 = self._option_int(options, OPT_REBINDING_TIME, 4)
            if t1 is None or t2 is None or not 0 < t1 <= t2 <= seconds:
                if t1 is not None or t2 is not None:
                    self.counters["bad_t1_t2"] += 1
                t1, t2 = seconds * T1_FRACTION, seconds * T2_FRACTION
            renew, rebind, expires = start + t1, start + t2, start + seconds
        mtu = self._option_int(options, OPT_MTU, 2)
        routers = self._addresses(options, OPT_ROUTER)
        domain = options.get(OPT_DOMAIN, b"").rstrip(b"\x00")
        return DhcpLease(
            address=IPv4Interface((reply.yiaddr, self._prefix(options, reply.yiaddr))),
            server=server,
            server_mac=reply.eth_src,
            router=routers[0] if routers else None,
            dns=tuple(self._addresses(options, OPT_DNS)),
            mtu=mtu if mtu is not None and mtu >= MIN_MTU else None,
            domain=domain.decode("ascii") if domain and domain.isascii() else None,
            lease_seconds=seconds,
            obtained=start,
            renew_at=renew,
            rebind_at=rebind,
            expires=expires,
        )

    def _prefix(self, options: dict[int, bytes], address: IPv4Address) -> int:
        mask = options.get(OPT_SUBNET_MASK)
        if mask is not None and len(mask) == 4:
            try:
                return IPv4Network(f"0.0.0.0/{IPv4Address(mask)}").prefixlen
            except ValueError:
                self.counters["bad_subnet_mask"] += 1
        first = address.packed[0]  # no usable mask: the classful one (RFC 2131 leaves it open)
        return 8 if first < 128 else 16 if first < 192 else 24

    def _addresses(self, options: dict[int, bytes], code: int) -> list[IPv4Address]:
        value = options.get(code, b"")
        if len(value) % 4:
            self.counters[f"bad_option_{code}"] += 1
            return []
        return [IPv4Address(value[i:i + 4]) for i in range(0, len(value), 4)]

    def _option_address(self, options: dict[int, bytes], code: int) -> IPv4Address | None:
        value = self._option_int(options, code, 4)
        return None if value is None else IPv4Address(value)

    def _option_int(self, options: dict[int, bytes], code: int, size: int) -> int | None:
        value = options.get(code)
        if value is None:
            return None
        if len(value) != size:
            self.counters[f"bad_option_{code}"] += 1
            return None
        return int.from_bytes(value, "big")

    # -- parsing -----------------------------------------------------------------------------

    def _parse(self, frame: Frame) -> _Reply:
        data = bytes(frame.data)
        if len(data) < ETH_HEADER_LEN + IPV4_MIN_HEADER_LEN + UDP_HEADER_LEN:
            raise _Drop("malformed")
        eth_dst, eth_src = data[0:6], data[6:12]
        if eth_dst != self.mac and eth_dst != BROADCAST_MAC:
            raise _Drop("not_for_us")
        if data[12:14] != ETHERTYPE_IP:
            raise _Drop("not_dhcp")
        ihl = (data[14] & 0x0F) * 4
        (total,) = struct.unpack_from("!H", data, 16)
        if data[14] >> 4 != 4 or ihl < IPV4_MIN_HEADER_LEN or \
                not ihl + UDP_HEADER_LEN <= total <= len(data) - ETH_HEADER_LEN:
            raise _Drop("malformed")
        header = data[ETH_HEADER_LEN:ETH_HEADER_LEN + ihl]
        if not verifies(sum16(header)):
            raise _Drop("bad_checksum")
        (frag,) = struct.unpack_from("!H", data, 20)
        if frag & IPV4_FRAG_MASK:
            raise _Drop("fragment")
        udp_at = ETH_HEADER_LEN + ihl
        sport, dport, udp_len, udp_sum = struct.unpack_from("!HHHH", data, udp_at)
        if data[23] != IPPROTO_UDP or (sport, dport) != (SERVER_PORT, CLIENT_PORT):
            raise _Drop("not_dhcp")
        if not UDP_HEADER_LEN <= udp_len <= total - ihl:
            raise _Drop("malformed")
        udp = data[udp_at:udp_at + udp_len]
        if udp_sum and not frame.offload[0] & HDR_F_NEEDS_CSUM:
            pseudo = pseudo_header_sum(header[12:16], header[16:20], IPPROTO_UDP, udp_len)
            if not verifies(pseudo + sum16(udp)):
                raise _Drop("bad_checksum")
        message = udp[UDP_HEADER_LEN:]
        if len(message) < BOOTP_HEADER_LEN:
            raise _Drop("malformed")
        (op, htype, hlen, _hops, xid, _secs, _flags, _ciaddr, yiaddr, _siaddr, _giaddr, chaddr,
         _sname, _file, cookie) = BOOTP_HEADER.unpack_from(message)  # fmt: skip
        if op != BOOTREPLY or htype != HTYPE_ETHERNET or hlen != ETH_ADDR_LEN \
                or cookie != MAGIC_COOKIE:
            raise _Drop("not_dhcp")
        if chaddr[:ETH_ADDR_LEN] != self.mac:
            raise _Drop("not_for_us")
        options = _parse_options(message)
        msg_type = options.get(OPT_MESSAGE_TYPE)
        if msg_type is None or len(msg_type) != 1:
            raise _Drop("no_message_type")
        return _Reply(msg_type[0], xid, IPv4Address(yiaddr), eth_src,
                      IPv4Address(header[12:16]), options)


def _usable(address: IPv4Address) -> bool:
    return not (address.is_unspecified or address.is_multicast or address.is_loopback
                or address == IPV4_BROADCAST or address.packed[0] == 0)


def _parse_options(message: bytes) -> dict[int, bytes]:
    """Options of the main area, then `file` and `sname` when overloaded (RFC 2131 4.1);
    split options are concatenated (RFC 3396)."""
    options: dict[int, bytearray] = {}
    _scan(message[BOOTP_HEADER_LEN:], options)
    overload = options.pop(OPT_OVERLOAD, None)
    if overload is not None:
        if len(overload) != 1:
            raise _Drop("bad_option")
        more: dict[int, bytearray] = {}
        if overload[0] & OVERLOAD_FILE:
            _scan(message[FILE_OFFSET:FILE_OFFSET + FILE_LEN], more)
        if overload[0] & OVERLOAD_SNAME:
            _scan(message[SNAME_OFFSET:SNAME_OFFSET + SNAME_LEN], more)
        more.pop(OPT_OVERLOAD, None)
        for code, value in more.items():
            options.setdefault(code, bytearray()).extend(value)
    return {code: bytes(value) for code, value in options.items()}


def _scan(area: bytes, into: dict[int, bytearray]) -> None:
    i = 0
    while i < len(area):
        code = area[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return
        if i + 1 >= len(area) or i + 2 + area[i + 1] > len(area):
            raise _Drop("bad_option")
        into.setdefault(code, bytearray()).extend(area[i + 2:i + 2 + area[i + 1]])
        i += 2 + area[i + 1]


# The state machine: which reply each state takes, and what it does (RFC 2131 figure 5).
_TRANSITIONS: dict[str, dict[int, Callable[[DhcpClient, _Reply, float], list[Frame]]]] = {
    SELECTING: {DHCPOFFER: DhcpClient._selecting_offer},
    REQUESTING: {DHCPACK: DhcpClient._ack, DHCPNAK: DhcpClient._nak},
    RENEWING: {DHCPACK: DhcpClient._ack, DHCPNAK: DhcpClient._nak},
    REBINDING: {DHCPACK: DhcpClient._ack, DHCPNAK: DhcpClient._nak},
}
