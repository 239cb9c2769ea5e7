"""The hub's tunnel listener: TLS connections from endpoints become sessions on the switch.

Who uses it: `vhostvpn hub --listen HOST:PORT --identity DIR --peers FILE` (tunnel/hub.py).

Path of a connection: accept -> admission (per-source token bucket, caps on concurrent
handshakes per source and on sessions; refused before any TLS work; a source is an IPv4
address or an IPv6 /64; then a handshake slot, `HandshakeSlots`) -> the first bytes (a TLS
ClientHello) within FIRST_BYTES_SECONDS -> TLS 1.3 handshake (bounded by HANDSHAKE_SECONDS,
like the rest of the handshake) -> HELLO both ways -> the endpoint's AUTH is verified against
the peers file (tunnel/keys.py) -> the connection becomes the active link of the SessionPort
named after the peer (created and attached to the switch the first time; a reconnecting or
rekeying endpoint takes its old port over; a live link taken over from another address is
logged as the same key in two places).  No frame is accepted before AUTH is verified: the
codec refuses FRAMES until `accept_auth()`.

Handshake slots: at most MAX_HANDSHAKES handshakes run at once.  When all are taken, a new
connection is not refused: it takes the slot of the handshake that has waited longest, which
is closed (`evicted`).  So strangers that hold every slot with stalled handshakes (8 sources
under their per-source caps) no longer lock endpoints out; to keep an endpoint out they must
open MAX_HANDSHAKES new connections within the few round trips its handshake takes, each
source under its token bucket.  Handshakes from sources that authenticated lately (the
MAX_TRUSTED_SOURCES most recent, learnt only from a verified AUTH) are never evicted for
a source that did not: an endpoint reconnecting or rekeying from its usual address gets
through whatever number of sources the strangers have.  (The token buckets forget sources
beyond MAX_TRACKED_SOURCES; cycling more sources than that refills a stranger's bursts, which
only speeds up its churn of unauthenticated slots.)

The peers file is reread on SIGHUP (`reload()`); a peer removed from it is disconnected, and
is gone from the next INTRO every other endpoint gets (which closes their direct sessions
with it).

Direct paths (unless `direct=False`, `hub --no-direct`): each link's ADVERTISE goes to the
Introducer (tunnel/introducer.py), and the `run_introductions` task asks it every
INTRO_MIN_INTERVAL (while any endpoint advertised) for the INTROs due, which each Link sends
(tunnel/session.py Link.introduce).  A failure
there is the hub's bug, not a peer's: logged with its traceback (once per burst) and the
task goes on.

Containment: the accept loop never dies (a connection reset before we look at it is counted
`gone_before_admission`; accept() failing, e.g. out of file descriptors, is counted
`accept_emfile` etc., logged once per burst and waited out:
tunnel/control.accept_tunnel_connections).
Each accepted connection runs under one guard (`_serve`): whatever it raises, expected or
not, closes that connection only and is counted (`refused` for a handshake, `links_ended` by
kind for a session's link; `internal_error` for the unexpected, logged with its traceback
once).  The Link has its own guard inside (tunnel/session.py).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from netstack.frame import ALL_OFFLOADS, Frame
from netstack.policy import PortPolicy
from netstack.ratelimit import TokenBucket
from netstack.switch import Switch
from tunnel.control import accept_tunnel_connections
from tunnel.introducer import INTRO_MIN_INTERVAL, Introducer
from tunnel.keys import (
    AuthError,
    Identity,
    Peers,
    PeersFileError,
    format_fingerprint,
    server_ssl_context,
    verify_client_auth,
)
from tunnel.session import HANDSHAKE_READ, SESSION_MAC_LIMIT, Link, SessionPort, tune_tcp
from tunnel.startup import StartupError, explain_bind
from tunnel.tls import TLSStream
from tunnel.wire import (
    Advertise,
    Auth,
    CloseCode,
    Closed,
    Eof,
    Hello,
    Intro,
    WireConnection,
    WireError,
)

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0
# A connection that sends nothing (no ClientHello) is cut after this, long before the above.
FIRST_BYTES_SECONDS = 3.0
MAX_HANDSHAKES = 64  # concurrent, all sources together
# Concurrent handshakes from one source (an IPv4 address, an IPv6 /64): a few sources cannot
# take every slot.
MAX_HANDSHAKES_PER_SOURCE = 8
MAX_SESSIONS = 1024
# Handshakes a source address may start: a token bucket.
HANDSHAKE_RATE = 5.0  # per second, sustained
HANDSHAKE_BURST = 20.0
MAX_TRACKED_SOURCES = 4096
# Sources whose endpoints authenticated lately (least recently authenticated forgotten first):
# their handshakes are not evicted to make room for strangers'.
MAX_TRUSTED_SOURCES = 4096
# A key connected from two places: warn about it at most this often per peer.
TWO_PLACES_LOG_SECONDS = 60.0


def source_of(address: str) -> str:
    """What the per-source limits count: an IPv4 address (also when mapped into IPv6), or the
    /64 of an IPv6 address (one machine commonly holds a whole /64)."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SourceLimiter:
    """A token bucket per source address (bounded: the least recently seen are forgotten)."""

    def __init__(self, rate: float = HANDSHAKE_RATE, burst: float = HANDSHAKE_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, source: str) -> bool:
        now = self.clock()
        bucket = self.buckets.pop(source, None) or TokenBucket(self.rate, self.burst, now)
        self.buckets[source] = bucket  # the most recently seen last
        while len(self.buckets) > MAX_TRACKED_SOURCES:
            self.buckets.popitem(last=False)
        return bucket.take(now)


@dataclass(frozen=True)
class LastSeen:
    """A peer's last link ended at `when` (wall clock), from `address`, holding `ips`."""

    when: float
    address: str
    ips: list[str]


@dataclass(eq=False)
class Handshake:
    """One handshake in progress: its source, whether that source authenticated lately, and
    the scope its task runs the handshake in (cancelled when it is evicted)."""

    source: str
    trusted: bool
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class HandshakeSlots:
    """The handshakes in progress, at most `capacity` in all and `per_source` per source,
    oldest first; and the sources that authenticated lately (bounded, least recent dropped).
    When every slot is taken, a newcomer takes the slot of the oldest handshake from an
    untrusted source (or of the oldest of all, if the newcomer is trusted)."""

    def __init__(self, capacity: int = MAX_HANDSHAKES,
                 per_source: int = MAX_HANDSHAKES_PER_SOURCE,
                 trusted_limit: int = MAX_TRUSTED_SOURCES) -> None:
        self.capacity = capacity
        self.per_source = per_source
        self.trusted_limit = trusted_limit
        self.pending: dict[Handshake, None] = {}  # insertion order: oldest first
        self.by_source: dict[str, int] = {}
        self.trusted: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.pending)

    def admit(self, source: str) -> tuple[Handshake, Handshake | None] | str:
        """The new handshake and the one evicted for it (or None), or the reason for
        refusing it."""
        if self.by_source.get(source, 0) >= self.per_source:
            return "too_many_from_source"
        trusted = source in self.trusted
        evicted = None
        if len(self.pending) >= self.capacity:
            evicted = next((h for h in self.pending if not h.trusted), None)
            if evicted is None and trusted:
                evicted = next(iter(self.pending))
            if evicted is None:
                return "too_many_handshakes"
            self.release(evicted)
            evicted.cancel_scope.cancel()
        handshake = Handshake(source, trusted)
        self.pending[handshake] = None
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return handshake, evicted

    def release(self, handshake: Handshake) -> None:
        """The handshake is over (or evicted): its slot is free.  Idempotent."""
        if handshake not in self.pending:
            return
        del self.pending[handshake]
        left = self.by_source[handshake.source] - 1
        if left:
            self.by_source[handshake.source] = left
        else:
            del self.by_source[handshake.source]

    def trust(self, source: str) -> None:
        """An endpoint from `source` authenticated."""
        self.trusted.pop(source, None)
        self.trusted[source] = None
        while len(self.trusted) > self.trusted_limit:
            self.trusted.popitem(last=False)


class TunnelListener:
    def __init__(
        self,
        switch: Switch,
        identity: Identity,
        peers_path: Path,
        host: str | None,
        port: int,
        *,
        name: str = "hub",
        mtu: int = 1500,
        port_policy: bool = True,
        direct: bool = True,
    ) -> None:
        self.switch = switch
        self.identity = identity
        self.peers_path = peers_path
        self.peers = Peers.load(peers_path)
        self.host = host
        self.port = port
        self.name = name
        self.mtu = mtu
        self.port_policy = port_policy
        self.ssl_context = server_ssl_context(identity)
        self.fingerprint = identity.fingerprint_bytes
        self.sessions: dict[str, SessionPort] = {}
        self.limiter = SourceLimiter()
        self.slots = HandshakeSlots()
        self.refused: dict[str, int] = {}
        self.links_ended: dict[str, int] = {}  # by LinkResult.kind
        self.bound: list[tuple[str, int]] = []
        self._two_places_logged: dict[str, float] = {}  # peer name -> when last warned
        self.seen: dict[str, LastSeen] = {}  # peer name -> its last link's end
        self._nursery: trio.Nursery | None = None
        self.introducer = Introducer(switch, lambda name: self.peers.fingerprint_of(name),
                                     enabled=direct, clock=trio.current_time)
        self.introduce_errors = 0
        self._advertised = trio.Event()  # set by an ADVERTISE: wakes run_introductions

    # -- admission ---------------------------------------------------------------------------

    @property
    def handshakes(self) -> int:
        """Handshakes in progress."""
        return len(self.slots)

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            where = f"{self.host or ''}:{self.port}"
            raise StartupError(f"--listen {where}",
                               explain_bind(exc, self.host, self.port)) from None
        self.bound = [lst.socket.getsockname()[:2] for lst in listeners]
        log.info("tunnel listening on %s, %d peers", ", ".join(
            f"{h}:{p}" for h, p in self.bound), len(self.peers))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener)
            if self.introducer.enabled:
                nursery.start_soon(self.run_introductions)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        """Accept until cancelled; nothing a connecting party does ends this loop."""
        await accept_tunnel_connections(listener, self._admit, self._refuse, what="tunnel")

    def _admit(self, stream: trio.SocketStream) -> None:
        """Start serving an accepted TCP connection, or close it (counted)."""
        try:
            address = stream.socket.getpeername()[0]
            tune_tcp(stream.socket)
        except OSError:  # reset between the kernel's accept and ours
            self._refuse("gone_before_admission")
            stream.socket.close()
            return
        assert self._nursery is not None
        if not self.admit(stream, address, self._nursery):
            stream.socket.close()

    def admit(self, stream: trio.abc.Stream, address: str, nursery: trio.Nursery) -> bool:
        """Start serving `stream`, a connection from `address`, in `nursery`; False when a
        limit says no (counted; the caller closes it)."""
        source = source_of(address)
        if not self.limiter.allow(source):
            admitted: tuple[Handshake, Handshake | None] | str = "rate_limited"
        elif sum(1 for s in self.sessions.values() if s.active) >= MAX_SESSIONS:
            admitted = "too_many_sessions"
        else:
            admitted = self.slots.admit(source)
        if isinstance(admitted, str):
            if self.refused.get(admitted, 0) % 100 == 0:  # a flood logs every hundredth
                log.warning("tunnel: %s: refused (%s; %d handshakes in progress)", address,
                            admitted, self.handshakes)
            self._refuse(admitted)
            return False
        handshake, evicted = admitted
        if evicted is not None:  # its task sees its scope cancelled and closes it
            if self.refused.get("evicted", 0) % 100 == 0:  # a flood logs every hundredth
                log.warning("tunnel: handshake slots full: closing the handshake from %s "
                            "that waited longest, for one from %s", evicted.source, address)
            self._refuse("evicted")
        nursery.start_soon(self._serve, stream, address, handshake)
        return True

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self, stream: trio.abc.Stream, address: str,
                     handshake: Handshake) -> None:
        """One connection under its guard: any exception closes it, counted and logged; the
        handshake slot is given back exactly once, when the handshake is over (or at once,
        by `HandshakeSlots.admit`, when it is evicted: its scope is cancelled).  From here
        on `stream` is any trio Stream (the tests hand it memory streams)."""
        try:
            tls = TLSStream(stream, self.ssl_context, server_side=True)
            link = None
            try:
                with handshake.cancel_scope:
                    link = await self._handshake_phase(tls, address)
            finally:
                self.slots.release(handshake)
            if link is None:
                with trio.move_on_after(1) as cleanup:
                    cleanup.shield = True
                    await _close_quietly(tls)
            else:
                self.slots.trust(handshake.source)
                try:
                    result = await link.run()
                finally:
                    self.introducer.link_ended(link)
                self._last_seen(link.port, address)
                self.links_ended[result.kind] = self.links_ended.get(result.kind, 0) + 1
                log.info("%s: link from %s ended: %s", link.port.name, address, result.reason)
        except Exception as exc:
            self._refuse("internal_error")
            log.error("tunnel: %s: internal error, connection closed: %r", address, exc,
                      exc_info=exc)
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await _close_quietly(stream)

    async def _handshake_phase(self, tls: TLSStream, source: str) -> Link | None:
        """From accepted TCP to an authenticated Link, or None (refused and counted; the
        caller closes it)."""
        link = None
        try:
            with trio.move_on_after(HANDSHAKE_SECONDS) as timeout:
                with trio.move_on_after(FIRST_BYTES_SECONDS) as silent:
                    await tls.receive_first_bytes()
                if silent.cancelled_caught:
                    self._refuse("silent")
                    log.info("tunnel: %s: sent nothing for %.0f s", source, FIRST_BYTES_SECONDS)
                    return None
                link = await self._handshake(tls, source)
            if timeout.cancelled_caught:
                self._refuse("handshake_timeout")
                log.warning("tunnel: %s: handshake took longer than %.0f s", source,
                            HANDSHAKE_SECONDS)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._refuse("handshake_failed")
            log.info("tunnel: %s: handshake failed: %s", source, exc)
        except WireError as exc:
            self._refuse(f"protocol_{exc.reason}")
            log.warning("tunnel: %s: %s", source, exc)
        except AuthError as exc:
            self._refuse(f"auth_{exc.reason}")
            log.warning("tunnel: %s: refused: %s", source, exc)
        return link

    async def _handshake(self, tls: TLSStream, source: str) -> Link | None:
        await tls.do_handshake()
        wire = WireConnection("server", name=self.name, offloads=int(ALL_OFFLOADS), mtu=self.mtu,
                              introductions=True)
        await tls.send_all(wire.send_hello())
        hello: Hello | None = None
        while True:
            data = await tls.receive_some(HANDSHAKE_READ)
            wire.receive_data(data)
            for event in wire.next_events():
                if isinstance(event, Hello):
                    hello = event
                elif isinstance(event, Auth):
                    assert hello is not None  # the codec orders HELLO before AUTH
                    try:
                        name = verify_client_auth(self.peers, event.certificate,
                                                  event.signature, wire.challenge,
                                                  self.fingerprint, hello.name)
                    except AuthError as exc:
                        await tls.send_all(wire.send_close(CloseCode.AUTH_FAILED, exc.reason))
                        raise
                    wire.accept_auth()
                    # Bytes after AUTH (frames already) stay in the codec's buffer.
                    return self._attach(name, tls, wire, source)
                elif isinstance(event, Closed | Eof):
                    raise trio.BrokenResourceError(f"peer left during the handshake ({event})")
            if wire.failed:  # what came behind the events (FRAMES, ADVERTISE before AUTH)
                wire.next_events()  # raises the WireError now, not at the peer's next bytes

    def _attach(self, name: str, tls: TLSStream, wire: WireConnection,
                source: str) -> Link:
        port = self.sessions.get(name)
        if port is None:
            policy = PortPolicy(mac_limit=SESSION_MAC_LIMIT) if self.port_policy else None
            port = SessionPort(name, policy=policy)
            self.sessions[name] = port
            self.switch.attach(port)
        if port.active is not None and port.peer_address != source:
            self._two_places(port, source)
        port.peer_address = source
        link = Link(port, tls, wire, self._forward)
        link.on_introduction = self._on_introduction
        reconnect = port.connections > 0
        link.activate()
        digest = self.peers.fingerprint_of(name)
        claimed = wire.peer_hello.name if wire.peer_hello else ""
        log.info("%s: session %s from %s (key %s%s)", name, "resumed" if reconnect else "up",
                 source, format_fingerprint(digest) if digest else "?",
                 f", claimed name {claimed!r}" if claimed else ", no name claimed")
        return link

    def _two_places(self, port: SessionPort, source: str) -> None:
        """A peer's key connected from a second address while its link from the first is
        live: the same key on two machines, which would take the session from each other
        (a rekey or reconnect from the same address is normal and stays quiet).  Logged at
        most once per TWO_PLACES_LOG_SECONDS per peer."""
        now = time.monotonic()
        last = self._two_places_logged.get(port.name)
        if last is not None and now - last < TWO_PLACES_LOG_SECONDS:
            return
        self._two_places_logged[port.name] = now
        log.warning("%s: its key is connected from two places, %s (until now) and %s (taking "
                    "over): each machine needs its own key (vhostvpn keygen DIR, and a line "
                    "for it in the peers file)", port.name, port.peer_address, source)

    def _forward(self, port: SessionPort, frames: list[Frame]) -> None:
        self.switch.forward(port, frames)

    # -- direct paths: introductions ---------------------------------------------------------

    def _on_introduction(self, link: Link, event: Advertise | Intro) -> None:
        """An endpoint's ADVERTISE (its codec refuses INTRO: only a hub sends that)."""
        if isinstance(event, Advertise):
            self.introducer.advertise(link, event.addresses)
            if not self.introducer.enabled:
                # `--no-direct`: an empty INTRO, or the endpoint keeps the set an earlier
                # hub gave it (its bindings and the keys it admits) for good
                link.introduce([])
            self._advertised.set()

    async def run_introductions(self) -> None:
        """Hand each endpoint the INTRO due to it, every INTRO_MIN_INTERVAL while any
        endpoint advertised (idle otherwise)."""
        while True:
            if not self.introducer.advertised:
                self._advertised = trio.Event()
                await self._advertised.wait()
            await trio.sleep(INTRO_MIN_INTERVAL)
            try:
                for link, entries in self.introducer.tick():
                    link.introduce(entries)
            except Exception as exc:  # the hub's bug: logged, the next tick tries again
                if self.introduce_errors % 100 == 0:
                    log.error("tunnel: introductions: internal error: %r", exc, exc_info=exc)
                self.introduce_errors += 1

    # -- the peers file --------------------------------------------------------------------------

    def reload(self) -> None:
        """Reread the peers file; disconnect the peers no longer in it.  A bad file changes
        nothing (logged)."""
        try:
            peers = Peers.load(self.peers_path)
        except (PeersFileError, OSError) as exc:
            log.error("peers file %s not reloaded: %s", self.peers_path, exc)
            return
        removed = peers.removed_since(self.peers)
        changed = {name for name, fp in peers if self.peers.fingerprint_of(name) not in
                   (None, fp)}
        self.peers = peers
        self.introducer.peers_changed()
        self.seen = {name: seen for name, seen in self.seen.items() if name in peers.names}
        log.info("peers file reloaded: %d peers, %d removed", len(peers), len(removed))
        for name in removed | changed:
            port = self.sessions.get(name)
            if port is None:
                continue
            for link in list(port.links):
                link.abort("removed from the peers file" if name in removed
                           else "its key changed")
            log.info("%s: disconnected: %s", name,
                     "removed from the peers file" if name in removed else "its key changed")

    # -- who was here: `vhostvpn status` lists every peer of the peers file -------------------

    def _last_seen(self, port: SessionPort, address: str) -> None:
        """A link of `port` ended: remember when, from where, and the IP addresses the peer
        used on the segment (they age out of the switch; the record stays).  One record per
        name of the peers file (names come from it), so bounded by it."""
        ips = self._addresses_by_port().get(port, [])
        self.seen[port.name] = LastSeen(time.time(), address, ips)

    def _addresses_by_port(self) -> dict[object, list[str]]:
        """The IP addresses each port holds in the switch (leased or claimed), by port."""
        held: dict[object, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
        for ip, (owner, _, _) in self.switch.addresses.owners.items():
            held.setdefault(owner, []).append(ipaddress.ip_address(ip))
        return {owner: [str(ip) for ip in sorted(ips, key=lambda ip: (ip.version, ip))]
                for owner, ips in held.items()}

    def peer_status(self) -> list[dict[str, object]]:
        """Every peer of the peers file: online now, or when it was last seen (this hub's
        lifetime), from which address, with which IP addresses on the segment."""
        held = self._addresses_by_port()
        peers = []
        for name, digest in self.peers:
            port = self.sessions.get(name)
            online = port is not None and port.active is not None
            seen = self.seen.get(name)
            peers.append({
                "name": name, "fingerprint": format_fingerprint(digest), "online": online,
                "last_seen": None if online or seen is None else round(seen.when, 3),
                "from": port.peer_address if online else (seen.address if seen else None),
                "addresses": held.get(port, []) if online else (seen.ips if seen else []),
            })
        return peers

    def status(self) -> dict[str, object]:
        return {"listen": [f"{h}:{p}" for h, p in self.bound], "peers": len(self.peers),
                "handshakes": self.handshakes, "refused": dict(self.refused),
                "links_ended": dict(self.links_ended),
                "direct": self.introducer.status() | {"errors": self.introduce_errors},
                "fingerprint": self.identity.fingerprint, "peer_list": self.peer_status()}


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    try:
        await stream.aclose()
    except Exception:  # a half-open TLS stream may fail to close cleanly; it is gone anyway
        pass
