"""UDP port forwards, sans-I/O: each outside client (address, port) of a forward's bound
socket is one flow into the guest, from the gateway's address and a port no UDP flow uses;
the shell owns the sockets (one per forward) and calls in with what they received.

A client's datagram: `from_client` -> its flow (a new client: the forward's cap
MAX_FORWARD_FLOWS, the guest's UDP cap in FlowLimits (of the port its MAC is on now), a
gateway address of the guest's family and a free port; else dropped, counted) -> a frame to
the guest.  The guest's answer, a datagram to the gateway's address: `guest_datagram` ->
SendToClient for the forward's socket (None: not a forward's flow, the UDP table's
business).  A flow idle for `idle_seconds` is forgotten by `tick(now)`.  Drops are counted
in `drops` by reason; nothing here raises but the Malformed/Refused of a guest datagram, as
the UDP table does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from netstack.frame import Frame
from netstack.nat.forward import MAX_FORWARD_FLOWS, free_port, gateway_address
from netstack.nat.limits import FlowKey, FlowLimits, IdleFlows, Owner
from netstack.nat.packet import GuestPacket, NatConfig, Refused, frame_to_guest
from netstack.nat.udp import UDP_IDLE_SECONDS, read_udp, udp_message
from netstack.wire import IPPROTO_UDP

UDP_HEADER_LEN = 8


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Send `payload` from forward number `forward`'s socket to `client` (a sockaddr)."""

    forward: int
    client: tuple
    payload: bytes


class ForwardFlow:
    __slots__ = ("client", "forward", "from_guest", "guest_mac", "key", "last_seen", "owner",
                 "to_guest")

    def __init__(self, key: FlowKey, guest_mac: bytes, owner: Owner, forward: int,
                 client: tuple, now: float) -> None:
        self.key = key
        self.guest_mac = guest_mac
        self.owner = owner  # the port the guest's MAC was on when the client came
        self.forward = forward
        self.client = client
        self.last_seen = now
        self.to_guest = 0  # datagrams
        self.from_guest = 0


class UdpForwards(IdleFlows):
    """The flows of every UDP forward.  `targets[n]` is forward n's guest (packed address,
    port); `in_use(key)` says whether another table already files a flow under `key`."""

    def __init__(self, config: NatConfig, limits: FlowLimits,
                 targets: Sequence[tuple[bytes, int]], in_use: Callable[[FlowKey], bool],
                 idle_seconds: float = UDP_IDLE_SECONDS,
                 per_forward: int = MAX_FORWARD_FLOWS) -> None:
        super().__init__(limits, idle_seconds)
        self.config = config
        self.targets = list(targets)
        self.in_use = in_use
        self.per_forward = per_forward
        self.clients: dict[tuple[int, tuple], FlowKey] = {}
        self.active: Counter[int] = Counter()  # flows per forward

    # -- from an outside client ---------------------------------------------------------------

    def from_client(self, forward: int, client: tuple, payload: bytes,
                    guest_mac: bytes | None, now: float) -> Frame | None:
        """The frame to the guest for `payload`, which `client` sent to forward number
        `forward`; `guest_mac` is the guest's MAC as the gateway knows it now (None: not yet
        known, the datagram is dropped, counted `no_neighbour`; the client's next one goes
        through once the gateway has asked)."""
        key = self.clients.get((forward, client))
        if key is None:
            key = self._open(forward, client, guest_mac, now)
            if key is None:
                return None
        flow = self.flows[key]
        frame = frame_to_guest(self.config, flow.guest_mac, key.remote_ip, key.guest_ip,
                               IPPROTO_UDP, udp_message(key.remote_ip, key.guest_ip,
                                                        key.remote_port, key.guest_port,
                                                        payload))
        if frame is None:
            self.drops["too_big"] += 1
            return None
        self.touch(flow, now)
        flow.to_guest += 1
        return frame

    def _open(self, forward: int, client: tuple, guest_mac: bytes | None,
              now: float) -> FlowKey | None:
        guest_ip, guest_port = self.targets[forward]
        if guest_mac is None:
            self.drops["no_neighbour"] += 1
            return None
        if self.active[forward] >= self.per_forward:
            self.drops["forward_limit"] += 1
            return None
        gateway = gateway_address(self.config.gateway_ips, len(guest_ip))
        if gateway is None:
            self.drops["no_gateway_address"] += 1
            return None

        def taken(port: int) -> bool:
            key = FlowKey(IPPROTO_UDP, guest_ip, guest_port, gateway, port)
            return key in self.flows or self.in_use(key)

        port = free_port(taken)
        if port is None:
            self.drops["no_port"] += 1
            return None
        owner = self.limits.owner_of(guest_mac)
        if not self.limits.admit(owner, IPPROTO_UDP, forwarded=True):
            self.drops["flow_limit"] += 1
            return None
        key = FlowKey(IPPROTO_UDP, guest_ip, guest_port, gateway, port)
        self.flows[key] = ForwardFlow(key, guest_mac, owner, forward, client, now)
        self.clients[(forward, client)] = key
        self.active[forward] += 1
        return key

    # -- from the guest -----------------------------------------------------------------------

    def guest_datagram(self, packet: GuestPacket, offload_flags: int,
                       now: float) -> SendToClient | None:
        """The guest's answer on a forward's flow (a datagram to the gateway's address), or
        None when it belongs to no forward's flow; raises Malformed (checksum) or Refused."""
        start = packet.l4_offset
        if packet.end - start < UDP_HEADER_LEN:
            return None  # the UDP table's view refuses it, counted there
        data = packet.data
        key = FlowKey(IPPROTO_UDP, packet.src, int.from_bytes(data[start:start + 2], "big"),
                      packet.dst, int.from_bytes(data[start + 2:start + 4], "big"))
        flow = self.flows.get(key)
        if flow is None:
            return None
        udp = read_udp(packet, offload_flags)
        if flow.guest_mac != packet.guest_mac:
            raise Refused("guest_mac", "a flow of another MAC")
        self.touch(flow, now)
        flow.from_guest += 1
        return SendToClient(flow.forward, flow.client, bytes(udp.payload))

    # -- bookkeeping --------------------------------------------------------------------------

    def forget(self, key: FlowKey) -> bool:
        flow = self.flows.get(key)
        if flow is None or not super().forget(key):
            return False
        del self.clients[(flow.forward, flow.client)]
        self.active[flow.forward] -= 1
        if not self.active[flow.forward]:
            del self.active[flow.forward]
        return True

    def tick(self, now: float) -> int:
        """Forget the flows idle since `now - idle_seconds`; how many went."""
        return len(self.expire(now))

    def status(self) -> dict[str, object]:
        return {"flows": len(self.flows), "per_forward": dict(self.active),
                "drops": dict(self.drops)}
