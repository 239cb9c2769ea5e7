"""The hub's tunnel boundary contains every failure, in one process over loopback: strangers
that reset, idle or crowd the handshake slots; an exception inside one session's link; an
authenticated peer that floods PINGs and never reads; the endpoint's rekey counting both
directions.  Real processes under the same attacks: tests/test_tunnel_processes.py."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from netstack.frame import Frame
from tests.support.attacks import client_hello
from tests.support.tunnel_client import connect_peer
from tests.test_tunnel import BROADCAST, MAC_E, Net, eth, guest, receive, session_up
from tunnel import endpoint as endpoint_module
from tunnel import listener as listener_module
from tunnel import session as session_module
from tunnel.endpoint import Endpoint
from tunnel.hub import Hub
from tunnel.keys import keygen, parse_fingerprint
from tunnel.wire import PING, PING_PAYLOAD, RECORD_HEADER

PING_RECORD = RECORD_HEADER.pack(PING, 0, 0, PING_PAYLOAD.size) + PING_PAYLOAD.pack(1, 2)


@pytest.fixture
def net(tmp_path):
    return Net(tmp_path)


def reset_connection(port: int) -> None:
    """Connect, then close with SO_LINGER 0: the hub's accepted socket is reset at once."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.connect(("127.0.0.1", port))


def add_peer(net: Net, name: str) -> None:
    fingerprint = keygen(net.tmp / f"{name}-id")
    with open(net.peers, "a") as peers:
        peers.write(f"{name} {fingerprint}\n")


async def peer(net: Net, name: str, **kw):
    identity = net.tmp / ("ep-id" if name == "alice" else f"{name}-id")
    return await connect_peer(net.port, identity, parse_fingerprint(net.hub_fp), name, **kw)


async def ended(tunnel, kind: str) -> None:
    """Wait until the listener counted one link ended for `kind`."""
    with trio.fail_after(5):
        while tunnel.links_ended.get(kind) != 1:
            await trio.sleep(0.01)


async def test_connections_reset_before_accept_leave_the_hub_accepting(net):
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        for _ in range(50):
            reset_connection(net.port)
        await trio.sleep(0.5)  # the hub accepts them all (and meets the resets)
        net.endpoint = Endpoint(net.endpoint_config())
        await nursery.start(net.endpoint.run)
        await session_up(net.endpoint)
        assert net.hub.tunnel.refused.get("gone_before_admission", 0) > 0
        nursery.cancel_scope.cancel()


async def test_an_exception_in_one_sessions_forward_closes_only_that_link(net, caplog):
    add_peer(net, "bob")
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        forward = net.hub.switch.forward

        def forward_failing_for_bob(port, frames):
            if port.name == "bob":
                raise RuntimeError("a bug in the switch, met by bob's frames")
            forward(port, frames)

        net.hub.switch.forward = forward_failing_for_bob
        async with guest(net.tmp / "h.sock") as gh:
            alice = await peer(net, "alice")
            bob = await peer(net, "bob")
            await bob.tls.send_all(bob.wire.send_frames([Frame(eth(BROADCAST, MAC_E, 1))]))
            assert await bob.read_until_closed(5), "bob's link was not closed"
            tunnel = net.hub.tunnel
            await ended(tunnel, "internal_error")
            assert tunnel.sessions["bob"].active is None
            assert sum("a bug in the switch" in r.exc_text for r in caplog.records
                       if r.exc_text) == 1  # the traceback, logged once
            frames = [eth(BROADCAST, MAC_E, n) for n in range(5)]
            await alice.tls.send_all(alice.wire.send_frames([Frame(f) for f in frames]))
            assert await receive(gh, 5) == frames
            assert tunnel.sessions["alice"].active is not None
        nursery.cancel_scope.cancel()


async def test_a_ping_right_before_a_protocol_error_closes_only_that_link(net):
    """The codec hands over the events decoded before a violation: the PING among them must
    not be answered (the codec refuses to), and the error must end the link at once."""
    async with trio.open_nursery() as nursery:
        await net.start(nursery)
        add_peer(net, "bob")
        net.hub.tunnel.reload()
        bob = await peer(net, "bob")
        bad_header = RECORD_HEADER.pack(PING, 1, 0, PING_PAYLOAD.size) + bytes(16)
        await bob.tls.send_all(PING_RECORD + bad_header)
        assert await bob.read_until_closed(5), "bob's link was not closed"
        await ended(net.hub.tunnel, "protocol_error")
        assert net.endpoint.uplink.active is not None
        assert net.hub.tunnel.sessions["alice"].active is not None
        nursery.cancel_scope.cancel()


async def test_a_peer_that_floods_pings_and_never_reads_is_bounded_and_closed(net,
                                                                              monkeypatch):
    monkeypatch.setattr(session_module, "WRITE_STALL_SECONDS", 1.0)
    monkeypatch.setattr(session_module, "KEEPALIVE_SECONDS", 0.2)
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        attacker = await peer(net, "alice", receive_buffer=4096)
        flood = PING_RECORD * 2000
        most_pending = 0

        async def watch() -> None:
            nonlocal most_pending
            while True:
                port = net.hub.tunnel.sessions.get("alice")
                if port is not None and port.active is not None:
                    most_pending = max(most_pending, len(port.active._control))
                await trio.sleep(0.005)

        nursery.start_soon(watch)
        # The stall clock starts once the kernel's send buffer (up to a few MiB of PONGs) is
        # full: on a loaded machine that alone can take seconds.
        with trio.fail_after(30):
            try:
                while True:
                    await attacker.tls.send_all(flood)
            except trio.BrokenResourceError:
                pass  # the hub closed the link
        tunnel = net.hub.tunnel
        await ended(tunnel, "peer_not_reading")
        assert tunnel.sessions["alice"].control_dropped > 0
        assert most_pending <= session_module.MAX_PENDING_CONTROL
        nursery.cancel_scope.cancel()


async def test_a_few_sources_cannot_take_every_handshake_slot(net):
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        idle = []
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
            for _ in range(16):
                idle.append(await trio.open_tcp_stream("127.0.0.1", net.port,
                                                       local_address=source))
        await trio.sleep(0.3)
        tunnel = net.hub.tunnel
        assert tunnel.handshakes <= 4 * listener_module.MAX_HANDSHAKES_PER_SOURCE
        assert tunnel.refused.get("too_many_from_source") == 4 * (
            16 - listener_module.MAX_HANDSHAKES_PER_SOURCE)
        net.endpoint = Endpoint(net.endpoint_config())
        await nursery.start(net.endpoint.run)
        await session_up(net.endpoint, timeout=3)
        for stream in idle:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def stall_handshakes(port: int, sources: list[str], each: int) -> list[trio.SocketStream]:
    """From each source, `each` connections that send part of a ClientHello and stop: the
    TLS handshake waits for the rest (until HANDSHAKE_SECONDS)."""
    partial = client_hello()[:50]
    held = []
    for source in sources:
        for _ in range(each):
            stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            await stream.send_all(partial)
            held.append(stream)
    return held


async def test_an_endpoint_gets_through_while_stalled_handshakes_hold_every_slot(net):
    """8 sources x 8 stalled ClientHellos fill all 64 slots, each under every per-source
    limit: an endpoint that never connected before still authenticates at once (it takes
    the slot of the handshake stalled longest), and so does one reconnecting."""
    per_source = listener_module.MAX_HANDSHAKES_PER_SOURCE
    sources = [f"127.0.3.{n}" for n in range(1, listener_module.MAX_HANDSHAKES // per_source + 1)]
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        tunnel = net.hub.tunnel
        held = await stall_handshakes(net.port, sources, per_source)
        with trio.fail_after(5):
            while tunnel.handshakes < listener_module.MAX_HANDSHAKES:
                await trio.sleep(0.01)
        for attempt in (1, 2):
            alice = await peer(net, "alice", timeout=listener_module.HANDSHAKE_SECONDS)
            with trio.fail_after(5):
                while "alice" not in tunnel.sessions \
                        or tunnel.sessions["alice"].connections < attempt:
                    await trio.sleep(0.01)
            assert tunnel.refused.get("evicted") == attempt
            await alice.tls.aclose()
            # the slot alice's handshake had is taken again
            held += await stall_handshakes(net.port, [f"127.0.4.{attempt}"], 1)
            with trio.fail_after(5):
                while tunnel.handshakes < listener_module.MAX_HANDSHAKES:
                    await trio.sleep(0.01)
        assert "too_many_handshakes" not in tunnel.refused
        # the stranger's oldest connections were closed to make room; the others wait on
        for stream in held[:2]:
            with trio.fail_after(5):
                assert await stream.receive_some(10) == b""
        for stream in held:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_connection_that_says_nothing_is_cut_before_the_handshake_deadline(net):
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        stream = await trio.open_tcp_stream("127.0.0.1", net.port)
        with trio.fail_after(listener_module.FIRST_BYTES_SECONDS + 2):
            assert await stream.receive_some(10) == b""
        assert net.hub.tunnel.refused.get("silent") == 1
        assert net.hub.tunnel.handshakes == 0
        nursery.cancel_scope.cancel()


async def test_the_endpoint_rekeys_when_it_received_many_records(net):
    async with trio.open_nursery() as nursery:
        await net.start(nursery)
        first = net.endpoint.uplink.active
        first.wire.received.records = endpoint_module.REKEY_RECORDS  # the hub sent them
        with trio.fail_after(5):
            while net.endpoint.uplink.active is first:
                await trio.sleep(0.05)
        await session_up(net.endpoint)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("address", "source"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_per_source_limits_count_an_ipv4_address_or_an_ipv6_64(address, source):
    assert listener_module.source_of(address) == source


async def test_strangers_evict_each_other_but_never_a_handshake_from_a_source_that_authenticated():
    """All slots full: a newcomer takes the slot of the oldest handshake from a source that
    never authenticated; one from a source that did is kept however many strangers come, and
    only a newcomer from such a source may take its slot."""
    slots = listener_module.HandshakeSlots(capacity=4, per_source=2, trusted_limit=3)
    slots.trust("192.0.2.1")
    known, _ = slots.admit("192.0.2.1")
    strangers = [slots.admit(f"198.51.100.{n}")[0] for n in range(3)]
    assert len(slots) == 4
    for n in range(3, 40):  # strangers churn through the other three slots
        handshake, evicted = slots.admit(f"198.51.100.{n}")
        assert evicted is not None and not evicted.trusted
        assert evicted.cancel_scope.cancel_called
    assert known in slots.pending and not known.cancel_scope.cancel_called
    assert all(h.cancel_scope.cancel_called for h in strangers)
    assert len(slots) == 4 and sum(slots.by_source.values()) == 4
    # every slot held by sources that authenticated: a stranger is refused, they are not
    slots.trust("192.0.2.2")
    slots.trust("192.0.2.3")
    for source in ("192.0.2.2", "192.0.2.2", "192.0.2.3"):
        assert not slots.admit(source)[1].trusted  # the strangers' last three go
    assert slots.admit("198.51.100.99") == "too_many_handshakes"
    handshake, evicted = slots.admit("192.0.2.1")
    assert evicted is known and handshake.trusted
    assert slots.admit("192.0.2.2") == "too_many_from_source"
    # the slot of an evicted handshake was given back once, not again when its task ends
    slots.release(known)
    assert slots.by_source == {"192.0.2.2": 2, "192.0.2.3": 1, "192.0.2.1": 1}
    assert len(slots) == 4


def test_the_sources_remembered_as_authenticated_are_bounded():
    slots = listener_module.HandshakeSlots(trusted_limit=3)
    for n in range(10):
        slots.trust(f"192.0.2.{n}")
    slots.trust("192.0.2.7")  # authenticated again: the most recent
    slots.trust("192.0.2.10")
    assert list(slots.trusted) == ["192.0.2.9", "192.0.2.7", "192.0.2.10"]
