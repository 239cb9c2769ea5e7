"""TUN/TAP devices with virtio-net headers: how a plain host's kernel joins the switch.

Who calls it: the host endpoint (`TapPort` + `run_device` for a TAP, an L3 adapter for a TUN).
What it does: opens /dev/net/tun with IFF_NO_PI | IFF_VNET_HDR, negotiates offloads with
TUNSETOFFLOAD, and moves frames between the device and the switch in batches, offload metadata
kept: a TCP stream from the host's kernel arrives as 64 KiB TSO frames with partial checksums,
exactly the shape a guest's virtio-net driver sends.  What it must never do: block the Trio
loop (the fd is non-blocking; every wait is `trio.lowlevel.wait_*`), or raise on a frame the
kernel refused (it is counted and dropped).

The path of a frame through this module:
  device -> switch: `_read_loop` waits until the fd is readable, `TunTapDevice.read_batch`
    reads up to BATCH packets (one `readv` each into one preallocated buffer, until EAGAIN;
    after the first, `poll` says whether another waits: no raised EAGAIN for a lone packet),
    splits each into header and packet (one copy, the packet's), and the loop
    hands the whole batch to `forward(port, frames)` once.
  switch -> device: the switch queues frames on the port (`QueuedPort.deliver`, bounded);
    `_write_loop` wakes on `on_ready`, and `TunTapDevice.write_batch` writes each frame with
    one `writev([virtio_net_hdr, frame.data])` (a TapPort with nothing queued has its batch
    written from `deliver`, through the loop's `write_at_once`).  EAGAIN leaves the rest
    queued and the loop waits until the fd is writable (at most WRITE_STALL_SECONDS, then
    the queue is dropped and counted); any other refusal (EINVAL: a malformed frame or
    header) drops that one frame and counts it under its errno name.

TAP (IFF_TAP) carries Ethernet frames and fits the switch as it is.  TUN (IFF_TUN) carries IP
packets: the `Frame`s it reads and writes hold an IP packet (csum_start counts from the IP
header) and an L3 adapter owned by the caller turns them into Ethernet frames and back; the
device and both loops are the same for both modes.

Offloads: TUNSETOFFLOAD names what the kernel may hand *us* (it sets the netdev's TX
features: HW_CSUM, TSO, TSO6, TSO_ECN, GSO_UDP_L4).  We ask for all of them and step down
when the kernel refuses (USO needs Linux >= 6.2, and USO4 and USO6 only come together); the
result, as an `Offload`, is also what the port accepts from the switch.  The kernel checks
every header we write (virtio_net_hdr_to_skb) and refuses bad ones with EINVAL.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Literal

import trio

from netstack.frame import (
    PLAIN,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_LEN,
    Frame,
    Offload,
)
from netstack.policy import PortPolicy
from netstack.port import PortCounters, QueuedPort
from virtio.dataloop import serve_readable

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"

# linux/if_tun.h: ioctls (_IOW/_IOR('T', nr, int or unsigned int)).
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)

# linux/if_tun.h: TUNSETIFF flags.
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# linux/if_tun.h: TUNSETOFFLOAD flags.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20  # Linux 6.2
TUN_F_USO6 = 0x40  # Linux 6.2

# struct ifreq: the name (IFNAMSIZ) and, for TUNSETIFF, the flags; padded to 40 bytes.
IFNAMSIZ = 16
IFREQ = struct.Struct("16sH22x")

# Largest packet the device hands us: a 64 KiB GSO IP packet (the IP length field) under an
# Ethernet header and a VLAN tag.  A read that fills the buffer was truncated.
MAX_PACKET = 0xFFFF + 14 + 4
READ_BUFFER_BYTES = VIRTIO_NET_HDR_LEN + MAX_PACKET + 1

# Packets read (or frames written) per wake-up before yielding to other tasks.
BATCH = 64
# The device refused writes (EAGAIN) for this long: drop what is queued rather than hold it.
WRITE_STALL_SECONDS = 1.0

# What we ask for, best first; the kernel refuses a set with any bit it does not know.
OFFLOAD_TO_TUN = {
    Offload.CSUM: TUN_F_CSUM,
    Offload.TSO4: TUN_F_TSO4,
    Offload.TSO6: TUN_F_TSO6,
    Offload.ECN: TUN_F_TSO_ECN,
    Offload.USO: TUN_F_USO4 | TUN_F_USO6,
}
WANTED_OFFLOADS = Offload.CSUM | Offload.TSO4 | Offload.TSO6 | Offload.ECN | Offload.USO
# Stepping down: without USO (Linux < 6.2), then without ECN, then checksums only.
_FALLBACKS = (Offload.USO, Offload.ECN, Offload.TSO4 | Offload.TSO6)

# The header of a frame without offload metadata.
PLAIN_HEADER = bytes(VIRTIO_NET_HDR_LEN)

# errnos of a read or write that mean the device is gone, not that one frame was bad.
_FATAL_ERRNOS = frozenset({errno.EBADF, errno.EBADFD})

Mode = Literal["tap", "tun"]


class TunTapError(OSError):
    """The device could not be opened or configured, or went away."""


def tun_offload_flags(offloads: Offload) -> int:
    """TUNSETOFFLOAD flags for an Offload set."""
    flags = 0
    for offload, bits in OFFLOAD_TO_TUN.items():
        if offloads & offload:
            flags |= bits
    return flags


def describe(offloads: Offload) -> str:
    """`CSUM|TSO4|TSO6`, or `NONE`: for logs and status (str() of an IntFlag is its number)."""
    names = [flag.name for flag in Offload if flag and flag in offloads and flag.name]
    return "|".join(names) or "NONE"


def _effective(offloads: Offload) -> Offload:
    """What the kernel actually enables for a request: nothing without CSUM, ECN only
    with TSO (drivers/net/tun.c, set_offload)."""
    if not offloads & Offload.CSUM:
        return Offload.NONE
    offloads &= WANTED_OFFLOADS
    if not offloads & (Offload.TSO4 | Offload.TSO6):
        offloads &= ~Offload.ECN
    return offloads


class DeviceCounters:
    """Traffic through one device, from the device's side: `read_*` came out of the kernel,
    `written_*` went into it; `errors` counts refused or damaged packets by reason (an errno
    name for writes, `short_read`/`truncated` for reads)."""

    __slots__ = ("errors", "read_bytes", "read_frames", "written_bytes", "written_frames")

    def __init__(self) -> None:
        self.read_frames = 0
        self.read_bytes = 0
        self.written_frames = 0
        self.written_bytes = 0
        self.errors: Counter[str] = Counter()

    def as_dict(self) -> dict[str, object]:
        return {
            "read_frames": self.read_frames,
            "read_bytes": self.read_bytes,
            "written_frames": self.written_frames,
            "written_bytes": self.written_bytes,
            "errors": dict(self.errors),
        }


class TunTapDevice:
    """One open TUN or TAP device (one queue).  The netdev disappears when the fd closes.

    Reads and writes never block: `read_batch` returns [] when nothing is waiting and
    `write_batch` stops at EAGAIN; the Trio shell waits with `wait_readable`/`wait_writable`.
    """

    def __init__(self, fd: int, name: str, mode: Mode, offloads: Offload) -> None:
        self.fd = fd
        self.name = name
        self.mode: Mode = mode
        self.offloads = offloads
        self.counters = DeviceCounters()
        self._buffer = bytearray(READ_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        self._poll = poll.poll

    @classmethod
    def open(
        cls, name: str = "vhostvpn%d", mode: Mode = "tap", offloads: Offload = WANTED_OFFLOADS
    ) -> TunTapDevice:
        """Create (or attach to) the device `name` (a `%d` lets the kernel number it) with
        virtio-net headers, and negotiate `offloads` (less if the kernel refuses some)."""
        encoded = name.encode()
        if len(encoded) >= IFNAMSIZ:
            raise ValueError(f"interface name longer than {IFNAMSIZ - 1} bytes: {name!r}")
        if mode not in ("tap", "tun"):
            raise ValueError(f"mode must be 'tap' or 'tun', not {mode!r}")
        kind = IFF_TAP if mode == "tap" else IFF_TUN
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            hint = {errno.ENOENT: " (load the tun module: modprobe tun)",
                    errno.EACCES: " (it takes root or CAP_NET_ADMIN)"}.get(exc.errno, "")
            raise TunTapError(exc.errno, f"cannot open {TUN_DEVICE}: {exc.strerror}{hint}") \
                from None
        try:
            try:
                reply = fcntl.ioctl(
                    fd, TUNSETIFF, IFREQ.pack(encoded, kind | IFF_NO_PI | IFF_VNET_HDR)
                )
                # The 12-byte header every other hop uses: headers copy through unchanged.
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VIRTIO_NET_HDR_LEN))
            except OSError as exc:
                raise TunTapError(exc.errno, _why_not_created(exc, name, mode)) from None
            actual = IFREQ.unpack(reply)[0].rstrip(b"\0").decode()
            device = cls(fd, actual, mode, Offload.NONE)
            device.set_offloads(offloads)
        except BaseException:
            os.close(fd)
            raise
        log.info("%s: opened %s device, offloads %s", actual, mode, describe(device.offloads))
        return device

    def set_offloads(self, wanted: Offload) -> Offload:
        """Ask the kernel for `wanted` (TUNSETOFFLOAD), stepping down past what it refuses;
        returns (and remembers in `offloads`) what it accepted."""
        request = _effective(wanted)
        fallbacks = list(_FALLBACKS)
        while True:
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, tun_offload_flags(request))
            except OSError as exc:
                if exc.errno != errno.EINVAL or not request:
                    raise TunTapError(
                        exc.errno, f"{self.name}: TUNSETOFFLOAD failed: {exc.strerror}"
                    ) from None
                # The kernel refused a bit it does not know: drop the newest feature asked.
                while fallbacks and not request & fallbacks[0]:
                    fallbacks.pop(0)
                request = _effective(request & ~fallbacks.pop(0)) if fallbacks else Offload.NONE
                continue
            self.offloads = request
            return request

    # -- device -> switch -------------------------------------------------------------------

    def _count_or_raise(self, exc: OSError, op: str) -> None:
        """A failed read or write: the device gone is fatal (TunTapError); anything else is
        that one frame's error, counted by errno name."""
        if exc.errno in _FATAL_ERRNOS:
            raise TunTapError(exc.errno, f"{self.name}: {op}: {exc.strerror}") from None
        self.counters.errors[errno.errorcode.get(exc.errno or 0, f"{op}_error")] += 1

    def read_batch(self, limit: int = BATCH) -> list[Frame]:
        """Up to `limit` packets waiting in the device, or [] when none is (never blocks)."""
        fd = self.fd
        buffer = self._buffer
        view = self._view
        buffers = [buffer]
        counters = self.counters
        frames: list[Frame] = []
        append = frames.append
        readv = os.readv
        nbytes = 0
        while len(frames) < limit:
            if len(frames) == 1 and not self._poll(0):
                break  # a lone packet (an idle ping's): no read that raises EAGAIN
            try:
                size = readv(fd, buffers)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._count_or_raise(exc, "read")
                break
            if size <= VIRTIO_NET_HDR_LEN:
                counters.errors["short_read"] += 1
                continue
            if size == READ_BUFFER_BYTES:
                counters.errors["truncated"] += 1
                continue
            data = view[VIRTIO_NET_HDR_LEN:size].tobytes()
            nbytes += size - VIRTIO_NET_HDR_LEN
            if buffer[0] == 0 and buffer[1] == 0:
                append(Frame(data))
            else:
                append(Frame(data, VIRTIO_NET_HDR.unpack_from(buffer, 0)[:6]))
        counters.read_frames += len(frames)
        counters.read_bytes += nbytes
        return frames

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)

    # -- switch -> device -------------------------------------------------------------------

    def write_batch(self, frames: Sequence[Frame]) -> int:
        """Write frames in order until EAGAIN; returns how many were consumed (written, or
        refused by the kernel and counted in `counters.errors`).  Never raises for a frame."""
        fd = self.fd
        writev = os.writev
        pack = VIRTIO_NET_HDR.pack
        counters = self.counters
        written = 0
        nbytes = 0
        consumed = 0
        for frame in frames:
            offload = frame.offload
            header = PLAIN_HEADER if offload is PLAIN else pack(*offload, 0)
            try:
                writev(fd, (header, frame.data))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._count_or_raise(exc, "write")
            else:
                written += 1
                nbytes += len(frame.data)
            consumed += 1
        counters.written_frames += written
        counters.written_bytes += nbytes
        return consumed

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.fd)

    # -- life cycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the fd (the kernel removes the netdev); wakes any Trio task waiting on it.
        Idempotent."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:
            pass  # not inside trio.run: nobody can be waiting
        os.close(fd)

    def __enter__(self) -> TunTapDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        offloads = describe(self.offloads)
        return f"TunTapDevice({self.name!r}, {self.mode}, fd={self.fd}, offloads={offloads})"


def _why_not_created(exc: OSError, name: str, mode: Mode) -> str:
    """TUNSETIFF's refusal in words, with what to do."""
    kind = mode.upper()
    if exc.errno == errno.EBUSY:
        return (f"{kind} device {name} is in use by another process (another `vhostvpn "
                f"host`?): stop it, or choose another name")
    if exc.errno == errno.EINVAL and name_exists(name):
        return (f"a network interface named {name} exists and is not a {kind} device "
                f"vhostvpn can attach to: choose a name no interface has")
    if exc.errno == errno.EPERM:
        return f"creating a {kind} device takes root or CAP_NET_ADMIN"
    return f"cannot create {mode} device {name!r}: {exc.strerror}"


def name_exists(name: str) -> bool:
    """Is there a network interface called `name` (in this namespace)?"""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


class TapPort(QueuedPort):
    """The switch port of a TAP device: accepts the offloads the device negotiated."""

    def __init__(self, name: str, device: TunTapDevice, policy: PortPolicy | None = None) -> None:
        if device.mode != "tap":
            raise ValueError(f"{device.name} is a {device.mode} device; a TapPort needs a TAP")
        super().__init__(name, device.offloads, policy=policy)
        self.device = device
        # Set by run_device's writer while it runs: writes a batch to the device now and
        # says how many frames it consumed (`deliver` uses it when nothing is queued).
        self.write_at_once: Callable[[list[Frame]], int] | None = None

    def deliver(self, frames: list[Frame]) -> None:
        # Nothing queued: written from here, as the queue's `on_ready` would do at once,
        # without the trip through the queue; what the device does not take is queued.
        write = self.write_at_once
        if write is not None and not self.queue and len(frames) <= BATCH:
            consumed = write(frames)
            if consumed == len(frames):
                return
            frames = frames[consumed:]
        QueuedPort.deliver(self, frames)

    def status(self) -> dict[str, object]:
        status = super().status()
        status["kind"] = "tap"
        status["device"] = self.device.name
        status["offloads"] = describe(self.device.offloads)
        status["device_counters"] = self.device.counters.as_dict()
        return status


async def run_device(
    device: TunTapDevice,
    port: QueuedPort,
    forward: Callable[[QueuedPort, list[Frame]], None],
) -> None:
    """Move frames between `device` and the switch until cancelled (or the device goes away:
    TunTapError).  `forward(port, frames)` gets what the device read, a batch at a time;
    frames the switch queued on `port` are written to the device.  For a TUN device `port`
    and `forward` are the caller's L3 adapter: both directions carry IP packets."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_loop, device, port, forward)
        nursery.start_soon(_write_loop, device, port)


async def _read_loop(
    device: TunTapDevice,
    port: QueuedPort,
    forward: Callable[[QueuedPort, list[Frame]], None],
) -> None:
    """Device -> switch: a data-loop handler (virtio/dataloop.py), a batch per turn."""
    read_batch = device.read_batch

    def on_readable() -> bool:
        frames = read_batch(BATCH)
        if frames:
            forward(port, frames)
        return False

    await serve_readable(device.fd, on_readable)


def write_counted(device: TunTapDevice, frames: list[Frame], counters: PortCounters) -> int:
    """`frames` to the device, what it wrote counted as the port's `out_*` (`counters`): how
    many it consumed; TunTapError as `write_batch` raises it."""
    device_counters = device.counters
    frames_before = device_counters.written_frames
    bytes_before = device_counters.written_bytes
    consumed = device.write_batch(frames)
    counters.out_frames += device_counters.written_frames - frames_before
    counters.out_bytes += device_counters.written_bytes - bytes_before
    return consumed


def write_queued(device: TunTapDevice, queue: deque[Frame], counters: PortCounters) -> bool:
    """One batch from the head of `queue` to the device, counted as the port's `out_*`
    (`counters`); False if the kernel pushed back (the rest is back at the head of the
    queue, in order).  Shared by the TAP writer here and the TUN port's (tunnel/host/tunport.py)."""
    batch = ([queue.popleft()] if len(queue) == 1  # (a comprehension is a call)
             else [queue.popleft() for _ in range(min(BATCH, len(queue)))])
    try:
        consumed = write_counted(device, batch, counters)
    except TunTapError:
        queue.extendleft(reversed(batch))
        raise
    if consumed == len(batch):
        return True
    queue.extendleft(reversed(batch[consumed:]))
    return False


async def _write_loop(device: TunTapDevice, port: QueuedPort) -> None:
    """Frames the switch queued on `port` -> device."""
    pending = port.queue
    port_counters = port.counters
    ready = trio.Event()

    def write_now() -> None:
        """Frames arrived in the empty queue (called from the task that switched them):
        write them from here, without a trip through Trio's scheduler to this loop; what the
        device does not take, and any error, is left to the loop."""
        try:
            if write_queued(device, pending, port_counters) and not pending:
                return
        except TunTapError:
            pass  # the loop meets it again, in its own task
        ready.set()

    def write_at_once(frames: list[Frame]) -> int:
        """A TapPort's batch for an empty queue, written now: how many frames the device
        consumed (counted as the port's `out_*`); 0 on an error, left to the loop (the
        frames are queued, and `write_now` meets it again)."""
        try:
            return write_counted(device, frames, port_counters)
        except TunTapError:
            return 0

    tap = port if isinstance(port, TapPort) else None
    if tap is not None:
        tap.write_at_once = write_at_once
    try:
        while True:
            if not pending:
                ready = trio.Event()
                port.on_ready = write_now
                await ready.wait()
                continue
            if write_queued(device, pending, port_counters):
                if pending:  # more to write: let the other tasks run first (an empty queue
                    await trio.lowlevel.checkpoint()  # waits on the event above, which yields)
                continue
            # The kernel pushed back (the rest is queued, in order): wait, bounded, for room.
            with trio.move_on_after(WRITE_STALL_SECONDS) as stall:
                await device.wait_writable()
            if stall.cancelled_caught:
                log.warning(
                    "%s: device refused writes for %.1f s, dropping %d frames",
                    device.name,
                    WRITE_STALL_SECONDS,
                    len(pending),
                )
                port_counters.drop("device_stalled", len(pending))
                pending.clear()
    finally:
        if tap is not None:
            tap.write_at_once = None
