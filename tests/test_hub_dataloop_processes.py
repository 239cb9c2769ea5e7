"""A real `vhostvpn hub` process, which serves its links on the data loop
(virtio/dataloop.py), attacked where the loop changed the path, while alice (a raw peer)
pings the hub's gateway: a peer that floods records (alice's echoes still get through), a
peer that sends TLS KeyUpdates (answered; its traffic flows under the new keys), a reset in
the middle of a TLS record (only that link ends); and the signals: SIGHUP rereads the peers
file (an endpoint ignores it), SIGTERM and SIGINT end the hub and the endpoint cleanly
(exit status 0)."""

from __future__ import annotations

import signal
import socket
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from netstack.frame import Frame
from tests.support.hub import TunnelKeys, VhostvpnProcess, endpoint_process, hub_process
from tests.support.tls_peer import request_key_update
from tests.support.tunnel_client import ALICE_IP, ALICE_MAC, GATEWAY, SUBNET, RawPeer, connect_peer
from tunnel.hub import gateway_mac
from tunnel.keys import parse_fingerprint

MALLORY_MAC = bytes.fromhex("020000000a66")
MALLORY_IP = "10.77.0.66"


@dataclass
class Lab:
    tmp: Path
    keys: TunnelKeys
    hub: VhostvpnProcess
    alice: RawPeer
    sequence: int = 0

    async def alice_echoes(self, timeout: float = 5.0) -> None:
        """alice's ping crosses the hub's switch to its gateway and back in time."""
        assert self.hub.process.poll() is None, "the hub process died"
        self.sequence += 1
        await self.alice.echo(ALICE_MAC, ALICE_IP, gateway_mac(SUBNET), GATEWAY, self.sequence,
                              timeout=timeout)

    async def peer(self, name: str, **kw) -> RawPeer:
        return await connect_peer(self.keys.port, self.tmp / f"{name}-id",
                                  parse_fingerprint(self.keys.hub_fingerprint), name, **kw)

    async def links_ended(self) -> dict[str, int]:
        return (await self.hub.status())["tunnel"]["links_ended"]


@asynccontextmanager
async def lab(tmp_path: Path, *peers: str):
    keys = TunnelKeys(tmp_path, ("alice", "mallory", *peers))
    hub_args = keys.hub_args("--subnet", str(SUBNET), "--no-dhcp", "--log-level", "info")
    async with hub_process(tmp_path, [], hub_args) as hub:
        alice = await connect_peer(keys.port, tmp_path / "alice-id",
                                   parse_fingerprint(keys.hub_fingerprint), "alice")
        the_lab = Lab(tmp_path, keys, hub, alice)
        await the_lab.alice_echoes()
        yield the_lab


async def test_a_peer_flooding_records_does_not_hold_up_another_peers_echoes(tmp_path):
    async with lab(tmp_path) as the_lab:
        mallory = await the_lab.peer("mallory")
        echo = (Ether(src=MALLORY_MAC, dst=gateway_mac(SUBNET))
                / IP(src=MALLORY_IP, dst=str(GATEWAY.ip)) / ICMP(type=8, id=7, seq=1)
                / (b"x" * 1000))
        record = mallory.wire.send_frames([Frame(bytes(echo))] * 64)
        sent = 0

        async def flood() -> None:  # as fast as the hub takes it
            nonlocal sent
            while True:
                await mallory.tls.send_all(record)
                sent += 64

        async def drain() -> None:  # the gateway's replies: read and dropped
            while await mallory.tls.receive_some(1 << 20):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            nursery.start_soon(drain)
            await trio.sleep(0.5)
            for _ in range(20):
                await the_lab.alice_echoes(timeout=2.0)
            nursery.cancel_scope.cancel()
        session = await the_lab.hub.port("mallory")
        assert sent > 1000 and session["in_frames"] > 1000, (sent, session)
        await the_lab.alice_echoes()


async def test_a_peer_sending_key_updates_keeps_its_session_and_its_traffic(tmp_path):
    async with lab(tmp_path) as the_lab:
        for _ in range(3):  # the hub answers each (OpenSSL 3.0: with its next write)
            request_key_update(the_lab.alice.tls)
            await the_lab.alice_echoes()  # its replies come under the hub's new keys
        session = await the_lab.hub.port("alice")
        assert session["link_up"] and session["connections"] == 1
        assert await the_lab.links_ended() == {}


async def test_a_reset_in_the_middle_of_a_tls_record_ends_only_that_link(tmp_path):
    async with lab(tmp_path) as the_lab:
        mallory = await the_lab.peer("mallory")
        with trio.fail_after(5):
            while not (await the_lab.hub.port("mallory"))["link_up"]:
                await trio.sleep(0.05)
        mallory.tls._ssl.write(b"\0" * 5000)  # one TLS record: the hub gets half of it
        record = mallory.tls._outgoing.read()
        sock = mallory.tls.transport.socket
        await sock.send(record[:len(record) // 2])
        await trio.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
        with trio.fail_after(5):
            while (await the_lab.hub.port("mallory"))["link_up"]:
                await trio.sleep(0.05)
        assert await the_lab.links_ended() == {"connection_lost": 1}
        await the_lab.alice_echoes()


async def test_sighup_rereads_the_peers_file_and_sigterm_and_sigint_end_cleanly(tmp_path):
    async with lab(tmp_path, "ep1") as the_lab:
        keys, hub = the_lab.keys, the_lab.hub
        mallory = await the_lab.peer("mallory")
        async with endpoint_process(tmp_path, "ep1", ["ep1.sock"], keys.vm_args("ep1")) as ep1:
            await ep1.session_up()
            keys.peers.write_text("".join(line + "\n" for line in
                                          keys.peers.read_text().splitlines()
                                          if not line.startswith("mallory ")))
            hub.process.send_signal(signal.SIGHUP)
            assert await mallory.read_until_closed(5), "the removed peer is still served"
            await the_lab.alice_echoes()
            assert (await the_lab.links_ended()).get("aborted") == 1
            ep1.process.send_signal(signal.SIGHUP)  # an endpoint has nothing to reread
            await trio.sleep(0.2)
            await ep1.session_up(1)
            assert (await ep1.status())["session"]["connections"] == 1
            ep1.process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await ep1.process.wait() == 0
        assert "SIGTERM: shutting down" in ep1.log_path.read_text()
        hub.process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await hub.process.wait() == 0
        log = hub.log_path.read_text()
        assert "SIGINT: shutting down" in log and "Traceback" not in log, log
