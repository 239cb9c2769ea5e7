"""Starting a hub or an endpoint from the command line: claim its socket paths, bind
--metrics, then run it under Trio until SIGTERM or SIGINT (SIGHUP reloads), with the cyclic
garbage collector tuned for the data path.

Every failure to start that a user can fix (a busy socket path, a port in use, a key that
cannot be read, a device that cannot be had: tunnel/startup.py) is one line naming the flag,
exit status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable

import trio

from virtio import dataloop

log = logging.getLogger("vhostvpn")


def claim_socket_paths(command: str, sockets: list[str], control: str | None) -> str:
    """Before a daemon starts: refuse (one line, exit status 1) when a process answers on
    one of its --socket or --control paths, or their folder cannot take a socket; remove
    stale socket files (virtio/unixsock.py).  Returns the control socket's path: --control,
    or the default for `command` (tunnel/control.py)."""
    from virtio.unixsock import SocketPathBusy, claim

    paths = [("--socket", path) for path in sockets]
    if control:
        paths.append(("--control", control))
    else:
        control = default_control_path(command)
        paths.append(("--control (not given; the default)", control))
    for flag, path in paths:
        check_socket_folder(command, flag, path)
        try:
            claim(path)
        except SocketPathBusy as exc:
            raise SystemExit(f"vhostvpn {command}: {flag} {exc}") from None
    return control


def default_control_path(command: str) -> str:
    """The default control socket of `command`, its folder made if missing."""
    from tunnel.control import default_control, make_runtime_dir

    try:
        make_runtime_dir()
    except OSError as exc:
        raise SystemExit(f"vhostvpn {command}: --control not given and the default folder "
                         f"cannot be used: {exc.strerror or exc} (give --control PATH)") from None
    return str(default_control(command))


def check_socket_folder(command: str, flag: str, path: str) -> None:
    """The folder of a socket path exists and this user may create a socket in it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"vhostvpn {command}: {flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"vhostvpn {command}: {flag} {path}: this user may not create files "
                         f"in {folder} (run as a user who may, or choose another folder)")


def open_metrics(command: str,
                 address: tuple[str | None, int] | None) -> socket.socket | None:
    """The --metrics socket, bound and listening before the daemon starts; a port in use (or
    an address this machine lacks, a privileged port) is one line and exit status 1."""
    if address is None:
        return None
    from tunnel.metrics import bind_metrics

    host, port = address
    try:
        return bind_metrics(host, port)
    except OSError as exc:
        from tunnel.startup import explain_bind

        shown = f"[{host}]" if host and ":" in host else (host or "")
        raise SystemExit(f"vhostvpn {command}: --metrics {shown}:{port}: "
                         f"{explain_bind(exc, host, port)}") from None


def setup_failure(exc: Exception) -> str:
    """A daemon's set-up error (before it runs) in one line naming the flag; anything that
    is not a set-up error is re-raised (a bug: its traceback is the useful part)."""
    from tunnel.keys import IdentityError, PeersFileError

    if isinstance(exc, IdentityError):
        return f"--identity: {exc}"
    if isinstance(exc, PeersFileError):
        return f"--peers: {exc}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"  # e.g. the state or capture folder
    if isinstance(exc, OSError | ValueError):
        return str(exc)
    raise exc


def run_role(command: str, run: Callable[[], Awaitable[object]],
             on_sighup: Callable[[], object] | None = None, *, nice: int | None = None) -> int:
    """Run a hub or endpoint (`run`: tunnel/daemon.py's wrapper around it) until it is told
    to stop, at the nice value `nice` (--nice) if given; a failure to start (a port in use,
    a device that cannot be had: tunnel/startup.py) is one line naming the flag, exit
    status 1."""
    from tunnel.host.hostnet import HostNetworkError
    from tunnel.startup import find_failure

    if nice is not None:
        set_nice(command, nice)
    tune_gc()
    tune_malloc()
    try:
        dataloop.run(serve, run, on_sighup)
    except Exception as exc:
        failure = find_failure(exc, (OSError, HostNetworkError))
        if failure is None:
            raise
        log.debug("%s: stopped by %r", command, failure, exc_info=exc)
        raise SystemExit(f"vhostvpn {command}: {failure}") from None
    return 0


def set_nice(command: str, nice: int) -> None:
    """--nice: this process's nice value.  Linux keeps one per thread and a new thread
    inherits its creator's, so this runs before the daemon starts any (Trio's I/O thread,
    its worker threads); refused (one line, exit status 1) when this user may not."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        raise SystemExit(
            f"vhostvpn {command}: --nice {nice}: not permitted below the current value "
            f"({os.getpriority(os.PRIO_PROCESS, 0)}) without root or CAP_SYS_NICE (under "
            f"systemd, set Nice= in the unit instead)") from None
    log.info("%s: nice %d", command, nice)


async def serve(run: Callable[[], Awaitable[object]],
                on_sighup: Callable[[], object] | None = None) -> None:
    """Run a daemon's main task until SIGTERM or SIGINT; SIGHUP calls `on_sighup`.

    Signals belong to the process, so they are handled here, once, and not by the Hub or
    Endpoint objects (several of which may run in one process, in the tests).
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if on_sighup is not None:
                        on_sighup()
                    continue
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                return


# glibc's mallopt parameters (malloc.h) and what run_role sets them to.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from a fresh mmap per allocation.
MMAP_THRESHOLD_BYTES = 2 << 20
# Free memory at the top of the heap kept for reuse, not handed back to the kernel.
TRIM_THRESHOLD_BYTES = 16 << 20


def tune_malloc() -> None:
    """The data path allocates and frees a few blocks of 64 KiB-1 MiB per batch (a wire
    record, its ciphertext, TSO frames).  With glibc's defaults the larger ones are fresh
    mmaps, or the heap's top is trimmed after the batch and grown again with the next, so
    every page of them is faulted in and zeroed by the kernel again (40-70 thousand page
    faults per GB on the endpoint's TLS path, bench/tls_path.py).  Keep them in the heap and
    keep up to TRIM_THRESHOLD_BYTES of free top for reuse.  Not glibc (no mallopt): left as
    it is."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        log.debug("no mallopt: malloc left at its defaults")
        return
    for parameter, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                             (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        if mallopt(parameter, value) != 1:
            log.debug("mallopt(%d, %d) refused", parameter, value)


def tune_gc() -> None:
    """The data path makes and drops short-lived, acyclic objects for every frame (frames,
    spans, tuples), and reference counting frees them.  At the default first-generation
    threshold (700) the cyclic collector runs several times per batch and walks the batch
    still in flight: about 0.5 us per frame, measured in bench/.  Move what exists at start
    out of its way and let it run every 100 000 allocations instead."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)
