"""The tunnel end to end in one process over real loopback TCP and TLS: a hub with a guest,
an endpoint with a guest (model front-ends on real vhost-user sockets), frames both ways,
captures, the guests' port policy.  Logins, refusals, reconnects and rekeys, in virtual time
over memory streams: tests/test_tunnel_sessions.py."""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.support.pcapng import read_pcapng
from tests.support.virtio_driver import GuestRam, VhostUserFrontend
from tunnel.endpoint import Endpoint, EndpointConfig
from tunnel.hub import Hub, HubConfig
from tunnel.keys import keygen, parse_fingerprint

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
    """`count` frames, taken as the backend calls the guest (EVENT_IDX: the guest asks for
    a call at the next used entry, then looks once more before it waits)."""
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
                await fe.wait_call(0, timeout)
    return got


async def session_up(endpoint: Endpoint) -> None:
    """The endpoint's login over loopback needs no timer: once every task waits, it is
    done (the kernel hands loopback bytes over within the send)."""
    await trio.testing.wait_all_tasks_blocked()
    assert endpoint.uplink.active is not None, endpoint.last_error


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
