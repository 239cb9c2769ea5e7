"""systemd's notify protocol with real processes: `vhostvpn hub` and `vhostvpn vm` started
with $NOTIFY_SOCKET naming a datagram socket this test binds (a path, or an abstract name)
send READY=1 only once their vhost-user, control and metrics sockets take connections,
STATUS= lines saying how they are, and STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest
import trio

from tests.support.hub import free_tcp_port
from tunnel.daemon import run_daemon
from tunnel.keys import keygen
from tunnel.metrics import bind_metrics
from tunnel.sdnotify import Notifier, notify_address

STEP_SECONDS = 20.0


def takes_connections(family: int, address) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


async def receive_until(sock: trio.socket.SocketType, field: str) -> list[dict[str, str]]:
    """Messages (as KEY -> VALUE) until one holding `field`."""
    messages = []
    with trio.fail_after(STEP_SECONDS):
        while True:
            data = await sock.recv(4096)
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            messages.append(message)
            if field in message:
                return messages


async def start(argv: list[str], notify_socket: str, workdir) -> trio.Process:
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket)
    with open(workdir / "daemon.log", "wb") as log:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "tunnel.cli", *argv], env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)


async def stop(process: trio.Process) -> None:
    if process.poll() is None:
        process.kill()
        await process.wait()


async def test_a_hub_is_ready_once_its_sockets_listen_and_says_stopping_on_sigterm(tmp_path):
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(tmp_path / "notify"))
    control, vhost = tmp_path / "hub.ctl", tmp_path / "vm.sock"
    metrics = free_tcp_port()
    process = await start(["hub", "--socket", str(vhost), "--control", str(control),
                           "--metrics", f"127.0.0.1:{metrics}"], str(tmp_path / "notify"),
                          tmp_path)
    try:
        messages = await receive_until(notify, "READY")
        # At the moment READY=1 arrives, every socket takes connections.
        assert takes_connections(socket.AF_UNIX, str(control))
        assert takes_connections(socket.AF_UNIX, str(vhost))
        assert takes_connections(socket.AF_INET, ("127.0.0.1", metrics))
        assert messages[-1]["READY"] == "1"
        assert messages[-1]["STATUS"] == "0 of 0 sessions up, 0 local guests up"
        process.send_signal(signal.SIGTERM)
        messages = await receive_until(notify, "STOPPING")
        assert messages[-1]["STOPPING"] == "1"
        with trio.fail_after(STEP_SECONDS):
            assert await process.wait() == 0
    finally:
        await stop(process)
        notify.close()


async def test_a_vm_is_ready_without_its_hub_and_says_so_in_status(tmp_path):
    """The endpoint is ready when QEMU can connect; the hub not answering is its STATUS=
    (here through an abstract-namespace notify socket, as systemd uses)."""
    name = f"ops-notify-{uuid.uuid4().hex}"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(b"\0" + name.encode())
    fingerprint = keygen(tmp_path / "hub-id")
    keygen(tmp_path / "vm-id")
    vhost = tmp_path / "vm.sock"
    hub_port = free_tcp_port()  # nobody listens there
    process = await start(["vm", "--socket", str(vhost), "--hub", f"127.0.0.1:{hub_port}",
                           "--identity", str(tmp_path / "vm-id"), "--hub-fingerprint",
                           fingerprint], "@" + name, tmp_path)
    try:
        messages = await receive_until(notify, "READY")
        assert takes_connections(socket.AF_UNIX, str(vhost))
        assert messages[-1]["STATUS"].startswith(f"session to 127.0.0.1:{hub_port} down")
    finally:
        process.send_signal(signal.SIGTERM)
        await receive_until(notify, "STOPPING")
        await stop(process)
        notify.close()


async def test_ready_waits_for_the_role_to_start_and_for_the_metrics_port(tmp_path):
    """In one process, with the role's start held back by the test: no READY=1 until it
    has started, and then the metrics port already answers."""
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(tmp_path / "notify"))
    release = trio.Event()
    metrics = bind_metrics("127.0.0.1", 0)
    metrics_address = metrics.getsockname()

    async def role(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await release.wait()
        task_status.started()
        await trio.sleep_forever()

    def status() -> dict:
        return {"role": "endpoint", "hub": "hub.example:7777", "ports": [],
                "session": {"state": "down", "last_error": "connection refused"}}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_daemon, role, status, metrics,
                           Notifier(str(tmp_path / "notify")))
        with trio.move_on_after(0.5):
            await notify.recv(4096)
            pytest.fail("READY=1 before the role started")
        release.set()
        messages = await receive_until(notify, "READY")
        assert await trio.to_thread.run_sync(takes_connections, socket.AF_INET,
                                             metrics_address)
        assert messages[-1]["STATUS"] == ("session to hub.example:7777 down (connection "
                                          "refused), 0 guests up")
        nursery.cancel_scope.cancel()
    assert (await receive_until(notify, "STOPPING"))[-1] == {"STOPPING": "1"}
    notify.close()


def test_a_hub_that_cannot_start_never_says_ready(tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    with notify:
        result = subprocess.run(
            [sys.executable, "-m", "tunnel.cli", "hub", "--socket",
             str(tmp_path / "nowhere" / "vm.sock")],
            env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")),
            capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        with pytest.raises(BlockingIOError):
            notify.recv(4096)


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@vhostvpn/notify", b"\0vhostvpn/notify"),
        ("", None),
        (None, None),
        ("relative/path", None),
    ],
)
def test_notify_socket_values(value, address):
    assert notify_address(value) == address


def test_a_notify_socket_nobody_listens_on_is_logged_once_and_not_raised(tmp_path, caplog):
    notifier = Notifier(str(tmp_path / "nobody"))
    notifier.send(READY="1")
    notifier.send(STATUS="still here")
    notifier.close()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "READY=1" in caplog.records[0].getMessage()


def test_a_message_is_one_datagram_and_a_newline_cannot_add_a_field(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify"))
        notifier = Notifier(str(tmp_path / "notify"))
        notifier.send(READY="1", STATUS="hub down\nREADY=0")
        notifier.close()
        assert receiver.recv(4096) == b"READY=1\nSTATUS=hub down READY=0"
