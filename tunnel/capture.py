"""The shells of packet capture (netstack/pcap.py is the core): the hub's capture files
(`FileCaptures`, `vhostvpn hub --pcap DIR`) and live capture over the control socket
(`vhostvpn capture PORT` streams pcapng of one port of a running hub or endpoint to stdout:
`vhostvpn capture vm1 | wireshark -k -i -`).

Files: the data path only appends each batch to the port's `netstack.pcap.CaptureBuffer`
(bounded: what does not fit is dropped and counted); one task takes what the buffers queued
and writes it with `PcapWriter` in a worker thread, so a slow or stalled disk stalls only
that task: the buffers fill, capture frames are dropped, forwarding goes on.  A shutdown
abandons a write that is stalled (its thread finishes on its own, or with the process) and
then writes what is queued, for at most CLOSE_SECONDS.

Live, after tunnel/control.py has read the request line "capture SNAPLEN PORT": the server
answers one JSON line, {"ok": true, "port": NAME, "snaplen": N} or {"ok": false, "error":
...}, then, when ok, a pcapng stream (a section header, one interface: the port) until the
client closes, sends anything more, or the port leaves the switch.  The data path only hands
each batch to a `netstack.pcap.PcapStream`, which copies what fits its bounded queue and
drops (counts) the rest; a client that does not read stalls only its own sender task here,
never the switch.  At most MAX_CAPTURES run at once.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import trio

from netstack.pcap import (
    BLOCK_EPB,
    DEFAULT_SNAPLEN,
    EPB_OVERHEAD,
    MAX_SNAPLEN,
    CaptureBuffer,
    PcapStream,
    PcapWriter,
    add_capture,
    remove_capture,
)
from netstack.port import Port

log = logging.getLogger(__name__)

MAX_CAPTURES = 4  # live captures served at once, per process
# How long a shutdown gives the capture files to take what is queued and close.
CLOSE_SECONDS = 5.0
# How often a shutdown looks whether an abandoned write has finished.
CLOSE_POLL_SECONDS = 0.01
# The sender looks this often whether its port is still attached when no frames come.
PORT_CHECK_SECONDS = 1.0
RECEIVE_CHUNK = 65536
MAX_REPLY_LINE = 4096
# The largest pcapng block a stream carries: an EPB of MAX_SNAPLEN bytes (headers are smaller).
MAX_BLOCK_BYTES = EPB_OVERHEAD + MAX_SNAPLEN
_BLOCK_HEAD = struct.Struct("<II")


class CaptureError(Exception):
    """The capture could not start (no such port, unreachable socket) or its stream broke."""


def parse_request(arguments: str) -> tuple[int, str]:
    """"SNAPLEN PORT" (the request line after "capture ") -> (snaplen, port name)."""
    snaplen_text, _, name = arguments.partition(" ")
    if not snaplen_text.isdigit() or not 1 <= int(snaplen_text) <= MAX_SNAPLEN or not name:
        raise CaptureError(f"want 'capture SNAPLEN PORT' with SNAPLEN 1-{MAX_SNAPLEN}, "
                           f"got {arguments[:80]!r}")
    return int(snaplen_text), name


def find_port(ports: list[Port], name: str) -> Port:
    """The port called `name`, or `name`.sock (a vhost-user socket's port)."""
    for candidate in (name, name + ".sock"):
        for port in ports:
            if port.name == candidate:
                return port
    names = ", ".join(sorted(port.name for port in ports)) or "none"
    raise CaptureError(f"no port {name!r} (ports: {names})")


# --- capture files: the hub's --pcap --------------------------------------------------

class FileCaptures:
    """A capture file set per port in `directory` (`add` each port; `run` writes them;
    `close` at the end).  Each port's `capture` gets a CaptureBuffer; `run`, one Trio task,
    takes what every buffer queued and hands it to the port's PcapWriter in a worker thread.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.captures: dict[Port, tuple[CaptureBuffer, PcapWriter]] = {}
        self._wake: trio.Event | None = None
        # Who has the writers: "idle" (nobody), "handed" (work given to a worker thread
        # that has not started yet: `run` may be cancelled before it ever does), "writing"
        # (a worker thread), "revoked" (`close` took handed work back).  Under `_lock`.
        self._lock = threading.Lock()
        self._state = "idle"
        self._handed: list[tuple[PcapWriter, bytes]] = []

    def add(self, port: Port) -> None:
        """Record what `port` sends and receives from now on (once per port; the port's live
        captures keep going).  No I/O here: the writer task opens the file."""
        if port in self.captures:
            return
        buffer = CaptureBuffer(port.name)
        self.captures[port] = (buffer, PcapWriter(self.directory, port.name))
        add_capture(port, buffer)
        self._ready()

    async def run(self) -> None:
        """Write what the buffers queue, for as long as the process runs."""
        while True:
            work = self._take()
            if work:
                with self._lock:
                    self._state, self._handed = "handed", work
                await trio.to_thread.run_sync(self._write_handed, abandon_on_cancel=True)
                self._stop_failed()
                continue
            self._wake = trio.Event()
            for buffer, _ in self.captures.values():
                buffer.on_ready = self._ready
            await self._wake.wait()

    async def close(self) -> None:
        """Write what is queued and close every file, within CLOSE_SECONDS (call shielded
        from cancellation, after `run` ended)."""
        for port, (buffer, _) in self.captures.items():
            remove_capture(port, buffer)
            buffer.close()
        with self._lock:
            handed: list[tuple[PcapWriter, bytes]] = []
            if self._state == "handed":  # `run` was cancelled before its thread started
                self._state, handed, self._handed = "revoked", self._handed, []
        deadline = trio.current_time() + CLOSE_SECONDS
        while self._state == "writing" and trio.current_time() < deadline:
            # the write `run` was waiting for when it was cancelled goes on in its thread:
            # let it finish (as a rule in a few ms) before the files are closed
            await trio.sleep(CLOSE_POLL_SECONDS)
        with self._lock:
            if self._state == "writing":
                log.warning("capture files left open: a write to them is stalled")
                return
            self._state = "writing"
        queued = dict.fromkeys((writer for _, writer in self.captures.values()), b"")
        for writer, data in handed:
            queued[writer] += data
        for buffer, writer in self.captures.values():
            queued[writer] += buffer.take()
        with trio.move_on_at(deadline) as closing:
            await trio.to_thread.run_sync(self._write_all, list(queued.items()), True,
                                          abandon_on_cancel=True)
        if closing.cancelled_caught:
            log.warning("capture files left open: closing them took over %.0f s", CLOSE_SECONDS)
        for port, (buffer, writer) in self.captures.items():
            log.info("capture of port %s ended: %d frames, %d bytes in %s (%d rotations), "
                     "%d frames dropped while the writer was behind, %d after an error",
                     port.name, writer.frames_written, writer.bytes_written, writer.path,
                     writer.files_rotated, buffer.frames_dropped, writer.frames_dropped)

    def _ready(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _take(self) -> list[tuple[PcapWriter, bytes]]:
        """(writer, blocks) for every capture with blocks queued or a file not opened yet."""
        return [(writer, data) for buffer, writer in self.captures.values()
                if (data := buffer.take()) or not writer.opened]

    def _write_handed(self) -> None:
        """In a worker thread: the work `run` handed over, unless `close` took it back."""
        with self._lock:
            if self._state != "handed":
                return
            self._state, work, self._handed = "writing", self._handed, []
        self._write_all(work)

    def _write_all(self, work: list[tuple[PcapWriter, bytes]], close: bool = False) -> None:
        """In a worker thread that has the writers ("writing"): hand each writer its blocks
        (a writer never raises for I/O), and with `close` close it."""
        try:
            for writer, data in work:
                writer.write_blocks(data)
                if close:
                    writer.close()
        finally:
            with self._lock:
                self._state = "idle"

    def _stop_failed(self) -> None:
        """A writer turned off by an I/O error: its buffer stops encoding (frames counted as
        dropped there)."""
        for buffer, writer in self.captures.values():
            if not writer.enabled and not buffer.closed:
                buffer.close()


# --- live capture: one task per client, started by tunnel/control.py -----------------------

async def serve_capture(stream: trio.SocketStream, arguments: str,
                        ports: Callable[[], list[Port]]) -> None:
    """Answer one "capture" request on `stream` and stream until the capture ends."""
    try:
        snaplen, name = parse_request(arguments)
        port = find_port(ports(), name)
    except CaptureError as exc:
        await _send_line(stream, {"ok": False, "error": str(exc)})
        return
    tap = PcapStream(port.name, snaplen=snaplen)
    add_capture(port, tap)
    log.info("capture of port %s started (snaplen %d)", port.name, snaplen)
    ended = "the client closed"
    try:
        if not await _send_line(stream, {"ok": True, "port": port.name, "snaplen": snaplen}):
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_client, stream, nursery.cancel_scope)
            if await _send_frames(stream, tap, port, ports):
                ended = "the port left the switch"
            nursery.cancel_scope.cancel()
    finally:
        remove_capture(port, tap)
        tap.close()
        log.info("capture of port %s ended (%s): %d frames sent, %d dropped while the "
                 "client was not reading", port.name, ended, tap.frames_queued,
                 tap.frames_dropped)


async def _send_line(stream: trio.SocketStream, reply: dict[str, object]) -> bool:
    try:
        await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _send_frames(stream: trio.SocketStream, tap: PcapStream, port: Port,
                       ports: Callable[[], list[Port]]) -> bool:
    """Send what the tap queued until the client is gone (False) or the port is (True)."""
    while True:
        data = tap.take()
        if data:
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            continue
        if port not in ports():
            return True
        ready = trio.Event()
        tap.on_ready = ready.set
        with trio.move_on_after(PORT_CHECK_SECONDS):
            await ready.wait()


async def _watch_client(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """The client sends nothing after its request: its EOF (or anything else) ends the
    capture."""
    try:
        await stream.receive_some(RECEIVE_CHUNK)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


# --- the client side: `vhostvpn capture` -------------------------------------------------

def stream_capture(path: str, port: str, out: BinaryIO, *, snaplen: int = DEFAULT_SNAPLEN,
                   count: int | None = None, seconds: float | None = None,
                   connect_timeout: float = 5.0) -> tuple[str, int]:
    """Capture `port` through the control socket `path` into `out`, whole pcapng blocks only
    (so a stop at any moment leaves a readable file), until the server ends the stream,
    `count` packets or `seconds` have passed.  Returns (the port's name, packets written).
    Raises CaptureError (refused, or a broken stream) and OSError (socket)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(connect_timeout)
        sock.connect(path)
        sock.sendall(f"capture {snaplen} {port}\n".encode())
        buffer = bytearray()
        while b"\n" not in buffer:
            chunk = sock.recv(RECEIVE_CHUNK)
            if not chunk:
                raise CaptureError(f"{path} closed without an answer")
            buffer += chunk
            if len(buffer) > MAX_REPLY_LINE and b"\n" not in buffer[:MAX_REPLY_LINE]:
                raise CaptureError(f"{path}: no answer line within {MAX_REPLY_LINE} bytes")
        line, _, rest = bytes(buffer).partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            raise CaptureError(f"{path}: not an answer: {line[:80]!r}") from None
        if not reply.get("ok"):
            raise CaptureError(str(reply.get("error", "refused")))
        buffer = bytearray(rest)
        packets = 0
        while True:
            while len(buffer) >= _BLOCK_HEAD.size:
                block_type, block_len = _BLOCK_HEAD.unpack_from(buffer)
                if block_len < 12 or block_len % 4 or block_len > MAX_BLOCK_BYTES:
                    raise CaptureError(f"{path}: bad pcapng block length {block_len}")
                if len(buffer) < block_len:
                    break
                out.write(buffer[:block_len])
                del buffer[:block_len]
                if block_type == BLOCK_EPB:
                    packets += 1
                    if count is not None and packets >= count:
                        out.flush()
                        return reply["port"], packets
            out.flush()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return reply["port"], packets
                sock.settimeout(left)
            else:
                sock.settimeout(None)
            try:
                chunk = sock.recv(RECEIVE_CHUNK)
            except TimeoutError:
                return reply["port"], packets
            if not chunk:
                return reply["port"], packets
            buffer += chunk
