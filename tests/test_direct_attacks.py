"""Direct paths under attack (the red team's findings, each a test that failed before its
fix): an ADVERTISE pointing remote peers at their own loopback through IPv4-mapped IPv6; a
listener pushing frames at its dialer before its verdict (held, unbounded, until the PONG);
a wrong key at an introduced address (the hub, another endpoint) warned about and redialled
every second, more when the peer flips between listening and not; old introductions kept
for good under a hub back with --no-direct or as version 1; every INTRO decoded and every
filter rebuilt when one peer changed; the first INTRO of a hub link at the limits decoded and
applied in one go (~2.5 s of the endpoint's loop); a wildcard --listen introduced at an
address of a family it does not take.  The attacks that held are in tests/test_direct_links.py,
tests/test_direct_netns.py and tests/test_hub_direct.py."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from netstack.frame import ALL_OFFLOADS
from tests.test_direct_links import IPS, MACS, Node, ipv4_frame, wait_for
from tunnel.introducer import resolve
from tunnel.keys import server_ssl_context
from tunnel.tls import TLSStream
from tunnel.wire import Auth, WireConnection


@pytest.mark.parametrize("sent", [
    ("::ffff:127.0.0.1", 22),  # the dialer's own 127.0.0.1:22 (Linux maps it to IPv4)
    ("::ffff:127.1.2.3", 22),
])
def test_a_remote_peer_cannot_point_its_peers_at_their_own_loopback_through_mapped_ipv6(sent):
    assert resolve((sent,), "192.0.2.1") == ()


def test_a_mapped_wildcard_is_a_wildcard_not_the_dialers_own_machine():
    # connect() to ::ffff:0.0.0.0 reaches the dialer's own machine, like 0.0.0.0
    assert resolve((("::ffff:0.0.0.0", 22),), "192.0.2.1") == (("192.0.2.1", 22),)


def test_an_ipv4_mapped_advertise_is_introduced_as_the_ipv4_address():
    assert resolve((("::ffff:198.51.100.7", 9),), "192.0.2.1") == (("198.51.100.7", 9),)


async def test_frames_a_listener_sends_before_its_verdict_are_policed_at_once_not_held(
        tmp_path):
    """A listener with the introduced key that never answers the PING behind AUTH, but
    streams FRAMES meanwhile: the dialer must not hold them (for up to DIAL_SECONDS, at the
    link's speed); they go through the peer's filter into the switch as they come."""
    a = Node(tmp_path, "a", listens=True)  # only for its key and the peer it makes
    b = Node(tmp_path, "b", listens=False)
    got_auth = trio.Event()

    async def hostile_listener(stream: trio.SocketStream) -> None:
        tls = TLSStream(stream, server_ssl_context(a.identity), server_side=True)
        await tls.do_handshake()
        wire = WireConnection("server", name="", offloads=int(ALL_OFFLOADS), mtu=1500)
        await tls.send_all(wire.send_hello())
        while not got_auth.is_set():
            wire.receive_data(await tls.receive_some(65536))
            if any(isinstance(event, Auth) for event in wire.next_events()):
                wire.accept_auth()
                got_auth.set()
        wire.next_events()  # the PING behind AUTH: never answered
        for _ in range(50):
            await tls.send_all(wire.send_frames([ipv4_frame("b", "a"),
                                                 ipv4_frame("b", "c", src_ip=IPS["a"])]))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, hostile_listener, 0,
                                                   host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        await nursery.start(b.links.run)
        peer = a.as_peer()
        b.links.introduce((type(peer)(peer.name, peer.fingerprint, (("127.0.0.1", port),),
                                      peer.macs, peer.ipv4, peer.ipv6),))
        await got_auth.wait()
        await wait_for(lambda: len(b.local.got) == 50, 1.5)  # before the 2 s dial timeout
        assert b.port(a).counters.drops == {"mac_spoof": 50}
        assert all(frame.data[6:12] == MACS["a"] for frame in b.local.got)
        nursery.cancel_scope.cancel()



async def test_a_wrong_key_at_an_introduced_address_is_logged_now_and_then_not_every_dial(
        tmp_path, caplog):
    """A peer may advertise any TLS server (the hub, another endpoint's --listen): every
    endpoint dialing it meets the wrong key there about once a second, for as long as the
    hub introduces it.  That is worth a warning, not one a second."""
    a = Node(tmp_path, "a", listens=True)
    b = Node(tmp_path, "b", listens=False)
    impostor = Node(tmp_path, "c", listens=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.links.run)
        await nursery.start(b.links.run)
        # c "advertises" a's --listen: whoever dials c meets a's key there
        b.links.introduce((a.as_peer(fingerprint=impostor.identity.fingerprint),))
        port = b.links.peers.port_of(impostor.identity.fingerprint_bytes)
        await wait_for(lambda: port.life.failures >= 4)
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "tunnel.direct_link" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "server_mismatch" in warnings[0], warnings


async def test_an_endpoint_drops_its_old_introductions_when_the_hub_returns_with_no_direct(
        tmp_path, autojump_clock):
    """The last INTRO survives a hub restart (direct sessions outlive the hub), so a hub that
    comes back with --no-direct must say "nobody": sending no INTRO at all left the old set,
    its bindings and the keys it admits on --listen, in force for good (a peer removed from
    the peers file meanwhile, or bindings that moved, accepted forever)."""
    from tests.support.memlink import MemoryNet
    from tunnel.introductions import DirectPeer
    from tunnel.keys import identity_fingerprint

    async with MemoryNet(tmp_path) as net:
        bob = net.add_peer("bob")
        endpoint = await net.endpoint("alice")
        endpoint.direct.introduce((DirectPeer("bob", identity_fingerprint(bob), (),
                                              frozenset({MACS["b"]}), frozenset(),
                                              frozenset()),))  # as the old hub said
        assert endpoint.direct.peers.ports
        net.stop_hub()
        net.direct = False
        await trio.sleep(1)
        await net.start_hub()
        await trio.sleep(5)
        assert endpoint.uplink.active is not None and endpoint.uplink.connections == 2
        assert not endpoint.direct.peers.ports
        assert not endpoint.direct.peers.authorised().names


async def test_an_endpoint_drops_its_old_introductions_when_the_hub_returns_as_version_1(
        tmp_path, autojump_clock, monkeypatch):
    """A hub rolled back to a release without direct paths never sends an INTRO: the set the
    newer hub gave must not stay in force under it."""
    from functools import partial as bind

    import tunnel.listener
    from tests.support.memlink import MemoryNet
    from tunnel.introductions import DirectPeer
    from tunnel.keys import identity_fingerprint

    async with MemoryNet(tmp_path) as net:
        bob = net.add_peer("bob")
        endpoint = await net.endpoint("alice")
        endpoint.direct.introduce((DirectPeer("bob", identity_fingerprint(bob), (),
                                              frozenset({MACS["b"]}), frozenset(),
                                              frozenset()),))
        net.stop_hub()
        monkeypatch.setattr(tunnel.listener, "WireConnection",
                            bind(WireConnection, max_version=1))  # the older release
        await trio.sleep(1)
        await net.start_hub()
        await trio.sleep(5)
        assert endpoint.uplink.active is not None and endpoint.uplink.connections == 2
        assert endpoint.uplink.active.wire.version == 1
        assert not endpoint.direct.peers.ports


def test_an_intro_that_changes_one_peer_decodes_and_rebuilds_only_that_peer():
    """One peer churning its bindings makes the hub re-send the whole set to every endpoint
    up to four times a second; at the INTRO limits (190 peers of 256 MACs and 2 x 1024
    addresses) decoding it and rebuilding every peer's filter took the endpoint's loop
    ~2.7 s each time.  Entries that did not change are the same peers, filters kept."""
    from ipaddress import ip_address

    from tests.test_wire_intro import pair
    from tunnel.direct import DirectPeers, SteeringUplink
    from tunnel.introductions import DirectPeer
    from tunnel.keys import format_fingerprint
    from tunnel.wire import Intro

    def peer(n: int, ip: str) -> DirectPeer:
        return DirectPeer(f"p{n}", format_fingerprint(bytes([n]) * 32), (("192.0.2.9", 7),),
                          frozenset({bytes([2, 0, 0, 0, 0, n])}), frozenset({ip_address(ip)}),
                          frozenset())

    client, server = pair()
    peers = DirectPeers(b"\0" * 32, True, SteeringUplink(), lambda mac: True)
    received = []
    for second in (("10.0.0.1", "10.0.0.2", "10.0.0.3"), ("10.0.0.1", "10.0.0.9", "10.0.0.3")):
        client.receive_data(server.send_intro([peer(n, ip) for n, ip in enumerate(second, 1)]))
        (intro,) = [e for e in client.next_events() if isinstance(e, Intro)]
        received.append(intro.peers)
        if len(received) == 1:
            peers.introduce(intro.peers, 0.0)
            filters = {d: p.filter for d, p in peers.ports.items()}
    change = peers.introduce(received[1], 1.0)
    assert received[1][0] == received[0][0] and received[1][2] == received[0][2]
    assert received[1][1].decoded() == peer(2, "10.0.0.9")
    assert peers.step_work == 3 and not change.added and not change.removed  # p2: 2 + 1
    kept = [d for d, p in peers.ports.items() if p.filter is filters[d]]
    assert sorted(kept) == [bytes([1]) * 32, bytes([3]) * 32]


def maximal_intro() -> tuple:
    """The entries of an INTRO at the limits, as an endpoint's codec hands them up: as many
    peers of 256 MACs and 2 x 1,024 addresses as 4 MiB hold (190)."""
    from tests.test_wire_intro import pair
    from tunnel.wire import MAX_INTRO_PAYLOAD, Intro, encode_intro_entry

    entries, size = [], 2
    while True:
        n = len(entries)
        entry = encode_intro_entry(
            f"p{n}", bytes([1, n]) + bytes(30), (("192.0.2.9", 7000 + n),),
            [bytes([2, 0, 0, 0, n, m]) for m in range(256)],
            [bytes([10, n, i >> 8, i & 255]) for i in range(1024)],
            [bytes([0xFD] + [0] * 11 + [n, 0, i >> 8, i & 255]) for i in range(1024)])
        if size + len(entry) > MAX_INTRO_PAYLOAD:
            break
        entries.append(entry)
        size += len(entry)
    client, server = pair()
    client.receive_data(server.send_intro_encoded(entries))
    (intro,) = [e for e in client.next_events() if isinstance(e, Intro)]
    return intro.peers


def test_a_maximal_intro_is_read_a_bounded_slice_per_step_and_removals_are_at_once():
    """The first INTRO of a hub link at the limits held the endpoint's loop ~2.5 s (every
    address decoded into an object, every filter built, in one call).  The codec now checks
    the entries and leaves their bindings as bytes; the endpoint reads them into filters
    INTRO_WORK_PER_STEP bindings a step, one step per loop turn; a peer missing from a newer
    INTRO loses its port at once, whatever is still pending."""
    from tunnel.direct import INTRO_WORK_PER_STEP, DirectPeers, SteeringUplink
    from tunnel.wire import IntroEntry

    intro = maximal_intro()
    assert len(intro) == 190 and all(isinstance(e, IntroEntry) for e in intro)
    total = sum(entry.size + 1 for entry in intro)
    peers = DirectPeers(b"\0" * 32, True, SteeringUplink(), lambda mac: True)
    change = peers.introduce(intro, 0.0)
    work = [peers.step_work]
    assert change.added and peers.pending  # one slice now, the rest later
    for _ in range(10):
        peers.apply(0.0)
        work.append(peers.step_work)
    first = peers.port_of(bytes([1, 0]) + bytes(30))
    assert first is not None and first.life.state != "closed"
    # a newer INTRO without p0 (read already) and p189 (still pending)
    change = peers.introduce(intro[1:189], 1.0)
    work.append(peers.step_work)
    assert change.removed == [first] and first.life.state == "closed"
    while peers.pending:
        peers.apply(1.0)
        work.append(peers.step_work)
    assert max(work) <= INTRO_WORK_PER_STEP
    assert sum(work) == total - (intro[189].size + 1)  # nobody read twice, p189 never
    assert len(work) >= total // INTRO_WORK_PER_STEP
    assert len(peers.ports) == 188 and peers.port_of(bytes([1, 189]) + bytes(30)) is None
    port = peers.port_of(bytes([1, 188]) + bytes(30))
    assert port.filter.macs == {bytes([2, 0, 0, 0, 188, m]) for m in range(256)}
    assert port.filter.book.claim(bytes([10, 188, 3, 255]), port, 0.0, 0) is None
    assert port.filter.book.claim(bytes([10, 187, 3, 255]), port, 0.0, 0) == "claim_limit"


async def test_a_maximal_intro_lets_the_endpoints_other_tasks_run_between_its_slices(tmp_path):
    """In the shell: after `introduce` returns, the rest is read by the supervisor a slice
    per loop turn, and another task runs between every two slices."""
    node = Node(tmp_path, "a", listens=True)
    intro = maximal_intro()
    seen: list[int] = []  # what is pending each time the other task runs

    async def other_traffic() -> None:
        while True:
            seen.append(len(node.links.peers.pending))
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        await nursery.start(node.links.run)
        nursery.start_soon(other_traffic)
        await trio.sleep(0)
        node.links.introduce(intro)
        assert node.links.peers.pending
        await wait_for(lambda: not node.links.peers.pending, 30.0)
        nursery.cancel_scope.cancel()
    during = [n for n in seen if n]
    # one peer a slice (2 x 2,305 > INTRO_WORK_PER_STEP): the first in `introduce`, 189 in
    # the supervisor, and the other task ran between every two of those
    assert len(during) >= len(intro) - 2
    assert len(node.links.peers.ports) == len(intro)


async def test_an_address_where_another_key_answers_is_not_dialled_again_at_once(tmp_path):
    """A peer may advertise any TLS server: the hub (whose per-source handshake budget, 5 a
    second, every such dial spends for the dialer's own reconnects), another endpoint's
    --listen.  Where another key answered once, the dialer does not go back for a while,
    also when the peer's INTROs flip it between listening and not (a new life each)."""
    a = Node(tmp_path, "a", listens=True)
    b = Node(tmp_path, "b", listens=False)
    impostor = Node(tmp_path, "c", listens=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.links.run)
        await nursery.start(b.links.run)
        lying = a.as_peer(fingerprint=impostor.identity.fingerprint)
        b.links.introduce((lying,))
        port = b.links.peers.port_of(impostor.identity.fingerprint_bytes)
        await wait_for(lambda: port.life.failures >= 4)
        silent = type(lying)(lying.name, lying.fingerprint, (), lying.macs, lying.ipv4,
                             lying.ipv6)
        b.links.introduce((silent,))  # stops listening ...
        b.links.introduce((lying,))  # ... and listens again: a new life, dialling at once
        port = b.links.peers.port_of(impostor.identity.fingerprint_bytes)
        await wait_for(lambda: port.life.failures >= 2)
        nursery.cancel_scope.cancel()
    assert a.links.refused.get("handshake_failed") == 1


async def test_a_peer_flipping_between_listening_and_not_does_not_reset_the_dial_backoff(
        tmp_path):
    """A peer may advertise a third party's address (no TLS there: every dial fails); the
    backoff bounds how often each of its peers connects there, and an INTRO that flips it
    between listening and not (a new life, dialling at once) must not start it over."""
    b = Node(tmp_path, "b", listens=False)
    impostor = Node(tmp_path, "c", listens=False)
    connections = 0

    async def third_party(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, third_party, 0,
                                                host="127.0.0.1"))
        victim = ("127.0.0.1", listeners[0].socket.getsockname()[1])
        lying = impostor.as_peer()
        listening = type(lying)(lying.name, lying.fingerprint, (victim,), lying.macs,
                                lying.ipv4, lying.ipv6)
        await nursery.start(b.links.run)
        for _ in range(10):  # 0.5 s of flips, as fast as the hub's INTROs may come
            b.links.introduce((listening,))
            await trio.sleep(0.025)
            b.links.introduce((lying,))
            await trio.sleep(0.025)
        nursery.cancel_scope.cancel()
    assert 1 <= connections <= 4  # backoff 0.1, 0.2, 0.4 s: dials at 0, 0.1, 0.3 s


@pytest.mark.parametrize(("listen", "observed", "introduced"), [
    (("::", 7000), "192.0.2.1", ()),  # an IPv6-only socket (V6ONLY): IPv4 dials fail
    (("::", 7000), "2001:db8::1", (("2001:db8::1", 7000),)),
    (("0.0.0.0", 7000), "2001:db8::1", ()),  # IPv4 only: IPv6 dials fail
    (("0.0.0.0", 7000), "::ffff:192.0.2.1", (("192.0.2.1", 7000),)),
    ((None, 7000), "2001:db8::1", (("2001:db8::1", 7000),)),  # ':PORT': both families
    ((None, 7000), "192.0.2.1", (("192.0.2.1", 7000),)),
])
def test_a_wildcard_listen_is_introduced_only_at_an_address_of_a_family_it_accepts(
        tmp_path, listen, observed, introduced):
    from tunnel.endpoint import Endpoint, EndpointConfig
    from tunnel.keys import keygen

    keygen(tmp_path / "id")
    endpoint = Endpoint(EndpointConfig(hub_host="hub.test", hub_port=1,
                                       identity_dir=tmp_path / "id",
                                       hub_fingerprint=bytes(32), listen=listen))
    assert resolve(tuple(endpoint.advertised()), observed) == introduced
