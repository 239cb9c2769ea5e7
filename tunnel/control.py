"""The control socket: `vhostvpn status` asks a running process for its state.

Protocol: the client connects to a unix socket, writes one request line ("status"), and reads
one JSON document until the server closes.  The server side is a thin Trio loop around a
`status()` callable; nothing here changes the process's state.  "capture SNAPLEN PORT" is
the other request: a live pcapng stream of one port for as long as the client reads it
(tunnel/capture.py; at most capture.MAX_CAPTURES at once, each holding one client slot).

Containment: the socket is created 0600 (its mode is set before bind, so it never exists
wider); the accept loop never dies (out of file descriptors: logged once, waited out); at
most MAX_CLIENTS are served at once, each for at most CLIENT_SECONDS, request and reply
together (a client that never reads is cut; a capture is bounded by its queue instead, once
its request is in); an exception while answering (a `status()`
bug) is logged with its traceback and answered as an error, not raised.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from netstack.port import Port
from virtio.unixsock import BoundPath, claim

log = logging.getLogger(__name__)

MAX_REQUEST = 256
REQUEST_TIMEOUT = 5.0
# A client's whole exchange (request and reply) and how many are served at once.
CLIENT_SECONDS = REQUEST_TIMEOUT
MAX_CLIENTS = 16
SOCKET_MODE = 0o600
# accept() failing for want of a resource (file descriptors, kernel memory): wait this long,
# then accept again; the connections meanwhile wait in the kernel's backlog.  The tunnel's
# listener (tunnel/listener.py) does the same.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY_SECONDS = 0.1
ACCEPT_LOG_SECONDS = 10.0  # a burst of failures is one log line per this


class AcceptFailures:
    """What an accept loop does when accept() fails: wait ACCEPT_RETRY_SECONDS and go on,
    logging at most once per ACCEPT_LOG_SECONDS (with how many failed since), with a
    traceback only for errors that are not a resource running out."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.unreported = 0
        self.next_report = float("-inf")

    async def wait(self, exc: OSError) -> None:
        self.unreported += 1
        now = trio.current_time()
        if now >= self.next_report:
            log.error("%s: accept failed %d times: %s; retrying every %.1f s", self.what,
                      self.unreported, exc, ACCEPT_RETRY_SECONDS,
                      exc_info=exc.errno not in ACCEPT_RESOURCE_ERRORS)
            self.unreported = 0
            self.next_report = now + ACCEPT_LOG_SECONDS
        await trio.sleep(ACCEPT_RETRY_SECONDS)


async def accept_tunnel_connections(
    listener: trio.SocketListener,
    admit: Callable[[trio.SocketStream], None],
    refuse: Callable[[str], None],
    *,
    what: str,
) -> None:
    """Accept TCP connections until the listener closes, handing each to `admit` (which starts
    serving it or closes it).  Nothing a connecting party does ends this loop: a failing
    accept() is counted `accept_<errno>` and waited out (AcceptFailures), and whatever
    `admit` raises is counted `internal_error`, logged with its traceback, and closes that
    connection only.  The accept loop of the hub's tunnel listener and of an endpoint's
    direct listener."""
    failures = AcceptFailures(what)
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                refuse(f"accept_{errno.errorcode.get(exc.errno, 'error').lower()}")
                await failures.wait(exc)
                continue
            try:
                admit(stream)
            except Exception as exc:  # admission's own guard: never the loop's end
                refuse("internal_error")
                log.error("%s: internal error admitting a connection: %r", what, exc,
                          exc_info=exc)
                stream.socket.close()


async def serve_clients(
    listener: trio.socket.SocketType,
    serve: Callable[[trio.socket.SocketType], Awaitable[None]],
    *,
    what: str,
    max_clients: int,
    on_busy: Callable[[int], None],
) -> None:
    """Accept on `listener` until cancelled, each client in its own task running `serve(conn)`
    under one guard (whatever it raises is logged with its traceback and ends that client
    only; the connection is closed after it).  At most `max_clients` at once: more are closed
    at once after `on_busy(clients)`.  A failing accept() is waited out (AcceptFailures).
    The one accept loop of the control socket and the metrics port."""
    clients = 0

    async def run(conn: trio.socket.SocketType) -> None:
        nonlocal clients
        try:
            await serve(conn)
        except Exception as exc:  # this client's guard: never the loop's end
            log.error("%s: client failed: %r", what, exc, exc_info=exc)
        finally:
            conn.close()
            clients -= 1

    failures = AcceptFailures(what)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = await listener.accept()
            except OSError as exc:
                await failures.wait(exc)
                continue
            if clients >= max_clients:
                on_busy(clients)
                conn.close()
                continue
            clients += 1
            nursery.start_soon(run, conn)


def bind_private(path: str, backlog: int) -> trio.socket.SocketType:
    """A unix stream socket listening at `path` with mode SOCKET_MODE from the start: Linux
    creates the file with the socket's own mode (less the umask), set here before bind.
    Bind and listen follow each other with nothing in between (no checkpoint): a client that
    sees the file finds it listening."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), SOCKET_MODE)
        claim(path)
        sock.bind(path)
        sock.listen(backlog)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & ~SOCKET_MODE:
            os.unlink(path)
            raise OSError(errno.EPERM, f"control socket {path} was created {mode:#o}, "
                          f"want {SOCKET_MODE:#o} (this kernel ignores the socket's mode)")
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


async def serve_control(
    path: str,
    status: Callable[[], dict[str, object]],
    *,
    ports: Callable[[], list[Port]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer status requests on `path` until cancelled; capture requests too when `ports`
    (the switch's ports) is given."""
    from tunnel.capture import MAX_CAPTURES, serve_capture

    listener = bind_private(path, MAX_CLIENTS)
    bound = BoundPath.after_bind(path)
    log.info("control socket on %s", path)
    task_status.started()
    captures = 0

    async def serve(conn: trio.socket.SocketType) -> None:
        nonlocal captures
        stream = trio.SocketStream(conn)
        capture = None
        with trio.move_on_after(CLIENT_SECONDS):
            command = await _read_request(stream)
            if command is None:
                return
            verb, _, arguments = command.partition(" ")
            if verb != "capture" or ports is None:
                await _reply(stream, command, status, ports is not None)
            elif captures >= MAX_CAPTURES:
                await _send(stream, json.dumps({
                    "ok": False, "error": f"{captures} captures running (at most "
                                          f"{MAX_CAPTURES}); try again when one ends"}))
            else:
                capture = arguments
        if capture is not None and ports is not None:
            captures += 1
            try:
                await serve_capture(stream, capture, ports)
            finally:
                captures -= 1

    def busy(clients: int) -> None:
        log.warning("control socket %s: %d clients being served, one refused", path, clients)

    try:
        await serve_clients(listener, serve, what=f"control socket {path}",
                            max_clients=MAX_CLIENTS, on_busy=busy)
    finally:
        bound.remove()
        listener.close()


async def _read_request(stream: trio.SocketStream) -> str | None:
    """The request line, or None when the client went away without one."""
    request = b""
    try:
        while b"\n" not in request and len(request) < MAX_REQUEST:
            chunk = await stream.receive_some(MAX_REQUEST)
            if not chunk:
                break
            request += chunk
    except trio.BrokenResourceError:
        return None
    return request.split(b"\n", 1)[0].strip().decode("ascii", "replace")


async def _reply(stream: trio.SocketStream, command: str,
                 status: Callable[[], dict[str, object]], can_capture: bool) -> None:
    """Answer a request other than a capture: one JSON document."""
    if command == "status":
        try:
            reply = json.dumps({"ok": True, **status()})
        except Exception as exc:
            log.error("control: status failed: %r", exc, exc_info=exc)
            reply = json.dumps({"ok": False, "error": f"status failed: {exc!r}"})
    else:
        known = "'status' or 'capture SNAPLEN PORT'" if can_capture else "'status'"
        reply = json.dumps({"ok": False,
                            "error": f"unknown request {command[:64]!r} (want {known})"})
    await _send(stream, reply)


async def _send(stream: trio.SocketStream, reply: str) -> None:
    try:
        await stream.send_all(reply.encode() + b"\n")
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


# -- where a process's control socket is when --control is not given ------------------------

CONTROL_SUFFIX = ".ctl"
RUNTIME_DIR_MODE = {True: 0o755, False: 0o700}  # root's /run/vhostvpn, a user's own


def runtime_dir() -> Path:
    """The folder of the default control sockets: systemd's RuntimeDirectory=
    ($RUNTIME_DIRECTORY), /run/vhostvpn as root, $XDG_RUNTIME_DIR/vhostvpn in a user's
    session, else /tmp/vhostvpn-UID."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/vhostvpn")
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "vhostvpn"
    return Path(f"/tmp/vhostvpn-{os.geteuid()}")


def default_control(command: str) -> Path:
    """`vhostvpn COMMAND`'s control socket when --control is not given: hub.ctl, vm.ctl or
    host.ctl in `runtime_dir()` (a second one of a kind needs --control)."""
    return runtime_dir() / f"{command}{CONTROL_SUFFIX}"


def make_runtime_dir() -> Path:
    """`runtime_dir()`, created if missing; OSError if it is not a folder of ours that others
    cannot write (a /tmp fallback someone else created first is refused, not used)."""
    folder = runtime_dir()
    folder.mkdir(mode=RUNTIME_DIR_MODE[os.geteuid() == 0], parents=True, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, f"{folder} is not a folder")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise OSError(errno.EPERM, f"{folder} belongs to another user or others may write "
                                   f"it: not putting a control socket there")
    return folder


def control_sockets() -> list[Path]:
    """The control sockets in `runtime_dir()` (sorted), whether or not a process answers."""
    try:
        entries = sorted(runtime_dir().glob(f"*{CONTROL_SUFFIX}"))
    except OSError:
        return []
    return [path for path in entries if path.is_socket()]
