"""The hub's half of direct paths (tunnel/introducer.py, tunnel/listener.py) with its real
listener and authenticated raw peers over memory streams, in virtual time: who gets an INTRO
naming whom, with which fingerprint, addresses and bindings; `--no-direct`; the peers file
reload; old endpoints; and what an endpoint may not do (ADVERTISE garbage, before AUTH, in a
flood; INTRO to the hub).  In real processes: tests/test_hub_direct_processes.py."""

from __future__ import annotations

import ipaddress
import logging

import pytest
import trio
import trio.testing
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from netstack.frame import Frame
from tests.support.memlink import MemoryNet
from tests.support.tunnel_client import RawPeer
from tunnel import introducer as introducer_module
from tunnel.cli.status import format_status
from tunnel.hub import Hub, HubConfig
from tunnel.introducer import INTRO_MIN_INTERVAL, RESCAN_SECONDS, resolve
from tunnel.keys import identity_fingerprint
from tunnel.wire import (
    ADVERTISE,
    INTRO,
    MAX_ADVERTISES,
    RECORD_HEADER,
    Closed,
    Intro,
    Ping,
)

MAC_A = bytes.fromhex("02000000aa01")
MAC_B = bytes.fromhex("02000000bb01")


async def peer(net: MemoryNet, name: str, address: str, advertise=None) -> RawPeer:
    """`name` logged in from `address` on an introducing link; with `advertise` (a list of
    (host, port)), its ADVERTISE right behind AUTH."""
    raw = await net.raw_peer(name, address, introductions=True)
    if advertise is not None:
        await raw.tls.send_all(raw.wire.send_advertise(advertise))
    return raw


async def listen(raw: RawPeer, seconds: float) -> list:
    """Every event `raw` hears for `seconds` (virtual), PINGs answered; stops at a CLOSE."""
    events: list = []
    with trio.move_on_after(seconds):
        while True:
            try:
                data = await raw.tls.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return events
            raw.wire.receive_data(data)
            for event in raw.wire.next_events():
                events.append(event)
                if isinstance(event, Ping):
                    await raw.tls.send_all(raw.wire.send_pong(event.nonce, event.timestamp_ns))
                if isinstance(event, Closed):
                    return events
            if not data:
                return events
    return events


def intros(events: list) -> list[Intro]:
    return [e for e in events if isinstance(e, Intro)]


def udp_frame(mac: bytes, ipv4: str, ipv6: str | None = None) -> Frame:
    inner = IPv6(src=ipv6, dst="fd00::99") if ipv6 else IP(src=ipv4, dst="10.9.9.9")
    return Frame(bytes(Ether(src=mac, dst="02:00:00:00:99:99") / inner / UDP(sport=1, dport=2)))


def fingerprint(net: MemoryNet, name: str) -> str:
    return identity_fingerprint(net.identities[name])


async def test_each_endpoint_is_introduced_to_the_other_with_key_address_and_bindings(
        tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1", [("0.0.0.0", 4000)])
        bob = await peer(net, "bob", "192.0.2.2", [])
        # Traffic binds MACs and addresses to each session on the hub's switch.
        await alice.tls.send_all(alice.wire.send_frames([udp_frame(MAC_A, "10.0.0.5")]))
        await bob.tls.send_all(bob.wire.send_frames([udp_frame(MAC_B, "", "fd00::b")]))
        [to_alice] = intros(await listen(alice, 1.0))[-1:]
        [to_bob] = intros(await listen(bob, 0.1))[-1:]
        [bob_seen] = [entry.decoded() for entry in to_alice.peers]
        assert bob_seen.name == "bob" and bob_seen.fingerprint == fingerprint(net, "bob")
        assert bob_seen.addresses == ()  # bob only dials
        assert bob_seen.macs == {MAC_B} and bob_seen.ipv6 == {ipaddress.ip_address("fd00::b")}
        assert bob_seen.ipv4 == set()
        [alice_seen] = [entry.decoded() for entry in to_bob.peers]
        assert alice_seen.fingerprint == fingerprint(net, "alice")
        assert alice_seen.addresses == (("192.0.2.1", 4000),)  # the wildcard: where it is seen
        assert alice_seen.macs == {MAC_A}
        assert alice_seen.ipv4 == {ipaddress.ip_address("10.0.0.5")}


async def test_bindings_learned_later_reach_the_peer_in_a_new_intro(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1", [("198.51.100.1", 4000)])
        bob = await peer(net, "bob", "192.0.2.2", [])
        first = intros(await listen(bob, 1.0))
        assert first[-1].peers[0].decoded().macs == frozenset()
        await alice.tls.send_all(alice.wire.send_frames([udp_frame(MAC_A, "10.0.0.5")]))
        later = intros(await listen(bob, 1.0))
        assert later[-1].peers[0].decoded().macs == {MAC_A}
        assert later[-1].peers[0].addresses == (("198.51.100.1", 4000),)


async def test_a_peer_is_never_introduced_before_its_bindings_are_read(tmp_path,
                                                                      autojump_clock,
                                                                      monkeypatch):
    """With scans slowed to one table entry a tick, alice advertises while the scan started
    for bob is under way: no INTRO names her without the MAC the hub learned on her session."""
    monkeypatch.setattr(introducer_module, "SCAN_ENTRIES_PER_TICK", 1)
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1")
        await alice.tls.send_all(alice.wire.send_frames([udp_frame(MAC_A, "10.0.0.5")]))
        bob = await peer(net, "bob", "192.0.2.2", [])
        await trio.sleep(INTRO_MIN_INTERVAL * 1.5)  # bob's scan has begun
        assert net.listener.introducer._scanning is not None
        await alice.tls.send_all(alice.wire.send_advertise([("198.51.100.1", 4000)]))
        naming_alice = [i.peers for i in intros(await listen(bob, 5.0)) if i.peers]
        assert naming_alice and all(p.decoded().macs == {MAC_A} for [p] in naming_alice)


async def test_two_endpoints_that_only_dial_are_not_introduced(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1", [])
        await peer(net, "bob", "192.0.2.2", [])
        got = intros(await listen(alice, 1.0))
        assert [i.peers for i in got] == [()]  # introductions are on; nobody to reach


async def test_no_direct_introduces_nobody(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path, direct=False) as net:
        net.add_peer("bob")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1", [("0.0.0.0", 4000)])
        bob = await peer(net, "bob", "192.0.2.2", [("0.0.0.0", 4001)])
        # one empty INTRO each (what an earlier hub introduced is void), never a peer
        assert [i.peers for i in intros(await listen(alice, 3.0))] == [()]
        assert [i.peers for i in intros(await listen(bob, 0.1))] == [()]
        assert net.listener.introducer.intros == 0
        assert net.listener.status()["direct"]["enabled"] is False


async def test_an_endpoint_that_does_not_advertise_is_neither_told_nor_introduced(
        tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1", [("0.0.0.0", 4000)])
        bob = await peer(net, "bob", "192.0.2.2")  # an endpoint without direct paths
        assert [i.peers for i in intros(await listen(alice, 1.0))] == [()]
        assert intros(await listen(bob, 0.1)) == []


async def test_a_version_1_endpoint_gets_nothing_new(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        await peer(net, "alice", "192.0.2.1", [("0.0.0.0", 4000)])
        stream = await net.connect("192.0.2.2")
        from tests.support.tunnel_client import log_in
        old = await log_in(stream, net.identities["bob"], net.hub_fingerprint, "bob")
        assert old.wire.version == 2 and not old.wire.introducing
        events = await listen(old, 1.0)
        assert not intros(events) and not any(isinstance(e, Closed) for e in events)


async def test_a_peer_removed_from_the_peers_file_leaves_everybodys_next_intro(
        tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.add_peer("carol")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1", [("0.0.0.0", 4000)])
        bob = await peer(net, "bob", "192.0.2.2", [("0.0.0.0", 4000)])
        await peer(net, "carol", "192.0.2.3", [])
        before = intros(await listen(alice, 1.0))[-1]
        assert sorted(p.name for p in before.peers) == ["bob", "carol"]
        net.peers.write_text("\n".join(line for line in net.peers.read_text().splitlines()
                                       if not line.startswith("bob ")) + "\n")
        net.listener.reload()
        after = intros(await listen(alice, 1.0))[-1]
        assert [p.name for p in after.peers] == ["carol"]
        await listen(bob, 1.0)
        assert net.listener.sessions["bob"].active is None
        assert net.listener.links_ended == {"aborted": 1}


async def test_a_reconnected_endpoint_is_introduced_only_once_it_advertises_again(
        tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1", [])
        await peer(net, "bob", "192.0.2.2", [("0.0.0.0", 4000)])
        assert [p.name for p in intros(await listen(alice, 1.0))[-1].peers] == ["bob"]
        await peer(net, "bob", "192.0.2.2")  # bob's new link takes over, without ADVERTISE
        assert intros(await listen(alice, 1.0))[-1].peers == ()


async def test_advertises_are_coalesced_and_a_flood_of_them_closes_the_link(
        tmp_path, autojump_clock, caplog):
    """MAX_ADVERTISES ADVERTISEs with changing addresses within 0.1 s: the others get at most
    one INTRO per INTRO_MIN_INTERVAL, the last with the latest address, and the log one line;
    one more is a flood: that link is closed, the other session goes on."""
    caplog.set_level(logging.INFO, "tunnel.introducer")
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1", [])
        bob = await peer(net, "bob", "192.0.2.2", [])
        await listen(bob, 0.5)
        for n in range(2, MAX_ADVERTISES + 1):
            await alice.tls.send_all(alice.wire.send_advertise([("198.51.100.1", n)]))
            await trio.sleep(0.1 / MAX_ADVERTISES)
        got = intros(await listen(bob, 1.0))
        assert 1 <= len(got) <= 2
        assert got[-1].peers[0].addresses == (("198.51.100.1", MAX_ADVERTISES),)
        lines = [r for r in caplog.records if r.levelno >= logging.INFO
                 and r.getMessage().startswith("alice: advertised")]
        assert len(lines) == 1
        await alice.tls.send_all(alice.wire.send_advertise([("198.51.100.1", 1)]))
        events = await listen(alice, 1.0)
        assert isinstance(events[-1], Closed) and events[-1].reason == "advertise_flood"
        await trio.sleep(1)
        assert net.listener.links_ended == {"protocol_error": 1}
        assert intros(await listen(bob, 1.0))[-1].peers == ()  # alice is gone
        assert net.listener.sessions["bob"].active is not None


async def test_an_unchanged_hub_does_no_binding_scans_between_rescans(tmp_path,
                                                                      autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        alice = await peer(net, "alice", "192.0.2.1", [("0.0.0.0", 4000)])
        await peer(net, "bob", "192.0.2.2", [])
        await listen(alice, 1.0)
        scans, made = net.listener.introducer.scans, net.listener.introducer.intros
        await listen(alice, 10.0)  # less than bob, silent, may stay
        assert net.listener.introducer.scans - scans <= 10.0 // RESCAN_SECONDS + 1  # of 40 ticks
        assert net.listener.introducer.intros == made  # nothing changed: nothing sent


# --- what an endpoint may not do -------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    b"\x05" + (b"\x04\xc0\x00\x02\x01\x00\x50" * 5),  # more addresses than allowed
    b"\x01\x09\x00\x00\x00\x00\x00\x50",  # family 9
    b"\x01\x04\xc0\x00\x02\x01\x00\x00",  # port 0
    b"\x01\x04\xc0",  # cut short
    b"\x00" * 200,  # oversized
])
async def test_a_bad_advertise_closes_only_that_link(tmp_path, autojump_clock, payload):
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        bob = await peer(net, "bob", "192.0.2.2", [])
        alice = await peer(net, "alice", "192.0.2.1")
        await alice.tls.send_all(RECORD_HEADER.pack(ADVERTISE, 0, 0, len(payload)) + payload)
        events = await listen(alice, 1.0)
        assert isinstance(events[-1], Closed) and events[-1].reason.startswith(
            ("bad_advertise", "too_large"))
        await trio.sleep(1)  # the hub counts the link's end
        assert net.listener.links_ended == {"protocol_error": 1}
        assert net.listener.sessions["bob"].active is not None
        assert [i.peers for i in intros(await listen(bob, 0.5))] == [()]


async def test_an_intro_sent_to_the_hub_is_refused(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        alice = await peer(net, "alice", "192.0.2.1", [])
        await alice.tls.send_all(RECORD_HEADER.pack(INTRO, 0, 0, 2) + b"\x00\x00")
        events = await listen(alice, 1.0)
        assert isinstance(events[-1], Closed) and events[-1].reason == "unexpected"
        await trio.sleep(1)  # the hub counts the link's end
        assert net.listener.links_ended == {"protocol_error": 1}


async def test_an_advertise_before_auth_is_refused(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        from tests.support.tunnel_client import RawPeer as _Raw
        from tunnel.keys import check_server, client_ssl_context
        from tunnel.tls import TLSStream
        from tunnel.wire import WireConnection
        stream = await net.connect("198.51.100.7")
        tls = TLSStream(stream, client_ssl_context(), server_side=False)
        await tls.do_handshake()
        check_server(tls, net.hub_fingerprint)
        wire = WireConnection("client", name="x", offloads=0, mtu=1500, introductions=True)
        await tls.send_all(wire.send_hello() + RECORD_HEADER.pack(ADVERTISE, 0, 0, 1) + b"\0")
        await listen(_Raw(tls, wire), 2.0)
        await trio.sleep(1)
        assert net.listener.refused == {"protocol_unauthenticated": 1}
        assert net.listener.introducer.advertised == {}


# --- the rules for advertised addresses -----------------------------------------------------


@pytest.mark.parametrize(("sent", "observed", "introduced"), [
    ((("0.0.0.0", 1),), "192.0.2.1", (("192.0.2.1", 1),)),
    ((("::", 1),), "::ffff:192.0.2.1", ()),  # an IPv6 wildcard: no IPv4 dials
    ((("0.0.0.0", 1), ("::", 1)), "::ffff:192.0.2.1", (("192.0.2.1", 1),)),
    ((("::", 1),), "2001:db8::1", (("2001:db8::1", 1),)),
    ((("127.0.0.1", 1),), "192.0.2.1", ()),  # not its peers' own loopback
    ((("127.0.0.1", 1),), "127.0.0.1", (("127.0.0.1", 1),)),  # one machine: fine
    ((("fe80::1", 1),), "192.0.2.1", ()),  # needs a scope
    ((("192.0.2.9", 1), ("192.0.2.9", 1), ("0.0.0.0", 1)), "192.0.2.9", (("192.0.2.9", 1),)),
    ((("198.51.100.1", 7),), None, (("198.51.100.1", 7),)),
    ((("0.0.0.0", 7),), None, ()),
])
def test_advertised_addresses_as_peers_may_dial_them(sent, observed, introduced):
    assert resolve(sent, observed) == introduced


# --- status ----------------------------------------------------------------------------------


async def test_hub_status_shows_what_each_session_advertised_and_introductions(
        tmp_path, autojump_clock):
    identity = tmp_path / "hub-id"
    async with MemoryNet(tmp_path) as net:
        net.add_peer("bob")
        net.listener.reload()
        hub = Hub(HubConfig(listen=("127.0.0.1", 0), identity_dir=identity,
                            peers_file=net.peers))
        hub.switch, hub.tunnel = net.switch, net.listener  # the memory net's, running
        alice = await peer(net, "alice", "192.0.2.1", [("0.0.0.0", 4000)])
        await peer(net, "bob", "192.0.2.2", [])
        await listen(alice, 1.0)
        state = hub.status()
        sessions = {p["name"]: p for p in state["ports"] if p.get("kind") == "session"}
        assert sessions["alice"]["direct"] == {
            "advertised": ["192.0.2.1:4000"], "sent": ["0.0.0.0:4000"], "listens": True,
            "introduced": 1, "introduced_to": 1}
        assert sessions["bob"]["direct"]["listens"] is False
        assert state["tunnel"]["direct"]["enabled"] is True
        text = format_status(state)
        assert "introductions on" in text
        assert "direct: advertised 192.0.2.1:4000, 1 peers introduced to it" in text


# --- the flag --------------------------------------------------------------------------------


def test_no_direct_reaches_the_hub_config_from_the_command_line_and_a_config_file(
        tmp_path, monkeypatch):
    import tunnel.cli.roles
    import tunnel.hub
    from tunnel.cli.main import main

    configs = []

    class Recorder:
        tunnel = None

        def __init__(self, config):
            configs.append(config)

        async def run(self):
            raise AssertionError("not started in this test")

        def status(self):
            return {}

    monkeypatch.setattr(tunnel.hub, "Hub", Recorder)
    monkeypatch.setattr(tunnel.cli.roles, "run_role", lambda *args, **kwargs: 0)
    hub = ["hub", "--socket", str(tmp_path / "a.sock"), "--state-dir", str(tmp_path)]
    config_file = tmp_path / "hub.toml"
    config_file.write_text("no-direct = true\n")
    assert main(hub) == 0
    assert main([*hub, "--no-direct"]) == 0
    assert main([*hub, "--config", str(config_file)]) == 0
    assert [config.direct for config in configs] == [True, False, False]
