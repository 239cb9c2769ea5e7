"""The DHCP server's binding table: which address each MAC holds, is offered, or had; which
addresses rest; and the choice of an address for a client.  The lease state machine, per
address, with no messages, no replies and no files.

The server (dhcp_server.py) turns each client message into one or two calls here and builds
the reply; it restores the table from what the store read (dhcp_store.py) and asks which
records changed (`changed`) when it hands the store a write.  This module must never hand one
address to two MACs, and no call costs the size of the pool: a few dict lookups and at most
`MAX_PROBES` heap pops (`expire` pops what expired).

Rules
-----
* Every change of the table goes through `_commit`, `_set_record`, `_forget`,
  `_bind`/`_unbind`, each of which keeps the indexes (by address, by client identifier, the
  free set, the heaps) in step.  `_settle` is the one place that says whether a pool address
  is free; `available` is the one place that says whether an address may be given to a MAC.
* Callbacks are the caller's: a call that ends a running lease returns it (`grant`,
  `forget`, `release`, `decline`, `expire`), and the server tells the hub.

Theory of operation
-------------------
Who a client is.  The *MAC* is the unit of ownership: at most one lease per MAC, an address
held by at most one MAC, and the switch binds addresses to ports by MAC.  The client
identifier (option 61, else chaddr) decides which address a client gets *back*: a client that
comes back with the same identifier (say, a VM re-created with a new MAC) gets its old address
if nobody holds it.  An identifier presented from another MAC never takes an address that is
still leased: client identifiers cross the segment in broadcasts, so honouring them over
the MAC would let one guest take another's address.  A second client on the same MAC (boot
firmware, then the OS) takes over that MAC's lease and keeps its address.

The table holds one record (a `Lease`) per MAC.  A record is *bound* while its lease runs
and *remembered* after it was released or expired, so the client gets the same address
again; a remembered record is forgotten when its address goes to another client.  Records
are therefore at most one per address.

    per address:   free ──offer──► offered (60 s, to one MAC)
                   free/offered/remembered ──grant, `available`──► bound
                   bound ──grant (same MAC)──► bound, expiry extended
                   bound ──release / expire──► remembered ──(another client takes it)──► free
                   bound/offered ──decline──► declined (10 min) ──► free
                   free ──probed, `in_use` by another port──► resting (5 min) ──► free
                   bound ──forget (a NAK: reserved elsewhere, pool changed)──► free

Choice of an address on DISCOVER (`choose`): the MAC's reservation (reservations win; if a
lease from before the reservation still holds it, the reserved client waits, and that lease
is NAKed at its next renewal); else the MAC's bound lease; else the address offered to it a
moment ago; else the address last held by its client identifier; else its remembered
address; else the requested address (option 50); else the lowest free address of the
pool (a set and a heap); else the address remembered longest (a heap by `expires`).  None
left: `pool_exhausted`.  A free address that fails `in_use` (another port sends from it, a
host configured by hand or a guest squatting) rests out of the free set for
`IN_USE_HOLD_SECONDS`, so each such address costs one probe, not one per DISCOVER: a guest
that sends from the lowest free addresses cannot make every DISCOVER probe the same ones and
give up.  A DISCOVER whose probes all met such addresses while free ones remain is counted
`no_offer_in_use` (its retransmission gets an address), not `pool_exhausted`.
"""

from __future__ import annotations

import collections
import heapq
import logging
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from netstack.frame import format_mac
from netstack.gateway.dhcp_config import DhcpConfig

log = logging.getLogger(__name__)

OFFER_HOLD_SECONDS = 60.0  # an offered address waits this long for the client's REQUEST
DECLINE_HOLD_SECONDS = 600.0  # a declined address (someone else answers ARP for it) rests
# A free address that another port sends from (`in_use`) leaves the free set for this long,
# so the next DISCOVER probes fresh ones (the switch's claims age out after as long).
IN_USE_HOLD_SECONDS = 300.0
# Tables a client can grow (its records are bounded by the pool: one a MAC, one an address;
# addresses resting because another port uses them are at most the pool, out of whose free
# set they come).
MAX_OFFERS = 4096  # offers outstanding; the oldest is dropped first
MAX_DECLINED = 256  # addresses resting at once; DECLINEs beyond are ignored
MAX_PROBES = 8  # free or remembered addresses tried per DISCOVER (others fail `in_use`)
HEAP_SLACK = 1024  # stale heap entries tolerated before a heap is rebuilt
# What we keep of a client's hostname option (RFC 1123 names, and '_' as seen from Windows).
HOSTNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")


@dataclass(frozen=True)
class Lease:
    """One client's address.  `expires` is on the server's clock (wall time by default)."""

    mac: bytes
    ip: IPv4Address
    expires: float
    hostname: str | None = None
    client_id: bytes | None = None  # option 61 as the client sent it, if it did


def plausible_hostname(text: str) -> bool:
    """Is `text` a host name we keep (it goes into logs and the state file)?"""
    return HOSTNAME_RE.fullmatch(text) is not None


class LeaseTable:
    """The records, offers and resting addresses of one pool.  `counters` is the server's;
    `in_use(ip, mac)` says whether a port other than `mac`'s sends from `ip`."""

    def __init__(self, config: DhcpConfig, counters: collections.Counter[str],
                 in_use: Callable[[IPv4Address, bytes], bool], *,
                 track_changes: bool = False) -> None:
        self.config = config
        self.counters = counters
        self._in_use = in_use
        # MACs whose record changed (set, replaced or forgotten) since the server last looked;
        # None when nothing is persisted.
        self.changed: set[bytes] | None = set() if track_changes else None
        self._records: dict[bytes, Lease] = {}  # MAC -> bound or remembered lease
        self._bound: set[bytes] = set()  # MACs whose lease runs
        self._by_ip: dict[IPv4Address, bytes] = {}  # address -> MAC of its record
        self._by_client_id: dict[bytes, bytes] = {}  # identifier -> MAC of its latest record
        self._offers: dict[bytes, tuple[IPv4Address, float]] = {}  # MAC -> (address, until)
        self._offered: dict[IPv4Address, bytes] = {}  # address -> MAC it is offered to
        self._declined: dict[IPv4Address, float] = {}  # address -> until
        # Free addresses another port was found sending from, resting until (insertion order
        # is expiry order: one hold for all); bounded by the pool, out of which they come.
        self._in_use_resting: dict[IPv4Address, float] = {}
        self._reserved_for = {ip: mac for mac, ip in config.reservations.items()}
        first, last = config.pool  # type: ignore[misc]
        self._pool_range = (int(first), int(last))
        self._gateway_number = int(config.gateway)
        excluded = {int(ip) for ip in self._reserved_for} | {self._gateway_number}
        # Pool addresses nobody holds, is offered or rests: a set, and a heap of the same
        # numbers for the lowest one (entries no longer in the set are skipped when popped).
        self._free: set[int] = set(range(int(first), int(last) + 1)) - excluded
        self._free_heap: list[int] = sorted(self._free)
        # (expires, MAC) of bound leases and of remembered records; stale entries skipped.
        self._expiries: list[tuple[float, bytes]] = []
        self._remembered: list[tuple[float, bytes]] = []
        self._exhausted = False  # the pool had no address for the last DISCOVER

    # -- what the table holds --

    @property
    def leases(self) -> Mapping[bytes, Lease]:
        """The running leases, MAC -> Lease (a read-only snapshot)."""
        return types.MappingProxyType({mac: self._records[mac] for mac in self._bound})

    @property
    def records(self) -> Mapping[bytes, Lease]:
        """Every record, bound and remembered (read-only; copy it to keep it)."""
        return types.MappingProxyType(self._records)

    @property
    def declined(self) -> Mapping[IPv4Address, float]:
        """Declined addresses and when they rest until (read-only; copy it to keep it)."""
        return types.MappingProxyType(self._declined)

    def lease_for_ip(self, ip: IPv4Address) -> Lease | None:
        mac = self._by_ip.get(ip)
        return self._records[mac] if mac in self._bound else None

    def record(self, mac: bytes) -> Lease | None:
        """`mac`'s record, bound or remembered."""
        return self._records.get(mac)

    def bound_lease(self, mac: bytes) -> Lease | None:
        """`mac`'s lease if it runs."""
        return self._records[mac] if mac in self._bound else None

    def offer_of(self, mac: bytes) -> IPv4Address | None:
        offer = self._offers.get(mac)
        return None if offer is None else offer[0]

    def can_rest(self) -> bool:
        """Is there room for one more declined address (MAX_DECLINED)?"""
        return len(self._declined) < MAX_DECLINED

    def sizes(self) -> dict[str, int]:
        return {"records": len(self._records), "bound": len(self._bound),
                "offers": len(self._offers), "declined": len(self._declined),
                "free": len(self._free), "in_use_resting": len(self._in_use_resting)}

    # -- the rules on addresses --

    def available(self, ip: IPv4Address, mac: bytes, now: float) -> str | None:
        """None if `ip` may be `mac`'s now; else why not (a NAK reason)."""
        config = self.config
        if ip not in config.subnet:
            return "wrong_subnet"
        reserved = config.reservations.get(mac)
        if reserved is not None and ip != reserved:
            return "reserved_elsewhere"  # this client has a fixed address
        if reserved is None and not config.in_pool(ip):
            return "not_ours"
        owner = self._reserved_for.get(ip)
        if owner is not None and owner != mac:
            return "reserved"
        if ip in self._declined:
            return "declined"
        holder = self._by_ip.get(ip)
        if holder is not None and holder != mac and holder in self._bound:
            return "taken"
        offered_to = self._offered.get(ip)
        if offered_to is not None and offered_to != mac:
            return "taken"
        if self._in_use(ip, mac):
            self.counters["in_use_elsewhere"] += 1
            return "in_use"
        return None

    def choose(self, mac: bytes, client_id: bytes | None, requested: IPv4Address | None,
               now: float) -> IPv4Address | None:
        """The address to offer `mac` (see the theory of operation for the order)."""
        reserved = self.config.reservations.get(mac)
        if reserved is not None:
            if self.available(reserved, mac, now) is None:
                return reserved
            self.counters["reservation_in_use"] += 1
            log.warning("reserved address %s for %s is in use or declined; not offering",
                        reserved, format_mac(mac))
            return None
        candidates: list[IPv4Address] = []
        record = self._records.get(mac)
        if record is not None and mac in self._bound:
            candidates.append(record.ip)
        if mac in self._offers:
            candidates.append(self._offers[mac][0])
        if client_id is not None:
            same_client = self._by_client_id.get(client_id)
            if same_client is not None and same_client not in self._bound:
                candidates.append(self._records[same_client].ip)
        if record is not None:
            candidates.append(record.ip)
        if requested is not None:
            candidates.append(requested)
        for ip in candidates:
            if self.available(ip, mac, now) is None:
                return ip
        ip, in_use = self._lowest_free(mac, now)
        if ip is None:
            ip = self._longest_remembered(mac, now)
        if ip is not None:
            self._exhausted = False
        elif in_use and self._free:
            # Not exhausted: the addresses probed are used by other ports and now rest; the
            # client's retransmission probes fresh ones.
            self.counters["no_offer_in_use"] += 1
            log.warning("no address for %s this time: the %d free addresses tried are used by "
                        "other ports (resting %ds; %d rest, %d free)", format_mac(mac), in_use,
                        IN_USE_HOLD_SECONDS, len(self._in_use_resting), len(self._free))
        else:
            self.counters["pool_exhausted"] += 1
            if not self._exhausted:  # once until an address is found again: clients retry
                log.warning("pool exhausted: no address for %s (%d addresses resting, used by "
                            "other ports)", format_mac(mac), len(self._in_use_resting))
            self._exhausted = True
        return ip

    def _lowest_free(self, mac: bytes, now: float) -> tuple[IPv4Address | None, int]:
        """The lowest free address `available` to `mac`, and how many of those tried were
        in use by other ports (they leave the free set to rest: `IN_USE_HOLD_SECONDS`)."""
        heap, free = self._free_heap, self._free
        tried: list[int] = []
        in_use: list[IPv4Address] = []
        found = None
        while heap and len(tried) + len(in_use) < MAX_PROBES:
            number = heapq.heappop(heap)
            if number not in free or number in tried:
                continue  # taken since it was pushed, or a duplicate entry
            address = IPv4Address(number)
            refusal = self.available(address, mac, now)
            if refusal is None:
                found = address
                tried.append(number)
                break
            if refusal == "in_use":
                in_use.append(address)
            else:
                tried.append(number)
        for number in tried:  # still free until the caller takes it
            heapq.heappush(heap, number)
        for address in in_use:
            self._in_use_resting[address] = now + IN_USE_HOLD_SECONDS
            self._settle(address)
            log.info("%s is used by another port: not offered for %ds", address,
                     IN_USE_HOLD_SECONDS)
        return found, len(in_use)

    def _longest_remembered(self, mac: bytes, now: float) -> IPv4Address | None:
        heap = self._remembered
        tried: list[tuple[float, bytes]] = []
        found = None
        while heap and len(tried) < MAX_PROBES:
            entry = heapq.heappop(heap)
            expires, holder = entry
            record = self._records.get(holder)
            if record is None or holder in self._bound or record.expires != expires \
                    or entry in tried:
                continue
            tried.append(entry)
            if self.available(record.ip, mac, now) is None:
                found = record.ip
                break
        for entry in tried:
            heapq.heappush(heap, entry)
        return found

    # -- changes, one per decision of the server --

    def offer(self, mac: bytes, ip: IPv4Address, now: float) -> None:
        """Hold `ip` for `mac` OFFER_HOLD_SECONDS (replacing its earlier offer)."""
        previous = self._offers.pop(mac, None)
        if previous is not None and previous[0] != ip:
            del self._offered[previous[0]]
            self._settle(previous[0])
        if previous is None and len(self._offers) >= MAX_OFFERS:
            self.drop_offer(next(iter(self._offers)))  # the oldest: its REQUEST may still win
            self.counters["offer_evicted"] += 1
        self._offers[mac] = (ip, now + OFFER_HOLD_SECONDS)
        self._offered[ip] = mac
        self._settle(ip)

    def drop_offer(self, mac: bytes) -> None:
        offer = self._offers.pop(mac, None)
        if offer is not None and self._offered.get(offer[0]) == mac:
            del self._offered[offer[0]]
            self._settle(offer[0])

    def grant(self, lease: Lease) -> Lease | None:
        """Make `lease` its MAC's running lease (`available` said yes) and drop its offer.
        Returns the MAC's lease this one ended: running until now at another address."""
        ended = self._commit(lease)
        self.drop_offer(lease.mac)
        return ended

    def release(self, mac: bytes, now: float) -> Lease:
        """End `mac`'s running lease now; it is remembered, so the client gets it back."""
        released = replace(self._records[mac], expires=now)
        self._set_record(released)
        self._unbind(mac)
        return released

    def decline(self, mac: bytes, ip: IPv4Address, now: float) -> Lease | None:
        """`ip`, held by or offered to `mac`, rests DECLINE_HOLD_SECONDS (`can_rest` said
        there is room); returns `mac`'s running lease if this ended it."""
        record = self._records.get(mac)
        self._declined[ip] = now + DECLINE_HOLD_SECONDS
        self.drop_offer(mac)
        if record is not None and record.ip == ip and self.forget(mac):
            return record
        return None

    def forget(self, mac: bytes) -> bool:
        """Drop `mac`'s record altogether; True if its lease was running."""
        record = self._records.pop(mac)
        self._changed(mac)
        self._unindex(record)
        was_bound = mac in self._bound
        self._bound.discard(mac)
        self._settle(record.ip)
        return was_bound

    def expire(self, now: float) -> list[Lease]:
        """End leases, offers and declines whose time is up; returns the leases ended.
        Costs the expired entries, not the table."""
        ended = []
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires, mac = heapq.heappop(heap)
            lease = self._records.get(mac)
            if lease is None or mac not in self._bound or lease.expires != expires:
                continue  # renewed, released or forgotten since
            self._unbind(mac)
            self.counters["expired"] += 1
            log.info("lease expired: %s %s", format_mac(mac), lease.ip)
            ended.append(lease)
        for mac in [m for m, (_, until) in self._offers.items() if until <= now]:
            self.drop_offer(mac)
        for ip in [a for a, until in self._declined.items() if until <= now]:
            del self._declined[ip]
            self._settle(ip)
        resting = self._in_use_resting
        while resting:  # oldest first; stops at the first still resting
            ip = next(iter(resting))
            if resting[ip] > now:
                break
            del resting[ip]
            self._settle(ip)
        return ended

    def load(self, lease: Lease, bound: bool) -> bool:
        """Put a record read from the state file (checked against the configuration by the
        caller) into the table, running or remembered.  Never two records for one MAC or one
        address: a running lease beats a remembered one, a later one an earlier one; False
        if `lease` lost (it is skipped)."""
        for other_mac in (lease.mac, self._by_ip.get(lease.ip)):
            other = self._records.get(other_mac) if other_mac is not None else None
            if other is None:
                continue
            if (other_mac in self._bound, other.expires) >= (bound, lease.expires):
                return False
            self.forget(other_mac)
        self._set_record(lease)
        if bound:
            self._bind(lease.mac)
        else:
            self._unbind(lease.mac)
        self._compact_free_heap()
        return True

    def load_declined(self, ip: IPv4Address, until: float) -> None:
        """A declined address read from the state file rests until `until` (if there is
        room: `can_rest`)."""
        if self.can_rest():
            self._declined[ip] = until
            self._settle(ip)
            self._compact_free_heap()

    # -- the table's indexes: every change goes through here --

    def _commit(self, lease: Lease) -> Lease | None:
        """Make `lease` bound, forgetting the remembered record of its address if another's."""
        mac = lease.mac
        holder = self._by_ip.get(lease.ip)
        if holder is not None and holder != mac:
            assert holder not in self._bound, "available() let a running lease be taken"
            self.forget(holder)
        old = self._records.get(mac)
        was_bound = mac in self._bound
        self._set_record(lease)
        self._bind(mac)
        return old if old is not None and old.ip != lease.ip and was_bound else None

    def _set_record(self, lease: Lease) -> None:
        """Store `lease` as its MAC's record (its address has no other holder)."""
        old = self._records.get(lease.mac)
        if old is not None:
            self._unindex(old)
        self._records[lease.mac] = lease
        self._changed(lease.mac)
        self._by_ip[lease.ip] = lease.mac
        if lease.client_id is not None:
            self._by_client_id[lease.client_id] = lease.mac
        self._settle(lease.ip)
        if old is not None and old.ip != lease.ip:
            self._settle(old.ip)

    def _compact_free_heap(self) -> None:
        """Loading takes addresses out of the free set and leaves their heap entries behind:
        rebuild the heap once they are more than half of it, as `_push_bounded` does."""
        if len(self._free_heap) > 2 * len(self._free) + HEAP_SLACK:
            self._free_heap = sorted(self._free)

    def _changed(self, mac: bytes) -> None:
        if self.changed is not None:
            self.changed.add(mac)

    def _bind(self, mac: bytes) -> None:
        self._bound.add(mac)
        _push_bounded(self._expiries, (self._records[mac].expires, mac), len(self._bound),
                      lambda: [(self._records[m].expires, m) for m in self._bound])

    def _unbind(self, mac: bytes) -> None:
        self._bound.discard(mac)
        _push_bounded(self._remembered, (self._records[mac].expires, mac),
                      len(self._records) - len(self._bound),
                      lambda: [(r.expires, m) for m, r in self._records.items()
                               if m not in self._bound])

    def _unindex(self, record: Lease) -> None:
        if self._by_ip.get(record.ip) == record.mac:
            del self._by_ip[record.ip]
        if record.client_id is not None and self._by_client_id.get(record.client_id) == record.mac:
            del self._by_client_id[record.client_id]

    def _settle(self, ip: IPv4Address) -> None:
        """Put a pool address into the free set or take it out, after a change of the tables
        that concerns it: free means no record, no offer, not resting, not reserved."""
        number = int(ip)
        first, last = self._pool_range
        if not first <= number <= last or number == self._gateway_number \
                or ip in self._reserved_for:
            return
        if ip in self._by_ip or ip in self._offered or ip in self._declined \
                or ip in self._in_use_resting:
            self._free.discard(number)
        elif number not in self._free:
            self._free.add(number)
            _push_bounded(self._free_heap, number, len(self._free), lambda: list(self._free))


def _push_bounded(heap: list, entry: object, live_count: int,
                  live: Callable[[], list]) -> None:
    """Push `entry` on a heap whose stale entries are skipped when popped; once they make up
    more than half of it, rebuild it from `live` (amortized O(log n) a push)."""
    heapq.heappush(heap, entry)
    if len(heap) > 2 * live_count + HEAP_SLACK:
        heap[:] = live()
        heapq.heapify(heap)
