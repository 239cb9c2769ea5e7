"""The NAT's UDP flow table: each guest flow (guest address and port, remote address and
port) is one connected UDP socket of the hub's host, owned by the shell.

A guest datagram's path: read_guest_packet (netstack.nat.packet) -> `read_udp` (the UDP
view; its checksum verified unless the frame's offload metadata says the guest left it to us,
NEEDS_CSUM, or a kernel already checked it, DATA_VALID) -> to the gateway's own address? port
53 goes to the DNS forwarder, anything else to the hub's loopback with `--map-host-loopback`,
or is refused -> a denied destination is refused -> a known flow: SendDatagram; a new one: the
guest's cap (netstack.nat.limits: its port's) admits it or it is refused -> OpenSocket +
SendDatagram.
A datagram the host socket received: `from_host` -> a frame to the guest from the remote.
A flow idle for UDP_IDLE_SECONDS is closed by `tick(now)` (CloseSocket).  Every drop is
counted in `drops` by reason; nothing raises out of `from_guest` or `from_host`.
"""

from __future__ import annotations

from dataclasses import dataclass

from netstack.frame import HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, Frame
from netstack.nat.limits import FlowKey, FlowLimits, IdleFlows, Owner
from netstack.nat.packet import (
    GuestPacket,
    NatConfig,
    Refused,
    frame_to_guest,
    read_guest_packet,
    refuse_denied,
)
from netstack.wire import IPPROTO_UDP, Malformed
from netstack.wire.checksum import pseudo_header_sum, sum16, verifies
from netstack.wire.ipv4 import LOOPBACK as LOOPBACK4
from netstack.wire.ipv6 import LOOPBACK as LOOPBACK6
from netstack.wire.udp import Udp, udp_header

# How long a flow lives without a datagram either way (Linux conntrack's UDP "stream" timeout;
# passt uses 180 s).  Every guest datagram and every answer restarts it.
UDP_IDLE_SECONDS = 120.0
DNS_PORT = 53


@dataclass(frozen=True, slots=True)
class OpenSocket:
    """Open a UDP socket connected to `host_ip`:`host_port` for `key` (the remote the guest
    addressed, unless `--map-host-loopback` sent it to the hub's loopback)."""

    key: FlowKey
    host_ip: bytes
    host_port: int


@dataclass(frozen=True, slots=True)
class SendDatagram:
    """Send `payload` on `key`'s socket, with `ttl` (the guest's, less our hop) as IP_TTL /
    IPV6_UNICAST_HOPS, so the guest's traceroute works through the NAT."""

    key: FlowKey
    payload: bytes
    ttl: int


@dataclass(frozen=True, slots=True)
class CloseSocket:
    key: FlowKey


class UdpFlow:
    __slots__ = ("from_host", "guest_mac", "key", "last_seen", "owner", "to_host")

    def __init__(self, key: FlowKey, guest_mac: bytes, owner: Owner, now: float) -> None:
        self.key = key
        self.guest_mac = guest_mac
        self.owner = owner
        self.last_seen = now
        self.to_host = 0  # datagrams
        self.from_host = 0


def read_udp(packet: GuestPacket, offload_flags: int) -> Udp:
    """The checked UDP datagram in `packet` (Malformed `udp_checksum` if its checksum is
    wrong, or missing over IPv6, RFC 8200 8.1)."""
    udp = Udp(packet.data, packet.l4_offset, packet.end)
    if offload_flags & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID):
        return udp
    if udp.checksum == 0:
        if packet.version == 6:
            raise Malformed("udp_checksum", "zero checksum over IPv6")
        return udp
    total = pseudo_header_sum(packet.src, packet.dst, IPPROTO_UDP, udp.length) \
        + sum16(packet.data[udp.offset:udp.end])
    if not verifies(total):
        raise Malformed("udp_checksum", f"checksum {udp.checksum:#06x}")
    return udp


def udp_message(src: bytes, dst: bytes, src_port: int, dst_port: int, payload: bytes) -> bytes:
    """A UDP header and `payload`, its checksum done."""
    return udp_header(src, dst, src_port, dst_port, payload) + payload


class DnsService:
    """What the table needs of the DNS forwarder (netstack.nat.dns.DnsForwarder)."""

    def query(self, packet: GuestPacket, udp: Udp, now: float) -> list: ...


class UdpTable(IdleFlows):
    """The UDP flows of all guests; `limits` is shared with the other tables."""

    def __init__(self, config: NatConfig, limits: FlowLimits, dns: DnsService | None = None,
                 idle_seconds: float = UDP_IDLE_SECONDS) -> None:
        super().__init__(limits, idle_seconds)
        self.config = config
        self.dns = dns

    # -- from the guest -----------------------------------------------------------------------

    def from_guest(self, frame: Frame, now: float) -> list:
        """The actions for one frame a guest routed to the gateway (an empty list: dropped,
        counted in `drops`)."""
        try:
            packet = read_guest_packet(frame, self.config.gateway_mac)
            if packet.protocol != IPPROTO_UDP:
                raise Refused("not_udp", f"protocol {packet.protocol}")
            return self.guest_datagram(packet, frame.offload[0], now)
        except (Malformed, Refused) as error:
            self.drops[error.reason] += 1
            return []

    def guest_datagram(self, packet: GuestPacket, offload_flags: int, now: float) -> list:
        """The actions for a guest's UDP packet (its IP layer already read); raises Malformed
        or Refused for a datagram the NAT does not carry."""
        udp = read_udp(packet, offload_flags)
        src_port, dst_port = udp.src_port, udp.dst_port
        if src_port == 0 or dst_port == 0:
            raise Refused("port_zero")
        host_ip = packet.dst
        if packet.dst in self.config.gateway_ips:
            if dst_port == DNS_PORT and self.dns is not None:
                return self.dns.query(packet, udp, now)
            if not self.config.map_host_loopback:
                raise Refused("gateway", f"port {dst_port} of the gateway")
            host_ip = LOOPBACK4 if packet.version == 4 else LOOPBACK6
        else:
            refuse_denied(packet, self.config.deny)
        if packet.ttl <= 1:
            raise Refused("ttl_expired")
        key = FlowKey(IPPROTO_UDP, packet.src, src_port, packet.dst, dst_port)
        send = SendDatagram(key, bytes(udp.payload), packet.ttl - 1)
        flow = self.flows.get(key)
        if flow is not None:
            if flow.guest_mac != packet.guest_mac:
                raise Refused("guest_mac", "a flow of another MAC")  # the policy forbids this
            self.touch(flow, now)
            flow.to_host += 1
            return [send]
        owner = self.limits.owner_of(packet.guest_mac)
        if not self.limits.admit(owner, IPPROTO_UDP):
            raise Refused("flow_limit")
        flow = self.flows[key] = UdpFlow(key, packet.guest_mac, owner, now)
        flow.to_host = 1
        return [OpenSocket(key, host_ip, dst_port), send]

    # -- from the host ------------------------------------------------------------------------

    def from_host(self, key: FlowKey, payload: bytes, now: float) -> Frame | None:
        """The frame to the guest for a datagram `key`'s socket received (None: dropped)."""
        flow = self.flows.get(key)
        if flow is None:
            self.drops["no_flow"] += 1  # closed by expiry while the shell was reading
            return None
        frame = frame_to_guest(self.config, flow.guest_mac, key.remote_ip, key.guest_ip,
                               IPPROTO_UDP, udp_message(key.remote_ip, key.guest_ip,
                                                        key.remote_port, key.guest_port,
                                                        payload))
        if frame is None:
            self.drops["too_big"] += 1  # no fragmentation toward the guest yet
            return None
        self.touch(flow, now)
        flow.from_host += 1
        return frame

    # -- timed work ---------------------------------------------------------------------------

    def tick(self, now: float) -> list[CloseSocket]:
        """Close the flows idle since `now - idle_seconds`."""
        return [CloseSocket(key) for key in self.expire(now)]
