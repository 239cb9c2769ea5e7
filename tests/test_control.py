"""The control socket under misuse: it is created 0600 whatever the umask, a client that never
reads is cut, a failing status() is answered as an error, and too many clients at once are
refused, while the socket keeps answering."""

from __future__ import annotations

import json
import os
import socket
import stat

import trio

from tunnel import control
from tunnel.control import bind_private, query, serve_control


async def client(path: str) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return trio.SocketStream(sock)


async def read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
    return data


async def test_the_control_socket_is_created_0600_whatever_the_umask(tmp_path):
    path = str(tmp_path / "c.sock")
    old = os.umask(0)
    try:
        sock = bind_private(path, 1)
    finally:
        os.umask(old)
    with sock:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_a_control_client_that_never_reads_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(control, "CLIENT_SECONDS", 0.5)
    path = str(tmp_path / "c.sock")
    big = {"filler": "x" * (8 << 20)}  # far more than a unix socket buffers
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, lambda: big)
        greedy = await client(path)
        await greedy.send_all(b"status\n")
        await trio.sleep(1.5)  # reads nothing: the server's send waits, then is cut
        assert len(await read_all(greedy)) < 8 << 20
        nursery.cancel_scope.cancel()


async def test_a_failing_status_is_answered_as_an_error_and_serving_goes_on(tmp_path):
    path = str(tmp_path / "c.sock")
    calls = []

    def status() -> dict[str, object]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in status")
        return {"role": "test", "unserializable": None if len(calls) == 3 else object()}

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, status)
        first = await trio.to_thread.run_sync(query, path)
        assert not first["ok"] and "a bug in status" in first["error"]
        second = await trio.to_thread.run_sync(query, path)  # json.dumps fails on object()
        assert not second["ok"]
        assert (await trio.to_thread.run_sync(query, path)) == {
            "ok": True, "role": "test", "unserializable": None}
        nursery.cancel_scope.cancel()


async def test_clients_past_the_limit_are_refused_until_the_silent_ones_are_cut(
        tmp_path, monkeypatch):
    monkeypatch.setattr(control, "CLIENT_SECONDS", 1.0)
    path = str(tmp_path / "c.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, lambda: {"role": "test"})
        silent = [await client(path) for _ in range(control.MAX_CLIENTS)]
        await trio.sleep(0.1)
        refused = await client(path)
        assert await read_all(refused) == b""  # closed at once, nothing said
        await trio.sleep(1.2)  # the silent ones are cut
        answered = await client(path)
        await answered.send_all(b"status\n")
        assert json.loads(await read_all(answered))["ok"]
        for stream in silent:
            assert await read_all(stream) == b""  # cut while they said nothing
        nursery.cancel_scope.cancel()
