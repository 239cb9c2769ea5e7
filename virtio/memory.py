"""Guest memory as the back-end sees it: regions mmap'd from the fds QEMU passes in
SET_MEM_TABLE, and bounds-checked translation of guest addresses to memoryviews.

Buffers are handed out as spans, `(mmap, start, stop)` triples of absolute offsets into a
region's mapping: slicing an mmap copies straight into a new bytes object (or from one on
assignment), with no memoryview in between -- the cheapest copy CPython offers.  A span is
checked when it is made; the mmap itself would clamp silently.

Two address spaces meet here (vhost-user spec, "Memory regions"): ring addresses from
SET_VRING_ADDR are QEMU virtual addresses (`uva`), descriptor buffer addresses are
guest-physical (`gpa`).  Every translation checks the whole [addr, addr+len) range against one
region explicitly -- memoryview slicing would clamp silently -- and raises GuestMemoryError
otherwise.  Nothing here trusts the guest or the front-end.

The front-end owns the files behind the regions and could shrink one under our mapping: the
next access would be a SIGBUS, which kills the process.  So before mapping a region we seal
its file against shrinking (F_SEAL_SHRINK, where the file supports seals: memfds made with
MFD_ALLOW_SEALING; QEMU's memory-backend-memfd seals it already), then check that
mmap_offset + size lies inside the file.  A file that cannot be sealed (DPDK's memfds,
QEMU's memory-backend-file on tmpfs or hugetlbfs, memfd with seal=off) is still mapped:
`Region.sealed` says so and the caller warns; the residual risk is in docs/architecture.md.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from virtio.spec import MAX_MEM_REGIONS

log = logging.getLogger(__name__)

# One region of SET_MEM_TABLE: u64 guest_phys_addr, memory_size, userspace_addr, mmap_offset.
REGION = struct.Struct("<QQQQ")
U64_MAX = (1 << 64) - 1


class GuestMemoryError(Exception):
    """A guest or front-end supplied address or length that maps to no guest memory."""


class RegionFileError(GuestMemoryError):
    """The front-end described a region its file does not hold (or a file that is none)."""


@dataclass(frozen=True)
class RegionSpec:
    """One region as the front-end described it (before mapping)."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int

    def check(self) -> None:
        if self.size == 0:
            raise GuestMemoryError(f"memory region at gpa {self.gpa:#x} has size 0")
        for name, base in (("gpa", self.gpa), ("uva", self.uva), ("mmap_offset", self.mmap_offset)):
            if base + self.size > U64_MAX + 1:
                raise GuestMemoryError(
                    f"memory region {name} {base:#x} + size {self.size:#x} overflows 64 bits"
                )


def parse_regions(payload: bytes, count: int, offset: int) -> list[RegionSpec]:
    """Decode `count` packed region descriptions starting at `offset` of `payload`."""
    return [
        RegionSpec(*REGION.unpack_from(payload, offset + i * REGION.size)) for i in range(count)
    ]


# A guest buffer: (mapping, start, stop), absolute offsets into the mapping.
Span = tuple[mmap.mmap, int, int]


class Region:
    """One mapped region.  `view` covers exactly the guest's bytes (mmap_offset already added);
    `base` is where they start in `mm`."""

    __slots__ = ("base", "gpa", "mm", "sealed", "size", "uva", "view")

    def __init__(self, spec: RegionSpec, fd: int) -> None:
        spec.check()
        self.sealed = seal_against_shrinking(fd)
        try:
            info = os.fstat(fd)
        except OSError as exc:
            raise RegionFileError(f"memory region fd {fd}: {exc}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise RegionFileError(
                f"memory region gpa={spec.gpa:#x}: its fd is not a regular file "
                f"(mode {info.st_mode:#o})"
            )
        if spec.mmap_offset + spec.size > info.st_size:
            raise RegionFileError(
                f"memory region gpa={spec.gpa:#x} ends at file offset "
                f"{spec.mmap_offset + spec.size:#x}, beyond its file of {info.st_size:#x} bytes"
            )
        # Map from file offset 0 and skip mmap_offset ourselves: a hugetlbfs fd only maps at
        # huge-page aligned offsets, and mmap_offset need not be one (libvhost-user does this).
        try:
            self.mm = mmap.mmap(
                fd,
                spec.size + spec.mmap_offset,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(
                f"cannot map region gpa={spec.gpa:#x} size={spec.size:#x} "
                f"offset={spec.mmap_offset:#x}: {exc}"
            ) from exc
        self.base = spec.mmap_offset
        self.gpa = spec.gpa
        self.size = spec.size
        self.uva = spec.uva
        self.view = memoryview(self.mm)[spec.mmap_offset : spec.mmap_offset + spec.size]

    def close(self) -> None:
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            # A ring or frame still holds a view; the mapping goes when that view does.
            log.warning("region gpa=%#x still referenced; unmapped when released", self.gpa)


def seal_against_shrinking(fd: int) -> bool:
    """Make sure the file behind `fd` can no longer shrink; False if that cannot be had.

    Adds F_SEAL_SHRINK unless present.  Fails (False) when the file takes no seals (EINVAL:
    not shmem/hugetlbfs), when F_SEAL_SEAL forbids more, or when the fd is not writable.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            log.debug("F_GET_SEALS on fd %d: %s", fd, exc)
        return False
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    if seals & fcntl.F_SEAL_SEAL:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as exc:
        log.debug("F_ADD_SEALS on fd %d: %s", fd, exc)
        return False
    return True


class GuestMemory:
    """The guest's memory table.  Owns the mappings; `close()` unmaps them."""

    def __init__(self, specs: list[RegionSpec], fds: list[int]) -> None:
        if len(specs) != len(fds):
            raise GuestMemoryError(f"{len(specs)} memory regions but {len(fds)} fds")
        if not 0 < len(specs) <= MAX_MEM_REGIONS:
            raise GuestMemoryError(f"{len(specs)} memory regions (want 1 to {MAX_MEM_REGIONS})")
        ordered = sorted(specs, key=lambda spec: spec.gpa)
        for before, after in pairwise(ordered):
            if before.gpa + before.size > after.gpa:
                raise GuestMemoryError(
                    f"memory regions at gpa {before.gpa:#x} (size {before.size:#x}) and "
                    f"{after.gpa:#x} overlap"
                )
        self.specs = list(specs)
        self.regions: list[Region] = []
        self._native_table: Any = None
        try:
            for spec, fd in zip(specs, fds, strict=True):
                self.regions.append(Region(spec, fd))
        except GuestMemoryError:
            self.close()
            raise

    def close(self) -> None:
        if self._native_table is not None:
            self._native_table.release()  # its buffers pin the mappings
            self._native_table = None
        for region in self.regions:
            region.close()
        self.regions = []

    def native_table(self) -> Any:
        """The regions as the native ring walk sees them (virtio._ring.RegionTable), made on
        first use; it holds each mapping's buffer until `close()`."""
        if self._native_table is None:
            from virtio import _ring  # only asked for when it was built

            self._native_table = _ring.RegionTable(
                [(r.gpa, r.size, r.mm, r.base) for r in self.regions])
        return self._native_table

    @property
    def unsealed(self) -> list[Region]:
        """Regions whose file the front-end could still shrink under us (see the module doc)."""
        return [r for r in self.regions if not r.sealed]

    def gpa(self, addr: int, length: int) -> memoryview:
        """The `length` bytes at guest-physical `addr`, which must lie within one region."""
        for region in self.regions:
            offset = addr - region.gpa
            if offset >= 0 and offset + length <= region.size:
                return region.view[offset : offset + length]
        raise GuestMemoryError(f"guest address {addr:#x}+{length:#x} is outside guest memory")

    def gpa_buffers(self, addr: int, length: int, out: list[Span]) -> None:
        """Append spans covering [addr, addr+length) to `out`, split where regions meet."""
        regions = self.regions
        while length:
            for position, region in enumerate(regions):
                offset = addr - region.gpa
                if 0 <= offset < region.size:
                    take = min(length, region.size - offset)
                    start = region.base + offset
                    out.append((region.mm, start, start + take))
                    addr += take
                    length -= take
                    if position:  # most recently used first: the ring fast path looks there
                        regions.insert(0, regions.pop(position))
                    break
            else:
                raise GuestMemoryError(
                    f"guest address {addr:#x}+{length:#x} is outside guest memory"
                )

    def uva(self, addr: int, length: int) -> memoryview:
        """The `length` bytes at front-end virtual address `addr` (ring addresses)."""
        for region in self.regions:
            offset = addr - region.uva
            if offset >= 0 and offset + length <= region.size:
                return region.view[offset : offset + length]
        raise GuestMemoryError(
            f"ring address {addr:#x}+{length:#x} is outside the front-end's memory table"
        )


def read_spans(spans: list[Span]) -> bytes:
    """The bytes of `spans`, in order (one copy)."""
    if len(spans) == 1:
        mm, start, stop = spans[0]
        return mm[start:stop]
    return b"".join([mm[start:stop] for mm, start, stop in spans])
