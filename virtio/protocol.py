"""The vhost-user back-end protocol for a virtio-net device, as a sans-I/O state machine.

Rules of this file: everything that changes the device's protocol state happens here, in
`VhostUserDevice.handle()`; it never touches a socket or awaits, and it never closes an fd a
task may be waiting on -- such fds are handed to the shell (`take_closing()`), which wakes the
waiters first.  Likewise it never releases a queue or unmaps memory a task may still hold:
they go to the shell too (`take_retired()`).  One message in, at most one reply out.

Theory of operation (vhost-user spec "Ring states", and what QEMU 7.2 and DPDK really send,
../shared/research/vhost-user.md 1.3).  Each ring keeps the facts the front-end told us --
size, base, addresses, kick/call fds, enabled -- and whether it is *started* (a kick fd arrived
and no GET_VRING_BASE stopped it since).  After every message `_refresh()` derives each ring's
liveness from those facts alone, so any order works: QEMU enables rings before they exist,
repeats SET_FEATURES and SET_MEM_TABLE per queue pair, and signals stop only through
GET_VRING_BASE; DPDK sets rings up first and enables them last.  A ring is live when it is
started, enabled (or PROTOCOL_FEATURES was not negotiated), fully addressed, memory is mapped,
features are set and the device is not broken; then it has a SplitQueue.  A new memory table
while rings run rebuilds their SplitQueues over the new mapping, keeping their indices.

The offered feature set is a constant: QEMU refuses to reconnect to a back-end whose features
changed ("vhost lacks feature mask").
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field

from virtio.memory import GuestMemory, GuestMemoryError, RegionFileError, parse_regions
from virtio.net import NetQueues
from virtio.spec import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    FLAG_VERSION_MASK,
    MAX_FDS,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    MAX_QUEUE_SIZE,
    REPLY_FLAGS,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
    Feature,
    ProtocolFeature,
    Request,
    bit,
    has,
)
from virtio.vring import RingError, SplitQueue

log = logging.getLogger(__name__)

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (order per spec)
MEM_TABLE_HEAD = struct.Struct("<II")  # nregions, padding

# What we offer.  Offloads: the frame's virtio-net header travels with it, so a guest may
# send TSO/partial-checksum frames and receive them; a frame needing an offload its receiver
# did not accept is checksummed or segmented in software by the switch (netstack.offload),
# or dropped and counted when malformed or past the batch's software budget, never handed
# over as it is.
DEVICE_FEATURES = (
    bit(Feature.VERSION_1)
    | bit(Feature.PROTOCOL_FEATURES)
    | bit(Feature.NET_MRG_RXBUF)
    | bit(Feature.RING_EVENT_IDX)
    | bit(Feature.RING_INDIRECT_DESC)
    | bit(Feature.NET_MQ)
    | bit(Feature.NET_CSUM)
    | bit(Feature.NET_GUEST_CSUM)
    | bit(Feature.NET_HOST_TSO4)
    | bit(Feature.NET_HOST_TSO6)
    | bit(Feature.NET_GUEST_TSO4)
    | bit(Feature.NET_GUEST_TSO6)
)
PROTOCOL_FEATURES = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK)
# Queue pairs we serve (QEMU asks with GET_QUEUE_NUM; `-netdev vhost-user,queues=N` <= this).
DEFAULT_QUEUE_PAIRS = 4
MAX_QUEUE_PAIRS = 64  # the most the command line lets a device offer (--queues)
# What /proc/self/fd/N reads for an eventfd: the only kind of kick, call or err fd we keep.
EVENTFD_LINK = "anon_inode:[eventfd]"


class ProtocolError(Exception):
    """The front-end sent something we cannot accept; the connection must close."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)


def parse_header(data: bytes) -> tuple[int, int, int]:
    """Split a 12-byte message header into (request, flags, size), checking version and size."""
    request, flags, size = HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != FLAG_VERSION:
        raise ProtocolError(f"message {request}: version {flags & FLAG_VERSION_MASK}, want 1")
    if flags & FLAG_REPLY:
        raise ProtocolError(f"message {request}: front-end sent a reply (flags {flags:#x})")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"message {request}: payload of {size} bytes (max {MAX_PAYLOAD})")
    return request, flags, size


def encode_reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, REPLY_FLAGS, len(payload)) + payload


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


@dataclass
class Vring:
    """What the front-end told us about one virtqueue."""

    index: int
    num: int = 0
    base: int = 0
    addr: tuple[int, int, int] | None = None  # desc, avail, used (front-end virtual addresses)
    kick_fd: int | None = None
    kick_nofd: bool = False
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    queue: SplitQueue | None = None

    @property
    def kick_set(self) -> bool:
        return self.kick_fd is not None or self.kick_nofd


# Payload sizes: an int is exact; a tuple is the allowed set (GET requests carry nothing we use).
_EMPTY_OR_U64 = (0, 8)
_PAYLOAD_SIZE: dict[int, int | tuple[int, ...] | None] = {
    Request.GET_FEATURES: _EMPTY_OR_U64,
    Request.SET_FEATURES: 8,
    Request.SET_OWNER: _EMPTY_OR_U64,
    Request.RESET_OWNER: _EMPTY_OR_U64,
    Request.SET_MEM_TABLE: None,  # checked against its region count
    Request.SET_VRING_NUM: 8,
    Request.SET_VRING_ADDR: 40,
    Request.SET_VRING_BASE: 8,
    Request.GET_VRING_BASE: 8,
    Request.SET_VRING_KICK: 8,
    Request.SET_VRING_CALL: 8,
    Request.SET_VRING_ERR: 8,
    Request.GET_PROTOCOL_FEATURES: _EMPTY_OR_U64,
    Request.SET_PROTOCOL_FEATURES: 8,
    Request.GET_QUEUE_NUM: _EMPTY_OR_U64,
    Request.SET_VRING_ENABLE: 8,
}
# Requests whose reply is their answer (no REPLY_ACK ack on top).
_ANSWERED = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.GET_VRING_BASE,
}
_FD_REQUESTS = {Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                Request.SET_VRING_ERR}


class VhostUserDevice:
    """Protocol state of one vhost-user connection serving a virtio-net device."""

    def __init__(self, name: str, queue_pairs: int = DEFAULT_QUEUE_PAIRS) -> None:
        self.name = name
        self.queue_pairs = queue_pairs
        self.vrings = [Vring(i) for i in range(2 * queue_pairs)]
        self.features = 0  # acked by the driver (SET_FEATURES), bit 30 removed
        self.features_set = False
        self.protocol_features = 0
        self.protocol_negotiated = False  # bit 30 acked or SET_PROTOCOL_FEATURES received
        self.memory: GuestMemory | None = None
        self.net: NetQueues | None = None
        self.broken: str | None = None
        self.owner = False
        self._closing: list[int] = []
        self._changed: set[int] = set()
        self._retired: list[SplitQueue | GuestMemory] = []

    # -- what the shell reads --------------------------------------------------------------

    def take_closing(self) -> list[int]:
        """Fds to close now, after waking any task waiting on them."""
        fds, self._closing = self._closing, []
        return fds

    def take_retired(self) -> list[SplitQueue | GuestMemory]:
        """Queues and memory tables no longer in use, oldest first.  The device never
        releases them itself: a ring task may still hold one, so the shell releases each queue
        once no task runs on it, then closes each memory table once no queue uses it."""
        retired, self._retired = self._retired, []
        return retired

    def take_changed(self) -> set[int]:
        """Ring indices whose queue, kick fd or call fd changed since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    def live_queues(self) -> list[SplitQueue]:
        return [v.queue for v in self.vrings if v.queue is not None]

    def latch_broken(self, reason: str) -> None:
        """The guest broke the rings: stop every ring of this device until it is reset."""
        if self.broken is None:
            self.broken = reason
            log.error("%s: device broken: %s", self.name, reason)
        for vring in self.vrings:
            self._refresh(vring)

    def close(self) -> None:
        """The connection is gone and no ring task runs any more: forget every ring, release
        every queue and unmap every memory table not taken yet, hand back every fd."""
        for vring in self.vrings:
            vring.started = False
            self._drop_queue(vring)
            for fd in (vring.kick_fd, vring.call_fd, vring.err_fd):
                if fd is not None:
                    self._closing.append(fd)
            vring.kick_fd = vring.call_fd = vring.err_fd = None
        self._unmap()
        for item in self.take_retired():
            if isinstance(item, SplitQueue):
                item.release()
            else:
                item.close()

    # -- the one entry point ---------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Apply one message; return the reply bytes to send, if any.

        Raises ProtocolError for a message the connection cannot survive.  Every fd in `msg`
        is either kept or queued for closing, whatever happens.
        """
        try:
            return self._handle(msg)
        finally:
            self._closing.extend(msg.fds)  # whatever the handler did not take
            msg.fds = []

    def _handle(self, msg: Message) -> bytes | None:
        request = msg.request
        name = request_name(request)
        expected = _PAYLOAD_SIZE.get(request, -1)
        if expected == -1:
            raise ProtocolError(f"{self.name}: unsupported {name} (flags {msg.flags:#x})")
        size = len(msg.payload)
        if isinstance(expected, int) and size != expected:
            raise ProtocolError(f"{self.name}: {name} payload is {size} bytes, want {expected}")
        if isinstance(expected, tuple) and size not in expected:
            raise ProtocolError(f"{self.name}: {name} payload is {size} bytes, want {expected}")
        if msg.fds and request not in _FD_REQUESTS:
            log.warning("%s: %s carried %d unexpected fds; closed", self.name, name,
                        len(msg.fds))
        if len(msg.fds) > MAX_FDS:
            raise ProtocolError(f"{self.name}: {name} carried {len(msg.fds)} fds")
        handler = getattr(self, "_on_" + Request(request).name.lower())
        answer = handler(msg)
        if request in _ANSWERED:
            return encode_reply(request, answer)
        if msg.flags & FLAG_NEED_REPLY and has(self.protocol_features, ProtocolFeature.REPLY_ACK):
            return encode_reply(request, U64.pack(0 if answer is None else answer))
        return None

    # -- handlers: return the reply payload (GET_*), a nonzero failure code, or None -------

    def _on_get_features(self, msg: Message) -> bytes:
        return U64.pack(DEVICE_FEATURES)

    def _on_set_features(self, msg: Message) -> None:
        (features,) = U64.unpack(msg.payload)
        extra = features & ~DEVICE_FEATURES
        if extra:
            raise ProtocolError(f"{self.name}: SET_FEATURES {features:#x} has unoffered bits "
                                f"{extra:#x}")
        if has(features, Feature.PROTOCOL_FEATURES):
            self.protocol_negotiated = True
        features &= ~bit(Feature.PROTOCOL_FEATURES)
        if not has(features, Feature.VERSION_1):
            raise ProtocolError(f"{self.name}: legacy (pre-VERSION_1) drivers are not supported")
        if not any(v.started for v in self.vrings) and self.broken is not None:
            log.info("%s: device reset by the driver; clearing broken state", self.name)
            self.broken = None
        if features != self.features or not self.features_set:
            log.info("%s: features %#x", self.name, features)
            self.features = features
            self.features_set = True
            self.net = NetQueues(features, self.name)
            for vring in self.vrings:  # event_idx / indirect changed: rebuild live queues
                self._drop_queue(vring)
        self._refresh_all()

    def _on_set_owner(self, msg: Message) -> None:
        self.owner = True

    def _on_reset_owner(self, msg: Message) -> None:
        for vring in self.vrings:
            vring.started = False
        self._refresh_all()

    def _on_get_protocol_features(self, msg: Message) -> bytes:
        return U64.pack(PROTOCOL_FEATURES)

    def _on_set_protocol_features(self, msg: Message) -> None:
        (features,) = U64.unpack(msg.payload)
        if features & ~PROTOCOL_FEATURES:
            raise ProtocolError(f"{self.name}: SET_PROTOCOL_FEATURES {features:#x} has unoffered "
                                f"bits {features & ~PROTOCOL_FEATURES:#x}")
        self.protocol_features = features
        self.protocol_negotiated = True
        self._refresh_all()

    def _on_get_queue_num(self, msg: Message) -> bytes:
        return U64.pack(self.queue_pairs)

    def _on_set_mem_table(self, msg: Message) -> int | None:
        if len(msg.payload) < MEM_TABLE_HEAD.size:
            raise ProtocolError(f"{self.name}: SET_MEM_TABLE payload of {len(msg.payload)} bytes")
        count, _ = MEM_TABLE_HEAD.unpack_from(msg.payload)
        if not 0 < count <= MAX_MEM_REGIONS:
            raise ProtocolError(f"{self.name}: SET_MEM_TABLE with {count} regions "
                                f"(want 1 to {MAX_MEM_REGIONS})")
        want = MEM_TABLE_HEAD.size + 32 * count
        if len(msg.payload) != want:
            raise ProtocolError(f"{self.name}: SET_MEM_TABLE with {count} regions is "
                                f"{len(msg.payload)} bytes, want {want}")
        if len(msg.fds) != count:
            raise ProtocolError(f"{self.name}: SET_MEM_TABLE with {count} regions carried "
                                f"{len(msg.fds)} fds")
        specs = parse_regions(msg.payload, count, MEM_TABLE_HEAD.size)
        if self.memory is not None and self.memory.specs == specs:
            return None  # the same table again (QEMU repeats it per queue pair)
        try:
            memory = GuestMemory(specs, msg.fds)
        except RegionFileError as exc:  # the table lies about its files: close the connection
            raise ProtocolError(f"{self.name}: memory table refused: {exc}") from exc
        except GuestMemoryError as exc:
            log.error("%s: memory table refused: %s", self.name, exc)
            return 1
        for region in memory.unsealed:
            log.warning("%s: memory region gpa %#x: its file cannot be sealed against "
                        "shrinking; a front-end that truncates it would crash this process",
                        self.name, region.gpa)
        live = [v for v in self.vrings if v.queue is not None]
        indices = {v.index: (v.queue.last_avail_idx, v.queue.used_idx) for v in live}
        for vring in live:
            self._drop_queue(vring)
            vring.base = indices[vring.index][0]
        self._unmap()
        self.memory = memory
        log.info("%s: memory table: %s", self.name, ", ".join(
            f"gpa {s.gpa:#x} size {s.size >> 20} MiB" for s in specs))
        self._refresh_all()
        return None

    def _vring_for(self, index: int, name: str) -> Vring:
        if index >= len(self.vrings):
            raise ProtocolError(f"{self.name}: {name} for queue {index}, we have "
                                f"{len(self.vrings)}")
        return self.vrings[index]

    def _on_set_vring_num(self, msg: Message) -> None:
        index, num = VRING_STATE.unpack(msg.payload)
        vring = self._vring_for(index, "SET_VRING_NUM")
        if num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise ProtocolError(f"{self.name}: queue {index} size {num} is not a power of two "
                                f"<= {MAX_QUEUE_SIZE}")
        vring.num = num
        self._drop_queue(vring)
        self._refresh(vring)

    def _on_set_vring_addr(self, msg: Message) -> None:
        index, _flags, desc, used, avail, _log = VRING_ADDR.unpack(msg.payload)
        vring = self._vring_for(index, "SET_VRING_ADDR")
        vring.addr = (desc, avail, used)
        self._drop_queue(vring)
        self._refresh(vring)

    def _on_set_vring_base(self, msg: Message) -> None:
        index, base = VRING_STATE.unpack(msg.payload)
        vring = self._vring_for(index, "SET_VRING_BASE")
        if base > 0xFFFF:
            raise ProtocolError(f"{self.name}: queue {index} base {base} exceeds 16 bits")
        vring.base = base
        if vring.queue is not None:
            log.warning("%s: SET_VRING_BASE on running queue %d", self.name, index)
            self._drop_queue(vring)
        self._refresh(vring)

    def _on_get_vring_base(self, msg: Message) -> bytes:
        index, _ = VRING_STATE.unpack(msg.payload)
        vring = self._vring_for(index, "GET_VRING_BASE")
        if vring.queue is not None:
            vring.base = vring.queue.last_avail_idx
        vring.started = False
        self._drop_queue(vring)
        for attr in ("kick_fd", "call_fd"):
            fd = getattr(vring, attr)
            if fd is not None:
                self._closing.append(fd)
                setattr(vring, attr, None)
        vring.kick_nofd = False
        self._changed.add(index)
        log.info("%s: queue %d stopped at %d", self.name, index, vring.base)
        return VRING_STATE.pack(index, vring.base)

    def _take_vring_fd(self, msg: Message, name: str) -> tuple[Vring, int | None]:
        (value,) = U64.unpack(msg.payload)
        index = value & VRING_INDEX_MASK
        vring = self._vring_for(index, name)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise ProtocolError(f"{self.name}: {name} payload {value:#x} has unknown bits")
        nofd = bool(value & VRING_NOFD_MASK)
        if nofd:
            if msg.fds:
                raise ProtocolError(f"{self.name}: {name} says no fd but carried {len(msg.fds)}")
            return vring, None
        if len(msg.fds) != 1:
            raise ProtocolError(f"{self.name}: {name} for queue {index} carried {len(msg.fds)} "
                                "fds, want 1")
        fd = msg.fds[0]
        # Only an eventfd, and non-blocking: the shell writes call fds and reads kick fds on
        # the event loop, and a pipe the front-end filled (or a blocking eventfd whose counter
        # it saturated) would stall every guest.  The flag is on the file description we share
        # with the front-end: see docs/architecture.md for what one that clears it can do.
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            kind = f"unreadable ({exc.strerror})"
        if kind != EVENTFD_LINK:
            raise ProtocolError(f"{self.name}: {name} for queue {index}: the fd is {kind}, "
                                "not an eventfd")
        os.set_blocking(fd, False)
        return vring, msg.fds.pop()

    def _on_set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._take_vring_fd(msg, "SET_VRING_KICK")
        if vring.kick_fd is not None:
            self._closing.append(vring.kick_fd)
        vring.kick_fd = fd
        vring.kick_nofd = fd is None
        vring.started = True
        self._changed.add(vring.index)
        self._refresh(vring)

    def _on_set_vring_call(self, msg: Message) -> None:
        vring, fd = self._take_vring_fd(msg, "SET_VRING_CALL")
        if vring.call_fd is not None:
            self._closing.append(vring.call_fd)
        vring.call_fd = fd
        self._changed.add(vring.index)

    def _on_set_vring_err(self, msg: Message) -> None:
        vring, fd = self._take_vring_fd(msg, "SET_VRING_ERR")
        if vring.err_fd is not None:
            self._closing.append(vring.err_fd)
        vring.err_fd = fd

    def _on_set_vring_enable(self, msg: Message) -> None:
        index, enable = VRING_STATE.unpack(msg.payload)
        vring = self._vring_for(index, "SET_VRING_ENABLE")
        if enable not in (0, 1):
            raise ProtocolError(f"{self.name}: SET_VRING_ENABLE({index}, {enable})")
        vring.enabled = bool(enable)
        self._refresh(vring)

    # -- liveness --------------------------------------------------------------------------

    def _refresh_all(self) -> None:
        for vring in self.vrings:
            self._refresh(vring)

    def _refresh(self, vring: Vring) -> None:
        # Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled (spec, "Ring states").
        enabled = vring.enabled or not self.protocol_negotiated
        live = (
            vring.started
            and enabled
            and vring.kick_set
            and vring.addr is not None
            and vring.num
            and self.memory is not None
            and self.features_set
            and self.broken is None
        )
        if live and vring.queue is None:
            desc, avail, used = vring.addr
            try:
                vring.queue = SplitQueue(
                    vring.index, vring.num, self.memory, desc, avail, used, vring.base,
                    event_idx=has(self.features, Feature.RING_EVENT_IDX),
                    indirect=has(self.features, Feature.RING_INDIRECT_DESC),
                )
            except RingError as exc:
                self.latch_broken(str(exc))
                return
            self._changed.add(vring.index)
            log.info("%s: queue %d live (size %d, base %d)", self.name, vring.index, vring.num,
                     vring.base)
        elif not live and vring.queue is not None:
            self._drop_queue(vring)

    def _drop_queue(self, vring: Vring) -> None:
        if vring.queue is not None:
            vring.base = vring.queue.last_avail_idx
            self._retired.append(vring.queue)
            vring.queue = None
            self._changed.add(vring.index)

    def _unmap(self) -> None:
        if self.memory is not None:
            self._retired.append(self.memory)
            self.memory = None
