"""Guest-side test model: guest RAM on a memfd, a split-virtqueue driver, a virtio-net driver
and a real vhost-user front-end over a unix socket. Every virtqueue, backend and hostile-guest
test drives the backend through it. Written from the virtio 1.x and vhost-user specs; the one
thing it takes from virtio/ (the code under test) is the names of the vhost-user message
numbers and header flags (virtio/spec.py: a wrong number there fails against real QEMU and
DPDK, tests/test_qemu_*.py and test_testpmd_*.py).  Everything it checks the backend
against stays its own: the split-ring layout and flags, the index and event-idx arithmetic,
the virtio-net header, the feature masks, the memory-table and payload layouts.

Theory of operation (the path of a frame, top to bottom in this file):

1. ``GuestRam`` is the guest's physical memory: one or more regions, each a memfd mapped shared,
   each with a guest-physical address (GPA), a fake QEMU virtual address (UVA, deliberately
   different from the GPA) and an ``mmap_offset`` into its fd.
2. ``DriverQueue`` is one split virtqueue as the guest driver sees it: it allocates the
   descriptor table, avail and used rings in ``GuestRam``, writes buffers and descriptors
   (``add_chain``), publishes them with one ``avail.idx`` store (``publish``), decides whether to
   kick (``needs_kick``) and collects used elements (``used``), freeing their descriptors.
   Raw helpers (``write_desc``, ``set_avail_idx``...) let property tests play a hostile guest.
3. ``NetDriver`` puts virtio-net frames (12-byte header + Ethernet frame) on the TX queue and
   posts/collects receive buffers on the RX queue, reassembling mergeable RX buffers.
4. ``VhostUserFrontend`` is what QEMU (7.2) or DPDK virtio-user does on the vhost-user socket:
   wire codec, SCM_RIGHTS fds, feature negotiation, memory table, ring setup, stop and reboot,
   kick and call eventfds, plus a raw ``request`` for hostile-front-end tests.

Everything is little-endian (x86). The model is strict about what the *device* does (used ids,
used lengths, reply flags) and raises ``DeviceProtocolError`` / ``VhostUserProtocolError``.
"""

from __future__ import annotations

import array
import collections
import enum
import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import NamedTuple, Self, TypedDict, Unpack

import trio

from virtio.spec import (
    FLAG_NEED_REPLY,
    FLAG_VERSION,
    REPLY_FLAGS,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
    Request,
)

# ---------------------------------------------------------------------------------------------
# Constants named after the specs
# ---------------------------------------------------------------------------------------------

# Split virtqueue layout (virtio 1.x split-ring.tex, §2.7).
DESC_SIZE = 16
DESC_TABLE_ALIGN = 16
AVAIL_RING_ALIGN = 2
USED_RING_ALIGN = 4
USED_ELEM_SIZE = 8
RING_HEADER_SIZE = 4  # u16 flags, u16 idx
MAX_SPLIT_QUEUE_SIZE = 32768
INDEX_MODULUS = 0x1_0000  # avail/used indices are free-running u16

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_STRUCT = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEM_STRUCT = struct.Struct("<II")  # id, len
U16 = struct.Struct("<H")

# virtio-net header (device-types/net: struct virtio_net_hdr with num_buffers; 12 bytes when
# VERSION_1 or MRG_RXBUF is negotiated).
NET_HDR_LEN = 12
NET_HDR_STRUCT = struct.Struct("<BBHHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80
MIN_RX_BUFFER_SIZE = NET_HDR_LEN + 1514  # spec "Setting Up Receive Buffers" without GSO
DEFAULT_RX_BUFFER_SIZE = 2048
DEFAULT_TX_CHUNK_SIZE = 7  # small and odd, so the header straddles descriptors

# Guest RAM.
DEFAULT_UVA_BASE = 0x7F00_0000_0000  # looks like a QEMU mmap address; never equal to a GPA
UVA_REGION_STRIDE = 0x10_0000_0000  # 64 GiB between the fake UVAs of consecutive regions
MMAP_OFFSET_FILL = 0xA5  # bytes before a region's mmap_offset: garbage a backend must skip
WRITABLE_BUFFER_FILL = 0xCC  # device-writable buffers start as this, to spot short writes
DEFAULT_BUFFER_ALIGN = 8

# vhost-user wire format (qemu docs/interop/vhost-user.rst "Message Specification").
VHOST_USER_HEADER = struct.Struct("<III")  # request, flags, size
VHOST_USER_HEADER_SIZE = VHOST_USER_HEADER.size
VHOST_USER_MAX_PAYLOAD = 0x1000  # rust-vmm MAX_MSG_SIZE; replies larger than this are refused
VHOST_USER_MAX_FDS = 32  # rust-vmm: at most 32 fds per message
VHOST_MEMORY_BASELINE_NREGIONS = 8  # regions (and fds) in one SET_MEM_TABLE
VHOST_VRING_F_LOG = 1

U64_PAYLOAD = struct.Struct("<Q")
VRING_STATE_PAYLOAD = struct.Struct("<II")  # index, num
VRING_ADDR_PAYLOAD = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (40 bytes)
MEMORY_TABLE_HEADER = struct.Struct("<II")  # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # gpa, size, userspace_addr, mmap_offset
SINGLE_REGION_PAD = struct.Struct("<Q")

DEFAULT_QUEUE_SIZE = 256
REPLY_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 5.0
ACCEPT_TIMEOUT_S = 5.0
QEMU_EARLY_ENABLE_ROUNDS = 3  # QEMU 7.2 repeats SET_VRING_ENABLE 3-5 times before DRIVER_OK
EVENTFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


# Requests whose reply is mandatory whatever the flags (research §0.2; postcopy/IOTLB left out).
REQUESTS_WITH_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_INFLIGHT_FD,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
    }
)


class VirtioFeature(enum.IntFlag):
    """Feature bits as masks (virtio-net, virtio transport, vhost; research §1.2 and §1.8)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GSO = 1 << 6
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL
    ANY_LAYOUT = 1 << 27
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    HASH_REPORT = 1 << 57
    GUEST_HDRLEN = 1 << 59
    RSS = 1 << 60
    RSC_EXT = 1 << 61


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature bits as masks (research §1.2)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# What the model's guest asks for by default; the front-end acks this ∩ the backend's offer.
DEFAULT_NET_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.MRG_RXBUF
    | VirtioFeature.EVENT_IDX
    | VirtioFeature.INDIRECT_DESC
)
DEFAULT_PROTOCOL_FEATURES = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK


class DeviceProtocolError(Exception):
    """The device (backend) broke a rule of the virtio spec the driver model can see."""


class QueueFullError(Exception):
    """The driver has no free descriptors for the chain it was asked to add."""


class GuestRamError(ValueError):
    """A guest-physical range is outside guest RAM, or RAM is exhausted."""


class VhostUserProtocolError(Exception):
    """The back-end sent a reply that breaks the vhost-user wire rules."""


class VhostUserDisconnected(EOFError):
    """The back-end closed the vhost-user socket."""


def _align_up(value: int, align: int) -> int:
    if align <= 0 or align & (align - 1):
        raise ValueError(f"alignment must be a power of two, got {align}")
    return (value + align - 1) & ~(align - 1)


# ---------------------------------------------------------------------------------------------
# 1. Guest RAM
# ---------------------------------------------------------------------------------------------


@dataclass
class GuestRegion:
    """One guest RAM region: ``size`` bytes at ``gpa``, at file offset ``mmap_offset`` of ``fd``.

    Mapped the way a backend must map it: ``size + mmap_offset`` bytes from file offset 0.
    """

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    fd: int
    mapping: mmap.mmap = field(repr=False)

    def table_entry(self) -> tuple[int, int, int, int]:
        """(gpa, size, uva, mmap_offset), as in a SET_MEM_TABLE region."""
        return (self.gpa, self.size, self.uva, self.mmap_offset)

    def contains_gpa(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


class GuestRam:
    """Guest physical memory on memfds, with a first-fit allocator over guest-physical space.

    ``GuestRam(size)`` is one region at GPA ``gpa_base`` and UVA ``uva_base``;
    ``GuestRam.multi(sizes)`` builds several regions contiguous in GPA but not in UVA, on
    separate memfds or (``shared_fd=True``) on one memfd at increasing ``mmap_offset``.
    ``fd``/``size``/``gpa_base``/``uva_base``/``mmap_offset`` describe region 0 (``size`` is
    the total of all regions). Allocations never straddle a region unless placed with
    ``reserve``.
    """

    def __init__(
        self,
        size: int,
        *,
        mmap_offset: int = 0,
        gpa_base: int = 0,
        uva_base: int = DEFAULT_UVA_BASE,
    ) -> None:
        self._setup([(gpa_base, size, uva_base, mmap_offset)], shared_fd=False)

    @classmethod
    def multi(
        cls,
        sizes: Sequence[int],
        *,
        shared_fd: bool = False,
        gpa_base: int = 0,
        gpa_gap: int = 0,
        uva_base: int = DEFAULT_UVA_BASE,
        mmap_offset: int = 0,
    ) -> Self:
        """Several regions: region k starts ``gpa_gap`` bytes after region k-1 ends in GPA, at
        UVA ``uva_base + k * UVA_REGION_STRIDE``. With ``shared_fd`` all regions live in one
        memfd, region k at file offset ``mmap_offset + sum(sizes[:k])``."""
        if not sizes:
            raise ValueError("GuestRam.multi needs at least one region size")
        layout = []
        gpa = gpa_base
        file_offset = mmap_offset
        for index, size in enumerate(sizes):
            region_offset = file_offset if shared_fd else mmap_offset
            layout.append((gpa, size, uva_base + index * UVA_REGION_STRIDE, region_offset))
            gpa += size + gpa_gap
            file_offset += size
        ram = cls.__new__(cls)
        ram._setup(layout, shared_fd=shared_fd)
        return ram

    def _setup(self, layout: Sequence[tuple[int, int, int, int]], *, shared_fd: bool) -> None:
        for gpa, size, _uva, offset in layout:
            if size <= 0 or gpa < 0 or offset < 0:
                raise ValueError(f"bad region gpa={gpa:#x} size={size:#x} mmap_offset={offset:#x}")
        self.regions: list[GuestRegion] = []
        self._owned_fds: list[int] = []
        shared = None
        if shared_fd:
            file_size = max(offset + size for _gpa, size, _uva, offset in layout)
            shared = self._new_memfd(file_size)
        for gpa, size, uva, offset in layout:
            fd = shared if shared is not None else self._new_memfd(offset + size)
            mapping = mmap.mmap(
                fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            self.regions.append(GuestRegion(gpa, size, uva, offset, fd, mapping))
        if shared is not None:
            # Fill the gap before the first region only; later regions' prefixes are real RAM.
            first = min(self.regions, key=lambda region: region.mmap_offset)
            first.mapping[: first.mmap_offset] = bytes([MMAP_OFFSET_FILL]) * first.mmap_offset
        else:
            for region in self.regions:
                region.mapping[: region.mmap_offset] = (
                    bytes([MMAP_OFFSET_FILL]) * region.mmap_offset
                )
        self.regions.sort(key=lambda region: region.gpa)
        for before, after in zip(self.regions, self.regions[1:], strict=False):
            if before.gpa + before.size > after.gpa:
                raise ValueError(f"regions overlap in GPA: {before} and {after}")
        self._boundaries = frozenset(region.gpa for region in self.regions[1:])
        # Free list: sorted, coalesced [start, end) GPA ranges.
        self._free: list[list[int]] = []
        for region in self.regions:
            self._insert_free(region.gpa, region.gpa + region.size)
        self._allocated: dict[int, int] = {}

    def _new_memfd(self, size: int) -> int:
        # Sealable but not sealed yet: what QEMU's memory-backend-memfd makes before its own
        # seal=on seals grow/shrink, so a back-end's seal shows.
        fd = os.memfd_create("vhostvpn-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        self._owned_fds.append(fd)
        return fd

    # -- region-0 attributes, for the common single-region case -----------------------------

    @property
    def fd(self) -> int:
        return self.regions[0].fd

    @property
    def size(self) -> int:
        return sum(region.size for region in self.regions)

    @property
    def gpa_base(self) -> int:
        return self.regions[0].gpa

    @property
    def uva_base(self) -> int:
        return self.regions[0].uva

    @property
    def mmap_offset(self) -> int:
        return self.regions[0].mmap_offset

    def region(self) -> tuple[int, int, int, int]:
        """Region 0 as (gpa, size, uva, mmap_offset)."""
        return self.regions[0].table_entry()

    def memory_table(self) -> list[tuple[int, int, int, int]]:
        """Every region as (gpa, size, uva, mmap_offset), in GPA order."""
        return [region.table_entry() for region in self.regions]

    def region_fds(self) -> list[int]:
        """One fd per region, in ``memory_table`` order (the same fd repeats if shared)."""
        return [region.fd for region in self.regions]

    # -- translation and access -------------------------------------------------------------

    def _region_of_gpa(self, gpa: int) -> GuestRegion:
        for region in self.regions:
            if region.contains_gpa(gpa):
                return region
        raise GuestRamError(f"GPA {gpa:#x} is outside guest RAM {self._describe()}")

    def _describe(self) -> str:
        return ", ".join(f"[{r.gpa:#x}, {r.gpa + r.size:#x})" for r in self.regions)

    def gpa_to_uva(self, gpa: int) -> int:
        region = self._region_of_gpa(gpa)
        return region.uva + (gpa - region.gpa)

    def uva_to_gpa(self, uva: int) -> int:
        for region in self.regions:
            if region.uva <= uva < region.uva + region.size:
                return region.gpa + (uva - region.uva)
        raise GuestRamError(f"UVA {uva:#x} is outside guest RAM")

    def _spans(self, gpa: int, length: int) -> Iterable[tuple[GuestRegion, int, int]]:
        """(region, offset in its mapping, count) pieces covering [gpa, gpa+length)."""
        if length < 0:
            raise GuestRamError(f"negative length {length} at GPA {gpa:#x}")
        while length > 0:
            region = self._region_of_gpa(gpa)
            count = min(length, region.gpa + region.size - gpa)
            yield region, region.mmap_offset + gpa - region.gpa, count
            gpa += count
            length -= count

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``gpa``; may straddle regions that are contiguous in GPA."""
        data = memoryview(data).cast("B")
        pieces = list(self._spans(gpa, len(data)))  # validate the whole range before writing
        done = 0
        for region, offset, count in pieces:
            region.mapping[offset : offset + count] = data[done : done + count]
            done += count

    def read(self, gpa: int, length: int) -> bytes:
        """Read ``length`` bytes at ``gpa``; may straddle regions that are contiguous in GPA."""
        return b"".join(
            region.mapping[offset : offset + count]
            for region, offset, count in self._spans(gpa, length)
        )

    def read_u16(self, gpa: int) -> int:
        """One 2-byte load (the way a driver reads a ring index)."""
        region = self._region_of_gpa(gpa)
        return U16.unpack_from(region.mapping, region.mmap_offset + gpa - region.gpa)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        """One 2-byte store (the way a driver publishes a ring index)."""
        region = self._region_of_gpa(gpa)
        U16.pack_into(region.mapping, region.mmap_offset + gpa - region.gpa, value & 0xFFFF)

    # -- allocation -------------------------------------------------------------------------

    def _insert_free(self, start: int, end: int) -> None:
        self._free.append([start, end])
        self._free.sort()
        merged: list[list[int]] = []
        for span in self._free:
            if merged and merged[-1][1] == span[0]:
                merged[-1][1] = span[1]
            else:
                merged.append(span)
        self._free = merged

    def alloc(self, size: int, align: int = DEFAULT_BUFFER_ALIGN) -> int:
        """First-fit allocation of ``size`` bytes (≥ 1) aligned to ``align``, inside one region.

        Before anything is freed this is a bump allocator from the lowest GPA.
        """
        if size <= 0:
            raise ValueError(f"allocation size must be positive, got {size}")
        for span in self._free:
            start, end = span
            candidate = _align_up(start, align)
            while candidate + size <= end:
                crossing = [b for b in self._boundaries if candidate < b < candidate + size]
                if not crossing:
                    self._take(candidate, size)
                    return candidate
                candidate = _align_up(min(crossing), align)
        raise GuestRamError(
            f"guest RAM exhausted: no free {size:#x} bytes aligned to {align} "
            f"(free spans {[(hex(s), hex(e)) for s, e in self._free]})"
        )

    def reserve(self, gpa: int, size: int) -> int:
        """Allocate exactly [gpa, gpa+size), which may straddle regions; for placement tests."""
        if size <= 0:
            raise ValueError(f"reservation size must be positive, got {size}")
        list(self._spans(gpa, size))  # inside guest RAM?
        if not any(start <= gpa and gpa + size <= end for start, end in self._free):
            raise GuestRamError(f"[{gpa:#x}, {gpa + size:#x}) is not entirely free")
        self._take(gpa, size)
        return gpa

    def _take(self, gpa: int, size: int) -> None:
        end = gpa + size
        remaining: list[list[int]] = []
        for start, stop in self._free:
            if stop <= gpa or start >= end:
                remaining.append([start, stop])
                continue
            if start < gpa:
                remaining.append([start, gpa])
            if stop > end:
                remaining.append([end, stop])
        self._free = remaining
        self._allocated[gpa] = size

    def free(self, gpa: int) -> None:
        """Return an allocation made by ``alloc`` or ``reserve``."""
        size = self._allocated.pop(gpa, None)
        if size is None:
            raise GuestRamError(f"GPA {gpa:#x} is not the start of an allocation")
        self._insert_free(gpa, gpa + size)

    @property
    def bytes_allocated(self) -> int:
        return sum(self._allocated.values())

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        for region in self.regions:
            region.mapping.close()
        for fd in self._owned_fds:
            os.close(fd)
        self._owned_fds = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# 2. Split virtqueue, driver side
# ---------------------------------------------------------------------------------------------


class Descriptor(NamedTuple):
    addr: int
    len: int
    flags: int
    next: int


class UsedElem(NamedTuple):
    id: int
    len: int


class Segment(NamedTuple):
    """A buffer already in guest RAM, to be described by one descriptor."""

    gpa: int
    length: int
    writable: bool


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio spec: notify iff ``(u16)(new - event - 1) < (u16)(new - old)``."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass
class _Chain:
    head: int
    descriptors: list[int]  # ring descriptor-table slots (one for an indirect chain)
    allocations: list[int]  # GPAs this queue allocated for it (buffers, indirect table)
    writable: list[tuple[int, int]]  # (gpa, length) of device-writable buffers, chain order


class DriverQueue:
    """One split virtqueue as the guest driver sees it (virtio 1.x §2.7, driver requirements).

    Layout in ``ram``: descriptor table (16-byte aligned), avail ring (2), used ring (4).
    ``event_idx`` / ``indirect`` say whether VIRTIO_F_EVENT_IDX / INDIRECT_DESC were
    negotiated. ``start_idx`` is the initial avail and used index (the backend gets
    SET_VRING_BASE=start_idx), so tests reach the 65535 wrap quickly.
    """

    def __init__(
        self,
        ram: GuestRam,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        start_idx: int = 0,
    ) -> None:
        if size <= 0 or size > MAX_SPLIT_QUEUE_SIZE or size & (size - 1):
            raise ValueError(
                f"queue size must be a power of two in 1..{MAX_SPLIT_QUEUE_SIZE}, got {size}"
            )
        self.ram = ram
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.start_idx = start_idx & 0xFFFF
        self.desc_gpa = ram.alloc(DESC_SIZE * size, DESC_TABLE_ALIGN)
        self.avail_gpa = ram.alloc(RING_HEADER_SIZE + 2 * size + 2, AVAIL_RING_ALIGN)
        self.used_gpa = ram.alloc(RING_HEADER_SIZE + USED_ELEM_SIZE * size + 2, USED_RING_ALIGN)
        ram.write(self.desc_gpa, bytes(DESC_SIZE * size))
        ram.write(self.avail_gpa, bytes(RING_HEADER_SIZE + 2 * size + 2))
        ram.write(self.used_gpa, bytes(RING_HEADER_SIZE + USED_ELEM_SIZE * size + 2))
        ram.write_u16(self.avail_gpa + 2, self.start_idx)
        ram.write_u16(self.used_gpa + 2, self.start_idx)
        self.avail_idx = self.start_idx  # the driver's shadow of avail.idx
        self.last_used_idx = self.start_idx
        self.last_publish = (self.start_idx, self.start_idx)
        self._free_descriptors: collections.deque[int] = collections.deque(range(size))
        self._chains: dict[int, _Chain] = {}
        self._unpublished: list[int] = []
        self._written: dict[int, bytes] = {}

    # -- addresses ---------------------------------------------------------------------------

    @property
    def desc_uva(self) -> int:
        return self.ram.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.ram.gpa_to_uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        return self.ram.gpa_to_uva(self.used_gpa)

    @property
    def used_event_gpa(self) -> int:
        return self.avail_gpa + RING_HEADER_SIZE + 2 * self.size

    @property
    def avail_event_gpa(self) -> int:
        return self.used_gpa + RING_HEADER_SIZE + USED_ELEM_SIZE * self.size

    @property
    def free_descriptors(self) -> int:
        return len(self._free_descriptors)

    @property
    def in_flight(self) -> int:
        """Chains added and not yet returned in the used ring."""
        return len(self._chains)

    # -- adding and publishing chains -------------------------------------------------------

    def add_chain(
        self,
        readable: Sequence[bytes],
        writable: Sequence[int],
        *,
        indirect: bool = False,
    ) -> int:
        """Copy ``readable`` buffers into RAM, allocate ``writable`` buffers of those sizes, and
        describe them as one chain (readable first). Returns the head; call ``publish``."""
        allocations: list[int] = []
        segments: list[Segment] = []
        try:
            for data in readable:
                gpa = self.ram.alloc(max(1, len(data)))
                allocations.append(gpa)
                self.ram.write(gpa, data)
                segments.append(Segment(gpa, len(data), False))
            for length in writable:
                gpa = self.ram.alloc(max(1, length))
                allocations.append(gpa)
                self.ram.write(gpa, bytes([WRITABLE_BUFFER_FILL]) * length)
                segments.append(Segment(gpa, length, True))
            head = self.add_segments(segments, indirect=indirect)
        except BaseException:
            for gpa in allocations:
                self.ram.free(gpa)
            raise
        self._chains[head].allocations.extend(allocations)
        return head

    def add_segments(self, segments: Sequence[Segment], *, indirect: bool = False) -> int:
        """Describe buffers already placed in RAM (e.g. straddling regions) as one chain."""
        if not segments:
            raise ValueError("a descriptor chain needs at least one buffer")
        seen_writable = False
        for segment in segments:
            if seen_writable and not segment.writable:
                raise ValueError("driver rule: readable descriptors must precede writable ones")
            seen_writable = seen_writable or segment.writable
        if indirect:
            if not self.indirect:
                raise ValueError("indirect chain requested but INDIRECT_DESC is not negotiated")
            return self._add_indirect(segments)
        if len(segments) > len(self._free_descriptors):
            raise QueueFullError(
                f"chain of {len(segments)} descriptors, {len(self._free_descriptors)} free"
            )
        slots = [self._free_descriptors.popleft() for _ in segments]
        for position, (slot, segment) in enumerate(zip(slots, segments, strict=True)):
            is_last = position == len(slots) - 1
            flags = (0 if is_last else VIRTQ_DESC_F_NEXT) | (
                VIRTQ_DESC_F_WRITE if segment.writable else 0
            )
            self.write_desc(
                slot, segment.gpa, segment.length, flags, 0 if is_last else slots[position + 1]
            )
        return self._record(slots, [], segments)

    def _add_indirect(self, segments: Sequence[Segment]) -> int:
        if not self._free_descriptors:
            raise QueueFullError("indirect chain needs one free descriptor, none free")
        table = bytearray()
        for position, segment in enumerate(segments):
            is_last = position == len(segments) - 1
            flags = (0 if is_last else VIRTQ_DESC_F_NEXT) | (
                VIRTQ_DESC_F_WRITE if segment.writable else 0
            )
            table += DESC_STRUCT.pack(
                segment.gpa, segment.length, flags, 0 if is_last else position + 1
            )
        table_gpa = self.ram.alloc(len(table), DESC_TABLE_ALIGN)
        self.ram.write(table_gpa, table)
        slot = self._free_descriptors.popleft()
        self.write_desc(slot, table_gpa, len(table), VIRTQ_DESC_F_INDIRECT, 0)
        return self._record([slot], [table_gpa], segments)

    def _record(self, slots: list[int], allocations: list[int], segments: Sequence[Segment]) -> int:
        head = slots[0]
        writable = [(s.gpa, s.length) for s in segments if s.writable]
        self._chains[head] = _Chain(head, slots, list(allocations), writable)
        self._written.pop(head, None)
        self._unpublished.append(head)
        return head

    def publish(self) -> tuple[int, int]:
        """Write the pending heads into the avail ring, then one avail.idx store.

        Returns (old_avail_idx, new_avail_idx), the arguments of ``needs_kick``.
        """
        old = self.avail_idx
        for offset, head in enumerate(self._unpublished):
            self.set_avail_entry((old + offset) % self.size, head)
        new = (old + len(self._unpublished)) & 0xFFFF
        self._unpublished = []
        self.ram.write_u16(self.avail_gpa + 2, new)
        self.avail_idx = new
        self.last_publish = (old, new)
        return old, new

    def needs_kick(self, old_avail: int | None = None, new_avail: int | None = None) -> bool:
        """Driver's notification decision after publishing (virtio 1.x §2.7.10.1).

        Defaults to the last ``publish``. With EVENT_IDX: the device's avail_event; without:
        the used ring's NO_NOTIFY flag. (No store→load fence here: fine for in-process
        backends; kick unconditionally when the backend is another process.)
        """
        if old_avail is None or new_avail is None:
            old_avail, new_avail = self.last_publish
        if self.event_idx:
            return vring_need_event(self.avail_event(), new_avail, old_avail)
        return not self.used_flags() & VRING_USED_F_NO_NOTIFY

    # -- used ring --------------------------------------------------------------------------

    def used_idx(self) -> int:
        return self.ram.read_u16(self.used_gpa + 2)

    def used(self) -> list[UsedElem]:
        """New used elements since the last call; frees their descriptors and buffers after
        saving what the device wrote (see ``read_written``)."""
        used_idx = self.used_idx()
        count = (used_idx - self.last_used_idx) & 0xFFFF
        published = len(self._chains) - len(self._unpublished)
        if count > published:
            raise DeviceProtocolError(
                f"used.idx moved by {count} (from {self.last_used_idx} to {used_idx}) "
                f"but only {published} published chains are in flight"
            )
        elements = []
        for step in range(count):
            slot = (self.last_used_idx + step) % self.size
            head, length = USED_ELEM_STRUCT.unpack(
                self.ram.read(
                    self.used_gpa + RING_HEADER_SIZE + USED_ELEM_SIZE * slot, USED_ELEM_SIZE
                )
            )
            chain = None if head in self._unpublished else self._chains.pop(head, None)
            if chain is None:
                raise DeviceProtocolError(
                    f"used ring slot {slot} has id {head}, which is not an in-flight chain head "
                    f"(in flight: {sorted(self._chains)})"
                )
            capacity = sum(size for _gpa, size in chain.writable)
            if length > capacity:
                raise DeviceProtocolError(
                    f"used len {length} for head {head} exceeds its writable capacity {capacity}"
                )
            self._written[head] = self._gather_written(chain, length)
            self._free_descriptors.extend(chain.descriptors)
            for gpa in chain.allocations:
                self.ram.free(gpa)
            elements.append(UsedElem(head, length))
        self.last_used_idx = used_idx
        return elements

    def _gather_written(self, chain: _Chain, length: int) -> bytes:
        pieces = []
        for gpa, size in chain.writable:
            if length <= 0:
                break
            take = min(size, length)
            pieces.append(self.ram.read(gpa, take))
            length -= take
        return b"".join(pieces)

    def read_written(self, head_or_entry: int | UsedElem | tuple[int, int]) -> bytes:
        """The bytes the device wrote into a used chain's writable buffers (``len`` of them).

        Valid until the same head is used again for a new chain.
        """
        head = head_or_entry if isinstance(head_or_entry, int) else head_or_entry[0]
        try:
            return self._written[head]
        except KeyError:
            raise ValueError(f"head {head} has not come back in the used ring") from None

    # -- event suppression ------------------------------------------------------------------

    def set_used_event(self, idx: int) -> None:
        """Driver asks for a call when used.idx passes ``idx`` (EVENT_IDX)."""
        self.ram.write_u16(self.used_event_gpa, idx)

    def avail_event(self) -> int:
        """The device's avail_event (EVENT_IDX): kick when avail.idx passes it."""
        return self.ram.read_u16(self.avail_event_gpa)

    def used_flags(self) -> int:
        return self.ram.read_u16(self.used_gpa)

    def set_avail_flags(self, flags: int) -> None:
        """E.g. VRING_AVAIL_F_NO_INTERRUPT; must stay 0 when EVENT_IDX is negotiated."""
        self.ram.write_u16(self.avail_gpa, flags)

    def avail_flags(self) -> int:
        return self.ram.read_u16(self.avail_gpa)

    # -- raw access for hostile-guest tests (bypasses the model's bookkeeping) ---------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"descriptor index {index} outside table of {self.size}")
        self.ram.write(
            self.desc_gpa + DESC_SIZE * index,
            DESC_STRUCT.pack(
                addr & (2**64 - 1), length & (2**32 - 1), flags & 0xFFFF, next_index & 0xFFFF
            ),
        )

    def read_desc(self, index: int) -> Descriptor:
        if not 0 <= index < self.size:
            raise IndexError(f"descriptor index {index} outside table of {self.size}")
        return Descriptor(
            *DESC_STRUCT.unpack(self.ram.read(self.desc_gpa + DESC_SIZE * index, DESC_SIZE))
        )

    def set_avail_idx(self, value: int) -> None:
        """Raw avail.idx store; the shadow index is *not* changed."""
        self.ram.write_u16(self.avail_gpa + 2, value)

    def set_avail_entry(self, slot: int, head: int) -> None:
        if not 0 <= slot < self.size:
            raise IndexError(f"avail ring slot {slot} outside ring of {self.size}")
        self.ram.write_u16(self.avail_gpa + RING_HEADER_SIZE + 2 * slot, head)

    def write_raw(self, gpa: int, data: bytes) -> None:
        self.ram.write(gpa, data)

    def release(self) -> None:
        """Give the rings and every in-flight buffer back to ``ram`` (after a device reset)."""
        for chain in self._chains.values():
            for gpa in chain.allocations:
                self.ram.free(gpa)
        self._chains.clear()
        self._unpublished = []
        for gpa in (self.desc_gpa, self.avail_gpa, self.used_gpa):
            self.ram.free(gpa)


# ---------------------------------------------------------------------------------------------
# 3. virtio-net
# ---------------------------------------------------------------------------------------------


class NetHdr(NamedTuple):
    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0


def pack_net_hdr(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
    num_buffers: int = 0,
) -> bytes:
    return NET_HDR_STRUCT.pack(
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
    )


def unpack_net_hdr(data: bytes | bytearray | memoryview) -> NetHdr:
    if len(data) < NET_HDR_LEN:
        raise ValueError(f"virtio-net header needs {NET_HDR_LEN} bytes, got {len(data)}")
    return NetHdr(*NET_HDR_STRUCT.unpack_from(data))


class TxLayout(enum.Enum):
    """How ``NetDriver.send`` spreads header + frame over descriptors."""

    ONE_DESCRIPTOR = "one"  # header and frame in one buffer (ANY_LAYOUT / VERSION_1)
    HEADER_APART = "header-apart"  # header alone, then the frame (legacy Linux layout)
    CHUNKED = "chunked"  # the 12+N bytes cut every chunk_size bytes (header straddles)


class NetDriver:
    """The virtio-net driver's data path over an RX queue (device writes) and a TX queue."""

    def __init__(self, rx: DriverQueue, tx: DriverQueue, *, mrg_rxbuf: bool) -> None:
        self.rx = rx
        self.tx = tx
        self.mrg_rxbuf = mrg_rxbuf
        self._partial: tuple[NetHdr, list[bytes], int] | None = None  # hdr, pieces, missing

    def send(
        self,
        frames: Sequence[bytes | tuple[bytes | NetHdr, bytes]],
        *,
        indirect: bool = False,
        layout: TxLayout = TxLayout.ONE_DESCRIPTOR,
        chunk_size: int = DEFAULT_TX_CHUNK_SIZE,
    ) -> list[int]:
        """Put each frame (plain = zero header) on TX as one chain and publish. Returns heads."""
        heads = []
        for item in frames:
            if isinstance(item, tuple):
                hdr, frame = item
                hdr_bytes = pack_net_hdr(*hdr) if isinstance(hdr, NetHdr) else bytes(hdr)
            else:
                hdr_bytes, frame = pack_net_hdr(), item
            if layout is TxLayout.ONE_DESCRIPTOR:
                buffers = [hdr_bytes + frame]
            elif layout is TxLayout.HEADER_APART:
                buffers = [hdr_bytes, frame] if frame else [hdr_bytes]
            else:
                if chunk_size <= 0:
                    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
                stream = hdr_bytes + frame
                buffers = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]
            heads.append(self.tx.add_chain(buffers, [], indirect=indirect))
        self.tx.publish()
        return heads

    def reclaim_tx(self) -> list[UsedElem]:
        """TX chains the device has finished with."""
        return self.tx.used()

    def post_rx(
        self,
        count: int,
        buf_size: int = DEFAULT_RX_BUFFER_SIZE,
        *,
        split_header: bool = False,
        indirect: bool = False,
    ) -> list[int]:
        """Add ``count`` receive buffers of ``buf_size`` bytes and publish. With
        ``split_header`` each is two descriptors: the 12-byte header, then the rest."""
        if split_header and buf_size <= NET_HDR_LEN:
            raise ValueError(f"split_header needs buf_size > {NET_HDR_LEN}, got {buf_size}")
        sizes = [NET_HDR_LEN, buf_size - NET_HDR_LEN] if split_header else [buf_size]
        heads = [self.rx.add_chain([], sizes, indirect=indirect) for _ in range(count)]
        self.rx.publish()
        return heads

    @property
    def rx_pending_buffers(self) -> int:
        """Used RX buffers held back because a merged packet is not complete yet."""
        return 0 if self._partial is None else len(self._partial[1])

    def receive(self) -> list[tuple[NetHdr, bytes]]:
        """Completed packets from the RX used ring: (header, frame without header).

        With MRG_RXBUF the first buffer's num_buffers = k says the packet spans k consecutive
        used entries; only the first carries a header. A packet whose k buffers are not all
        used yet is kept for the next call.
        """
        packets = []
        for element in self.rx.used():
            data = self.rx.read_written(element)
            if self._partial is None:
                if len(data) < NET_HDR_LEN:
                    raise DeviceProtocolError(
                        f"RX used len {len(data)} for head {element.id} is shorter than the "
                        f"{NET_HDR_LEN}-byte virtio-net header"
                    )
                hdr = unpack_net_hdr(data)
                buffers = hdr.num_buffers if self.mrg_rxbuf else 1
                if buffers == 0 or buffers > self.rx.size:
                    raise DeviceProtocolError(
                        f"RX header num_buffers={hdr.num_buffers}, expected 1..{self.rx.size}"
                    )
                self._partial = (hdr, [data[NET_HDR_LEN:]], buffers - 1)
            else:
                hdr, pieces, missing = self._partial
                pieces.append(data)
                self._partial = (hdr, pieces, missing - 1)
            hdr, pieces, missing = self._partial
            if missing == 0:
                packets.append((hdr, b"".join(pieces)))
                self._partial = None
        return packets


# ---------------------------------------------------------------------------------------------
# 4. vhost-user wire codec (no I/O)
# ---------------------------------------------------------------------------------------------


def encode_header(request: int, flags: int, size: int) -> bytes:
    return VHOST_USER_HEADER.pack(request, flags, size)


def encode_message(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return encode_header(request, flags, len(payload)) + payload


def pack_u64(value: int) -> bytes:
    return U64_PAYLOAD.pack(value)


def pack_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE_PAYLOAD.pack(index, num)


def pack_vring_addr(
    index: int, *, desc: int, used: int, avail: int, log: int = 0, flags: int = 0
) -> bytes:
    """40 bytes: u32 index, u32 flags, u64 desc, u64 used, u64 avail, u64 log (UVAs)."""
    return VRING_ADDR_PAYLOAD.pack(index, flags, desc, used, avail, log)


def pack_vring_file(index: int, *, nofd: bool = False) -> bytes:
    """u64: bits 0-7 the queue index, bit 8 NOFD (no fd attached: poll / no notification)."""
    return pack_u64(
        (index & VRING_INDEX_MASK) | (VRING_NOFD_MASK if nofd else 0)
    )


def pack_memory_table(regions: Sequence[tuple[int, int, int, int]]) -> bytes:
    """u32 nregions, u32 pad, then (gpa, size, uva, mmap_offset) per region."""
    return MEMORY_TABLE_HEADER.pack(len(regions), 0) + b"".join(
        MEMORY_REGION.pack(*region) for region in regions
    )


def pack_single_region(region: tuple[int, int, int, int]) -> bytes:
    """ADD_MEM_REG / REM_MEM_REG payload: u64 pad + one region (40 bytes)."""
    return SINGLE_REGION_PAD.pack(0) + MEMORY_REGION.pack(*region)


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


# ---------------------------------------------------------------------------------------------
# 5. vhost-user front-end (the QEMU / DPDK side of the socket)
# ---------------------------------------------------------------------------------------------


class BringUpOrder(enum.Enum):
    """Whose message order the front-end imitates (research §1.3)."""

    QEMU_7_2 = "qemu-7.2"  # connect block, early CALL/ERR, enable before rings exist
    QEMU_NEWER = "qemu-newer"  # as 7.2, but SET_VRING_ENABLE waits for an ack
    DPDK_VIRTIO_USER = "dpdk-virtio-user"  # SET_OWNER first, no ERR, enable after ring setup


RX_QUEUE_INDEX = 0
TX_QUEUE_INDEX = 1
NET_QUEUE_PAIR = (RX_QUEUE_INDEX, TX_QUEUE_INDEX)


class BringUpOptions(TypedDict, total=False):
    """What ``VhostUserFrontend.bring_up`` takes (its defaults apply to what is left out)."""

    features: int
    protocol_features: int
    queue_size: int
    start_idx: int


class SentMessage(NamedTuple):
    request: int
    flags: int
    payload: bytes
    fd_count: int


class VhostUserFrontend:
    """A vhost-user front-end on one connected unix stream socket, for one virtio-net device.

    Use ``connect``/``accept`` for a ready device with queue pair 0 as ``self.net``; or build
    one on a socket and call the steps (``negotiate``, ``start``, ``stop``, ``reboot``) or the
    raw ``request`` yourself. Guest RAM belongs to the caller and is not closed here.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        ram: GuestRam,
        *,
        order: BringUpOrder = BringUpOrder.QEMU_7_2,
        reply_timeout: float = REPLY_TIMEOUT_S,
    ) -> None:
        self.sock = sock
        self.ram = ram
        self.order = order
        self.reply_timeout = reply_timeout
        self.backend_features = 0
        self.backend_protocol_features = 0
        self.wanted_features = 0
        self.acked_features = 0
        self.protocol_features = 0  # negotiated
        self.queue_num: int | None = None
        self.queues: dict[int, DriverQueue] = {}
        self.net: NetDriver | None = None
        self.sent: list[SentMessage] = []  # every message sent, for order assertions
        self.unexpected_fds_received = 0
        self._kick_fds: dict[int, int] = {}
        self._call_fds: dict[int, int] = {}
        self._err_fds: dict[int, int] = {}
        self._retired_fds: list[int] = []
        self._calls_seen: collections.Counter[int] = collections.Counter()
        self._calls_consumed: collections.Counter[int] = collections.Counter()

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        path: str | os.PathLike[str],
        ram: GuestRam,
        *,
        order: BringUpOrder = BringUpOrder.QEMU_7_2,
        **bring_up: Unpack[BringUpOptions],
    ) -> AsyncIterator[Self]:
        """Connect to a listening backend and bring up queue pair 0 (rx=0, tx=1)."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        async with cls._brought_up(sock, ram, order, bring_up) as frontend:
            yield frontend

    @classmethod
    @asynccontextmanager
    async def accept(
        cls,
        path: str | os.PathLike[str],
        ram: GuestRam,
        *,
        order: BringUpOrder = BringUpOrder.QEMU_7_2,
        accept_timeout: float = ACCEPT_TIMEOUT_S,
        listening: trio.Event | None = None,
        **bring_up: Unpack[BringUpOptions],
    ) -> AsyncIterator[Self]:
        """Listen on ``path`` (QEMU ``server=on``) for a client-mode backend, then bring up
        queue pair 0. ``listening`` (if given) is set once the socket accepts connections."""
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(os.fspath(path))
            listener.listen(1)
            if listening is not None:
                listening.set()
            with trio.fail_after(accept_timeout):
                sock, _address = await listener.accept()
        finally:
            listener.close()
        async with cls._brought_up(sock, ram, order, bring_up) as frontend:
            yield frontend

    @classmethod
    @asynccontextmanager
    async def _brought_up(
        cls, sock: trio.socket.SocketType, ram: GuestRam, order: BringUpOrder,
        options: BringUpOptions,
    ) -> AsyncIterator[Self]:
        """A front-end on a connected ``sock`` with queue pair 0 up, closed on exit."""
        frontend = cls(sock, ram, order=order)
        try:
            await frontend.bring_up(**options)
            yield frontend
        finally:
            frontend.close()

    def close(self) -> None:
        """Close the socket and every eventfd this front-end made (guest RAM stays)."""
        self.sock.close()
        for fds in (self._kick_fds, self._call_fds, self._err_fds):
            for fd in fds.values():
                os.close(fd)
            fds.clear()
        for fd in self._retired_fds:
            os.close(fd)
        self._retired_fds = []

    # -- raw messages -----------------------------------------------------------------------

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are (any header, any size), with ``fds`` on the first byte."""
        view = memoryview(data)
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        sent = await self.sock.sendmsg([view], ancillary)
        while sent < len(view):
            sent += await self.sock.send(view[sent:])

    async def request(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        flags: int | None = None,
        expect_reply: bool | None = None,
    ) -> bytes | None:
        """Send one message; return the reply payload, or None when no reply is due.

        A reply is awaited for GET_* requests and for NEED_REPLY; ``flags`` overrides the
        header flags (hostile tests), ``expect_reply`` overrides whether to wait.
        """
        header_flags = (
            flags
            if flags is not None
            else FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        )
        self.sent.append(SentMessage(request, header_flags, bytes(payload), len(fds)))
        await self.send_raw(encode_header(request, header_flags, len(payload)) + payload, fds)
        if expect_reply is None:
            expect_reply = request in REQUESTS_WITH_REPLY or bool(
                header_flags & FLAG_NEED_REPLY
            )
        if not expect_reply:
            return None
        return await self.read_reply(request)

    async def read_reply(self, request: int) -> bytes:
        """Read one reply and check it: flags exactly 0x5, same request, bounded size."""
        with trio.fail_after(self.reply_timeout):
            header = await self._recv_exactly(VHOST_USER_HEADER_SIZE)
            reply_request, flags, size = VHOST_USER_HEADER.unpack(header)
            if reply_request != request:
                raise VhostUserProtocolError(
                    f"reply is for {request_name(reply_request)}, expected {request_name(request)}"
                )
            if flags != REPLY_FLAGS:
                raise VhostUserProtocolError(
                    f"reply to {request_name(request)} has flags {flags:#x}, "
                    f"expected {REPLY_FLAGS:#x}"
                )
            if size > VHOST_USER_MAX_PAYLOAD:
                raise VhostUserProtocolError(
                    f"reply to {request_name(request)} claims {size} bytes, "
                    f"limit {VHOST_USER_MAX_PAYLOAD}"
                )
            return await self._recv_exactly(size)

    async def _recv_exactly(self, count: int) -> bytes:
        chunks = []
        remaining = count
        while remaining:
            data, ancdata, msg_flags, _address = await self.sock.recvmsg(
                remaining, socket.CMSG_SPACE(VHOST_USER_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, cmsg_data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cmsg_data) - len(cmsg_data) % 4
                    for fd in array.array("i", cmsg_data[:usable]):
                        os.close(fd)
                        self.unexpected_fds_received += 1
            if msg_flags & socket.MSG_CTRUNC:
                raise VhostUserProtocolError("back-end attached more fds than any reply may carry")
            if not data:
                raise VhostUserDisconnected(
                    f"back-end closed the socket with {remaining} of {count} bytes unread"
                )
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks)

    async def _request_u64(self, request: Request) -> int:
        reply = await self.request(request)
        assert reply is not None
        if len(reply) != U64_PAYLOAD.size:
            raise VhostUserProtocolError(
                f"{request.name} reply is {len(reply)} bytes, expected {U64_PAYLOAD.size}"
            )
        return U64_PAYLOAD.unpack(reply)[0]

    async def _maybe_acked(
        self, request: Request, payload: bytes, fds: Sequence[int] = (), *, ack: bool
    ) -> None:
        """Send; with ``ack`` (needs REPLY_ACK) wait for the u64 ack and require 0."""
        need_reply = ack and bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        reply = await self.request(request, payload, fds, need_reply=need_reply)
        if reply is not None:
            if len(reply) != U64_PAYLOAD.size:
                raise VhostUserProtocolError(
                    f"{request.name} ack is {len(reply)} bytes, expected {U64_PAYLOAD.size}"
                )
            status = U64_PAYLOAD.unpack(reply)[0]
            if status != 0:
                raise VhostUserProtocolError(f"back-end refused {request.name}: ack {status:#x}")

    # -- one method per message -------------------------------------------------------------

    async def get_features(self) -> int:
        self.backend_features = await self._request_u64(Request.GET_FEATURES)
        return self.backend_features

    async def set_features(self, features: int, *, ack: bool = False) -> None:
        await self._maybe_acked(Request.SET_FEATURES, pack_u64(features), ack=ack)

    async def get_protocol_features(self) -> int:
        self.backend_protocol_features = await self._request_u64(
            Request.GET_PROTOCOL_FEATURES
        )
        return self.backend_protocol_features

    async def set_protocol_features(self, features: int) -> None:
        await self.request(Request.SET_PROTOCOL_FEATURES, pack_u64(features))
        self.protocol_features = features

    async def get_queue_num(self) -> int:
        self.queue_num = await self._request_u64(Request.GET_QUEUE_NUM)
        return self.queue_num

    async def set_owner(self) -> None:
        await self._maybe_acked(Request.SET_OWNER, b"", ack=False)

    async def set_mem_table(self, *, ack: bool = True) -> None:
        """Every region of ``self.ram`` with its fd; NEED_REPLY when REPLY_ACK (as QEMU)."""
        table = self.ram.memory_table()
        if len(table) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError(f"{len(table)} regions, SET_MEM_TABLE carries at most 8")
        await self._maybe_acked(
            Request.SET_MEM_TABLE, pack_memory_table(table), self.ram.region_fds(), ack=ack
        )

    async def set_vring_num(self, index: int, num: int) -> None:
        await self.request(Request.SET_VRING_NUM, pack_vring_state(index, num))

    async def set_vring_base(self, index: int, base: int) -> None:
        await self.request(Request.SET_VRING_BASE, pack_vring_state(index, base))

    async def set_vring_addr(self, index: int, queue: DriverQueue) -> None:
        """The ring addresses as UVAs (descriptors inside carry GPAs)."""
        payload = pack_vring_addr(
            index, desc=queue.desc_uva, used=queue.used_uva, avail=queue.avail_uva
        )
        await self.request(Request.SET_VRING_ADDR, payload)

    async def get_vring_base(self, index: int) -> int:
        """Stops the ring; returns the backend's next avail index (``num``)."""
        reply = await self.request(Request.GET_VRING_BASE, pack_vring_state(index, 0))
        assert reply is not None
        if len(reply) != VRING_STATE_PAYLOAD.size:
            raise VhostUserProtocolError(
                f"GET_VRING_BASE reply is {len(reply)} bytes, expected {VRING_STATE_PAYLOAD.size}"
            )
        reply_index, num = VRING_STATE_PAYLOAD.unpack(reply)
        if reply_index != index:
            raise VhostUserProtocolError(f"GET_VRING_BASE({index}) answered for ring {reply_index}")
        return num

    async def _set_vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        fds = () if fd is None else (fd,)
        await self.request(request, pack_vring_file(index, nofd=fd is None), fds)

    async def set_vring_kick(self, index: int, fd: int | None) -> None:
        await self._set_vring_fd(Request.SET_VRING_KICK, index, fd)

    async def set_vring_call(self, index: int, fd: int | None) -> None:
        await self._set_vring_fd(Request.SET_VRING_CALL, index, fd)

    async def set_vring_err(self, index: int, fd: int | None) -> None:
        await self._set_vring_fd(Request.SET_VRING_ERR, index, fd)

    async def set_vring_enable(self, index: int, enabled: bool) -> None:
        """Only meaningful with PROTOCOL_FEATURES. Newer QEMU waits: NEED_REPLY when REPLY_ACK,
        else a GET_FEATURES round trip as a barrier."""
        payload = pack_vring_state(index, int(enabled))
        if self.order is not BringUpOrder.QEMU_NEWER:
            await self.request(Request.SET_VRING_ENABLE, payload)
        elif self.protocol_features & ProtocolFeature.REPLY_ACK:
            await self._maybe_acked(Request.SET_VRING_ENABLE, payload, ack=True)
        else:
            await self.request(Request.SET_VRING_ENABLE, payload)
            await self.get_features()

    # -- eventfds ---------------------------------------------------------------------------

    def _new_eventfd(self, table: dict[int, int], index: int) -> int:
        old = table.get(index)
        if old is not None:
            self._retired_fds.append(old)  # the backend may still hold a copy; keep ours open
        table[index] = os.eventfd(0, EVENTFD_FLAGS)
        return table[index]

    def kick_fd(self, index: int) -> int:
        return self._kick_fds[index]

    def call_fd(self, index: int) -> int:
        return self._call_fds[index]

    def kick(self, index: int) -> None:
        """Driver → device notification for queue ``index``."""
        os.eventfd_write(self._kick_fds[index], 1)

    def kick_if_needed(self, index: int) -> bool:
        """Kick only if the queue's last publish calls for it (EVENT_IDX / NO_NOTIFY)."""
        if self.queues[index].needs_kick():
            self.kick(index)
            return True
        return False

    def _drain_call(self, index: int) -> None:
        with suppress(BlockingIOError):  # nothing written since the last read
            self._calls_seen[index] += os.eventfd_read(self._call_fds[index])

    def call_count(self, index: int) -> int:
        """Total of the values the device has written to queue ``index``'s call eventfd."""
        self._drain_call(index)
        return self._calls_seen[index]

    async def wait_call(self, index: int, timeout: float = CALL_TIMEOUT_S) -> int:
        """Wait until the device has called queue ``index`` since the last ``wait_call`` on it;
        return how many calls arrived (raises trio.TooSlowError after ``timeout``)."""
        with trio.fail_after(timeout):
            while True:
                self._drain_call(index)
                fresh = self._calls_seen[index] - self._calls_consumed[index]
                if fresh:
                    self._calls_consumed[index] = self._calls_seen[index]
                    return fresh
                await trio.lowlevel.wait_readable(self._call_fds[index])

    # -- sequences --------------------------------------------------------------------------

    async def negotiate(self, *, features: int, protocol_features: int) -> None:
        """The connect block: features, protocol features, owner, early CALL/ERR fds."""
        self.wanted_features = features
        if self.order is BringUpOrder.DPDK_VIRTIO_USER:
            await self.set_owner()
            await self.get_features()
            await self._negotiate_protocol(protocol_features)
            return
        await self.get_features()
        await self._negotiate_protocol(protocol_features)
        await self.set_owner()
        await self.get_features()
        for index in NET_QUEUE_PAIR:
            # QEMU's masked notifiers: replaced by the real call fd at start.
            await self.set_vring_call(index, self._new_eventfd(self._call_fds, index))
            await self.set_vring_err(index, self._new_eventfd(self._err_fds, index))

    async def _negotiate_protocol(self, protocol_features: int) -> None:
        if not self.backend_features & VirtioFeature.PROTOCOL_FEATURES:
            return
        await self.get_protocol_features()
        await self.set_protocol_features(self.backend_protocol_features & protocol_features)
        if self.protocol_features & ProtocolFeature.MQ:
            await self.get_queue_num()

    async def device_reset_enables(self, rounds: int = QEMU_EARLY_ENABLE_ROUNDS) -> None:
        """QEMU's SET_VRING_ENABLE(0,1)(1,1) at each device reset, before rings exist."""
        if not self._uses_enable or self.order is BringUpOrder.DPDK_VIRTIO_USER:
            return
        for _ in range(rounds):
            for index in NET_QUEUE_PAIR:
                await self.set_vring_enable(index, True)

    @property
    def _uses_enable(self) -> bool:
        return bool(self.backend_features & VirtioFeature.PROTOCOL_FEATURES)

    async def start(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, start_idx: int = 0) -> NetDriver:
        """The start block (driver wrote DRIVER_OK): features, memory, fresh rings, enable."""
        for queue in self.queues.values():
            queue.release()
        self.acked_features = (
            self.wanted_features & self.backend_features & ~int(VirtioFeature.PROTOCOL_FEATURES)
        )
        features_message = self.acked_features | (
            self.backend_features & VirtioFeature.PROTOCOL_FEATURES
        )
        qemu = self.order is not BringUpOrder.DPDK_VIRTIO_USER
        if qemu and self._uses_enable:
            for index in NET_QUEUE_PAIR:
                await self.set_vring_enable(index, True)
        await self.set_features(features_message)
        await self.set_mem_table()
        self.queues = {
            index: DriverQueue(
                self.ram,
                queue_size,
                event_idx=bool(self.acked_features & VirtioFeature.EVENT_IDX),
                indirect=bool(self.acked_features & VirtioFeature.INDIRECT_DESC),
                start_idx=start_idx,
            )
            for index in NET_QUEUE_PAIR
        }
        for index, queue in self.queues.items():
            if not qemu:
                await self.set_vring_call(index, self._new_eventfd(self._call_fds, index))
            await self.set_vring_num(index, queue_size)
            await self.set_vring_base(index, queue.start_idx)
            await self.set_vring_addr(index, queue)
            await self.set_vring_kick(index, self._new_eventfd(self._kick_fds, index))
            if qemu:
                await self.set_vring_call(index, self._new_eventfd(self._call_fds, index))
        if self._uses_enable:
            for index in NET_QUEUE_PAIR:
                await self.set_vring_enable(index, True)
        self.net = NetDriver(
            self.queues[RX_QUEUE_INDEX],
            self.queues[TX_QUEUE_INDEX],
            mrg_rxbuf=bool(self.acked_features & VirtioFeature.MRG_RXBUF),
        )
        return self.net

    async def bring_up(
        self,
        *,
        features: int = DEFAULT_NET_FEATURES,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        start_idx: int = 0,
    ) -> NetDriver:
        """Connect block, device resets, start block: a live queue pair 0."""
        await self.negotiate(features=features, protocol_features=protocol_features)
        await self.device_reset_enables()
        return await self.start(queue_size=queue_size, start_idx=start_idx)

    async def stop(self) -> dict[int, int]:
        """Stop every ring: GET_VRING_BASE per ring (DPDK disables first). Returns the nums."""
        bases = {}
        for index in sorted(self.queues):
            if self.order is BringUpOrder.DPDK_VIRTIO_USER and self._uses_enable:
                await self.set_vring_enable(index, False)
            bases[index] = await self.get_vring_base(index)
        return bases

    async def reboot(self, *, queue_size: int | None = None, start_idx: int = 0) -> dict[int, int]:
        """Guest reboot as QEMU 7.2 does it: stop, device-reset enables, then the whole start
        block with fresh rings at base ``start_idx``. Returns the GET_VRING_BASE nums."""
        if queue_size is None:
            queue_size = self.queues[RX_QUEUE_INDEX].size if self.queues else DEFAULT_QUEUE_SIZE
        bases = await self.stop()
        await self.device_reset_enables()
        await self.start(queue_size=queue_size, start_idx=start_idx)
        return bases
