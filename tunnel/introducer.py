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
(each port's MAC and address counts, the advertised sets, the peers file); only then one pass
over the MAC table and the address book (O(entries), at most 256 MACs and 1024 addresses per
session), a peer's entry encoded once for all its recipients, and O(C x MAX_INTRO_PEERS) to
assemble the sets.  A full rescan also runs every RESCAN_SECONDS, for what the counts miss (a
MAC or claim replaced by another between two ticks, entries aging).  A recipient gets at most
one INTRO per INTRO_MIN_INTERVAL (the changes of that time coalesce), and only when its set
changed.  A peer whose bindings pass the INTRO limits, or that does not fit in the record,
is left out (it stays relayed through the hub: counted `omitted`, logged once per peer).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from netstack.policy import PERMANENT
from netstack.switch import Switch
from tunnel.introductions import MAX_INTRO_IPS, MAX_INTRO_MACS, MAX_INTRO_PEERS, DirectPeer
from tunnel.keys import format_fingerprint
from tunnel.session import Link, SessionPort
from tunnel.wire import MAX_INTRO_PAYLOAD, U16, encode_intro_peer

log = logging.getLogger(__name__)

# At most one INTRO per endpoint this often: the changes in between go in the next one.
INTRO_MIN_INTERVAL = 0.25
# Bindings are rescanned at least this often even when no count moved.
RESCAN_SECONDS = 2.0


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
    address the hub sees the endpoint's connection come from; IPv4-mapped IPv6 as IPv4);
    loopback addresses stay only if `observed` is loopback too (an endpoint elsewhere must
    not point its peers at their own machine's services); duplicates go."""
    seen = None
    if observed is not None:
        seen = ipaddress.ip_address(observed.partition("%")[0])
        if isinstance(seen, ipaddress.IPv6Address) and seen.ipv4_mapped is not None:
            seen = seen.ipv4_mapped
    resolved: list[tuple[str, int]] = []
    for host, port in addresses:
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            if seen is None or seen.is_unspecified:
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
    """The last INTRO a recipient's link got, and when."""

    link: Link
    entries: list[bytes]
    when: float


class Introducer:
    """The introductions of one hub.  `enabled` False (`hub --no-direct`): ADVERTISEs are
    still recorded (and shown), no INTRO is ever made."""

    def __init__(self, switch: Switch, fingerprint_of: Callable[[str], bytes | None], *,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.switch = switch
        self.fingerprint_of = fingerprint_of  # the peers file: name -> digest, or None
        self.enabled = enabled
        self.clock = clock  # for INTRO_MIN_INTERVAL and RESCAN_SECONDS; aging: switch.clock
        self.advertised: dict[SessionPort, Advertised] = {}
        self.sent: dict[SessionPort, _Sent] = {}
        self.intros = 0  # INTRO records made
        self.omitted = 0  # peers left out of a set (past a limit)
        self.scans = 0  # binding rescans
        self._signature: object = None
        self._scanned_at = float("-inf")
        self._bindings: dict[SessionPort, tuple[frozenset, frozenset, frozenset]] = {}
        self._encoded: dict[SessionPort, tuple[DirectPeer, bytes]] = {}
        self._too_big_logged: set[str] = set()
        self._dirty = True  # the sets may have changed since the last assembly

    # -- what the listener tells it ---------------------------------------------------------

    def advertise(self, link: Link, addresses: tuple[tuple[str, int], ...]) -> None:
        """`link`'s endpoint sent ADVERTISE (again: the latest wins)."""
        port = link.port
        previous = self.advertised.get(port)
        if previous is not None and previous.link is link and previous.sent == addresses:
            return  # a repeat changes nothing
        resolved = resolve(addresses, port.peer_address)
        self.advertised[port] = Advertised(link, addresses, resolved)
        self._dirty = True
        log.info("%s: advertised %s%s", port.name,
                 ", ".join(_text(a) for a in resolved) or "no address (dials only)",
                 f" (sent {', '.join(_text(a) for a in addresses)})"
                 if addresses and resolved != addresses else "")

    def link_ended(self, link: Link) -> None:
        """`link` is over: its advertisement goes with it (a new link advertises anew)."""
        port = link.port
        advertised = self.advertised.get(port)
        if advertised is not None and advertised.link is link:
            del self.advertised[port]
            self._encoded.pop(port, None)
            self._bindings.pop(port, None)
            self._dirty = True
        sent = self.sent.get(port)
        if sent is not None and sent.link is link:
            del self.sent[port]

    def peers_changed(self) -> None:
        """The peers file was reloaded: who may be introduced may have changed."""
        self._dirty = True

    # -- the tick ---------------------------------------------------------------------------

    def tick(self) -> list[tuple[Link, list[bytes]]]:
        """The INTROs to send now: (link, entries) for each endpoint whose set changed and
        whose last INTRO is at least INTRO_MIN_INTERVAL old."""
        if not self.enabled or not self.advertised:
            return []
        now = self.clock()
        members = self._members()
        signature = tuple((port, self.switch.mac_counts.get(port),
                           self.switch.addresses.counts.get(port)) for port, _ in members)
        if signature != self._signature or now - self._scanned_at >= RESCAN_SECONDS:
            self._dirty |= signature != self._signature  # also: who is a member changed
            self._signature = signature
            self._scanned_at = now
            self._dirty |= self._scan(members, self.switch.clock())
        pending = any(sent.link is not port.active for port, sent in self.sent.items())
        if not self._dirty and not pending and all(p in self.sent for p, _ in members):
            return []
        entries = self._entries(members)
        out = []
        waiting = False
        for port, advertised in members:
            wanted = [entry for other, other_ad, entry in entries if other is not port
                      and (advertised.listens or other_ad.listens)]
            wanted = self._fit(port, wanted)
            sent = self.sent.get(port)
            if sent is not None and sent.link is advertised.link and sent.entries == wanted:
                continue
            if sent is not None and now - sent.when < INTRO_MIN_INTERVAL:
                waiting = True  # coalesced into a later tick
                continue
            self.sent[port] = _Sent(advertised.link, wanted, now)
            self.intros += 1
            out.append((advertised.link, wanted))
        self._dirty = waiting
        return out

    def _members(self) -> list[tuple[SessionPort, Advertised]]:
        """The sessions that may be introduced: advertised on their active link and still in
        the peers file; by name."""
        members = [(port, advertised) for port, advertised in self.advertised.items()
                   if port.active is advertised.link
                   and self.fingerprint_of(port.name) is not None]
        members.sort(key=lambda member: member[0].name)
        return members

    def _scan(self, members: list[tuple[SessionPort, Advertised]], now: float) -> bool:
        """Read every member's bindings from the switch; True if any changed."""
        self.scans += 1
        aging = self.switch.aging
        macs: dict[SessionPort, set[bytes]] = {port: set() for port, _ in members}
        for mac, (owner, seen) in self.switch.mac_table.items():
            held = macs.get(owner)  # type: ignore[call-overload]
            if held is not None and (seen == PERMANENT or now - seen <= aging):
                held.add(mac)
        ipv4: dict[SessionPort, set[bytes]] = {port: set() for port, _ in members}
        ipv6: dict[SessionPort, set[bytes]] = {port: set() for port, _ in members}
        for ip, (owner, seen, leased) in self.switch.addresses.owners.items():
            if owner not in macs or not (leased or now - seen <= aging):
                continue
            (ipv4 if len(ip) == 4 else ipv6)[owner].add(ip)  # type: ignore[index]
        bindings = {port: (frozenset(macs[port]), frozenset(ipv4[port]), frozenset(ipv6[port]))
                    for port, _ in members}
        changed = bindings != self._bindings
        self._bindings = bindings
        return changed

    def _entries(self, members: list[tuple[SessionPort, Advertised]]
                 ) -> list[tuple[SessionPort, Advertised, bytes]]:
        """Each member's INTRO entry, encoded once (again only when it changed)."""
        entries = []
        for port, advertised in members:
            digest = self.fingerprint_of(port.name)
            macs, ipv4, ipv6 = self._bindings.get(port, (frozenset(),) * 3)
            if (len(macs) > MAX_INTRO_MACS or len(ipv4) > MAX_INTRO_IPS
                    or len(ipv6) > MAX_INTRO_IPS):
                self._left_out(port.name, f"{len(macs)} MACs, {len(ipv4)} IPv4 and "
                               f"{len(ipv6)} IPv6 addresses: past the INTRO limits")
                continue
            assert digest is not None  # _members checked it
            peer = DirectPeer(
                port.name, format_fingerprint(digest), advertised.addresses, macs,
                frozenset(ipaddress.IPv4Address(ip) for ip in ipv4),
                frozenset(ipaddress.IPv6Address(ip) for ip in ipv6))
            cached = self._encoded.get(port)
            if cached is None or cached[0] != peer:
                cached = self._encoded[port] = (peer, encode_intro_peer(peer))
            entries.append((port, advertised, cached[1]))
        return entries

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
        if name not in self._too_big_logged:
            self._too_big_logged.add(name)
            log.warning("%s: introductions: %s; those stay relayed through the hub", name, why)

    # -- status -----------------------------------------------------------------------------

    def status_of(self, port: SessionPort) -> dict[str, object] | None:
        """`direct` of one session in `vhostvpn status`, or None if it never advertised."""
        advertised = self.advertised.get(port)
        if advertised is None:
            return None
        sent = self.sent.get(port)
        mine = self._encoded.get(port)
        introduced_to = 0
        if mine is not None:
            introduced_to = sum(1 for other, s in self.sent.items()
                                if other is not port and mine[1] in s.entries)
        return {"advertised": [_text(a) for a in advertised.addresses],
                "sent": [_text(a) for a in advertised.sent],
                "listens": advertised.listens,
                "introduced": len(sent.entries) if sent is not None else 0,
                "introduced_to": introduced_to}

    def status(self) -> dict[str, object]:
        return {"enabled": self.enabled, "advertising": len(self.advertised),
                "intros": self.intros, "omitted": self.omitted, "scans": self.scans}


def _text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
