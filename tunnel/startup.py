"""Start-up failures a user can fix, said in one line: which flag, and what to do.

Who calls it: the daemons' set-up steps (the tunnel listener's bind, the host's TAP/TUN
device) raise `StartupError` naming the flag whose value failed; the CLI (tunnel/cli/launch.py)
finds it inside Trio's exception groups (`find_failure`) and prints `vhostvpn CMD: FLAG
VALUE: cause` with exit status 1, no traceback.  `explain_bind` turns the errno of a failed
bind() into words.  Nothing here does I/O beyond reading one sysctl for a message.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path

# The lowest port an unprivileged process may bind (Linux's sysctl; 1024 when unreadable).
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


class StartupError(Exception):
    """`flag` (with its value, e.g. "--listen :7777") could not be set up: `detail` says why
    and what to do."""

    def __init__(self, flag: str, detail: str) -> None:
        super().__init__(f"{flag}: {detail}")
        self.flag = flag
        self.detail = detail


def _unprivileged_port_start() -> int:
    try:
        return int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        return 1024


def explain_bind(exc: OSError, host: str | None, port: int) -> str:
    """Why bind() to `host`:`port` failed, in words, with what to do."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host!r}: {exc.strerror}"
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} is already in use by another process (`ss -ltnp "
                f"'sport = :{port}'` shows which): stop it or choose another port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"this machine has no address {host} (`ip -br addr` lists its addresses; "
                f"leave the host out, e.g. :{port}, to listen on all of them)")
    if exc.errno in (errno.EACCES, errno.EPERM) and port < _unprivileged_port_start():
        return (f"ports below {_unprivileged_port_start()} need root or CAP_NET_BIND_SERVICE "
                f"(choose a port such as 7777, or grant the capability)")
    if exc.errno == errno.EAFNOSUPPORT:
        return f"this machine has no IPv6 (or IPv4) for {host}"
    return exc.strerror or str(exc)


def find_failure(exc: BaseException,
                 expected: tuple[type[BaseException], ...] = (OSError,)) -> BaseException | None:
    """The start-up failure inside `exc` (through exception groups): the first StartupError,
    else the first leaf when every leaf is one of `expected`.  None when `exc` holds anything
    else: a bug, which deserves its traceback."""
    leaves = list(_leaves(exc))
    for leaf in leaves:
        if isinstance(leaf, StartupError):
            return leaf
    if leaves and all(isinstance(leaf, expected) for leaf in leaves):
        return leaves[0]
    return None


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
