"""The gateway's DNS forwarder core: guests ask the gateway's address on UDP port 53, the
hub asks its host's resolvers, the answer goes back to the guest as if the gateway had
answered.  The shell owns the upstream sockets; this core keeps the queries in flight.

A query's path: `query` (called by the UDP table for the gateway's :53) checks the header
is there and is a query, takes one of the guest's MAX_PENDING_PER_GUEST places (its port's:
the owner `owner_of` names, netstack.nat.limits), gives the
query a fresh random id (the guest's ids are its own; a random one per query keeps an
off-path spoofer guessing, RFC 5452) and returns SendQuery to the preferred upstream.
`answer` takes what an upstream sent back and checks it minimally: a whole header, the id of
a query in flight, from the upstream that query went to, a response; then the guest's id goes
back in and the frame goes to the guest from the address it asked.  An answer longer than
the guest's MTU allows becomes a truncated (TC) answer: the guest asks again over TCP.
`tick(now)`: a query unanswered for QUERY_TIMEOUT_SECONDS goes to the next upstream, and the
preferred upstream moves on with it (first, then the next on timeout: a dead resolver costs
one timeout, not one per query); when every upstream has had its turn, SERVFAIL goes to the
guest.  `parse_resolv_conf` reads the host's resolvers from /etc/resolv.conf's text.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from netstack.frame import Frame
from netstack.nat.limits import Owner, mac_owner
from netstack.nat.packet import GuestPacket, NatConfig, Refused, frame_to_guest
from netstack.nat.udp import udp_message
from netstack.wire import IPPROTO_UDP, Malformed
from netstack.wire.udp import Udp

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DNS_PORT = 53
HEADER_LEN = 12  # RFC 1035 4.1.1
FLAGS_OFFSET = 2
FLAG_QR = 0x80  # in the first flags byte: a response
FLAG_TC = 0x02  # in the first flags byte: truncated
RCODE_MASK = 0x0F  # in the second flags byte
RCODE_SERVFAIL = 2
# The longest query carried: a question with EDNS options fits many times over (the 2020 DNS
# flag day's 1232-byte EDNS buffer size).
MAX_QUERY_LEN = 1232
# Queries in flight: per guest (its port), and for all guests (each holds its query until
# answered).
MAX_PENDING_PER_GUEST = 32
MAX_PENDING_TOTAL = 1024
# How long one upstream has to answer before the query goes to the next.
QUERY_TIMEOUT_SECONDS = 2.0
# Resolvers used from resolv.conf (glibc reads MAXNS = 3).
MAX_UPSTREAMS = 3

REASONS = frozenset({"dns_header", "dns_size", "not_query", "no_upstream", "pending_limit",
                     "answer_header", "unknown_id", "wrong_upstream", "not_response", "timeout"})


@dataclass(frozen=True, slots=True)
class SendQuery:
    """Send `payload` (a query, its id ours) to `upstream` port 53."""

    upstream: IpAddress
    payload: bytes


class PendingQuery:
    __slots__ = ("attempts", "deadline", "gateway_ip", "guest_id", "guest_ip", "guest_mac",
                 "guest_port", "owner", "query", "upstream")

    def __init__(self, packet: GuestPacket, owner: Owner, guest_port: int, guest_id: int,
                 query: bytes, upstream: int, deadline: float) -> None:
        self.guest_mac = packet.guest_mac
        self.owner = owner  # whose MAX_PENDING_PER_GUEST places it takes
        self.guest_ip = packet.src
        self.gateway_ip = packet.dst
        self.guest_port = guest_port
        self.guest_id = guest_id
        self.query = query  # as sent upstream: our id
        self.upstream = upstream  # index into the forwarder's upstreams
        self.attempts = 1
        self.deadline = deadline


def _with_id(message: bytes, query_id: int) -> bytes:
    return query_id.to_bytes(2, "big") + message[2:]


class DnsForwarder:
    """Queries in flight from all guests to `upstreams` (the host's resolvers)."""

    def __init__(self, config: NatConfig, upstreams: Sequence[IpAddress],
                 random_id: Callable[[], int] = lambda: secrets.randbits(16),
                 timeout: float = QUERY_TIMEOUT_SECONDS,
                 owner_of: Callable[[bytes], Owner] = mac_owner) -> None:
        self.config = config
        self.owner_of = owner_of
        self.upstreams = list(upstreams)
        self.random_id = random_id
        self.timeout = timeout
        self.preferred = 0
        self.pending: dict[int, PendingQuery] = {}  # by the id we gave the query
        self.per_owner: Counter[Owner] = Counter()
        self.drops: Counter[str] = Counter()
        self.answered = 0

    # -- from the guest -----------------------------------------------------------------------

    def query(self, packet: GuestPacket, udp: Udp, now: float) -> list[SendQuery]:
        """Forward a guest's query to the gateway's :53 (raises Malformed or Refused for one
        that is not forwarded)."""
        message = bytes(udp.payload)
        if len(message) < HEADER_LEN:
            raise Malformed("dns_header", f"{len(message)} bytes")
        if len(message) > MAX_QUERY_LEN:
            raise Refused("dns_size", f"{len(message)}-byte query")
        if message[FLAGS_OFFSET] & FLAG_QR:
            raise Refused("not_query")
        if not self.upstreams:
            raise Refused("no_upstream")
        owner = self.owner_of(packet.guest_mac)
        if self.per_owner[owner] >= MAX_PENDING_PER_GUEST \
                or len(self.pending) >= MAX_PENDING_TOTAL:
            raise Refused("pending_limit")
        query_id = self.random_id()
        while query_id in self.pending:  # fewer than MAX_PENDING_TOTAL of 65536 are taken
            query_id = self.random_id()
        sent = _with_id(message, query_id)
        self.pending[query_id] = PendingQuery(packet, owner, udp.src_port,
                                              int.from_bytes(message[:2], "big"), sent,
                                              self.preferred, now + self.timeout)
        self.per_owner[owner] += 1
        return [SendQuery(self.upstreams[self.preferred], sent)]

    # -- from the upstreams -------------------------------------------------------------------

    def answer(self, upstream: IpAddress, message: bytes, now: float) -> Frame | None:
        """The frame to the guest for what `upstream` sent back (None: dropped, counted)."""
        if len(message) < HEADER_LEN:
            self.drops["answer_header"] += 1
            return None
        query_id = int.from_bytes(message[:2], "big")
        pending = self.pending.get(query_id)
        if pending is None:
            self.drops["unknown_id"] += 1  # late (answered or timed out), or a guess
            return None
        if self.upstreams[pending.upstream] != upstream:
            self.drops["wrong_upstream"] += 1
            return None
        if not message[FLAGS_OFFSET] & FLAG_QR:
            self.drops["not_response"] += 1
            return None
        self._finish(query_id)
        self.answered += 1
        frame = self._to_guest(pending, _with_id(message, pending.guest_id))
        if frame is None:  # longer than the guest's MTU allows: truncated, ask over TCP
            self.drops["truncated"] += 1
            frame = self._to_guest(pending, self._reply_header(pending, FLAG_TC,
                                                               message[FLAGS_OFFSET + 1]))
        return frame

    def _reply_header(self, pending: PendingQuery, flags: int, second_flags: int) -> bytes:
        """The guest's query turned into an empty response: QR and `flags` set, the second
        flags byte (RA, rcode) as given."""
        query = pending.query
        return (pending.guest_id.to_bytes(2, "big")
                + bytes([query[FLAGS_OFFSET] | FLAG_QR | flags, second_flags]) + query[4:])

    def _to_guest(self, pending: PendingQuery, message: bytes) -> Frame | None:
        return frame_to_guest(self.config, pending.guest_mac, pending.gateway_ip,
                              pending.guest_ip, IPPROTO_UDP,
                              udp_message(pending.gateway_ip, pending.guest_ip, DNS_PORT,
                                          pending.guest_port, message))

    def _finish(self, query_id: int) -> PendingQuery:
        pending = self.pending.pop(query_id)
        self.per_owner[pending.owner] -= 1
        if self.per_owner[pending.owner] <= 0:
            del self.per_owner[pending.owner]
        return pending

    # -- timed work ---------------------------------------------------------------------------

    def tick(self, now: float) -> list[SendQuery | Frame]:
        """Queries past their deadline: to the next upstream (SendQuery), or, every upstream
        tried, SERVFAIL to the guest (a Frame)."""
        out: list[SendQuery | Frame] = []
        for query_id, pending in list(self.pending.items()):
            if pending.deadline > now:
                continue
            if pending.upstream == self.preferred:
                self.preferred = (self.preferred + 1) % len(self.upstreams)
            if pending.attempts < len(self.upstreams):
                pending.attempts += 1
                pending.upstream = (pending.upstream + 1) % len(self.upstreams)
                pending.deadline = now + self.timeout
                out.append(SendQuery(self.upstreams[pending.upstream], pending.query))
                continue
            self._finish(query_id)
            self.drops["timeout"] += 1
            frame = self._to_guest(pending, self._reply_header(pending, 0, RCODE_SERVFAIL))
            if frame is not None:
                out.append(frame)
        return out

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self.pending.values()), default=None)

    def status(self) -> dict[str, object]:
        return {"pending": len(self.pending), "answered": self.answered,
                "upstreams": [str(u) for u in self.upstreams], "drops": dict(self.drops)}


def parse_resolv_conf(text: str) -> list[IpAddress]:
    """The resolvers /etc/resolv.conf's `text` names (resolv.conf(5)): `nameserver` lines, in
    order, duplicates and unreadable addresses skipped, at most MAX_UPSTREAMS.

    Loopback resolvers (systemd-resolved's 127.0.0.53, a local dnsmasq or unbound) are kept:
    the forwarder runs in the hub, on the host, where they answer, and guests never address
    them (they ask the gateway).  A scoped IPv6 address (fe80::1%eth0) keeps its scope.
    No nameserver line gives an empty list: resolv.conf(5) then means "the local machine",
    and the shell says which it uses."""
    found: list[IpAddress] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(words[1])
        except ValueError:
            continue
        if address not in found:
            found.append(address)
        if len(found) == MAX_UPSTREAMS:
            break
    return found
