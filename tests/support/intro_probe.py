"""An endpoint that only listens to its hub's introductions, for tests against a real hub
process (tests/test_hub_direct_processes.py): run as `python -m tests.support.intro_probe
HOST PORT IDENTITY_DIR HUB_FINGERPRINT NAME OUT [ADDRESS:PORT ...]` (under `ip netns exec`),
it logs in as NAME on an introducing link, sends ADVERTISE with the addresses given (none:
it only dials), answers PINGs, and appends each INTRO it gets to OUT as one JSON line (the
peers with their fingerprint, addresses and bindings), until it is killed.  With `flood
SECONDS HOST` instead of addresses it sends ADVERTISEs of HOST with a new port each, as fast
as the hub takes them, for SECONDS or until the hub closes the connection (it should, after
tunnel/wire.py MAX_ADVERTISES), and exits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from tests.support.tunnel_client import connect_peer
from tunnel.keys import parse_fingerprint
from tunnel.wire import Closed, Eof, Intro, Ping


def as_json(intro: Intro) -> str:
    return json.dumps([{
        "name": peer.name, "fingerprint": peer.fingerprint,
        "addresses": [f"{host}:{port}" for host, port in peer.addresses],
        "macs": sorted(mac.hex(":") for mac in peer.macs),
        "ipv4": sorted(str(ip) for ip in peer.ipv4),
        "ipv6": sorted(str(ip) for ip in peer.ipv6)}
        for peer in (entry.decoded() for entry in intro.peers)])


async def main(host: str, port: int, identity: str, fingerprint: str, name: str, out: str,
               advertise: list[str]) -> None:
    peer = await connect_peer(port, Path(identity), parse_fingerprint(fingerprint), name,
                              host=host, introductions=True)
    if advertise[:1] == ["flood"]:
        seconds, host = float(advertise[1]), advertise[2]
        with trio.move_on_after(seconds):
            try:
                for n in range(1 << 62):
                    await peer.tls.send_all(b"".join(
                        peer.wire.send_advertise([(host, 1 + (n * 64 + i) % 60000)])
                        for i in range(64)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the hub closed it
        return
    else:
        addresses = [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in advertise]
        await peer.tls.send_all(peer.wire.send_advertise(addresses))
    while True:
        data = await peer.tls.receive_some(1 << 20)
        peer.wire.receive_data(data)
        for event in peer.wire.next_events():
            if isinstance(event, Intro):
                with open(out, "a") as file:
                    file.write(as_json(event) + "\n")
            elif isinstance(event, Ping):
                await peer.tls.send_all(peer.wire.send_pong(event.nonce, event.timestamp_ns))
            elif isinstance(event, Closed | Eof):
                return


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), *sys.argv[3:7], sys.argv[7:])
