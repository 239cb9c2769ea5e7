"""The Trio shell around the vhost-user device: one socket, one task tree per connection.

Who calls it: `vhostvpn hub` and `vhostvpn vm` run one VhostUserServer per --socket.  What it
does: waits on fds and moves bytes; the rings' kick fds are served by the data loop
(virtio/dataloop.py: a handler called straight from epoll, no task woken per kick).  Every
decision is made by the sans-I/O cores (virtio.protocol.VhostUserDevice for messages,
virtio.net.NetQueues and virtio.vring for ring work).  What it must never do: await between
popping descriptors and publishing them, or close an fd without first waking whoever waits on
it or serves it (dataloop.notify_closing).

Tasks of one connection:
  * the control loop reads a message, lets the device handle it, sends the reply, then
    reconciles ring tasks with the device's rings (`_apply`);
  * one TX task per live TX ring, parked while the data loop serves the ring's kick fd: its
    handler pops a batch -> switch -> notify per call; when the ring is empty it arms kicks
    and re-checks (a slow re-poll by the task is the lost-kick safety net);
  * one RX task, parked likewise: frames the switch queued on this port -> the first live RX
    ring, placed by `push_now` from whoever switched them; when the guest has no buffers,
    kicks are armed on that ring and its kick handler places the rest (re-polled only while
    frames wait: an idle RX ring costs no wake-up).  Each (re)start tries the ring first.
Handlers and tasks run on one thread and ring work never waits mid-batch, so a control
message is applied between batches, never during one: SET_MEM_TABLE or GET_VRING_BASE cannot
race ring work.  A handler may still run between a ring's retirement and its task's end: it
checks first that its ring is current and its task not cancelled, and touches nothing if not.

Who releases guest memory: not the device.  A message that retires a ring (GET_VRING_BASE,
SET_VRING_ENABLE(0), SET_MEM_TABLE, the connection's end, a broken ring) only cancels the
ring's task, and a task may already be woken and run once more before it sees that; so the
device hands retired queues and memory tables to this shell (`take_retired`), which releases
a queue once no ring task holds it and a memory table once no queue uses it.  A task also
stops at its next batch when its ring is no longer the vring's current one.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from netstack.frame import Frame, Offload
from netstack.policy import PortPolicy
from netstack.port import QueuedPort
from netstack.switch import Switch
from virtio.dataloop import notify_closing, serve_readable
from virtio.memory import GuestMemory
from virtio.net import NetQueues
from virtio.protocol import (
    Message,
    ProtocolError,
    VhostUserDevice,
    Vring,
    parse_header,
    request_name,
)
from virtio.spec import HEADER_SIZE, MAX_FDS
from virtio.unixsock import OWNER_ONLY, SocketAccess, bind_listener, claim
from virtio.vring import RingError, SplitQueue

log = logging.getLogger(__name__)

# Chains handled per handler call before the loop serves the others.
BATCH = 256
# Re-check a ring this often even without a kick while it waits for the guest (TX always; RX
# while frames wait for buffers): a safety net, not the data path (the one Trio wake-up of a
# busy ring's task).
REPOLL_SECONDS = 0.25
# A kick fd the front-end said it would not provide (NOFD): poll this often while the ring
# waits for the guest.
NOFD_POLL_SECONDS = 0.001
# A front-end arriving while the previous one is being torn down waits this long before it
# is refused (one guest per socket).
BUSY_GRACE_SECONDS = 1.0
# Client mode: how long to wait between attempts to reach a listening front-end.
CONNECT_RETRY_SECONDS = (0.1, 2.0)
# A failed accept() (fd table full...): wait this long before the next one.
ACCEPT_RETRY_SECONDS = 0.1

_CALL = (1).to_bytes(8, "little")


class VirtioNetPort(QueuedPort):
    """The switch port of one vhost-user socket.  Lives as long as the socket, across guest
    connections, so its counters survive reconnects."""

    def __init__(self, name: str, policy: PortPolicy | None = None) -> None:
        super().__init__(name, Offload.NONE, policy=policy or PortPolicy())
        self.device: VhostUserDevice | None = None
        self.link_up = False
        self.connections = 0

    def deliver(self, frames: list[Frame]) -> None:
        if not self.link_up:
            self.counters.drop("link_down", len(frames))
            return
        super().deliver(frames)

    def status(self) -> dict[str, object]:
        status = super().status()
        device = self.device
        status["kind"] = "vhost-user"
        status["connected"] = device is not None
        status["connections"] = self.connections
        status["link_up"] = self.link_up
        status["broken"] = device.broken if device is not None else None
        if device is not None:
            status["features"] = f"{device.features:#x}"
            status["protocol_features"] = f"{device.protocol_features:#x}"
            status["live_queues"] = [q.index for q in device.live_queues()]
            if device.net is not None:
                status["guest_drops"] = dict(device.net.drops)
        return status


# Kick and call fds are eventfds the protocol made non-blocking (VhostUserDevice refuses any
# other kind of fd), so neither a read nor a write here waits.


def _drain_eventfd(fd: int) -> None:
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass  # drained by someone else since it was readable


def _signal(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, _CALL)
    except BlockingIOError:
        pass  # the counter is full: the guest has not consumed its interrupts; nothing to do


class _Kicks:
    """The kick fd of one ring task, as its data-loop handler uses it; None: the front-end
    gave none (NOFD) and the task polls the ring instead.

    A readable fd is the data loop's one way to call the handler again, so the fd is kept
    readable while the handler has more to do: it is readable whenever the handler is called
    (the task kicks it before it serves it), and the handler drains it only once the ring is
    idle, before it re-checks.  A spurious kick costs one call that finds the ring as it is.

    The task re-polls the ring (NOFD: polls it) only while the ring waits for the guest; an
    RX ring with no frames queued waits for nothing (push_now reads the ring itself), and its
    task sleeps until `watch` (frames left waiting) or `kick`."""

    __slots__ = ("again", "fd", "wait")

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.again = False  # NOFD: the handler has more to do, poll again at once
        # The task's wait for its next (re-)poll, while it waits; its deadline is inf while
        # the ring waits for nothing.
        self.wait: trio.CancelScope | None = None

    def watch(self) -> None:
        """The ring waits for the guest (kicks armed): have the task (re-)poll it within a
        period, if it was not going to."""
        wait = self.wait
        if wait is not None and wait.deadline == math.inf:
            wait.deadline = trio.current_time() + (
                NOFD_POLL_SECONDS if self.fd is None else REPOLL_SECONDS)

    def busy(self) -> None:
        """The handler has more to do and did not drain: it is called again after the
        others' turn."""
        if self.fd is None:
            self.again = True

    def drain(self) -> None:
        if self.fd is not None:
            _drain_eventfd(self.fd)

    def kick(self) -> None:
        """More to do after a drain, or from outside the handler: have the handler called."""
        if self.fd is None:
            self.again = True
            if self.wait is not None:
                self.wait.cancel()  # the task polls now
        else:
            _signal(self.fd)


class VhostUserServer:
    """Serves one vhost-user socket path.  `forward(port, frames)` is where guest frames go."""

    def __init__(
        self,
        path: str,
        forward: Callable[[VirtioNetPort, list[Frame]], None],
        *,
        client: bool = False,
        queue_pairs: int = 4,
        port: VirtioNetPort | None = None,
        access: SocketAccess = OWNER_ONLY,
    ) -> None:
        self.path = path
        # Who may connect (listening only): by default the owner alone, since a front-end
        # maps its memory into us and feeds us rings.
        self.access = access
        self.forward = forward
        self.client = client
        self.queue_pairs = queue_pairs
        self.port = port or VirtioNetPort(os.path.basename(path))
        self._idle = trio.Event()  # set while no front-end is connected
        self._idle.set()
        # The current connection's task tree: ring tasks by TX ring index (-1: the RX task).
        self._nursery: trio.Nursery | None = None
        self._ring_scopes: dict[int, trio.CancelScope] = {}
        # The queue of each running ring task (twice while a cancelled task still runs on a
        # queue its replacement already took over), and what the device retired but is not
        # released yet.
        self._held: list[SplitQueue] = []
        self._retired: list[SplitQueue | GuestMemory] = []
        # Kick fds a ring task serves now (set once it stopped serving).
        self._kick_served: dict[int, trio.Event] = {}
        self._forward_error_logged = False

    # -- connections -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.client:
            await self._run_client(task_status)
        else:
            await self._run_server(task_status)

    async def _run_server(self, task_status: trio.TaskStatus[None]) -> None:
        claim(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bound = bind_listener(sock, self.path, self.access)  # never wider than asked
        except BaseException:
            sock.close()
            raise
        listener = trio.socket.from_stdlib_socket(sock)
        listener.listen(1)
        log.info("%s: listening on %s", self.port.name, self.path)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, _ = await listener.accept()
                    except OSError as exc:
                        # Out of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), or a peer
                        # gone before we took it: the listener itself is fine.  Back off so
                        # a full fd table does not become a busy loop, then serve on.
                        log.warning("%s: accept failed: %s; retrying in %.1f s", self.port.name,
                                    exc, ACCEPT_RETRY_SECONDS)
                        await trio.sleep(ACCEPT_RETRY_SECONDS)
                        continue
                    if self.port.device is not None:
                        # Maybe the old connection is ending right now (a quick reconnect).
                        with trio.move_on_after(BUSY_GRACE_SECONDS):
                            await self._idle.wait()
                    if self.port.device is not None:
                        log.warning("%s: second front-end refused: one guest per socket",
                                    self.port.name)
                        conn.close()
                        continue
                    self.port.device = VhostUserDevice(self.port.name, self.queue_pairs)
                    self._idle = trio.Event()
                    nursery.start_soon(self._serve, conn)
        finally:
            bound.remove()
            listener.close()

    async def _run_client(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        delay = CONNECT_RETRY_SECONDS[0]
        while True:
            conn = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await conn.connect(self.path)
            except OSError as exc:
                conn.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    log.warning("%s: connecting to %s: %s", self.port.name, self.path, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, CONNECT_RETRY_SECONDS[1])
                continue
            delay = CONNECT_RETRY_SECONDS[0]
            log.info("%s: connected to front-end at %s", self.port.name, self.path)
            self.port.device = VhostUserDevice(self.port.name, self.queue_pairs)
            self._idle = trio.Event()
            await self._serve(conn)

    async def _serve(self, conn: trio.socket.SocketType) -> None:
        """One front-end connection, start to end.  The guard of one connection: whatever
        happens in it closes it, never the socket's server or the process."""
        device = self.port.device
        assert device is not None
        self.port.connections += 1
        log.info("%s: front-end connected (connection %d)", self.port.name,
                 self.port.connections)
        self._ring_scopes = {}
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    while True:
                        msg = await _read_message(conn)
                        if msg is None:
                            log.info("%s: front-end disconnected", self.port.name)
                            break
                        log.debug("%s: %s flags=%#x size=%d fds=%d", self.port.name,
                                  request_name(msg.request), msg.flags, len(msg.payload),
                                  len(msg.fds))
                        reply = device.handle(msg)
                        self._apply(device)
                        if reply is not None:
                            await conn.send(reply)
                except ProtocolError as exc:
                    log.error("%s: closing connection: %s", self.port.name, exc)
                except OSError as exc:
                    log.warning("%s: connection failed: %s", self.port.name, exc)
                except Exception:  # a bug must not take the other guests down
                    log.exception("%s: internal error; closing connection", self.port.name)
                nursery.cancel_scope.cancel()
        except Exception:  # escaped a ring task's own guard
            log.exception("%s: internal error in a ring task; closing connection",
                          self.port.name)
        finally:
            self._nursery = None
            try:
                conn.close()
                device.close()
                self._apply(device)
            except Exception:
                log.exception("%s: internal error while closing the connection", self.port.name)
            self.port.device = None
            self._idle.set()
            self.port.link_up = False
            self.port.accepts = Offload.NONE
            self.port.queue.clear()

    def _close_connection(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- reconciling ring tasks with the device -----------------------------------------------

    def _apply(self, device: VhostUserDevice) -> None:
        """Stop tasks of changed rings, close retired fds, start tasks for live rings."""
        ring_scopes = self._ring_scopes
        nursery = self._nursery
        changed = device.take_changed()
        rx_changed = False
        for index in changed:
            scope = ring_scopes.pop(index if index % 2 else -1, None)
            if index % 2 == 0:
                rx_changed = True
            if scope is not None:
                scope.cancel()
        for fd in device.take_closing():
            # A kick fd a stopped task still serves: the loop forgets it first (the front-end
            # keeps its copy of the eventfd, so epoll would keep an entry no one can remove).
            notify_closing(fd)
            os.close(fd)
        self._retired += device.take_retired()
        self._release_retired()
        rx_queue = self._rx_queue(device)
        self.port.link_up = rx_queue is not None
        self.port.accepts = device.net.rx_offloads if device.net is not None else Offload.NONE
        if nursery is None:
            return
        for index in changed:
            vring = device.vrings[index]
            if index % 2 and vring.queue is not None and index not in ring_scopes:
                scope = trio.CancelScope()
                ring_scopes[index] = scope
                _signal(vring.call_fd)  # a call after (re)start: the guest may be waiting
                nursery.start_soon(self._run_ring, self._tx_loop, device, vring.queue, scope)
        if rx_changed and rx_queue is not None and -1 not in ring_scopes:
            scope = trio.CancelScope()
            ring_scopes[-1] = scope
            _signal(device.vrings[rx_queue.index].call_fd)
            nursery.start_soon(self._run_ring, self._rx_loop, device, rx_queue, scope)

    def _release_retired(self) -> None:
        """Release the retired queues no ring task holds, then the retired memory tables no
        queue left uses (the order the device retired them in)."""
        kept: list[SplitQueue | GuestMemory] = []
        for item in self._retired:
            if isinstance(item, SplitQueue):
                if item in self._held:
                    kept.append(item)
                else:
                    item.release()
            elif any(isinstance(q, SplitQueue) and q.memory is item for q in kept):
                kept.append(item)
            else:
                item.close()
        self._retired = kept

    @staticmethod
    def _rx_queue(device: VhostUserDevice) -> SplitQueue | None:
        for vring in device.vrings[0::2]:
            if vring.queue is not None:
                return vring.queue
        return None

    async def _serve_kicks(
        self, kicks: _Kicks, on_kick: Callable[[], bool], waiting: Callable[[], bool]
    ) -> None:
        """Call `on_kick()` now and whenever the ring is kicked, from the data loop, until it
        returns True (raising what it raised); re-polled every REPOLL_SECONDS, or polled every
        NOFD_POLL_SECONDS without a kick fd, while `waiting()` (the ring waits for the guest)
        or after `kicks.watch()`."""
        fd = kicks.fd
        if fd is None:
            try:
                while True:
                    kicks.again = False
                    if on_kick():
                        return
                    if kicks.again:
                        await trio.sleep(0)
                        continue
                    with trio.CancelScope() as kicks.wait:
                        if waiting():
                            kicks.wait.deadline = trio.current_time() + NOFD_POLL_SECONDS
                        await trio.sleep_forever()
            finally:
                kicks.wait = None
        # The task this one replaces (a new call fd, a restart) may still be serving the fd:
        # one server per fd, so wait until it unwound.
        while (other := self._kick_served.get(fd)) is not None:
            await other.wait()
        served = self._kick_served[fd] = trio.Event()
        try:
            while True:
                kicks.kick()  # readable at the first call too (see _Kicks)
                with trio.CancelScope() as kicks.wait:
                    if waiting():
                        kicks.wait.deadline = trio.current_time() + REPOLL_SECONDS
                    await serve_readable(fd, on_kick)
                    return
        finally:
            kicks.wait = None
            del self._kick_served[fd]
            served.set()

    async def _run_ring(
        self,
        loop: Callable[[VhostUserDevice, SplitQueue, trio.CancelScope], Awaitable[None]],
        device: VhostUserDevice,
        queue: SplitQueue,
        scope: trio.CancelScope,
    ) -> None:
        """Run one ring's loop; a guest that breaks the ring breaks only its own device.

        The guard of one ring: no exception leaves this task (cancellation aside).
        """
        self._held.append(queue)  # not released while this task runs, whatever wakes it
        try:
            with scope:
                try:
                    # The ring may have been retired before this task first ran.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    await loop(device, queue, scope)
                    return  # its ring was retired: the task that replaces it takes over
                except trio.ClosedResourceError:
                    return  # its kick fd was retired: the ring changed, a new task takes over
                except RingError as exc:
                    device.latch_broken(str(exc))
                except Exception:
                    log.exception("%s: internal error on queue %d", self.port.name, queue.index)
                    device.latch_broken(f"internal error on queue {queue.index}")
                try:
                    # Stop the device's other ring tasks now that their rings are retired.
                    self._apply(device)
                    self.port.queue.clear()
                except Exception:
                    log.exception("%s: internal error stopping queue %d; closing the "
                                  "connection", self.port.name, queue.index)
                    self._close_connection()
        finally:
            self._held.remove(queue)
            self._release_retired()

    async def _tx_loop(
        self, device: VhostUserDevice, queue: SplitQueue, scope: trio.CancelScope
    ) -> None:
        """Guest TX ring -> switch, a batch per call of the kick handler."""
        net = device.net
        vring = device.vrings[queue.index]
        assert net is not None
        port = self.port
        forward = self.forward
        kicks = _Kicks(vring.kick_fd)

        def on_kick() -> bool:
            if scope.cancel_called or vring.queue is not queue:
                return True  # retired while the loop still served it: touch nothing
            queue.mute_kicks()
            before = queue.last_avail_idx
            frames = net.pop_tx(queue, BATCH)
            popped = (queue.last_avail_idx - before) & 0xFFFF
            if popped:
                if queue.should_notify():
                    _signal(vring.call_fd)
                if frames:
                    try:
                        forward(port, frames)
                    except Exception:  # one frame must not break the port
                        self._forward_failed(len(frames))
            if popped == BATCH or queue.arm_kicks():
                kicks.busy()  # more is there, or the batch ended on WALK_BUDGET
                return False
            kicks.drain()  # empty, kicks armed: until the next kick
            if queue.arm_kicks():  # unless it came while we drained
                kicks.kick()
            return False

        await self._serve_kicks(kicks, on_kick, lambda: True)

    def _forward_failed(self, count: int) -> None:
        """The switch raised on a batch of this guest's frames: the frame that made it raise
        and those after it in the batch are lost (counted as malformed), nothing else."""
        port = self.port
        port.counters.drop("malformed")
        if not self._forward_error_logged:
            self._forward_error_logged = True
            log.exception("%s: the switch failed on a batch of %d frames; dropped (traceback "
                          "logged once, then counted as malformed)", port.name, count)

    def _push(self, net: NetQueues, queue: SplitQueue, vring: Vring) -> None:
        """Up to BATCH queued frames into the guest's RX ring; call the guest if it asks."""
        counters = self.port.counters
        used_before = queue.used_idx
        delivered, nbytes = net.push_rx(queue, self.port.queue, BATCH)
        counters.out_frames += delivered
        counters.out_bytes += nbytes
        if queue.used_idx != used_before and queue.should_notify():
            _signal(vring.call_fd)

    async def _rx_loop(
        self, device: VhostUserDevice, queue: SplitQueue, scope: trio.CancelScope
    ) -> None:
        """Frames the switch queued for this port -> the guest's RX ring: placed by
        `push_now` as they arrive, by the kick handler once the guest posts buffers."""
        net = device.net
        vring = device.vrings[queue.index]
        assert net is not None
        port = self.port
        pending = port.queue
        kicks = _Kicks(vring.kick_fd)
        failed: list[Exception] = []  # what push_now met, for this task to raise

        def place() -> bool:
            """Up to BATCH frames; True if it placed some and more are left."""
            queued = len(pending)
            self._push(net, queue, vring)
            return bool(pending) and len(pending) < queued

        def push_now() -> None:
            """Frames arrived in the empty queue (called by the handler or task that switched
            them): place them from there.  An error goes to the kick handler, which ends this
            task with it: the ring's guard in _run_ring handles it as if the task had met it."""
            if failed or scope.cancel_called or vring.queue is not queue:
                return
            try:
                # What is left waits for buffers: kicks armed beyond those the placement saw,
                # or more already there (the guest may have added them unkicked meanwhile).
                seen = queue.avail_idx()
                if place() or (pending and queue.arm_kicks_for_more(seen)):
                    kicks.kick()
                elif pending:
                    kicks.watch()
            except Exception as exc:
                failed.append(exc)
                kicks.kick()

        def on_kick() -> bool:
            if failed or scope.cancel_called or vring.queue is not queue:
                return True  # failed, or retired while the loop still served it
            queue.mute_kicks()  # kicks are armed only while frames wait for buffers
            seen = queue.avail_idx()
            if pending and place():
                kicks.busy()
                return False
            kicks.drain()
            if pending:  # the guest has no room: armed
                if queue.arm_kicks_for_more(seen):
                    kicks.kick()  # unless more came since the placement looked
                else:
                    kicks.watch()
            return False

        port.on_ready = push_now
        try:
            await self._serve_kicks(kicks, on_kick, lambda: bool(pending))
            if failed:
                raise failed[0]
        finally:  # a task that stopped places nothing, even on a ring not retired yet
            if port.on_ready is push_now:
                port.on_ready = None


def attach_sockets(
    switch: Switch,
    sockets: list[str],
    client_sockets: list[str],
    queue_pairs: int,
    *,
    policy: bool = True,
    access: SocketAccess = OWNER_ONLY,
) -> list[VhostUserServer]:
    """A server per socket path (listening ones, then ones QEMU listens on), each port
    attached to `switch`; ports named after the socket, the full path where names clash.
    `access`: who may connect to the listening ones (--socket-mode, --socket-group)."""
    servers = [VhostUserServer(path, switch.forward, queue_pairs=queue_pairs, access=access)
               for path in sockets]
    servers += [VhostUserServer(path, switch.forward, client=True, queue_pairs=queue_pairs)
                for path in client_sockets]
    names = [server.port.name for server in servers]
    for server in servers:
        if not policy:
            server.port.policy = None
        if names.count(server.port.name) > 1:
            server.port.name = server.path
        switch.attach(server.port)
    return servers


async def _read_message(conn: trio.socket.SocketType) -> Message | None:
    """One vhost-user message with its fds, or None at end of stream."""
    data, ancdata, msg_flags, _ = await conn.recvmsg(
        HEADER_SIZE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % 4
            fds.extend(int.from_bytes(cdata[i : i + 4], "little") for i in range(0, usable, 4))
    try:
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError("message carried more fds than any request may (truncated)")
        if not data:
            return None
        while len(data) < HEADER_SIZE:
            more = await conn.recv(HEADER_SIZE - len(data))
            if not more:
                raise ProtocolError("connection closed inside a message header")
            data += more
        request, flags, size = parse_header(data)
        payload = b""
        while len(payload) < size:
            more = await conn.recv(size - len(payload))
            if not more:
                raise ProtocolError(f"connection closed inside {request_name(request)} payload")
            payload += more
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, payload, fds)
