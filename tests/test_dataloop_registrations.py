"""virtio/dataloop.py's epoll registrations, with real fds: what epoll_ctl calls a serving
costs (one to start it, one for an fd's second direction), and an fd closed while served
whose file another descriptor still holds open (a dup, a kick eventfd QEMU holds too): epoll
keeps such a registration under the old number, out of epoll_ctl's reach, and reports its
file's events; the loop drops it (a new epoll set), so they neither reach a new serving of
that number nor keep the loop awake."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable

import trio

from virtio import dataloop
from virtio.dataloop import DataLoop, serve_readable


class CountingEpoll:
    """The loop's epoll object, wrapped: which epoll_ctl calls the loop made (failed ones too)."""

    def __init__(self, epoll: select.epoll) -> None:
        self.epoll = epoll
        self.calls: list[tuple[str, int]] = []

    def register(self, fd: int, mask: int) -> None:
        self.calls.append(("add", fd))
        self.epoll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.calls.append(("mod", fd))
        self.epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self.calls.append(("del", fd))
        self.epoll.unregister(fd)

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        return self.epoll.poll(timeout, maxevents)

    def fileno(self) -> int:
        return self.epoll.fileno()

    def close(self) -> None:
        self.epoll.close()


def socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_a_serving_costs_one_epoll_ctl_to_start_and_one_for_the_fds_second_direction():
    a, b = socketpair()
    number = a.fileno()
    loop = DataLoop()
    epoll = loop._epoll = CountingEpoll(loop._epoll)
    steps: dict[str, list[tuple[str, int]]] = {}

    def ctl_calls_since(step: str) -> None:
        steps[step] = [call for call in epoll.calls if call[1] == number]
        epoll.calls.clear()

    async def main() -> None:
        got = bytearray()

        def on_readable() -> bool:
            try:
                got.extend(a.recv(100))
            except BlockingIOError:
                pass
            return got.endswith(b"end")

        writes = 0

        def on_writable() -> bool:
            nonlocal writes
            writes += 1
            return writes > 1

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_readable, a.fileno(), on_readable)
                await trio.sleep(0.01)
                ctl_calls_since("read")
                await dataloop.serve_writable(a.fileno(), on_writable)
                ctl_calls_since("write")
                b.send(b"end")
            ctl_calls_since("end")

    with a, b:
        loop.run(main)
    assert steps == {"read": [("add", number)],
                     "write": [("mod", number), ("mod", number)],  # both, then reading again
                     "end": [("del", number)]}


def registered_numbers(loop: DataLoop) -> set[int]:
    """The fd numbers the loop's epoll set holds, as the kernel lists them."""
    with open(f"/proc/self/fdinfo/{loop._epoll.fileno()}") as info:
        return {int(line.split()[1]) for line in info if line.startswith("tfd:")}


def eventfd_reader(fd: int) -> Callable[[], bool]:
    def on_kick() -> bool:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        return False
    return on_kick


def test_a_served_fd_closed_while_another_descriptor_holds_its_file_does_not_haunt_its_number():
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    held = os.dup(kick)  # the file's other holder, as QEMU holds a kick eventfd it sent us
    number = kick
    loop = DataLoop()
    new_calls = 0

    async def main() -> tuple[list[BaseException], int]:
        nonlocal new_calls
        ended: list[BaseException] = []

        async def serve_old() -> None:
            try:
                await serve_readable(number, eventfd_reader(number))
            except trio.ClosedResourceError as exc:
                ended.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_old)
                await trio.sleep(0.01)
                c, d = socketpair()
                os.close(kick)  # the rule broken: closed while served, and its file lives on
                os.dup2(c.fileno(), number)  # the number handed out again, to c's socket
                with c, d, socket.socket(fileno=number) as e:
                    def on_new() -> bool:
                        nonlocal new_calls
                        new_calls += 1
                        try:
                            return e.recv(100) == b"end"
                        except BlockingIOError:
                            return False

                    async with trio.open_nursery() as new:
                        new.start_soon(serve_readable, number, on_new)
                        await trio.sleep(0.01)
                        before = new_calls
                        os.eventfd_write(held, 1)  # the old file is readable from now on
                        for _ in range(10):
                            await trio.sleep(0.005)
                        haunted = new_calls - before
                        d.send(b"end")  # the new serving still hears its own socket
        return ended, haunted

    try:
        ended, haunted = loop.run(main)
    finally:
        os.close(held)
    assert len(ended) == 1
    assert haunted == 0  # the old file's events never reached the new serving


def test_a_stale_registration_nobody_serves_is_dropped_and_does_not_keep_the_loop_awake():
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    held = os.dup(kick)
    number = kick
    loop = DataLoop()

    async def main() -> set[int]:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_readable, number, eventfd_reader(number))
                await trio.sleep(0.01)
                assert number in registered_numbers(loop)
                os.close(kick)  # the rule broken
                nursery.cancel_scope.cancel()  # the serving ends: the loop cannot unregister
            os.eventfd_write(held, 1)  # readable for good: a registration of it would fire
            await trio.sleep(0.01)  # at every epoll_wait, the loop never sleeping again
            return registered_numbers(loop)

    try:
        registered = loop.run(main)
    finally:
        os.close(held)
    assert number not in registered


async def close_served_with_no_fd_left(number: int, kick: int, fillers: list[int]) -> None:
    """Serve `number`, close `kick` while it is served (its file lives on as `number`: the
    rule broken) and end the serving with every fd used up (in `fillers`), so that the loop
    cannot renew its epoll set (a peer could do that to us); then free those fds."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_readable, number, eventfd_reader(number))
        await trio.sleep(0.01)
        os.close(kick)
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                break
        nursery.cancel_scope.cancel()
    await trio.sleep(0.01)
    while fillers:
        os.close(fillers.pop())


def test_a_renewal_without_a_free_fd_is_logged_and_the_loop_goes_on(caplog):
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    held = os.dup(kick)
    number = kick
    fillers: list[int] = []
    loop = DataLoop()

    async def main() -> str:
        with trio.fail_after(5):
            await close_served_with_no_fd_left(number, kick, fillers)
            a, b = socketpair()  # the loop still serves
            with a, b:
                b.send(b"still")
                got: list[bytes] = []

                def on_readable() -> bool:
                    got.append(a.recv(100))
                    return True

                await serve_readable(a.fileno(), on_readable)
            return got[0].decode()

    try:
        assert loop.run(main) == "still"
    finally:
        for fd in fillers:
            os.close(fd)
        os.close(held)
    assert "could not renew its epoll set" in caplog.text


def test_a_renewal_ends_a_serving_whose_number_now_names_a_file_it_did_not_register():
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    held = os.dup(kick)
    other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    loop = DataLoop()
    reads: list[int] = []

    def on_other() -> bool:  # it would read whatever file its number names
        try:
            reads.append(os.eventfd_read(other))
        except BlockingIOError:
            pass
        return False

    async def main() -> list[str]:
        ended: list[str] = []

        async def serve_other() -> None:
            try:
                await serve_readable(other, on_other)
            except trio.ClosedResourceError:
                ended.append("other")

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_other)
                async with trio.open_nursery() as kicks:
                    kicks.start_soon(serve_readable, kick, eventfd_reader(kick))
                    await trio.sleep(0.01)
                    c, d = socketpair()
                    with c, d:
                        os.dup2(c.fileno(), other)  # `other` replaced under its serving
                        os.close(kick)  # and the kick fd closed under its own:
                        kicks.cancel_scope.cancel()  # that serving's end renews the set
                        await trio.sleep(0.01)
                        os.eventfd_write(held, 1)
                        d.send(b"for whoever reads the number")
                        await trio.sleep(0.01)
                        os.close(other)
        return ended

    try:
        ended = loop.run(main)
    finally:
        os.close(held)
    assert ended == ["other"] and reads == []


def test_a_renewal_that_failed_is_retried_once_fds_are_free_and_the_stale_number_dropped(
        caplog):
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    held = os.dup(kick)
    number = kick
    fillers: list[int] = []
    loop = DataLoop()

    async def main() -> set[int]:
        with trio.fail_after(5):
            await close_served_with_no_fd_left(number, kick, fillers)
            # The stale registration fires at every epoll_wait from now on: a loop that
            # never renews again spins for good.
            os.eventfd_write(held, 1)
            while number in registered_numbers(loop):  # (trio.fail_after bounds the wait)
                await trio.sleep(0.01)
            return registered_numbers(loop)

    try:
        registered = loop.run(main)
    finally:
        for fd in fillers:
            os.close(fd)
        os.close(held)
    assert "could not renew its epoll set" in caplog.text
    assert number not in registered
