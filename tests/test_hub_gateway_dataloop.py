"""The hub's gateway on the data loop: a real Hub (switch, gateway, tunnel listener) run by
`virtio.dataloop.run` as `vhostvpn hub` runs it, with raw peers over loopback TLS
(tests/support/tunnel_client.py).  The gateway's replies leave from the handler of the link
that brought the request (no task wakes for them), and a peer flooding the gateway with ARP
requests and pings gets its rate of answers while another peer is answered all along, with
nothing held for it."""

from __future__ import annotations

import time
from pathlib import Path

import trio
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from netstack.frame import Frame
from netstack.policy import DEFAULT_SERVICE_BURST, DEFAULT_SERVICE_RATE
from tests.support.tunnel_client import ALICE_IP, ALICE_MAC, GATEWAY, SUBNET, RawPeer, connect_peer
from tunnel.hub import Hub, HubConfig
from tunnel.keys import keygen, parse_fingerprint
from tunnel.session import Link
from virtio import dataloop

MALLORY_MAC = bytes.fromhex("020000000b01")
MALLORY_IP = "10.77.0.66"
FLOOD_SECONDS = 2.0
# The longest alice's echo to the gateway may wait while mallory floods it (the bar
# for a stall under attack; this process runs both peers besides the hub).
ECHO_TIMEOUT = 2.0


def run_hub(tmp: Path, scenario) -> object:
    """`scenario(hub, connect)` on the data loop, a Hub with a gateway on SUBNET and a
    tunnel listener for alice and mallory serving beside it."""
    fingerprint = parse_fingerprint(keygen(tmp / "hub-id"))
    (tmp / "peers").write_text("".join(f"{name} {keygen(tmp / f'{name}-id')}\n"
                                       for name in ("alice", "mallory")))
    config = HubConfig(subnet=SUBNET, state_dir=tmp, listen=("127.0.0.1", 0),
                       identity_dir=tmp / "hub-id", peers_file=tmp / "peers", direct=False)

    async def main() -> object:
        hub = Hub(config)
        assert hub.tunnel is not None

        async def connect(name: str) -> RawPeer:
            peer = await connect_peer(hub.tunnel.bound[0][1], tmp / f"{name}-id", fingerprint,
                                      name)
            with trio.fail_after(5):
                while name not in hub.tunnel.sessions or hub.tunnel.sessions[name].active \
                        is None:
                    await trio.sleep(0.01)
            return peer

        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            result = await scenario(hub, connect)
            nursery.cancel_scope.cancel()
        return result

    return dataloop.run(main)


def test_the_gateways_echo_reply_leaves_from_the_handler_that_read_the_request(
        tmp_path, monkeypatch):
    """Each call of a link's reader handler that made the gateway answer also sent the
    answer out of alice's port (before: the gateway's task did, after the handler)."""
    calls: list[tuple[int, int]] = []

    original = Link._on_readable

    async def scenario(hub: Hub, connect) -> list[tuple[int, int]]:
        def on_readable(link: Link) -> bool:
            echoes, sent = hub.gateway.services["icmp_echo"], link.port.counters.out_frames
            try:
                return original(link)
            finally:
                if hub.gateway.services["icmp_echo"] != echoes:
                    calls.append((hub.gateway.services["icmp_echo"] - echoes,
                                  link.port.counters.out_frames - sent))

        monkeypatch.setattr(Link, "_on_readable", on_readable)
        alice = await connect("alice")
        for sequence in range(5):
            await alice.echo(ALICE_MAC, ALICE_IP, hub.gateway.mac, GATEWAY, sequence)
        return calls

    assert run_hub(tmp_path, scenario) == [(1, 1)] * 5


def test_a_peer_flooding_the_gateway_gets_its_rate_of_answers_and_starves_nobody(tmp_path):
    async def scenario(hub: Hub, connect) -> dict[str, object]:
        alice = await connect("alice")
        mallory = await connect("mallory")
        arp = Frame(bytes(Ether(src=MALLORY_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=MALLORY_MAC, psrc=MALLORY_IP, pdst=str(GATEWAY.ip))))
        echo = Frame(bytes(Ether(src=MALLORY_MAC, dst=hub.gateway.mac)
                           / IP(src=MALLORY_IP, dst=str(GATEWAY.ip)) / ICMP(type=8)))
        record = mallory.wire.send_frames([arp, echo] * 32)
        flooded = 0
        outbox = 0
        waits: list[float] = []

        async def drain() -> None:  # mallory takes every answer: the most work for the hub
            while await mallory.tls.receive_some(1 << 16):
                pass

        async def flood() -> None:
            nonlocal flooded, outbox
            deadline = trio.current_time() + FLOOD_SECONDS
            while trio.current_time() < deadline:
                await mallory.tls.send_all(record)
                flooded += 64
                outbox = max(outbox, len(hub.gateway.outbox))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            nursery.start_soon(flood)
            started = time.monotonic()
            sequence = 0
            while time.monotonic() - started < FLOOD_SECONDS:
                before = time.monotonic()
                await alice.echo(ALICE_MAC, ALICE_IP, hub.gateway.mac, GATEWAY, sequence,
                                 timeout=ECHO_TIMEOUT)
                waits.append(time.monotonic() - before)
                sequence += 1
                await trio.sleep(0.05)
            elapsed = time.monotonic() - started
            nursery.cancel_scope.cancel()
        return {"flooded": flooded, "outbox": max(outbox, len(hub.gateway.outbox)),
                "waits": waits, "elapsed": elapsed,
                "mallory": dict(hub.tunnel.sessions["mallory"].counters.drops),
                "alice": dict(hub.tunnel.sessions["alice"].counters.drops),
                "services": dict(hub.gateway.services)}

    result = run_hub(tmp_path, scenario)
    assert result["flooded"] > 10 * DEFAULT_SERVICE_BURST, result["flooded"]
    assert len(result["waits"]) >= 5 and not result["alice"]
    # mallory's frames beyond its rates were counted, on its own port ...
    assert result["mallory"]["service_rate"] > 0 and result["mallory"]["flood_rate"] > 0
    # ... the gateway answered at most its rate of pings, and held none of it
    allowed = DEFAULT_SERVICE_BURST + DEFAULT_SERVICE_RATE * (result["elapsed"] + 1)
    assert result["services"]["icmp_echo"] <= allowed + len(result["waits"])
    assert result["outbox"] == 0
