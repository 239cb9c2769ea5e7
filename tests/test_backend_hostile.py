"""Containment in the Trio shell (virtio/backend.py), driven by the model front-end over real
unix sockets: a hostile guest or front-end, a switch that raises, a full fd table -- each
costs at most its own frame, ring or connection, never the server, the process or the
event loop."""

import logging
import os
import resource
import socket
import stat
import struct
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from netstack.frame import Frame
from tests.support.deadline import deadline
from tests.support.virtio_driver import (
    NET_HDR_LEN,
    GuestRam,
    Segment,
    VhostUserDisconnected,
    VhostUserFrontend,
)
from virtio.backend import VhostUserServer
from virtio.protocol import Message
from virtio.spec import FLAG_VERSION, MAX_FRAME, Request

# Each test runs over both ring walks, the Python reference and the native one.
pytestmark = pytest.mark.usefixtures("ring_walk")

MAC_A = bytes.fromhex("020000000001")
BROADCAST = b"\xff" * 6


def eth(n: int, size: int = 100) -> bytes:
    return BROADCAST + MAC_A + b"\x88\xb5" + bytes([n & 0xFF]) * (size - 14)


class Collector:
    """A switch stand-in: keeps every frame forwarded, raises on frames whose first payload
    byte is 0xEE (what a switch bug met by one malformed frame looks like)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def __call__(self, port, frames: list[Frame]) -> None:
        for frame in frames:
            if frame.data[14] == 0xEE:
                raise ValueError("the switch choked on this frame")
            self.frames.append(bytes(frame.data))

    async def wait_for(self, count: int) -> list[bytes]:
        with trio.fail_after(5):
            while len(self.frames) < count:
                await trio.sleep(0.005)
        return self.frames


async def receive(fe: VhostUserFrontend, count: int) -> list[bytes]:
    got: list[bytes] = []
    rx = fe.queues[0]
    with trio.fail_after(5):
        while True:
            got += [frame for _, frame in fe.net.receive()]
            if len(got) >= count:
                return got
            rx.set_used_event(rx.used_idx())  # as Linux does before sleeping: call me next
            got += [frame for _, frame in fe.net.receive()]
            if len(got) < count:
                await fe.wait_call(0)


@asynccontextmanager
async def served(tmp_path, forward=None):
    server = VhostUserServer(str(tmp_path / "vu.sock"), forward or Collector())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(server, ram_size=1 << 22):
    with GuestRam(ram_size) as ram:
        async with VhostUserFrontend.connect(server.path, ram) as fe:
            await trio.testing.wait_all_tasks_blocked()
            yield fe


async def test_a_forward_that_raises_counts_malformed_and_latches_nothing(tmp_path):
    collector = Collector()
    async with served(tmp_path, collector) as server, connected(server) as fe:
        fe.net.send([eth(0xEE)])
        fe.kick(1)
        await trio.testing.wait_all_tasks_blocked()
        fe.net.send([eth(1)])
        fe.kick(1)
        assert await collector.wait_for(1) == [eth(1)]
        assert server.port.device.broken is None
        assert server.port.counters.drops["malformed"] == 1


async def test_oversize_and_runt_tx_chains_are_dropped_and_the_port_goes_on(tmp_path):
    collector = Collector()
    async with served(tmp_path, collector) as server, connected(server, 32 << 20) as fe:
        tx = fe.queues[1]
        big = fe.ram.alloc(2 << 20)
        tx.add_segments([Segment(big, 2 << 20, False)] * 4)  # an 8 MiB "frame"
        tx.add_chain([b"\0" * (NET_HDR_LEN + 5)], [])
        tx.publish()
        fe.kick(1)
        fe.net.send([eth(2)])
        fe.kick(1)
        assert await collector.wait_for(1) == [eth(2)]
        assert server.port.device.broken is None
        assert dict(server.port.device.net.drops) == {"tx_oversize": 1, "tx_runt": 1}


async def test_a_frame_no_rx_ring_can_hold_does_not_stall_the_frames_behind_it(tmp_path):
    async with served(tmp_path) as server, connected(server) as fe:
        fe.net.post_rx(256, 128)  # the whole ring: 32 KiB of mergeable buffers
        fe.kick(0)
        await trio.testing.wait_all_tasks_blocked()
        server.port.deliver([Frame(eth(1, 60000)), Frame(eth(2))])
        assert await receive(fe, 1) == [eth(2)]
        assert server.port.device.net.drops["rx_ring_too_small"] == 1
        assert server.port.device.broken is None


async def test_a_ring_of_huge_indirect_tables_lets_other_tasks_run(tmp_path):
    collector = Collector()
    async with served(tmp_path, collector) as server, connected(server, 16 << 20) as fe:
        tx = fe.queues[1]
        buf = fe.ram.alloc(16)
        fe.ram.write(buf, bytes(16))  # the chain: a plain header, then a 16372-byte frame
        for _ in range(tx.size):  # 256 chains x 1024 indirect descriptors
            tx.add_segments([Segment(buf, 16, False)] * 1024, indirect=True)
        tx.publish()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0)
            fe.kick(1)
            await collector.wait_for(tx.size)
            nursery.cancel_scope.cancel()
        # The ring took over a hundred batches; the event loop ran other tasks in between.
        assert ticks >= 64
        assert server.port.device.broken is None


@pytest.mark.parametrize("wake", ["frames", "kick"])
async def test_a_ring_retired_while_its_task_wakes_does_not_break_the_device(tmp_path, wake):
    """testpmd's exit: frames or a kick wake the RX task, and SET_VRING_ENABLE(0) releases
    its ring before the task runs.  The test plays the control loop's two steps (handle,
    then _apply) at that instant; a woken task is not cancelled by them, and must not touch
    the released ring (it did: ValueError in avail_count, device latched broken)."""
    async with served(tmp_path) as server, connected(server) as fe:
        device = server.port.device

        def enable(on: bool) -> None:
            device.handle(Message(Request.SET_VRING_ENABLE, FLAG_VERSION,
                                  struct.pack("<II", 0, int(on))))
            server._apply(device)

        for round_ in range(24):  # a woken batch runs in either order: race each way
            await trio.testing.wait_all_tasks_blocked()
            if wake == "frames":  # the RX task waits for frames; this wakes it
                server.port.queue.clear()
                server.port.deliver([Frame(eth(round_))])
            else:  # the RX task has frames, no buffers, and waits for a kick
                if not server.port.queue:
                    server.port.deliver([Frame(eth(round_))])
                    await trio.testing.wait_all_tasks_blocked()
                fe.kick(0)
                await trio.sleep(0)  # the I/O poll after this wakes the RX task
            enable(False)
            await trio.testing.wait_all_tasks_blocked()
            assert device.broken is None
            enable(True)
        server.port.queue.clear()
        server.port.deliver([Frame(eth(99))])
        fe.net.post_rx(4)
        fe.kick(0)
        assert await receive(fe, 1) == [eth(99)]


async def test_a_retired_ring_is_released_only_once_its_task_has_stopped(tmp_path):
    """The root of the bug above: the device retires a ring (SET_VRING_ENABLE(0), as at
    testpmd's exit) under an RX task that frames already woke; the queue's views into guest
    memory stay valid until that task has run and ended, and are released then -- also when
    the task was just restarted on the same queue (a new call fd), so that the cancelled task
    and its replacement held the queue together and either ended first."""
    async with served(tmp_path) as server, connected(server) as fe:
        device = server.port.device

        def control(request: Request, payload: bytes, fds: list[int] | None = None) -> None:
            device.handle(Message(request, FLAG_VERSION, payload, fds or []))
            server._apply(device)

        for _ in range(8):  # Trio runs a batch in either order: each round is a new draw
            queue = device.vrings[0].queue
            control(Request.SET_VRING_CALL, struct.pack("<Q", 0),
                    [os.eventfd(0, os.EFD_NONBLOCK)])
            await trio.testing.wait_all_tasks_blocked()
            assert device.vrings[0].queue is queue
            server.port.deliver([Frame(eth(1))])  # the RX task is woken, has not run yet
            control(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 0))
            assert device.vrings[0].queue is None
            assert queue.avail_count() == 0  # still mapped: the woken task may look at it
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ValueError, match="released"):
                queue.avail_count()
            assert device.broken is None
            control(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
            await trio.testing.wait_all_tasks_blocked()
        assert fe.queues[0].size  # the front-end is still connected


async def test_the_socket_file_is_owner_only_whatever_the_umask(tmp_path):
    umask = os.umask(0)
    try:
        async with served(tmp_path) as server:
            assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    finally:
        os.umask(umask)


async def test_accept_survives_a_full_fd_table(tmp_path, caplog):
    async with served(tmp_path) as server:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        fillers = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
        try:
            with pytest.raises(OSError):
                while True:
                    fillers.append(os.dup(0))
            with caplog.at_level(logging.WARNING, logger="virtio.backend"):
                client.connect(server.path)  # queued in the backlog; accept() gets EMFILE
                await trio.sleep(0.3)
            assert "accept failed" in caplog.text
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # The server still serves: the queued connection gets its answer.
        with GuestRam(1 << 20) as ram:
            fe = VhostUserFrontend(trio.socket.from_stdlib_socket(client), ram)
            try:
                assert await fe.get_features()
            finally:
                fe.close()


async def test_a_guest_cannot_make_the_server_hold_more_than_max_frame_per_frame(tmp_path):
    collector = Collector()
    async with served(tmp_path, collector) as server, connected(server, 32 << 20) as fe:
        tx = fe.queues[1]
        big = fe.ram.alloc(MAX_FRAME + NET_HDR_LEN)
        fe.ram.write(big, bytes(NET_HDR_LEN) + eth(4, MAX_FRAME))
        tx.add_segments([Segment(big, MAX_FRAME + NET_HDR_LEN, False)])
        tx.add_segments([Segment(big, MAX_FRAME + NET_HDR_LEN + 1, False)])
        tx.publish()
        fe.kick(1)
        assert [len(f) for f in await collector.wait_for(1)] == [MAX_FRAME]
        await trio.testing.wait_all_tasks_blocked()
        assert server.port.device.net.drops["tx_oversize"] == 1


async def test_unexpected_message_after_a_bad_one_only_closes_that_connection(tmp_path):
    async with served(tmp_path) as server:
        async with connected(server) as fe:
            await fe.send_raw(b"\x05\x00\x00\x00\x01\x00\x00\x00\xff\xff\x00\x00")
            with pytest.raises((VhostUserDisconnected, ConnectionError)):  # EOF or reset
                await fe.request(Request.GET_FEATURES)
        async with connected(server) as fe:  # the server serves the next front-end
            assert await fe.get_features()


async def test_a_saturated_blocking_call_eventfd_does_not_stall_the_loop(tmp_path):
    # The front-end sets the call eventfd's counter to its maximum and never reads it: a
    # blocking write of the call would wait forever, and every guest with it.  The deadline
    # only turns such a hang into a failure.
    async with served(tmp_path) as server, connected(server) as fe:
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        os.eventfd_write(call, 0xFFFF_FFFF_FFFF_FFFE)
        os.set_blocking(call, True)
        try:
            with deadline(10):
                await fe.set_vring_call(1, call)  # the TX ring restarts: a call is written
                await trio.testing.wait_all_tasks_blocked()
                fe.net.send([eth(1)])  # and the TX ring still works
                fe.kick(1)
                assert await server.forward.wait_for(1) == [eth(1)]
                assert server.port.device.broken is None
        finally:
            os.set_blocking(call, False)
            os.close(call)


async def test_a_pipe_as_call_fd_closes_only_that_connection(tmp_path):
    async with served(tmp_path) as server:
        async with connected(server) as fe:
            r, w = os.pipe()
            try:
                await fe.set_vring_call(1, w)
                with pytest.raises((VhostUserDisconnected, ConnectionError)):  # EOF or reset
                    await fe.request(Request.GET_FEATURES)
            finally:
                os.close(r)
                os.close(w)
        async with connected(server) as fe:  # the server serves the next front-end
            assert await fe.get_features()
