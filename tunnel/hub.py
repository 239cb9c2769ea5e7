"""`vhostvpn hub`: one process, one learning switch, and a port per vhost-user socket.

Each --socket is served by a VhostUserServer (virtio.backend); guest frames go into the
switch and out to the other ports' guests.  The hub also answers `vhostvpn status` on its
control socket.  The tunnel listener and the gateway services join the same switch as ports.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field

import trio

from netstack.switch import Switch
from tunnel.control import serve_control
from virtio.backend import VhostUserServer

log = logging.getLogger(__name__)


@dataclass
class HubConfig:
    sockets: list[str] = field(default_factory=list)
    client_sockets: list[str] = field(default_factory=list)
    control: str | None = None
    queue_pairs: int = 4


class Hub:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.switch = Switch()
        self.servers = [
            VhostUserServer(path, self.switch.forward, queue_pairs=config.queue_pairs)
            for path in config.sockets
        ] + [
            VhostUserServer(path, self.switch.forward, client=True,
                            queue_pairs=config.queue_pairs)
            for path in config.client_sockets
        ]
        names = [s.port.name for s in self.servers]
        for server in self.servers:
            if names.count(server.port.name) > 1:
                server.port.name = server.path  # two sockets named alike in different folders
            self.switch.attach(server.port)

    def status(self) -> dict[str, object]:
        return {
            "role": "hub",
            "pid": os.getpid(),
            "ports": [s.port.status() | {"socket": s.path, "mode": "client" if s.client
                                          else "server"} for s in self.servers],
            **self.switch.status(),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for server in self.servers:
                await nursery.start(server.run)
            if self.config.control:
                await nursery.start(serve_control, self.config.control, self.status)
            log.info("hub ready: %d vhost-user sockets", len(self.servers))
            task_status.started()
            nursery.start_soon(_exit_on_signals, nursery.cancel_scope)


async def _exit_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
