"""The data loop: each daemon's event loop, which serves the data path's fds itself and runs
Trio as its guest for everything else (handshakes, timers, control, status, threads).

Why: a packet that wakes a Trio task pays Trio's scheduler pass, and after an idle sleep that
pass runs cold: about 140 µs a visit on the development machine, 0.4-0.6 ms a ping round trip
(bench/python_floor.py: a relay under Trio 1.5-2.1x wireguard-go's idle ping, the same relay
on a raw epoll loop 1.0-1.2x, and the same relay on this loop 1.1x).

How: `run(async_fn, *args)` starts Trio with `trio.lowlevel.start_guest_run`. Trio's waits
for its own fds and timers happen in its I/O thread; its task batches run here, on this
thread, between data events, so no object is ever touched by two threads. A task hands an fd
to the loop with `await serve_readable(fd, on_readable)` (or `serve_writable`): the loop
calls `on_readable()` straight from `epoll_wait` whenever the fd is readable
(level-triggered), until it returns True or raises; then the task resumes (raising what the
handler raised, even when the handler's own work cancelled that task or closed the fd before
it raised: the task resumes after the call). Under a plain `trio.run` (the unit tests, a
library caller) the same call loops on `trio.lowlevel.wait_readable`, so the handlers are the
same code either way.

Rules for a handler (`on_readable`), which runs outside any Trio task:
* it never awaits and opens no cancel scope; Trio's synchronous calls that need no current
  task are fine (`Event.set`, `CancelScope.cancel`, setting a `CancelScope.deadline` (the
  rings' re-poll, the NAT's timer), `trio.current_time`, `Nursery.start_soon`): a task they
  wake makes Trio's guest tick run soon (`Runner.reschedule` forces the wake-up);
* it does a bounded amount of work per call (the fd stays readable, so the loop calls again
  after the other ready fds and Trio's pending batch had their turn), and tolerates a call
  that finds nothing (EAGAIN);
* it should finish its hop (read, switch, write) itself: a task it wakes is woken through
  Trio's I/O thread, which costs more than under plain Trio (a handler waking a task per
  event: 32 µs a round against 18 in a socketpair ping-pong here).  A send the kernel
  pushed back finishes from `serve_writable`'s handler for the same reason, the task
  waking once when all is out.  (bench/nat.py --loops dataloop,trio: with its TUN written
  inline, as a port's `on_ready` does, the NAT's sockets on the loop move as much as on
  Trio or more; with a task woken per batch to write the TUN, 20-30 % less.)
* the fd stays open while it is served: the task that serves it closes it after
  `serve_readable` returned or was cancelled (which unregisters it first), and anyone else
  calls `notify_closing(fd)` first (the serving task then raises ClosedResourceError, as a
  Trio waiter does after `trio.lowlevel.notify_closing`; if nobody did, the loop finds out
  when the fd's number is served again or it cannot unregister the fd, ends the old serving
  the same way, and renews its epoll set, which may hold the closed fd's file: `_renew`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_EVENTS = 256  # fds served per epoll_wait
# A loop yields its CPU (and the GIL) at least this often: Trio's I/O thread, back from its
# epoll_wait with a due timer or fd, needs the GIL, which a busy loop's thread holds most of
# the time; when that thread shares its CPU with another process, the I/O thread waited for
# the kernel to switch, a time slice (bench/dataloop_flood.py --hog: a 10 ms trio.sleep
# beside a flooded socketpair, 81 ticks/s, 2.0 ms late at p50; with the yield 89, 0.16 ms).
TRIO_TURN = 0.001
TURN_CHECK = 64  # ready fds between two looks at the clock (a clock read costs 0.17 µs here)
# A renewal of the epoll set that failed (EMFILE, ENOMEM) is tried again this long after, at
# the loop's next look at the clock: the stale registration may keep it busy until then.
RENEW_RETRY_SECONDS = 0.1
# Which loop `run` starts: VHOSTVPN_LOOP=dataloop|trio, the data loop by default.
LOOP_ENV = "VHOSTVPN_LOOP"
LOOP_CHOICES = ("dataloop", "trio")
_CURRENT: trio.lowlevel.RunVar[DataLoop | None] = trio.lowlevel.RunVar("dataloop", default=None)


class DataLoop:
    """A raw epoll loop over the served fds, hosting one Trio run (`run`)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # Trio's thread wakes us
        self._epoll.register(self._wake, select.EPOLLIN)
        # What each served fd's handlers are, per direction (one fd may have both).
        self._readers: dict[int, _Served] = {}
        self._writers: dict[int, _Served] = {}
        self._calls: deque[Callable[[], object]] = deque()  # Trio's callbacks, in order
        self._stale: set[int] = set()  # served fds found closed: `_renew` is queued
        self._renew_failed_at: float | None = None  # the last renewal failed: retried then
        self._outcome: Any = None  # Trio's outcome.Outcome of the main task, once done

    @property
    def served(self) -> int:
        """How many fds the loop serves now."""
        return len(self._readers.keys() | self._writers.keys())

    def run(self, async_fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run `async_fn(*args)` as Trio's main task, serving fds until it returns; its
        result, or its exception raised here."""
        readers, writers, calls, wake = self._readers, self._writers, self._calls, self._wake
        clock, turn = time.monotonic, TRIO_TURN
        yield_at, unchecked = clock() + turn, TURN_CHECK
        try:
            trio.lowlevel.start_guest_run(  # refused inside a run: our fds are closed below
                self._main, async_fn, args,
                run_sync_soon_threadsafe=self._call_soon_threadsafe,
                run_sync_soon_not_threadsafe=self._calls.append,
                done_callback=self._done)
            while self._outcome is None:
                ready = self._epoll.poll(0 if calls else -1, MAX_EVENTS)
                for fd, events in ready:
                    # An error or hang-up wakes both directions: each handler meets it.
                    if events & _READ_EVENTS:
                        entry = readers.get(fd)
                        if entry is not None:
                            entry.fire()
                        elif fd == wake:
                            with contextlib.suppress(BlockingIOError):
                                os.eventfd_read(wake)
                    if events & _WRITE_EVENTS:
                        entry = writers.get(fd)
                        if entry is not None:
                            entry.fire()
                # Only the callbacks queued so far: a guest tick with more work queues the
                # next tick, which must wait for the fds' turn.
                for _ in range(len(calls)):
                    calls.popleft()()
                unchecked -= len(ready)
                if unchecked < 0:
                    unchecked = TURN_CHECK
                    if clock() > yield_at:
                        os.sched_yield()
                        yield_at = clock() + turn
                    if self._renew_failed_at is not None and (
                            clock() > self._renew_failed_at + RENEW_RETRY_SECONDS):
                        self._renew()
        finally:
            self._epoll.close()
            os.close(self._wake)
        return self._outcome.unwrap()

    async def _main(self, async_fn: Callable[..., Awaitable[T]], args: tuple[object, ...]) -> T:
        _CURRENT.set(self)
        return await async_fn(*args)

    def _done(self, result: Any) -> None:
        self._outcome = result

    def _call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        self._calls.append(fn)
        os.eventfd_write(self._wake, 1)

    async def serve(self, fd: int, handler: Callable[[], bool], writable: bool) -> None:
        """`serve_readable` (or `serve_writable`) on this loop."""
        table, other = (self._writers, self._readers) if writable else (
            self._readers, self._writers)
        if fd in table:
            self._end_if_closed(fd)
            if fd in table:  # refused before the handler's first call: what it reads is not
                raise trio.BusyResourceError(  # its own
                    f"fd {fd} is already served for {'writing' if writable else 'reading'}")
        if fd in other:  # served the other way already: one epoll_ctl asks for both
            try:
                self._epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT)
            except OSError:  # ENOENT: closed while served, a new file has the number
                self.closing(fd)
        if fd not in other:
            self._epoll.register(fd, select.EPOLLOUT if writable else select.EPOLLIN)
        served = _Served(self, fd, handler, table)
        table[fd] = served
        try:
            finished = handler()
        except BaseException:
            self._forget(served)
            raise
        if finished:
            self._forget(served)
        if table.get(fd) is served:  # not over at its first call (nor closed by it)
            served.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(served.abort)
        if served.failure is not None:
            raise served.failure

    def closing(self, fd: int) -> None:
        """`notify_closing` on this loop."""
        for table in (self._readers, self._writers):
            served = table.get(fd)
            if served is not None:
                served.finish(trio.ClosedResourceError(f"fd {fd} was closed while served"))

    def _mask(self, fd: int) -> int:
        """What `fd`'s handlers ask epoll for."""
        return (select.EPOLLIN if fd in self._readers else 0) | (
            select.EPOLLOUT if fd in self._writers else 0)

    def _end_if_closed(self, fd: int) -> None:
        """`fd`, which we serve, may have been closed without `notify_closing` (its number
        may be another file's now): if so, its servings end as `notify_closing` would have
        ended them.  epoll_ctl looks the number up: MOD fails unless the number still names
        the file we registered."""
        try:
            self._epoll.modify(fd, self._mask(fd))
        except OSError:  # ENOENT: a new file has the number; EBADF: none has
            self.closing(fd)

    def _forget(self, served: _Served) -> bool:
        """Stop serving `served` (False if it was not served any more)."""
        fd, table = served.fd, served.table
        if table.get(fd) is not served:
            return False
        del table[fd]
        mask = self._mask(fd)
        try:
            if mask:
                self._epoll.modify(fd, mask)
            else:
                self._epoll.unregister(fd)
        except OSError:  # closed while served: its registration may outlive it
            if not self._stale:
                self._calls.append(self._renew)
            self._stale.add(fd)
        return True

    def _renew(self) -> None:
        """Served fds were closed while served (the loop could not unregister them).  If
        another descriptor still holds such an fd's file open (a dup, a child, a kick eventfd
        QEMU holds too), epoll keeps its registration under the old number, where epoll_ctl
        cannot reach it (it looks the number up: a new file, or none), and reports that
        file's events as the number's: to a new serving of the number, or to nobody, level-
        triggered, so that epoll_wait never sleeps again.  A new epoll set drops it: the fds
        still served move over, once MOD on the old set proved each one's number still
        names the file we registered (those whose number does not end as closed)."""
        for fd in self._readers.keys() | self._writers.keys():
            self._end_if_closed(fd)  # (what ends here joins _stale: no second _renew queued)
        stale = ", ".join(map(str, sorted(self._stale)))
        renewed = None
        try:
            renewed = select.epoll()
            renewed.register(self._wake, select.EPOLLIN)
            for fd in self._readers.keys() | self._writers.keys():
                renewed.register(fd, self._mask(fd))
        except OSError as exc:  # EMFILE, ENOMEM: the old set stays; retried (_stale kept)
            if renewed is not None:
                renewed.close()
            retry = self._renew_failed_at is not None
            self._renew_failed_at = time.monotonic()
            if retry:
                return
            log.error("fd %s closed while served (no notify_closing first): the loop could "
                      "not renew its epoll set (%s): events of its file may still come", stale,
                      exc)
            return
        self._epoll.close()
        self._epoll = renewed
        self._stale.clear()
        self._renew_failed_at = None
        log.warning("fd %s closed while served (no notify_closing first): a new epoll set "
                    "drops any registration its file kept", stale)


_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class _Served:
    """One fd a task serves on the loop in one direction: its handler, its task (parked
    until the serving ends), and how the serving ended."""

    __slots__ = ("calling", "cancel", "failure", "fd", "handler", "loop", "over", "table", "task")

    def __init__(self, loop: DataLoop, fd: int, handler: Callable[[], bool],
                 table: dict[int, _Served]) -> None:
        self.loop = loop
        self.fd = fd
        self.handler = handler
        self.table = table
        self.task: trio.lowlevel.Task | None = None
        self.failure: BaseException | None = None
        self.calling = False  # the loop is in the handler now
        self.over = False  # the serving ended during that call: the task resumes after it
        self.cancel: Callable[[], NoReturn] | None = None  # Trio's, if that was a cancel

    def fire(self) -> None:
        """The fd is ready: call the handler (from the loop).  What the handler's own work
        does to its serving (a close, a cancel of its task's scope) takes effect at once (it
        is not called again) but the task resumes when the call is over, so that what the
        call raised is raised in the task whatever else happened."""
        self.calling = True
        try:
            finished = self.handler()
        except BaseException as exc:  # the serving task raises it, where it belongs
            self.failure = exc
            finished = True
        self.calling = False
        if finished or self.over:
            self.loop._forget(self)
            if self.cancel is not None and not finished:
                try:
                    self.cancel()  # Trio's Cancelled (or KeyboardInterrupt), for the task
                except BaseException as exc:  # raised in the task
                    self.failure = exc
            trio.lowlevel.reschedule(self.task)

    def finish(self, failure: BaseException | None) -> None:
        """The serving is over (the handler said so or raised, or the fd is closing): the
        task resumes, once (not if it was cancelled first)."""
        if self.loop._forget(self):
            self.failure = failure
            if self.calling:
                self.over = True
            elif self.task is not None:
                trio.lowlevel.reschedule(self.task)

    def abort(self, raise_cancel: Callable[[], NoReturn]) -> trio.lowlevel.Abort:
        """The serving task is cancelled: the loop forgets the fd now, not at the task's
        next step, so the handler is not called again after the cancel (if the handler's own
        work cancelled it, the task resumes when the handler returns: `fire`)."""
        self.loop._forget(self)
        if self.calling:
            self.over = True
            self.cancel = raise_cancel
            return trio.lowlevel.Abort.FAILED
        return trio.lowlevel.Abort.SUCCEEDED


def run(async_fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """Run `async_fn(*args)` under a new DataLoop (what every daemon's main does), or under
    plain `trio.run` when VHOSTVPN_LOOP=trio says so (the escape hatch, and an A/B)."""
    wanted = os.environ.get(LOOP_ENV, "dataloop")
    if wanted not in LOOP_CHOICES:
        log.warning("%s=%r is none of %s; using the data loop", LOOP_ENV, wanted,
                    "|".join(LOOP_CHOICES))
        wanted = "dataloop"
    log.debug("event loop: %s", wanted)
    if wanted == "trio":
        return trio.run(async_fn, *args)
    return DataLoop().run(async_fn, *args)


async def serve_readable(fd: int, on_readable: Callable[[], bool]) -> None:
    """Call `on_readable()` now and then whenever `fd` is readable, until it returns True
    (or raises: raised here).  On a DataLoop straight from its epoll_wait, without waking
    this task; under plain Trio from this task.  Cancelling the caller stops the serving (a
    caller cancelled already raises Cancelled before the handler's first call)."""
    await _serve(fd, on_readable, writable=False)


async def serve_writable(fd: int, on_writable: Callable[[], bool]) -> None:
    """`serve_readable` for room to write: `on_writable()` now and then whenever `fd` is
    writable, until it returns True (the rest of a send goes out from the loop, and the
    task wakes once, when it is all out)."""
    await _serve(fd, on_writable, writable=True)


async def _serve(fd: int, handler: Callable[[], bool], *, writable: bool) -> None:
    await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller's handler reads nothing
    loop = _CURRENT.get()
    if loop is not None:
        await loop.serve(fd, handler, writable)
        return
    if handler():
        return
    wait = trio.lowlevel.wait_writable if writable else trio.lowlevel.wait_readable
    while True:
        await wait(fd)
        if handler():
            return


def notify_closing(fd: int | socket.socket) -> None:
    """`fd` (or a socket's) is about to be closed by someone other than the task serving
    it: that task (on the loop, or waiting in Trio) raises ClosedResourceError, and the loop
    forgets the fd before its number can be handed out again.  Call from Trio code or a
    handler."""
    number = fd if isinstance(fd, int) else fd.fileno()
    loop = _CURRENT.get()
    if loop is not None and number >= 0:
        loop.closing(number)
    trio.lowlevel.notify_closing(fd)
