"""What one guest may make the NAT hold: the per-guest caps as named constants, the flow key
every table files its flows under, and the one accounting that admits or refuses a new flow.

A guest is named by its Ethernet source address: the switch's policy binds a MAC to one port
(`mac_spoof`) and caps the MACs a port may use (`mac_limit`), so a port's share is at most
that many guests' caps.  Every refusal is counted by reason; nothing here does I/O.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import NamedTuple, Protocol

from netstack.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

# Flows one guest may hold open at once, per protocol: each is a socket of the hub's host.
# 256 UDP flows cover a resolver's and a browser's worth; TCP is larger for parallel
# downloads (issue 12's proof opens 100 connections at once); pings are few.
MAX_FLOWS_PER_GUEST = {
    IPPROTO_TCP: 512,
    IPPROTO_UDP: 256,
    IPPROTO_ICMP: 16,
    IPPROTO_ICMPV6: 16,
}
# TCP connections of one guest still connecting to the outside (a SYN flood fills these).
MAX_HALF_OPEN_PER_GUEST = 64
# Bytes one guest may have the NAT buffer (both directions, all its flows).
MAX_BUFFERED_BYTES_PER_GUEST = 8 * 1024 * 1024
# Host sockets all guests together may hold: the hub's file descriptors are one budget.
MAX_FLOWS_TOTAL = 8192
# Bytes all guests together may have the NAT buffer: a guest is a MAC, and one port may
# speak for many (a tunnel session up to 256), so the per-guest cap alone does not bound
# the hub's memory.
MAX_BUFFERED_BYTES_TOTAL = 256 * 1024 * 1024
# Port forwards' flows (opened by the outside's clients, not by the guest) are admitted only
# while the guest holds less than this share of its cap: a client flooding a forward cannot
# shut the guest out of its own connections.
FORWARDED_SHARE = 0.5


class FlowKey(NamedTuple):
    """One flow as the guest sees it.  Addresses are packed (4 or 16 bytes); for an echo
    flow `guest_port` is the guest's ICMP identifier and `remote_port` is 0."""

    proto: int
    guest_ip: bytes
    guest_port: int
    remote_ip: bytes
    remote_port: int


class _Account:
    __slots__ = ("buffered", "flows", "half_open")

    def __init__(self) -> None:
        self.flows: Counter[int] = Counter()
        self.half_open = 0
        self.buffered = 0

    def empty(self) -> bool:
        return not any(self.flows.values()) and self.half_open == 0 and self.buffered == 0


class FlowLimits:
    """Per-guest counts of flows, half-open connections and buffered bytes, checked against
    the caps; `refusals` counts each refusal by reason.  A guest's entry lives only while it
    holds something, so the accounting is as bounded as what it accounts for."""

    def __init__(self, flows_per_guest: dict[int, int] | None = None,
                 half_open_per_guest: int = MAX_HALF_OPEN_PER_GUEST,
                 buffered_per_guest: int = MAX_BUFFERED_BYTES_PER_GUEST,
                 flows_total: int = MAX_FLOWS_TOTAL,
                 buffered_total: int = MAX_BUFFERED_BYTES_TOTAL) -> None:
        self.flows_per_guest = dict(MAX_FLOWS_PER_GUEST if flows_per_guest is None
                                    else flows_per_guest)
        self.half_open_per_guest = half_open_per_guest
        self.buffered_per_guest = buffered_per_guest
        self.flows_total = flows_total
        self.buffered_total = buffered_total
        self.total = 0
        self.buffered = 0  # all guests' buffered bytes
        self.refusals: Counter[str] = Counter()
        self._guests: dict[bytes, _Account] = {}

    def _account(self, guest: bytes) -> _Account:
        account = self._guests.get(guest)
        if account is None:
            account = self._guests[guest] = _Account()
        return account

    def _forget_if_empty(self, guest: bytes) -> None:
        account = self._guests.get(guest)
        if account is not None and account.empty():
            del self._guests[guest]

    def admit(self, guest: bytes, proto: int, *, forwarded: bool = False) -> bool:
        """Take one flow of `proto` for `guest`, or refuse (counted: `flow_limit`, the
        guest's cap, FORWARDED_SHARE of it for a port forward's flow; `host_limit`, all
        guests' sockets)."""
        if self.total >= self.flows_total:
            self.refusals["host_limit"] += 1
            return False
        account = self._guests.get(guest)
        held = account.flows[proto] if account is not None else 0
        cap = self.flows_per_guest.get(proto, 0)
        if held >= (int(cap * FORWARDED_SHARE) if forwarded else cap):
            self.refusals["flow_limit"] += 1
            return False
        self._account(guest).flows[proto] += 1
        self.total += 1
        return True

    def release(self, guest: bytes, proto: int) -> None:
        """Give back a flow `admit` took."""
        account = self._guests.get(guest)
        if account is None or account.flows[proto] <= 0:
            raise ValueError(f"release of a {proto} flow the guest does not hold")
        account.flows[proto] -= 1
        self.total -= 1
        self._forget_if_empty(guest)

    def admit_half_open(self, guest: bytes) -> bool:
        account = self._account(guest)
        if account.half_open >= self.half_open_per_guest:
            self.refusals["half_open_limit"] += 1
            self._forget_if_empty(guest)
            return False
        account.half_open += 1
        return True

    def release_half_open(self, guest: bytes) -> None:
        account = self._guests.get(guest)
        if account is None or account.half_open <= 0:
            raise ValueError("release of a half-open connection the guest does not hold")
        account.half_open -= 1
        self._forget_if_empty(guest)

    def charge(self, guest: bytes, nbytes: int) -> bool:
        """Hold `nbytes` more for `guest`, or refuse (`buffer_limit`: the guest's cap;
        `host_buffer_limit`: all guests')."""
        account = self._account(guest)
        if account.buffered + nbytes > self.buffered_per_guest:
            self.refusals["buffer_limit"] += 1
            self._forget_if_empty(guest)
            return False
        if self.buffered + nbytes > self.buffered_total:
            self.refusals["host_buffer_limit"] += 1
            self._forget_if_empty(guest)
            return False
        account.buffered += nbytes
        self.buffered += nbytes
        return True

    def room(self, guest: bytes) -> int:
        """Bytes `guest` may still have the NAT buffer (within its cap and all guests')."""
        account = self._guests.get(guest)
        return min(self.buffered_per_guest - (0 if account is None else account.buffered),
                   self.buffered_total - self.buffered)

    def host_room(self) -> int:
        """Bytes all guests together may still have the NAT buffer."""
        return self.buffered_total - self.buffered

    def credit(self, guest: bytes, nbytes: int) -> None:
        account = self._guests.get(guest)
        if account is None or account.buffered < nbytes:
            raise ValueError(f"credit of {nbytes} bytes the guest was not charged")
        account.buffered -= nbytes
        self.buffered -= nbytes
        self._forget_if_empty(guest)

    def held(self, guest: bytes) -> dict[str, int]:
        """What `guest` holds now (for status)."""
        account = self._guests.get(guest)
        if account is None:
            return {"flows": 0, "half_open": 0, "buffered": 0}
        return {"flows": sum(account.flows.values()), "half_open": account.half_open,
                "buffered": account.buffered}

    def by_guest(self) -> dict[bytes, dict[str, object]]:
        """What each guest holds now, by MAC (for status): its flows by protocol number,
        half-open connections, buffered bytes."""
        return {guest: {"flows": {proto: n for proto, n in account.flows.items() if n},
                        "half_open": account.half_open, "buffered": account.buffered}
                for guest, account in self._guests.items()}

    @property
    def guests(self) -> int:
        return len(self._guests)


class Flow(Protocol):
    key: FlowKey
    guest_mac: bytes
    last_seen: float


class IdleFlows:
    """A table of flows kept in order of last use, each admitted by `limits` and released
    when it is forgotten: what the UDP and echo tables share.  `expire(now)` forgets the
    flows idle for `idle_seconds` and returns their keys (the caller closes their sockets)."""

    def __init__(self, limits: FlowLimits, idle_seconds: float) -> None:
        self.limits = limits
        self.idle_seconds = idle_seconds
        self.flows: OrderedDict[FlowKey, Flow] = OrderedDict()  # least recently used first
        self.drops: Counter[str] = Counter()

    def touch(self, flow: Flow, now: float) -> None:
        self.flows.move_to_end(flow.key)
        flow.last_seen = now

    def forget(self, key: FlowKey) -> bool:
        flow = self.flows.pop(key, None)
        if flow is None:
            return False
        self.limits.release(flow.guest_mac, key.proto)
        return True

    def open_failed(self, key: FlowKey, reason: str) -> None:
        """The shell could not open `key`'s socket (EMFILE, ENETUNREACH, EACCES for a ping
        socket ping_group_range refuses): forget the flow, count `open_<reason>`."""
        if self.forget(key):
            self.drops[f"open_{reason}"] += 1

    def guest_mac(self, key: FlowKey) -> bytes | None:
        """Whose flow `key` is (the shell passes it to ErrorReporter.error_frame)."""
        flow = self.flows.get(key)
        return None if flow is None else flow.guest_mac

    def expire(self, now: float) -> list[FlowKey]:
        idle = []
        for key, flow in self.flows.items():
            if flow.last_seen + self.idle_seconds > now:
                break
            idle.append(key)
        for key in idle:
            self.forget(key)
        return idle

    def next_deadline(self) -> float | None:
        for flow in self.flows.values():
            return flow.last_seen + self.idle_seconds
        return None

    def status(self) -> dict[str, object]:
        return {"flows": len(self.flows), "drops": dict(self.drops)}
