"""The data loop (virtio/dataloop.py) for real: a DataLoop runs each test's main task, and
socketpairs are its served fds.  A handler runs straight from epoll_wait without waking its
task; returning True or raising ends the serving (the task returns or raises); a cancel
unregisters the fd at once; a double serve is refused; an fd closed while served does not
hold its number; Trio's timers, events, threads and signals work; the main task's result
comes out of `run`; a flooded fd starves neither Trio nor the other fds.  And TLS on the
loop: what OpenSSL answers while reading (a KeyUpdate) goes out from the handler, in order
behind ciphertext that waits for a stalled kernel buffer."""

from __future__ import annotations

import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable

import pytest
import trio

from tests.support.tls_peer import request_key_update
from tunnel.keys import client_ssl_context, generate_identity, load_identity, server_ssl_context
from tunnel.tls import TLSStream
from virtio import dataloop
from virtio.dataloop import DataLoop, serve_readable


def socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def reader(sock: socket.socket, got: list[bytes], *, until: bytes | None = None,
           ) -> Callable[[], bool]:
    """A handler that reads what `sock` holds into `got`; True once `until` came."""
    def on_readable() -> bool:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        got.append(data)
        return until is not None and data.endswith(until)
    return on_readable


class TaskSteps(trio.abc.Instrument):
    """How many times Trio ran each task (a wake-up is a step)."""

    def __init__(self) -> None:
        self.steps: dict[trio.lowlevel.Task, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task] = self.steps.get(task, 0) + 1


def test_a_handler_runs_from_the_loop_while_its_task_stays_parked():
    a, b = socketpair()
    got: list[bytes] = []
    instrument = TaskSteps()

    async def main() -> int:
        trio.lowlevel.add_instrument(instrument)
        serving: list[trio.lowlevel.Task] = []

        async def serve() -> None:
            serving.append(trio.lowlevel.current_task())
            await serve_readable(a.fileno(), reader(a, got, until=b"end"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            for n in range(50):
                await trio.sleep(0.001)
                b.send(b"%d," % n)
            b.send(b"end")
        return instrument.steps[serving[0]]

    with a, b:
        steps = dataloop.run(main)
    assert b"".join(got).decode() == "".join(f"{n}," for n in range(50)) + "end"
    assert len(got) > 40  # each send met the handler on its own
    assert steps <= 3  # started, parked, ended: never woken for a read


def test_a_handler_that_returns_true_ends_the_serving_and_unregisters_the_fd():
    a, b = socketpair()
    loop = DataLoop()
    got: list[bytes] = []

    async def main() -> int:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_readable, a.fileno(), reader(a, got, until=b"stop"))
                await trio.sleep(0.01)
                assert loop.served == 1
                b.send(b"stop")
        return loop.served

    with a, b:
        assert loop.run(main) == 0
        b.send(b"later")  # nobody reads it now
    assert got == [b"stop"]


def test_a_handler_exception_is_raised_in_the_serving_task_with_its_traceback():
    a, b = socketpair()
    loop = DataLoop()

    def on_readable() -> bool:
        try:
            data = a.recv(100)
        except BlockingIOError:  # the first call, before anything came
            return False
        if data == b"boom":
            raise ValueError("the handler met bad input")
        return False

    async def main() -> tuple[ValueError, int]:
        async def send_later() -> None:
            await trio.sleep(0.01)
            b.send(b"boom")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_later)
            with pytest.raises(ValueError, match="bad input") as raised:
                await serve_readable(a.fileno(), on_readable)
        return raised.value, loop.served

    with a, b:
        exc, served = loop.run(main)
    frames = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
    assert "on_readable" in frames and frames[-1] == "on_readable"
    assert served == 0


def test_a_cancel_unregisters_the_fd_at_once_and_the_fd_can_be_served_again():
    a, b = socketpair()
    loop = DataLoop()
    first: list[bytes] = []
    second: list[bytes] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_readable, a.fileno(), reader(a, first))
                await trio.sleep(0.01)
                b.send(b"x")  # readable now, while the serving task is being cancelled:
                scope.cancel()  # its handler must not run again
        assert loop.served == 0
        await trio.sleep(0.01)
        with trio.fail_after(5):
            await serve_readable(a.fileno(), reader(a, second, until=b"x"))

    with a, b:
        loop.run(main)
    assert first == [] and second == [b"x"]


def test_a_second_serve_of_a_served_fd_is_refused_before_its_handler_reads():
    a, b = socketpair()
    first: list[bytes] = []
    second: list[bytes] = []

    async def main() -> None:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_readable, a.fileno(), reader(a, first, until=b"end"))
                await trio.sleep(0.01)
                b.send(b"for the first")
                with pytest.raises(trio.BusyResourceError):
                    await serve_readable(a.fileno(), reader(a, second))
                b.send(b" end")

    with a, b:
        dataloop.run(main)
    assert b"".join(first) == b"for the first end" and second == []


def _serving_until_closed(fd: int, handler, outcome: list[BaseException]):
    """A task serving `fd` that keeps the ClosedResourceError it ends with in `outcome`."""

    async def serve() -> None:
        try:
            await serve_readable(fd, handler)
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    return serve


def test_an_fd_closed_while_served_frees_its_number_and_its_task_hears_of_it():
    a, b = socketpair()
    old: list[bytes] = []
    new: list[bytes] = []

    async def main() -> None:
        outcome: list[BaseException] = []
        serve_old = _serving_until_closed(number, reader(a, old), outcome)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_old)
                await trio.sleep(0.01)
                c, d = socketpair()
                a.close()  # the rule broken: closed while served
                os.dup2(c.fileno(), number)  # the number handed out again, to c's socket
                with c, d, socket.socket(fileno=number) as e:
                    nursery.start_soon(serve_readable, number,
                                       reader(e, new, until=b"new one"))
                    await trio.sleep(0.01)
                    d.send(b"for the new one")
                    while not new:
                        await trio.sleep(0.01)  # a timer still fires: the loop goes on
        assert len(outcome) == 1 and f"fd {number}" in str(outcome[0])

    number = a.fileno()
    with b:
        dataloop.run(main)
    assert old == [] and new == [b"for the new one"]


def test_an_fd_closed_while_served_for_reading_ends_that_serving_when_served_for_writing():
    a, b = socketpair()
    old: list[bytes] = []
    writable_calls = 0

    def on_writable() -> bool:
        nonlocal writable_calls
        writable_calls += 1
        return writable_calls > 1

    async def main() -> list[BaseException]:
        outcome: list[BaseException] = []
        serve_old = _serving_until_closed(number, reader(a, old), outcome)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_old)
                await trio.sleep(0.01)
                c, d = socketpair()
                a.close()  # the rule broken: closed while served
                os.dup2(c.fileno(), number)
                with c, d, socket.socket(fileno=number):
                    d.send(b"readable, but not for the old handler")
                    await dataloop.serve_writable(number, on_writable)
                    await trio.sleep(0.01)
        return outcome

    number = a.fileno()
    with b:
        outcome = dataloop.run(main)
    assert len(outcome) == 1 and old == [] and writable_calls == 2


def test_a_handler_that_closes_its_fd_at_its_first_call_ends_the_serving():
    a, b = socketpair()

    def on_readable() -> bool:
        dataloop.notify_closing(a)
        a.close()
        return False

    async def main() -> None:
        with trio.fail_after(5), pytest.raises(trio.ClosedResourceError):
            await serve_readable(a.fileno(), on_readable)

    with b:
        dataloop.run(main)


def test_trio_timers_events_threads_and_signals_work_under_the_loop():
    a, b = socketpair()
    woken = trio.Event()

    def on_readable() -> bool:
        try:
            a.recv(100)
        except BlockingIOError:
            return False
        woken.set()  # from the handler, outside any task
        return False

    async def main() -> tuple[float, object, int]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_readable, a.fileno(), on_readable)
            started = trio.current_time()
            await trio.sleep(0.05)
            slept = trio.current_time() - started
            b.send(b"wake")
            with trio.fail_after(5):
                await woken.wait()
                answer = await trio.to_thread.run_sync(
                    lambda: (threading.current_thread() is not threading.main_thread(), 7))
                with trio.open_signal_receiver(signal.SIGHUP) as signals:
                    os.kill(os.getpid(), signal.SIGHUP)
                    signum = await signals.__anext__()
            nursery.cancel_scope.cancel()
        return slept, answer, signum

    with a, b:
        slept, answer, signum = dataloop.run(main)
    assert slept >= 0.05 and answer == (True, 7) and signum == signal.SIGHUP


def test_the_main_tasks_result_and_exception_come_out_of_run():
    async def answer(x: int) -> int:
        await trio.sleep(0)
        return x * 6

    async def fail() -> None:
        await trio.sleep(0)
        raise LookupError("from the main task")

    assert dataloop.run(answer, 7) == 42
    with pytest.raises(LookupError, match="from the main task"):
        dataloop.run(fail)


def test_a_run_inside_a_run_is_refused_and_leaves_no_fd_open():
    async def main() -> tuple[int, int]:
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(RuntimeError, match="inside a run"):
            dataloop.run(trio.sleep, 0)
        return before, len(os.listdir("/proc/self/fd"))

    before, after = dataloop.run(main)
    assert after == before


def test_sigint_ends_the_run_with_keyboard_interrupt_as_under_trio_run():
    async def main() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        await trio.sleep(5)

    with pytest.raises(KeyboardInterrupt):
        dataloop.run(main)


def test_a_flooded_fd_starves_neither_trios_timers_and_tasks_nor_another_fd():
    flood_a, flood_b = socketpair()
    quiet_a, quiet_b = socketpair()
    flood_b.send(b"x" * 4096)
    quiet: list[bytes] = []
    flood_calls = 0

    def on_flood() -> bool:  # never drains its fd: it is readable at every turn
        nonlocal flood_calls
        flood_calls += 1
        flood_a.recv(1, socket.MSG_PEEK)
        return False

    async def main() -> tuple[int, int]:
        ticks = checkpoints = 0

        async def timer() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.005)
                ticks += 1

        async def spinner() -> None:
            nonlocal checkpoints
            while True:
                await trio.sleep(0)
                checkpoints += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_readable, flood_a.fileno(), on_flood)
            nursery.start_soon(serve_readable, quiet_a.fileno(),
                               reader(quiet_a, quiet, until=b"19."))
            nursery.start_soon(timer)
            nursery.start_soon(spinner)
            with trio.fail_after(10):
                for n in range(20):
                    await trio.sleep(0.01)
                    quiet_b.send(b"%d." % n)
                while not b"".join(quiet).endswith(b"19."):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        return ticks, checkpoints

    with flood_a, flood_b, quiet_a, quiet_b:
        ticks, checkpoints = dataloop.run(main)
    assert b"".join(quiet) == b"".join(b"%d." % n for n in range(20))
    assert ticks >= 10 and checkpoints >= 100 and flood_calls >= 100


# -- TLS on the loop ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_context(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub")
    generate_identity(directory)
    return server_ssl_context(load_identity(directory))


async def tls_socket_pair(server_context, *, send_buffer: int | None = None,
                          ) -> tuple[TLSStream, TLSStream, socket.socket, socket.socket]:
    """Our side (the server) and the peer, TLS over a socketpair, after the handshake; and
    their sockets.  `send_buffer` shrinks our side's SO_SNDBUF (it stalls sooner)."""
    ours, theirs = socket.socketpair()
    if send_buffer is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
    server = TLSStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
                       server_context, server_side=True)
    peer = TLSStream(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)),
                     client_ssl_context(), server_side=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(peer.do_handshake)
    return server, peer, ours, theirs


def plaintext_reader(stream: TLSStream, got: list[bytes], until: bytes) -> Callable[[], bool]:
    """A handler like the link's: receive_view_nowait until `until` came."""
    def on_readable() -> bool:
        view = stream.receive_view_nowait()
        if view is None:
            return False
        got.append(bytes(view))
        return b"".join(got).endswith(until)
    return on_readable


async def key_updates_answered_while_reading(server: TLSStream, peer: TLSStream,
                                             fd: int, got: list[bytes]) -> None:
    """Make OpenSSL answer while our side reads: OpenSSL 3.0 keeps the answer to a peer's
    KeyUpdate for our next write, and writes it out as it reads the peer's next one."""
    for n in (1, 2):
        request_key_update(peer)
        await peer.send_all(b"after key update %d" % n)  # one write: a KeyUpdate, then data
        with trio.fail_after(5):
            await serve_readable(fd, plaintext_reader(server, got, b"key update %d" % n))


def test_what_openssl_answers_while_reading_goes_out_from_the_handler(server_context):
    async def main() -> tuple[list[bytes], int]:
        server, peer, ours, theirs = await tls_socket_pair(server_context)
        got: list[bytes] = []
        await key_updates_answered_while_reading(server, peer, ours.fileno(), got)
        with trio.fail_after(5):
            # We wrote nothing: what reaches the peer is OpenSSL's answer, sent by the handler.
            await trio.lowlevel.wait_readable(theirs)
        answered = len(theirs.recv(4096, socket.MSG_PEEK))
        await server.send_all(b"with the new keys")
        with trio.fail_after(5):
            assert await peer.receive_some() == b"with the new keys"
        await server.aclose()
        await peer.aclose()
        return got, answered

    got, answered = dataloop.run(main)
    assert b"".join(got) == b"after key update 1after key update 2"
    assert answered > 0 and not answered % 27  # KeyUpdate records: nothing else was sent


def test_an_answer_made_while_reading_waits_in_order_behind_a_stalled_send(server_context):
    big = os.urandom(1 << 20)

    async def main() -> bytes:
        server, peer, ours, theirs = await tls_socket_pair(server_context, send_buffer=4096)
        assert not server.send_now(big)  # the kernel took part: the rest waits, in order
        assert server.sending and not server.answer_waiting
        got: list[bytes] = []
        await key_updates_answered_while_reading(server, peer, ours.fileno(), got)
        assert server.answer_waiting  # the caller reads no more until it has flushed
        received = bytearray()

        async def read_everything() -> None:
            while not received.endswith(b"tail"):
                received.extend(await peer.receive_some())

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_everything)
                await server.flush()  # what waited, then the answer, then what follows
                assert not server.answer_waiting and server.waiting_since is None
                await server.send_all(b"tail")
        await server.aclose()
        await peer.aclose()
        return bytes(received)

    assert dataloop.run(main) == big + b"tail"


# -- a handler whose own work ends its serving ---------------------------------------------------


def _own_task_ender(sock: socket.socket, end, then: str) -> Callable[[], bool]:
    """A handler that, once data came, calls `end()` (which cancels or closes its own serving,
    as a link's abort does from inside its reader's handler) and then raises, returns True
    or returns False, as `then` says."""
    calls: list[int] = []

    def on_readable() -> bool:
        calls.append(1)
        try:
            sock.recv(100)
        except BlockingIOError:
            return False
        if len(calls) > 2:
            raise AssertionError("called again after its serving ended")
        end()
        if then == "raise":
            raise ValueError("raised after ending its own serving")
        return then == "true"

    return on_readable


def _serve_and_end_itself(how: str, then: str, *, early: bool = False) -> tuple[str, int]:
    """Serve a socketpair's end with `_own_task_ender` on a DataLoop, in a cancel scope that
    `how` = "cancel" cancels (or with `how` = "close", notify_closing of the fd); what the
    serving task met (its exception's type, or "returned"), and how many fds the loop serves
    after.  `early`: the data is there at the handler's first call (made from the task)."""
    a, b = socketpair()
    loop = DataLoop()

    async def main() -> tuple[str, int]:
        met = "Cancelled"  # unless the task met something else before its scope ended
        with trio.CancelScope() as scope:
            def end() -> None:
                if how == "cancel":
                    scope.cancel()
                else:
                    dataloop.notify_closing(a.fileno())

            async def send_later() -> None:
                if not early:
                    await trio.sleep(0.01)
                    b.send(b"go")

            if early:
                b.send(b"go")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_later)
                try:
                    with trio.fail_after(5):
                        await serve_readable(a.fileno(), _own_task_ender(a, end, then))
                    met = "returned"
                except (ValueError, trio.ClosedResourceError) as exc:
                    met = type(exc).__name__
        return met, loop.served

    with a, b:
        return loop.run(main)


@pytest.mark.parametrize("early", [False, True], ids=["from-the-loop", "first-call"])
@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_handler_that_ends_its_own_serving_and_then_raises_still_raises_in_its_task(
        how, early):
    assert _serve_and_end_itself(how, "raise", early=early) == ("ValueError", 0)


@pytest.mark.parametrize("early", [False, True], ids=["from-the-loop", "first-call"])
def test_a_handler_that_cancels_its_own_task_and_returns_leaves_it_cancelled_or_finished(
        early):
    assert _serve_and_end_itself("cancel", "false", early=early) == ("Cancelled", 0)
    assert _serve_and_end_itself("cancel", "true", early=early) == ("returned", 0)
    assert _serve_and_end_itself("close", "false", early=early) == ("ClosedResourceError", 0)


@pytest.mark.parametrize("on_the_loop", [True, False], ids=["dataloop", "plain-trio"])
def test_a_serving_started_in_a_cancelled_scope_raises_cancelled_before_its_handler_reads(
        on_the_loop):
    a, b = socketpair()
    got: list[bytes] = []

    async def main() -> bool:
        b.send(b"not to be read")
        with trio.CancelScope() as scope:
            scope.cancel()
            await serve_readable(a.fileno(), reader(a, got))
        return scope.cancelled_caught

    with a, b:
        caught = (dataloop.run if on_the_loop else trio.run)(main)
    assert caught and got == []


def test_a_handler_that_raises_at_its_first_call_leaves_the_fd_unserved():
    a, b = socketpair()
    loop = DataLoop()
    got: list[bytes] = []

    def broken() -> bool:
        raise ValueError("broken at once")

    async def main() -> int:
        with pytest.raises(ValueError, match="broken at once"):
            await serve_readable(a.fileno(), broken)
        served = loop.served
        b.send(b"x")
        with trio.fail_after(5):
            await serve_readable(a.fileno(), reader(a, got, until=b"x"))
        return served

    with a, b:
        assert loop.run(main) == 0
    assert got == [b"x"]


def test_more_ready_fds_than_one_epoll_wait_returns_are_all_served_and_trio_still_ticks():
    pairs = [socketpair() for _ in range(dataloop.MAX_EVENTS + 44)]
    got: list[list[bytes]] = [[] for _ in pairs]

    async def main() -> int:
        ticks = 0

        async def timer() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.001)
                ticks += 1

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(timer)
                async with trio.open_nursery() as servings:
                    for (a, _), into in zip(pairs, got, strict=True):
                        servings.start_soon(serve_readable, a.fileno(),
                                            reader(a, into, until=b"end"))
                    await trio.sleep(0.01)
                    for round_ in range(5):  # every fd readable at once, five times
                        for _, b in pairs:
                            b.send(b"%d," % round_)
                        await trio.sleep(0.002)
                    for _, b in pairs:
                        b.send(b"end")
                nursery.cancel_scope.cancel()
        return ticks

    try:
        ticks = dataloop.run(main)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert all(b"".join(each) == b"0,1,2,3,4,end" for each in got)
    assert ticks > 0
