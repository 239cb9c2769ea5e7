"""TLS over any Trio stream with memory BIOs, built for batches: one read from the transport
feeds every TLS record it holds to OpenSSL, and `receive_some` returns all of their
plaintext at once; one `send_all` encrypts a whole batch (OpenSSL cuts the records) and
hands the ciphertext to the transport in one write.

Why not trio.SSLStream: it returns at most one 16 KiB TLS record per `receive_some`, so a
64 KiB frame costs four trips through the Trio machinery, the codec and the reader loop;
here it costs one.  On a socket (`SocketTransport`, what the hub and the endpoint use) the
fd is written and read directly (non-blocking `os.write` / `os.readv` into one preallocated
buffer), waiting on it only when the kernel says EAGAIN: a send that fits the socket buffer
costs no trip through Trio's scheduler, where trio's SocketStream and a lock around it cost
two.  Any other stream (`StreamTransport`: trio.testing's memory streams, on which the
tests run links in virtual time) is driven through its `send_all` and `receive_some`, with
the same order, batching and stall clock.  Who uses it: the hub's listener and the endpoint
(tunnel/listener.py, tunnel/endpoint.py).

Rules: only this class touches its SSLObject; ciphertext leaves in the order OpenSSL made it
(bytes the transport did not take wait in `_unsent`, drained by one task at a time while the
others wait for it).  `_unsent` holds at most what each task wrote in its last call (every
writer then waits for the drain); `waiting_since` tells the caller how long ciphertext has
waited with no progress, so a peer that stops reading can be cut (tunnel/session.py,
WRITE_STALL_SECONDS).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

import trio

from virtio.dataloop import serve_writable

# Ciphertext to read from a socket per call, by default: what one session's incoming BIO
# holds at most (OpenSSL keeps that memory for the session's life: the hub's many sessions).
SOCKET_READ = 256 * 1024
# The most a stream may ask for (`read_size`): an endpoint's few sessions take all the
# socket holds, as a rule (a sender's batch of 64 KiB TSO frames is one wire record of
# 256 KiB and more: a 256 KiB read splits most of them).
MAX_SOCKET_READ = 1 << 20
# Ciphertext to read from a non-socket stream per call, and to hand it per write.
STREAM_CHUNK = 256 * 1024
# Plaintext `receive_some` returns at most per call: what one read's records hold, and the
# records OpenSSL held before it.  More waits in OpenSSL for the next call.
PLAINTEXT_READ = MAX_SOCKET_READ + 64 * 1024
# One read buffer per Trio run for ciphertext, one for plaintext, shared by every stream:
# each is copied out (into the stream's BIO; into the bytes returned) before anything
# awaits, so a hub with many sessions holds two buffers, not two each.
_READ_BUFFER: trio.lowlevel.RunVar[bytearray] = trio.lowlevel.RunVar("tls_read_buffer")
_PLAINTEXT_BUFFER: trio.lowlevel.RunVar[memoryview] = trio.lowlevel.RunVar("tls_plaintext")


def _read_buffer() -> bytearray:
    try:
        return _READ_BUFFER.get()
    except LookupError:
        buffer = bytearray(MAX_SOCKET_READ)
        _READ_BUFFER.set(buffer)
        return buffer


def _plaintext_buffer() -> memoryview:
    try:
        return _PLAINTEXT_BUFFER.get()
    except LookupError:
        view = memoryview(bytearray(PLAINTEXT_READ))
        _PLAINTEXT_BUFFER.set(view)
        return view


class SocketTransport:
    """Ciphertext to and from a socket's fd, without Trio's SocketStream in the way."""

    def __init__(self, stream: trio.SocketStream, read_size: int = SOCKET_READ) -> None:
        if not 0 < read_size <= MAX_SOCKET_READ:
            raise ValueError(f"read_size {read_size}: want 1..{MAX_SOCKET_READ}")
        self.socket = stream.socket
        self.read_size = read_size
        # The last read left the socket empty (it returned less than it asked for): the
        # next one waits for data first instead of making a read that would say EAGAIN.
        self._emptied = False
        # The run's read buffer, once looked up: its first `read_size` bytes.
        self._buffers: list[memoryview] | None = None

    def _fileno(self) -> int:
        fd = self.socket.fileno()
        if fd < 0:  # closed: never write to a number the kernel may have handed out again
            raise trio.ClosedResourceError("the TLS stream's socket is closed")
        return fd

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Bytes of `data` the kernel took now (0 when its send buffer is full)."""
        fd = self.socket.fileno()
        if fd < 0:  # `_fileno`'s guard, a call fewer on the hot path
            raise trio.ClosedResourceError("the TLS stream's socket is closed")
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc

    async def write(self, data: bytearray) -> int:
        """Wait until the kernel has room, then the bytes of `data` it took (maybe 0)."""
        await trio.lowlevel.wait_writable(self._fileno())
        return self.write_nowait(data)

    def resize_reads(self, read_size: int) -> None:
        """Read up to `read_size` bytes per call from now on (at most MAX_SOCKET_READ)."""
        if not 0 < read_size <= MAX_SOCKET_READ:
            raise ValueError(f"read_size {read_size}: want 1..{MAX_SOCKET_READ}")
        self.read_size = read_size
        self._buffers = None

    def fileno(self) -> int:
        return self._fileno()

    def fill_nowait(self, incoming: ssl.MemoryBIO) -> bool | None:
        """One read of whatever the socket holds into `incoming`, without waiting: True if
        bytes came, False at its end, None if it holds nothing now."""
        buffers = self._buffers
        if buffers is None:
            buffers = self._buffers = [memoryview(_read_buffer())[:self.read_size]]
        fd = self.socket.fileno()
        if fd < 0:  # `_fileno`'s guard, a call fewer on the hot path
            raise trio.ClosedResourceError("the TLS stream's socket is closed")
        try:
            count = os.readv(fd, buffers)
        except BlockingIOError:
            self._emptied = True
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
        self._emptied = 0 < count < self.read_size
        if count:
            incoming.write(buffers[0][:count])
        return count > 0

    async def fill(self, incoming: ssl.MemoryBIO) -> bool:
        """One read of whatever the socket holds into `incoming`; False at its end.  Waits
        for data only when there is none (and otherwise yields once, for fairness)."""
        buffers = self._buffers
        if buffers is None:
            buffers = self._buffers = [memoryview(_read_buffer())[:self.read_size]]
        waited = self._emptied
        if waited:
            await trio.lowlevel.wait_readable(self._fileno())
        while True:
            fd = self._fileno()
            try:
                count = os.readv(fd, buffers)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                waited = True
            except OSError as exc:
                raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
        self._emptied = 0 < count < self.read_size
        if count:
            incoming.write(buffers[0][:count])
        if not waited:
            await trio.lowlevel.checkpoint()
        return count > 0


class StreamTransport:
    """Ciphertext to and from any other trio Stream.  Nothing is taken without waiting; a
    write hands the stream at most STREAM_CHUNK bytes, so the stall clock sees progress at
    that grain.  A cancellation seen before the stream is touched loses nothing (what waits
    in `_unsent` goes out with the next write or the close); one that interrupts the
    stream's `send_all` leaves it in an unknown state (trio's rule): every later write is
    refused, so no ciphertext is sent twice."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._interrupted = False
        self._emptied = False  # no read without waiting here: never `drained`

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        if self._interrupted:
            raise trio.BrokenResourceError("an earlier write was interrupted")
        return 0

    async def write(self, data: bytearray) -> int:
        if self._interrupted:
            raise trio.BrokenResourceError("an earlier write was interrupted")
        await trio.lowlevel.checkpoint_if_cancelled()
        chunk = data[:STREAM_CHUNK]  # a copy, or a view of bytes: `data` grows while we wait
        try:
            await self.stream.send_all(chunk)
        except BaseException:
            self._interrupted = True
            raise
        return len(chunk)

    async def fill(self, incoming: ssl.MemoryBIO) -> bool:
        data = await self.stream.receive_some(STREAM_CHUNK)
        if data:
            incoming.write(data)
        return bool(data)


class TLSStream(trio.abc.Stream):
    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, *,
                 server_side: bool, read_size: int = SOCKET_READ) -> None:
        """`read_size`: ciphertext read from a socket per call (at most MAX_SOCKET_READ)."""
        self.transport = transport
        self._pipe: SocketTransport | StreamTransport = (
            SocketTransport(transport, read_size) if isinstance(transport, trio.SocketStream)
            else StreamTransport(transport))
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        # Ciphertext the transport has not taken yet, in order: the rest of one write's
        # bytes as a view of them (no copy), a bytearray once more is added behind it.
        self._unsent: bytearray | memoryview = bytearray()
        self._drained: trio.Event | None = None  # set while one task drains `_unsent`
        # trio.current_time() when `_unsent` last stopped being empty or last shrank;
        # None while the transport has every byte.
        self.waiting_since: float | None = None
        # What OpenSSL answered while `receive_view_nowait` read waits in `_unsent`: its
        # caller reads no more until a flush has drained it (the data loop's handler cannot
        # wait for the drain, so this is what bounds a peer that sends and never reads).
        self.answer_waiting = False
        self._eof = False
        # receive_some read every record and the transport gave nothing since: OpenSSL holds
        # nothing to read (the next read would only raise SSLWantReadError).
        self._exhausted = False
        self._plaintext: memoryview | None = None  # the run's plaintext buffer, once looked up
        # What a drain sends once the unsent bytes are out (the owner's next frames, encoded),
        # or None: lets a busy link's frames follow each other from the data loop's handler.
        self.refill: Callable[[], bytes | None] | None = None

    def resize_reads(self, read_size: int) -> None:
        """Ciphertext read from the socket per call from now on: a listener reads little
        from a stranger and more once the peer has authenticated."""
        if isinstance(self._pipe, SocketTransport):
            self._pipe.resize_reads(read_size)

    # -- what tunnel/keys.check_server reads ----------------------------------------------

    def version(self) -> str | None:
        return self._ssl.version()

    def getpeercert(self, binary_form: bool = False) -> object:
        return self._ssl.getpeercert(binary_form)

    # -- the stream -------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLError as exc:
                await self._flush_quietly()  # the alert, if OpenSSL made one
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            await self._flush()
            return

    async def receive_first_bytes(self) -> None:
        """Wait until the peer sent something (or closed), and give it to OpenSSL: the hub
        allows a connection a short time for its first bytes before any TLS work."""
        await self._fill()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The plaintext of the records received so far (at most PLAINTEXT_READ bytes; the
        rest comes with the next call); b"" at the end."""
        return bytes(await self.receive_view())

    async def receive_view(self) -> memoryview:
        """`receive_some` without the copy: a view of the run's plaintext buffer, valid
        until the caller next awaits (any stream's next read reuses the buffer).  Each
        record is decrypted into that buffer: no object per record."""
        while True:
            view = self._decrypt()
            if view is not None:
                return view
            if self._outgoing.pending:
                await self._flush()
            if self._eof:
                raise trio.BrokenResourceError("connection closed without a TLS close_notify")
            self._exhausted = False  # what _fill does, one coroutine frame less per wake-up
            if not await self._pipe.fill(self._incoming):
                self._eof = True
                self._incoming.write_eof()

    def fileno(self) -> int | None:
        """The socket's fd, for `receive_view_nowait`'s callers to wait on; None when the
        transport is not a socket (then only `receive_view` reads)."""
        return self._pipe.fileno() if isinstance(self._pipe, SocketTransport) else None

    def receive_view_nowait(self) -> memoryview | None:
        """`receive_view` without waiting, for handlers that cannot await
        (virtio/dataloop.py; only when `fileno()` is not None): None when no whole record
        is waiting.  At most one socket read per call.  What OpenSSL wants to send while
        reading (a KeyUpdate's answer) goes out now or waits in order: the caller must see
        that someone flushes while `sending`, and read no more while `answer_waiting`."""
        view = None
        if not self._exhausted:  # (the common wake-up is exhausted: one call fewer)
            view = self._decrypt()
        if view is None:
            if self._eof:
                raise trio.BrokenResourceError("connection closed without a TLS close_notify")
            self._exhausted = False
            assert isinstance(self._pipe, SocketTransport)
            filled = self._pipe.fill_nowait(self._incoming)
            if filled is not None:
                if not filled:
                    self._eof = True
                    self._incoming.write_eof()
                view = self._decrypt()
        if self._outgoing.pending:  # made while reading, with or without plaintext after it
            self._flush_nowait()
        return view

    @property
    def drained(self) -> bool:
        """The last read took every byte the socket held (it came short) and OpenSSL holds
        no record: until the socket is readable again, `receive_view_nowait` would only make
        a read that finds nothing."""
        return self._exhausted and self._pipe._emptied

    def _decrypt(self) -> memoryview | None:
        """The records OpenSSL can decrypt now, into the plaintext buffer (empty at the
        peer's close_notify); None when it needs more ciphertext first."""
        if self._exhausted:
            # The last call read every record and nothing came since (the common wake-up):
            # a read could only raise SSLWantReadError.
            return None
        incoming, tls = self._incoming, self._ssl
        view = self._plaintext
        if view is None:
            view = self._plaintext = _plaintext_buffer()
        size = len(view)
        got = 0
        try:
            while got < size:
                count = tls.read(size - got, view[got:])
                if not count:
                    break
                got += count
                if not incoming.pending and not tls.pending():
                    # Every record read: the next read could only say WantRead.
                    self._exhausted = True
                    break
            return view[:got]
        except ssl.SSLWantReadError:
            return view[:got] if got else None
        except ssl.SSLZeroReturnError:  # the peer's close_notify
            return view[:got]
        except ssl.SSLError as exc:
            if got:
                return view[:got]
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._ssl.write(data)  # a memory BIO takes it all: never SSLWantWriteError
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        await self._flush()

    @property
    def sending(self) -> bool:
        """Ciphertext waits for the transport: a task is draining it, or one must."""
        return bool(self._unsent) or self._drained is not None

    def send_now(self, data: bytes | bytearray | memoryview) -> bool:
        """`send_all` without waiting, for callers that cannot await (only when not
        `sending`): True if the transport took every byte; False if the rest waits in order
        for the next `send_all` or `flush`, which the caller must see to."""
        return self._write_encrypted(data)

    def _write_encrypted(self, data: bytes | bytearray | memoryview) -> bool:
        """Encrypt `data` and give the kernel what it takes now (only with nothing unsent
        before it): True if it took every byte, else the rest waits in `_unsent`."""
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        out = self._outgoing.read()
        sent = self._pipe.write_nowait(out)
        if sent == len(out):
            return True
        self._unsent = memoryview(out)[sent:]  # (nothing waited before it)
        self.waiting_since = trio.current_time()
        return False

    def _keep(self, data: bytes | memoryview) -> None:
        """`data` (a view of bytes, which never change) waits behind what `_unsent` holds:
        as it is when nothing waits, else appended (a bytearray from then on)."""
        unsent = self._unsent
        if not unsent:
            self._unsent = data
        elif isinstance(unsent, bytearray):
            unsent += data
        else:
            self._unsent = bytearray(unsent) + data

    def _taken(self, count: int) -> None:
        """The transport took the first `count` bytes of `_unsent`."""
        unsent = self._unsent
        if isinstance(unsent, bytearray):
            del unsent[:count]
        else:
            self._unsent = unsent[count:]
        self.waiting_since = trio.current_time() if self._unsent else None

    async def flush(self) -> None:
        """Return once the transport has every byte made so far."""
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        try:
            if not self._eof:
                try:
                    self._ssl.unwrap()
                except ssl.SSLError:
                    pass  # the close_notify is in the BIO either way, or the session broke
                with trio.move_on_after(1):
                    await self._flush_quietly()
        finally:
            await self.transport.aclose()

    # -- moving ciphertext --------------------------------------------------------------------

    async def _flush(self) -> None:
        """Hand everything OpenSSL wrote to the transport, in order; returns when the
        transport has it (or, if another task is draining, when that task is done)."""
        data = self._outgoing.read()
        if self._drained is not None:  # another task is draining: queue behind it and wait
            self._keep(data)
            await self._drained.wait()
            return
        if not self._unsent:
            if not data:
                return
            sent = self._pipe.write_nowait(data)
            if sent == len(data):
                return  # the common case: no wait, no trip through the scheduler
            self._unsent = memoryview(data)[sent:]
            self.waiting_since = trio.current_time()
        else:
            self._keep(data)
        self._drained = trio.Event()
        try:
            if isinstance(self._pipe, SocketTransport):
                # From the data loop's handler as room comes, and with `refill`'s frames
                # after it: the task wakes once, when all is out.
                await serve_writable(self._pipe.fileno(), self._on_writable)
            while self._unsent:
                sent = await self._pipe.write(self._unsent)
                if sent:
                    self._taken(sent)
            self.answer_waiting = False
        finally:
            self._drained.set()
            self._drained = None

    def _on_writable(self) -> bool:
        """Room on the socket (a data-loop handler while a flush drains): write what waits,
        then what `refill` gives, until the kernel pushes back (False: call again) or both
        are out (True)."""
        while True:
            unsent = self._unsent
            if unsent:
                sent = self._pipe.write_nowait(unsent)
                if sent:
                    self._taken(sent)
                if self._unsent:
                    return False
            data = self.refill() if self.refill is not None else None
            if not data:
                return True
            if not self._write_encrypted(data):
                return False

    @property
    def refilling(self) -> bool:
        """A drain is under way that takes `refill`'s data when the rest is out: what its
        owner queues now goes out without a word to its writer."""
        return self._drained is not None and self.refill is not None

    def _flush_nowait(self) -> None:
        """What OpenSSL wrote, to the transport now if nothing waits before it; else (and
        whatever the kernel does not take) queued in order for the next flush."""
        data = self._outgoing.read()
        if not self._unsent and self._drained is None:
            sent = self._pipe.write_nowait(data)
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        if not self._unsent:
            self.waiting_since = trio.current_time()
        self._keep(data)
        self.answer_waiting = True

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _fill(self) -> None:
        """One read of whatever the transport holds into OpenSSL's incoming BIO."""
        self._exhausted = False
        if not await self._pipe.fill(self._incoming):
            self._eof = True
            self._incoming.write_eof()
