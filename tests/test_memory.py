"""Guest memory translation edges: region bounds, the two address spaces, mmap_offset,
regions that meet, and front-end supplied tables that overflow or do not map."""

import mmap
import os

import pytest

from virtio.memory import GuestMemory, GuestMemoryError, RegionSpec

MIB = 1 << 20
UVA = 0x7F00_0000_0000


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
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
