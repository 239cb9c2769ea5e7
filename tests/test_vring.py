"""The split virtqueue and the virtio-net data path against a model guest driver on a memfd
(tests/support/virtio_driver.py): layouts, wrap at 65535, EVENT_IDX, indirect tables,
mergeable RX, offload checks, and hostile rings (hypothesis): no crash, no hang, RingError."""

import os
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netstack.frame import GSO_TCPV4, HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_LEN, Frame, OffloadInfo
from tests.support.deadline import deadline
from tests.support.virtio_driver import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DriverQueue,
    GuestRam,
    NetDriver,
    NetHdr,
    Segment,
    TxLayout,
    pack_net_hdr,
)
from virtio.memory import GuestMemory, RegionSpec
from virtio.net import NetQueues
from virtio.spec import MAX_FRAME, Feature, bit
from virtio.vring import WALK_BUDGET, RingError, SplitQueue

# Each test runs over both ring walks, the Python reference and the native one.
pytestmark = pytest.mark.usefixtures("ring_walk")

RING = 64
FEATURES = (bit(Feature.VERSION_1) | bit(Feature.NET_MRG_RXBUF) | bit(Feature.RING_EVENT_IDX)
            | bit(Feature.RING_INDIRECT_DESC) | bit(Feature.NET_CSUM)
            | bit(Feature.NET_GUEST_CSUM) | bit(Feature.NET_HOST_TSO4)
            | bit(Feature.NET_GUEST_TSO4))


def backend_memory(ram: GuestRam) -> tuple[GuestMemory, list[int]]:
    """The back-end's mapping of `ram`, and its copies of the fds (the caller closes them)."""
    fds = [os.dup(fd) for fd in ram.region_fds()]
    return GuestMemory([RegionSpec(*r) for r in ram.memory_table()], fds), fds


def device_queue(memory: GuestMemory, q: DriverQueue, index: int, *, event_idx=True,
                 indirect=True, base=0) -> SplitQueue:
    return SplitQueue(index, q.size, memory, q.desc_uva, q.avail_uva, q.used_uva, base,
                      event_idx=event_idx, indirect=indirect)


class Pair:
    """A guest NIC (NetDriver) and the device side of its two queues."""

    def __init__(self, *, mrg=True, event_idx=True, start_idx=0, ram=None, features=FEATURES):
        self.ram = ram or GuestRam(1 << 22)
        self.rx_q = DriverQueue(self.ram, RING, event_idx=event_idx, indirect=True,
                                start_idx=start_idx)
        self.tx_q = DriverQueue(self.ram, RING, event_idx=event_idx, indirect=True,
                                start_idx=start_idx)
        self.driver = NetDriver(self.rx_q, self.tx_q, mrg_rxbuf=mrg)
        self.memory, self.memory_fds = backend_memory(self.ram)
        self.rx = device_queue(self.memory, self.rx_q, 0, event_idx=event_idx, base=start_idx)
        self.tx = device_queue(self.memory, self.tx_q, 1, event_idx=event_idx, base=start_idx)
        if not mrg:
            features &= ~bit(Feature.NET_MRG_RXBUF)
        self.net = NetQueues(features)

    def __enter__(self) -> "Pair":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self):
        self.rx.release()
        self.tx.release()
        self.memory.close()
        for fd in self.memory_fds:
            os.close(fd)
        self.ram.close()


@pytest.fixture
def pair():
    with Pair() as p:
        yield p


def eth(n: int, size: int = 60) -> bytes:
    body = bytes([n & 0xFF]) * (size - 14)
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00" + body


@pytest.mark.parametrize("layout", list(TxLayout))
@pytest.mark.parametrize("indirect", [False, True])
def test_tx_frames_come_out_whole_whatever_the_descriptor_layout(pair, layout, indirect):
    frames = [eth(i, 60 + i * 37) for i in range(10)]
    pair.driver.send(frames, layout=layout, indirect=indirect, chunk_size=97)
    out = pair.net.pop_tx(pair.tx, 256)
    assert [bytes(f.data) for f in out] == frames
    used = pair.driver.reclaim_tx()
    assert [u.len for u in used] == [0] * 10  # TX used len is 0: the device wrote nothing


def test_tx_offload_metadata_travels_with_the_frame(pair):
    hdr = NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16, 0)
    pair.driver.send([(hdr, eth(1, 3000))])
    (frame,) = pair.net.pop_tx(pair.tx, 8)
    assert tuple(frame.offload) == (HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)


@pytest.mark.parametrize("layout", list(TxLayout))
def test_tx_checksum_offsets_are_checked_against_the_whole_frame(pair, layout):
    hdr = NetHdr(HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 0)  # TCP checksum at 50, past any 7-byte
    pair.driver.send([(hdr, eth(1, 100))], layout=layout)  # chunk or lone header buffer
    (frame,) = pair.net.pop_tx(pair.tx, 8)
    assert bytes(frame.data) == eth(1, 100) and not pair.net.drops


@pytest.mark.parametrize(
    ("hdr", "reason"),
    [
        (NetHdr(0, GSO_TCPV4, 54, 0, 34, 16, 0), "tx_gso_size_zero"),
        (NetHdr(HDR_F_NEEDS_CSUM, 0, 0, 0, 58, 2, 0), "tx_bad_csum_offsets"),
        (NetHdr(0, 4, 54, 1440, 54, 16, 0), "tx_gso_not_negotiated"),  # TSO6 not offered
        (NetHdr(0, 0x33, 54, 1440, 54, 16, 0), "tx_gso_not_negotiated"),
    ],
)
def test_tx_frames_with_bad_offload_metadata_are_dropped_and_counted(pair, hdr, reason):
    pair.driver.send([(hdr, eth(1, 60)), eth(2)])
    out = pair.net.pop_tx(pair.tx, 8)
    assert [bytes(f.data) for f in out] == [eth(2)]
    assert pair.net.drops[reason] == 1
    assert len(pair.driver.reclaim_tx()) == 2  # both chains returned


def test_tx_runts_and_oversize_frames_are_dropped_counted_and_their_chains_returned():
    p = Pair(ram=GuestRam(32 << 20))
    try:
        big = p.ram.alloc(MAX_FRAME + VIRTIO_NET_HDR_LEN)
        p.tx_q.add_chain([b"\0" * 11], [])  # not even a virtio-net header
        p.tx_q.add_chain([b"\0" * (VIRTIO_NET_HDR_LEN + 13)], [])  # shorter than an Ethernet header
        # 8 MiB in four 2 MiB descriptors (the same guest buffer four times)
        p.tx_q.add_segments([Segment(big, 2 << 20, False)] * 4)
        p.tx_q.add_segments([Segment(big, VIRTIO_NET_HDR_LEN + MAX_FRAME + 1, False)])
        p.tx_q.add_segments([Segment(big, VIRTIO_NET_HDR_LEN + MAX_FRAME, False)])  # the largest
        p.tx_q.publish()
        p.driver.send([eth(1)])
        out = p.net.pop_tx(p.tx, 256)
        assert [len(f.data) for f in out] == [MAX_FRAME, 60]
        assert p.net.drops == {"tx_runt": 2, "tx_oversize": 2}
        assert len(p.driver.reclaim_tx()) == 6  # every chain back to the guest
        p.driver.send([eth(2)])  # and the ring goes on
        assert [bytes(f.data) for f in p.net.pop_tx(p.tx, 256)] == [eth(2)]
    finally:
        p.close()


@pytest.mark.parametrize("mrg", [True, False])
def test_rx_delivers_frames_with_headers(mrg):
    p = Pair(mrg=mrg)
    try:
        p.driver.post_rx(8, 2048)
        frames = deque(Frame(eth(i, 100 + i)) for i in range(5))
        delivered, _nbytes = p.net.push_rx(p.rx, frames, 64)
        assert delivered == 5 and not frames
        got = p.driver.receive()
        assert [f for _, f in got] == [eth(i, 100 + i) for i in range(5)]
        assert all(h.num_buffers == 1 for h, _ in got)
    finally:
        p.close()


def test_rx_mergeable_spreads_a_large_frame_over_several_buffers(pair):
    pair.driver.post_rx(40, 1536)
    big = Frame(eth(7, 60000), OffloadInfo(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16))
    frames = deque([big])
    assert pair.net.push_rx(pair.rx, frames, 8)[0] == 1
    ((hdr, data),) = pair.driver.receive()
    assert data == eth(7, 60000)
    assert hdr.num_buffers == -(-(60000 + 12) // 1536)
    assert (hdr.flags, hdr.gso_type, hdr.gso_size) == (HDR_F_NEEDS_CSUM, GSO_TCPV4, 1448)


def test_rx_mergeable_waits_instead_of_half_publishing(pair):
    pair.driver.post_rx(3, 1536)
    frames = deque([Frame(eth(1, 6000))])
    assert pair.net.push_rx(pair.rx, frames, 8) == (0, 0)
    assert len(frames) == 1 and pair.rx.used_idx == 0
    pair.driver.post_rx(2, 1536)
    assert pair.net.push_rx(pair.rx, frames, 8)[0] == 1
    assert pair.driver.receive()[0][1] == eth(1, 6000)


def test_rx_split_header_buffers(pair):
    pair.driver.post_rx(4, 2048, split_header=True)
    frames = deque([Frame(eth(3, 1500))])
    pair.net.push_rx(pair.rx, frames, 8)
    assert pair.driver.receive()[0][1] == eth(3, 1500)


def test_rx_without_mergeable_drops_frames_larger_than_the_buffer():
    p = Pair(mrg=False)
    try:
        p.driver.post_rx(2, 1526)
        frames = deque([Frame(eth(1, 3000)), Frame(eth(2, 1000))])
        delivered, _ = p.net.push_rx(p.rx, frames, 8)
        assert delivered == 1 and p.net.drops["rx_buffer_too_small"] == 1
        got = p.driver.receive()
        assert [f for _, f in got] == [eth(2, 1000)]
    finally:
        p.close()


def test_rx_mergeable_drops_a_frame_the_whole_ring_cannot_hold_and_delivers_the_next(pair):
    pair.driver.post_rx(RING, 64)  # every descriptor offered: 64 x 64 bytes, 4 KiB in all
    frames = deque([Frame(eth(1, 6000)), Frame(eth(2, 60))])
    assert pair.net.push_rx(pair.rx, frames, 8) == (1, 60)
    assert not frames and pair.net.drops["rx_ring_too_small"] == 1
    assert [f for _, f in pair.driver.receive()] == [eth(2, 60)]


def test_rx_mergeable_drops_frames_beyond_max_frame_at_once(pair):
    pair.driver.post_rx(4, 1536)
    frames = deque([Frame(eth(1, MAX_FRAME + 1)), Frame(eth(2, 60))])
    assert pair.net.push_rx(pair.rx, frames, 8) == (1, 60)
    assert pair.net.drops["rx_oversize"] == 1


def test_rx_mergeable_frame_needing_more_than_the_walk_budget_is_dropped(pair):
    # Indirect RX chains of 1024 one-byte buffers: a 9000-byte frame needs 9 of them.
    buf = pair.ram.alloc(1)
    for _ in range(16):
        pair.rx_q.add_segments([Segment(buf, 1, True)] * 1024, indirect=True)
    pair.rx_q.publish()
    frames = deque([Frame(eth(1, 9000)), Frame(eth(2, 900))])
    delivered, _ = pair.net.push_rx(pair.rx, frames, 8)
    assert pair.net.drops["rx_too_fragmented"] == 1
    assert pair.rx.walked < 2 * WALK_BUDGET + 2 * 1024
    pair.net.push_rx(pair.rx, frames, 8)
    assert not frames  # the frame behind it went out (in this batch or the next)


class CountingQueue(SplitQueue):
    """A real SplitQueue that counts the chains it hands out (work done, not time)."""

    popped = 0

    def pop(self, limit):
        chains = super().pop(limit)
        self.popped += len(chains)
        return chains


def test_fast_path_chains_count_against_the_walk_budget():
    with GuestRam(1 << 22) as ram:
        q = DriverQueue(ram, 1024, event_idx=True, indirect=True)
        buf = ram.alloc(64)
        for _ in range(1024):
            q.add_segments([Segment(buf, 1, True)])  # one descriptor each: the fast path
        q.publish()
        memory, fds = backend_memory(ram)
        rx = device_queue(memory, q, 0)
        try:
            assert len(rx.pop(1024)) == 1024
            assert rx.walked == 1024
        finally:
            rx.release()
            memory.close()
            for fd in fds:
                os.close(fd)


def test_rx_ring_of_one_byte_buffers_costs_one_ring_walk_not_one_per_frame():
    # A mergeable guest offers its whole ring (1024 descriptors) as 1-byte buffers: no frame
    # can ever fit.  Each call handles at most `limit` frames; the ring is gathered once, then
    # remembered as too small while avail.idx stays put.
    with GuestRam(1 << 22) as ram:
        q = DriverQueue(ram, 1024, event_idx=True, indirect=True)
        buf = ram.alloc(64)
        for _ in range(1024):
            q.add_segments([Segment(buf, 1, True)])
        q.publish()
        memory, fds = backend_memory(ram)
        rx = CountingQueue(0, q.size, memory, q.desc_uva, q.avail_uva, q.used_uva, 0,
                           event_idx=True, indirect=True)
        try:
            net = NetQueues(FEATURES)
            frames = deque(Frame(eth(i, 1500)) for i in range(1024))
            assert net.push_rx(rx, frames, 256) == (0, 0)
            assert len(frames) == 1024 - 256  # drops count against the limit
            assert net.drops["rx_ring_too_small"] == 256
            assert rx.popped <= 256 + 1024  # the batch's chains, one gather over the ring
            assert rx.walked <= WALK_BUDGET + 1024
            rx.popped = 0
            assert net.push_rx(rx, frames, 256) == (0, 0)
            assert len(frames) == 1024 - 512
            assert rx.popped <= 256  # no gather at all: the ring is known to be too small
            assert rx.used_idx == 0 and rx.avail_count() == 1024  # every buffer still the guest's
        finally:
            rx.release()
            memory.close()
            for fd in fds:
                os.close(fd)


def test_rx_ring_known_too_small_is_looked_at_again_once_the_guest_posts_buffers(pair):
    pair.driver.post_rx(RING, 64)  # every descriptor offered: 4 KiB in all
    frames = deque([Frame(eth(1, 6000)), Frame(eth(2, 60)), Frame(eth(3, 6000))])
    assert pair.net.push_rx(pair.rx, frames, 8) == (1, 60)
    assert pair.net.drops["rx_ring_too_small"] == 2
    assert [f for _, f in pair.driver.receive()] == [eth(2, 60)]
    pair.driver.post_rx(1, 4096)  # avail.idx moves: 63 x 64 + 4096 bytes now
    frames = deque([Frame(eth(4, 6000))])
    assert pair.net.push_rx(pair.rx, frames, 8) == (1, 6000)
    assert [f for _, f in pair.driver.receive()] == [eth(4, 6000)]


def test_rx_drops_count_against_the_batch_limit():
    p = Pair(mrg=False)
    try:
        p.driver.post_rx(2, 1526)
        frames = deque(Frame(eth(i, 3000)) for i in range(100))
        assert p.net.push_rx(p.rx, frames, 8) == (0, 0)
        assert len(frames) == 92 and p.net.drops["rx_buffer_too_small"] == 8
    finally:
        p.close()


@pytest.mark.parametrize("buffer", [2048, 64])  # the header packed in place, or apart
def test_rx_frame_that_raises_is_dropped_and_the_buffer_serves_the_next(pair, buffer):
    pair.driver.post_rx(2, buffer)
    bad = Frame(eth(1, 1000), (0, 0, 1 << 20, 0, 0, 0))  # hdr_len fits no u16: struct.error
    frames = deque([bad, Frame(eth(2, 40))])
    assert pair.net.push_rx(pair.rx, frames, 8)[0] == 1
    assert pair.net.drops["rx_malformed"] == 1
    assert [f for _, f in pair.driver.receive()] == [eth(2, 40)]


def test_a_batch_over_huge_indirect_tables_stops_at_the_walk_budget():
    p = Pair(ram=GuestRam(16 << 20))
    try:
        buf = p.ram.alloc(16)
        for _ in range(RING):
            p.tx_q.add_segments([Segment(buf, 16, False)] * 1024, indirect=True)
        p.tx_q.publish()
        frames = 0
        calls = 0
        while p.tx.avail_count():
            frames += len(p.net.pop_tx(p.tx, 256))
            calls += 1
            assert p.tx.walked <= WALK_BUDGET + 1024
        assert frames == RING and calls >= RING * 1024 // (WALK_BUDGET + 1024)
        assert len(p.driver.reclaim_tx()) == RING
    finally:
        p.close()


def test_indices_wrap_at_65535():
    p = Pair(start_idx=65530)
    try:
        for round_ in range(4):
            frames = [eth(round_ * 10 + i) for i in range(5)]
            p.driver.send(frames)
            assert [bytes(f.data) for f in p.net.pop_tx(p.tx, 64)] == frames
            p.driver.reclaim_tx()
            p.driver.post_rx(5)
            p.net.push_rx(p.rx, deque(Frame(f) for f in frames), 64)
            assert [f for _, f in p.driver.receive()] == frames
        assert p.tx.last_avail_idx == (65530 + 20) & 0xFFFF
    finally:
        p.close()


def test_event_idx_notifies_once_when_the_driver_asks(pair):
    pair.driver.post_rx(16)
    pair.net.push_rx(pair.rx, deque([Frame(eth(1))]), 8)
    assert pair.rx.should_notify()  # first notification after start is unconditional
    pair.rx_q.set_used_event(pair.rx.used_idx + 2)  # driver: wake me after 3 more
    pair.net.push_rx(pair.rx, deque([Frame(eth(2)), Frame(eth(3))]), 8)
    assert not pair.rx.should_notify()
    pair.net.push_rx(pair.rx, deque([Frame(eth(4))]), 8)
    assert pair.rx.should_notify()
    assert not pair.rx.should_notify()  # nothing new since


def test_arm_kicks_writes_avail_event_and_sees_raced_work(pair):
    assert not pair.tx.arm_kicks()
    assert pair.tx_q.avail_event() == pair.tx.last_avail_idx
    pair.driver.send([eth(1)])
    assert pair.tx_q.needs_kick()  # the driver kicks because we asked at this index
    assert pair.tx.arm_kicks()  # work is there: do not sleep
    pair.net.pop_tx(pair.tx, 8)
    assert not pair.tx.arm_kicks()
    assert pair.tx_q.avail_event() == pair.tx.last_avail_idx


@pytest.mark.parametrize("event_idx", [True, False])
def test_arm_kicks_for_more_arms_beyond_the_index_seen_and_sees_chains_added_since(event_idx):
    with Pair(event_idx=event_idx) as p:
        p.driver.post_rx(2)
        p.rx.mute_kicks()
        seen = p.rx.avail_idx()  # a placement looked: two buffers, too small, say
        p.driver.post_rx(1)  # before kicks are armed: the driver does not kick
        assert not p.rx_q.needs_kick()
        assert p.rx.arm_kicks_for_more(seen)  # place again
        assert not p.rx.arm_kicks_for_more(p.rx.avail_idx())  # nothing since: armed
        if event_idx:
            assert p.rx_q.avail_event() == p.rx.avail_idx() == 3
        p.driver.post_rx(1)
        assert p.rx_q.needs_kick()


def test_without_event_idx_no_notify_flag_suppresses_kicks():
    p = Pair(event_idx=False)
    try:
        p.tx.mute_kicks()
        p.driver.send([eth(1)])
        assert not p.tx_q.needs_kick()
        p.net.pop_tx(p.tx, 8)
        assert not p.tx.arm_kicks()
        p.driver.send([eth(2)])
        assert p.tx_q.needs_kick()
        p.rx_q.set_avail_flags(1)  # NO_INTERRUPT
        p.driver.post_rx(1)
        p.net.push_rx(p.rx, deque([Frame(eth(1))]), 8)
        assert not p.rx.should_notify()
    finally:
        p.close()


def test_buffers_straddling_two_regions_are_gathered():
    ram = GuestRam.multi([1 << 20, 1 << 20])
    p = Pair(ram=ram)
    try:
        boundary = ram.regions[1].gpa
        frame = pack_net_hdr() + eth(9, 1000)
        ram.reserve(boundary - 500, len(frame))
        ram.write(boundary - 500, frame)
        p.tx_q.add_segments([Segment(boundary - 500, len(frame), False)])
        p.tx_q.publish()
        (out,) = p.net.pop_tx(p.tx, 8)
        assert bytes(out.data) == eth(9, 1000)
    finally:
        p.close()


# -- the hostile guest --------------------------------------------------------------------

def hostile_pop(pair: Pair) -> None:
    """Popping must either succeed or raise RingError: never hang, never another error."""
    for _ in range(4):
        try:
            with deadline(2.0):
                pair.net.pop_tx(pair.tx, 256)
        except RingError:
            return


def offer_tx(pair: Pair, head: int = 0) -> None:
    """Make the TX chain at `head` the one entry the driver has made available."""
    pair.tx_q.set_avail_entry(0, head)
    pair.tx_q.set_avail_idx(1)


def test_head_outside_the_ring_breaks_it(pair):
    offer_tx(pair, RING + 3)
    with pytest.raises(RingError, match="head"):
        pair.net.pop_tx(pair.tx, 8)


def test_avail_index_jump_beyond_ring_size_breaks_it(pair):
    pair.tx_q.set_avail_idx(RING + 1)
    with pytest.raises(RingError, match="avail index"):
        pair.net.pop_tx(pair.tx, 8)


def test_descriptor_loop_breaks_it(pair):
    gpa = pair.ram.alloc(64)
    pair.tx_q.write_desc(0, gpa, 16, VIRTQ_DESC_F_NEXT, 1)
    pair.tx_q.write_desc(1, gpa, 16, VIRTQ_DESC_F_NEXT, 0)
    offer_tx(pair)
    with pytest.raises(RingError, match="loops"):
        pair.net.pop_tx(pair.tx, 8)


def test_zero_length_and_out_of_memory_buffers_break_it(pair):
    pair.tx_q.write_desc(0, 0, 0, 0, 0)
    offer_tx(pair)
    with pytest.raises(RingError, match="zero-length"):
        pair.net.pop_tx(pair.tx, 8)
    with Pair() as p:
        p.tx_q.write_desc(0, p.ram.size - 8, 64, 0, 0)
        offer_tx(p)
        with pytest.raises(RingError, match="outside guest memory"):
            p.net.pop_tx(p.tx, 8)


def test_nested_and_malformed_indirect_tables_break_it(pair):
    table = pair.ram.alloc(32, 16)
    pair.ram.write(table, b"\0" * 8 + (32).to_bytes(4, "little")
                   + VIRTQ_DESC_F_INDIRECT.to_bytes(2, "little") + b"\0\0" + b"\0" * 16)
    pair.tx_q.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    offer_tx(pair)
    with pytest.raises(RingError, match="indirect"):
        pair.net.pop_tx(pair.tx, 8)
    with Pair() as p:
        p.tx_q.write_desc(0, table, 20, VIRTQ_DESC_F_INDIRECT, 0)  # not a multiple of 16
        offer_tx(p)
        with pytest.raises(RingError, match="indirect table"):
            p.net.pop_tx(p.tx, 8)


def test_readable_after_writable_breaks_it(pair):
    gpa = pair.ram.alloc(64)
    pair.tx_q.write_desc(0, gpa, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
    pair.tx_q.write_desc(1, gpa + 16, 16, 0, 0)
    offer_tx(pair)
    with pytest.raises(RingError, match="after a writable"):
        pair.net.pop_tx(pair.tx, 8)


descriptor = st.tuples(
    st.one_of(st.integers(0, (1 << 22) + 4096), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 4096), st.integers(0, (1 << 32) - 1)),
    st.integers(0, 7),
    st.integers(0, RING + 2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    descs=st.lists(descriptor, min_size=1, max_size=RING),
    heads=st.lists(st.integers(0, RING + 2), min_size=1, max_size=8),
    avail_idx=st.integers(0, 0xFFFF),
    indirect_table=st.binary(max_size=128),
)
def test_hostile_rings_never_crash_or_hang(descs, heads, avail_idx, indirect_table):
    with Pair() as p:
        table = p.ram.alloc(128, 16)
        p.ram.write(table, indirect_table)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            if addr == 0 and flags & VIRTQ_DESC_F_INDIRECT:
                addr = table
            p.tx_q.write_desc(i, addr, length, flags, nxt)
        for slot, head in enumerate(heads):
            p.tx_q.set_avail_entry(slot, head)
        p.tx_q.set_avail_idx(avail_idx)
        hostile_pop(p)
        p.driver.rx.set_avail_idx(avail_idx)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            p.rx_q.write_desc(i, addr, length, flags | VIRTQ_DESC_F_WRITE, nxt)
        try:
            with deadline(2.0):
                p.net.push_rx(p.rx, deque([Frame(eth(1, 1500)), Frame(eth(2, 9000))]), 8)
        except RingError:
            pass


def test_chains_without_the_buffers_their_direction_needs_break_the_ring(pair):
    gpa = pair.ram.alloc(64)
    pair.tx_q.write_desc(0, gpa, 64, VIRTQ_DESC_F_WRITE, 0)  # TX chain, only writable
    offer_tx(pair)
    with pytest.raises(RingError, match="no readable"):
        pair.net.pop_tx(pair.tx, 8)
    pair.rx_q.write_desc(0, gpa, 64, 0, 0)  # RX chain, only readable
    pair.rx_q.set_avail_entry(0, 0)
    pair.rx_q.set_avail_idx(1)
    with pytest.raises(RingError, match="no writable"):
        pair.net.push_rx(pair.rx, deque([Frame(eth(1))]), 8)
