"""The hub's listener and real endpoints in virtual time, over memory streams
(tests/support/memlink.py): logins the hub must refuse (unknown key, wrong hub pinned,
garbage, an oversized record, a stalled handshake) get nothing through and are told what to
do; the key names the endpoint; one key from two places is a warning; reconnects after a hub
restart, with the backoff reset by every session the hub accepted; rekeys stay quiet and lose
nothing; a peer removed from the peers file is disconnected.  The same over real TCP, with
guests: tests/test_tunnel.py; in real processes: tests/test_tunnel_processes.py."""

from __future__ import annotations

import logging
import os
import re
import ssl

import pytest
import trio
import trio.testing

from netstack.frame import Frame
from tests.support.memlink import BROADCAST, MAC_E, MAC_H, MemoryNet, eth, frames_of
from tunnel.endpoint import BACKOFF_SECONDS, JITTER, Endpoint
from tunnel.keys import client_ssl_context, identity_fingerprint, parse_fingerprint
from tunnel.listener import HANDSHAKE_SECONDS, SourceLimiter

# Longer than the first retry can wait; the shortest of the longest waits (a refusal).
FIRST_RETRY = BACKOFF_SECONDS[0] * (1 + JITTER) + 0.01
LONGEST_WAIT = BACKOFF_SECONDS[1] * (1 - JITTER)


async def raw_tls(net: MemoryNet, address: str = "198.51.100.1") -> trio.SSLStream:
    """A stranger's TLS connection to the hub (trio's own TLS, not ours)."""
    tls = trio.SSLStream(await net.connect(address), client_ssl_context(), server_side=False)
    await tls.do_handshake()
    return tls


async def read_until_closed(tls: trio.SSLStream) -> bytes:
    data = b""
    while True:
        try:
            chunk = await tls.receive_some(65536)
        except (trio.BrokenResourceError, ssl.SSLError):
            return data
        if not chunk:
            return data
        data += chunk


async def test_unknown_key_and_wrong_hub_get_nothing_through(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.stranger("stranger")
        stranger = await net.endpoint("stranger", up=False)
        await trio.testing.wait_all_tasks_blocked()
        assert net.listener.refused == {"auth_unknown_key": 1}
        assert stranger.uplink.active is None and "unknown_key" in stranger.last_error
        assert not net.listener.sessions and not net.switch.ports
        # an endpoint that pins another hub key never authenticates
        other_hub = parse_fingerprint(identity_fingerprint(net.identities["stranger"]))
        wrong = await net.endpoint("alice", up=False, hub_fingerprint=other_hub)
        await trio.testing.wait_all_tasks_blocked()
        assert wrong.uplink.active is None and "server_mismatch" in wrong.last_error
        assert not net.listener.sessions and not net.switch.ports


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\n\r\n" * 10,  # garbage
        b"\x01\x00\x00\x00\x7f\xff\xff\xff",  # a HELLO record announcing 2 GiB
    ],
)
async def test_garbage_and_oversized_records_are_refused(tmp_path, autojump_clock, payload):
    async with MemoryNet(tmp_path) as net:
        tls = await raw_tls(net)
        await tls.send_all(payload)
        await read_until_closed(tls)
        await trio.testing.wait_all_tasks_blocked()
        refused = net.listener.refused
        assert len(refused) == 1 and next(iter(refused)).startswith("protocol_"), refused
        assert not net.listener.sessions


async def test_stalled_handshake_is_cut(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        start = trio.current_time()
        tls = await raw_tls(net)  # TLS up, then silence
        await read_until_closed(tls)
        assert trio.current_time() == start + HANDSHAKE_SECONDS
        await trio.testing.wait_all_tasks_blocked()
        assert net.listener.refused == {"handshake_timeout": 1}
        assert net.listener.handshakes == 0


async def test_handshakes_are_rate_limited_per_source(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        net.listener.limiter = SourceLimiter(0.01, 3.0)
        for _ in range(5):
            await (await net.connect("198.51.100.7")).aclose()
        await net.endpoint("alice", address="192.0.2.1")  # another source: not limited
        assert net.listener.refused == {"rate_limited": 2, "handshake_failed": 3}


async def test_endpoint_comes_back_after_a_hub_restart_and_rekeys_without_loss(
        tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        endpoint = await net.endpoint("alice", rekey_seconds=3600)
        guest = net.local_port(endpoint.switch, "e")
        net.stop_hub()  # the hub goes away and comes back a second later
        await trio.testing.wait_all_tasks_blocked()
        assert endpoint.uplink.active is None
        await trio.sleep(1)
        await net.start_hub()
        await trio.sleep(2 + FIRST_RETRY)  # the backoff grew while the hub was away
        assert endpoint.uplink.active is not None and endpoint.uplink.connections == 2
        assert net.listener.sessions["alice"].connections == 1  # the new hub's first
        hub_port = net.local_port(net.switch, "h")
        endpoint.switch.forward(guest, [Frame(eth(BROADCAST, MAC_E, 0))])
        await trio.testing.wait_all_tasks_blocked()
        assert frames_of(hub_port) == [eth(BROADCAST, MAC_E, 0)]
        # rekey: a new connection takes over while frames flow
        first = endpoint.uplink.active
        endpoint.config.rekey_seconds = 0
        await trio.sleep(0.1)  # frames go between the endpoint's once-a-second looks: in order
        frames = [eth(MAC_E, MAC_H, i) for i in range(200)]
        for chunk in range(0, 200, 20):
            net.switch.forward(hub_port, [Frame(f) for f in frames[chunk:chunk + 20]])
            await trio.sleep(0.2)
        endpoint.config.rekey_seconds = 3600
        assert endpoint.uplink.active is not first and endpoint.rekeys >= 1
        assert frames_of(guest) == frames


async def test_removing_a_peer_disconnects_it(tmp_path, autojump_clock):
    async with MemoryNet(tmp_path) as net:
        endpoint = await net.endpoint("alice")
        net.peers.write_text("# nobody\n")
        net.listener.reload()
        await trio.testing.wait_all_tasks_blocked()
        assert net.listener.sessions["alice"].active is None
        assert net.listener.links_ended == {"aborted": 1}
        await trio.sleep(FIRST_RETRY)  # the endpoint tries again, and is refused
        assert net.listener.refused == {"auth_unknown_key": 1}
        assert net.listener.sessions["alice"].active is None
        assert endpoint.last_error == "refused: unknown_key"


async def test_bad_connections_leave_a_working_session_alone(tmp_path, autojump_clock):
    """Garbage, an oversized record, a stalled handshake and an unknown key while a real
    session carries frames: the session never notices."""
    async with MemoryNet(tmp_path) as net:
        endpoint = await net.endpoint("alice")
        guest = net.local_port(endpoint.switch, "e")
        hub_port = net.local_port(net.switch, "h")
        net.stranger("stranger")

        async def attacker(payload: bytes) -> None:
            tls = await raw_tls(net)
            if payload:
                await tls.send_all(payload)
            await read_until_closed(tls)

        async with trio.open_nursery() as attacks:
            attacks.start_soon(attacker, b"\x00" * 100)
            attacks.start_soon(attacker, b"\x03\x00\x00\x00\x7f\xff\xff\xff")
            attacks.start_soon(attacker, b"")  # says nothing: cut at the deadline
            await net.endpoint("stranger", address="198.51.100.2", up=False)
            frames = [eth(MAC_E, MAC_H, i) for i in range(100)]
            for chunk in range(0, 100, 10):
                net.switch.forward(hub_port, [Frame(f) for f in frames[chunk:chunk + 10]])
                await trio.sleep(0.05)
            assert frames_of(guest) == frames
            await trio.sleep(HANDSHAKE_SECONDS)
            attacks.cancel_scope.cancel()
        refused = net.listener.refused
        assert refused.get("handshake_timeout") == 1 and refused.get("auth_unknown_key") == 1
        assert sum(v for k, v in refused.items() if k.startswith("protocol_")) == 2
        assert set(net.listener.sessions) == {"alice"}
        session = net.listener.sessions["alice"]
        assert session.connections == 1 and not session.counters.drops


async def test_the_key_names_the_endpoint_whatever_its_hostname(tmp_path, autojump_clock):
    assert os.uname().nodename.split(".")[0] != "alice"
    async with MemoryNet(tmp_path) as net:
        endpoint = await net.endpoint("alice")  # no name given: the peers file's "alice"
        assert net.listener.sessions["alice"].active is not None
        assert endpoint.status()["name"] is None
        assert endpoint.status()["fingerprint"] == identity_fingerprint(net.identities["alice"])
        # a name given is a check the hub makes, and the right one passes
        await net.endpoint("alice", name="alice")


def refusals(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tunnel.endpoint" and r.levelno == logging.ERROR]


@pytest.mark.parametrize("case", ["unknown_key", "name_mismatch", "wrong_hub"])
async def test_a_refused_login_is_an_error_saying_what_to_do_and_waits_the_longest(
        tmp_path, autojump_clock, caplog, case):
    caplog.set_level(logging.INFO)
    async with MemoryNet(tmp_path) as net:
        stranger_fp = identity_fingerprint(net.stranger("stranger"))
        alice_fp = identity_fingerprint(net.identities["alice"])
        hub_fp = identity_fingerprint(tmp_path / "hub-id")
        if case == "unknown_key":
            endpoint = await net.endpoint("stranger", up=False)
        elif case == "name_mismatch":
            endpoint = await net.endpoint("alice", up=False, name="bob")
        else:
            endpoint = await net.endpoint("alice", up=False,
                                          hub_fingerprint=parse_fingerprint(stranger_fp))
        await trio.testing.wait_all_tasks_blocked()
        [refusal] = refusals(caplog)
        message = refusal.getMessage()
        wait = float(re.search(r"retrying in (\d+) s", message).group(1))
        assert wait >= LONGEST_WAIT - 1
        assert endpoint.uplink.active is None and endpoint.uplink.connections == 0
        if case == "unknown_key":
            assert f"give the hub this fingerprint: {stranger_fp}" in message
        elif case == "name_mismatch":
            assert "'bob'" in message and "drop --name" in message and alice_fp in message
        else:
            assert f"presented key {hub_fp} but --hub-fingerprint is {stranger_fp}" in message
        # it does not hammer the hub: one try, then the long wait
        await trio.sleep(LONGEST_WAIT - 1)
        assert len(refusals(caplog)) == 1
        assert not any("session up" in r.getMessage() for r in caplog.records
                       if r.name == "tunnel.endpoint")


def two_places(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "two places" in r.getMessage()]


async def test_one_key_from_two_places_is_a_warning_naming_both_addresses(tmp_path,
                                                                          autojump_clock,
                                                                          caplog):
    caplog.set_level(logging.INFO)
    async with MemoryNet(tmp_path) as net:
        first = await net.endpoint("alice", address="192.0.2.1")
        assert not two_places(caplog)
        second = await net.endpoint("alice", address="2001:db8::2")
        await trio.testing.wait_all_tasks_blocked()
        assert first.uplink.active is None
        [warning] = two_places(caplog)
        assert warning.startswith("alice:") and "192.0.2.1" in warning and "2001:db8::2" in warning
        # the endpoint that lost the session says why, and does not grab it straight back
        assert any("took the session over" in r.getMessage() for r in caplog.records
                   if r.name == "tunnel.endpoint" and r.levelno == logging.WARNING)
        await trio.sleep(LONGEST_WAIT - 1)
        assert second.uplink.active is not None and first.uplink.active is None


async def test_a_rekey_from_the_same_address_stays_quiet(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO)
    async with MemoryNet(tmp_path) as net:
        endpoint = await net.endpoint("alice", rekey_seconds=10)
        first = endpoint.uplink.active
        await trio.sleep(10.5)
        assert endpoint.uplink.active is not first and endpoint.rekeys == 1
        assert len(net.listener.sessions["alice"].links) == 1
        await trio.sleep(5)
        assert endpoint.uplink.active is not None
        assert not two_places(caplog)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_session_the_hub_accepted_resets_the_backoff(tmp_path, autojump_clock,
                                                             caplog):
    """A hub that goes away again and again (restarts, kill -9) is rejoined at the first
    backoff step every time, not after a delay that doubled with each restart."""
    caplog.set_level(logging.INFO, logger="tunnel.endpoint")
    async with MemoryNet(tmp_path) as net:
        endpoint: Endpoint = await net.endpoint("alice")
        for _ in range(6):
            for link in list(net.listener.sessions["alice"].links):
                link.abort("the hub went away")
            await trio.sleep(FIRST_RETRY)
            assert endpoint.uplink.active is not None
    waits = [float(r.getMessage().split()[-2]) for r in caplog.records
             if r.getMessage().startswith("hub: reconnecting in")]
    assert len(waits) == 6
    assert max(waits) <= BACKOFF_SECONDS[0] * (1 + JITTER)
