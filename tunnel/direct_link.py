"""Direct paths, the endpoint's Trio shell: the listener for direct sessions (`--listen`), the
dialer, and the supervisor that dials the peers due (tunnel/direct.py decides who and when).

A direct session is the hub protocol between two endpoints (HELLO, AUTH, FRAMES, PING/PONG,
CLOSE; never INTRO or ADVERTISE) over TLS 1.3:
* the dialer connects to the peer's introduced addresses in turn, checks the peer's
  certificate against the introduced fingerprint (keys.check_server) before it sends a
  byte, signs the listener's challenge and fingerprint (as an endpoint does to the hub),
  and sends a PING behind its AUTH: the listener's codec holds it until AUTH is accepted,
  so its PONG is the "yes", a CLOSE AUTH_FAILED the "no";
* the listener presents the endpoint's own identity and verifies AUTH against the peers
  it is introduced to NOW (anyone else: CLOSE AUTH_FAILED, counted `auth_unknown_key`),
  behind the hub listener's admission guards (tunnel/listener.py: a token bucket per source,
  caps on concurrent handshakes, per source and in all, eviction of the oldest untrusted
  one, FIRST_BYTES_SECONDS for the first bytes and HANDSHAKE_SECONDS for the rest, and
  MAX_DIRECT_SESSIONS; MAX_PEER_SESSIONS of one peer, the oldest aborted past that).
Both sides may dial (tunnel/direct.py: the fallback dialer); when a session comes up while
another of the same peer is active, `supersedes` decides which one stays, on the dialer's
side before it is used and on the listener's before AUTH is accepted (the loser is closed,
counted `duplicate`).  Each session is a Link (tunnel/session.py) on the peer's DirectPort,
which pings every DIRECT_KEEPALIVE_SECONDS and is dead after DIRECT_DEAD_SECONDS of silence;
what it receives goes through the peer's ReceiveFilter, then into the switch as if from the
uplink.  When a session ends the uplink's routes lose the peer at once (frames take the hub)
and the dialer redials with backoff (DIAL_BACKOFF, capped at 1 s).  Rekeying is the hub
link's, make before break: when `rekey_due` says a session's key is old or has protected
nearly its limit of records, the side that dialled it makes a new session, which supersedes
the old one on both sides (a failed try keeps the old one and is tried again after
REKEY_RETRY_SECONDS).

Containment: every connection, dialled or accepted, runs under its own guard; whatever it
raises closes it only (counted in `refused` or the peer's `last_error`, unexpected ones
logged with their traceback once).  The accept loop never ends on a party's input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from netstack.frame import ALL_OFFLOADS, Frame
from tunnel.control import accept_tunnel_connections
from tunnel.direct import (
    DIRECT_DEAD_SECONDS,
    DIRECT_IDLE_SECONDS,
    DIRECT_KEEPALIVE_SECONDS,
    WRONG_KEY_SECONDS,
    DirectPeers,
    DirectPort,
    IntroChange,
    Introduced,
    supersedes,
)
from tunnel.keys import (
    AuthError,
    Identity,
    check_server,
    client_ssl_context,
    server_ssl_context,
    sign_client_auth,
    verify_client_auth,
)
from tunnel.listener import (
    FIRST_BYTES_SECONDS,
    HANDSHAKE_SECONDS,
    HandshakeSlots,
    SourceLimiter,
    source_of,
)
from tunnel.session import HANDSHAKE_READ, Link, SessionPort, await_hello, tune_tcp
from tunnel.startup import StartupError, explain_bind
from tunnel.tls import MAX_SOCKET_READ, TLSStream
from tunnel.wire import (
    Auth,
    CloseCode,
    Closed,
    Eof,
    Frames,
    Hello,
    Ping,
    Pong,
    WireConnection,
    WireError,
)

log = logging.getLogger(__name__)

# A dial (TCP, TLS, HELLO, AUTH and its verdict) to one address gets this long.
DIAL_SECONDS = 2.0
# Direct sessions at once: one per introduced peer at most (MAX_INTRO_PEERS).
MAX_DIRECT_SESSIONS = 256
# Sessions of one peer at once: the active one, the one it superseded (draining until the
# peer closes it, DRAIN_SECONDS) and one crossing it; a newer one aborts the oldest past that.
MAX_PEER_SESSIONS = 3
# Concurrent handshakes on --listen, in all and per source.
MAX_DIRECT_HANDSHAKES = 32
MAX_DIRECT_HANDSHAKES_PER_SOURCE = 4
# The nonce of the PING behind AUTH: its PONG is the listener's "yes".
VERDICT_NONCE = 0xD1_EC_70
# How often the supervisor looks at least (dials fall due, routes follow the uplink).
SUPERVISE_SECONDS = 0.25
# A rekey that failed is tried again after this long (the old session carries on).
REKEY_RETRY_SECONDS = 30.0


class DialError(Exception):
    pass


class DirectLinks:
    """The direct sessions of one endpoint: accepted on `listen` (if given) and dialled."""

    def __init__(self, identity: Identity, peers: DirectPeers,
                 forward: Callable[[list[Frame]], None], *,
                 listen: tuple[str | None, int] | None, mtu: int,
                 rekey_due: Callable[[Link], bool] = lambda link: False) -> None:
        """`rekey_due(link)`: time for a fresh session in place of `link`'s (the endpoint
        passes tunnel/endpoint.py rekey_due with its --rekey-seconds)."""
        self.identity = identity
        self.rekey_due = rekey_due
        self._rekeys: dict[DirectPort, float] = {}  # port -> when its rekey may start
        self.peers = peers
        self.forward = forward  # into the switch, as from the uplink
        self.listen = listen
        self.mtu = mtu
        self.server_context = server_ssl_context(identity)
        self.client_context = client_ssl_context()
        self.bound: list[tuple[str, int]] = []
        self.limiter = SourceLimiter()
        self.slots = HandshakeSlots(MAX_DIRECT_HANDSHAKES, MAX_DIRECT_HANDSHAKES_PER_SOURCE)
        self.refused: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()

    # -- introductions ---------------------------------------------------------------------

    def introduce(self, peers: tuple[Introduced, ...]) -> None:
        """The hub's latest set: sessions of peers gone from it are closed now; new and
        changed peers are read a slice per loop turn (DirectPeers.apply: the first slice
        now, the rest in `_supervise`)."""
        self._changed(self.peers.introduce(peers, trio.current_time()))

    def _changed(self, change: IntroChange) -> None:
        for port in change.removed:
            self._rekeys.pop(port, None)
            for link in list(port.links):
                link.abort("no longer introduced by the hub")
            log.info("%s: no longer introduced: direct session closed", port.name)
        for port in change.added:
            log.info("%s: introduced (%s, key %s)", port.name, port.life.describe(),
                     port.peer.fingerprint)
        self._wake.set()

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners: list[trio.SocketListener] = []
        if self.listen is not None:
            host, port = self.listen
            try:
                listeners = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise StartupError(f"--listen {host or ''}:{port}",
                                   explain_bind(exc, host, port)) from None
            self.bound = [lst.socket.getsockname()[:2] for lst in listeners]
            log.info("direct sessions: listening on %s",
                     ", ".join(f"{h}:{p}" for h, p in self.bound))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener)
            nursery.start_soon(self._supervise)
            task_status.started()

    async def _supervise(self) -> None:
        """Dial the peers whose turn it is; keep the uplink's routes current; read what is
        left of the latest introductions, a slice per loop turn."""
        while True:
            now = trio.current_time()
            assert self._nursery is not None
            if self.peers.pending:
                self._changed(self.peers.apply(now))
            self.peers.sample_demand(now)
            for port in self.peers.idle(now):  # on demand: a session nothing crossed lately
                port.life.idle(now)
                for link in list(port.links):
                    link.abort(f"idle for {DIRECT_IDLE_SECONDS:.0f} s")
                log.info("%s: direct session closed: idle for %.0f s", port.name,
                         DIRECT_IDLE_SECONDS)
            for port in self.peers.due(now):
                port.life.dialing()
                self._nursery.start_soon(self._dial_guarded, port)
            for port in self.peers.ports.values():
                link = port.active
                if (link is not None and link.wire.role == "client"  # we dialled it
                        and now >= self._rekeys.get(port, now) and self.rekey_due(link)):
                    self._rekeys[port] = float("inf")  # one rekey at a time
                    self._nursery.start_soon(self._rekey, port)
            self.peers.update_routes()
            wake_at = now + SUPERVISE_SECONDS
            due = self.peers.next_due(now)
            if due is not None:
                wake_at = min(wake_at, due)
            if self.peers.pending:  # the rest next turn: the loop's other tasks run first
                await trio.sleep(0)
                continue
            self._wake = trio.Event()
            with trio.move_on_at(wake_at):
                await self._wake.wait()

    def _session_ended(self, port: DirectPort, reason: str) -> None:
        port.life.down(trio.current_time(), reason)
        self.peers.update_routes()
        self._wake.set()

    def _dial_failed(self, port: DirectPort, reason: str) -> None:
        port.life.failed(trio.current_time(), reason)
        self._wake.set()

    # -- dialling -------------------------------------------------------------------------

    async def _dial_guarded(self, port: DirectPort) -> None:
        try:
            link = await self._dial(port)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, DialError, AuthError,
                WireError) as exc:
            reason = str(exc) or type(exc).__name__
            if port.life.failures % 20 == 0:  # a peer that stays away logs now and then
                log.info("%s: direct dial failed: %s", port.name, reason)
            self._dial_failed(port, reason)
            return
        except Exception as exc:
            log.error("%s: direct dial failed unexpectedly: %r", port.name, exc, exc_info=exc)
            self._dial_failed(port, f"internal error: {exc!r}")
            return
        if link is not None:
            await self._run_link(port, link)

    async def _rekey(self, port: DirectPort) -> None:
        """A fresh session for `port` that supersedes the current one."""
        try:
            link = await self._dial(port)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, DialError, AuthError,
                WireError) as exc:
            log.warning("%s: direct rekey failed, keeping the current session: %s",
                        port.name, exc)
            self._rekeys[port] = trio.current_time() + REKEY_RETRY_SECONDS
            return
        except Exception as exc:
            log.error("%s: direct rekey failed unexpectedly: %r", port.name, exc, exc_info=exc)
            self._rekeys[port] = trio.current_time() + REKEY_RETRY_SECONDS
            return
        self._rekeys.pop(port, None)
        if link is not None:
            log.info("%s: direct session rekeyed", port.name)
            await self._run_link(port, link)

    async def _dial(self, port: DirectPort) -> Link | None:
        """A session to `port` (None: one the peer dialled came up meanwhile and stays)."""
        errors = []
        addresses = self.peers.dialable(port, trio.current_time())
        if not addresses and port.peer.addresses:
            raise DialError(f"another key answered at every address in the last "
                            f"{WRONG_KEY_SECONDS:.0f} s")
        for host, number in addresses:
            if port.life.state == "closed":
                raise DialError("no longer introduced")
            try:
                with trio.fail_after(DIAL_SECONDS):
                    return await self._dial_one(port, host, number)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, DialError,
                    WireError) as exc:
                errors.append(f"{host}:{number}: {exc or type(exc).__name__}")
            except AuthError as exc:  # the wrong key answers there: say so, try the next
                self.peers.answered_by_another_key(port, (host, number), trio.current_time())
                if port.life.failures % 20 == 0:  # now and then: it may answer for hours
                    log.warning("%s: %s:%d: %s", port.name, host, number, exc)
                errors.append(f"{host}:{number}: {exc}")
        raise DialError("; ".join(errors) or "no address")

    async def _dial_one(self, port: DirectPort, host: str, number: int) -> Link | None:
        stream = await trio.open_tcp_stream(host, number)
        try:
            tune_tcp(stream.socket)
            tls = TLSStream(stream, self.client_context, server_side=False,
                            read_size=MAX_SOCKET_READ)
            await tls.do_handshake()
            check_server(tls, port.digest)  # nothing is sent to a key not introduced
            wire = WireConnection("client", name="", offloads=int(ALL_OFFLOADS), mtu=self.mtu)
            await tls.send_all(wire.send_hello())
            hello = await await_hello(tls, wire, DialError, "closed: ",
                                      "closed during the handshake")
            certificate, signature = sign_client_auth(self.identity, hello.challenge,
                                                      port.digest)
            await tls.send_all(wire.send_auth(certificate, signature)
                               + wire.send_ping(VERDICT_NONCE, time.monotonic_ns()))
            await self._await_verdict(tls, wire, port)
        except BaseException:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()
            raise
        if port.life.state == "closed":
            await stream.aclose()
            raise DialError("no longer introduced")
        active = port.active
        if active is not None and not supersedes(self.identity.fingerprint_bytes, port.digest,
                                                 True, active.wire.role == "client"):
            log.info("%s: direct session to %s:%d closed: the one %s dialled stays", port.name,
                     host, number, port.name)
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                try:
                    await tls.send_all(wire.send_close(CloseCode.NORMAL, "duplicate"))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                await stream.aclose()
            return None
        port.peer_address = f"{host}:{number}"
        return self._link(port, tls, wire)

    async def _await_verdict(self, tls: TLSStream, wire: WireConnection,
                             port: DirectPort) -> None:
        """Until the PONG to the PING behind AUTH.  Frames that come before it are the pinned
        peer's: policed and switched as they come (held, a listener could make us hold
        whatever it sends in DIAL_SECONDS)."""
        while True:
            wire.receive_data(await tls.receive_some(HANDSHAKE_READ))
            for event in wire.next_events():
                if isinstance(event, Pong) and event.nonce == VERDICT_NONCE:
                    port.rtt_ms = (time.monotonic_ns() - event.timestamp_ns) / 1e6
                    return
                if isinstance(event, Frames):
                    self.forward_from(port, event.frames)
                elif isinstance(event, Ping):
                    await tls.send_all(wire.send_pong(event.nonce, event.timestamp_ns))
                elif isinstance(event, Closed):
                    raise DialError(f"refused: {event.reason}"
                                    if event.code == CloseCode.AUTH_FAILED
                                    else f"closed: {event.reason}")
                elif isinstance(event, Eof):
                    raise DialError("closed during the handshake")

    # -- accepting ------------------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        await accept_tunnel_connections(listener, self._admit, self._refuse, what="direct")

    def _admit(self, stream: trio.SocketStream) -> None:
        try:
            address = stream.socket.getpeername()[0]
            tune_tcp(stream.socket)
        except OSError:
            self._refuse("gone_before_admission")
            stream.socket.close()
            return
        source = source_of(address)
        if not self.limiter.allow(source):
            admitted: object = "rate_limited"
        elif sum(1 for p in self.peers.ports.values() if p.active) >= MAX_DIRECT_SESSIONS:
            admitted = "too_many_sessions"
        else:
            admitted = self.slots.admit(source)
        if isinstance(admitted, str):
            self._refuse(admitted)
            stream.socket.close()
            return
        handshake, evicted = admitted
        if evicted is not None:
            self._refuse("evicted")
        assert self._nursery is not None
        self._nursery.start_soon(self._serve, stream, address, handshake)

    async def _serve(self, stream: trio.SocketStream, address: str, handshake) -> None:
        try:
            # a stranger's bytes are read a hub's socket read at a time (what each handshake
            # slot can make OpenSSL hold); an authenticated peer's an endpoint's
            tls = TLSStream(stream, self.server_context, server_side=True)
            accepted = None
            try:
                with handshake.cancel_scope:
                    accepted = await self._handshake_phase(tls, address)
            finally:
                self.slots.release(handshake)
            if accepted is not None:
                tls.resize_reads(MAX_SOCKET_READ)
                self.slots.trust(handshake.source)
                port, link = accepted
                await self._run_link(port, link)
        except Exception as exc:
            self._refuse("internal_error")
            log.error("direct: %s: internal error, connection closed: %r", address, exc,
                      exc_info=exc)
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                try:
                    await stream.aclose()
                except Exception:  # a half-open stream may fail to close cleanly
                    pass

    async def _handshake_phase(self, tls: TLSStream, address: str
                               ) -> tuple[DirectPort, Link] | None:
        try:
            with trio.move_on_after(HANDSHAKE_SECONDS) as timeout:
                with trio.move_on_after(FIRST_BYTES_SECONDS) as silent:
                    await tls.receive_first_bytes()
                if silent.cancelled_caught:
                    self._refuse("silent")
                    return None
                return await self._handshake(tls, address)
            if timeout.cancelled_caught:
                self._refuse("handshake_timeout")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._refuse("handshake_failed")
            log.info("direct: %s: handshake failed: %s", address, exc)
        except WireError as exc:
            self._refuse(f"protocol_{exc.reason}")
            log.warning("direct: %s: %s", address, exc)
        except AuthError as exc:
            self._refuse(f"auth_{exc.reason}")
            log.warning("direct: %s: refused: %s", address, exc)
        return None

    async def _handshake(self, tls: TLSStream, address: str
                         ) -> tuple[DirectPort, Link] | None:
        await tls.do_handshake()
        wire = WireConnection("server", name="", offloads=int(ALL_OFFLOADS), mtu=self.mtu)
        await tls.send_all(wire.send_hello())
        hello: Hello | None = None
        while True:
            wire.receive_data(await tls.receive_some(HANDSHAKE_READ))
            for event in wire.next_events():
                if isinstance(event, Hello):
                    hello = event
                elif isinstance(event, Auth):
                    assert hello is not None  # the codec orders HELLO before AUTH
                    authorised = self.peers.authorised()
                    try:
                        name = verify_client_auth(authorised, event.certificate,
                                                  event.signature, wire.challenge,
                                                  self.identity.fingerprint_bytes, hello.name)
                    except AuthError as exc:
                        await tls.send_all(wire.send_close(CloseCode.AUTH_FAILED, exc.reason))
                        raise
                    digest = authorised.fingerprint_of(name)  # the key just verified
                    assert digest is not None
                    port = self.peers.ports[digest]
                    active = port.active
                    if active is not None and not supersedes(
                            self.identity.fingerprint_bytes, port.digest, False,
                            active.wire.role == "client"):
                        # both dialled at once: ours stays (the same on its side)
                        self._refuse("duplicate")
                        await tls.send_all(wire.send_close(CloseCode.NORMAL, "duplicate"))
                        return None
                    wire.accept_auth()
                    port.peer_address = address
                    log.info("%s: direct session accepted from %s", port.name, address)
                    return port, self._link(port, tls, wire)
                elif isinstance(event, Closed | Eof):
                    raise trio.BrokenResourceError(f"peer left during the handshake ({event})")

    # -- a session ------------------------------------------------------------------------

    def _link(self, port: DirectPort, tls: TLSStream, wire: WireConnection) -> Link:
        link = Link(port, tls, wire, self.forward_from,
                    keepalive_seconds=DIRECT_KEEPALIVE_SECONDS,
                    dead_seconds=DIRECT_DEAD_SECONDS)
        for stale in port.links[:len(port.links) - (MAX_PEER_SESSIONS - 1)]:
            stale.abort("superseded, not closed by the peer")
        link.activate()  # a session of this peer already up is superseded
        port.life.up(trio.current_time(), ours=wire.role == "client")
        self.peers.update_routes()
        return link

    async def _run_link(self, port: DirectPort, link: Link) -> None:
        log.info("%s: direct session up (%s)", port.name, port.peer_address)
        result = await link.run()
        log.info("%s: direct session ended: %s", port.name, result.reason)
        if port.active is None:  # not superseded by a newer session of the same peer
            self._session_ended(port, result.reason)

    def forward_from(self, port: SessionPort, frames: list[Frame]) -> None:
        """Frames from a direct peer: policed with its introduced bindings, then switched."""
        assert isinstance(port, DirectPort)
        admitted = port.filter.admit(frames, port, time.monotonic())
        if admitted:
            self.forward(admitted)

    def status(self) -> dict[str, object]:
        return {"listen": [f"{h}:{p}" for h, p in self.bound], "intros": self.peers.intros,
                "handshakes": len(self.slots), "refused": dict(self.refused),
                "peers": self.peers.status()}
