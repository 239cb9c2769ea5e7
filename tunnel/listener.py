"""The hub's tunnel listener: TLS connections from endpoints become sessions on the switch.

Who uses it: `vhostvpn hub --listen HOST:PORT --identity DIR --peers FILE` (tunnel/hub.py).

Path of a connection: accept -> admission (per-source token bucket, caps on concurrent
handshakes and on sessions; refused before any TLS work) -> TLS 1.3 handshake (bounded by
HANDSHAKE_SECONDS, like the rest of the handshake) -> HELLO both ways -> the endpoint's AUTH
is verified against the peers file (tunnel/keys.py) -> the connection becomes the active link
of the SessionPort named after the peer (created and attached to the switch the first time;
a reconnecting or rekeying endpoint takes its old port over; a live link taken over from
another address is logged as the same key in two places).  No frame is accepted before
AUTH is verified: the codec refuses FRAMES until `accept_auth()`.

The peers file is reread on SIGHUP (`reload()`); a peer removed from it is disconnected.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import trio

from netstack.frame import ALL_OFFLOADS, Frame
from netstack.policy import PortPolicy
from netstack.switch import Switch
from tunnel.keys import (
    AuthError,
    Identity,
    Peers,
    PeersFileError,
    format_fingerprint,
    server_ssl_context,
    verify_client_auth,
)
from tunnel.session import SESSION_MAC_LIMIT, Link, SessionPort, tune_tcp
from tunnel.tls import TLSStream
from tunnel.wire import Auth, CloseCode, Closed, Eof, Hello, WireConnection, WireError

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0
MAX_HANDSHAKES = 64  # concurrent, all sources together
MAX_SESSIONS = 1024
# Handshakes a source address may start: a token bucket.
HANDSHAKE_RATE = 5.0  # per second, sustained
HANDSHAKE_BURST = 20.0
MAX_TRACKED_SOURCES = 4096
HANDSHAKE_READ = 16 * 1024
# A key connected from two places: warn about it at most this often per peer.
TWO_PLACES_LOG_SECONDS = 60.0


class SourceLimiter:
    """A token bucket per source address (bounded: the least recently seen are forgotten)."""

    def __init__(self, rate: float = HANDSHAKE_RATE, burst: float = HANDSHAKE_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, source: str) -> bool:
        now = self.clock()
        tokens, seen = self.buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - seen) * self.rate)
        allowed = tokens >= 1.0
        self.buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        while len(self.buckets) > MAX_TRACKED_SOURCES:
            self.buckets.popitem(last=False)
        return allowed


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
        self.handshakes = 0
        self.refused: dict[str, int] = {}
        self.bound: list[tuple[str, int]] = []
        self._two_places_logged: dict[str, float] = {}  # peer name -> when last warned
        self._nursery: trio.Nursery | None = None

    # -- admission ---------------------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.bound = [lst.socket.getsockname()[:2] for lst in listeners]
        log.info("tunnel listening on %s, %d peers", ", ".join(
            f"{h}:{p}" for h, p in self.bound), len(self.peers))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                source = stream.socket.getpeername()[0]
                if not self.limiter.allow(source):
                    self._refuse("rate_limited")
                    log.warning("tunnel: %s: too many handshakes, refused", source)
                    await stream.aclose()
                    continue
                if self.handshakes >= MAX_HANDSHAKES:
                    self._refuse("too_many_handshakes")
                    log.warning("tunnel: %s: %d handshakes in progress, refused", source,
                                self.handshakes)
                    await stream.aclose()
                    continue
                if sum(1 for s in self.sessions.values() if s.active) >= MAX_SESSIONS:
                    self._refuse("too_many_sessions")
                    await stream.aclose()
                    continue
                self.handshakes += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._serve, stream, source)

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self, stream: trio.SocketStream, source: str) -> None:
        tune_tcp(stream.socket)
        tls = TLSStream(stream, self.ssl_context, server_side=True)
        link = None
        try:
            with trio.move_on_after(HANDSHAKE_SECONDS) as timeout:
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
        finally:
            self.handshakes -= 1
            if link is None:
                with trio.move_on_after(1) as cleanup:
                    cleanup.shield = True
                    await _close_quietly(tls)
        if link is None:
            return
        result = await link.run()
        log.info("%s: link from %s ended: %s", link.port.name, source, result.reason)

    async def _handshake(self, tls: TLSStream, source: str) -> Link | None:
        await tls.do_handshake()
        wire = WireConnection("server", name=self.name, offloads=int(ALL_OFFLOADS), mtu=self.mtu)
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

    def status(self) -> dict[str, object]:
        return {"listen": [f"{h}:{p}" for h, p in self.bound], "peers": len(self.peers),
                "handshakes": self.handshakes, "refused": dict(self.refused),
                "fingerprint": self.identity.fingerprint}


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    try:
        await stream.aclose()
    except Exception:  # a half-open TLS stream may fail to close cleanly; it is gone anyway
        pass
