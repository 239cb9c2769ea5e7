"""The tunnel end to end in one process over real loopback TCP and TLS: a hub with a guest,
an endpoint with a guest (model front-ends), frames both ways; endpoints the hub must refuse
(unknown key, wrong hub pinned, garbage, oversized record, stalled handshake) get nothing
through, and are told what to do; the key names the endpoint (its hostname does not);
one key from two places is a warning; reconnect after a hub restart; rekey without losing
frames; peers reloaded."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import ssl
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.support.pcapng import read_pcapng
from tests.support.virtio_driver import GuestRam, VhostUserFrontend
from tunnel import listener as listener_module
from tunnel.endpoint import BACKOFF_SECONDS, JITTER, Endpoint, EndpointConfig
from tunnel.hub import Hub, HubConfig
from tunnel.keys import client_ssl_context, keygen, parse_fingerprint

MAC_H = bytes.fromhex("020000000001")  # the guest on the hub
MAC_E = bytes.fromhex("020000000002")  # the guest behind the endpoint
BROADCAST = b"\xff" * 6


def eth(dst: bytes, src: bytes, n: int, size: int = 200) -> bytes:
    return dst + src + b"\x88\xb5" + bytes([n & 0xFF]) * (size - 14)


class Net:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.hub_fp = keygen(tmp_path / "hub-id")
        self.endpoint_fp = keygen(tmp_path / "ep-id")
        self.peers = tmp_path / "peers"
        self.peers.write_text(f"alice {self.endpoint_fp}\n")
        self.hub: Hub | None = None
        self.endpoint: Endpoint | None = None

    @property
    def port(self) -> int:
        return self.hub.tunnel.bound[0][1]

    def hub_config(self, port: int = 0) -> HubConfig:
        return HubConfig(sockets=[str(self.tmp / "h.sock")], listen=("127.0.0.1", port),
                         identity_dir=self.tmp / "hub-id", peers_file=self.peers)

    async def start(self, nursery, hub_config: HubConfig | None = None, **endpoint_kw) -> None:
        """The hub, then the endpoint, running in `nursery`; returns once the session is up."""
        self.hub = Hub(hub_config or self.hub_config())
        await nursery.start(self.hub.run)
        self.endpoint = Endpoint(self.endpoint_config(**endpoint_kw))
        await nursery.start(self.endpoint.run)
        await session_up(self.endpoint)

    def endpoint_config(self, **kw) -> EndpointConfig:
        kw.setdefault("hub_fingerprint", parse_fingerprint(self.hub_fp))
        kw.setdefault("hub_host", "127.0.0.1")
        kw.setdefault("hub_port", self.port)
        kw.setdefault("sockets", [str(self.tmp / "e.sock")])
        return EndpointConfig(identity_dir=self.tmp / "ep-id", **kw)


@asynccontextmanager
async def guest(path):
    with GuestRam(1 << 22) as ram:
        async with VhostUserFrontend.connect(path, ram) as fe:
            fe.net.post_rx(128, 2048)
            fe.kick(0)
            await trio.testing.wait_all_tasks_blocked()
            yield fe


async def send(fe, frames):
    fe.net.send(frames)
    fe.kick(1)


def take(fe) -> list[bytes]:
    """What arrived, with the RX buffers it used posted again (as a guest driver does)."""
    frames = [frame for _, frame in fe.net.receive()]
    if frames:
        fe.net.post_rx(len(frames), 2048)
        fe.kick(0)
    return frames


async def receive(fe, count, timeout=10.0):
    got = []
    rx = fe.queues[0]
    with trio.fail_after(timeout):
        while len(got) < count:
            got.extend(take(fe))
            if len(got) >= count:
                break
            rx.set_used_event(rx.used_idx())
            got.extend(take(fe))
            if len(got) < count:
                with trio.move_on_after(0.2):
                    await fe.wait_call(0, timeout)
    return got


async def session_up(endpoint: Endpoint, timeout=10.0):
    with trio.fail_after(timeout):
        while endpoint.uplink.active is None:
            await trio.sleep(0.01)


@pytest.fixture
def net(tmp_path):
    return Net(tmp_path)


async def test_frames_cross_the_tunnel_both_ways(net):
    async with trio.open_nursery() as nursery:
        await net.start(nursery)
        async with guest(net.tmp / "h.sock") as gh, guest(net.tmp / "e.sock") as ge:
            await send(ge, [eth(BROADCAST, MAC_E, 0)])
            assert len(await receive(gh, 1)) == 1
            frames = [eth(MAC_E, MAC_H, i, 60 + 7 * i) for i in range(100)]
            await send(gh, frames)
            assert await receive(ge, 100) == frames
            back = [eth(MAC_H, MAC_E, i, 1500) for i in range(50)]
            await send(ge, back)
            assert await receive(gh, 50) == back
            session = net.hub.tunnel.sessions["alice"]
            assert session.active is not None and session.counters.in_frames == 51
            status = net.endpoint.status()
            assert status["session"]["state"] == "up"
        nursery.cancel_scope.cancel()


async def test_hub_captures_a_session_that_arrives_after_start(net):
    async with trio.open_nursery() as nursery:
        await net.start(nursery, dataclasses.replace(net.hub_config(), pcap_dir=net.tmp / "pcap"))
        async with guest(net.tmp / "h.sock") as gh, guest(net.tmp / "e.sock") as ge:
            frames = [eth(BROADCAST, MAC_E, i) for i in range(3)]
            await send(ge, frames)
            assert await receive(gh, 3) == frames
        nursery.cancel_scope.cancel()
    captured = read_pcapng(net.tmp / "pcap" / "alice.pcapng")
    assert [(c.direction, c.data) for c in captured] == [("in", f) for f in frames]


@pytest.mark.parametrize(("port_policy", "arrive"), [(True, 16), (False, 20)])
async def test_vm_no_port_policy_lets_a_local_guest_past_the_mac_limit(net, port_policy,
                                                                      arrive):
    """A guest port on the endpoint learns at most 16 source MACs unless the endpoint trusts
    its guests (`vhostvpn vm --no-port-policy`); the hub's session limit (256) is not hit."""
    async with trio.open_nursery() as nursery:
        await net.start(nursery, port_policy=port_policy)
        async with guest(net.tmp / "h.sock") as gh, guest(net.tmp / "e.sock") as ge:
            sources = [bytes([2, 0, 0, 0, 1, n]) for n in range(20)]
            await send(ge, [eth(MAC_H, source, n) for n, source in enumerate(sources)])
            assert len(await receive(gh, arrive)) == arrive
            port = next(p for p in net.endpoint.status()["ports"] if p["name"] == "e.sock")
            assert port["drops"].get("mac_limit", 0) == 20 - arrive
            await send(ge, [eth(MAC_H, sources[0], 99)])  # nothing else was on its way
            assert await receive(gh, 1) == [eth(MAC_H, sources[0], 99)]
        nursery.cancel_scope.cancel()


async def test_unknown_key_and_wrong_hub_get_nothing_through(net):
    stranger_fp = keygen(net.tmp / "stranger")
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        # an endpoint whose key is not in the peers file
        config = net.endpoint_config()
        config.identity_dir = net.tmp / "stranger"
        stranger = Endpoint(config)
        await nursery.start(stranger.run)
        with trio.fail_after(10):
            while not net.hub.tunnel.refused.get("auth_unknown_key"):
                await trio.sleep(0.02)
        assert "alice" not in net.hub.tunnel.sessions
        assert not any(p.name not in ("h.sock",) for p in net.hub.switch.ports)
        # an endpoint that pins another hub key never authenticates
        config = net.endpoint_config(hub_fingerprint=parse_fingerprint(stranger_fp))
        config.sockets = [str(net.tmp / "e2.sock")]
        wrong = Endpoint(config)
        await nursery.start(wrong.run)
        with trio.fail_after(10):
            while not (wrong.last_error and "server_mismatch" in wrong.last_error):
                await trio.sleep(0.02)
        assert wrong.uplink.active is None
        nursery.cancel_scope.cancel()


async def raw_tls(port: int) -> trio.SSLStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, client_ssl_context(), server_side=False)
    await tls.do_handshake()
    return tls


async def read_until_closed(tls: trio.SSLStream, timeout: float = 5.0) -> bytes:
    data = b""
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = await tls.receive_some(65536)
            except (trio.BrokenResourceError, ssl.SSLError):
                return data
            if not chunk:
                return data
            data += chunk


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\n\r\n" * 10,  # garbage
        b"\x01\x00\x00\x00\x7f\xff\xff\xff",  # a HELLO record announcing 2 GiB
    ],
)
async def test_garbage_and_oversized_records_are_refused(net, payload):
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        tls = await raw_tls(net.port)
        await tls.send_all(payload)
        await read_until_closed(tls)
        refused = net.hub.tunnel.refused
        assert any(reason.startswith("protocol_") for reason in refused), refused
        assert not net.hub.tunnel.sessions
        nursery.cancel_scope.cancel()


async def test_stalled_handshake_is_cut(net, monkeypatch):
    monkeypatch.setattr(listener_module, "HANDSHAKE_SECONDS", 0.5)
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        tls = await raw_tls(net.port)  # TLS up, then silence
        await read_until_closed(tls)
        assert net.hub.tunnel.refused.get("handshake_timeout") == 1
        assert net.hub.tunnel.handshakes == 0
        nursery.cancel_scope.cancel()


async def test_handshakes_are_rate_limited_per_source(net, monkeypatch):
    monkeypatch.setattr(listener_module, "HANDSHAKE_BURST", 3.0)
    monkeypatch.setattr(listener_module, "HANDSHAKE_RATE", 0.01)
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        net.hub.tunnel.limiter = listener_module.SourceLimiter(0.01, 3.0)
        for _ in range(5):
            stream = await trio.open_tcp_stream("127.0.0.1", net.port)
            await stream.aclose()
        with trio.fail_after(5):
            while net.hub.tunnel.refused.get("rate_limited", 0) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_endpoint_comes_back_after_a_hub_restart_and_rekeys_without_loss(net):
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        hub_scope = trio.CancelScope()

        async def run_hub(task_status=trio.TASK_STATUS_IGNORED):
            with hub_scope:
                await net.hub.run(task_status=task_status)

        await nursery.start(run_hub)
        port = net.port
        net.endpoint = Endpoint(net.endpoint_config(rekey_seconds=3600))
        await nursery.start(net.endpoint.run)
        await session_up(net.endpoint)
        async with guest(net.tmp / "e.sock") as ge:
            # the hub goes away and comes back on the same port
            hub_scope.cancel()
            with trio.fail_after(10):
                while net.endpoint.uplink.active is not None:
                    await trio.sleep(0.02)
            net.hub = Hub(net.hub_config(port))
            hub_scope = trio.CancelScope()
            await nursery.start(run_hub)
            await session_up(net.endpoint, timeout=20)
            async with guest(net.tmp / "h.sock") as gh:
                await send(ge, [eth(BROADCAST, MAC_E, 0)])
                assert len(await receive(gh, 1)) == 1
                # rekey: a new connection takes over while frames flow
                first = net.endpoint.uplink.active
                net.endpoint.config.rekey_seconds = 0
                frames = [eth(MAC_E, MAC_H, i) for i in range(200)]
                for chunk in range(0, 200, 20):
                    await send(gh, frames[chunk : chunk + 20])
                    await trio.sleep(0.05)
                with trio.fail_after(10):
                    while net.endpoint.uplink.active is first:
                        await trio.sleep(0.02)
                net.endpoint.config.rekey_seconds = 3600
                assert await receive(ge, 200) == frames
                assert net.endpoint.uplink.connections >= 2
        nursery.cancel_scope.cancel()


async def test_removing_a_peer_disconnects_it(net):
    async with trio.open_nursery() as nursery:
        await net.start(nursery)
        net.peers.write_text("# nobody\n")
        net.hub.tunnel.reload()
        with trio.fail_after(10):
            while net.hub.tunnel.sessions["alice"].active is not None:
                await trio.sleep(0.02)
        with trio.fail_after(10):
            while not net.hub.tunnel.refused.get("auth_unknown_key"):
                await trio.sleep(0.05)
        assert net.hub.tunnel.sessions["alice"].active is None
        nursery.cancel_scope.cancel()


async def test_bad_connections_leave_a_working_session_alone(net, monkeypatch):
    """Garbage, an oversized record, a stalled handshake and an unknown key while a real
    session carries frames: the session never notices."""
    monkeypatch.setattr(listener_module, "HANDSHAKE_SECONDS", 1.0)
    stranger_fp = keygen(net.tmp / "stranger")
    assert stranger_fp
    async with trio.open_nursery() as nursery:
        await net.start(nursery)
        async with guest(net.tmp / "h.sock") as gh, guest(net.tmp / "e.sock") as ge:
            await send(ge, [eth(BROADCAST, MAC_E, 0)])
            assert len(await receive(gh, 1)) == 1

            async def attacker(payload: bytes) -> None:
                tls = await raw_tls(net.port)
                if payload:
                    await tls.send_all(payload)
                await read_until_closed(tls)

            config = net.endpoint_config()
            config.identity_dir = net.tmp / "stranger"
            config.sockets = [str(net.tmp / "s.sock")]
            stranger = Endpoint(config)
            async with trio.open_nursery() as attacks:
                attacks.start_soon(attacker, b"\x00" * 100)
                attacks.start_soon(attacker, b"\x03\x00\x00\x00\x7f\xff\xff\xff")
                attacks.start_soon(attacker, b"")  # says nothing: cut at the deadline
                await attacks.start(stranger.run)
                frames = [eth(MAC_E, MAC_H, i) for i in range(100)]
                for chunk in range(0, 100, 10):
                    await send(gh, frames[chunk : chunk + 10])
                    await trio.sleep(0.05)
                assert await receive(ge, 100) == frames
                with trio.fail_after(10):
                    while not (net.hub.tunnel.refused.get("auth_unknown_key")
                               and net.hub.tunnel.refused.get("handshake_timeout")):
                        await trio.sleep(0.02)
                attacks.cancel_scope.cancel()
            refused = net.hub.tunnel.refused
            assert refused.get("handshake_timeout") and refused.get("auth_unknown_key")
            assert sum(v for k, v in refused.items() if k.startswith("protocol_")) >= 2
            assert set(net.hub.tunnel.sessions) == {"alice"}
            session = net.hub.tunnel.sessions["alice"]
            assert session.connections == 1 and not session.counters.drops
        nursery.cancel_scope.cancel()


async def test_the_key_names_the_endpoint_whatever_its_hostname(net):
    assert os.uname().nodename.split(".")[0] != "alice"
    async with trio.open_nursery() as nursery:
        await net.start(nursery)  # no name given: the peers file's "alice" it is
        assert net.hub.tunnel.sessions["alice"].active is not None
        assert net.endpoint.status()["name"] is None
        assert net.endpoint.status()["fingerprint"] == net.endpoint_fp
        # a name given is a check the hub makes, and the right one passes
        config = net.endpoint_config(name="alice", sockets=[str(net.tmp / "e2.sock")])
        checked = Endpoint(config)
        await nursery.start(checked.run)
        await session_up(checked)
        nursery.cancel_scope.cancel()


def refusals(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tunnel.endpoint" and r.levelno == logging.ERROR]


async def refused_once(caplog, endpoint: Endpoint) -> str:
    """The ERROR the endpoint logged for its first refusal; the wait it announced must be
    the longest backoff."""
    with trio.fail_after(10):
        while not refusals(caplog):
            await trio.sleep(0.02)
    message = refusals(caplog)[0].getMessage()
    wait = float(re.search(r"retrying in (\d+) s", message).group(1))
    assert wait >= BACKOFF_SECONDS[1] * (1 - JITTER) - 1
    assert endpoint.uplink.active is None and endpoint.uplink.connections == 0
    return message


@pytest.mark.parametrize("case", ["unknown_key", "name_mismatch", "wrong_hub"])
async def test_a_refused_login_is_an_error_saying_what_to_do_and_waits_the_longest(
        net, caplog, case):
    caplog.set_level(logging.INFO)
    stranger_fp = keygen(net.tmp / "stranger")
    async with trio.open_nursery() as nursery:
        net.hub = Hub(net.hub_config())
        await nursery.start(net.hub.run)
        config = net.endpoint_config()
        if case == "unknown_key":
            config.identity_dir = net.tmp / "stranger"
        elif case == "name_mismatch":
            config.name = "bob"
        else:
            config.hub_fingerprint = parse_fingerprint(stranger_fp)
        endpoint = Endpoint(config)
        await nursery.start(endpoint.run)
        message = await refused_once(caplog, endpoint)
        if case == "unknown_key":
            assert f"give the hub this fingerprint: {stranger_fp}" in message
        elif case == "name_mismatch":
            assert "'bob'" in message and "drop --name" in message and net.endpoint_fp in message
        else:
            assert f"presented key {net.hub_fp} but --hub-fingerprint is {stranger_fp}" in message
        # it does not hammer the hub: one try, then the long wait
        await trio.sleep(1)
        assert len(refusals(caplog)) == 1
        assert not any("session up" in r.getMessage() for r in caplog.records
                       if r.name == "tunnel.endpoint")
        nursery.cancel_scope.cancel()


def two_places(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "two places" in r.getMessage()]


async def test_one_key_from_two_places_is_a_warning_naming_both_addresses(net, caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        net.hub = Hub(dataclasses.replace(net.hub_config(), listen=(None, 0)))
        await nursery.start(net.hub.run)
        port_of = {host: port for host, port in net.hub.tunnel.bound}
        first = Endpoint(net.endpoint_config(hub_host="127.0.0.1", hub_port=port_of["0.0.0.0"]))
        await nursery.start(first.run)
        await session_up(first)
        assert not two_places(caplog)
        second = Endpoint(net.endpoint_config(hub_host="::1", hub_port=port_of["::"],
                                              sockets=[str(net.tmp / "e2.sock")]))
        await nursery.start(second.run)
        await session_up(second)
        with trio.fail_after(10):
            while first.uplink.active is not None:
                await trio.sleep(0.02)
        [warning] = two_places(caplog)
        assert warning.startswith("alice:") and "127.0.0.1" in warning and "::1" in warning
        # the endpoint that lost the session says why, and does not grab it straight back
        with trio.fail_after(10):
            while not any("took the session over" in r.getMessage() for r in caplog.records
                          if r.name == "tunnel.endpoint" and r.levelno == logging.WARNING):
                await trio.sleep(0.02)
        await trio.sleep(1)
        assert second.uplink.active is not None and first.uplink.active is None
        nursery.cancel_scope.cancel()


async def test_a_rekey_from_the_same_address_stays_quiet(net, caplog):
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        await net.start(nursery)
        first = net.endpoint.uplink.active
        net.endpoint.config.rekey_seconds = 0
        with trio.fail_after(10):
            while net.endpoint.uplink.active is first:
                await trio.sleep(0.02)
        net.endpoint.config.rekey_seconds = 3600
        with trio.fail_after(10):
            while len(net.hub.tunnel.sessions["alice"].links) > 1:
                await trio.sleep(0.02)
        await trio.sleep(0.5)
        assert net.endpoint.uplink.active is not None
        assert not two_places(caplog)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        nursery.cancel_scope.cancel()


async def test_a_session_the_hub_accepted_resets_the_backoff(net, caplog):
    """A hub that goes away again and again (restarts, kill -9) is rejoined at the first
    backoff step every time, not after a delay that doubled with each restart."""
    caplog.set_level(logging.INFO, logger="tunnel.endpoint")
    async with trio.open_nursery() as nursery:
        await net.start(nursery)
        for _ in range(6):
            for link in list(net.hub.tunnel.sessions["alice"].links):
                link.abort("the hub went away")
            await trio.sleep(0.1)
            await session_up(net.endpoint)
        nursery.cancel_scope.cancel()
    waits = [float(r.getMessage().split()[-2]) for r in caplog.records
             if r.getMessage().startswith("hub: reconnecting in")]
    assert len(waits) == 6
    assert max(waits) <= BACKOFF_SECONDS[0] * (1 + JITTER)
