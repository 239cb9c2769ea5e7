"""The NAT's TCP flow table, sans-I/O: which TcpConnection a guest segment belongs to, who may
open one, and when each connection's timers run.

A guest SYN for a new (guest ip/port, remote ip/port) is admitted through FlowLimits (flows
per guest -- per its port, the flow's owner --, the half-open cap: CONNECTING and
SYN-RECEIVED) and the deny list, then becomes a
TcpConnection (a SYN the connection drops, SYN+FIN, leaves no flow: `bad_syn`); a known
flow's segments go to its connection; a segment of no flow is answered
by a RST (RFC 9293 3.10.7.1), counted; a SYN on a TIME-WAIT flow replaces it.  A SYN to the
gateway's own port 53 is DNS over TCP (`kind` "dns": the shell connects to an upstream
resolver).  `open_forward` is the other way in: a connection a port forward accepted becomes
an active open toward the guest, from the gateway's address and a port no flow uses; it
counts toward the guest's flows (not its half-open cap, which is about the guest's own
SYNs).  A closed connection leaves the table and gives its caps back.  Outputs are frames
to the guest and `HostCall(key, action)` for the shell's host socket.  `tick(now)` runs only
the connections whose deadline is due (a heap of deadlines, stale entries skipped and
compacted).
"""

from __future__ import annotations

import heapq
from collections import Counter

from netstack.frame import HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM
from netstack.nat.forward import free_port, gateway_address
from netstack.nat.limits import FlowKey, FlowLimits, Owner
from netstack.nat.packet import (
    GuestPacket,
    NatConfig,
    Refused,
    frame_to_guest,
    ip_header_len,
    refuse_denied,
    tso_frame_to_guest,
)
from netstack.nat.tcp import (
    CONNECTING,
    LISTEN,
    SYN_RECEIVED,
    TIME_WAIT,
    Close,
    HostAction,
    HostEvent,
    TcpConnection,
    ToGuest,
    reset_for,
)
from netstack.wire import IPPROTO_TCP, Malformed
from netstack.wire.checksum import pseudo_header_sum, sum16, verifies
from netstack.wire.ipv4 import LOOPBACK as LOOPBACK4
from netstack.wire.ipv6 import LOOPBACK as LOOPBACK6
from netstack.wire.tcp import ACK, RST, SYN, Tcp

_HALF_OPEN = frozenset({CONNECTING, SYN_RECEIVED})
# Stale heap entries tolerated before the heap is rebuilt from the live deadlines.
HEAP_SLACK = 64
# IP + TCP header bytes below the MTU: our MSS offered to guests.
_HEADERS = {4: 40, 6: 60}
DNS_PORT = 53
# What a flow is for: the guest's own connection out, DNS over TCP to the gateway, or a
# port forward's connection in.
OUTGOING, DNS, FORWARD = "outgoing", "dns", "forward"


class HostCall:
    """An action for the host socket of flow `key`."""

    __slots__ = ("action", "key")

    def __init__(self, key: FlowKey, action: HostAction) -> None:
        self.key = key
        self.action = action

    def __repr__(self) -> str:
        return f"HostCall({self.key!r}, {self.action!r})"


class TcpFlow:
    __slots__ = ("charged", "conn", "guest_mac", "half_open", "host_ip", "key", "kind",
                 "owner", "scheduled")

    def __init__(self, key: FlowKey, guest_mac: bytes, owner: Owner, host_ip: bytes,
                 conn: TcpConnection, kind: str = OUTGOING) -> None:
        self.key = key
        self.guest_mac = guest_mac
        self.owner = owner  # whose caps it counts against (its port), fixed at admission
        self.host_ip = host_ip  # where the host socket connects (loopback when mapped)
        self.conn = conn
        self.kind = kind
        self.half_open = kind != FORWARD
        self.scheduled: float | None = None
        self.charged = 0  # bytes of conn.buffered charged to the owner's FlowLimits


def read_tcp(packet: GuestPacket, offload_flags: int) -> Tcp:
    """The checked TCP segment in `packet` (Malformed `tcp_checksum` when it is wrong)."""
    tcp = Tcp(packet.data, packet.l4_offset, packet.end)
    if offload_flags & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID):
        return tcp
    total = pseudo_header_sum(packet.src, packet.dst, IPPROTO_TCP, packet.end - packet.l4_offset) \
        + sum16(packet.data[packet.l4_offset:packet.end])
    if not verifies(total):
        raise Malformed("tcp_checksum", f"checksum {tcp.checksum:#06x}")
    return tcp


class TcpTable:
    """Every guest's TCP connections; `limits` is shared with the other tables."""

    def __init__(self, config: NatConfig, limits: FlowLimits,
                 dns_over_tcp: bool = False) -> None:
        self.config = config
        self.limits = limits
        self.dns_over_tcp = dns_over_tcp  # the gateway's TCP port 53 reaches the resolvers
        self.flows: dict[FlowKey, TcpFlow] = {}
        self.drops: Counter[str] = Counter()
        self.resets_sent = 0  # RSTs answering segments of no flow
        self.credited: set[Owner] = set()  # owners given bytes back since the shell looked
        self._heap: list[tuple[float, int, FlowKey]] = []
        self._order = 0
        self._owed: list[FlowKey] = []  # flows whose ACK waits for flush_ack()
        # Flows whose window their owner's room holds down, by owner: reopened on its credit.
        self._starved: dict[Owner, set[FlowKey]] = {}

    # -- from the guest -----------------------------------------------------------------------

    def guest_segment(self, packet: GuestPacket, offload_flags: int, now: float, *,
                      defer_ack: bool = False) -> list:
        """Frames and HostCalls for a guest's TCP segment (its IP layer already read); raises
        Malformed or Refused for a segment the NAT does not carry.  With `defer_ack` an
        in-order data segment's ACK may wait for `flush_ack()` (the end of a batch)."""
        seg = read_tcp(packet, offload_flags)
        key = FlowKey(IPPROTO_TCP, packet.src, seg.src_port, packet.dst, seg.dst_port)
        flow = self.flows.get(key)
        flags = seg.flags
        is_syn = flags & (SYN | ACK | RST) == SYN
        if flow is not None and is_syn and flow.conn.state == TIME_WAIT:
            self._remove(flow)
            flow = None
        if flow is None:
            if not is_syn:
                return self._reset_unknown(packet, seg)
            flow = self._open(key, packet, now)
        elif flow.guest_mac != packet.guest_mac:
            raise Refused("guest_mac", "a flow of another MAC")
        conn = flow.conn
        conn.hold_limit = self._hold_limit(flow)
        owed = conn.ack_owed
        out = self._after(flow, conn.from_guest(seg, now, defer_ack=defer_ack))
        if conn.state == LISTEN:  # its SYN was dropped (SYN+FIN): nothing to keep
            self._remove(flow)
            raise Refused("bad_syn")
        if conn.ack_owed and not owed:
            self._owed.append(key)
        return out

    def take_owed(self) -> list[FlowKey]:
        """The flows whose ACK waits since `defer_ack` segments: `flush_ack` each."""
        owed, self._owed = self._owed, []
        return owed

    def flush_ack(self, key: FlowKey) -> list:
        """The ACK owed to `key`'s guest, if it still is ([] otherwise)."""
        flow = self.flows.get(key)
        if flow is None or not flow.conn.ack_owed:
            return []
        flow.conn.hold_limit = self._hold_limit(flow)
        return self._after(flow, flow.conn.flush_ack())

    def _hold_limit(self, flow: TcpFlow) -> int:
        return self.limits.room(flow.owner) + flow.charged

    def reopen(self, owner: Owner) -> list:
        """Window updates for `owner`'s flows whose window its room held down, now that it
        was given bytes back (see `credited`): as many flows as the room covers, the room
        each is offered taken off the next one's (so an owner with many flows and a small
        cap gets a few updates per credit, not one per flow); the rest wait."""
        starved = self._starved.pop(owner, None)
        out: list = []
        room = self.limits.room(owner)
        while starved and room > 0:
            flow = self.flows.get(starved.pop())
            if flow is None:
                continue
            conn = flow.conn
            conn.hold_limit = flow.charged + room
            before = conn.promised_window
            out += self._after(flow, conn.window_update())
            room -= max(conn.promised_window - before, 0)
        if starved:
            self._starved.setdefault(owner, set()).update(starved)
        return out

    def _reset_unknown(self, packet: GuestPacket, seg: Tcp) -> list:
        reply = reset_for(seg)
        if reply is None:
            self.drops["no_flow"] += 1
            return []
        self.resets_sent += 1
        message = TcpConnection(packet.src, seg.src_port, packet.dst, seg.dst_port, 0.0,
                                iss=0).encode(reply)
        frame = frame_to_guest(self.config, packet.guest_mac, packet.dst, packet.src,
                               IPPROTO_TCP, message)
        return [] if frame is None else [frame]

    def _open(self, key: FlowKey, packet: GuestPacket, now: float) -> TcpFlow:
        if key.remote_port == 0 or key.guest_port == 0:
            raise Refused("port_zero")
        host_ip = packet.dst
        kind = OUTGOING
        if packet.dst in self.config.gateway_ips:
            if key.remote_port == DNS_PORT and self.dns_over_tcp:
                kind = DNS
            elif not self.config.map_host_loopback:
                raise Refused("gateway", f"port {key.remote_port} of the gateway")
            host_ip = LOOPBACK4 if packet.version == 4 else LOOPBACK6
        else:
            refuse_denied(packet, self.config.deny)
        owner = self.limits.owner_of(packet.guest_mac)
        if not self.limits.admit(owner, IPPROTO_TCP):
            raise Refused("flow_limit")
        if not self.limits.admit_half_open(owner):
            self.limits.release(owner, IPPROTO_TCP)
            raise Refused("half_open_limit")
        conn = TcpConnection(packet.src, key.guest_port, packet.dst, key.remote_port, now,
                             mss=self.config.mtu - _HEADERS[packet.version])
        conn.tso = self.config.tso
        flow = self.flows[key] = TcpFlow(key, packet.guest_mac, owner, host_ip, conn, kind)
        return flow

    def open_forward(self, guest_mac: bytes, guest_ip: bytes, guest_port: int,
                     now: float) -> tuple[FlowKey, list]:
        """A connection a port forward accepted, opened toward `guest_ip`:`guest_port` (its
        SYN among the frames returned); raises Refused (`no_gateway_address`, `no_port`,
        `flow_limit`: the guest's cap, counted in FlowLimits too)."""
        gateway = gateway_address(self.config.gateway_ips, len(guest_ip))
        if gateway is None:
            raise Refused("no_gateway_address")
        port = free_port(lambda port: FlowKey(IPPROTO_TCP, guest_ip, guest_port, gateway, port)
                         in self.flows)
        if port is None:
            raise Refused("no_port")
        owner = self.limits.owner_of(guest_mac)  # the port the guest's MAC is on now
        if not self.limits.admit(owner, IPPROTO_TCP, forwarded=True):
            raise Refused("flow_limit")
        key = FlowKey(IPPROTO_TCP, guest_ip, guest_port, gateway, port)
        conn = TcpConnection(guest_ip, guest_port, gateway, port, now,
                             mss=self.config.mtu - _HEADERS[4 if len(guest_ip) == 4 else 6])
        conn.tso = self.config.tso
        flow = self.flows[key] = TcpFlow(key, guest_mac, owner, gateway, conn, FORWARD)
        return key, self._after(flow, conn.open_to_guest(now))

    # -- from the host ------------------------------------------------------------------------

    def on_host(self, key: FlowKey, event: HostEvent, now: float) -> list:
        """Frames and HostCalls for an event on `key`'s host socket ([] if the flow is gone)."""
        flow = self.flows.get(key)
        if flow is None:
            return []
        flow.conn.hold_limit = self._hold_limit(flow)
        return self._after(flow, flow.conn.on_host(event, now))

    def read_budget(self, key: FlowKey) -> int:
        """Bytes the shell may read from `key`'s host socket now (0: stop reading): the
        connection's room for the guest, within what the guest may still have buffered."""
        flow = self.flows.get(key)
        if flow is None:
            return 0
        return max(min(flow.conn.host_read_budget(), self.limits.room(flow.owner)), 0)

    def read_size(self, key: FlowKey, budget: int) -> int:
        """How much of `budget` to read at once: whole segments toward the guest (with TSO a
        64 KiB read would make one TSO frame and a small tail; one TSO segment's worth makes
        one frame), all of it when less than one."""
        flow = self.flows.get(key)
        if flow is None:
            return budget
        quantum = flow.conn.send_quantum
        return budget - budget % quantum if budget > quantum else budget

    def guest_limited(self, key: FlowKey) -> bool:
        """Reading `key` waits for its owner's other flows to free buffer (see `credited`),
        not for its own ACKs."""
        flow = self.flows.get(key)
        return flow is not None and flow.conn.host_read_budget() > 0 \
            and self.limits.room(flow.owner) <= 0

    def discard(self, key: FlowKey) -> None:
        """Forget `key`'s connection at once (its core failed): caps and bytes given back;
        the guest's next segment of it is answered by a reset."""
        flow = self.flows.get(key)
        if flow is not None:
            self._remove(flow)

    def owner(self, key: FlowKey) -> Owner | None:
        """Whose caps `key` counts against (None: no such flow)."""
        flow = self.flows.get(key)
        return None if flow is None else flow.owner

    def kind(self, key: FlowKey) -> str | None:
        flow = self.flows.get(key)
        return None if flow is None else flow.kind

    def host_ip(self, key: FlowKey) -> bytes | None:
        flow = self.flows.get(key)
        return None if flow is None else flow.host_ip

    # -- timers -------------------------------------------------------------------------------

    def tick(self, now: float) -> list:
        """Run the timers of every connection whose deadline is due."""
        out: list = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _order, key = heapq.heappop(heap)
            flow = self.flows.get(key)
            if flow is None or flow.scheduled != deadline:
                continue  # stale: the flow is gone or its deadline moved
            flow.scheduled = None
            flow.conn.hold_limit = self._hold_limit(flow)
            out += self._after(flow, flow.conn.tick(now))
        return out

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, _order, key = heap[0]
            flow = self.flows.get(key)
            if flow is not None and flow.scheduled == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    # -- bookkeeping --------------------------------------------------------------------------

    def _after(self, flow: TcpFlow, outputs: list) -> list:
        """Frames and HostCalls for a connection's outputs; caps and deadline brought up to
        date with its new state."""
        out: list = []
        conn = flow.conn
        for item in outputs:
            if isinstance(item, ToGuest):
                if conn.tso and ip_header_len(conn.remote_ip) + 20 + len(item.options) \
                        + len(item.payload) > self.config.mtu:
                    frame = tso_frame_to_guest(self.config, flow.guest_mac, conn.remote_ip,
                                               conn.guest_ip, conn.partial_header(item),
                                               item.payload, conn.snd_mss)
                else:
                    frame = frame_to_guest(self.config, flow.guest_mac, conn.remote_ip,
                                           conn.guest_ip, IPPROTO_TCP, conn.encode(item))
                if frame is None:
                    self.drops["too_big"] += 1
                else:
                    out.append(frame)
            else:
                out.append(HostCall(flow.key, item))
        self._charge(flow)
        if conn.room_limited:
            conn.hold_limit = self._hold_limit(flow)
            if conn.room_limited:
                self._starved.setdefault(flow.owner, set()).add(flow.key)
        if flow.half_open and conn.state not in _HALF_OPEN:
            flow.half_open = False
            self.limits.release_half_open(flow.owner)
        if conn.closed:
            self._remove(flow)
            out.append(HostCall(flow.key, Close()))  # the shell closes at most once
        else:
            self._schedule(flow)
        return out

    def _charge(self, flow: TcpFlow) -> None:
        """Bring the owner's buffered bytes up to date with what its connection holds.  Reads
        from the host stop at the owner's cap (read_budget); bytes from the guest past it
        are refused by FlowLimits (counted) and stay bounded by the connection's window."""
        held = flow.conn.buffered
        owner = flow.owner
        if held > flow.charged:
            more = held - flow.charged
            if not self.limits.charge(owner, more):  # counted: buffer_limit
                more = max(self.limits.room(owner), 0)
                if more:
                    self.limits.charge(owner, more)
            flow.charged += more
        elif held < flow.charged:
            self.limits.credit(owner, flow.charged - held)
            self.credited.add(owner)
            flow.charged = held

    def _schedule(self, flow: TcpFlow) -> None:
        deadline = flow.conn.next_deadline()
        if deadline == flow.scheduled:
            return
        flow.scheduled = deadline
        if deadline is None:
            return
        self._order += 1
        heapq.heappush(self._heap, (deadline, self._order, flow.key))
        if len(self._heap) > 2 * len(self.flows) + HEAP_SLACK:
            self._heap = [(f.scheduled, i, f.key) for i, f in enumerate(self.flows.values())
                          if f.scheduled is not None]
            heapq.heapify(self._heap)

    def _remove(self, flow: TcpFlow) -> None:
        if self.flows.get(flow.key) is not flow:
            return
        del self.flows[flow.key]
        flow.scheduled = None
        owner = flow.owner
        starved = self._starved.get(owner)
        if starved is not None:
            starved.discard(flow.key)
            if not starved:
                del self._starved[owner]
        if flow.charged:
            self.limits.credit(owner, flow.charged)
            self.credited.add(owner)
            flow.charged = 0
        if flow.half_open:
            flow.half_open = False
            self.limits.release_half_open(owner)
        self.limits.release(owner, IPPROTO_TCP)

    def status(self) -> dict[str, object]:
        states = Counter(flow.conn.state for flow in self.flows.values())
        return {"flows": len(self.flows), "states": dict(states), "drops": dict(self.drops),
                "resets_sent": self.resets_sent}
