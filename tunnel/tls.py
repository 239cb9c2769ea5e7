"""TLS over a Trio socket stream with memory BIOs, built for batches: one read from the
socket feeds every TLS record it holds to OpenSSL, and `receive_some` returns all of their
plaintext at once; one `send_all` encrypts a whole batch (OpenSSL cuts the records) and
hands the ciphertext to the socket in one write.

Why not trio.SSLStream: it returns at most one 16 KiB TLS record per `receive_some`, so a
64 KiB frame costs four trips through the Trio machinery, the codec and the reader loop;
here it costs one.  Who uses it: the hub's listener and the endpoint (tunnel/listener.py,
tunnel/endpoint.py).  Rules: only this class touches its SSLObject; sends to the socket are
serialised by a lock (the reader may have to send too: TLS 1.3 post-handshake messages).
"""

from __future__ import annotations

import ssl

import trio

# Plaintext to take out of OpenSSL per call; several TLS records fit.
READ_CHUNK = 1 << 20
# Ciphertext to read from the socket per call.
SOCKET_READ = 256 * 1024


class TLSStream(trio.abc.Stream):
    def __init__(self, transport: trio.SocketStream, context: ssl.SSLContext, *,
                 server_side: bool) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._send_lock = trio.Lock()
        self._eof = False

    # -- what tunnel/keys.check_server reads ----------------------------------------------

    def version(self) -> str | None:
        return self._ssl.version()

    def getpeercert(self, binary_form: bool = False) -> object:
        return self._ssl.getpeercert(binary_form)

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.transport.socket

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

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Every plaintext byte the records received so far hold; b"" at the end."""
        chunks: list[bytes] = []
        while True:
            try:
                while True:
                    chunk = self._ssl.read(READ_CHUNK)
                    if not chunk:
                        return b"".join(chunks)
                    chunks.append(chunk)
            except ssl.SSLWantReadError:
                if chunks:
                    return b"".join(chunks)
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                return b"".join(chunks)
            except ssl.SSLError as exc:
                if chunks:
                    return b"".join(chunks)
                raise trio.BrokenResourceError(f"TLS: {exc}") from exc
            if self._outgoing.pending:
                await self._flush()
            if self._eof:
                raise trio.BrokenResourceError("connection closed without a TLS close_notify")
            await self._fill()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._ssl.write(data)  # a memory BIO takes it all: never SSLWantWriteError
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
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
        async with self._send_lock:
            data = self._outgoing.read()
            if data:
                await self.transport.send_all(data)

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _fill(self) -> None:
        data = await self.transport.receive_some(SOCKET_READ)
        if data:
            self._incoming.write(data)
        else:
            self._eof = True
            self._incoming.write_eof()
