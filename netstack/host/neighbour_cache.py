"""The L3 host's neighbour cache: which MAC each on-link address has, and the packets waiting
while one is being resolved.  Part of netstack.host.l3host, which asks it and builds frames.

An entry is good for REACHABLE_SECONDS after the neighbour last answered; in its last
REFRESH_SECONDS a packet to it also asks for a unicast probe, so busy flows never stall.  An
unresolved destination gets a bounded queue and one solicitation per SOLICIT_INTERVAL,
SOLICIT_TRIES in all, then its queue is dropped.  Everything a segment or a host can make it
hold is bounded (entries, destinations being resolved, queued packets); the counts go into
the host's counters.  Sans-I/O: `now` is always passed in; it builds no frames.
"""

from __future__ import annotations

from collections import Counter, deque

REACHABLE_SECONDS = 300.0  # an entry lives this long after its last confirmation
REFRESH_SECONDS = 30.0  # in its last 30 s, traffic to an entry also sends a unicast probe
SOLICIT_INTERVAL = 1.0  # at most one ARP request / NS per destination per second
SOLICIT_TRIES = 3  # then the destination's queue is dropped
MAX_NEIGHBOURS = 1024
MAX_QUEUED_PER_DESTINATION = 16
MAX_QUEUED = 256  # packets waiting for resolution, all destinations together
MAX_PENDING = 256  # destinations being resolved at once

# A packet waiting for its next hop: (ethertype, IP packet, offload metadata).
Queued = tuple[bytes, bytes, tuple]


class Neighbour:
    __slots__ = ("expires", "mac", "probed")

    def __init__(self, mac: bytes, expires: float) -> None:
        self.mac = mac
        self.expires = expires
        self.probed = float("-inf")


class _Pending:
    """A destination being resolved: its packets, tries so far."""

    __slots__ = ("next_try", "packets", "tries")

    def __init__(self, next_try: float) -> None:
        self.packets: deque[Queued] = deque()
        self.tries = 1
        self.next_try = next_try


class NeighbourCache:
    """Packed IPv4/IPv6 address -> MAC, and the destinations being resolved."""

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters
        self.entries: dict[bytes, Neighbour] = {}
        self.pending: dict[bytes, _Pending] = {}
        self.queued = 0  # packets in all pending queues

    def resolved(self, address: bytes, now: float) -> Neighbour | None:
        """The entry for `address` if it is still good."""
        entry = self.entries.get(address)
        return entry if entry is not None and entry.expires > now else None

    def is_known(self, address: bytes) -> bool:
        """Is `address` cached (good or not) or being resolved?"""
        return address in self.entries or address in self.pending

    def mac_of(self, address: bytes) -> bytes | None:
        """The MAC cached for `address`, good or not."""
        entry = self.entries.get(address)
        return entry.mac if entry is not None else None

    def wants_probe(self, entry: Neighbour, now: float) -> bool:
        """Should traffic to this good entry also send a unicast probe (then counted)?"""
        if entry.expires - now < REFRESH_SECONDS and now - entry.probed >= SOLICIT_INTERVAL:
            entry.probed = now
            self.counters["probe_sent"] += 1
            return True
        return False

    def enqueue(self, hop: bytes, queued: Queued, now: float) -> bool | None:
        """Queue a packet for `hop`: True when a first solicitation is due now, False when
        one is already under way, None when no more destinations can be resolved (dropped)."""
        pending = self.pending.get(hop)
        first = pending is None
        if pending is None:
            if len(self.pending) >= MAX_PENDING:
                self.counters["pending_full_dropped"] += 1
                return None
            pending = self.pending[hop] = _Pending(now + SOLICIT_INTERVAL)
            self.counters["solicit_sent"] += 1
        if len(pending.packets) >= MAX_QUEUED_PER_DESTINATION:
            pending.packets.popleft()  # the oldest goes, as Linux's neighbour queue does
            self.queued -= 1
            self.counters["queue_full_dropped"] += 1
        if self.queued >= MAX_QUEUED:
            self.counters["queue_full_dropped"] += 1
        else:
            pending.packets.append(queued)
            self.queued += 1
            self.counters["queued"] += 1
        return first

    def learn(self, address: bytes, mac: bytes, now: float, *, create: bool) -> list[Queued]:
        """Cache `address` at `mac` if it is cached, being resolved, or `create`; return the
        packets that waited for it."""
        entry = self.entries.get(address)
        pending = self.pending.pop(address, None)
        if entry is None and pending is None and not create:
            return []
        if entry is None:
            self._make_room(now)
            entry = self.entries[address] = Neighbour(mac, 0.0)
            self.counters["neighbour_learned"] += 1
        entry.mac, entry.expires, entry.probed = mac, now + REACHABLE_SECONDS, float("-inf")
        if pending is None:
            return []
        self.queued -= len(pending.packets)
        self.counters["released"] += len(pending.packets)
        return list(pending.packets)

    def forget(self, address_len: int) -> None:
        """Forget every entry and resolution of one family (4: IPv4, 16: IPv6)."""
        for address in [a for a in self.entries if len(a) == address_len]:
            del self.entries[address]
        for address in [a for a in self.pending if len(a) == address_len]:
            self._drop_pending(address, "reconfigured_dropped")

    def _make_room(self, now: float) -> None:
        if len(self.entries) < MAX_NEIGHBOURS:
            return
        for address in [a for a, e in self.entries.items() if e.expires <= now]:
            del self.entries[address]
        if len(self.entries) >= MAX_NEIGHBOURS:
            oldest = min(self.entries, key=lambda a: self.entries[a].expires)
            del self.entries[oldest]
            self.counters["neighbour_evicted"] += 1

    def _drop_pending(self, address: bytes, reason: str) -> None:
        pending = self.pending.pop(address)
        self.queued -= len(pending.packets)
        self.counters[reason] += len(pending.packets)

    def tick(self, now: float) -> list[bytes]:
        """Retry or give up on resolutions: the addresses to solicit again now."""
        again: list[bytes] = []
        for address, pending in list(self.pending.items()):
            if pending.next_try > now:
                continue
            if pending.tries >= SOLICIT_TRIES:
                self.counters["resolution_failed"] += 1
                self._drop_pending(address, "unresolved_dropped")
                continue
            pending.tries += 1
            pending.next_try = now + SOLICIT_INTERVAL
            self.counters["solicit_sent"] += 1
            again.append(address)
        return again

    def deadlines(self) -> list[float]:
        return [p.next_try for p in self.pending.values()]
