"""tunnel/tls.py on a real socket pair with real TLS 1.3 (its fast path, SocketTransport): the
byte stream arrives whole and in order when the kernel pushes back (writes queued behind a
drain), and a closed stream stops.  Over memory streams, in virtual time: tests/test_link.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl

import pytest
import trio
import trio.testing

from tunnel.keys import client_ssl_context, generate_identity, server_ssl_context
from tunnel.tls import MAX_SOCKET_READ, SOCKET_READ, TLSStream
from virtio import dataloop


@pytest.fixture(scope="module")
def server_context(tmp_path_factory):
    return server_ssl_context(generate_identity(tmp_path_factory.mktemp("hub")))


async def connected_pair(server_context) -> tuple[TLSStream, TLSStream]:
    left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (left, right):  # small kernel buffers: every big send meets EAGAIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    server = TLSStream(trio.SocketStream(left), server_context, server_side=True)
    client = TLSStream(trio.SocketStream(right), client_ssl_context(), server_side=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    assert server.version() == client.version() == "TLSv1.3"
    return server, client


async def receive_exactly(stream: TLSStream, size: int) -> bytes:
    received = bytearray()
    with trio.fail_after(20):  # bytes lost on the way: fail, do not hang
        while len(received) < size:
            chunk = await stream.receive_some()
            assert chunk, "stream ended early"
            received += chunk
            # A slow reader: it reads again only once every sender waits for the kernel.
            await trio.testing.wait_all_tasks_blocked()
    return bytes(received)


async def test_two_senders_under_backpressure_keep_every_send_whole_and_in_order(
        server_context):
    server, client = await connected_pair(server_context)
    chunks = {name: [bytes([name]) * 64 + os.urandom(100_000) for _ in range(10)]
              for name in (1, 2)}
    total = sum(len(c) for cs in chunks.values() for c in cs)

    async def sender(name: int) -> None:
        for chunk in chunks[name]:
            await client.send_all(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, 1)
        nursery.start_soon(sender, 2)
        data = await receive_exactly(server, total)
    # Each send_all is whole (never interleaved with the other task's) and in its order.
    position = 0
    seen = {1: 0, 2: 0}
    while position < total:
        name = data[position]
        expected = chunks[name][seen[name]]
        assert data[position:position + len(expected)] == expected
        position += len(expected)
        seen[name] += 1
    assert seen == {1: 10, 2: 10}
    await client.aclose()
    assert await server.receive_some() == b""  # close_notify
    await server.aclose()


async def test_a_large_send_and_the_reverse_direction_at_once(server_context):
    server, client = await connected_pair(server_context)
    forward, backward = os.urandom(3 << 20), os.urandom(1 << 20)
    results = {}

    async def read(stream: TLSStream, size: int, key: str) -> None:
        results[key] = hashlib.sha256(await receive_exactly(stream, size)).digest()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, forward)
        nursery.start_soon(server.send_all, backward)
        nursery.start_soon(read, server, len(forward), "forward")
        nursery.start_soon(read, client, len(backward), "backward")
    assert results == {"forward": hashlib.sha256(forward).digest(),
                       "backward": hashlib.sha256(backward).digest()}
    await client.aclose()
    await server.aclose()


async def test_megabyte_reads_and_the_shared_buffers_keep_two_streams_apart(server_context):
    # The endpoint's streams read up to MAX_SOCKET_READ per call into the run's one buffer
    # and decrypt into its one plaintext buffer: two streams read in turn, with kernel
    # buffers big enough to hold more than a read, each gets its own bytes, whole.
    pairs = []
    for _ in range(2):
        left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (left, right):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        server = TLSStream(trio.SocketStream(left), server_context, server_side=True,
                           read_size=MAX_SOCKET_READ)
        client = TLSStream(trio.SocketStream(right), client_ssl_context(), server_side=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        pairs.append((server, client))
    sent = [os.urandom(3 << 20), os.urandom(3 << 20)]
    received = [bytearray(), bytearray()]

    async def send(index: int) -> None:
        await pairs[index][1].send_all(sent[index])

    async with trio.open_nursery() as nursery:
        for index in range(2):
            nursery.start_soon(send, index)
        with trio.fail_after(20):
            while any(len(r) < len(s) for r, s in zip(received, sent, strict=True)):
                for index, (server, _) in enumerate(pairs):
                    if len(received[index]) < len(sent[index]):
                        view = await server.receive_view()
                        assert view, "stream ended early"
                        received[index] += view
    assert [bytes(r) for r in received] == sent
    for server, client in pairs:
        await client.aclose()
        await server.aclose()


def test_a_read_size_past_the_shared_buffer_is_refused():
    left, right = socket.socketpair()
    with left, right, pytest.raises(ValueError, match="read_size"):
        TLSStream(trio.SocketStream(trio.socket.from_stdlib_socket(left)),
                  client_ssl_context(), server_side=False, read_size=MAX_SOCKET_READ + 1)


async def test_resize_reads_bounds_what_one_read_hands_openssl():
    """A listener reads a stranger's bytes SOCKET_READ at a time and an authenticated
    peer's MAX_SOCKET_READ (tunnel/direct_link.py): each read takes at most the size."""
    left, right = trio.socket.socketpair()
    with left, right:
        tls = TLSStream(trio.SocketStream(left), client_ssl_context(), server_side=False)
        pipe = tls._pipe
        sender = socket.socket(fileno=os.dup(right.fileno()))
        sender.setblocking(False)
        with sender:
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while sent < 3 * 1024 * 1024:
                    sent += sender.send(bytes(65536))
            incoming = ssl.MemoryBIO()
            await pipe.fill(incoming)
            assert 0 < incoming.pending <= SOCKET_READ == pipe.read_size
            tls.resize_reads(MAX_SOCKET_READ)
            reads = 0
            while incoming.pending < sent and reads < 64:
                before = incoming.pending
                await pipe.fill(incoming)
                assert incoming.pending - before <= MAX_SOCKET_READ
                reads += 1
            assert incoming.pending == sent
    with pytest.raises(ValueError, match="read_size"):
        tls.resize_reads(MAX_SOCKET_READ + 1)


async def test_a_closed_stream_refuses_to_send(server_context):
    server, client = await connected_pair(server_context)
    await client.transport.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"after close")
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()  # the peer vanished without a close_notify
    await server.aclose()


async def test_send_now_leaves_what_the_kernel_refused_for_flush_in_order(server_context):
    server, client = await connected_pair(server_context)
    small, big = os.urandom(1000), os.urandom(2 << 20)
    assert client.send_now(small) and not client.sending  # fits: the kernel took it all
    assert not client.send_now(big)  # 16 KiB socket buffers: most of it must wait
    assert client.sending and client.waiting_since <= trio.current_time()  # the stall clock
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.flush)
        data = await receive_exactly(server, len(small) + len(big))
    assert data == small + big and not client.sending and client.waiting_since is None
    await client.aclose()
    await server.aclose()


async def _refilled_drain(server_context) -> tuple[bytes, bytes, list[bool]]:
    """A send the kernel pushes back, then what `refill` gives while the drain runs: all of
    it arrives in order, and refill is asked from where the drain runs."""
    server, client = await connected_pair(server_context)
    first = b"first" + os.urandom(300_000)
    more = [bytes([n]) * 50_000 for n in range(1, 6)]
    pending = list(more)
    asked_in_a_task: list[bool] = []

    def refill() -> bytes | None:
        try:
            trio.lowlevel.current_task()
            asked_in_a_task.append(True)
        except RuntimeError:
            asked_in_a_task.append(False)
        return pending.pop(0) if pending else None

    client.refill = refill
    expected = first + b"".join(more)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, first)
        received = await receive_exactly(server, len(expected))
    return received, expected, asked_in_a_task


@pytest.mark.parametrize("on_the_loop", [True, False], ids=["dataloop", "plain-trio"])
def test_a_drain_sends_what_refill_gives_once_the_unsent_bytes_are_out(server_context,
                                                                      on_the_loop):
    received, expected, asked_in_a_task = (dataloop.run if on_the_loop else trio.run)(
        _refilled_drain, server_context)
    assert received == expected
    # On the data loop refill is asked from its writable handler, outside any task (after
    # the drain's first, synchronous call); under plain Trio from the draining task.
    assert asked_in_a_task[-1] is not on_the_loop


async def test_drained_only_once_the_socket_and_openssl_hold_nothing(server_context):
    """A data-loop handler stops reading when `drained`: after a read that came short with
    every record decrypted, never while the socket or OpenSSL may hold more."""
    server, client = await connected_pair(server_context)
    assert client.send_now(b"ping")
    await trio.lowlevel.wait_readable(server.fileno())
    assert bytes(server.receive_view_nowait()) == b"ping"
    assert server.drained
    assert server.receive_view_nowait() is None  # what one more read would have found
    server.resize_reads(1024)  # a record of 5000 bytes takes five reads
    message = os.urandom(5000)
    assert client.send_now(message)
    await trio.lowlevel.wait_readable(server.fileno())
    received = bytearray()
    with trio.fail_after(5):
        while len(received) < len(message):
            view = server.receive_view_nowait()
            if view:
                received += view
            else:
                assert not server.drained  # the socket holds the rest of the record
    assert received == message and server.drained
    await client.aclose()
    await server.aclose()
