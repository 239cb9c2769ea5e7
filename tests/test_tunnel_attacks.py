"""The hub's tunnel boundary contains every failure: strangers that reset (over loopback
TCP), idle or crowd the handshake slots (over memory streams, in virtual time:
tests/support/memlink.py); the per-source limits and the slots' eviction order.  A session's
own failures (an exception in its link, a protocol error, a peer that never reads):
tests/test_link.py; real processes under the same attacks: tests/test_tunnel_processes.py."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from tests.support.attacks import client_hello
from tests.support.memlink import MemoryNet
from tests.test_tunnel import Net, session_up
from tunnel import listener as listener_module
from tunnel.endpoint import Endpoint
from tunnel.hub import Hub


@pytest.fixture
def net(tmp_path):
    return Net(tmp_path)


def reset_connection(port: int) -> None:
    """Connect, then close with SO_LINGER 0: the hub's accepted socket is reset at once."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.connect(("127.0.0.1", port))


async def test_connections_reset_before_accept_leave_the_hub_accepting(net):
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        for _ in range(50):
            reset_connection(net.port)
        await trio.testing.wait_all_tasks_blocked()  # the hub accepted them all
        assert net.hub.tunnel.refused.get("gone_before_admission", 0) > 0
        net.endpoint = Endpoint(net.endpoint_config())
        await nursery.start(net.endpoint.run)
        await session_up(net.endpoint)
        nursery.cancel_scope.cancel()


async def test_a_few_sources_cannot_take_every_handshake_slot(tmp_path, autojump_clock):
    per_source = listener_module.MAX_HANDSHAKES_PER_SOURCE
    async with MemoryNet(tmp_path) as net:
        idle = [await net.connect(f"198.51.100.{source}")
                for source in range(2, 6) for _ in range(16)]
        await trio.testing.wait_all_tasks_blocked()
        listener = net.listener
        assert listener.handshakes == 4 * per_source
        assert listener.refused == {"too_many_from_source": 4 * (16 - per_source)}
        await net.endpoint("alice")
        assert len(idle) == 64


async def stall_handshakes(net: MemoryNet, sources: list[str],
                           each: int) -> list[trio.abc.Stream]:
    """From each source, `each` connections that send part of a ClientHello and stop: the
    TLS handshake waits for the rest (until HANDSHAKE_SECONDS)."""
    partial = client_hello()[:50]
    held = []
    for source in sources:
        for _ in range(each):
            stream = await net.connect(source)
            await stream.send_all(partial)
            held.append(stream)
    await trio.testing.wait_all_tasks_blocked()
    return held


async def test_an_endpoint_gets_through_while_stalled_handshakes_hold_every_slot(
        tmp_path, autojump_clock):
    """8 sources x 8 stalled ClientHellos fill all 64 slots, each under every per-source
    limit: an endpoint that never connected before still authenticates at once (it takes
    the slot of the handshake stalled longest), and so does one reconnecting."""
    per_source = listener_module.MAX_HANDSHAKES_PER_SOURCE
    sources = [f"198.51.100.{n}"
               for n in range(1, listener_module.MAX_HANDSHAKES // per_source + 1)]
    async with MemoryNet(tmp_path) as net:
        listener = net.listener
        held = await stall_handshakes(net, sources, per_source)
        assert listener.handshakes == listener_module.MAX_HANDSHAKES
        for attempt in (1, 2):
            alice = await net.raw_peer("alice")
            assert listener.sessions["alice"].connections == attempt
            assert listener.refused.get("evicted") == attempt
            await alice.tls.aclose()
            # the slot alice's handshake had is taken again
            held += await stall_handshakes(net, [f"203.0.113.{attempt}"], 1)
            assert listener.handshakes == listener_module.MAX_HANDSHAKES
        assert "too_many_handshakes" not in listener.refused
        # the strangers' oldest connections were closed to make room (now, long before
        # their handshake deadline); the others wait on
        now = trio.current_time()
        for stream in held[:2]:
            assert await stream.receive_some(10) == b""
        assert trio.current_time() == now
        assert len(held) == listener_module.MAX_HANDSHAKES + 2


async def test_a_connection_that_says_nothing_is_cut_before_the_handshake_deadline(
        tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        start = trio.current_time()
        stream = await net.connect("198.51.100.1")
        assert await stream.receive_some(10) == b""
        assert trio.current_time() == start + listener_module.FIRST_BYTES_SECONDS
        await trio.testing.wait_all_tasks_blocked()
        assert net.listener.refused == {"silent": 1}
        assert net.listener.handshakes == 0


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
