"""systemd's notify protocol (sd_notify(3)), for `Type=notify` units: one datagram of
"KEY=VALUE" lines to the unix socket named by $NOTIFY_SOCKET ("@name" is in the abstract
namespace).  Without $NOTIFY_SOCKET every call does nothing.

Never blocks and never raises: the socket is non-blocking, and a message systemd cannot
take is dropped and logged (once per kind of failure); nothing about readiness is worth
ending or stalling the process for.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

# A datagram is one message, and systemd reads at most 4096 bytes of it (NOTIFY_BUFFER_MAX,
# PIPE_BUF): a STATUS= line is cut well short of that here.
MAX_STATUS = 512


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address $NOTIFY_SOCKET names, or None when it names none we can use:
    "/path" as it is, "@name" as the abstract address b"\\0name"."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends state changes to systemd; `enabled` is whether anyone listens."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._failed: set[int | None] = set()  # errnos already logged
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environment(cls) -> Notifier:
        value = os.environ.get("NOTIFY_SOCKET")
        address = notify_address(value)
        if value and address is None:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract: not notifying", value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> None:
        """One message: send(READY="1", STATUS="...") sends "READY=1\\nSTATUS=...".
        A newline in a value would start a field of its own: it becomes a space; a STATUS=
        is cut to MAX_STATUS characters."""
        if self._sock is None:
            return
        if "STATUS" in fields:
            fields["STATUS"] = fields["STATUS"][:MAX_STATUS]
        message = "\n".join(f"{key}={value.replace(chr(10), ' ')}"
                            for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if exc.errno not in self._failed:
                self._failed.add(exc.errno)
                log.warning("systemd notify socket %r: %s; message dropped (%s)",
                            self.address, exc, message.split("\n", 1)[0])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
