"""A remote peer as a switch port, and the Trio shell that moves its frames over TLS.

Who uses it: the hub (one SessionPort per authenticated peer, by name) and the endpoint (its
uplink to the hub).  A SessionPort outlives its connections: when an endpoint reconnects or
rekeys, the new connection takes over the same port, so the MAC table and counters stay.

Path of a batch out (Link._writer): the switch delivers frames into the port's bounded queue
(a slow peer loses its own frames, counted `queue_full`) -> the active link's writer takes
everything queued -> WireConnection.send_frames makes one record -> one send_all.  An idle
link (nothing queued, nothing unsent) takes a batch within the queue's bounds straight from
`deliver` instead, and encodes and sends it there (`Link.send_at_once`).  It flushes
as soon as the queue is empty; it never waits on a timer to fill a batch.  TCP_NODELAY and
TCP_NOTSENT_LOWAT keep the kernel from queueing more than a little unsent data, so frames
wait in our bounded queue (where they can be dropped and counted) instead of bloating TCP.

Path of a batch in (Link._reader): receive_some -> WireConnection.receive_data -> FRAMES
events -> the switch (`forward`), PINGs answered, PONGs timed.  Keepalives go out every
KEEPALIVE_SECONDS; a link that hears nothing for DEAD_SECONDS is closed, and so is a link whose
ciphertext waited WRITE_STALL_SECONDS for the kernel without progress (a peer not reading).
Answers wait in a list bounded by MAX_PENDING_CONTROL: a peer that sends PINGs faster than it
reads loses the PONGs (counted `control_dropped`), never our memory.

Containment: `run()` is the one guard of a link.  Whatever its tasks raise (a broken stream,
a protocol error, or any other exception, such as a bug met in the switch by this peer's
frames) ends this link with a reason and a `kind` (counted by the listener); an unexpected
exception is logged with its traceback once, and nothing leaves `run()` but cancellation.

Make-before-break: when a new link of the same peer becomes active (a rekey or a quick
reconnect), the old one stops taking frames from the queue, sends CLOSE and keeps reading
until the peer closes too, so no frame in flight is lost.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from netstack.frame import Frame, Offload
from netstack.policy import PortPolicy
from netstack.port import QueuedPort
from tunnel.tls import TLSStream
from tunnel.wire import (
    Advertise,
    CloseCode,
    Closed,
    Eof,
    Event,
    Frames,
    Hello,
    Intro,
    Ping,
    Pong,
    WireConnection,
    WireError,
)
from virtio.dataloop import serve_readable

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 5.0
DEAD_SECONDS = 15.0
# Frames a session queues toward a slow peer before dropping (about 3 MB of full frames), and
# bytes (TSO frames: 128 of 64 KiB), whichever comes first.
SESSION_QUEUE_FRAMES = 2048
SESSION_QUEUE_BYTES = 8 << 20
# Unsent bytes the kernel may hold per connection before send_all waits (TCP_NOTSENT_LOWAT).
NOTSENT_LOWAT = 128 * 1024
# How long a superseded link may take to finish (its peer's CLOSE) before it is cut.
DRAIN_SECONDS = 5.0
# A session's MAC limit: one endpoint carries several guests.
SESSION_MAC_LIMIT = 256
# Control records (PONGs, our PINGs) waiting for the writer; past this they are dropped.
MAX_PENDING_CONTROL = 64
# Ciphertext that waits this long for the kernel with no byte taken: the peer is not reading.
WRITE_STALL_SECONDS = 20.0
# What a handshake asks of the TLS stream per read (HELLO, AUTH and a verdict are small).
HANDSHAKE_READ = 16 * 1024
# Plaintext views a link's reader decodes per turn of the data loop: a second one saves an
# epoll_wait under load; more would let one busy peer hold the others' turn for longer.
READS_PER_WAKE = 2

TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


async def await_hello(tls: TLSStream, wire: WireConnection,
                      error: Callable[[str], Exception], closed: str, eof: str) -> Hello:
    """A dialler's wait for the listener's HELLO: the HELLO, or `error(closed + reason)` if
    the listener sent CLOSE first, `error(eof)` if the connection ended without one."""
    while True:
        wire.receive_data(await tls.receive_some(HANDSHAKE_READ))
        for event in wire.next_events():
            if isinstance(event, Hello):
                return event
            if isinstance(event, Closed):
                raise error(closed + event.reason)
            if isinstance(event, Eof):
                raise error(eof)


def tune_tcp(sock: trio.socket.SocketType) -> None:
    """Low latency over bufferbloat: no Nagle, little unsent data in the kernel."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    except OSError as exc:
        log.debug("TCP_NOTSENT_LOWAT not set: %s", exc)


class SessionPort(QueuedPort):
    """A remote peer on the switch.  `links` are its live connections; `active` sends."""

    def __init__(self, name: str, *, policy: PortPolicy | None = None,
                 accepts: Offload = Offload.NONE) -> None:
        super().__init__(name, accepts, SESSION_QUEUE_FRAMES, policy, SESSION_QUEUE_BYTES)
        self.active: Link | None = None
        self.links: list[Link] = []
        self.connections = 0
        self.peer_address: str | None = None
        self.rtt_ms: float | None = None
        self.state = "down"
        self.control_dropped = 0  # PONGs/PINGs not sent: the peer sent PINGs faster than it read

    def deliver(self, frames: list[Frame]) -> None:
        link = self.active
        if link is None:
            self.counters.drop("link_down", len(frames))
            return
        # To an empty queue, with the link free to send: sent from here, as the queue's
        # `on_ready` would do at once, without the trip through the queue.
        if self.queue or not link.send_at_once(frames):
            QueuedPort.deliver(self, frames)  # (not super(): a lookup fewer per visit)

    def status(self) -> dict[str, object]:
        status = super().status()
        status.update(kind="session", state=self.state, link_up=self.active is not None,
                      peer=self.peer_address, connections=self.connections,
                      rtt_ms=None if self.rtt_ms is None else round(self.rtt_ms, 3),
                      control_dropped=self.control_dropped,
                      version=self.active.wire.version if self.active else None)
        return status


@dataclass
class LinkResult:
    reason: str  # for people: the log line, the endpoint's last_error
    # For counting: peer_closed, connection_lost, protocol_error, dead, peer_not_reading,
    # internal_error, aborted, closed.
    kind: str = "closed"


class Link:
    """One authenticated connection of a session.  `run()` returns when it is over."""

    def __init__(
        self,
        port: SessionPort,
        stream: TLSStream,
        wire: WireConnection,
        forward: Callable[[SessionPort, list[Frame]], None],
        *,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
        dead_seconds: float = DEAD_SECONDS,
    ) -> None:
        """A direct session (tunnel/direct_link.py) pings and gives up sooner than the
        hub's link (`keepalive_seconds`, `dead_seconds`)."""
        self.port = port
        self.keepalive_seconds = keepalive_seconds
        self.dead_seconds = dead_seconds
        self.stream = stream
        self.wire = wire
        self.forward = forward
        self.started = trio.current_time()  # when it was made: its key's age
        self._control: list[bytes] = []
        self._wake = trio.Event()
        self._retiring = False
        self._retire_reason = ""
        self._muted_at: float | None = None
        self._error: WireError | None = None  # the peer broke the protocol
        self._ended: LinkResult | None = None  # the first reason the link ends
        self._scope: trio.CancelScope | None = None
        self._last_heard = trio.current_time()
        # The run's clock (what trio.current_time() reads, three calls deep), for the reader.
        self._clock = trio.lowlevel.current_clock()
        # Direct paths (hub links): who hears ADVERTISE / INTRO, and the INTRO waiting for
        # the writer (entries of tunnel/wire.encode_intro_peer; a newer set replaces it).
        self.on_introduction: Callable[[Link, Advertise | Intro], None] | None = None
        self._intro: list[bytes] | None = None
        self._read_result: LinkResult | None = None  # why the reader's handler stopped

    # -- life cycle ---------------------------------------------------------------------

    def activate(self, *, retire_previous: bool = True) -> None:
        """Make this link the one that sends.  The previous one stops sending frames and
        either closes at once (`retire_previous`: the hub, which decides the switch) or waits
        for its peer to close it (the endpoint, whose new link the hub may not have accepted
        yet: the hub keeps sending on the old link until then)."""
        port = self.port
        previous = port.active
        port.active = self
        port.links.append(self)
        port.connections += 1
        port.state = "up"
        port.accepts = self.wire.peer_hello.offloads if self.wire.peer_hello else Offload.NONE
        port.on_ready = self._on_ready
        if previous is not None:
            if retire_previous:
                previous.retire("superseded")
            else:
                previous.mute()
        if port.queue:
            self._wake_writer()

    def retire(self, reason: str) -> None:
        """Stop taking frames; say CLOSE; keep reading until the peer closes."""
        if self._retiring:
            return
        self._retiring = True
        self._retire_reason = reason
        self._wake_writer()

    def mute(self) -> None:
        """Send no more frames; close if the peer has not closed us within DRAIN_SECONDS."""
        self._muted_at = trio.current_time()
        self._wake_writer()

    def abort(self, reason: str) -> None:
        """End the link now (its peer is no longer allowed): nothing more in or out."""
        self._end(LinkResult(reason, kind="aborted"))

    def _end(self, result: LinkResult) -> None:
        """The link is over for `result` (the first reason given wins): stop its tasks."""
        if self._ended is None:
            self._ended = result
        if self._scope is not None:
            self._scope.cancel()

    def introduce(self, entries: list[bytes]) -> None:
        """Send an INTRO of `entries` (tunnel/wire.encode_intro_peer) when the writer next
        runs; one still waiting is replaced (an INTRO is the whole set), so a peer that
        reads slowly holds at most one."""
        self._intro = entries
        self._wake.set()

    def _internal_error(self, exc: Exception) -> None:
        """An exception nobody expected, met while serving this link: it ends this link only
        (logged with its traceback, once), never the process or another link."""
        log.error("%s: internal error, link closed: %r", self.port.name, exc, exc_info=exc)
        self._end(LinkResult(f"internal error: {exc!r}", kind="internal_error"))

    def _wake_writer(self) -> None:
        self._wake.set()

    def _on_ready(self) -> None:
        """Frames arrived in the port's empty queue (called by the switch, from the task
        that forwarded them).  With nothing else in flight, encode and send them right here
        (`send_at_once`): no trip through Trio's scheduler to the writer, which is most of
        what an idle hop costs.  While a drain refills from the queue (`_refill`) they
        follow from there.  Otherwise the writer does it."""
        queue = self.port.queue
        if self.send_at_once(list(queue)):
            queue.clear()
        elif not self.stream.refilling:
            self._wake.set()

    def send_at_once(self, frames: list[Frame]) -> bool:
        """Encode and send `frames` now, if nothing has to go before them (control records,
        ciphertext waiting, a drain) and the port's queue could hold them: True when they
        were taken (what the kernel did not take waits in the stream, and the writer is
        woken to flush it; a link that breaks here ends), False to queue them."""
        port, stream = self.port, self.stream
        count = len(frames)
        if (port.active is not self or self._control or self._retiring or self.wire.failed
                or stream.sending or not 0 < count <= port.limit):
            return False
        nbytes = len(frames[0].data) if count == 1 else sum([len(f.data) for f in frames])
        if nbytes > port.limit_bytes:
            return False
        counters = port.counters
        counters.out_frames += count
        counters.out_bytes += nbytes
        # This link's failure, never the caller's (another session's task).
        try:
            if not stream.send_now(self.wire.send_frames(frames)):
                self._wake.set()  # the kernel took part: the writer flushes the rest
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._end(_lost(exc))
        except Exception as exc:
            self._internal_error(exc)
        return True

    async def run(self) -> LinkResult:
        """Carry frames until the link ends, and say why it ended; never raises (each task
        turns whatever it meets into `_end`, so nothing leaves the nursery but Cancelled)."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self._ended is not None:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._guarded, self._writer)
                nursery.start_soon(self._guarded, self._keepalive)
                await self._guarded(self._reader)
                nursery.cancel_scope.cancel()
            if self._error is not None:
                await self._tell_peer(self._error)
        finally:
            self._detach()
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                try:
                    await self.stream.aclose()
                except Exception:  # a broken TLS stream may not close cleanly; it is gone
                    pass
        return self._ended or LinkResult("closed")

    async def _guarded(self, task: Callable[[], Awaitable[None]]) -> None:
        """The link's guard, around each of its tasks: any exception ends the link."""
        try:
            await task()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._end(_lost(exc))
        except WireError as exc:
            self._error = exc
            self._end(LinkResult(f"protocol error: {exc}", kind="protocol_error"))
        except Exception as exc:
            self._internal_error(exc)

    async def _tell_peer(self, error: WireError) -> None:
        with trio.move_on_after(1):
            try:
                await self.stream.send_all(self.wire.send_close(error.close_code, error.reason))
            except Exception:  # the peer is gone or the stream broke: nothing to tell
                pass

    def _detach(self) -> None:
        port = self.port
        if self in port.links:
            port.links.remove(self)
        if port.active is self:
            port.active = None
            port.state = "down"
            port.accepts = Offload.NONE
            if port.queue:  # frames no link will carry: lost, and counted as such
                port.counters.drop("link_down", len(port.queue))
                port.queue.clear()

    # -- the three tasks ------------------------------------------------------------------

    async def _reader(self) -> None:
        wire = self.wire
        result = self._dispatch(wire.next_events())  # what the codec buffered in the handshake
        fd = self.stream.fileno()
        while result is None and fd is not None:
            # A socket: served by the data loop (virtio/dataloop.py) without waking a task.
            await serve_readable(fd, self._on_readable)
            result = self._read_result
            if result is None:  # paused: what OpenSSL answered waits for the kernel
                await self.stream.flush()
        while result is None:  # any other transport (the tests' memory streams)
            # A view of TLS's reused plaintext buffer: decoded before anything awaits.
            data = await self.stream.receive_view()
            if data:
                self._last_heard = trio.current_time()
            result = self._dispatch(wire.receive_events(data))  # empty: the end of the stream
        self._end(result)

    def _on_readable(self) -> bool:
        """The socket is readable (a data-loop handler): decode and act on what came, up to
        READS_PER_WAKE socket reads; True once the link is over (`_read_result`), or to
        pause while an answer OpenSSL made in reading waits for the kernel (`_reader`
        flushes, then serves again: a peer that sends KeyUpdates and never reads makes us
        hold one read's answers, not all it sends)."""
        stream, wire = self.stream, self.wire
        for _ in range(READS_PER_WAKE):
            # A view of TLS's reused plaintext buffer: decoded before anything else reads.
            data = stream.receive_view_nowait()
            if data is None:
                break
            if data:
                self._last_heard = self._clock.current_time()
            result = self._dispatch(wire.receive_events(data))  # empty: the end of the stream
            if result is not None:
                self._read_result = result
                return True
            # The socket is empty (a read would find nothing), or an answer waits for a flush.
            if stream.drained or stream.answer_waiting:
                break
        if stream.sending:  # what _on_ready or OpenSSL's answer left waits for a flush
            self._wake.set()
            return stream.answer_waiting
        return False

    def _dispatch(self, events: list[Event]) -> LinkResult | None:
        """Act on `events` (the codec's); a result when the link is over."""
        wire = self.wire
        port = self.port
        for event in events:
            kind = type(event)
            if kind is Frames:
                self.forward(port, event.frames)
            elif kind is Ping:
                # Not after a protocol error (a WireError ends the link at the next call),
                # nor after a CLOSE (a retiring link drains; it answers nothing more).
                if not wire.failed and not wire.closed:
                    self._send_control(wire.send_pong(event.nonce, event.timestamp_ns))
            elif kind is Pong:
                port.rtt_ms = (time.monotonic_ns() - event.timestamp_ns) / 1e6
            elif kind is Closed:
                log.info("%s: peer closed (code %d%s)", port.name, event.code,
                         f": {event.reason}" if event.reason else "")
                return LinkResult(event.reason or "closed by peer", kind="peer_closed")
            elif kind is Eof:
                return LinkResult("connection closed", kind="peer_closed")
            elif (kind is Advertise or kind is Intro) and self.on_introduction is not None:
                self.on_introduction(self, event)
        if wire.failed:
            wire.next_events()  # raises the peer's WireError now, not at its next bytes
        return None

    def _refill(self) -> bytes | None:
        """The queued frames, encoded, for a drain of this link's stream to send once its
        unsent bytes are out (tunnel/tls.py `refill`, called from the data loop's handler);
        None when the writer has something else to do first (or nothing is queued)."""
        port = self.port
        queue = port.queue
        if (not queue or port.active is not self or self._control or self._intro is not None
                or self._retiring or self._muted_at is not None or self.wire.failed):
            return None
        frames = list(queue)
        queue.clear()
        counters = port.counters
        counters.out_frames += len(frames)
        counters.out_bytes += sum([len(f.data) for f in frames])
        return self.wire.send_frames(frames)

    async def _writer(self) -> None:
        wire = self.wire
        port = self.port
        queue = port.queue
        stream = self.stream
        counters = port.counters
        stream.refill = self._refill
        while True:
            if wire.failed:
                # The peer broke the protocol (the codec refuses to send more): the reader
                # ends the link, maybe only after other handlers ran, and run() says CLOSE.
                await trio.sleep_forever()
            if stream.sending:  # what _on_ready left for the kernel
                await stream.flush()
                continue
            if self._control:
                out, self._control = b"".join(self._control), []
                await stream.send_all(out)
                continue
            if self._intro is not None and not self._retiring:
                entries, self._intro = self._intro, None
                await stream.send_all(wire.send_intro_encoded(entries))
                continue
            if self._retiring:
                await stream.send_all(wire.send_close(CloseCode.NORMAL, self._retire_reason))
                with trio.move_on_after(DRAIN_SECONDS):
                    await trio.sleep_forever()  # the reader ends when the peer closes
                self._end(LinkResult(self._retire_reason))
                return
            if queue and port.active is self:
                frames = list(queue)
                queue.clear()
                counters.out_frames += len(frames)
                counters.out_bytes += sum(len(f.data) for f in frames)
                await stream.send_all(wire.send_frames(frames))
                continue
            self._wake = trio.Event()
            if port.active is self:
                port.on_ready = self._on_ready
                await self._wake.wait()
            elif self._muted_at is not None:
                with trio.move_on_at(self._muted_at + DRAIN_SECONDS):
                    await self._wake.wait()
                if trio.current_time() >= self._muted_at + DRAIN_SECONDS:
                    self.retire("superseded")
            else:
                await self._wake.wait()

    def _send_control(self, data: bytes) -> None:
        """A PING or PONG: sent at once when nothing waits before it (a PONG from the reader's
        handler, a PING from the keepalive task: no trip to the writer task), else queued
        for the writer."""
        stream = self.stream
        if not self._control and not stream.sending and not self.wire.failed:
            try:
                if not stream.send_now(data):
                    self._wake.set()  # the kernel took part: the writer flushes the rest
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the reader meets it too, after what the peer sent before (its CLOSE)
            return
        if len(self._control) >= MAX_PENDING_CONTROL:
            self.port.control_dropped += 1  # the peer sends PINGs faster than it reads
            return
        self._control.append(data)
        self._wake.set()

    async def _keepalive(self) -> None:
        nonce = 0
        while True:
            await trio.sleep(self.keepalive_seconds)
            now = trio.current_time()
            if now - self._last_heard > self.dead_seconds:
                log.warning("%s: nothing heard for %.1f s; closing", self.port.name,
                            self.dead_seconds)
                self._end(LinkResult(f"nothing heard for {self.dead_seconds:.1f} s",
                                     kind="dead"))
                return
            waiting = self.stream.waiting_since
            if waiting is not None and now - waiting > WRITE_STALL_SECONDS:
                log.warning("%s: peer not reading: nothing sent for %.0f s; closing",
                            self.port.name, now - waiting)
                self._end(LinkResult(f"peer not reading (nothing sent for "
                                     f"{WRITE_STALL_SECONDS:.0f} s)",
                                     kind="peer_not_reading"))
                return
            # A retiring link that said CLOSE only drains; a failed one is ending.
            if not self.wire.closed and not self.wire.failed:
                nonce += 1
                self._send_control(self.wire.send_ping(nonce, time.monotonic_ns()))


def _lost(exc: BaseException) -> LinkResult:
    return LinkResult(f"connection lost: {exc or type(exc).__name__}", kind="connection_lost")
