"""The tunnel without sockets, for tests in virtual time (trio.testing.MockClock): the hub's
real TunnelListener and real Endpoints (or raw peers, tests/support/tunnel_client.py) joined
by memory streams that behave like a socket's buffers, so everything from TLS up (the
handshake, AUTH, the Links' reader/writer/keepalive tasks, retire/mute/drain, rekeying) is
the code that runs in production, and only the kernel is left out.

`stream_pair(capacity)`: two trio Streams joined by bounded one-way pipes; a writer waits
while `capacity` bytes wait for its peer to read, as on a socket whose peer stops reading.
`MemoryNet`: a hub listener on a switch, with `endpoint()`, `raw_peer()` and `local_port()`
to put traffic on either side (`eth` frames, read back with `frames_of`).
"""

from __future__ import annotations

import errno
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import trio
import trio.testing

from netstack.port import QueuedPort
from netstack.switch import Switch
from tests.support.tunnel_client import RawPeer, log_in
from tunnel.endpoint import Endpoint, EndpointConfig
from tunnel.keys import keygen, load_identity, parse_fingerprint
from tunnel.listener import TunnelListener

# What a pipe holds before its writer waits: about a loopback socket's buffers.
PIPE_CAPACITY = 256 * 1024
BROADCAST = b"\xff" * 6
MAC_H = bytes.fromhex("020000000001")  # a port on the hub's switch
MAC_E = bytes.fromhex("020000000002")  # a port on an endpoint's switch


def eth(dst: bytes, src: bytes, n: int, size: int = 200) -> bytes:
    """A frame of `size` bytes numbered `n` (after the EtherType), to tell frames apart."""
    return dst + src + b"\x88\xb5" + n.to_bytes(4, "big") + bytes(size - 18)


def frames_of(port: QueuedPort) -> list[bytes]:
    """What the switch delivered to a local port (`MemoryNet.local_port`), taken."""
    frames = [bytes(f.data) for f in port.queue]
    port.queue.clear()
    return frames


class Pipe:
    """One direction of a connection: bytes in flight (`buffer`, the network as the test
    sees it), at most `capacity` of them.  `writes` lists the size of each send_all."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.writes: list[int] = []
        self.sender_closed = False
        self.receiver_closed = False
        self._changed = trio.lowlevel.ParkingLot()

    def changed(self) -> None:
        self._changed.unpark_all()

    async def wait(self) -> None:
        await self._changed.park()


class PipeSendStream(trio.abc.SendStream):
    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Like a socket's: what fits is taken at once (a cancellation seen before that
        takes nothing); only a full pipe makes it wait, and a cancellation then leaves
        part of `data` sent."""
        pipe = self.pipe
        await trio.lowlevel.checkpoint_if_cancelled()
        if pipe.sender_closed:
            raise trio.ClosedResourceError("this end is closed")
        pipe.writes.append(len(data))
        data = bytes(data)
        while True:
            if pipe.receiver_closed:
                raise trio.BrokenResourceError("the peer closed its end")
            room = pipe.capacity - len(pipe.buffer)
            if room > 0:
                pipe.buffer += data[:room]
                data = data[room:]
                pipe.changed()
            if not data:
                break
            await pipe.wait()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        pipe = self.pipe
        while len(pipe.buffer) >= pipe.capacity and not pipe.receiver_closed:
            await pipe.wait()

    async def aclose(self) -> None:
        self.pipe.sender_closed = True  # the peer reads what is in flight, then b""
        self.pipe.changed()
        await trio.lowlevel.checkpoint()


class PipeReceiveStream(trio.abc.ReceiveStream):
    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        pipe = self.pipe
        await trio.lowlevel.checkpoint()
        while True:
            if pipe.receiver_closed:
                raise trio.ClosedResourceError("this end is closed")
            if pipe.buffer or pipe.sender_closed:
                break
            await pipe.wait()
        count = len(pipe.buffer) if max_bytes is None else min(max_bytes, len(pipe.buffer))
        data = bytes(pipe.buffer[:count])
        del pipe.buffer[:count]
        pipe.changed()
        return data

    async def aclose(self) -> None:
        self.pipe.receiver_closed = True  # what was in flight is lost; the writer breaks
        self.pipe.buffer.clear()
        self.pipe.changed()
        await trio.lowlevel.checkpoint()


def stream_pair(capacity: int = PIPE_CAPACITY) -> tuple[trio.StapledStream, trio.StapledStream]:
    """Two connected streams; `.send_stream.pipe` of each is the direction it writes."""
    there, back = Pipe(capacity), Pipe(capacity)
    left = trio.StapledStream(PipeSendStream(there), PipeReceiveStream(back))
    right = trio.StapledStream(PipeSendStream(back), PipeReceiveStream(there))
    return left, right


class MemoryNet:
    """A hub's tunnel listener (on `switch`) that peers reach over memory streams; used as
    `async with MemoryNet(tmp_path) as net:` inside trio (under MockClock in the tests).
    The peers file names "alice" (identity `ep-id`); `add_peer` adds more.  `stop_hub()`
    and `start_hub()` are a hub restart: its connections break, then a new listener and
    switch start from the same files."""

    def __init__(self, tmp: Path, *, direct: bool = True) -> None:
        self.tmp = tmp
        self.direct = direct  # the listener introduces endpoints (off: hub --no-direct)
        self.hub_fingerprint = parse_fingerprint(keygen(tmp / "hub-id"))
        self.peers = tmp / "peers"
        self.peers.write_text("")
        self.identities: dict[str, Path] = {}
        self.add_peer("alice")
        self._stack = AsyncExitStack()
        self.nursery: trio.Nursery
        self.switch: Switch
        self.listener: TunnelListener
        self._hub: tuple[trio.CancelScope, trio.Nursery] | None = None

    def add_peer(self, name: str) -> Path:
        """A key for `name`, listed in the peers file (reread by a running listener only on
        `listener.reload()`)."""
        identity = self.tmp / ("ep-id" if name == "alice" else f"{name}-id")
        with self.peers.open("a") as peers:
            peers.write(f"{name} {keygen(identity)}\n")
        self.identities[name] = identity
        return identity

    async def __aenter__(self) -> MemoryNet:
        self.nursery = await self._stack.enter_async_context(trio.open_nursery())
        await self.start_hub()
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        self.nursery.cancel_scope.cancel()
        return await self._stack.__aexit__(*exc_info)

    async def start_hub(self) -> None:
        self.switch = Switch()
        self.listener = TunnelListener(self.switch, load_identity(self.tmp / "hub-id"),
                                       self.peers, None, 0, direct=self.direct)
        self._hub = await self.nursery.start(self._hub_connections)
        if self.listener.introducer.enabled:  # as TunnelListener.run starts it
            self._hub[1].start_soon(self.listener.run_introductions)

    def stop_hub(self) -> None:
        """The hub goes away: every connection to it is closed; new ones are refused."""
        assert self._hub is not None
        self._hub[0].cancel()
        self._hub = None

    @staticmethod
    async def _hub_connections(*, task_status: trio.TaskStatus[
            tuple[trio.CancelScope, trio.Nursery]] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as connections:
                task_status.started((scope, connections))
                await trio.sleep_forever()

    async def connect(self, address: str = "192.0.2.1",
                      capacity: int = PIPE_CAPACITY) -> trio.abc.Stream:
        """A connection to the hub from `address`, admitted (or refused, then closed) as
        the listener's accept loop would; ConnectionRefusedError while the hub is down."""
        await trio.lowlevel.checkpoint()
        if self._hub is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")
        client, server = stream_pair(capacity)
        if not self.listener.admit(server, address, self._hub[1]):
            await server.aclose()
        return client

    def local_port(self, switch: Switch, name: str = "local") -> QueuedPort:
        """A port on `switch` whose deliveries wait in `.queue` for the test to read."""
        port = QueuedPort(name)
        switch.attach(port)
        return port

    def stranger(self, name: str) -> Path:
        """A key for `name` that the peers file does not list."""
        self.identities[name] = self.tmp / f"{name}-id"
        keygen(self.identities[name])
        return self.identities[name]

    async def endpoint(self, key: str = "alice", address: str = "192.0.2.1", *,
                       up: bool = True, **config: object) -> Endpoint:
        """A real Endpoint with the key made for `key`, running, whose connections come from
        `address`; with `up`, returns once its first session is up (the login needs no
        clock to pass), else at once."""
        config.setdefault("hub_fingerprint", self.hub_fingerprint)
        endpoint = Endpoint(EndpointConfig(hub_host="hub.test", hub_port=0,
                                           identity_dir=self.identities[key],
                                           **config),  # type: ignore[arg-type]
                            open_stream=partial(self.connect, address))
        await self.nursery.start(endpoint.run)
        if up:
            await trio.testing.wait_all_tasks_blocked()
            assert endpoint.uplink.active is not None, endpoint.last_error
        return endpoint

    async def raw_peer(self, name: str = "alice", address: str = "192.0.2.1",
                       capacity: int = PIPE_CAPACITY, *,
                       introductions: bool = False) -> RawPeer:
        """An authenticated connection that does only what the test makes it do."""
        stream = await self.connect(address, capacity)
        peer = await log_in(stream, self.identities[name], self.hub_fingerprint, name,
                            introductions=introductions)
        await trio.testing.wait_all_tasks_blocked()  # the hub has taken its AUTH
        return peer
