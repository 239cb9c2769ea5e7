"""The TLS stream and the session links in virtual time: memory streams in place of sockets
(tests/support/memlink.py), trio's MockClock in place of the wall clock, and the real
constants (a 20 s stall takes no real time).  TLS over memory streams (handshake, batching,
a peer gone mid-record, a writer held up by a peer that stops reading); keepalives, dead-peer
detection, rekey timing, backpressure and the link's guard, through the hub's real listener
and real endpoints."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from netstack.frame import Frame
from tests.support.memlink import BROADCAST, MAC_E, MAC_H, MemoryNet, eth, frames_of, stream_pair
from tests.support.tunnel_client import RawPeer
from tunnel import endpoint as endpoint_module
from tunnel.keys import (
    check_server,
    client_ssl_context,
    generate_identity,
    load_identity,
    server_ssl_context,
)
from tunnel.session import (
    DEAD_SECONDS,
    DRAIN_SECONDS,
    KEEPALIVE_SECONDS,
    MAX_PENDING_CONTROL,
    SESSION_QUEUE_BYTES,
    SESSION_QUEUE_FRAMES,
    WRITE_STALL_SECONDS,
)
from tunnel.tls import TLSStream
from tunnel.wire import PING, PING_PAYLOAD, RECORD_HEADER, Frames, Ping, Pong

PING_RECORD = RECORD_HEADER.pack(PING, 0, 0, PING_PAYLOAD.size) + PING_PAYLOAD.pack(1, 2)


# -- TLS over memory streams ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_identity(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub")
    generate_identity(directory)
    return load_identity(directory)


async def tls_pair(identity, capacity: int = 1 << 20):
    """A server and a client TLSStream over a memory stream pair, after the handshake; and
    the pipe the client writes into."""
    left, right = stream_pair(capacity)
    server = TLSStream(left, server_ssl_context(identity), server_side=True)
    client = TLSStream(right, client_ssl_context(), server_side=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client, right.send_stream.pipe


async def test_tls_over_a_memory_stream_is_tls13_and_shows_the_servers_certificate(
        hub_identity):
    server, client, _ = await tls_pair(hub_identity)
    assert server.version() == client.version() == "TLSv1.3"
    check_server(client, hub_identity.fingerprint_bytes)  # raises if it is not the hub's key
    await client.send_all(b"hello")
    assert await server.receive_some() == b"hello"
    await client.aclose()
    assert await server.receive_some() == b""  # close_notify, then the end


async def test_a_batch_of_records_leaves_in_one_write_and_arrives_in_one_receive(hub_identity):
    server, client, pipe = await tls_pair(hub_identity)
    writes = len(pipe.writes)
    batch = bytes(range(256)) * 400  # 100 KiB: seven TLS records
    await client.send_all(batch)
    assert len(pipe.writes) == writes + 1 and pipe.writes[-1] > len(batch)
    assert await server.receive_some() == batch  # every record's plaintext at once


async def test_a_peer_gone_mid_record_gives_the_whole_records_then_a_broken_stream(
        hub_identity):
    server, client, pipe = await tls_pair(hub_identity)
    await client.send_all(b"whole record")
    await client.send_all(b"x" * 1000)
    assert pipe.writes[-1] > 1000
    del pipe.buffer[-pipe.writes[-1] // 2:]  # the network loses the second record's tail
    await client.transport.send_stream.aclose()  # and the connection ends, no close_notify
    assert await server.receive_some() == b"whole record"
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()


async def test_a_writer_waits_for_a_peer_that_stops_reading_and_its_stall_clock_runs(
        hub_identity, autojump_clock):
    server, client, pipe = await tls_pair(hub_identity, capacity=16384)
    data = bytes(200_000)
    assert not client.send_now(data)  # the pipe takes nothing without a wait
    assert client.sending and client.waiting_since == trio.current_time()
    stalled_at = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.flush)
        await trio.sleep(30)  # nobody reads: the flush waits, the stall clock runs
        assert client.sending and client.waiting_since == stalled_at
        received = bytearray()
        while len(received) < len(data):
            received += await server.receive_some()
    assert received == data and not client.sending and client.waiting_since is None


# -- links through the hub's listener ----------------------------------------------------------


async def answer_pings(peer: RawPeer, times: list[float]) -> None:
    """Read everything; answer each PING with its PONG, noting when it came."""
    while True:
        data = await peer.tls.receive_some(1 << 16)
        if not data:
            return
        peer.wire.receive_data(data)
        for event in peer.wire.next_events():
            if isinstance(event, Ping):
                times.append(trio.current_time())
                await peer.tls.send_all(peer.wire.send_pong(event.nonce, event.timestamp_ns))


async def test_an_idle_link_pings_its_peer_every_keepalive_interval(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        peer = await net.raw_peer("alice")
        start = trio.current_time()
        pings: list[float] = []
        net.nursery.start_soon(answer_pings, peer, pings)
        await trio.sleep(4 * KEEPALIVE_SECONDS + 1)
        assert pings == [start + n * KEEPALIVE_SECONDS for n in (1, 2, 3, 4)]
        port = net.listener.sessions["alice"]
        assert port.active is not None and port.rtt_ms is not None  # the PONGs were timed


async def test_a_peer_silent_for_dead_seconds_is_cut_and_only_its_link(tmp_path,
                                                                       autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        endpoint = await net.endpoint("alice")  # talks: PINGs and PONGs
        net.listener.reload()
        bob = await net.raw_peer("bob", address="192.0.2.2")  # reads, never says a word
        start = trio.current_time()
        closed_at: list[float] = []

        async def read_bob() -> None:
            await bob.read_until_closed(3600)
            closed_at.append(trio.current_time())

        net.nursery.start_soon(read_bob)
        # The keepalive task looks every KEEPALIVE_SECONDS: the first look after more than
        # DEAD_SECONDS of silence closes the link.
        await trio.sleep(DEAD_SECONDS + 0.5)
        assert net.listener.sessions["bob"].active is not None and not closed_at
        await trio.sleep(KEEPALIVE_SECONDS)
        assert closed_at == [start + DEAD_SECONDS + KEEPALIVE_SECONDS]
        assert net.listener.links_ended == {"dead": 1}
        assert net.listener.sessions["bob"].active is None
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith("bob: nothing heard for")
        await trio.sleep(10 * DEAD_SECONDS)  # alice's link, which talks, lives on
        assert net.listener.sessions["alice"].connections == 1
        assert endpoint.uplink.active is not None and endpoint.reconnects == 0


async def test_the_endpoint_rekeys_once_the_configured_time_has_passed(tmp_path,
                                                                       autojump_clock):
    async with MemoryNet(tmp_path) as net:
        endpoint = await net.endpoint("alice", rekey_seconds=120)
        first = endpoint.uplink.active
        await trio.sleep(119.5)
        assert endpoint.uplink.active is first and endpoint.rekeys == 0
        await trio.sleep(1)  # the endpoint looks once a second
        assert endpoint.uplink.active is not first and endpoint.rekeys == 1
        await trio.testing.wait_all_tasks_blocked()
        hub_side = net.listener.sessions["alice"]
        assert hub_side.connections == 2 and len(hub_side.links) == 1  # the old one closed
        assert first.port.links == [endpoint.uplink.active]


@pytest.mark.parametrize("direction", ["sent", "received"])
async def test_the_endpoint_rekeys_once_either_directions_key_carried_its_records(
        tmp_path, autojump_clock, monkeypatch, direction):
    monkeypatch.setattr(endpoint_module, "REKEY_RECORDS", 200)
    async with MemoryNet(tmp_path) as net:
        endpoint = await net.endpoint("alice")
        sender = net.local_port(endpoint.switch if direction == "sent" else net.switch)
        switch = endpoint.switch if direction == "sent" else net.switch
        first = endpoint.uplink.active
        counters = getattr(first.wire, direction)

        async def send_records(count: int) -> None:
            for n in range(count):  # one FRAMES record each
                switch.forward(sender, [Frame(eth(BROADCAST, MAC_E, n))])
                await trio.testing.wait_all_tasks_blocked()

        await send_records(200 - 10 - counters.records)
        await trio.sleep(3)
        assert endpoint.rekeys == 0
        await send_records(10)
        assert endpoint_module.records_on_key(first.wire) >= 200
        await trio.sleep(1.5)  # the endpoint looks once a second
        assert endpoint.rekeys == 1 and endpoint.uplink.active is not first


async def test_a_rekey_loses_no_frame_sent_either_way_while_the_links_change_over(
        tmp_path, autojump_clock):
    """Make before break: the endpoint's old link stops sending but reads until the hub's
    CLOSE; the hub's, retired once the new one is active, reads until the endpoint closes
    too.  Frames sent both ways at every step of the change all arrive, once each (not
    always in order: each link has its own reader, so the last frames on the old link and
    the first on the new one may swap)."""
    async with MemoryNet(tmp_path) as net:
        endpoint = await net.endpoint("alice", rekey_seconds=10)
        hub_port = net.local_port(net.switch, "h")
        guest = net.local_port(endpoint.switch, "e")
        first = endpoint.uplink.active
        await trio.sleep(10 - (trio.current_time() - first.started))  # the rekey's moment
        down, up = [], []
        for n in range(400):  # a batch each way at every scheduling step of the rekey
            down.append(eth(BROADCAST, MAC_H, n))
            up.append(eth(BROADCAST, MAC_E, n))
            net.switch.forward(hub_port, [Frame(down[-1])])
            endpoint.switch.forward(guest, [Frame(up[-1])])
            await trio.lowlevel.checkpoint()
            if n == 0:
                assert endpoint.uplink.active is first  # the change began after this
        assert endpoint.uplink.active is not first and endpoint.rekeys == 1
        await trio.sleep(1)
        assert sorted(frames_of(guest)) == down and sorted(frames_of(hub_port)) == up
        assert not guest.counters.drops and not hub_port.counters.drops
        hub_side = net.listener.sessions["alice"]
        assert hub_side.connections == 2 and len(hub_side.links) == 1


async def test_a_superseded_link_forwards_what_its_peer_sent_before_it_saw_the_close(
        tmp_path, autojump_clock, caplog):
    """A reconnect takes the session over: the old link sends CLOSE and stops taking frames,
    but reads on, so frames its peer sent in the meantime are not lost; it ends when its
    peer closes."""
    async with MemoryNet(tmp_path) as net:
        local = net.local_port(net.switch, "h")
        old = await net.raw_peer("alice")
        await net.raw_peer("alice")  # the same key again: this link takes over
        port = net.listener.sessions["alice"]
        assert port.connections == 2 and len(port.links) == 2
        frames = [eth(BROADCAST, MAC_E, n) for n in range(3)]
        await old.tls.send_all(old.wire.send_frames([Frame(f) for f in frames])
                               + old.wire.send_ping(7, 0))  # answered no more: it said CLOSE
        await trio.testing.wait_all_tasks_blocked()
        assert frames_of(local) == frames
        old.wire.receive_data(await old.tls.receive_some(1 << 16))
        [closed] = old.wire.next_events()
        assert closed.reason == "superseded"
        await old.tls.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert len(port.links) == 1 and net.listener.links_ended == {"peer_closed": 1}
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_superseded_link_whose_peer_never_closes_is_cut_after_the_drain_time(
        tmp_path, autojump_clock, caplog):
    """Its keepalive tick falls while it drains: it sends no PING after its CLOSE."""
    async with MemoryNet(tmp_path) as net:
        old = await net.raw_peer("alice")
        await trio.sleep(KEEPALIVE_SECONDS / 2)
        await net.raw_peer("alice")
        start = trio.current_time()
        assert await old.read_until_closed(DRAIN_SECONDS + 1)
        assert trio.current_time() == start + DRAIN_SECONDS
        await trio.testing.wait_all_tasks_blocked()
        assert net.listener.links_ended == {"closed": 1}
        assert len(net.listener.sessions["alice"].links) == 1
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_peer_that_never_reads_blocks_the_writer_fills_the_queue_to_its_byte_bound_and_is_cut(  # noqa: E501
        tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    async with MemoryNet(tmp_path) as net:
        peer = await net.raw_peer("alice", capacity=65536)  # reads nothing, ever
        port = net.listener.sessions["alice"]
        link = port.active
        local = net.local_port(net.switch, "h")
        start = trio.current_time()

        async def keep_talking() -> None:  # alive (PINGs), so only the stall can cut it
            try:
                while True:
                    await peer.tls.send_all(PING_RECORD)
                    await trio.sleep(1)
            except trio.BrokenResourceError:
                pass

        net.nursery.start_soon(keep_talking)
        big = 60_000  # 8 MiB of them before the 2048-frame bound
        for n in range(SESSION_QUEUE_BYTES // big + 10):
            net.switch.forward(local, [Frame(eth(BROADCAST, MAC_H, n, big))])
            await trio.testing.wait_all_tasks_blocked()
        assert link.stream.sending and link.stream.waiting_since == start  # the writer waits
        assert SESSION_QUEUE_BYTES - big < port.queued_bytes <= SESSION_QUEUE_BYTES
        dropped = port.counters.drops["queue_full"]
        assert dropped > 0
        net.switch.forward(local, [Frame(eth(BROADCAST, MAC_H, 0, big))])
        assert port.counters.drops["queue_full"] == dropped + 1
        # The keepalive task looks every KEEPALIVE_SECONDS: the first look after more than
        # WRITE_STALL_SECONDS without progress cuts the link.
        await trio.sleep(WRITE_STALL_SECONDS - 0.5)
        assert port.active is link
        queued = len(port.queue)
        await trio.sleep(KEEPALIVE_SECONDS + 1)
        assert port.active is None and net.listener.links_ended == {"peer_not_reading": 1}
        assert port.counters.drops["link_down"] == queued  # what it held is counted lost
        assert any(r.getMessage().startswith("alice: peer not reading") for r in caplog.records)


async def test_an_idle_link_sends_a_batch_at_once_and_one_past_the_queues_bound_is_cut_to_it(
        tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        await net.raw_peer("alice")
        port = net.listener.sessions["alice"]
        link = port.active
        local = net.local_port(net.switch, "h")
        await trio.testing.wait_all_tasks_blocked()
        assert not port.queue and not link.stream.sending
        net.switch.forward(local, [Frame(eth(BROADCAST, MAC_H, n, 100)) for n in range(3)])
        assert not port.queue and port.counters.out_frames == 3  # encoded, in the stream
        await trio.testing.wait_all_tasks_blocked()
        assert not link.stream.sending  # the writer flushed it
        too_many = SESSION_QUEUE_FRAMES + 5
        net.switch.forward(local, [Frame(eth(BROADCAST, MAC_H, n, 100)) for n in range(too_many)])
        assert port.counters.drops["queue_full"] == 5  # as a busy link's queue would
        assert port.counters.out_frames == 3 + SESSION_QUEUE_FRAMES


async def test_a_peer_that_floods_pings_and_never_reads_is_bounded_and_closed(tmp_path,
                                                                              autojump_clock):
    async with MemoryNet(tmp_path) as net:
        attacker = await net.raw_peer("alice", capacity=4096)
        port = net.listener.sessions["alice"]
        link = port.active
        most_pending = 0
        with trio.fail_after(WRITE_STALL_SECONDS + 2 * KEEPALIVE_SECONDS):
            try:
                while True:
                    await attacker.tls.send_all(PING_RECORD * 200)
                    await trio.testing.wait_all_tasks_blocked()
                    most_pending = max(most_pending, len(link._control))
                    await trio.sleep(0.1)
            except trio.BrokenResourceError:
                pass  # the hub closed the link
        assert net.listener.links_ended == {"peer_not_reading": 1}
        assert port.control_dropped > 0 and most_pending == MAX_PENDING_CONTROL


async def test_an_exception_in_one_sessions_forward_closes_only_that_link(tmp_path,
                                                                         autojump_clock,
                                                                         caplog):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        forward = net.switch.forward

        def forward_failing_for_bob(port, frames):
            if port.name == "bob":
                raise RuntimeError("a bug in the switch, met by bob's frames")
            forward(port, frames)

        net.switch.forward = forward_failing_for_bob
        local = net.local_port(net.switch, "h")
        alice = await net.raw_peer("alice")
        bob = await net.raw_peer("bob", address="192.0.2.2")
        await bob.tls.send_all(bob.wire.send_frames([Frame(eth(BROADCAST, MAC_E, 1))]))
        assert await bob.read_until_closed(1), "bob's link was not closed"
        await trio.testing.wait_all_tasks_blocked()  # the listener counts once it is closed
        assert net.listener.links_ended == {"internal_error": 1}
        assert net.listener.sessions["bob"].active is None
        assert sum("a bug in the switch" in r.exc_text for r in caplog.records
                   if r.exc_text) == 1  # the traceback, logged once
        frames = [eth(BROADCAST, MAC_E, n) for n in range(5)]
        await alice.tls.send_all(alice.wire.send_frames([Frame(f) for f in frames]))
        await trio.testing.wait_all_tasks_blocked()
        assert frames_of(local) == frames
        assert net.listener.sessions["alice"].active is not None


async def test_a_ping_right_before_a_protocol_error_closes_only_that_link(tmp_path,
                                                                         autojump_clock):
    """The codec hands over the events decoded before a violation: the PING among them must
    not be answered (the codec refuses to), and the error must end the link at once."""
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        endpoint = await net.endpoint("alice")
        net.listener.reload()
        bob = await net.raw_peer("bob", address="192.0.2.2")
        bad_header = RECORD_HEADER.pack(PING, 1, 0, PING_PAYLOAD.size) + bytes(16)
        await bob.tls.send_all(PING_RECORD + bad_header)
        assert await bob.read_until_closed(1), "bob's link was not closed"
        await trio.testing.wait_all_tasks_blocked()  # the listener counts once it is closed
        assert net.listener.links_ended == {"protocol_error": 1}
        assert endpoint.uplink.active is not None
        assert net.listener.sessions["alice"].active is not None


async def test_a_batch_delivered_while_a_pong_waits_is_queued_and_sent_after_it(
        tmp_path, autojump_clock):
    # An idle-looking link is not idle when a control record waits (here a PONG the kernel
    # had no room for): deliver queues the batch, the writer sends the PONG first.
    async with MemoryNet(tmp_path) as net:
        peer = await net.raw_peer("alice", capacity=4096)
        port = net.listener.sessions["alice"]
        link = port.active
        local = net.local_port(net.switch, "h")
        await trio.testing.wait_all_tasks_blocked()
        # Sent at once, more than the pipe holds: the rest waits in the stream.
        net.switch.forward(local, [Frame(eth(BROADCAST, MAC_H, n, 1400)) for n in range(8)])
        assert link.stream.sending and port.counters.out_frames == 8
        await peer.tls.send_all(PING_RECORD)  # its PONG waits behind those bytes
        await trio.testing.wait_all_tasks_blocked()
        assert link._control
        net.switch.forward(local, [Frame(eth(BROADCAST, MAC_H, 99, 100))])
        assert len(port.queue) == 1 and port.counters.out_frames == 8  # not at once
        order: list[object] = []
        with trio.fail_after(10):
            while 99 not in order:
                peer.wire.receive_data(await peer.tls.receive_some(1 << 16))
                for event in peer.wire.next_events():
                    if isinstance(event, Frames):
                        order += [int.from_bytes(f.data[14:18], "big") for f in event.frames]
                    elif isinstance(event, Pong):
                        order.append("pong")
        assert order == [*range(8), "pong", 99]
