"""Guest memory translation edges: region bounds, the two address spaces, mmap_offset,
regions that meet, and front-end supplied tables that overflow or do not map."""

import fcntl
import logging
import mmap
import os
import struct

import pytest
import trio
import trio.testing

from tests.support.virtio_driver import (
    GuestRam,
    VhostUserDisconnected,
    VhostUserFrontend,
)
from virtio.backend import VhostUserServer
from virtio.memory import GuestMemory, GuestMemoryError, RegionFileError, RegionSpec
from virtio.spec import Request

MIB = 1 << 20
UVA = 0x7F00_0000_0000


def memfd(size: int, fill: bytes = b"", flags: int = os.MFD_ALLOW_SEALING) -> int:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | flags)
    os.ftruncate(fd, size)
    if fill:
        with mmap.mmap(fd, size) as m:
            m[: len(fill)] = fill
    return fd


@pytest.fixture
def two_regions():
    """gpa [0, 1M) and [1M, 2M), one memfd each, at unrelated UVAs."""
    fds = [memfd(MIB, b"A" * MIB), memfd(MIB, b"B" * MIB)]
    memory = GuestMemory(
        [RegionSpec(0, MIB, UVA, 0), RegionSpec(MIB, MIB, UVA + 64 * MIB, 0)], fds)
    yield memory
    memory.close()
    for fd in fds:
        os.close(fd)


def test_gpa_translation_stays_inside_one_region(two_regions):
    assert bytes(two_regions.gpa(MIB - 4, 4)) == b"AAAA"
    assert bytes(two_regions.gpa(MIB, 4)) == b"BBBB"
    with pytest.raises(GuestMemoryError, match="outside"):
        two_regions.gpa(MIB - 2, 4)  # straddles: not one region
    with pytest.raises(GuestMemoryError):
        two_regions.gpa(2 * MIB, 1)
    with pytest.raises(GuestMemoryError):
        two_regions.gpa(2 * MIB - 1, 2)


def test_buffers_that_straddle_regions_are_split(two_regions):
    out = []
    two_regions.gpa_buffers(MIB - 2, 4, out)
    assert [mm[start:stop] for mm, start, stop in out] == [b"AA", b"BB"]
    with pytest.raises(GuestMemoryError):
        two_regions.gpa_buffers(2 * MIB - 2, 4, [])


def test_uva_and_gpa_are_different_address_spaces(two_regions):
    assert bytes(two_regions.uva(UVA + 64 * MIB, 2)) == b"BB"
    with pytest.raises(GuestMemoryError, match="ring address"):
        two_regions.uva(0, 2)  # a GPA is not a ring address
    with pytest.raises(GuestMemoryError):
        two_regions.gpa(UVA, 2)  # and a UVA is not a buffer address


def test_huge_lengths_and_addresses_do_not_wrap(two_regions):
    for addr, length in ((0, 1 << 64), ((1 << 64) - 1, 2), (MIB, (1 << 63))):
        with pytest.raises(GuestMemoryError):
            two_regions.gpa(addr, length)


def test_mmap_offset_skips_the_start_of_the_file():
    fd = memfd(2 * MIB, b"x" * 4096 + b"guest")
    memory = GuestMemory([RegionSpec(0x1000_0000, MIB, UVA, 4096)], [fd])
    assert bytes(memory.gpa(0x1000_0000, 5)) == b"guest"
    memory.close()
    os.close(fd)


@pytest.mark.parametrize(
    "spec",
    [
        RegionSpec(0, 0, UVA, 0),  # empty
        RegionSpec((1 << 64) - 4096, 8192, UVA, 0),  # gpa + size overflows
        RegionSpec(0, 8192, (1 << 64) - 4096, 0),  # uva + size overflows
        RegionSpec(0, 8192, UVA, (1 << 64) - 4096),  # offset + size overflows
        RegionSpec(0, 64 * MIB, UVA, 0),  # larger than the file
    ],
)
def test_bad_regions_are_refused_with_a_reason(spec):
    fd = memfd(MIB)
    with pytest.raises(GuestMemoryError):
        GuestMemory([spec], [fd]).gpa(0, 1)
    os.close(fd)


def test_region_count_must_match_fds_and_stay_within_limit():
    fd = memfd(MIB)
    with pytest.raises(GuestMemoryError, match="fds"):
        GuestMemory([RegionSpec(0, MIB, UVA, 0)], [fd, fd])
    with pytest.raises(GuestMemoryError, match="regions"):
        GuestMemory([RegionSpec(i * MIB, MIB, UVA + i * MIB, 0) for i in range(9)], [fd] * 9)
    os.close(fd)


def test_a_region_beyond_its_file_is_refused_before_mapping():
    fd = memfd(MIB)
    with pytest.raises(RegionFileError, match="beyond its file of 0x100000 bytes"):
        GuestMemory([RegionSpec(0, MIB, UVA, 4096)], [fd])
    os.close(fd)


def test_mapping_seals_a_sealable_file_against_shrinking():
    fd = memfd(MIB)
    memory = GuestMemory([RegionSpec(0, MIB, UVA, 0)], [fd])
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        os.ftruncate(fd, MIB // 2)  # the front-end can no longer pull memory from under us
    os.ftruncate(fd, 2 * MIB)  # growing stays allowed (memory hotplug on one file)
    assert memory.unsealed == []
    memory.close()
    os.close(fd)


def qemu_sealed_memfd() -> int:
    """memory-backend-memfd,seal=on: grow, shrink and seal sealed by QEMU itself."""
    fd = memfd(MIB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def unsealable_memfd() -> int:
    """DPDK's memfds, memory-backend-memfd,seal=off: made without MFD_ALLOW_SEALING."""
    return memfd(MIB, flags=0)


def tmpfs_file() -> int:
    """memory-backend-file on /dev/shm (tmpfs): F_SEAL_SEAL from birth."""
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    os.ftruncate(fd, MIB)
    return fd


@pytest.mark.parametrize(("make_fd", "sealed"), [(qemu_sealed_memfd, True),
                                                 (unsealable_memfd, False),
                                                 (tmpfs_file, False)])
def test_files_that_take_no_more_seals_are_still_mapped_and_reported(make_fd, sealed):
    fd = make_fd()
    memory = GuestMemory([RegionSpec(0, MIB, UVA, 0)], [fd])
    assert bytes(memory.gpa(0, 4)) == b"\0" * 4
    assert (memory.unsealed == []) is sealed
    memory.close()
    os.close(fd)


async def test_a_front_end_cannot_shrink_guest_memory_after_set_mem_table(tmp_path, caplog):
    server = VhostUserServer(str(tmp_path / "mem.sock"), lambda port, frames: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with GuestRam(1 << 22) as ram, caplog.at_level(logging.WARNING):
            async with VhostUserFrontend.connect(server.path, ram) as fe:
                with pytest.raises(PermissionError):  # EPERM: our seal
                    os.ftruncate(ram.fd, 1 << 20)
                fe.net.send([b"\xff" * 6 + b"\2" * 6 + b"\x88\xb5" + bytes(50)])
                fe.kick(1)
                await trio.testing.wait_all_tasks_blocked()
                assert server.port.device.broken is None
        assert "cannot be sealed" not in caplog.text
        # A table whose region runs past its file: refused at SET_MEM_TABLE, connection closed.
        with GuestRam(1 << 20) as ram:
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.connect(server.path)
            fe = VhostUserFrontend(sock, ram)
            gpa, size, uva, offset = ram.region()
            table = struct.pack("<IIQQQQ", 1, 0, gpa, size + 4096, uva, offset)
            with pytest.raises((VhostUserDisconnected, ConnectionError)):  # EOF or reset
                await fe.request(Request.SET_MEM_TABLE, table, ram.region_fds(),
                                 need_reply=True)
                await fe.get_features()
            fe.close()
        nursery.cancel_scope.cancel()
