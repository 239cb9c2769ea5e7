"""A DHCPv4 client (RFC 2131/2132) for `vhostvpn host --tun`: Ethernet frames in, frames out.

The host joins the segment with its own MAC (netstack.host.l3host); this client gets that MAC
an address from the segment's DHCP server (netstack.gateway.dhcp_server on the hub); the
messages are read and written by the one DHCP codec (netstack.wire.dhcp).  No sockets, no
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

What it accepts: a frame to our MAC or broadcast that the codec reads as a BOOTREPLY
(IPv4 header checksum valid, not a fragment, UDP 67 -> 68 with a valid checksum unless 0 or
left partial by checksum offload, Ethernet, the magic cookie, options checked against their
lengths with overload, a message type; the drop reasons are the codec's), with our xid and
our chaddr.  An OFFER needs a usable address and a server identifier, an ACK a lease time;
an optional option of the wrong size is ignored and counted (`bad_option_<code>`); the
answer must fit the state we are in.  Everything else is dropped and counted, never raised.

Not done: the initial 1-10 s random wait (4.4.1: we are one client, not a boot storm),
collecting several OFFERs (we take the first), ARP-probing the offered address and
DECLINE, INIT-REBOOT, INFORM, the broadcast flag (we receive unicast to our MAC).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from netstack.frame import ETH_ADDR_LEN, ETH_HEADER_LEN, ETHERTYPE_IP, HDR_F_NEEDS_CSUM, Frame
from netstack.wire import IPPROTO_UDP, Malformed
from netstack.wire.dhcp import (
    BOOTREPLY,
    BOOTREQUEST,
    CLIENT_PORT,
    DHCPACK,
    DHCPDISCOVER,
    DHCPNAK,
    DHCPOFFER,
    DHCPRELEASE,
    DHCPREQUEST,
    INFINITE_LEASE,
    IPV4_BROADCAST,
    IPV4_UNSPECIFIED,
    MIN_MTU,
    OPT_CLIENT_ID,
    OPT_DNS,
    OPT_DOMAIN,
    OPT_HOSTNAME,
    OPT_LEASE_TIME,
    OPT_MAX_MESSAGE_SIZE,
    OPT_MESSAGE_TYPE,
    OPT_MTU,
    OPT_PARAM_REQUEST,
    OPT_REBINDING_TIME,
    OPT_RENEWAL_TIME,
    OPT_REQUESTED_IP,
    OPT_ROUTER,
    OPT_SERVER_ID,
    OPT_SUBNET_MASK,
    SERVER_PORT,
    DhcpFrame,
    DhcpMessage,
    build_frame,
)
from netstack.wire.ethernet import BROADCAST as BROADCAST_MAC
from netstack.wire.ipv4 import MIN_HEADER_LEN as IPV4_MIN_HEADER_LEN
from netstack.wire.udp import HEADER_LEN as UDP_HEADER_LEN

# --- Numbers from the specs ---------------------------------------------------------------

_REPLY_PORTS = SERVER_PORT.to_bytes(2, "big") + CLIENT_PORT.to_bytes(2, "big")  # UDP 67 -> 68
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
    return bytes(data[udp_at:udp_at + 4]) == _REPLY_PORTS


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
        if bytes(frame.data[0:ETH_ADDR_LEN]) not in (self.mac, BROADCAST_MAC):
            self.counters["not_for_us"] += 1
            return []
        try:
            reply = DhcpFrame(frame.data, BOOTREPLY,
                              verify_udp_checksum=not frame.offload[0] & HDR_F_NEEDS_CSUM)
        except Malformed as error:
            self.counters[error.reason] += 1
            return []
        message = reply.message
        if message.chaddr != self.mac:
            self.counters["not_for_us"] += 1
            return []
        if message.xid != self.xid or self.state not in _TRANSITIONS:
            self.counters["unexpected"] += 1
            return []
        transition = _TRANSITIONS[self.state].get(message.msg_type)
        if transition is None:
            self.counters[f"unexpected_type_{message.msg_type}"] += 1
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

    def _selecting_offer(self, reply: DhcpFrame, now: float) -> list[Frame]:
        server_id = self._option_address(reply.message, OPT_SERVER_ID)
        yiaddr = reply.message.yiaddr
        if server_id is None or not _usable(yiaddr):
            self.counters["bad_offer"] += 1
            return []
        self.counters["offer"] += 1
        self._offer = (yiaddr, server_id)
        self.state, self._attempts, self._began = REQUESTING, 0, now
        return self._request_offer(now)

    def _ack(self, reply: DhcpFrame, now: float) -> list[Frame]:
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

    def _nak(self, reply: DhcpFrame, now: float) -> list[Frame]:
        server_id = self._option_address(reply.message, OPT_SERVER_ID)
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
        if to_server:
            assert self.lease is not None
            eth_dst, ip_dst = self.lease.server_mac, self.lease.server
        else:
            eth_dst, ip_dst = BROADCAST_MAC, IPV4_BROADCAST
        return Frame(build_frame(BOOTREQUEST, options, xid=self.xid, chaddr=self.mac,
                                 secs=max(secs, 0), ciaddr=ciaddr, eth_src=self.mac,
                                 eth_dst=eth_dst, ip_src=ciaddr, ip_dst=ip_dst))

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

    def _lease_from(self, reply: DhcpFrame, now: float) -> DhcpLease | None:
        message = reply.message
        seconds = self._option_int(message, OPT_LEASE_TIME, 4)
        if seconds is None or seconds == 0 or not _usable(message.yiaddr):
            self.counters["bad_ack"] += 1
            return None
        if self.state in (RENEWING, REBINDING) and self.lease is not None:
            server = self._option_address(message, OPT_SERVER_ID) or self.lease.server
        else:
            server = self._option_address(message, OPT_SERVER_ID) or reply.ip_src
        start = self._began  # RFC 2131 4.4.1: from when the REQUEST was first sent
        if seconds == INFINITE_LEASE:
            renew = rebind = expires = float("inf")
        else:
            t1 = self._option_int(message, OPT_RENEWAL_TIME, 4)
            t2 = self._option_int(message, OPT_REBINDING_TIME, 4)
            if t1 is None or t2 is None or not 0 < t1 <= t2 <= seconds:
                if t1 is not None or t2 is not None:
                    self.counters["bad_t1_t2"] += 1
                t1, t2 = seconds * T1_FRACTION, seconds * T2_FRACTION
            renew, rebind, expires = start + t1, start + t2, start + seconds
        mtu = self._option_int(message, OPT_MTU, 2)
        routers = self._addresses(message, OPT_ROUTER)
        domain = message.options.get(OPT_DOMAIN, b"").rstrip(b"\x00")
        return DhcpLease(
            address=IPv4Interface((message.yiaddr, self._prefix(message))),
            server=server,
            server_mac=reply.eth_src,
            router=routers[0] if routers else None,
            dns=tuple(self._addresses(message, OPT_DNS)),
            mtu=mtu if mtu is not None and mtu >= MIN_MTU else None,
            domain=domain.decode("ascii") if domain and domain.isascii() else None,
            lease_seconds=seconds,
            renew_at=renew,
            rebind_at=rebind,
            expires=expires,
        )

    def _prefix(self, message: DhcpMessage) -> int:
        mask = message.options.get(OPT_SUBNET_MASK)
        if mask is not None and len(mask) == 4:
            try:
                return IPv4Network(f"0.0.0.0/{IPv4Address(mask)}").prefixlen
            except ValueError:
                self.counters["bad_subnet_mask"] += 1
        first = message.yiaddr.packed[0]  # no usable mask: classful (RFC 2131 leaves it open)
        return 8 if first < 128 else 16 if first < 192 else 24

    # Optional options of a reply: one of the wrong size is ignored, and counted.

    def _addresses(self, message: DhcpMessage, code: int) -> list[IPv4Address]:
        try:
            return message.option_addresses(code)
        except Malformed:
            self.counters[f"bad_option_{code}"] += 1
            return []

    def _option_address(self, message: DhcpMessage, code: int) -> IPv4Address | None:
        value = self._option_int(message, code, 4)
        return None if value is None else IPv4Address(value)

    def _option_int(self, message: DhcpMessage, code: int, size: int) -> int | None:
        try:
            return message.option_int(code, size)
        except Malformed:
            self.counters[f"bad_option_{code}"] += 1
            return None


def _usable(address: IPv4Address) -> bool:
    return not (address.is_unspecified or address.is_multicast or address.is_loopback
                or address == IPV4_BROADCAST or address.packed[0] == 0)


# The state machine: which reply each state takes, and what it does (RFC 2131 figure 5).
_TRANSITIONS: dict[str, dict[int, Callable[[DhcpClient, DhcpFrame, float], list[Frame]]]] = {
    SELECTING: {DHCPOFFER: DhcpClient._selecting_offer},
    REQUESTING: {DHCPACK: DhcpClient._ack, DHCPNAK: DhcpClient._nak},
    RENEWING: {DHCPACK: DhcpClient._ack, DHCPNAK: DhcpClient._nak},
    REBINDING: {DHCPACK: DhcpClient._ack, DHCPNAK: DhcpClient._nak},
}
