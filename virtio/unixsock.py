"""Unix socket paths a process listens on: claim one at start, give back only our own at exit.

Who calls it: the vhost-user servers (virtio/backend.py, `--socket`), the control socket
(tunnel/control.py, `--control`) and the CLI's checks before a daemon starts.  Rules: a path
where a process answers is never taken over (a second hub or endpoint on the same `--socket`
would otherwise unlink the live one's socket and leave it serving nothing); a socket file
nobody answers on (left by a killed process) is stale and removed; at exit the path is
removed only if it is still the socket this process bound (same device and inode), never
one a later process put there.  Anything at the path that is not a socket is left alone.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

# How long a live listener whose backlog is full may keep our probe waiting.
PROBE_SECONDS = 1.0


class SocketPathBusy(Exception):
    """The path cannot be listened on: a process answers there, or it is not a socket."""


def claim(path: str) -> None:
    """Make `path` free for bind(): remove a stale socket file; SocketPathBusy if a process
    answers on it or it is something else than a socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathBusy(f"{path} exists and is not a socket; "
                             f"not touching it (remove it or choose another path)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_SECONDS)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # nobody listens: left behind by a process that died
        except FileNotFoundError:
            return  # removed meanwhile
        except TimeoutError:
            raise SocketPathBusy(f"{path}: a process is listening on it "
                                 f"(its backlog is full); is another vhostvpn running?") from None
        except OSError as error:
            raise SocketPathBusy(f"{path}: cannot tell whether it is in use: "
                                 f"{error.strerror}") from None
        else:
            raise SocketPathBusy(f"{path}: a process is listening on it; "
                                 f"is another vhostvpn running? (stop it, or choose another "
                                 f"path)")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class BoundPath:
    """The socket file this process bound: removed at exit only while it is still ours.

    Call `remove()` before closing the listening socket: while it is open it pins the inode,
    so no new file can get the same inode number and pass for ours.
    """

    path: str
    device: int
    inode: int

    @classmethod
    def after_bind(cls, path: str) -> BoundPath:
        info = os.lstat(path)
        return cls(path, info.st_dev, info.st_ino)

    def remove(self) -> None:
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == (self.device, self.inode):
                os.unlink(self.path)
        except OSError:
            pass  # gone already, or not ours to remove
