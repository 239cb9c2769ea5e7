"""What one guest may make the NAT hold: the per-guest caps as named constants, the flow key
every table files its flows under, and the one accounting that admits or refuses a new flow.

A guest, for the caps, is its *owner*: the switch port its frames came in on (a VM's
vhost-user port, a tunnel session with up to 256 MACs behind it, a TAP host), not its source
MAC, so one port holds one guest's caps however many MACs it speaks for.  `owner_of(mac)`
names it (the hub resolves a MAC through the switch's MAC table; without one the MAC is its
own owner); it is asked once, when a flow is admitted, and the flow keeps that owner until it
ends, so what it gives back goes to the account it was taken from even if its MAC later
moves or ages out.  Every refusal is counted by reason; nothing here does I/O.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple, Protocol

from netstack.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

# What the caps are counted against: a switch port (the hub's), or a MAC on none.
Owner = Hashable

# Flows one guest (one port) may hold open at once, per protocol: each is a socket of the
# hub's host.  256 UDP flows cover a resolver's and a browser's worth; TCP is larger for
# parallel downloads (issue 12's proof opens 100 connections at once); pings are few.
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
# Bytes all guests together may have the NAT buffer (32 guests' worth).
MAX_BUFFERED_BYTES_TOTAL = 256 * 1024 * 1024
# Port forwards' flows (opened by the outside's clients, not by the guest) are admitted only
# while the guest holds less than this share of its cap: a client flooding a forward cannot
# shut the guest out of its own connections.
FORWARDED_SHARE = 0.5


def mac_owner(mac: bytes) -> Owner:
    """Without a switch to ask, each MAC is its own owner."""
    return mac


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
    """Per-owner counts of flows, half-open connections and buffered bytes, checked against
    the caps; `refusals` counts each refusal by reason.  An owner's entry lives only while it
    holds something, so the accounting is as bounded as what it accounts for.  `owner_of`
    names a new flow's owner from its guest's MAC (the callers ask it at admit time and keep
    the answer with the flow)."""

    def __init__(self, flows_per_guest: dict[int, int] | None = None,
                 half_open_per_guest: int = MAX_HALF_OPEN_PER_GUEST,
                 buffered_per_guest: int = MAX_BUFFERED_BYTES_PER_GUEST,
                 flows_total: int = MAX_FLOWS_TOTAL,
                 buffered_total: int = MAX_BUFFERED_BYTES_TOTAL,
                 owner_of: Callable[[bytes], Owner] = mac_owner) -> None:
        self.flows_per_guest = dict(MAX_FLOWS_PER_GUEST if flows_per_guest is None
                                    else flows_per_guest)
        self.half_open_per_guest = half_open_per_guest
        self.buffered_per_guest = buffered_per_guest
        self.flows_total = flows_total
        self.buffered_total = buffered_total
        self.owner_of = owner_of
        self.total = 0
        self.buffered = 0  # all owners' buffered bytes
        self.refusals: Counter[str] = Counter()
        self._owners: dict[Owner, _Account] = {}

    def _account(self, owner: Owner) -> _Account:
        account = self._owners.get(owner)
        if account is None:
            account = self._owners[owner] = _Account()
        return account

    def _forget_if_empty(self, owner: Owner) -> None:
        account = self._owners.get(owner)
        if account is not None and account.empty():
            del self._owners[owner]

    def admit(self, owner: Owner, proto: int, *, forwarded: bool = False) -> bool:
        """Take one flow of `proto` for `owner`, or refuse (counted: `flow_limit`, the
        owner's cap, FORWARDED_SHARE of it for a port forward's flow; `host_limit`, all
        owners' sockets)."""
        if self.total >= self.flows_total:
            self.refusals["host_limit"] += 1
            return False
        account = self._owners.get(owner)
        held = account.flows[proto] if account is not None else 0
        cap = self.flows_per_guest.get(proto, 0)
        if held >= (int(cap * FORWARDED_SHARE) if forwarded else cap):
            self.refusals["flow_limit"] += 1
            return False
        self._account(owner).flows[proto] += 1
        self.total += 1
        return True

    def release(self, owner: Owner, proto: int) -> None:
        """Give back a flow `admit` took."""
        account = self._owners.get(owner)
        if account is None or account.flows[proto] <= 0:
            raise ValueError(f"release of a {proto} flow the owner does not hold")
        account.flows[proto] -= 1
        self.total -= 1
        self._forget_if_empty(owner)

    def admit_half_open(self, owner: Owner) -> bool:
        account = self._account(owner)
        if account.half_open >= self.half_open_per_guest:
            self.refusals["half_open_limit"] += 1
            self._forget_if_empty(owner)
            return False
        account.half_open += 1
        return True

    def release_half_open(self, owner: Owner) -> None:
        account = self._owners.get(owner)
        if account is None or account.half_open <= 0:
            raise ValueError("release of a half-open connection the owner does not hold")
        account.half_open -= 1
        self._forget_if_empty(owner)

    def charge(self, owner: Owner, nbytes: int) -> bool:
        """Hold `nbytes` more for `owner`, or refuse (`buffer_limit`: the owner's cap;
        `host_buffer_limit`: all owners')."""
        account = self._account(owner)
        if account.buffered + nbytes > self.buffered_per_guest:
            self.refusals["buffer_limit"] += 1
            self._forget_if_empty(owner)
            return False
        if self.buffered + nbytes > self.buffered_total:
            self.refusals["host_buffer_limit"] += 1
            self._forget_if_empty(owner)
            return False
        account.buffered += nbytes
        self.buffered += nbytes
        return True

    def room(self, owner: Owner) -> int:
        """Bytes `owner` may still have the NAT buffer (within its cap and all owners')."""
        account = self._owners.get(owner)
        return min(self.buffered_per_guest - (0 if account is None else account.buffered),
                   self.buffered_total - self.buffered)

    def host_room(self) -> int:
        """Bytes all owners together may still have the NAT buffer."""
        return self.buffered_total - self.buffered

    def credit(self, owner: Owner, nbytes: int) -> None:
        account = self._owners.get(owner)
        if account is None or account.buffered < nbytes:
            raise ValueError(f"credit of {nbytes} bytes the owner was not charged")
        account.buffered -= nbytes
        self.buffered -= nbytes
        self._forget_if_empty(owner)

    def held(self, owner: Owner) -> dict[str, int]:
        """What `owner` holds now (for status)."""
        account = self._owners.get(owner)
        if account is None:
            return {"flows": 0, "half_open": 0, "buffered": 0}
        return {"flows": sum(account.flows.values()), "half_open": account.half_open,
                "buffered": account.buffered}

    def by_owner(self) -> dict[Owner, dict[str, object]]:
        """What each owner holds now (for status): its flows by protocol number, half-open
        connections, buffered bytes."""
        return {owner: {"flows": {proto: n for proto, n in account.flows.items() if n},
                        "half_open": account.half_open, "buffered": account.buffered}
                for owner, account in self._owners.items()}

    @property
    def owners(self) -> int:
        return len(self._owners)


class Flow(Protocol):
    key: FlowKey
    guest_mac: bytes
    owner: Owner  # whose caps it counts against, fixed when it was admitted
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
        self.limits.release(flow.owner, key.proto)
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

    def owner(self, key: FlowKey) -> Owner | None:
        """Whose caps flow `key` counts against (and whose ICMP error rate it takes)."""
        flow = self.flows.get(key)
        return None if flow is None else flow.owner

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
