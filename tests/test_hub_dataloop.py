"""The hub's tunnel listener on the data loop, in this process: a real TunnelListener on a
loopback TCP port, run by `virtio.dataloop.run` as `vhostvpn hub` runs it, with raw peers
(tests/support/tunnel_client.py) doing what a hostile peer does where the loop changed the
path: a peer that never reads while others' frames are forwarded to it (its writer is woken
from another link's handler; the stall clock runs while everyone else is served), and a peer
that sends KeyUpdates and never reads (what OpenSSL answers must not pile up), and a link
aborted while its frames wait in its socket (none of them is forwarded)."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from netstack.frame import Frame
from netstack.switch import Switch
from tests.support.attacks import PING_RECORD
from tests.support.memlink import BROADCAST, MAC_E, eth
from tests.support.tls_peer import request_key_update
from tests.support.tunnel_client import RawPeer, connect_peer
from tunnel.keys import keygen, load_identity, parse_fingerprint
from tunnel.listener import TunnelListener
from tunnel.session import Link
from tunnel.wire import RECORD_HEADER, Pong
from virtio import dataloop

# What a link may hold of OpenSSL's answers to a peer that never reads: one read's worth
# (a 256 KiB read of KeyUpdates with a byte of data after each: about 150 KB), with room.
ANSWERS_HELD_LIMIT = 256 * 1024


class Hub:
    """A TunnelListener on 127.0.0.1 with peers alice and mallory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fingerprint = parse_fingerprint(keygen(tmp / "hub-id"))
        peers = tmp / "peers"
        peers.write_text("".join(f"{name} {keygen(tmp / f'{name}-id')}\n"
                                 for name in ("alice", "mallory")))
        self.switch = Switch()
        self.listener = TunnelListener(self.switch, load_identity(tmp / "hub-id"), peers,
                                       "127.0.0.1", 0, direct=False)

    async def peer(self, name: str, **kw: object) -> RawPeer:
        peer = await connect_peer(self.listener.bound[0][1], self.tmp / f"{name}-id",
                                  self.fingerprint, name, **kw)
        with trio.fail_after(5):
            while name not in self.listener.sessions or not self.link(name):
                await trio.sleep(0.01)
        return peer

    def link(self, name: str) -> Link | None:
        return self.listener.sessions[name].active


def run_hub(tmp: Path, scenario) -> object:
    """`scenario(hub)` on the data loop, with the hub's listener serving beside it."""
    async def main() -> object:
        hub = Hub(tmp)
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.listener.run)
            result = await scenario(hub)
            nursery.cancel_scope.cancel()
        return result

    return dataloop.run(main)


async def ping(peer: RawPeer, nonce: int) -> None:
    """A PING to the hub, and its PONG."""
    await peer.tls.send_all(peer.wire.send_ping(nonce, time.monotonic_ns()))
    with trio.fail_after(5):
        while True:
            peer.wire.receive_data(await peer.tls.receive_some(1 << 16))
            if any(isinstance(e, Pong) and e.nonce == nonce for e in peer.wire.next_events()):
                return


async def stall(hub: Hub, alice: RawPeer, mallory: str) -> None:
    """Alice broadcasts until the hub's writes to `mallory` (who never reads) stall: what
    reaches mallory's link is forwarded from alice's link's handler, not from a task."""
    frame = Frame(eth(BROADCAST, MAC_E, 1, 1400))
    stream = hub.link(mallory).stream
    with trio.fail_after(10):
        while stream.waiting_since is None:
            await alice.tls.send_all(alice.wire.send_frames([frame] * 64))
            await trio.sleep(0.01)


def test_a_peer_that_never_reads_stalls_only_its_own_writer_and_its_stall_clock_runs(tmp_path):
    async def scenario(hub: Hub) -> tuple[float, float, int]:
        alice = await hub.peer("alice")
        mallory = await hub.peer("mallory", receive_buffer=4096)  # held: it must stay open
        await stall(hub, alice, "mallory")
        link = hub.link("mallory")
        since = link.stream.waiting_since
        for nonce in range(20):  # alice is served all along; mallory's clock does not move
            await ping(alice, nonce)
            await alice.tls.send_all(alice.wire.send_frames([Frame(eth(BROADCAST, MAC_E, 2))]))
            await trio.sleep(0.01)
        assert hub.link("mallory") is link and mallory.tls.transport.socket.fileno() >= 0
        return since, link.stream.waiting_since, hub.listener.sessions["mallory"].counters.drops

    since, later, drops = run_hub(tmp_path, scenario)
    assert later == since
    assert drops.get("queue_full", 0) == 0  # the writer took the queue: it waits in TLS


def test_key_updates_from_a_peer_that_never_reads_hold_one_reads_answers(tmp_path):
    async def scenario(hub: Hub) -> tuple[int, int]:
        alice = await hub.peer("alice")
        mallory = await hub.peer("mallory", receive_buffer=4096)
        await stall(hub, alice, "mallory")
        stream = hub.link("mallory").stream
        before = len(stream._unsent)
        held = sent = 0
        pings = PING_RECORD * 1000  # valid records, a byte of them after each KeyUpdate
        with trio.move_on_after(2):
            while True:
                records = bytearray()
                for _ in range(500):  # (OpenSSL takes 32 KeyUpdates in a row, no more)
                    request_key_update(mallory.tls)
                    mallory.tls._ssl.write(pings[sent % len(pings):][:1])
                    records += mallory.tls._outgoing.read()
                    sent += 1
                await mallory.tls.transport.send_all(records)
                held = max(held, len(stream._unsent) - before)
        await ping(alice, 1)  # alice is served all along
        return held, sent

    held, sent = run_hub(tmp_path, scenario)
    assert held < ANSWERS_HELD_LIMIT, (held, sent)


def test_a_link_aborted_with_frames_already_readable_forwards_none_of_them(tmp_path):
    async def scenario(hub: Hub) -> tuple[int, int]:
        await hub.peer("alice")
        mallory = await hub.peer("mallory")
        port = hub.listener.sessions["mallory"]
        await trio.sleep(0.05)
        before = port.counters.in_frames
        record = mallory.wire.send_frames([Frame(eth(BROADCAST, MAC_E, n)) for n in range(8)])
        assert mallory.tls.send_now(record)  # in the hub's socket now (loopback)
        hub.link("mallory").abort("no longer allowed")  # as a SIGHUP that drops its key
        await trio.sleep(0.1)
        return before, port.counters.in_frames

    before, after = run_hub(tmp_path, scenario)
    assert after == before


def test_frames_forwarded_to_a_link_whose_peer_just_broke_the_protocol_end_it_as_such(
        tmp_path, caplog):
    async def scenario(hub: Hub) -> dict[str, int]:
        alice = await hub.peer("alice")
        mallory = await hub.peer("mallory")
        await trio.sleep(0.05)
        # In one turn of the loop: mallory's bad record, then alice's broadcast (to mallory).
        assert mallory.tls.send_now(RECORD_HEADER.pack(0x7F, 0, 0, 0))
        assert alice.tls.send_now(alice.wire.send_frames([Frame(eth(BROADCAST, MAC_E, 1))]))
        with trio.fail_after(5):
            while hub.link("mallory") is not None:
                await trio.sleep(0.01)
        return hub.listener.links_ended

    assert run_hub(tmp_path, scenario) == {"protocol_error": 1}
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
