"""The hub's half of direct paths: who advertised what, and the INTRO each endpoint gets.

Who uses it: tunnel/listener.py (each session's ADVERTISE, each link's end, the peers file)
and its `introduce` task, which calls `tick()` every INTRO_MIN_INTERVAL and hands each INTRO
to its Link (tunnel/session.py Link.introduce).  Sans-I/O: the switch's tables are read, never
changed; the clock is injectable.

An endpoint that sent ADVERTISE on its active link gets an INTRO listing every other such
peer of the peers file (where at least one of the two listens) with its fingerprint, its
advertised addresses (0.0.0.0 / :: become the address its hub connection comes from; a
loopback address is taken only from an endpoint whose hub connection is itself local) and
the bindings the hub holds for its SessionPort now: the MACs learned on it (the switch's MAC
table) and the IPv4/IPv6 addresses its policy's AddressBook gives it (claimed or leased).

Work per tick, for C advertising sessions: O(C) to see whether anything may have changed
(each port's MAC and address counts, the advertised sets, the peers file); only then a scan
of the MAC table and the address book (at most 256 MACs and 1024 addresses per session), read
from a snapshot SCAN_ENTRIES_PER_TICK entries a tick; a peer's entry encoded once for all its
recipients (again only when it changed), and O(C) to assemble each set due, as many as
INTRO_BYTES_PER_TICK holds.  A rescan also runs every RESCAN_SECONDS, for what the counts
miss (a MAC or claim replaced by another between two ticks); no INTRO is made
while a scan is under way (a new member is introduced with its bindings read, not before).
A recipient gets at most one INTRO per INTRO_MIN_INTERVAL (the changes of that time
coalesce), and only when its set changed.  A peer whose bindings pass the INTRO limits, or
that does not fit in the record, is left out (it stays relayed through the hub: counted
`omitted`, logged once per peer).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from netstack.policy import PERMANENT
from netstack.switch import Switch
from tunnel.introductions import MAX_INTRO_IPS, MAX_INTRO_MACS, MAX_INTRO_PEERS
from tunnel.session import Link, SessionPort
from tunnel.wire import MAX_INTRO_PAYLOAD, U16, encode_intro_entry

log = logging.getLogger(__name__)

# At most one INTRO per endpoint this often: the changes in between go in the next one.
INTRO_MIN_INTERVAL = 0.25
# Bindings are rescanned at least this often even when no count moved (what the counts miss:
# a MAC or claim replaced by another on the same port between two ticks).
RESCAN_SECONDS = 10.0
# The INTRO bytes one tick may make (4 ticks a second); past it, the endpoints that waited
# least wait for the next tick.  One peer's change is a new set for every other endpoint:
# 256 endpoints of 256 peers, 40 KB each, are 10 MB.
INTRO_BYTES_PER_TICK = 4 << 20
# Table entries (MACs, addresses) a tick reads of a binding scan, ~0.5 us each: 256 sessions
# at their limits hold 327,680, read over 20 ticks (5 s).
SCAN_ENTRIES_PER_TICK = 16384


@dataclass
class Advertised:
    """What one link's endpoint advertised: as sent, and as others may dial it."""

    link: Link
    sent: tuple[tuple[str, int], ...]
    addresses: tuple[tuple[str, int], ...]  # wildcards resolved, undialable ones left out
    listens: bool = field(init=False)

    def __post_init__(self) -> None:
        self.listens = bool(self.addresses)


def resolve(addresses: tuple[tuple[str, int], ...],
            observed: str | None) -> tuple[tuple[str, int], ...]:
    """`addresses` as another endpoint may dial them: 0.0.0.0 and :: become `observed` (the
    address the hub sees the endpoint's connection come from; IPv4-mapped IPv6, seen or
    sent, as IPv4) if it is of their family (a wildcard socket takes no other); loopback
    addresses stay only if `observed` is loopback too (an endpoint elsewhere must not point
    its peers at their own machine's services); duplicates go."""
    seen = None
    try:
        seen = ipaddress.ip_address((observed or "").partition("%")[0])
    except ValueError:  # no IP address (a test's memory stream): wildcards resolve to nothing
        pass
    if isinstance(seen, ipaddress.IPv6Address) and seen.ipv4_mapped is not None:
        seen = seen.ipv4_mapped
    resolved: list[tuple[str, int]] = []
    for host, port in addresses:
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # what a dialer reaches: ::ffff:127.0.0.1 is its loopback
        if ip.is_unspecified:  # of its family only: a wildcard socket takes no other
            if seen is None or seen.is_unspecified or seen.version != ip.version:
                continue
            ip = seen
        if ip.is_loopback and not (seen is not None and seen.is_loopback):
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local:
            continue  # needs a scope, which means nothing on another machine
        if (str(ip), port) not in resolved:
            resolved.append((str(ip), port))
    return tuple(resolved)


@dataclass
class _Sent:
    """The last INTRO a recipient's link got, when, and of which generation of the sets."""

    link: Link
    entries: list[bytes]
    when: float
    generation: int


@dataclass
class _Scan:
    """A walk over the keys of the switch's MAC table and address book, under way."""

    now: float  # the switch's clock when it started: what is alive
    macs: dict[object, set[bytes]]  # by member port
    ipv4: dict[object, set[bytes]]
    ipv6: dict[object, set[bytes]]
    mac_keys: Iterator[bytes]
    ip_keys: Iterator[bytes]


@dataclass
class _Entry:
    """One member's encoded INTRO entry and what it was made from."""

    key: tuple
    data: bytes | None  # None: past the INTRO limits, left out


class Introducer:
    """The introductions of one hub.  `enabled` False (`hub --no-direct`): ADVERTISEs are
    still recorded (and shown), no INTRO is ever made (the listener answers each ADVERTISE
    with an empty one: an endpoint drops what an earlier hub introduced)."""

    def __init__(self, switch: Switch, fingerprint_of: Callable[[str], bytes | None], *,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.switch = switch
        self.fingerprint_of = fingerprint_of  # the peers file: name -> digest, or None
        self.enabled = enabled
        self.clock = clock  # for INTRO_MIN_INTERVAL and RESCAN_SECONDS; aging: switch.clock
        self.advertised: dict[SessionPort, Advertised] = {}
        self.sent: dict[SessionPort, _Sent] = {}
        self.intros = 0  # INTRO records made
        self.intro_bytes = 0  # their entries' bytes
        self.omitted = 0  # peers left out of a set (past a limit)
        self.scans = 0  # binding rescans
        self._signature: object = None
        self._scanned_at = float("-inf")
        self._scanning: _Scan | None = None
        self._bindings: dict[object, tuple[set[bytes], set[bytes], set[bytes]]] = {}
        self._bindings_version = 0  # moves when a scan ends
        self._entry_list: list[tuple[SessionPort, bool, bytes]] = []
        self._entries_stamp: tuple[int, int] | None = None  # (generation, bindings version)
        self._entries: dict[SessionPort, _Entry] = {}
        self._members: tuple[SessionPort, ...] = ()
        self._generation = 0  # moves whenever any member's entry or the members change
        self._logged: set[str] = set()

    # -- what the listener tells it ---------------------------------------------------------

    def advertise(self, link: Link, addresses: tuple[tuple[str, int], ...]) -> None:
        """`link`'s endpoint sent ADVERTISE (again: the latest wins; a link's first is
        logged, its changes only at debug level: a flood of them must not flood the log)."""
        port = link.port
        previous = self.advertised.get(port)
        if previous is not None and previous.link is link and previous.sent == addresses:
            return  # a repeat changes nothing
        resolved = resolve(addresses, port.peer_address)
        self.advertised[port] = Advertised(link, addresses, resolved)
        self._generation += 1
        log.log(logging.DEBUG if previous is not None and previous.link is link else logging.INFO,
                "%s: advertised %s%s", port.name,
                ", ".join(_text(a) for a in resolved) or "no address (dials only)",
                f" (sent {', '.join(_text(a) for a in addresses)})"
                if addresses and resolved != addresses else "")

    def link_ended(self, link: Link) -> None:
        """`link` is over: its advertisement goes with it (a new link advertises anew)."""
        port = link.port
        advertised = self.advertised.get(port)
        if advertised is not None and advertised.link is link:
            del self.advertised[port]
            self._entries.pop(port, None)
            self._bindings.pop(port, None)
            self._generation += 1
        sent = self.sent.get(port)
        if sent is not None and sent.link is link:
            del self.sent[port]

    def peers_changed(self) -> None:
        """The peers file was reloaded: who may be introduced, and with which key, may have
        changed."""
        self._generation += 1

    # -- the tick ---------------------------------------------------------------------------

    def tick(self) -> list[tuple[Link, list[bytes]]]:
        """The INTROs to send now: (link, entries) for each endpoint whose set changed and
        whose last INTRO is at least INTRO_MIN_INTERVAL old, the longest waiting first, as
        many as INTRO_BYTES_PER_TICK holds (always one)."""
        if not self.enabled or not self.advertised:
            return []
        now = self.clock()
        members = self._current_members()
        ports = tuple(port for port, _ in members)
        if ports != self._members:
            self._members = ports
            self._generation += 1
        signature = (ports, tuple((self.switch.mac_counts.get(port),
                                   self.switch.addresses.counts.get(port)) for port in ports))
        if self._scanning is None and (signature != self._signature
                                       or now - self._scanned_at >= RESCAN_SECONDS):
            self._signature = signature
            self._scanned_at = now
            self._scan(members)
        if self._scanning is not None:
            self._continue_scan()
        if self._scanning is not None or any(port not in self._bindings for port in ports):
            return []  # introduce once the bindings are read (a member came during a scan:
            # the next tick starts the scan that reads it)
        if self._entries_stamp != (self._generation, self._bindings_version):
            self._entry_list = self._encoded(members)  # moves the generation if one changed
            self._entries_stamp = (self._generation, self._bindings_version)
        entries = self._entry_list
        due = []
        for port, advertised in members:
            sent = self.sent.get(port)
            if sent is None or sent.link is not advertised.link:
                due.append((float("-inf"), port.name, port, advertised))
            elif sent.generation != self._generation and now - sent.when >= INTRO_MIN_INTERVAL:
                due.append((sent.when, port.name, port, advertised))
        if not due:
            return []
        due.sort(key=lambda item: item[:2])
        out: list[tuple[Link, list[bytes]]] = []
        budget = INTRO_BYTES_PER_TICK
        for _, _, port, advertised in due:
            wanted = self._fit(port, [data for other, listens, data in entries
                                      if other is not port
                                      and (listens or advertised.listens)])
            sent = self.sent.get(port)
            if sent is not None and sent.link is advertised.link and sent.entries == wanted:
                sent.generation = self._generation  # its set did not change
                continue
            size = sum(map(len, wanted))
            if out and size > budget:
                break  # the rest wait for the next tick
            budget -= size
            self.sent[port] = _Sent(advertised.link, wanted, now, self._generation)
            self.intros += 1
            self.intro_bytes += size
            out.append((advertised.link, wanted))
        return out

    def _current_members(self) -> list[tuple[SessionPort, Advertised]]:
        """The sessions that may be introduced: advertised on their active link and still in
        the peers file; by name."""
        members = [(port, advertised) for port, advertised in self.advertised.items()
                   if port.active is advertised.link
                   and self.fingerprint_of(port.name) is not None]
        members.sort(key=lambda member: member[0].name)
        return members

    def _scan(self, members: list[tuple[SessionPort, Advertised]]) -> None:
        """Start reading every member's bindings from the switch: a snapshot of its tables'
        keys (a copy at C speed that makes no new object), walked SCAN_ENTRIES_PER_TICK a tick
        by `_continue_scan`, each entry as it is then."""
        self.scans += 1
        ports = [port for port, _ in members]
        self._scanning = _Scan(
            now=self.switch.clock(),
            macs={port: set() for port in ports},
            ipv4={port: set() for port in ports},
            ipv6={port: set() for port in ports},
            mac_keys=iter(list(self.switch.mac_table)),
            ip_keys=iter(list(self.switch.addresses.owners)))

    def _continue_scan(self) -> None:
        """Walk the next SCAN_ENTRIES_PER_TICK entries of the scan under way; at its end the
        bindings it read become the ones introduced."""
        scan = self._scanning
        assert scan is not None
        aging = self.switch.aging
        now = scan.now
        macs, ipv4, ipv6 = scan.macs, scan.ipv4, scan.ipv6
        budget = SCAN_ENTRIES_PER_TICK
        mac_table = self.switch.mac_table
        for mac in islice(scan.mac_keys, budget):
            budget -= 1
            entry = mac_table.get(mac)
            if entry is None:
                continue  # gone since the snapshot
            held = macs.get(entry[0])
            if held is not None and (entry[1] == PERMANENT or now - entry[1] <= aging):
                held.add(mac)
        owners = self.switch.addresses.owners
        for ip in islice(scan.ip_keys, budget):
            budget -= 1
            owned = owners.get(ip)
            if owned is not None and owned[0] in macs and (owned[2] or now - owned[1] <= aging):
                (ipv4 if len(ip) == 4 else ipv6)[owned[0]].add(ip)
        if budget:  # both walks ended inside this tick's share
            self._bindings = {port: (macs[port], ipv4[port], ipv6[port]) for port in macs}
            self._bindings_version += 1
            self._scanning = None

    def _encoded(self, members: list[tuple[SessionPort, Advertised]]
                 ) -> list[tuple[SessionPort, bool, bytes]]:
        """Each member's INTRO entry (port, listens, bytes), encoded again only when what it
        is made of changed; a member past the INTRO limits is left out."""
        entries = []
        for port, advertised in members:
            digest = self.fingerprint_of(port.name)
            assert digest is not None  # _current_members checked it
            bindings = self._bindings.get(port, (set(), set(), set()))
            key = (digest, advertised.addresses, bindings)
            entry = self._entries.get(port)
            if entry is None or entry.key != key:
                entry = self._entries[port] = _Entry(key, self._encode(port.name, key))
                self._generation += 1
            if entry.data is not None:
                entries.append((port, advertised.listens, entry.data))
        return entries

    def _encode(self, name: str, key: tuple) -> bytes | None:
        digest, addresses, (macs, ipv4, ipv6) = key
        if len(macs) > MAX_INTRO_MACS or len(ipv4) > MAX_INTRO_IPS or len(ipv6) > MAX_INTRO_IPS:
            self._left_out(name, f"{len(macs)} MACs, {len(ipv4)} IPv4 and {len(ipv6)} IPv6 "
                           f"addresses: past the INTRO limits")
            return None
        return encode_intro_entry(name, digest, addresses, macs, ipv4, ipv6)

    def _fit(self, port: SessionPort, wanted: list[bytes]) -> list[bytes]:
        """`wanted` as far as one INTRO holds it (peers and bytes); the rest left out."""
        room = MAX_INTRO_PAYLOAD - U16.size
        if len(wanted) <= MAX_INTRO_PEERS and sum(map(len, wanted)) <= room:
            return wanted
        fitted: list[bytes] = []
        for entry in wanted:
            if len(fitted) < MAX_INTRO_PEERS and len(entry) <= room:
                fitted.append(entry)
                room -= len(entry)
        self._left_out(port.name, f"{len(wanted) - len(fitted)} of {len(wanted)} peers do not "
                       f"fit in its INTRO ({MAX_INTRO_PEERS} peers, {MAX_INTRO_PAYLOAD} bytes)")
        return fitted

    def _left_out(self, name: str, why: str) -> None:
        self.omitted += 1
        if name not in self._logged:
            self._logged.add(name)
            log.warning("%s: introductions: %s; those stay relayed through the hub", name, why)

    # -- status -----------------------------------------------------------------------------

    def status_of(self, port: SessionPort) -> dict[str, object] | None:
        """`direct` of one session in `vhostvpn status`, or None if it never advertised."""
        advertised = self.advertised.get(port)
        if advertised is None:
            return None
        sent = self.sent.get(port)
        mine = self._entries.get(port)
        introduced_to = 0
        if mine is not None and mine.data is not None:
            introduced_to = sum(1 for other, s in self.sent.items()
                                if other is not port and mine.data in s.entries)
        return {"advertised": [_text(a) for a in advertised.addresses],
                "sent": [_text(a) for a in advertised.sent],
                "listens": advertised.listens,
                "introduced": len(sent.entries) if sent is not None else 0,
                "introduced_to": introduced_to}

    def status(self) -> dict[str, object]:
        return {"enabled": self.enabled, "advertising": len(self.advertised),
                "intros": self.intros, "intro_bytes": self.intro_bytes,
                "omitted": self.omitted, "scans": self.scans}


def _text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
