"""virtio/dataloop.py's `serve_writable` (a send the kernel did not take finishes from the
loop's handler, alone or beside a reader of the same fd, on a real DataLoop and under plain
Trio: the same handler either way), and VHOSTVPN_LOOP's choice of loop."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import trio

from virtio import dataloop

PAYLOAD = bytes(range(256)) * 16384  # 4 MiB: far more than a socketpair's buffers hold


def _pair() -> tuple[socket.socket, socket.socket]:
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)
    return left, right


def _sending(sock: socket.socket, payload: bytes) -> Callable[[], bool]:
    """A writable handler sending `payload` on `sock`: True once all of it is out."""
    pending = memoryview(payload)

    def on_writable() -> bool:
        nonlocal pending
        try:
            pending = pending[sock.send(pending):]
        except BlockingIOError:
            pass
        return not pending

    return on_writable


async def _send_and_drain(served_calls: list[str]) -> bytes:
    """Send PAYLOAD on one end with serve_writable while a task reads the other end slowly;
    what arrived."""
    sender, receiver = _pair()
    send_rest = _sending(sender, PAYLOAD)

    def on_writable() -> bool:
        served_calls.append("write")
        return send_rest()

    received = bytearray()

    async def drain() -> None:
        while len(received) < len(PAYLOAD):
            await trio.lowlevel.wait_readable(receiver)
            try:
                received.extend(receiver.recv(65536))
            except BlockingIOError:
                continue
            await trio.sleep(0)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await dataloop.serve_writable(sender.fileno(), on_writable)
    sender.close()
    receiver.close()
    return bytes(received)


@pytest.mark.parametrize("on_the_loop", [True, False], ids=["dataloop", "plain-trio"])
def test_a_send_the_kernel_pushed_back_on_finishes_from_the_writable_handler(on_the_loop):
    calls: list[str] = []
    run = dataloop.run if on_the_loop else trio.run
    assert run(_send_and_drain, calls) == PAYLOAD
    assert len(calls) > 1  # the kernel pushed back at least once: the handler ran again


async def _reader_and_writer_on_one_fd() -> tuple[bytes, bytes]:
    """One end served for reading (echoing what it reads into a buffer) and, while that
    runs, for writing a large send; after the writer is done the reader still works."""
    near, far = _pair()
    heard = bytearray()
    def on_readable() -> bool:
        try:
            data = near.recv(65536)
        except BlockingIOError:
            return False
        heard.extend(data)
        return data.endswith(b"end")

    on_writable = _sending(near, PAYLOAD)

    got = bytearray()
    with trio.fail_after(10):
        await _serve_both(near, far, on_readable, on_writable, got)
    near.close()
    far.close()
    return bytes(heard), bytes(got)


async def _serve_both(near, far, on_readable, on_writable, got) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dataloop.serve_readable, near.fileno(), on_readable)

        async def far_side() -> None:
            far.send(b"before ")
            while len(got) < len(PAYLOAD):
                await trio.lowlevel.wait_readable(far)
                try:
                    got.extend(far.recv(65536))
                except BlockingIOError:
                    pass

        nursery.start_soon(far_side)
        await dataloop.serve_writable(near.fileno(), on_writable)
        await trio.sleep(0.05)
        far.send(b"after end")  # the reader's direction is still asked for


def test_a_reader_and_a_writer_share_one_fd_and_the_reader_outlives_the_writer():
    heard, got = dataloop.run(_reader_and_writer_on_one_fd)
    assert got == PAYLOAD
    assert heard == b"before after end"


async def _two_writers() -> None:
    near, far = _pair()
    while True:  # fill the buffers: the fd is not writable while the test runs
        try:
            near.send(PAYLOAD)
        except BlockingIOError:
            break
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dataloop.serve_writable, near.fileno(), lambda: False)
        await trio.sleep(0.01)
        try:
            with pytest.raises(trio.BusyResourceError):
                await dataloop.serve_writable(near.fileno(), lambda: False)
        finally:
            nursery.cancel_scope.cancel()
    near.close()
    far.close()


def test_a_second_writer_of_one_fd_is_refused():
    dataloop.run(_two_writers)


async def _handler_runs_in_a_task() -> bool:
    """Whether a handler ran inside the serving task (plain Trio) or straight from the
    loop's epoll_wait, outside any task (the data loop)."""
    left, right = _pair()
    in_task: list[bool] = []

    def on_readable() -> bool:
        try:
            trio.lowlevel.current_task()
            in_task.append(True)
        except RuntimeError:
            in_task.append(False)
        try:
            return left.recv(10) == b"x"
        except BlockingIOError:
            return False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dataloop.serve_readable, left.fileno(), on_readable)
        await trio.sleep(0.01)
        right.send(b"x")
    left.close()
    right.close()
    return in_task[-1]


def test_vhostvpn_loop_trio_runs_plain_trio_and_anything_else_the_data_loop(monkeypatch, caplog):
    monkeypatch.setenv("VHOSTVPN_LOOP", "trio")
    assert dataloop.run(_handler_runs_in_a_task)
    monkeypatch.setenv("VHOSTVPN_LOOP", "dataloop")
    assert not dataloop.run(_handler_runs_in_a_task)
    monkeypatch.setenv("VHOSTVPN_LOOP", "uvloop")
    assert not dataloop.run(_handler_runs_in_a_task)
    assert "VHOSTVPN_LOOP='uvloop' is none of dataloop|trio" in caplog.text
