"""The NAT's ICMP: guests' echo requests through unprivileged ping sockets of the hub's host
(SOCK_DGRAM, IPPROTO_ICMP/ICMPV6; `net.ipv4.ping_group_range` must admit the hub), and the
ICMP errors the host's sockets learn (IP_RECVERR) mapped back to the guest.

Echo: a guest's echo request (checksum verified, to a destination not denied) is one flow per
(guest address, identifier, remote): OpenPingSocket the first time (the guest's cap admits
it), then SendEcho with the message as it came.  The kernel rewrites the identifier to the
socket's own; the flow is the mapping back: `from_host` puts the guest's identifier into the
echo reply and sends it to the guest from the remote.  Idle flows close on `tick(now)`.

Errors: `error_frame` turns what the shell read from a socket's error queue (the ICMP type and
code, the MTU for "fragmentation needed"/"packet too big", the offender's address, and the
offending payload) into the ICMP error a router would have sent the guest, quoting the
guest's datagram as the guest sent it (rebuilt from the flow: IP header, UDP header or echo
header, payload), at most 576 bytes of IPv4 (RFC 1812 4.3.2.3) or 1280 of IPv6 (RFC 4443
2.4(c)).  Only destination unreachable, time exceeded and packet too big are mapped; each
guest (the flow's owner: its port) gets at most ERRORS_PER_SECOND of them (a token bucket,
netstack.ratelimit).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from netstack.frame import Frame
from netstack.nat.limits import FlowKey, FlowLimits, IdleFlows, Owner
from netstack.nat.packet import (
    GuestPacket,
    NatConfig,
    Refused,
    frame_to_guest,
    read_guest_packet,
    refuse_denied,
)
from netstack.nat.udp import udp_message
from netstack.ratelimit import TokenBucket
from netstack.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, Malformed, icmpv6
from netstack.wire import icmp as icmp4
from netstack.wire.ipv4 import DEFAULT_TTL, ipv4_header
from netstack.wire.ipv6 import ipv6_header

# How long an echo flow lives without a request or a reply (ping sends one a second).
ICMP_IDLE_SECONDS = 60.0
ECHO_HEADER_LEN = 8  # type, code, checksum, identifier, sequence number
# The most an ICMP error may be, IP header included (RFC 1812 4.3.2.3, RFC 4443 2.4(c)).
MAX_ERROR_PACKET = {4: 576, 6: 1280}
ERROR_HEADER_LEN = 8  # type, code, checksum, 4 bytes unused or MTU
# ICMP errors one guest (one port, all its MACs) may receive: a token bucket per guest.
ERRORS_PER_SECOND = 20.0
ERRORS_BURST = 20.0
# Guests with a bucket at once (a bucket is dropped once full again); past this, errors to a
# new guest are dropped (`error_table_full`).
MAX_ERROR_BUCKETS = 4096
# ICMP errors mapped back to the guest: type -> the highest code passed on.
_MAPPED = {
    4: {icmp4.DEST_UNREACHABLE: 15, icmp4.TIME_EXCEEDED: 1},
    6: {icmpv6.DEST_UNREACHABLE: 7, icmpv6.PACKET_TOO_BIG: 0, icmpv6.TIME_EXCEEDED: 1},
}
_MIN_MTU = {4: 68, 6: 1280}
_ECHO_REQUEST = {4: icmp4.ECHO_REQUEST, 6: icmpv6.ECHO_REQUEST}
_ECHO_REPLY = {4: icmp4.ECHO_REPLY, 6: icmpv6.ECHO_REPLY}
_PROTOCOL = {4: IPPROTO_ICMP, 6: IPPROTO_ICMPV6}
_ID_SEQ = struct.Struct("!HH")


@dataclass(frozen=True, slots=True)
class OpenPingSocket:
    """Open a ping socket (SOCK_DGRAM, IPPROTO_ICMP or IPPROTO_ICMPV6) connected to
    `key.remote_ip` for this echo flow."""

    key: FlowKey


@dataclass(frozen=True, slots=True)
class SendEcho:
    """Send `message` (an echo request; the kernel sets identifier and checksum) on `key`'s
    ping socket with `ttl` as its TTL / hop limit."""

    key: FlowKey
    message: bytes
    ttl: int


@dataclass(frozen=True, slots=True)
class ClosePingSocket:
    key: FlowKey


class HostError(NamedTuple):
    """What a socket's error queue said (struct sock_extended_err, ee_origin ICMP/ICMP6)."""

    type: int  # ee_type
    code: int  # ee_code
    info: int  # ee_info: the MTU for fragmentation needed / packet too big
    offender: bytes | None  # SO_EE_OFFENDER's address (the router or host that sent it)


class EchoFlow:
    __slots__ = ("guest_mac", "key", "last_seen", "owner")

    def __init__(self, key: FlowKey, guest_mac: bytes, owner: Owner, now: float) -> None:
        self.key = key
        self.guest_mac = guest_mac
        self.owner = owner
        self.last_seen = now


def _version(address: bytes) -> int:
    return 4 if len(address) == 4 else 6


def echo_message(version: int, src: bytes, dst: bytes, kind: int, identifier: int,
                 rest: bytes) -> bytes:
    """An echo request or reply with `identifier`; `rest` is sequence number and data."""
    body = identifier.to_bytes(2, "big") + rest
    if version == 4:
        return icmp4.icmp_message(kind, 0, body)
    return icmpv6.icmpv6_message(src, dst, kind, 0, body)


class EchoTable(IdleFlows):
    """The echo flows of all guests; `limits` is shared with the other tables."""

    def __init__(self, config: NatConfig, limits: FlowLimits,
                 idle_seconds: float = ICMP_IDLE_SECONDS) -> None:
        super().__init__(limits, idle_seconds)
        self.config = config

    def from_guest(self, frame: Frame, now: float) -> list:
        """The actions for one frame a guest routed to the gateway ([]: dropped, counted)."""
        try:
            return self.guest_echo(read_guest_packet(frame, self.config.gateway_mac), now)
        except (Malformed, Refused) as error:
            self.drops[error.reason] += 1
            return []

    def guest_echo(self, packet: GuestPacket, now: float) -> list:
        """The actions for a guest's ICMP packet (its IP layer read); raises Malformed or
        Refused for one the NAT does not carry."""
        version = packet.version
        if packet.protocol != _PROTOCOL[version]:
            raise Refused("not_icmp", f"protocol {packet.protocol}")
        view = (icmp4.Icmp if version == 4 else icmpv6.Icmpv6)(packet.data, packet.l4_offset,
                                                              packet.end)
        if view.type != _ECHO_REQUEST[version] or view.code != 0:
            raise Refused("not_echo", f"type {view.type} code {view.code}")
        if view.end - view.offset < ECHO_HEADER_LEN:
            raise Malformed("echo_header", f"{view.end - view.offset} bytes")
        ok = view.checksum_ok() if version == 4 else view.checksum_ok(packet.src, packet.dst)
        if not ok:
            raise Malformed("icmp_checksum")
        if packet.dst in self.config.gateway_ips:
            raise Refused("gateway")  # the gateway port answers its own pings
        refuse_denied(packet, self.config.deny)
        if packet.ttl <= 1:
            raise Refused("ttl_expired")
        identifier = _ID_SEQ.unpack_from(packet.data, view.offset + 4)[0]
        key = FlowKey(_PROTOCOL[version], packet.src, identifier, packet.dst, 0)
        send = SendEcho(key, bytes([view.type, 0, 0, 0]) + bytes(view.rest), packet.ttl - 1)
        flow = self.flows.get(key)
        if flow is not None:
            if flow.guest_mac != packet.guest_mac:
                raise Refused("guest_mac", "a flow of another MAC")
            self.touch(flow, now)
            return [send]
        owner = self.limits.owner_of(packet.guest_mac)
        if not self.limits.admit(owner, key.proto):
            raise Refused("flow_limit")
        self.flows[key] = EchoFlow(key, packet.guest_mac, owner, now)
        return [OpenPingSocket(key), send]

    def from_host(self, key: FlowKey, message: bytes, now: float) -> Frame | None:
        """The frame to the guest for what `key`'s ping socket received: an echo reply, its
        identifier put back to the guest's (None: dropped, counted)."""
        flow = self.flows.get(key)
        if flow is None:
            self.drops["no_flow"] += 1
            return None
        version = _version(key.guest_ip)
        if len(message) < ECHO_HEADER_LEN or message[0] != _ECHO_REPLY[version]:
            self.drops["not_echo_reply"] += 1
            return None
        reply = echo_message(version, key.remote_ip, key.guest_ip, _ECHO_REPLY[version],
                             key.guest_port, message[6:])
        frame = frame_to_guest(self.config, flow.guest_mac, key.remote_ip, key.guest_ip,
                               key.proto, reply)
        if frame is None:
            self.drops["too_big"] += 1
            return None
        self.touch(flow, now)
        return frame

    def tick(self, now: float) -> list[ClosePingSocket]:
        """Close the flows idle since `now - idle_seconds`."""
        return [ClosePingSocket(key) for key in self.expire(now)]


def quoted_datagram(key: FlowKey, payload: bytes) -> bytes:
    """The guest's datagram on flow `key` carrying `payload`, as the guest sent it: what an
    ICMP error about it quotes (UDP: its header and checksum; echo: the guest's identifier)."""
    version = _version(key.guest_ip)
    if key.proto == IPPROTO_UDP:
        message = udp_message(key.guest_ip, key.remote_ip, key.guest_port, key.remote_port,
                              payload)
    else:  # the echo request: payload is what followed the identifier (sequence, data)
        message = echo_message(version, key.guest_ip, key.remote_ip, _ECHO_REQUEST[version],
                               key.guest_port, payload[6:])
    if version == 4:
        return ipv4_header(key.guest_ip, key.remote_ip, key.proto, len(message),
                           ttl=DEFAULT_TTL) + message
    return ipv6_header(key.guest_ip, key.remote_ip, key.proto, len(message),
                       DEFAULT_TTL) + message


class ErrorReporter:
    """ICMP errors from the host's sockets to the guests, at most ERRORS_PER_SECOND each."""

    def __init__(self, config: NatConfig, rate: float = ERRORS_PER_SECOND,
                 burst: float = ERRORS_BURST) -> None:
        self.config = config
        self.rate = rate
        self.burst = burst
        self.buckets: dict[Owner, TokenBucket] = {}
        self.sent: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()

    def error_frame(self, key: FlowKey, guest_mac: bytes, error: HostError, payload: bytes,
                    now: float, owner: Owner | None = None) -> Frame | None:
        """The ICMP error to the guest for `error` on flow `key` (UDP or echo), quoting the
        guest's datagram with `payload` (what the error queue returned: the UDP payload or
        the echo message); None: not mapped or over the rate of `owner` (the flow's; its
        MAC's when None), counted."""
        version = _version(key.guest_ip)
        highest = _MAPPED[version].get(error.type)
        if highest is None or error.code > highest:
            self.drops["unmapped"] += 1
            return None
        refusal = self._refusal(guest_mac if owner is None else owner, now)
        if refusal is not None:
            self.drops[refusal] += 1
            return None
        offender = error.offender
        if offender is None or len(offender) != len(key.remote_ip) \
                or self.config.deny.denies(offender):
            offender = key.remote_ip  # what the guest addressed stands in for the sender
        unused = 0
        if (version, error.type, error.code) in ((4, icmp4.DEST_UNREACHABLE,
                                                  icmp4.CODE_FRAGMENTATION_NEEDED),
                                                 (6, icmpv6.PACKET_TOO_BIG, 0)):
            unused = max(_MIN_MTU[version], min(error.info, self.config.mtu, 0xFFFF))
        room = min(MAX_ERROR_PACKET[version], self.config.mtu) \
            - (20 if version == 4 else 40) - ERROR_HEADER_LEN
        body = unused.to_bytes(4, "big") + quoted_datagram(key, payload)[:room]
        if version == 4:
            message = icmp4.icmp_message(error.type, error.code, body)
        else:
            message = icmpv6.icmpv6_message(offender, key.guest_ip, error.type, error.code, body)
        self.sent[f"{error.type}/{error.code}"] += 1
        return frame_to_guest(self.config, guest_mac, offender, key.guest_ip,
                              _PROTOCOL[version], message)

    def _refusal(self, owner: Owner, now: float) -> str | None:
        """Why `owner` gets no error now (None: it does; its token is spent)."""
        bucket = self.buckets.get(owner)
        if bucket is None:
            if len(self.buckets) >= MAX_ERROR_BUCKETS:
                return "error_table_full"
            bucket = self.buckets[owner] = TokenBucket(self.rate, self.burst, now)
        return None if bucket.take(now) else "error_rate"

    def tick(self, now: float) -> None:
        """Forget the buckets that have filled up again (they would start full anyway)."""
        full = [owner for owner, bucket in self.buckets.items()
                if bucket.tokens + (now - bucket.refilled) * bucket.rate >= bucket.burst]
        for owner in full:
            del self.buckets[owner]
