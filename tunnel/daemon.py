"""What every long-running role (hub, vm, host) does around its main task: serve
`--metrics`, tell systemd when it is ready and when it stops (tunnel/sdnotify.py), and keep
the one-line STATUS= that `systemctl status` shows current.

Ready means "the sockets listen": the role's `run` has started (its vhost-user and control
sockets are bound and listening, the tunnel listens, a TAP/TUN device is up) and the metrics
port listens.  An endpoint does not wait for its session: QEMU needs the vhost-user socket
whether or not the hub is reachable, and the endpoint retries the hub on its own; the
session's state is in STATUS= instead.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from tunnel.metrics import Status, serve_metrics
from tunnel.sdnotify import Notifier

log = logging.getLogger(__name__)

STATUS_SECONDS = 5.0  # how often STATUS= is brought up to date (when it changed)


def status_line(state: dict) -> str:
    """A hub's or an endpoint's state in a few words."""
    ports = state.get("ports", [])
    if state.get("role") == "hub":
        sessions = [p for p in ports if p.get("kind") == "session"]
        up = sum(1 for p in sessions if p.get("state") == "up")
        guests = sum(1 for p in ports if p.get("kind") == "vhost-user" and p.get("link_up"))
        return f"{up} of {len(sessions)} sessions up, {guests} local guests up"
    session = state.get("session") or {}
    if session.get("state") == "up":
        line = f"session to {state.get('hub')} up"
    else:
        line = f"session to {state.get('hub')} down"
        if session.get("last_error"):
            line += f" ({session['last_error']})"
    guests = sum(1 for p in ports if p.get("kind") == "vhost-user" and p.get("link_up"))
    broken = sum(1 for p in ports if p.get("broken"))
    return line + f", {guests} guests up" + (f", {broken} broken" if broken else "")


async def run_daemon(
    main: Callable[..., Awaitable[None]],
    status: Status,
    metrics: socket.socket | None,
    notifier: Notifier | None = None,
) -> None:
    """Run `main` (a Trio task taking task_status) until cancelled, with its metrics port
    (a bound, listening socket, or None) and systemd notifications."""
    notifier = notifier or Notifier.from_environment()
    try:
        async with trio.open_nursery() as nursery:
            if metrics is not None:
                await nursery.start(serve_metrics, metrics, status)
            await nursery.start(main)
            line = _status_line(status)
            notifier.send(READY="1", STATUS=line)
            if notifier.enabled:
                nursery.start_soon(_keep_status, notifier, status, line)
    finally:
        notifier.send(STOPPING="1")
        notifier.close()


def _status_line(status: Status) -> str:
    try:
        return status_line(status())
    except Exception:  # a bug in a status() is not worth the process
        log.exception("systemd STATUS= line failed")
        return "running"


async def _keep_status(notifier: Notifier, status: Status, last: str) -> None:
    while True:
        await trio.sleep(STATUS_SECONDS)
        line = _status_line(status)
        if line != last:
            notifier.send(STATUS=line)
            last = line
