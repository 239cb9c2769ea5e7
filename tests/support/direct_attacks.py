"""What tests/test_direct_netns.py throws at an endpoint's --listen from inside a network
namespace: run as `python -m tests.support.direct_attacks KIND HOST PORT [ARGS]` (under `ip
netns exec`), it prints one JSON line saying what happened.

Kinds: `stranger IDENTITY_DIR FINGERPRINT` (a key the hub never introduced logs in with the
listener's pinned fingerprint, then sends a frame: is it closed, and with which reason?),
`reset` (a ClientHello, then RST), `silent` (connects, sends nothing, never reads: when is it
cut?), `giant` (after TLS, a record header announcing 4 GiB: is it cut?)."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from pathlib import Path

import trio

from netstack.frame import Frame
from tests.support.attacks import client_hello
from tests.support.tunnel_client import log_in
from tunnel.keys import client_ssl_context, parse_fingerprint
from tunnel.tls import TLSStream
from tunnel.wire import Closed, Eof

WAIT_SECONDS = 15.0


async def stranger(host: str, port: int, identity: str, fingerprint: str) -> dict:
    stream = await trio.open_tcp_stream(host, port)
    peer = await log_in(stream, Path(identity), parse_fingerprint(fingerprint), "")
    frame = Frame(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x99" + b"\x08\x06" + bytes(46))
    result: dict = {"closed": False, "reason": None}
    with trio.move_on_after(WAIT_SECONDS):
        try:
            await peer.tls.send_all(peer.wire.send_frames([frame]))
            while True:
                data = await peer.tls.receive_some(1 << 16)
                peer.wire.receive_data(data)
                for event in peer.wire.next_events():
                    if isinstance(event, Closed):
                        result["reason"] = event.reason
                    if isinstance(event, Closed | Eof):
                        result["closed"] = True
                        return result
                if not data:
                    result["closed"] = True
                    return result
        except Exception as exc:  # the listener cut us: that is the point
            result["closed"] = True
            result["error"] = repr(exc)
    return result


def reset(host: str, port: int) -> dict:
    with socket.create_connection((host, port)) as sock:
        sock.sendall(client_hello())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return {"reset": True}


def silent(host: str, port: int) -> dict:
    started = time.monotonic()
    with socket.create_connection((host, port)) as sock:
        sock.settimeout(WAIT_SECONDS)
        try:
            closed = sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            closed = False
    return {"closed": closed, "after": round(time.monotonic() - started, 2)}


async def giant(host: str, port: int) -> dict:
    stream = await trio.open_tcp_stream(host, port)
    tls = TLSStream(stream, client_ssl_context(), server_side=False)
    await tls.do_handshake()
    await tls.send_all(struct.pack("!BBHI", 1, 0, 0, 0xFFFFFFFF) + bytes(1 << 16))
    with trio.move_on_after(WAIT_SECONDS):
        try:
            while await tls.receive_some(1 << 16):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return {"closed": True}
    return {"closed": False}


def main(argv: list[str]) -> None:
    kind, host, port = argv[0], argv[1], int(argv[2])
    if kind == "stranger":
        result = trio.run(stranger, host, port, argv[3], argv[4])
    elif kind == "reset":
        result = reset(host, port)
    elif kind == "silent":
        result = silent(host, port)
    elif kind == "giant":
        result = trio.run(giant, host, port)
    else:
        raise SystemExit(f"unknown attack {kind!r}")
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
