"""Direct paths, the endpoint's decisions without I/O: who dials whom, where a unicast frame
goes (a peer's direct session or the hub), what a direct peer may send us, and each peer's
life (dial, up, down, backoff, closed).  The Trio shell is tunnel/direct_link.py.

The hub introduces peers (INTRO, tunnel/introductions.py: the whole current set each time);
`DirectPeers.introduce` turns the set into one `DirectPort` per peer, keyed by its key's
fingerprint: peers gone from the set lose theirs at once, new and changed peers are read
into their filters INTRO_WORK_PER_STEP bindings at a time (`apply`, once per loop turn of the
shell), so a maximal INTRO (4 MiB, ~190 peers of 2,304 bindings) never holds the endpoint's
loop for more than one slice; until a changed peer's turn its old bindings hold.

Who dials: one side first (`dials`); when both listen, the other dials too once no session
came up for FALLBACK_DIAL_SECONDS (the first may not reach the second's address: a NAT, a
filter, an address the hub dropped, while the second reaches the first), and when both
sessions come up one is kept, the same on both sides (`supersedes`).  When: with at most
EAGER_DIAL_PEERS introduced peers, at once, and sessions are kept (a path ready before the
first frame); with more, on demand: a peer is dialled once a unicast frame for one of its
MACs went through the hub lately (`SteeringUplink.demand`), and a session that carried
nothing either way for DIRECT_IDLE_SECONDS is closed, so the sessions (each pinging
5 times a second, for fallback within a second) follow the traffic.

A direct port is a SessionPort the switch never sees: the endpoint's uplink is a
`SteeringUplink`, which hands each unicast frame whose destination MAC an introduced peer
holds to that peer's port while its session is up, and everything else (broadcast,
multicast, unknown unicast, frames for peers without a live session) to the hub.  So nothing
is ever flooded to a direct port, and when a session ends the next frame takes the hub
(fallback is immediate, frames queued on the dead session are lost and counted
`link_down`).  What a direct peer sends is policed by its `ReceiveFilter` with the bindings
the hub holds for it, then switched as if it came from the uplink: the switch learns remote
MACs on the uplink either way, so nothing flaps between paths.

Vouching: a peer accepts only sources the hub has seen from us (its INTRO), so a source (MAC
and IPv4/IPv6 source or ARP sender) goes direct only once it was sent through the hub: its
first frame takes the hub, which claims it and re-introduces us to our peers; from
VOUCH_DELAY_SECONDS later its frames go direct.  The hub forgets bindings it does not see
(MAC and claim aging, 300 s), so every VOUCH_REFRESH_SECONDS one frame of each source takes
the hub again.  Without this a host's first ARP reply, sent direct from an address the hub
never saw, would be dropped by the peer for good.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from netstack.frame import (
    ETH_HEADER_LEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IP,
    ETHERTYPE_IPV6,
    Frame,
    Offload,
)
from netstack.policy import DHCPV4_SERVER_PORT, IPPROTO_UDP, check_l3
from tunnel.introductions import DirectPeer
from tunnel.keys import Peers, parse_fingerprint
from tunnel.session import SessionPort
from tunnel.wire import IntroEntry

# Redial after a session ended or a dial failed: the first wait, doubling up to the cap, so a
# peer that comes back is direct again within about a second.
DIAL_BACKOFF = (0.1, 1.0)
# A session that lasted this long starts the backoff again from DIAL_BACKOFF[0] when it ends;
# a shorter one does not (a peer that accepts and closes at once is redialled at the cap,
# not ten times a second).
DIAL_STABLE_SECONDS = 2.0
# The side that waits to be dialled although the peer listens too (its fingerprint sorts
# higher) dials the peer itself once no session came up this long after the introduction or
# after a session the peer had dialled ended; its own failed dials then back off doubling up
# to FALLBACK_BACKOFF_MAX.  After a session it dialled itself ended (its direction is the
# one that works) it redials as the first side does (DIAL_BACKOFF).
FALLBACK_DIAL_SECONDS = 2.0
FALLBACK_BACKOFF_MAX = 8.0
# With at most this many introduced peers every one is dialled at once and its session kept;
# with more, a peer is dialled on demand (a unicast frame for it crossed the hub in the last
# DIRECT_IDLE_SECONDS) and a session idle (no frame either way) that long is closed.
EAGER_DIAL_PEERS = 16
DIRECT_IDLE_SECONDS = 60.0
# A direct session pings this often and is dead after this much silence (the hub's link
# waits 15 s; a direct session has the hub to fall back on, so it gives up fast).
DIRECT_KEEPALIVE_SECONDS = 0.2
DIRECT_DEAD_SECONDS = 1.0

# An address where another key answered (the pin failed) is not dialled again for this long,
# whatever the peer's INTROs do meanwhile: a peer may advertise any TLS server (the hub,
# whose per-source handshake budget each such dial spends, another endpoint's --listen).
WRONG_KEY_SECONDS = 60.0
MAX_WRONG_KEYS = 4096

# A source goes direct this long after its first frame through the hub (the hub claims it
# and re-introduces us within ~0.5 s), and one of its frames takes the hub this often (the
# hub ages what it does not see after 300 s).  At most MAX_VOUCHED sources are remembered.
VOUCH_DELAY_SECONDS = 0.75
VOUCH_REFRESH_SECONDS = 60.0
MAX_VOUCHED = 4096

# Receive-policy drop reasons (counted on the peer's direct port), beyond check_l3's.
NOT_UNICAST = "not_unicast"  # broadcast/multicast: those go through the hub
MAC_NOT_INTRODUCED = "mac_spoof"  # a source MAC the hub does not bind to this peer
NOT_LOCAL = "not_local"  # a destination that is not one of our local ports: no relaying
IP_NOT_INTRODUCED = "ip_spoof"  # a source address the hub does not bind to this peer

# Bindings (MACs, addresses) read into peers' filters per step of `DirectPeers.apply` (about
# 1 us each); a peer is read whole, and one holds at most 2,304 (introductions.py limits).
INTRO_WORK_PER_STEP = 4096

# An introduced peer as received (wire.IntroEntry) or given (DirectPeer): both have name,
# fingerprint, addresses, size, bindings().
Introduced = DirectPeer | IntroEntry


def dials(own: bytes, own_listens: bool, peer: bytes, peer_listens: bool) -> bool | None:
    """Does this endpoint dial the peer (True), wait for the peer to dial (False), or is
    there no direct path because neither listens (None)?  If only one listens the other
    dials; if both do, the one whose fingerprint digest sorts lower."""
    if not own_listens and not peer_listens:
        return None
    if own_listens != peer_listens:
        return peer_listens
    return own < peer


def supersedes(own: bytes, peer: bytes, new_ours: bool, active_ours: bool) -> bool:
    """A second session of one pair came up while one is active: does the new one take over
    (True), or is it closed (False)?  `*_ours`: we dialled it.  Of one direction the newer
    always (a rekey, a redial while the old session's death went unnoticed); of the two
    directions (both sides dialled at once) the one dialled by the side whose fingerprint
    digest sorts lower.  Both sides decide alike, so exactly one session is left."""
    if new_ours == active_ours:
        return True
    return own < peer if new_ours else peer < own


class PeerLife:
    """One introduced peer's direct session over time.

    backoff -> dialing -> up -> backoff ... for the side that dials first (`role` True);
    waiting -> up -> waiting for the side that only accepts (`role` False); the same as the
    first side's for one that accepts first and dials as a fallback (`fallback`: both
    listen), but its first dial comes FALLBACK_DIAL_SECONDS after the introduction or after
    a session the peer dialled ended; relayed when neither listens; closed when the hub stops
    introducing it.  `delay` doubles on every failed dial and every short session up to the
    cap (DIAL_BACKOFF[1], FALLBACK_BACKOFF_MAX), and starts again from DIAL_BACKOFF[0] after
    a session that lasted DIAL_STABLE_SECONDS."""

    def __init__(self, role: bool | None, now: float, *, fallback: bool = False) -> None:
        self.role = role  # True: we dial; False: we accept; None: relayed only
        self.fallback = fallback and role is False  # we also dial when the peer's dials fail
        self.dials = role is True or self.fallback
        self.state = "relayed" if role is None else ("backoff" if self.dials else "waiting")
        self.delay = FALLBACK_DIAL_SECONDS if self.fallback else DIAL_BACKOFF[0]
        self.next_dial = now + FALLBACK_DIAL_SECONDS if self.fallback else now
        self.ours = False  # the session up (or the last one) is one we dialled
        self.on_demand = False  # dial only while wanted (more than EAGER_DIAL_PEERS peers)
        self.wanted = float("-inf")  # when a frame for the peer last crossed the hub
        self.ups = 0  # sessions that came up
        self.up_at = now  # when the last one did
        self.failures = 0  # dials that failed and sessions that ended
        self.last_error: str | None = None

    def due(self, now: float) -> bool:
        """Time to dial: we dial, idle, the backoff has run out, and (on demand) frames
        for the peer crossed the hub lately."""
        return (self.dials and self.state == "backoff" and now >= self.next_dial
                and (not self.on_demand or now - self.wanted < DIRECT_IDLE_SECONDS))

    def dialing(self) -> None:
        self.state = "dialing"

    def up(self, now: float, *, ours: bool) -> None:
        """A session came up (`ours`: we dialled it); the backoff starts again once it has
        lasted DIAL_STABLE_SECONDS (`down`)."""
        self.state = "up"
        self.ours = ours
        self.ups += 1
        self.up_at = now
        self.last_error = None

    def failed(self, now: float, reason: str) -> None:
        """A dial of ours failed: wait, then dial again.  If a session came up meanwhile
        (the peer dialled us) it is only counted."""
        self.failures += 1
        self.last_error = reason
        if self.state != "dialing":
            return
        self.state = "backoff"
        self.next_dial = now + self.delay
        self.delay = min(self.delay * 2,
                         FALLBACK_BACKOFF_MAX if self.fallback else DIAL_BACKOFF[1])

    def down(self, now: float, reason: str) -> None:
        """The session ended: dial again after the backoff (if we dial).  Nothing if it was
        not up (closed for idleness: `idle`; no longer introduced)."""
        if self.state != "up":
            return
        self.failures += 1
        self.last_error = reason
        if now - self.up_at >= DIAL_STABLE_SECONDS:
            self.delay = DIAL_BACKOFF[0]
        if not self.dials:
            self.state = "relayed" if self.role is None else "waiting"
            return
        self.state = "backoff"
        if self.fallback and not self.ours:  # the peer dialled it: its turn first
            self.delay = FALLBACK_DIAL_SECONDS
            self.next_dial = now + FALLBACK_DIAL_SECONDS
            return
        self.next_dial = now + self.delay
        self.delay = min(self.delay * 2,
                         FALLBACK_BACKOFF_MAX if self.fallback else DIAL_BACKOFF[1])

    def idle(self, now: float) -> None:
        """We close the session for idleness (on demand): no failure; the next demand dials
        at once (the fallback side after FALLBACK_DIAL_SECONDS, the first side first)."""
        if self.state != "up":
            return
        self.state = "backoff" if self.dials else ("relayed" if self.role is None
                                                   else "waiting")
        self.delay = FALLBACK_DIAL_SECONDS if self.fallback else DIAL_BACKOFF[0]
        self.next_dial = now + FALLBACK_DIAL_SECONDS if self.fallback else now

    def close(self) -> None:
        self.state = "closed"

    def describe(self) -> str:
        text = ("accepts, dials if not dialled" if self.fallback else
                {True: "dials", False: "accepts", None: "neither listens"}[self.role])
        return f"{text} on demand" if self.on_demand and self.dials else text


class IntroducedAddresses:
    """What check_l3 asks of an AddressBook (`claim`, `owned_elsewhere`), for one direct
    peer's filter: the introduced addresses are the peer's, for good, and no other address
    may be claimed, as with a book holding only them and a claim limit of 0 (built at C
    speed: a book's `bind` per address took ~1.5 ms per peer at the INTRO limits)."""

    __slots__ = ("ips",)

    def __init__(self, ips: frozenset[bytes]) -> None:
        self.ips = ips

    def claim(self, ip: bytes, port: object, now: float, limit: int) -> str | None:
        return None if ip in self.ips else "claim_limit"

    def owned_elsewhere(self, ip: bytes, port: object, now: float) -> bool:
        return False  # only this peer sends here; the hub polices the others


class ReceiveFilter:
    """What a direct peer may send us, from the bindings the hub holds for it: a unicast
    frame from one of its MACs, to one of our local ports (`is_local`: never through us to
    anyone else), whose network-layer source (IPv4/IPv6 source, ARP sender, an NA's target)
    is one of its addresses, past the hub's own network-layer checks (netstack.policy
    check_l3: ARP/ND link-layer addresses, DHCP and RA guards, stacked VLANs, LLC)."""

    def __init__(self, peer: Introduced, is_local: Callable[[bytes], bool]) -> None:
        self.macs, self.ipv4, ipv6 = peer.bindings()
        self.is_local = is_local
        self.book = IntroducedAddresses(self.ipv4 | ipv6)

    def admit(self, frames: list[Frame], port: SessionPort, now: float) -> list[Frame]:
        """The frames of `frames` the peer may send; the others counted on `port` by
        reason.  Also counts what came in on `port`."""
        counters = port.counters
        counters.in_frames += len(frames)
        macs, ipv4, is_local = self.macs, self.ipv4, self.is_local
        admitted = []
        for frame in frames:
            data = frame.data
            counters.in_bytes += len(data)
            if len(data) < ETH_HEADER_LEN:
                counters.drop("runt")
                continue
            if data[0] & 1:
                counters.drop(NOT_UNICAST)
                continue
            if data[6:12] not in macs:
                counters.drop(MAC_NOT_INTRODUCED)
                continue
            if not is_local(data[0:6]):
                counters.drop(NOT_LOCAL)
                continue
            # Fast path: plain IPv4 from an introduced address, not a DHCP server's.
            if not (len(data) >= 38 and data[12:14] == ETHERTYPE_IP and data[14] == 0x45
                    and data[26:30] in ipv4
                    and not (data[23] == IPPROTO_UDP and data[34:36] == DHCPV4_SERVER_PORT)):
                reason = check_l3(data, self, self.book, now, 0)  # type: ignore[arg-type]
                if reason is not None:
                    counters.drop(IP_NOT_INTRODUCED if reason == "claim_limit" else reason)
                    continue
            admitted.append(frame)
        return admitted


class DirectPort(SessionPort):
    """An introduced peer as a port of the endpoint (not attached to its switch): its direct
    session's links, its life, and the filter on what it sends."""

    def __init__(self, peer: Introduced, digest: bytes, life: PeerLife,
                 is_local: Callable[[bytes], bool]) -> None:
        super().__init__(f"direct:{peer.name}", policy=None)
        self.peer = peer
        self.digest = digest
        self.life = life
        self.filter = ReceiveFilter(peer, is_local)
        self.wanted = False  # a frame for it crossed the hub (set by SteeringUplink)
        self._seen: tuple = ()  # (active link, frames moved) when last sampled ...
        self._busy_at = 0.0  # ... and when that changed

    def idle_for(self, now: float) -> float:
        """How long its session has carried no frame either way (sampled: a new session or
        any frame since the last call starts the count again)."""
        seen = (self.active, self.counters.in_frames + self.counters.out_frames)
        if seen != self._seen:
            self._seen, self._busy_at = seen, now
        return now - self._busy_at

    def reintroduce(self, peer: Introduced, is_local: Callable[[bytes], bool]) -> None:
        """The hub sent new bindings or addresses for the same key."""
        self.peer = peer
        self.name = f"direct:{peer.name}"
        self.filter = ReceiveFilter(peer, is_local)

    def direct_status(self) -> dict[str, object]:
        life = self.life
        counters = self.counters
        return {
            "name": self.peer.name, "fingerprint": self.peer.fingerprint,
            "path": "direct" if self.active is not None else "relayed",
            "dialled_by": None if self.active is None else (
                "us" if self.active.wire.role == "client" else "peer"),
            "state": life.state,
            "role": life.describe(),
            "address": self.peer_address,
            "advertised": [f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                           for h, p in self.peer.addresses],
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "in_frames": counters.in_frames, "in_bytes": counters.in_bytes,
            "out_frames": counters.out_frames, "out_bytes": counters.out_bytes,
            "drops": dict(counters.drops), "sessions": life.ups, "failures": life.failures,
            "last_error": life.last_error,
        }


def source_of(data: bytes | memoryview) -> tuple:
    """What a peer checks a frame's source by: its MAC, and its IPv4/IPv6 source or ARP
    sender address (slices: they hash like bytes)."""
    ethertype = data[12:14]
    if ethertype == ETHERTYPE_IP:
        return data[6:12], data[26:30]
    if ethertype == ETHERTYPE_IPV6:
        return data[6:12], data[22:38]
    if ethertype == ETHERTYPE_ARP:
        return data[6:12], data[28:32]
    return data[6:12], b""


class SteeringUplink(SessionPort):
    """The endpoint's port to the hub, which also steers: a unicast frame to a MAC in
    `routes` goes to that peer's direct port while its session is up and its source is
    vouched for (see the module's docstring); everything else, and every frame when
    `routes` is empty, to the hub.  A frame to a MAC in `demand` (peers dialled on demand)
    that takes the hub marks its peer `wanted`."""

    def __init__(self, name: str = "hub", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name, policy=None)
        self.routes: dict[bytes, DirectPort] = {}
        self.demand: dict[bytes, DirectPort] = {}  # MAC -> its peer, when dialled on demand
        self.clock = clock
        # source (source_of) -> when its frames may go direct from; refreshed through the
        # hub VOUCH_REFRESH_SECONDS after that
        self.vouched: dict[tuple, float] = {}

    def _vouched(self, data: bytes | memoryview, now: float) -> bool:
        """May this frame's source go direct now?  If not, it takes the hub (and counts)."""
        key = source_of(data)
        since = self.vouched.get(key)
        if since is not None and now >= since:
            if now - since < VOUCH_REFRESH_SECONDS:
                return True
            self.vouched[key] = now  # refreshed by this frame: direct again at once
            return False
        if since is None:
            if len(self.vouched) >= MAX_VOUCHED:
                self.vouched.clear()
            self.vouched[(bytes(key[0]), bytes(key[1]))] = now + VOUCH_DELAY_SECONDS
        return False

    def deliver(self, frames: list[Frame]) -> None:
        routes, demand = self.routes, self.demand
        if not routes and not demand:
            SessionPort.deliver(self, frames)  # (not super(): a lookup fewer per visit)
            return
        relayed: list[Frame] = []
        direct: dict[DirectPort, list[Frame]] = {}
        now = self.clock()
        for frame in frames:
            destination = frame.data[0:6]
            port = routes.get(destination)
            if port is None or not self._vouched(frame.data, now):
                relayed.append(frame)
                if demand:
                    wanted = demand.get(destination)
                    if wanted is not None:
                        wanted.wanted = True
                continue
            batch = direct.get(port)
            if batch is None:
                direct[port] = [frame]
            else:
                batch.append(frame)
        for port, batch in direct.items():
            if port.active is None:  # its session just ended: the hub, at once
                relayed.extend(batch)
            else:
                port.deliver(batch)
        if relayed:
            super().deliver(relayed)


@dataclass
class IntroChange:
    added: list[DirectPort]
    removed: list[DirectPort]


class DirectPeers:
    """The latest introductions as direct ports, and the uplink's routes to them."""

    def __init__(self, fingerprint: bytes, listens: bool, uplink: SteeringUplink,
                 is_local: Callable[[bytes], bool]) -> None:
        self.fingerprint = fingerprint
        self.listens = listens
        self.uplink = uplink
        self.is_local = is_local
        self.ports: dict[bytes, DirectPort] = {}  # by the peer's fingerprint digest
        self.intros = 0  # INTRO records taken
        # introduced peers not read into a port yet (`apply`), and the last step's work
        self.pending: dict[bytes, Introduced] = {}
        self.step_work = 0
        self.on_demand = False  # more than EAGER_DIAL_PEERS introduced: dial on demand
        self._routed: tuple = ()  # what the routes were last built from (update_routes)
        # (digest, address) -> until when not to dial it: another key answered there; for
        # introduced digests, at most MAX_WRONG_KEYS (also while a peer's addresses churn)
        self.wrong_key: dict[tuple[bytes, tuple[str, int]], float] = {}

    def introduce(self, peers: Iterable[Introduced], now: float) -> IntroChange:
        """The hub's whole current set: peers missing from it lose their ports now (the
        shell closes their sessions now); new peers, and peers whose entry changed, wait in
        `pending` for `apply`, whose first step runs here (a small set is applied whole)."""
        self.intros += 1
        fresh: dict[bytes, Introduced] = {}
        for peer in peers:
            digest = parse_fingerprint(peer.fingerprint)
            if digest != self.fingerprint:  # never ourselves
                fresh[digest] = peer
        wrong_key = [(key, until) for key, until in self.wrong_key.items()
                     if key[0] in fresh and until > now]
        self.wrong_key = dict(wrong_key[-MAX_WRONG_KEYS:])  # the latest, if too many
        removed = [port for digest, port in self.ports.items() if digest not in fresh]
        for port in removed:
            port.life.close()
            self._unindex(port)
            self._unroute(port)
            del self.ports[port.digest]
        on_demand = len(fresh) > EAGER_DIAL_PEERS
        if on_demand != self.on_demand:  # all of them at once, both ways
            self.on_demand = on_demand
            self.uplink.demand = {}
            for port in self.ports.values():
                port.life.on_demand = on_demand
                self._index(port)
        self.pending = {}
        for digest, peer in fresh.items():
            port = self.ports.get(digest)
            if port is None or peer != port.peer:
                self.pending[digest] = peer
        change = self.apply(now)
        change.removed[:0] = removed
        return change

    def apply(self, now: float) -> IntroChange:
        """One step of reading `pending` peers into ports: whole peers, as many as
        INTRO_WORK_PER_STEP bindings hold (one at least); `step_work` says how many."""
        added: list[DirectPort] = []
        removed: list[DirectPort] = []
        budget = INTRO_WORK_PER_STEP
        pending = self.pending
        self.step_work = 0
        while pending:
            digest, peer = next(iter(pending.items()))
            cost = peer.size + 1
            if cost > budget and self.step_work:
                break
            del pending[digest]
            budget -= cost
            self.step_work += cost
            port = self.ports.get(digest)
            role = dials(self.fingerprint, self.listens, digest, bool(peer.addresses))
            fallback = role is False and self.listens and bool(peer.addresses)
            if port is not None and (port.life.role, port.life.fallback) == (role, fallback):
                self._unindex(port)
                self._unroute(port)
                port.reintroduce(peer, self.is_local)
                self._index(port)
                self._route(port)
                continue
            life = PeerLife(role, now, fallback=fallback)
            life.on_demand = self.on_demand
            if port is not None:  # it started or stopped listening: a new life
                port.life.close()
                self._unindex(port)
                self._unroute(port)
                removed.append(port)
                # ... with the old one's backoff: flipping must not make us dial at once
                life.delay = max(life.delay, port.life.delay)
                life.next_dial = max(life.next_dial, port.life.next_dial)
            port = DirectPort(peer, digest, life, self.is_local)
            self.ports[digest] = port
            self._index(port)
            added.append(port)
        return IntroChange(added, removed)

    def _index(self, port: DirectPort) -> None:
        """`port`'s MACs in the uplink's `demand` (on demand only)."""
        if self.on_demand:
            demand = self.uplink.demand
            for mac in port.filter.macs:
                demand[mac] = port

    def _unindex(self, port: DirectPort) -> None:
        demand = self.uplink.demand
        if demand:
            for mac in port.filter.macs:
                if demand.get(mac) is port:
                    del demand[mac]

    def sample_demand(self, now: float) -> None:
        """Peers whose frames crossed the hub since the last call are wanted as of `now`
        (the uplink only flags them: it runs on another clock, per batch)."""
        if self.on_demand:
            for port in self.ports.values():
                if port.wanted:
                    port.wanted = False
                    port.life.wanted = now

    def idle(self, now: float) -> list[DirectPort]:
        """On demand: the peers whose session carried nothing for DIRECT_IDLE_SECONDS."""
        if not self.on_demand:
            return []
        return [port for port in self.ports.values()
                if port.active is not None and port.idle_for(now) >= DIRECT_IDLE_SECONDS]

    def _routable(self, port: DirectPort) -> bool:
        return port.active is not None and (self.uplink.accepts & ~port.accepts) == Offload.NONE

    def _route(self, port: DirectPort) -> None:
        """`port`'s (new) MACs in the routes, if its session is up: O(its MACs).  They are
        its from now on: a MAC the hub moved here from a peer not read again yet stays ours
        when that peer's turn comes (`_unroute` drops only its own)."""
        if self._routable(port):
            routes = self.uplink.routes
            for mac in port.filter.macs:
                routes[mac] = port

    def _unroute(self, port: DirectPort) -> None:
        routes = self.uplink.routes
        if routes:
            for mac in port.filter.macs:
                if routes.get(mac) is port:
                    del routes[mac]

    def update_routes(self) -> None:
        """The uplink's routes: every MAC of every peer whose session is up (and whose
        session takes every offload the hub's does, so steering never needs the switch's
        software offloads); called whenever a session changes, and by the shell's every
        turn.  Rebuilt (O(MACs), 65,536 at 256 peers) only when the sessions routed changed
        (O(peers) to see); a peer's new bindings are rerouted alone (`apply`)."""
        routed = tuple(port for port in self.ports.values() if self._routable(port))
        signature = (self.uplink.accepts, routed, tuple(port.active for port in routed))
        if signature == self._routed:
            return
        self._routed = signature
        routes: dict[bytes, DirectPort] = {}
        pending = self.pending
        # peers read from the newest INTRO first: a MAC the hub moved away from a peer still
        # pending is the new holder's (that peer's turn drops only what is its own)
        for port in sorted(routed, key=lambda port: port.digest in pending):
            for mac in port.filter.macs:
                routes.setdefault(mac, port)
        self.uplink.routes = routes

    def dialable(self, port: DirectPort, now: float) -> list[tuple[str, int]]:
        """`port`'s introduced addresses but those where another key answered lately."""
        return [address for address in port.peer.addresses
                if self.wrong_key.get((port.digest, address), now) <= now]

    def answered_by_another_key(self, port: DirectPort, address: tuple[str, int],
                                now: float) -> None:
        self.wrong_key[(port.digest, address)] = now + WRONG_KEY_SECONDS

    def authorised(self) -> Peers:
        """Who may dial us: the currently introduced peers, by their names in the newest
        INTRO (a port still pending a rename holds an older one, maybe another key's now)."""
        pending = self.pending
        return Peers((pending.get(digest, port.peer).name, digest)
                     for digest, port in self.ports.items())

    def port_of(self, digest: bytes) -> DirectPort | None:
        return self.ports.get(digest)

    def due(self, now: float) -> list[DirectPort]:
        return [port for port in self.ports.values() if port.life.due(now)]

    def next_due(self, now: float) -> float | None:
        """When the next dial falls due, if one will (of the peers wanted now)."""
        times = [port.life.next_dial for port in self.ports.values()
                 if port.life.dials and port.life.state == "backoff"
                 and (not port.life.on_demand
                      or now - port.life.wanted < DIRECT_IDLE_SECONDS)]
        return min(times, default=None)

    def status(self) -> list[dict[str, object]]:
        """Each port's, named as in the newest INTRO (see `authorised`)."""
        pending = self.pending
        return [{**port.direct_status(), "name": pending.get(digest, port.peer).name}
                for digest, port in self.ports.items()]

