"""Tests of the guest-side model in tests/support/virtio_driver.py (not of any backend).

Rings and messages are decoded here independently, with struct and the spec's offsets, so a
layout mistake in the model cannot hide behind the same mistake in its own decoder.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.virtio_driver import (
    DEFAULT_UVA_BASE,
    MMAP_OFFSET_FILL,
    NET_HDR_LEN,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    BringUpOrder,
    DeviceProtocolError,
    DriverQueue,
    GuestRam,
    GuestRamError,
    NetDriver,
    NetHdr,
    ProtocolFeature,
    QueueFullError,
    TxLayout,
    VhostUserFrontend,
    VhostUserProtocolError,
    VirtioFeature,
    encode_message,
    pack_memory_table,
    pack_net_hdr,
    pack_vring_addr,
    pack_vring_file,
    unpack_net_hdr,
)
from virtio.spec import Request

RAM_SIZE = 1 << 20
TEST_TIMEOUT_S = 5.0

# ---------------------------------------------------------------------------------------------
# An independent, spec-only device: reads the rings the model writes, writes used entries.
# ---------------------------------------------------------------------------------------------


def decode_desc(ram: GuestRam, table_gpa: int, index: int) -> tuple[int, int, int, int]:
    """(addr, len, flags, next) of entry ``index``: u64 @0, u32 @8, u16 @12, u16 @14."""
    raw = ram.read(table_gpa + 16 * index, 16)
    return (
        int.from_bytes(raw[0:8], "little"),
        int.from_bytes(raw[8:12], "little"),
        int.from_bytes(raw[12:14], "little"),
        int.from_bytes(raw[14:16], "little"),
    )


def walk_chain(ram: GuestRam, queue: DriverQueue, head: int) -> list[tuple[int, int, bool]]:
    """The (addr, len, writable) buffers of a chain, following an indirect table if any."""
    addr, length, flags, next_index = decode_desc(ram, queue.desc_gpa, head)
    table_gpa, index = queue.desc_gpa, head
    if flags & VIRTQ_DESC_F_INDIRECT:
        assert length % 16 == 0
        table_gpa, index = addr, 0
    buffers = []
    for _hop in range(queue.size + 1):
        addr, length, flags, next_index = decode_desc(ram, table_gpa, index)
        buffers.append((addr, length, bool(flags & VIRTQ_DESC_F_WRITE)))
        if not flags & VIRTQ_DESC_F_NEXT:
            return buffers
        index = next_index
    raise AssertionError("descriptor loop")


@dataclass
class SpecDevice:
    """Consumes avail entries and completes them, with offsets from the spec, not the model."""

    ram: GuestRam
    queue: DriverQueue
    last_avail: int = 0
    used_idx: int = 0
    pending: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.last_avail = self.used_idx = self.queue.start_idx

    def avail_idx(self) -> int:
        return struct.unpack("<H", self.ram.read(self.queue.avail_gpa + 2, 2))[0]

    def pop_heads(self) -> list[int]:
        heads = []
        while self.last_avail != self.avail_idx():
            slot = self.last_avail % self.queue.size
            heads.append(
                struct.unpack("<H", self.ram.read(self.queue.avail_gpa + 4 + 2 * slot, 2))[0]
            )
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return heads

    def readable_bytes(self, head: int) -> bytes:
        return b"".join(
            self.ram.read(addr, length)
            for addr, length, writable in walk_chain(self.ram, self.queue, head)
            if not writable
        )

    def fill(self, head: int, data: bytes) -> int:
        """Write ``data`` into the chain's writable buffers; return bytes written."""
        written = 0
        for addr, length, writable in walk_chain(self.ram, self.queue, head):
            if writable and written < len(data):
                piece = data[written : written + length]
                self.ram.write(addr, piece)
                written += len(piece)
        return written

    def push_used(self, entries: list[tuple[int, int]]) -> None:
        """Write the used elements, then one used.idx store."""
        for head, length in entries:
            slot = self.used_idx % self.queue.size
            self.ram.write(self.queue.used_gpa + 4 + 8 * slot, struct.pack("<II", head, length))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.ram.write(self.queue.used_gpa + 2, struct.pack("<H", self.used_idx))

    def set_avail_event(self, value: int) -> None:
        self.ram.write(self.queue.used_gpa + 4 + 8 * self.queue.size, struct.pack("<H", value))


@pytest.fixture
def ram() -> GuestRam:
    with GuestRam(RAM_SIZE) as guest_ram:
        yield guest_ram


# ---------------------------------------------------------------------------------------------
# Guest RAM
# ---------------------------------------------------------------------------------------------


def test_guest_ram_write_lands_in_memfd_after_mmap_offset() -> None:
    offset = 8192
    with GuestRam(RAM_SIZE, mmap_offset=offset) as ram:
        ram.write(0x100, b"hello")
        assert ram.region() == (0, RAM_SIZE, DEFAULT_UVA_BASE, offset)
        assert (ram.fd, ram.size, ram.gpa_base, ram.mmap_offset) == (ram.fd, RAM_SIZE, 0, offset)
        assert ram.gpa_to_uva(0x100) == DEFAULT_UVA_BASE + 0x100 != 0x100
        # Map it as a backend must: size + mmap_offset from file offset 0.
        with mmap.mmap(ram.fd, RAM_SIZE + offset, mmap.MAP_SHARED) as backend_view:
            assert backend_view[offset + 0x100 : offset + 0x105] == b"hello"
            assert backend_view[:offset] == bytes([MMAP_OFFSET_FILL]) * offset
            backend_view[offset + 0x200 : offset + 0x203] = b"dev"
        assert ram.read(0x200, 3) == b"dev"


def test_separate_fd_regions_split_a_straddling_write() -> None:
    with GuestRam.multi([4096, 4096]) as ram:
        (gpa0, size0, uva0, off0), (gpa1, _size1, uva1, off1) = ram.memory_table()
        assert (gpa0, gpa1, off0, off1) == (0, 4096, 0, 0)
        assert uva1 != uva0 + size0, "UVAs must not be contiguous, or GPA/UVA mixups pass"
        fd0, fd1 = ram.region_fds()
        assert fd0 != fd1
        gpa = ram.reserve(4096 - 3, 6)
        ram.write(gpa, b"abcdef")
        assert ram.read(gpa, 6) == b"abcdef"
        assert os.pread(fd0, 3, 4093) == b"abc"
        assert os.pread(fd1, 3, 0) == b"def"


def test_shared_fd_regions_sit_at_increasing_mmap_offsets() -> None:
    with GuestRam.multi([4096, 8192], shared_fd=True, mmap_offset=4096) as ram:
        table = ram.memory_table()
        assert [(gpa, size, off) for gpa, size, _uva, off in table] == [
            (0, 4096, 4096),
            (4096, 8192, 8192),
        ]
        assert len(set(ram.region_fds())) == 1
        ram.write(4090, b"0123456789ab")
        assert os.pread(ram.fd, 12, 4096 + 4090) == b"0123456789ab"
        assert ram.size == 12288


def test_alloc_aligns_never_straddles_and_reuses_freed_space() -> None:
    with GuestRam.multi([4096, 4096]) as ram:
        first = ram.alloc(10, 16)
        second = ram.alloc(3000, 16)
        assert first % 16 == 0 and second % 16 == 0 and second >= first + 10
        across = ram.alloc(2000, 4)
        assert across == 4096, "would have straddled the region boundary"
        with pytest.raises(GuestRamError, match="exhausted"):
            ram.alloc(4096)
        ram.free(second)
        assert ram.alloc(3000, 16) == second
        with pytest.raises(GuestRamError, match="not entirely free"):
            ram.reserve(4096, 8)


def test_access_outside_guest_ram_raises(ram: GuestRam) -> None:
    with pytest.raises(GuestRamError, match="outside guest RAM"):
        ram.read(RAM_SIZE - 2, 4)
    with pytest.raises(GuestRamError, match="outside guest RAM"):
        ram.write(RAM_SIZE, b"x")
    with pytest.raises(GuestRamError, match="outside guest RAM"):
        ram.gpa_to_uva(RAM_SIZE)


# ---------------------------------------------------------------------------------------------
# Split virtqueue
# ---------------------------------------------------------------------------------------------


def test_rings_are_aligned_zeroed_and_exposed_as_gpa_and_uva(ram: GuestRam) -> None:
    ram.alloc(3, 1)  # misalign the allocator on purpose
    queue = DriverQueue(ram, 8)
    assert queue.desc_gpa % 16 == 0
    assert queue.avail_gpa % 2 == 0
    assert queue.used_gpa % 4 == 0
    assert queue.desc_uva == DEFAULT_UVA_BASE + queue.desc_gpa
    assert queue.avail_uva == DEFAULT_UVA_BASE + queue.avail_gpa
    assert queue.used_uva == DEFAULT_UVA_BASE + queue.used_gpa
    assert ram.read(queue.desc_gpa, 16 * 8) == bytes(128)
    assert ram.read(queue.avail_gpa, 4 + 2 * 8 + 2) == bytes(22)
    assert ram.read(queue.used_gpa, 4 + 8 * 8 + 2) == bytes(70)


def test_chain_matches_spec_layout_and_is_invisible_until_publish(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 8)
    head = queue.add_chain([b"abc", b"defgh"], [100, 7])
    assert ram.read(queue.avail_gpa + 2, 2) == b"\x00\x00", "avail.idx moved before publish"
    assert queue.publish() == (0, 1)
    assert struct.unpack_from("<HH", ram.read(queue.avail_gpa, 4)) == (0, 1)
    assert struct.unpack("<H", ram.read(queue.avail_gpa + 4, 2))[0] == head

    entries = []
    index = head
    for _ in range(4):
        entries.append(decode_desc(ram, queue.desc_gpa, index))
        index = entries[-1][3]
    flags = [entry[2] for entry in entries]
    assert flags == [
        VIRTQ_DESC_F_NEXT,
        VIRTQ_DESC_F_NEXT,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        VIRTQ_DESC_F_WRITE,
    ]
    assert [entry[1] for entry in entries] == [3, 5, 100, 7]
    assert ram.read(entries[0][0], 3) == b"abc"
    assert ram.read(entries[1][0], 5) == b"defgh"
    assert len({entry[0] for entry in entries}) == 4
    assert queue.read_desc(head) == entries[0]


def test_readable_after_writable_is_refused(ram: GuestRam) -> None:
    from tests.support.virtio_driver import Segment

    queue = DriverQueue(ram, 8)
    with pytest.raises(ValueError, match="readable descriptors must precede"):
        queue.add_segments([Segment(0x8000, 4, True), Segment(0x9000, 4, False)])


def test_chain_over_a_buffer_that_straddles_two_regions() -> None:
    from tests.support.virtio_driver import Segment

    with GuestRam.multi([1 << 16, 1 << 16]) as ram:
        queue = DriverQueue(ram, 8)
        device = SpecDevice(ram, queue)
        boundary = ram.regions[1].gpa
        straddling = ram.reserve(boundary - 5, 10)
        ram.write(straddling, b"0123456789")
        head = queue.add_segments([Segment(straddling, 10, False)])
        queue.publish()
        assert device.pop_heads() == [head]
        assert walk_chain(ram, queue, head) == [(boundary - 5, 10, False)]
        assert device.readable_bytes(head) == b"0123456789"
        assert ram.uva_to_gpa(ram.gpa_to_uva(boundary + 4)) == boundary + 4
        assert ram.gpa_to_uva(boundary) - ram.gpa_to_uva(boundary - 1) != 1


def test_indirect_chain_is_one_ring_descriptor_pointing_at_a_table(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 8, indirect=True)
    head = queue.add_chain([b"hdr", b"payload"], [64], indirect=True)
    queue.publish()
    addr, length, flags, _next = decode_desc(ram, queue.desc_gpa, head)
    assert flags == VIRTQ_DESC_F_INDIRECT
    assert length == 3 * 16 and addr % 16 == 0
    table = [decode_desc(ram, addr, i) for i in range(3)]
    assert [(entry[1], entry[2], entry[3]) for entry in table] == [
        (3, VIRTQ_DESC_F_NEXT, 1),
        (7, VIRTQ_DESC_F_NEXT, 2),
        (64, VIRTQ_DESC_F_WRITE, 0),
    ]
    assert ram.read(table[1][0], 7) == b"payload"
    assert queue.free_descriptors == 7


def test_indirect_without_negotiation_is_refused(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 8, indirect=False)
    with pytest.raises(ValueError, match="INDIRECT_DESC"):
        queue.add_chain([b"x"], [], indirect=True)


def test_indices_wrap_at_65535(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 8, start_idx=65530)
    device = SpecDevice(ram, queue)
    seen_avail = []
    for round_number in range(5):
        heads = [queue.add_chain([bytes([round_number, i])], [4]) for i in range(3)]
        _old, new = queue.publish()
        seen_avail.append(new)
        popped = device.pop_heads()
        assert popped == heads
        for head in popped:
            device.fill(head, device.readable_bytes(head) * 2)
        device.push_used([(head, 4) for head in popped])
        used = queue.used()
        assert [element.id for element in used] == heads
        assert [queue.read_written(element) for element in used] == [
            bytes([round_number, i]) * 2 for i in range(3)
        ]
    assert seen_avail == [65533, 0, 3, 6, 9]
    assert queue.last_used_idx == 9
    assert queue.free_descriptors == 8
    assert queue.in_flight == 0


def test_full_queue_raises_and_used_gives_descriptors_back(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 4)
    device = SpecDevice(ram, queue)
    first = queue.add_chain([b"a", b"b"], [])
    queue.add_chain([b"c", b"d"], [])
    with pytest.raises(QueueFullError):
        queue.add_chain([b"e"], [])
    queue.publish()
    device.pop_heads()
    device.push_used([(first, 0)])
    assert queue.used() == [(first, 0)]
    assert queue.free_descriptors == 2
    queue.add_chain([b"e", b"f"], [])


def test_used_rejects_unknown_head_and_overlong_len(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 4)
    device = SpecDevice(ram, queue)
    head = queue.add_chain([], [16])
    queue.publish()
    device.push_used([(head, 17)])
    with pytest.raises(DeviceProtocolError, match="exceeds its writable capacity 16"):
        queue.used()

    other = DriverQueue(ram, 4)
    other_device = SpecDevice(ram, other)
    other.add_chain([b"x"], [])
    other.publish()
    other_device.push_used([(3, 0)])
    with pytest.raises(DeviceProtocolError, match="not an in-flight chain head"):
        other.used()


def test_read_written_stops_at_used_len_across_buffers(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 8)
    device = SpecDevice(ram, queue)
    head = queue.add_chain([b"req"], [4, 4, 4])
    queue.publish()
    device.pop_heads()
    device.fill(head, b"0123456789")
    device.push_used([(head, 10)])
    (element,) = queue.used()
    assert queue.read_written(element) == b"0123456789"
    assert queue.read_written(head) == b"0123456789"


def test_needs_kick_without_event_idx_follows_used_no_notify(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 8)
    queue.add_chain([b"x"], [])
    old, new = queue.publish()
    assert queue.needs_kick(old, new)
    ram.write(queue.used_gpa, struct.pack("<H", VRING_USED_F_NO_NOTIFY))
    assert queue.used_flags() == VRING_USED_F_NO_NOTIFY
    assert not queue.needs_kick(old, new)
    assert not queue.needs_kick()


@pytest.mark.parametrize(
    ("avail_event", "old", "new", "expected"),
    [
        (0, 0, 1, True),  # device waits for entry 0, which was just added
        (1, 0, 1, False),  # device waits for entry 1, not added yet
        (3, 0, 5, True),  # passed within a batch
        (5, 0, 5, False),  # exactly at new: not passed
        (65535, 65534, 1, True),  # across the wrap
        (2, 65534, 1, False),  # ahead, across the wrap
        (65533, 65534, 1, False),  # already passed before this batch
    ],
)
def test_needs_kick_with_event_idx_uses_avail_event(
    ram: GuestRam, avail_event: int, old: int, new: int, expected: bool
) -> None:
    queue = DriverQueue(ram, 8, event_idx=True)
    SpecDevice(ram, queue).set_avail_event(avail_event)
    assert queue.avail_event() == avail_event
    ram.write(queue.used_gpa, struct.pack("<H", VRING_USED_F_NO_NOTIFY))  # ignored with EVENT_IDX
    assert queue.needs_kick(old, new) is expected


def test_used_event_and_avail_flags_are_written_where_the_spec_says(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 8)
    queue.set_used_event(0xBEEF)
    assert ram.read(queue.avail_gpa + 4 + 2 * 8, 2) == struct.pack("<H", 0xBEEF)
    queue.set_avail_flags(1)
    assert ram.read(queue.avail_gpa, 2) == b"\x01\x00"


def test_hostile_helpers_write_raw_ring_fields(ram: GuestRam) -> None:
    queue = DriverQueue(ram, 8)
    queue.write_desc(5, 0xDEAD_BEEF_0000, 0xFFFF_FFFF, VIRTQ_DESC_F_NEXT, 5)
    assert decode_desc(ram, queue.desc_gpa, 5) == (0xDEAD_BEEF_0000, 0xFFFF_FFFF, 1, 5)
    queue.set_avail_entry(7, 300)
    queue.set_avail_idx(9)
    assert ram.read(queue.avail_gpa + 4 + 14, 2) == struct.pack("<H", 300)
    assert ram.read(queue.avail_gpa + 2, 2) == struct.pack("<H", 9)
    assert queue.avail_idx == 0, "raw stores bypass the shadow index"


@settings(max_examples=60, deadline=None)
@given(
    chains=st.lists(
        st.tuples(
            st.lists(st.binary(min_size=1, max_size=40), max_size=3),
            st.lists(st.integers(min_value=1, max_value=40), max_size=3),
            st.booleans(),
        ).filter(lambda chain: chain[0] or chain[1]),
        min_size=1,
        max_size=20,
    ),
    start_idx=st.integers(min_value=0, max_value=0xFFFF),
)
def test_any_chain_round_trips_through_a_spec_device(
    chains: list[tuple[list[bytes], list[int], bool]], start_idx: int
) -> None:
    with GuestRam(1 << 16) as ram:
        queue = DriverQueue(ram, 8, indirect=True, start_idx=start_idx)
        device = SpecDevice(ram, queue)
        baseline = ram.bytes_allocated
        for readable, writable, indirect in chains:
            head = queue.add_chain(readable, writable, indirect=indirect)
            queue.publish()
            (popped,) = device.pop_heads()
            assert popped == head
            buffers = walk_chain(ram, queue, head)
            assert [length for _a, length, w in buffers if not w] == [len(b) for b in readable]
            assert [length for _a, length, w in buffers if w] == writable
            assert device.readable_bytes(head) == b"".join(readable)
            reply = bytes(range(sum(writable)))
            device.push_used([(head, device.fill(head, reply))])
            (element,) = queue.used()
            assert queue.read_written(element) == reply
        assert queue.free_descriptors == 8
        assert ram.bytes_allocated == baseline


# ---------------------------------------------------------------------------------------------
# virtio-net
# ---------------------------------------------------------------------------------------------


def test_net_header_packs_to_twelve_little_endian_bytes() -> None:
    packed = pack_net_hdr(1, 4, 54, 1448, 34, 16, 3)
    assert packed == bytes([1, 4, 54, 0, 0xA8, 0x05, 34, 0, 16, 0, 3, 0])
    assert len(packed) == NET_HDR_LEN
    assert unpack_net_hdr(packed) == NetHdr(1, 4, 54, 1448, 34, 16, 3)


@pytest.mark.parametrize("layout", list(TxLayout))
@pytest.mark.parametrize("indirect", [False, True])
def test_send_puts_header_and_frame_on_tx_in_each_layout(
    ram: GuestRam, layout: TxLayout, indirect: bool
) -> None:
    rx = DriverQueue(ram, 8, indirect=True)
    tx = DriverQueue(ram, 64, indirect=True)
    net = NetDriver(rx, tx, mrg_rxbuf=True)
    gso_hdr = NetHdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16)
    frames = [b"\x01" * 60, (gso_hdr, b"\x02" * 100), (pack_net_hdr(gso_type=4), b"\x03" * 9)]
    heads = net.send(frames, indirect=indirect, layout=layout)
    device = SpecDevice(ram, tx)
    assert device.pop_heads() == heads
    expected = [
        pack_net_hdr() + b"\x01" * 60,
        pack_net_hdr(*gso_hdr) + b"\x02" * 100,
        pack_net_hdr(gso_type=4) + b"\x03" * 9,
    ]
    assert [device.readable_bytes(head) for head in heads] == expected
    counts = [len(walk_chain(ram, tx, head)) for head in heads]
    if layout is TxLayout.ONE_DESCRIPTOR:
        assert counts == [1, 1, 1]
    elif layout is TxLayout.HEADER_APART:
        assert counts == [2, 2, 2]
        assert walk_chain(ram, tx, heads[0])[0][1] == NET_HDR_LEN
    else:
        assert walk_chain(ram, tx, heads[0])[0][1] < NET_HDR_LEN, "header must straddle"
    device.push_used([(head, 0) for head in heads])
    assert [element.id for element in net.reclaim_tx()] == heads


def test_receive_without_mrg_is_one_packet_per_buffer(ram: GuestRam) -> None:
    rx = DriverQueue(ram, 8)
    net = NetDriver(rx, DriverQueue(ram, 8), mrg_rxbuf=False)
    heads = net.post_rx(2, 1526, split_header=True)
    device = SpecDevice(ram, rx)
    assert device.pop_heads() == heads
    assert [length for _a, length, _w in walk_chain(ram, rx, heads[0])] == [12, 1514]
    packets = [pack_net_hdr(num_buffers=1) + b"A" * 64, pack_net_hdr(num_buffers=1) + b"B" * 1514]
    device.push_used([(head, device.fill(head, p)) for head, p in zip(heads, packets, strict=True)])
    received = net.receive()
    assert [(hdr.num_buffers, frame) for hdr, frame in received] == [
        (1, b"A" * 64),
        (1, b"B" * 1514),
    ]


def test_receive_reassembles_mergeable_buffers_and_waits_for_the_rest(ram: GuestRam) -> None:
    rx = DriverQueue(ram, 8)
    net = NetDriver(rx, DriverQueue(ram, 8), mrg_rxbuf=True)
    heads = net.post_rx(4, 64)
    device = SpecDevice(ram, rx)
    device.pop_heads()
    frame = bytes(range(150))
    stream = pack_net_hdr(flags=2, num_buffers=3) + frame  # 162 bytes: 64 + 64 + 34
    pieces = [stream[0:64], stream[64:128], stream[128:]]
    device.fill(heads[0], pieces[0])
    device.fill(heads[1], pieces[1])
    device.push_used([(heads[0], 64), (heads[1], 64)])
    assert net.receive() == []
    assert net.rx_pending_buffers == 2
    device.fill(heads[2], pieces[2])
    small = pack_net_hdr(num_buffers=1) + b"tiny"
    device.fill(heads[3], small)
    device.push_used([(heads[2], len(pieces[2])), (heads[3], len(small))])
    received = net.receive()
    assert received == [
        (NetHdr(flags=2, num_buffers=3), frame),
        (NetHdr(num_buffers=1), b"tiny"),
    ]
    assert net.rx_pending_buffers == 0
    assert rx.free_descriptors == 8


def test_receive_rejects_zero_num_buffers_with_mrg(ram: GuestRam) -> None:
    rx = DriverQueue(ram, 8)
    net = NetDriver(rx, DriverQueue(ram, 8), mrg_rxbuf=True)
    (head,) = net.post_rx(1, 64)
    device = SpecDevice(ram, rx)
    device.pop_heads()
    device.push_used([(head, device.fill(head, pack_net_hdr(num_buffers=0) + b"x"))])
    with pytest.raises(DeviceProtocolError, match="num_buffers=0"):
        net.receive()


# ---------------------------------------------------------------------------------------------
# vhost-user wire format
# ---------------------------------------------------------------------------------------------


def test_message_headers_are_request_flags_size_little_endian() -> None:
    assert encode_message(Request.GET_FEATURES) == bytes.fromhex(
        "01000000 01000000 00000000"
    )
    assert encode_message(Request.SET_OWNER) == bytes.fromhex("03000000 01000000 00000000")
    mem_table = pack_memory_table([(0, 0x2000_0000, 0x7F00_0000_0000, 0)])
    assert len(mem_table) == 8 + 32
    assert encode_message(Request.SET_MEM_TABLE, mem_table, need_reply=True)[:12] == (
        bytes.fromhex("05000000 09000000 28000000")
    )
    assert mem_table[:8] == bytes.fromhex("01000000 00000000")
    assert mem_table[8:] == struct.pack("<QQQQ", 0, 0x2000_0000, 0x7F00_0000_0000, 0)


def test_vring_addr_payload_orders_desc_used_avail() -> None:
    payload = pack_vring_addr(1, desc=0x1000, used=0x3000, avail=0x2000)
    assert len(payload) == 40
    assert payload == (
        bytes.fromhex("01000000 00000000")
        + (0x1000).to_bytes(8, "little")
        + (0x3000).to_bytes(8, "little")
        + (0x2000).to_bytes(8, "little")
        + bytes(8)
    )


def test_vring_file_payload_carries_index_and_nofd_bit() -> None:
    assert pack_vring_file(1) == (1).to_bytes(8, "little")
    assert pack_vring_file(3, nofd=True) == (0x103).to_bytes(8, "little")


# ---------------------------------------------------------------------------------------------
# The front-end against a tiny in-test back-end over a socketpair
# ---------------------------------------------------------------------------------------------

FAKE_BACKEND_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.PROTOCOL_FEATURES
    | VirtioFeature.MRG_RXBUF
    | VirtioFeature.EVENT_IDX
    | VirtioFeature.INDIRECT_DESC
    | VirtioFeature.CSUM
)
FAKE_BACKEND_PROTOCOL = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
R = Request


@dataclass
class Received:
    request: int
    flags: int
    payload: bytes
    fds: list[int]


@dataclass
class FakeBackend:
    """Reads what the front-end sends, answers the GET_* requests and NEED_REPLY acks."""

    sock: trio.socket.SocketType
    features: int = FAKE_BACKEND_FEATURES
    protocol_features: int = FAKE_BACKEND_PROTOCOL
    reply_flags: int = 0x5
    vring_bases: dict[int, int] = field(default_factory=dict)
    messages: list[Received] = field(default_factory=list)

    async def _recv(self, count: int) -> tuple[bytes, list[int]]:
        data, fds = b"", []
        while len(data) < count:
            chunk, ancdata, _flags, _addr = await self.sock.recvmsg(
                count - len(data), socket.CMSG_SPACE(8 * 4)
            )
            if not chunk:
                raise EOFError
            for _level, _kind, cmsg in ancdata:
                fds.extend(array.array("i", cmsg))
            data += chunk
        return data, fds

    async def serve(self) -> None:
        try:
            while True:
                header, fds = await self._recv(12)
                request, flags, size = struct.unpack("<III", header)
                payload, more_fds = await self._recv(size) if size else (b"", [])
                self.messages.append(Received(request, flags, payload, fds + more_fds))
                await self._answer(request, flags, payload)
        except (EOFError, ConnectionResetError):
            pass  # the front-end hung up (reset: it left a reply unread)

    async def _answer(self, request: int, flags: int, payload: bytes) -> None:
        if request == R.GET_FEATURES:
            body = struct.pack("<Q", self.features)
        elif request == R.GET_PROTOCOL_FEATURES:
            body = struct.pack("<Q", self.protocol_features)
        elif request == R.GET_QUEUE_NUM:
            body = struct.pack("<Q", 1)
        elif request == R.GET_VRING_BASE:
            index = struct.unpack("<II", payload)[0]
            body = struct.pack("<II", index, self.vring_bases.get(index, 0))
        elif flags & 0x8:
            body = struct.pack("<Q", 0)
        else:
            return
        await self.sock.send(struct.pack("<III", request, self.reply_flags, len(body)) + body)

    def sequence(self) -> list[tuple[str, int | None]]:
        """(request name, ring index or None) per message, for order assertions."""
        indexed = {
            R.SET_VRING_NUM,
            R.SET_VRING_BASE,
            R.SET_VRING_ADDR,
            R.GET_VRING_BASE,
            R.SET_VRING_ENABLE,
            R.SET_VRING_KICK,
            R.SET_VRING_CALL,
            R.SET_VRING_ERR,
        }
        result = []
        for message in self.messages:
            index = None
            if message.request in indexed:
                index = struct.unpack_from("<I", message.payload)[0] & 0xFF
            result.append((R(message.request).name, index))
        return result

    async def settled_sequence(self) -> list[tuple[str, int | None]]:
        """The sequence once the back-end has read everything sent so far."""
        await trio.testing.wait_all_tasks_blocked()
        return self.sequence()

    def close_fds(self) -> None:
        for message in self.messages:
            for fd in message.fds:
                os.close(fd)

    async def forget(self) -> None:
        """Drop the messages sent so far (closing their fds)."""
        await trio.testing.wait_all_tasks_blocked()
        self.close_fds()
        self.messages.clear()


@pytest.fixture
async def wired(ram: GuestRam):
    """A front-end and a fake back-end on the two ends of a socketpair."""
    frontend_sock, backend_sock = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = FakeBackend(backend_sock)
    frontend = VhostUserFrontend(frontend_sock, ram)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.serve)
        try:
            with trio.fail_after(TEST_TIMEOUT_S):
                yield frontend, backend
        finally:
            frontend.close()
    backend_sock.close()
    backend.close_fds()


QEMU_CONNECT_BLOCK = [
    ("GET_FEATURES", None),
    ("GET_PROTOCOL_FEATURES", None),
    ("SET_PROTOCOL_FEATURES", None),
    ("GET_QUEUE_NUM", None),
    ("SET_OWNER", None),
    ("GET_FEATURES", None),
    ("SET_VRING_CALL", 0),
    ("SET_VRING_ERR", 0),
    ("SET_VRING_CALL", 1),
    ("SET_VRING_ERR", 1),
]
QEMU_RESET_ENABLES = [("SET_VRING_ENABLE", 0), ("SET_VRING_ENABLE", 1)] * 3
QEMU_START_BLOCK = [
    ("SET_VRING_ENABLE", 0),
    ("SET_VRING_ENABLE", 1),
    ("SET_FEATURES", None),
    ("SET_MEM_TABLE", None),
    *[
        (name, vq)
        for vq in (0, 1)
        for name in (
            "SET_VRING_NUM",
            "SET_VRING_BASE",
            "SET_VRING_ADDR",
            "SET_VRING_KICK",
            "SET_VRING_CALL",
        )
    ],
    ("SET_VRING_ENABLE", 0),
    ("SET_VRING_ENABLE", 1),
]


async def test_qemu_bring_up_sends_the_observed_sequence_and_payloads(wired) -> None:
    frontend, backend = wired
    net = await frontend.bring_up(queue_size=256, start_idx=7)
    assert (
        await backend.settled_sequence()
        == QEMU_CONNECT_BLOCK + QEMU_RESET_ENABLES + QEMU_START_BLOCK
    )
    by_name = {}
    for message in backend.messages:
        by_name.setdefault(R(message.request).name, []).append(message)

    # Protocol features: what both sides want (CONFIG is the back-end's alone).
    assert struct.unpack("<Q", by_name["SET_PROTOCOL_FEATURES"][0].payload)[0] == 0b1001
    # SET_FEATURES = guest wants ∩ offered, plus bit 30 back.
    (set_features,) = by_name["SET_FEATURES"]
    assert struct.unpack("<Q", set_features.payload)[0] == (
        VirtioFeature.VERSION_1
        | VirtioFeature.PROTOCOL_FEATURES
        | VirtioFeature.MRG_RXBUF
        | VirtioFeature.EVENT_IDX
        | VirtioFeature.INDIRECT_DESC
    )
    assert frontend.acked_features & VirtioFeature.CSUM == 0

    (mem_table,) = by_name["SET_MEM_TABLE"]
    assert mem_table.flags == 0x9, "NEED_REPLY with REPLY_ACK, as QEMU 7.2"
    assert mem_table.payload == pack_memory_table([(0, RAM_SIZE, DEFAULT_UVA_BASE, 0)])
    assert len(mem_table.fds) == 1
    frontend.ram.write(0x40, b"shared")
    with mmap.mmap(mem_table.fds[0], RAM_SIZE, mmap.MAP_SHARED) as backend_view:
        assert backend_view[0x40:0x46] == b"shared"

    for vq, queue in ((0, net.rx), (1, net.tx)):
        addr = next(m for m in by_name["SET_VRING_ADDR"] if m.payload[0] == vq)
        assert len(addr.payload) == 40
        assert addr.payload == pack_vring_addr(
            vq, desc=queue.desc_uva, used=queue.used_uva, avail=queue.avail_uva
        )
        assert queue.desc_uva != queue.desc_gpa
        base = next(m for m in by_name["SET_VRING_BASE"] if m.payload[0] == vq)
        assert base.payload == struct.pack("<II", vq, 7)
    assert all(m.payload == struct.pack("<II", m.payload[0], 256) for m in by_name["SET_VRING_NUM"])
    assert all(m.flags == 0x1 for m in by_name["SET_VRING_ENABLE"])
    for name in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"):
        assert all(len(m.fds) == 1 and m.payload[1] == 0 for m in by_name[name]), name


async def test_kick_reaches_the_backend_fd_and_call_wakes_wait_call(wired) -> None:
    frontend, backend = wired
    await frontend.bring_up()
    await trio.testing.wait_all_tasks_blocked()
    kick_fds = {m.payload[0]: m.fds[0] for m in backend.messages if m.request == R.SET_VRING_KICK}
    call_fds = {m.payload[0]: m.fds[0] for m in backend.messages if m.request == R.SET_VRING_CALL}
    frontend.kick(1)
    assert os.eventfd_read(kick_fds[1]) == 1
    assert frontend.call_count(0) == 0

    async def device_calls() -> None:
        await trio.testing.wait_all_tasks_blocked()
        os.eventfd_write(call_fds[0], 1)  # the last CALL fd for vq 0 is the live one

    async with trio.open_nursery() as nursery:
        nursery.start_soon(device_calls)
        assert await frontend.wait_call(0) == 1
    assert frontend.call_count(0) == 1
    with pytest.raises(trio.TooSlowError):
        await frontend.wait_call(0, timeout=0)


async def test_kick_if_needed_honours_the_device_avail_event(wired) -> None:
    frontend, _backend = wired
    net = await frontend.bring_up()
    SpecDevice(frontend.ram, net.tx).set_avail_event(5)
    net.send([b"frame"])
    assert not frontend.kick_if_needed(1)
    net.send([b"frame"] * 5)
    assert frontend.kick_if_needed(1)


async def test_dpdk_order_sets_owner_first_and_enables_after_rings(wired) -> None:
    frontend, backend = wired
    frontend.order = BringUpOrder.DPDK_VIRTIO_USER
    await frontend.bring_up()
    ring_setup = [
        (name, vq)
        for vq in (0, 1)
        for name in (
            "SET_VRING_CALL",
            "SET_VRING_NUM",
            "SET_VRING_BASE",
            "SET_VRING_ADDR",
            "SET_VRING_KICK",
        )
    ]
    assert await backend.settled_sequence() == [
        ("SET_OWNER", None),
        ("GET_FEATURES", None),
        ("GET_PROTOCOL_FEATURES", None),
        ("SET_PROTOCOL_FEATURES", None),
        ("GET_QUEUE_NUM", None),
        ("SET_FEATURES", None),
        ("SET_MEM_TABLE", None),
        *ring_setup,
        ("SET_VRING_ENABLE", 0),
        ("SET_VRING_ENABLE", 1),
    ]
    await backend.forget()
    backend.vring_bases = {0: 3, 1: 9}
    assert await frontend.stop() == {0: 3, 1: 9}
    assert await backend.settled_sequence() == [
        ("SET_VRING_ENABLE", 0),
        ("GET_VRING_BASE", 0),
        ("SET_VRING_ENABLE", 1),
        ("GET_VRING_BASE", 1),
    ]
    assert backend.messages[0].payload == struct.pack("<II", 0, 0)


async def test_reboot_stops_rings_then_replays_the_start_block_with_fresh_rings(wired) -> None:
    frontend, backend = wired
    first = await frontend.bring_up(start_idx=100)
    old_rings = (first.rx.desc_gpa, first.tx.desc_gpa)
    await backend.forget()
    backend.vring_bases = {0: 101, 1: 102}
    assert await frontend.reboot() == {0: 101, 1: 102}
    assert await backend.settled_sequence() == (
        [("GET_VRING_BASE", 0), ("GET_VRING_BASE", 1), *QEMU_RESET_ENABLES, *QEMU_START_BLOCK]
    )
    second = frontend.net
    assert second is not first and second.rx.start_idx == 0
    bases = [m.payload for m in backend.messages if m.request == R.SET_VRING_BASE]
    assert bases == [struct.pack("<II", 0, 0), struct.pack("<II", 1, 0)]
    assert (second.rx.desc_gpa, second.tx.desc_gpa) == old_rings, "freed rings are reused"


async def test_newer_qemu_order_waits_for_an_ack_on_enable(wired) -> None:
    frontend, backend = wired
    frontend.order = BringUpOrder.QEMU_NEWER
    await frontend.bring_up()
    await trio.testing.wait_all_tasks_blocked()
    enables = [m for m in backend.messages if m.request == R.SET_VRING_ENABLE]
    assert enables and all(m.flags == 0x9 for m in enables)


async def test_reply_with_wrong_flags_is_rejected(wired) -> None:
    frontend, backend = wired
    backend.reply_flags = 0x1
    with pytest.raises(VhostUserProtocolError, match=r"flags 0x1, expected 0x5"):
        await frontend.get_features()


async def test_raw_request_sends_anything(wired) -> None:
    frontend, backend = wired
    assert await frontend.request(99, b"\x01\x02\x03") is None
    eventfd = os.eventfd(0)
    try:
        await frontend.request(R.SET_OWNER, b"", fds=[eventfd])
    finally:
        os.close(eventfd)
    reply = await frontend.request(R.GET_FEATURES, b"junk")
    assert reply == struct.pack("<Q", FAKE_BACKEND_FEATURES)
    ack = await frontend.request(R.SET_VRING_NUM, b"\x00" * 3, need_reply=True)
    assert ack == bytes(8)
    await trio.testing.wait_all_tasks_blocked()
    got = [(m.request, m.flags, m.payload, len(m.fds)) for m in backend.messages]
    assert got == [
        (99, 0x1, b"\x01\x02\x03", 0),
        (R.SET_OWNER, 0x1, b"", 1),
        (R.GET_FEATURES, 0x1, b"junk", 0),
        (R.SET_VRING_NUM, 0x9, b"\x00\x00\x00", 0),
    ]


async def serve_and_keep(sock: trio.socket.SocketType, backends: list[FakeBackend],
                         **options: int) -> None:
    """Serve one front-end on `sock` with a FakeBackend (kept in `backends` for the test's
    checks) until it hangs up, then close the socket."""
    backend = FakeBackend(sock, **options)
    backends.append(backend)
    await backend.serve()
    sock.close()


async def test_connect_over_a_unix_path_brings_up_a_net_driver(tmp_path, ram: GuestRam) -> None:
    path = str(tmp_path / "vhost.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    backends: list[FakeBackend] = []

    async def serve_one() -> None:
        sock, _ = await listener.accept()
        await serve_and_keep(sock, backends)

    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            async with VhostUserFrontend.connect(path, ram, queue_size=64) as frontend:
                assert frontend.net is not None
                assert frontend.net.mrg_rxbuf
                assert frontend.net.rx.size == 64 and frontend.net.tx.event_idx
    listener.close()
    (backend,) = backends
    assert backend.sequence()[-1] == ("SET_VRING_ENABLE", 1)
    backend.close_fds()


async def test_accept_waits_for_a_client_mode_backend(tmp_path, ram: GuestRam) -> None:
    path = str(tmp_path / "server.sock")
    listening = trio.Event()
    backends: list[FakeBackend] = []

    async def client_mode_backend() -> None:
        await listening.wait()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        await serve_and_keep(sock, backends, protocol_features=0)

    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_mode_backend)
            async with VhostUserFrontend.accept(path, ram, listening=listening) as frontend:
                assert frontend.protocol_features == 0
                assert frontend.net is not None
    (backend,) = backends
    sequence = backend.sequence()
    assert ("GET_QUEUE_NUM", None) not in sequence, "no MQ negotiated, no GET_QUEUE_NUM"
    (mem_table,) = [m for m in backend.messages if m.request == R.SET_MEM_TABLE]
    assert mem_table.flags == 0x1, "no REPLY_ACK, no NEED_REPLY"
    backend.close_fds()
