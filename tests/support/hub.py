"""Run `vhostvpn hub` and `vhostvpn vm` as real processes for the slow tests: give them keys
and the arguments that join them, start one, wait for its sockets (and its session), ask its
control socket for status, kill -9 it and start it again.  Only the PID a helper started is
ever signalled."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from tunnel.control import query
from tunnel.keys import keygen

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def free_tcp_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TunnelKeys:
    """A hub's identity and its peers' under `workdir` (hub-id, NAME-id), the peers file that
    lists them, a free loopback port for the hub, and the arguments that join them."""

    def __init__(self, workdir: Path, peers: Iterable[str], port: int | None = None) -> None:
        self.workdir = workdir
        self.hub_fingerprint = keygen(workdir / "hub-id")
        self.peers = workdir / "peers"
        self.peers.write_text("".join(f"{name} {keygen(workdir / f'{name}-id')}\n"
                                      for name in peers))
        self.port = free_tcp_port() if port is None else port

    def hub_args(self, *extra: str, listen: str = "127.0.0.1") -> list[str]:
        return ["--listen", f"{listen}:{self.port}", "--identity", str(self.workdir / "hub-id"),
                "--peers", str(self.peers), *extra]

    def vm_args(self, name: str, *extra: str, hub: str = "127.0.0.1") -> list[str]:
        """An endpoint's arguments to reach the hub as `name` (its identity NAME-id)."""
        return ["--hub", f"{hub}:{self.port}", "--identity", str(self.workdir / f"{name}-id"),
                "--hub-fingerprint", self.hub_fingerprint, *extra]


class VhostvpnProcess:
    """One `vhostvpn <command>` process with a control socket and vhost-user sockets."""

    def __init__(self, workdir: Path, command: str, sockets: list[str],
                 extra_args: list[str], name: str, prefix: list[str] | None = None) -> None:
        self.workdir = workdir
        self.prefix = prefix or []  # e.g. ["ip", "netns", "exec", NS]
        self.command = command
        self.sockets = [str(workdir / s) for s in sockets]
        self.control = str(workdir / f"{name}.control")
        self.extra_args = extra_args
        self.name = name
        self.process: trio.Process | None = None
        self.starts = 0

    def socket(self, name: str) -> str:
        return str(self.workdir / name)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.{self.starts}.log"

    async def start(self) -> None:
        self.starts += 1
        argv = [*self.prefix, sys.executable, "-m", "tunnel.cli", self.command,
                "--control", self.control,
                "--log-level", "debug", *self.extra_args]
        for path in self.sockets:
            argv += ["--socket", path]
        for path in [*self.sockets, self.control]:  # left behind by a killed process
            if os.path.exists(path):
                os.unlink(path)
        with open(self.log_path, "wb") as log:
            self.process = await trio.lowlevel.open_process(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        with trio.fail_after(START_TIMEOUT):
            while not all(os.path.exists(p) for p in [*self.sockets, self.control]):
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early:\n{self.log_path.read_text()}")
                await trio.sleep(0.05)
            while True:  # and it answers (a path can be there a moment before its listener)
                try:
                    await self.status()
                    break
                except OSError:
                    if self.process.poll() is not None:
                        raise RuntimeError(
                            f"{self.name} exited early:\n{self.log_path.read_text()}") from None
                    await trio.sleep(0.05)

    async def kill(self) -> None:
        """kill -9, as a crash would."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            await self.process.wait()
            return
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def status(self) -> dict:
        return await trio.to_thread.run_sync(query, self.control)

    async def session_up(self, seconds: float = START_TIMEOUT) -> None:
        """Wait until this endpoint's session with the hub is up."""
        with trio.fail_after(seconds):
            while (await self.status())["session"]["state"] != "up":
                await trio.sleep(0.1)

    async def port(self, name: str) -> dict:
        state = await self.status()
        return next(p for p in state["ports"] if p["name"] == name)


# The hub keeps its historical name in the tests.
HubProcess = VhostvpnProcess


@asynccontextmanager
async def hub_process(workdir: Path, sockets: list[str],
                      extra_args: list[str] | None = None) -> AsyncIterator[VhostvpnProcess]:
    hub = VhostvpnProcess(workdir, "hub", sockets, extra_args or [], "hub")
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


@asynccontextmanager
async def endpoint_process(workdir: Path, name: str, sockets: list[str],
                           extra_args: list[str]) -> AsyncIterator[VhostvpnProcess]:
    endpoint = VhostvpnProcess(workdir, "vm", sockets, ["--name", name, *extra_args], name)
    await endpoint.start()
    try:
        yield endpoint
    finally:
        await endpoint.stop()
