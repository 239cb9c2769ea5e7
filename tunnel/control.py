"""The control socket: `vhostvpn status` asks a running process for its state.

Protocol: the client connects to a unix socket, writes one request line ("status"), and reads
one JSON document until the server closes.  The server side is a thin Trio loop around a
`status()` callable; nothing here changes the process's state.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable

import trio

from virtio.unixsock import BoundPath, claim

log = logging.getLogger(__name__)

MAX_REQUEST = 256
REQUEST_TIMEOUT = 5.0


async def serve_control(
    path: str,
    status: Callable[[], dict[str, object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer status requests on `path` until cancelled."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    claim(path)
    await listener.bind(path)
    bound = BoundPath.after_bind(path)
    os.chmod(path, 0o600)
    listener.listen(16)
    log.info("control socket on %s", path)
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_answer, trio.SocketStream(conn), status)
    finally:
        bound.remove()
        listener.close()


async def _answer(stream: trio.SocketStream, status: Callable[[], dict[str, object]]) -> None:
    async with stream:
        request = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\n" not in request and len(request) < MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                request += chunk
        command = request.split(b"\n", 1)[0].strip().decode("ascii", "replace")
        if command == "status":
            reply = {"ok": True, **status()}
        else:
            reply = {"ok": False, "error": f"unknown request {command!r} (want 'status')"}
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except trio.BrokenResourceError:
            pass


def query(path: str, command: str = "status", timeout: float = REQUEST_TIMEOUT) -> dict:
    """Blocking client used by the CLI."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
