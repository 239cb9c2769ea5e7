"""Unix socket paths a process listens on: claim one at start, give back only our own at exit.

Who calls it: the vhost-user servers (virtio/backend.py, `--socket`), the control socket
(tunnel/control.py, `--control`) and the CLI's checks before a daemon starts.  Rules: a path
where a process answers is never taken over (a second hub or endpoint on the same `--socket`
would otherwise unlink the live one's socket and leave it serving nothing); a socket file
nobody answers on (left by a killed process) is stale and removed; at exit the path is
removed only if it is still the socket this process bound (same device and inode), never
one a later process put there.  Anything at the path that is not a socket is left alone.

Who may connect (`SocketAccess`, `--socket-mode`/`--socket-group`): a vhost-user peer maps its
memory into us and feeds us rings, so the file is never wider than asked, not even for an
instant.  `bind_listener` binds with the owner's bits only, then (before listen(), so no
connection is possible yet) gives the file its group, then its full mode.  Those two steps go
through an O_PATH descriptor of the bound file (/proc/self/fd/N), never through the path
again: a socket folder others can write to cannot turn them into a chown or chmod of
whatever a symlink swapped in at the path points to.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
from dataclasses import dataclass

# How long a live listener whose backlog is full may keep our probe waiting.
PROBE_SECONDS = 1.0
# Mode of a listening socket file unless asked otherwise: only its owner may connect.
OWNER_ONLY_MODE = 0o600
# Mode when only a group is asked for: connect() needs write permission on the file.
GROUP_DEFAULT_MODE = 0o660
# Permission bits a socket file may be given: no setuid, setgid or sticky bit.
MODE_BITS = 0o777
# The capability that lets a process give its files any group (linux/capability.h).
CAP_CHOWN = 0


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


@dataclass(frozen=True)
class SocketAccess:
    """Who may connect to a listening socket file: its mode, and its group (None: the
    process's own, as bind() makes it)."""

    mode: int = OWNER_ONLY_MODE
    gid: int | None = None


OWNER_ONLY = SocketAccess()


class SocketAccessError(ValueError):
    """A --socket-mode or --socket-group that cannot be applied."""


def parse_mode(text: str) -> int:
    """An octal permission mode ('0660', '660', '0o660') for a socket file.  Others' write
    bit is refused: it would let every local user connect and hand us guest memory."""
    digits = text.strip().lower().removeprefix("0o")
    try:
        mode = int(digits, 8)
    except ValueError:
        raise SocketAccessError(f"{text!r}: want an octal mode, e.g. 0660") from None
    if not 0 <= mode <= MODE_BITS:
        raise SocketAccessError(f"{text!r}: want an octal mode from 0 to 0777, e.g. 0660")
    if mode & stat.S_IWOTH:
        raise SocketAccessError(f"{text!r} lets every local user connect; give the QEMU "
                                f"user's group with --socket-group and a mode like 0660")
    return mode


def group_id(text: str) -> int:
    """A group name or number that exists on this machine."""
    try:
        if text.isdigit():
            return grp.getgrgid(int(text)).gr_gid
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise SocketAccessError(f"{text!r}: no such group on this machine") from None


def may_give_group(gid: int) -> bool:
    """Whether this process may give a file it owns to group `gid` (chown(2)'s rule): its own
    group, one of its supplementary groups, or any group with CAP_CHOWN (root has it)."""
    if gid == os.getegid() or gid in os.getgroups():
        return True
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & 1 << CAP_CHOWN)
    return os.geteuid() == 0


def bind_listener(sock: socket.socket, path: str, access: SocketAccess) -> BoundPath:
    """bind() `sock` (AF_UNIX, not listening yet) to `path` and give the file `access`,
    never more on the way (see the module's opening).  OSError when the group cannot be
    given (not root and not a member of it); the file is removed then."""
    # The file takes the socket inode's mode, less the umask, at bind: the owner's bits only.
    os.fchmod(sock.fileno(), access.mode & stat.S_IRWXU)
    sock.bind(path)
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
            raise SocketPathBusy(f"{path} was replaced right after bind; not touching it")
        bound = BoundPath(path, info.st_dev, info.st_ino)
        inode = f"/proc/self/fd/{fd}"
        try:
            if access.gid is not None:
                os.chown(inode, -1, access.gid)
            os.chmod(inode, access.mode)
        except OSError as exc:
            bound.remove()
            raise OSError(exc.errno, f"{path}: cannot give it group {access.gid} and mode "
                                     f"{access.mode:04o}: {exc.strerror} (run as root or as a "
                                     f"member of that group)") from None
    finally:
        os.close(fd)
    return bound
