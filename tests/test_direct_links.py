"""Direct sessions in one process over real loopback TCP and TLS (tunnel/direct_link.py), the
introductions given by hand as the hub would: the non-listening side dials, frames cross both
ways, a stranger's key is refused before any frame, the dialer sends nothing to a key it was
not introduced to, a spoofing peer is dropped and counted, a session that dies falls back
and comes back within about a second, and a peer missing from a new introduction loses its
session at once.  The same with real processes, a hub and network namespaces:
tests/test_direct_netns.py."""

from __future__ import annotations

import time
from dataclasses import replace
from ipaddress import ip_address

import trio

from netstack.frame import Frame
from netstack.port import Port
from netstack.switch import Switch
from tunnel.direct import DirectPeers, DirectPort, SteeringUplink
from tunnel.direct_link import DirectLinks
from tunnel.introductions import DirectPeer
from tunnel.keys import keygen, load_identity

MACS = {"a": bytes.fromhex("020000000a0a"), "b": bytes.fromhex("020000000b0b"),
        "c": bytes.fromhex("020000000c0c")}
IPS = {"a": "10.0.0.10", "b": "10.0.0.11", "c": "10.0.0.12"}


def ipv4_frame(dst: str, src: str, src_ip: str | None = None, size: int = 100) -> Frame:
    header = bytes.fromhex("4500") + (size - 14).to_bytes(2, "big") + bytes(4) + b"\x40\x11"
    header += bytes(2) + ip_address(src_ip or IPS[src]).packed + ip_address(IPS[dst]).packed
    return Frame(MACS[dst] + MACS[src] + b"\x08\x00" + header + bytes(size - 34))


class Local(Port):
    """The endpoint's own guest or TAP: what reaches it is kept."""

    def __init__(self) -> None:
        super().__init__("tap")
        self.got: list[Frame] = []

    def deliver(self, frames: list[Frame]) -> None:
        self.got.extend(frames)


class Node:
    """One endpoint's direct half: a switch with a local port and a steering uplink."""

    def __init__(self, tmp_path, name: str, *, listens: bool, rekey_seconds: float = 3600.0
                 ) -> None:
        keygen(tmp_path / name)
        self.name = name
        self.identity = load_identity(tmp_path / name)
        self.switch = Switch()
        self.local = Local()
        self.uplink = SteeringUplink()
        self.switch.attach(self.local)
        self.switch.attach(self.uplink)
        # the local MAC is learned, as after its first frame
        self.switch.forward(self.local, [Frame(b"\xff" * 6 + MACS[name] + b"\x08\x06" + bytes(46))])
        self.local.got.clear()
        # the hub saw its source (as after a first frame through it): it may go direct
        self.uplink.vouched[(MACS[name], ip_address(IPS[name]).packed)] = time.monotonic()

        def is_local(mac: bytes) -> bool:
            entry = self.switch.mac_table.get(mac)
            return entry is not None and entry[0] is self.local

        self.links = DirectLinks(
            self.identity,
            DirectPeers(self.identity.fingerprint_bytes, listens, self.uplink, is_local),
            lambda frames: self.switch.forward(self.uplink, frames),
            listen=("127.0.0.1", 0) if listens else None, mtu=1500,
            rekey_due=lambda link: trio.current_time() - link.started >= rekey_seconds)

    def as_peer(self, fingerprint: str | None = None) -> DirectPeer:
        return DirectPeer(name=self.name, fingerprint=fingerprint or self.identity.fingerprint,
                          addresses=tuple(self.links.bound),
                          macs=frozenset({MACS[self.name]}),
                          ipv4=frozenset({ip_address(IPS[self.name])}), ipv6=frozenset())

    def port(self, other: Node) -> DirectPort:
        port = self.links.peers.port_of(other.identity.fingerprint_bytes)
        assert port is not None
        return port

    def send(self, frame: Frame) -> None:
        self.switch.forward(self.local, [frame])


async def wait_for(condition, seconds: float = 5.0) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.02)


async def pair(nursery, tmp_path, rekey_seconds: float = 3600.0) -> tuple[Node, Node]:
    """a listens, b does not: b dials a; both introduced to each other; session up."""
    a = Node(tmp_path, "a", listens=True)
    b = Node(tmp_path, "b", listens=False, rekey_seconds=rekey_seconds)
    await nursery.start(a.links.run)
    await nursery.start(b.links.run)
    a.links.introduce((b.as_peer(),))
    b.links.introduce((a.as_peer(),))
    await wait_for(lambda: a.port(b).active is not None and b.port(a).active is not None)
    return a, b


async def test_the_side_that_does_not_listen_dials_and_frames_cross_both_ways(tmp_path):
    async with trio.open_nursery() as nursery:
        a, b = await pair(nursery, tmp_path)
        assert b.port(a).life.role is True and a.port(b).life.role is False
        b.send(ipv4_frame("a", "b"))
        await wait_for(lambda: len(a.local.got) == 1)
        a.send(ipv4_frame("b", "a"))
        await wait_for(lambda: len(b.local.got) == 1)
        assert not a.uplink.queue and not b.uplink.queue  # nothing went to the hub
        status = b.links.status()["peers"][0]
        assert status["path"] == "direct" and status["out_frames"] == 1
        assert status["in_frames"] == 1
        nursery.cancel_scope.cancel()


async def test_a_stranger_is_refused_before_any_frame(tmp_path):
    async with trio.open_nursery() as nursery:
        a, b = await pair(nursery, tmp_path)
        stranger = Node(tmp_path, "c", listens=False)
        await nursery.start(stranger.links.run)
        stranger.links.introduce((a.as_peer(),))  # it knows a's key; a was never told of it
        await wait_for(lambda: a.links.refused.get("auth_unknown_key", 0) >= 1
                       and stranger.port(a).life.last_error is not None)
        assert stranger.port(a).active is None
        assert "unknown_key" in stranger.port(a).life.last_error
        stranger.port(a).deliver([ipv4_frame("a", "c")])  # no session: nothing leaves
        await trio.sleep(0.2)
        assert not a.local.got
        nursery.cancel_scope.cancel()


async def test_the_dialer_sends_nothing_to_a_key_it_was_not_introduced_to(tmp_path):
    async with trio.open_nursery() as nursery:
        a = Node(tmp_path, "a", listens=True)
        b = Node(tmp_path, "b", listens=False)
        impostor = Node(tmp_path, "c", listens=False)
        await nursery.start(a.links.run)
        await nursery.start(b.links.run)
        a.links.introduce((b.as_peer(),))
        # b is told a's address with another key: whoever answers there is not that key
        b.links.introduce((a.as_peer(fingerprint=impostor.identity.fingerprint),))
        port = b.links.peers.port_of(impostor.identity.fingerprint_bytes)
        await wait_for(lambda: port.life.failures >= 1
                       and a.links.refused.get("handshake_failed", 0) >= 1)
        assert "server_mismatch" in (port.life.last_error or "") or \
            "pinned" in (port.life.last_error or "")
        assert port.active is None
        assert not a.links.refused.get("auth_unknown_key")  # no AUTH was ever sent
        nursery.cancel_scope.cancel()


async def test_a_peer_spoofing_over_its_direct_session_is_dropped_and_counted(tmp_path):
    async with trio.open_nursery() as nursery:
        a, b = await pair(nursery, tmp_path)
        to_a = b.port(a)
        to_a.deliver([ipv4_frame("a", "c", src_ip=IPS["b"]),  # another MAC
                      ipv4_frame("a", "b", src_ip=IPS["c"]),  # another IP
                      ipv4_frame("a", "b")])  # its own: admitted
        await wait_for(lambda: sum(a.port(b).counters.drops.values()) == 2)
        assert a.port(b).counters.drops == {"mac_spoof": 1, "ip_spoof": 1}
        await wait_for(lambda: len(a.local.got) == 1)
        nursery.cancel_scope.cancel()


async def test_a_session_that_dies_falls_back_to_the_hub_and_comes_back(tmp_path):
    async with trio.open_nursery() as nursery:
        a, b = await pair(nursery, tmp_path)
        assert b.uplink.routes
        b.uplink.active = None  # no hub in this test: frames for it are counted link_down
        for link in list(a.port(b).links):
            link.abort("test: the path broke")
        await wait_for(lambda: b.port(a).active is None, 2.0)
        before = b.uplink.counters.drops["link_down"]
        b.send(ipv4_frame("a", "b"))  # the hub's turn, at once
        assert b.uplink.counters.drops["link_down"] == before + 1 and not b.port(a).queue
        died = trio.current_time()
        await wait_for(lambda: b.port(a).active is not None and a.port(b).active is not None,
                       5.0)
        assert trio.current_time() - died < 2.0
        b.send(ipv4_frame("a", "b"))
        await wait_for(lambda: len(a.local.got) == 1)
        nursery.cancel_scope.cancel()


async def test_a_peer_missing_from_a_new_introduction_loses_its_session_at_once(tmp_path):
    async with trio.open_nursery() as nursery:
        a, b = await pair(nursery, tmp_path)
        a.links.introduce(())
        await wait_for(lambda: b.port(a).active is None, 2.0)
        assert not a.links.peers.ports and not a.uplink.routes
        # b keeps dialing (it was not told); a refuses it now
        await wait_for(lambda: a.links.refused.get("auth_unknown_key", 0) >= 1, 3.0)
        assert b.port(a).active is None
        nursery.cancel_scope.cancel()


async def test_the_dialer_rekeys_with_a_fresh_session_that_supersedes_the_old_one(tmp_path):
    async with trio.open_nursery() as nursery:
        a, b = await pair(nursery, tmp_path, rekey_seconds=0.5)
        first = b.port(a).active
        await wait_for(lambda: b.port(a).connections >= 3 and a.port(b).connections >= 3)
        assert b.port(a).active is not first and first not in b.port(a).links
        assert b.port(a).life.failures == 0  # no session was lost on the way
        for n in range(20):
            b.send(ipv4_frame("a", "b"))
            await trio.sleep(0.05 if n % 5 else 0.3)
        await wait_for(lambda: len(a.local.got) == 20)
        nursery.cancel_scope.cancel()


async def test_a_peer_that_dials_again_and_again_leaving_its_sessions_open_holds_a_few(
        tmp_path):
    """Each new session of a peer supersedes the last; the superseded one waits for the
    peer to close it (DRAIN_SECONDS).  A peer that never does, dialling as fast as the
    listener admits it, holds at most MAX_PEER_SESSIONS sessions, not all of them."""
    from tunnel.direct_link import MAX_PEER_SESSIONS

    async with trio.open_nursery() as nursery:
        a, b = await pair(nursery, tmp_path)
        port = b.port(a)
        host, number = a.links.bound[0]
        held = []

        async def keep_alive() -> None:  # pings on every session, reads none, closes none
            while True:
                for link in list(held):
                    try:
                        await link.stream.send_all(link.wire.send_ping(1, 2))
                    except trio.BrokenResourceError:  # a closed it
                        held.remove(link)
                await trio.sleep(0.1)

        nursery.start_soon(keep_alive)
        for _ in range(MAX_PEER_SESSIONS + 3):
            held.append(await b.links._dial_one(port, host, number))
        await trio.sleep(0.3)
        assert len(a.port(b).links) <= MAX_PEER_SESSIONS
        assert a.port(b).active is not None
        nursery.cancel_scope.cancel()


async def test_a_listen_address_in_use_is_a_startup_error_naming_the_flag(tmp_path):
    import socket

    import pytest

    from tunnel.startup import StartupError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = Node(tmp_path, "a", listens=True)
        node.links.listen = ("127.0.0.1", port)
        with pytest.raises(StartupError, match=f"--listen 127.0.0.1:{port}.*in use"):
            await node.links.run()


async def test_after_a_new_hub_session_every_source_crosses_the_hub_again(tmp_path,
                                                                           autojump_clock):
    """A restarted hub knows nothing of what it saw before: a source vouched for by the old
    one would go direct and be dropped by peers introduced by the new one."""
    from tests.support.memlink import MemoryNet

    async with MemoryNet(tmp_path) as net:
        endpoint = await net.endpoint("alice")
        endpoint.uplink.vouched[(MACS["a"], ip_address(IPS["a"]).packed)] = 0.0
        net.stop_hub()
        await trio.sleep(1)
        await net.start_hub()
        await trio.sleep(3)
        assert endpoint.uplink.active is not None and endpoint.uplink.connections == 2
        assert not endpoint.uplink.vouched


def lower_first(x: Node, y: Node) -> tuple[Node, Node]:
    return (x, y) if x.identity.fingerprint_bytes < y.identity.fingerprint_bytes else (y, x)


def closed_port() -> tuple[str, int]:
    """An address where nobody listens (connections to it are refused)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()


async def test_when_the_side_that_dials_first_cannot_reach_the_other_the_other_dials(
        tmp_path, monkeypatch):
    """Both listen; the lower side (which dials first) is told an address of the higher one
    it cannot reach, the higher one reaches it: the higher dials after FALLBACK_DIAL_SECONDS
    (0.5 s here), the pair goes direct, and after that session dies it is back."""
    import tunnel.direct

    fallback = 0.5
    monkeypatch.setattr(tunnel.direct, "FALLBACK_DIAL_SECONDS", fallback)
    async with trio.open_nursery() as nursery:
        low, high = lower_first(Node(tmp_path, "a", listens=True),
                                Node(tmp_path, "b", listens=True))
        await nursery.start(low.links.run)
        await nursery.start(high.links.run)
        unreachable = replace(high.as_peer(), addresses=(closed_port(),))
        low.links.introduce((unreachable,))
        high.links.introduce((low.as_peer(),))
        started = trio.current_time()
        await wait_for(lambda: low.port(high).active is not None
                       and high.port(low).active is not None, fallback + 3)
        assert trio.current_time() - started >= fallback - 0.1
        assert high.port(low).active.wire.role == "client"  # the higher side dialled
        assert low.port(high).life.failures >= 1  # the lower side's dials fail
        high.send(ipv4_frame(low.name, high.name))
        await wait_for(lambda: len(low.local.got) == 1)
        for link in list(low.port(high).links):
            link.abort("test: the path broke")
        await wait_for(lambda: high.port(low).active is None, 2.0)
        died = trio.current_time()
        await wait_for(lambda: high.port(low).active is not None
                       and low.port(high).active is not None, 5.0)
        assert trio.current_time() - died < 2.0  # back (which side redials: test_direct.py)
        assert len(low.port(high).links) == len(high.port(low).links) == 1
        nursery.cancel_scope.cancel()


async def test_when_both_sides_dial_at_once_one_session_is_left_the_lower_sides(tmp_path):
    async with trio.open_nursery() as nursery:
        low, high = lower_first(Node(tmp_path, "a", listens=True),
                                Node(tmp_path, "b", listens=True))
        await nursery.start(low.links.run)
        await nursery.start(high.links.run)
        high.links.introduce((low.as_peer(),))
        high.port(low).life.next_dial = 0.0  # the fallback dials at once, as the first side
        low.links.introduce((high.as_peer(),))

        def settled() -> bool:
            for node, other, ours in ((low, high, True), (high, low, False)):
                port = node.port(other)
                if (port.active is None or len(port.links) != 1
                        or (port.active.wire.role == "client") is not ours):
                    return False
            # both dials got through: the loser closed by its dialer or refused `duplicate`
            return (low.port(high).connections + high.port(low).connections
                    + low.links.refused.get("duplicate", 0)
                    + high.links.refused.get("duplicate", 0)) >= 3
        await wait_for(settled)
        await trio.sleep(0.3)
        assert settled()  # and it stays so
        low.send(ipv4_frame(high.name, low.name))
        await wait_for(lambda: len(high.local.got) == 1)
        nursery.cancel_scope.cancel()


async def test_on_demand_a_peer_is_dialled_by_its_first_frame_and_an_idle_session_closed(
        tmp_path, monkeypatch):
    """Past EAGER_DIAL_PEERS (0 here) nothing is dialled until a frame for the peer crosses
    the hub; the session then carries the next ones, is closed once idle (0.5 s here) without
    counting a failure, and the next frame brings it back."""
    import tunnel.direct

    monkeypatch.setattr(tunnel.direct, "EAGER_DIAL_PEERS", 0)
    monkeypatch.setattr(tunnel.direct, "DIRECT_IDLE_SECONDS", 0.5)
    async with trio.open_nursery() as nursery:
        a = Node(tmp_path, "a", listens=True)
        b = Node(tmp_path, "b", listens=False)
        await nursery.start(a.links.run)
        await nursery.start(b.links.run)
        a.links.introduce((b.as_peer(),))
        b.links.introduce((a.as_peer(),))
        await trio.sleep(0.3)
        assert b.port(a).life.ups == 0 and "on demand" in b.port(a).life.describe()
        for round_ in (1, 2):
            b.send(ipv4_frame("a", "b"))  # the hub's (no hub here: counted link_down)
            await wait_for(lambda: b.port(a).active is not None, 2.0)
            b.send(ipv4_frame("a", "b"))
            await wait_for(lambda n=round_: len(a.local.got) == n)  # direct
            await wait_for(lambda: b.port(a).active is None and a.port(b).active is None, 3.0)
            await trio.sleep(0.3)  # and it stays closed: nothing wants it
            assert b.port(a).active is None and b.port(a).life.ups == round_
            assert b.port(a).life.failures == 0
        nursery.cancel_scope.cancel()
