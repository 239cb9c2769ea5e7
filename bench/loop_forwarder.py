"""The same-run reference for bench/loop.py: the least a Python vhost-user back-end can do.

Run: python bench/loop_forwarder.py A.sock B.sock [--seconds N]
Listens on two vhost-user sockets and moves frames A's TX ring -> B's RX ring and B's TX ring
-> A's RX ring, busy-polling both (no Trio, no switch, no kicks waited on, no policy).  It uses
virtio/'s own protocol, ring, memory and virtio-net classes, so the difference between it and
`vhostvpn hub` in the same run is what the hub adds around them (event loop, switch, ports).

Control messages are read between batches, never during one, and a ring is looked up afresh
on every pass: nothing holds a queue across a message that may retire it.  What waits for a
full RX ring is bounded (PENDING_LIMIT frames per direction; the rest is dropped and counted).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from netstack.frame import Frame  # noqa: E402
from virtio.protocol import (  # noqa: E402
    Message,
    ProtocolError,
    VhostUserDevice,
    parse_header,
)
from virtio.spec import HEADER_SIZE, MAX_FDS  # noqa: E402
from virtio.vring import RingError, SplitQueue  # noqa: E402

log = logging.getLogger("loop_forwarder")

BATCH = 256  # chains per ring per pass
PENDING_LIMIT = 2048  # frames waiting for room in one RX ring
CONTROL_EVERY = 64  # passes between two looks at the control sockets (when busy)
MESSAGE_TIMEOUT = 1.0  # seconds to read the rest of a message once its header arrived
_CALL = (1).to_bytes(8, "little")


class Side:
    """One socket: its listener, the front-end connected to it, that front-end's device."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None
        self.device: VhostUserDevice | None = None
        self.pending: deque[Frame] = deque()  # frames for this side's RX ring
        self.dropped = 0

    def rings(self) -> tuple[SplitQueue | None, SplitQueue | None]:
        """(RX ring, TX ring) of queue pair 0 if live and the device is usable."""
        device = self.device
        if device is None or device.net is None or device.broken is not None:
            return None, None
        return device.vrings[0].queue, device.vrings[1].queue

    def poll_control(self) -> None:
        """Accept a front-end, or apply the messages it sent; never waits for one."""
        if self.conn is None:
            try:
                self.conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            self.device = VhostUserDevice(os.path.basename(self.path), queue_pairs=1)
            log.info("%s: front-end connected", self.path)
        while select.select([self.conn], [], [], 0)[0]:
            try:
                message = _read_message(self.conn)
            except (OSError, ProtocolError) as exc:
                log.warning("%s: closing connection: %s", self.path, exc)
                message = None
            if message is None:
                self.disconnect()
                return
            assert self.device is not None
            try:
                reply = self.device.handle(message)
            except ProtocolError as exc:
                log.warning("%s: closing connection: %s", self.path, exc)
                self.disconnect()
                return
            finally:
                for fd in self.device.take_closing():
                    os.close(fd)
            self.device.take_changed()  # queues are looked up afresh on every pass
            self.release_retired()
            for queue in self.device.live_queues():
                queue.mute_kicks()  # we poll: the front-end need not kick
            if reply is not None:
                self.conn.sendall(reply)

    def release_retired(self) -> None:
        """Release what the device retired: nothing holds a queue between passes."""
        if self.device is not None:
            for item in self.device.take_retired():
                if isinstance(item, SplitQueue):
                    item.release()
                else:
                    item.close()

    def disconnect(self) -> None:
        log.info("%s: front-end gone", self.path)
        if self.device is not None:
            self.device.close()
            for fd in self.device.take_closing():
                os.close(fd)
        if self.conn is not None:
            self.conn.close()
        self.conn, self.device = None, None
        self.pending.clear()

    def call(self, index: int) -> None:
        assert self.device is not None
        fd = self.device.vrings[index].call_fd
        if fd is not None:
            try:
                os.write(fd, _CALL)
            except BlockingIOError:
                pass


def _read_message(conn: socket.socket) -> Message | None:
    """One vhost-user message with its fds (the socket is readable), or None at its end."""
    data, ancdata, _, _ = conn.recvmsg(HEADER_SIZE, socket.CMSG_SPACE(MAX_FDS * 4),
                                       socket.MSG_CMSG_CLOEXEC)
    fds = [int.from_bytes(cdata[i : i + 4], "little")
           for level, kind, cdata in ancdata
           if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for i in range(0, len(cdata) - len(cdata) % 4, 4)]
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    conn.settimeout(MESSAGE_TIMEOUT)
    try:
        while len(data) < HEADER_SIZE:
            data += conn.recv(HEADER_SIZE - len(data)) or _eof()
        request, flags, size = parse_header(data)
        payload = b""
        while len(payload) < size:
            payload += conn.recv(size - len(payload)) or _eof()
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        conn.setblocking(True)
    return Message(request, flags, payload, fds)


def _eof() -> bytes:
    raise ProtocolError("connection closed inside a message")


def move(source: Side, sink: Side) -> int:
    """One batch: source's TX ring -> sink's pending frames -> sink's RX ring.  Returns the
    frames taken from the TX ring plus those put into the RX ring (0: nothing to do)."""
    moved = 0
    _, tx = source.rings()
    if tx is not None:
        net = source.device.net  # type: ignore[union-attr]
        try:
            before = tx.last_avail_idx
            frames = net.pop_tx(tx, BATCH)
            if tx.last_avail_idx != before and tx.should_notify():
                source.call(1)
        except RingError as exc:  # this front-end broke its ring: stop its device only
            source.device.latch_broken(str(exc))  # type: ignore[union-attr]
            source.release_retired()
            frames = []
        if frames:
            moved += len(frames)
            room = PENDING_LIMIT - len(sink.pending)
            if len(frames) > room:
                sink.dropped += len(frames) - room
                frames = frames[:room]
            sink.pending.extend(frames)
    rx, _ = sink.rings()
    if rx is None or not sink.pending:
        return moved
    net = sink.device.net  # type: ignore[union-attr]
    try:
        used_before = rx.used_idx
        delivered, _ = net.push_rx(rx, sink.pending, BATCH)
        if rx.used_idx != used_before and rx.should_notify():
            sink.call(0)
    except RingError as exc:
        sink.device.latch_broken(str(exc))  # type: ignore[union-attr]
        sink.release_retired()
        return moved
    return moved + delivered


def serve(a: Side, b: Side, seconds: float | None) -> None:
    """Busy-poll both directions; look at the control sockets when idle or every
    CONTROL_EVERY passes."""
    deadline = None if seconds is None else time.monotonic() + seconds
    passes = 0
    while deadline is None or passes % 4096 or time.monotonic() < deadline:
        passes += 1
        moved = move(a, b) + move(b, a)
        if not moved or passes % CONTROL_EVERY == 0:
            a.poll_control()
            b.poll_control()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("socket_a")
    parser.add_argument("socket_b")
    parser.add_argument("--seconds", type=float, default=None,
                        help="exit after this long (default: until SIGINT/SIGTERM)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    a, b = Side(args.socket_a), Side(args.socket_b)
    try:
        serve(a, b, args.seconds)
    except KeyboardInterrupt:
        pass
    finally:
        for side in (a, b):
            side.disconnect()
            side.listener.close()
            if os.path.exists(side.path):
                os.unlink(side.path)
        log.info("dropped for full RX rings: %s %d, %s %d", a.path, a.dropped, b.path,
                 b.dropped)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
