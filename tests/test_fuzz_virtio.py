"""Bounded fuzzers for everything a guest or front-end hands the vhost-user device:
(a) vhost-user messages straight into VhostUserDevice.handle (random and mutated requests,
payload sizes, fd counts and kinds, region tables), with the rings they set up exercised;
(b) hostile rings through NetQueues.pop_tx/push_rx over the model guest (indirect tables,
giant lengths, loops, buffers across regions, mergeable RX with tiny buffers).

What must hold: every call returns or raises the one error its layer may raise (ProtocolError,
RingError), within a deadline; every frame is accounted for (out, dropped by reason, or still
queued); every fd handed in is kept or handed back; nothing leaks.  The default run takes
seconds; VHOSTVPN_FUZZ_EXAMPLES=100000 makes it a long run, which VHOSTVPN_FUZZ_SECONDS
bounds per test (`make fuzz`; tests/support/fuzzing.py).
"""

import os
import random
import struct
from collections import deque

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from netstack.frame import HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_LEN, Frame
from tests.support.deadline import Hang, deadline
from tests.support.fuzzing import bounded_given, examples
from tests.support.virtio_driver import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DriverQueue,
    GuestRam,
    NetDriver,
)
from virtio.memory import GuestMemory, RegionSpec
from virtio.net import NetQueues
from virtio.protocol import DEVICE_FEATURES, Message, ProtocolError, VhostUserDevice
from virtio.spec import (
    FLAG_NEED_REPLY,
    FLAG_VERSION,
    MAX_FRAME,
    MAX_INDIRECT_ENTRIES,
    Feature,
    Request,
    bit,
)
from virtio.vring import WALK_BUDGET, RingError, SplitQueue

# The fuzzers run over both ring walks, the Python reference and the native one (the
# differential fuzzer below drives both at once).
BOTH_WALKS = pytest.mark.usefixtures("ring_walk")

FUZZ_EXAMPLES = examples(200)
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Wall-clock bound on one call into the device: far above the ~2 ms a batch may cost.
DEADLINE_SECONDS = 2.0

RING = 64
REGION = 1 << 21  # two regions of 2 MiB, contiguous in guest-physical space
KiB = 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- (b) hostile rings ------------------------------------------------------------------------

class Guest:
    """Two regions, a TX and an RX ring, a pool of bytes straddling the region boundary and
    four indirect tables; the device side of both rings."""

    def __init__(self, seed: int, mergeable: bool, *, gpa_base: int = 0,
                 native: bool | None = None) -> None:
        self.ram = GuestRam.multi([REGION, REGION], gpa_base=gpa_base)
        self.native = native
        rng = random.Random(seed)
        self.tx_q = DriverQueue(self.ram, RING, event_idx=True, indirect=True)
        self.rx_q = DriverQueue(self.ram, RING, event_idx=True, indirect=True)
        self.driver = NetDriver(self.rx_q, self.tx_q, mrg_rxbuf=mergeable)
        self.boundary = self.ram.regions[1].gpa
        self.pool = self.ram.reserve(self.boundary - 96 * KiB, 192 * KiB)
        # Zeros (plain headers) up to the boundary, random bytes after it.
        self.ram.write(self.pool + 96 * KiB, rng.randbytes(96 * KiB))
        self.tables = [self.ram.alloc(MAX_INDIRECT_ENTRIES * 16, 16) for _ in range(4)]
        specs = [RegionSpec(*r) for r in self.ram.memory_table()]
        self.fds = [os.dup(fd) for fd in self.ram.region_fds()]  # the back-end's copies
        self.memory = GuestMemory(specs, self.fds)
        features = DEVICE_FEATURES
        if not mergeable:
            features &= ~bit(Feature.NET_MRG_RXBUF)
        self.net = NetQueues(features)
        self.tx = self.device_queue(self.tx_q, 1)
        self.rx = self.device_queue(self.rx_q, 0)

    def device_queue(self, q: DriverQueue, index: int) -> SplitQueue:
        return SplitQueue(index, RING, self.memory, q.desc_uva, q.avail_uva, q.used_uva, 0,
                          event_idx=True, indirect=True, native=self.native)

    def address(self, kind: int, offset: int) -> int:
        """A guest address of some kind: pool, region boundary, indirect table, raw."""
        if kind == 0:
            return self.pool + offset % (192 * KiB)
        if kind == 1:
            return self.boundary - 64 + offset % 128
        if kind in (2, 3, 4, 5):
            return self.tables[kind - 2] + 16 * (offset % MAX_INDIRECT_ENTRIES)
        if kind == 7:  # the last bytes of guest memory (of the address space, at the top)
            last = self.ram.regions[-1]
            return last.gpa + last.size - 1 - offset % 8192
        return offset  # anything, in or out of guest memory

    def close(self) -> None:
        self.tx.release()
        self.rx.release()
        self.memory.close()
        for fd in self.fds:
            os.close(fd)
        self.ram.close()


lengths = st.one_of(
    st.integers(1, 2048),
    st.integers(1, 64).map(lambda entries: 16 * entries),  # an indirect table's length
    st.sampled_from([0, VIRTIO_NET_HDR_LEN - 1, VIRTIO_NET_HDR_LEN + 13,
                     VIRTIO_NET_HDR_LEN + 14, 16 * 1024, VIRTIO_NET_HDR_LEN + MAX_FRAME,
                     VIRTIO_NET_HDR_LEN + MAX_FRAME + 1, 1 << 23, 1 << 31, (1 << 32) - 1]),
)
descriptors = st.tuples(
    st.integers(0, 7),  # address kind
    st.one_of(st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1)),  # offset / raw address
    lengths,
    st.sampled_from([0, 0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_WRITE,
                     VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT, 7]),
    st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),  # next
)
tables = st.lists(descriptors, max_size=MAX_INDIRECT_ENTRIES)


def write_descriptors(guest: Guest, q: DriverQueue, ring: list, indirect: list[list],
                      write_flag: int) -> None:
    for i in range(RING):  # past the drawn ones: plain 64-byte buffers in the pool
        kind, offset, length, flags, nxt = ring[i] if i < len(ring) else (0, 64 * i, 64, 0, 0)
        q.write_desc(i, guest.address(kind, offset), length, flags | write_flag, nxt)
    for table, entries in zip(guest.tables, indirect, strict=False):
        blob = b"".join(
            struct.pack("<QIHH", guest.address(kind, offset) & ((1 << 64) - 1), length,
                        flags | write_flag, nxt)
            for kind, offset, length, flags, nxt in entries)
        guest.ram.write(table, blob)


def publish_raw(q: DriverQueue, heads: list[int], avail_idx: int | None) -> None:
    for slot, head in enumerate(heads[:RING]):
        q.set_avail_entry(slot, head)
    q.set_avail_idx(len(heads) if avail_idx is None else avail_idx)


@BOTH_WALKS
@bounded_given(
    FUZZ,
    seed=st.integers(0, 1 << 32),
    ring=st.lists(descriptors, min_size=1, max_size=RING),
    indirect=st.lists(tables, max_size=4),
    heads=st.lists(st.one_of(st.integers(0, 8), st.integers(0, RING + 2)), min_size=1,
                   max_size=RING),
    avail_idx=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF)),
)
def test_hostile_tx_rings_break_only_the_ring_and_account_for_every_chain(
        seed, ring, indirect, heads, avail_idx):
    guest = Guest(seed, mergeable=True)
    try:
        write_descriptors(guest, guest.tx_q, ring, indirect, 0)
        publish_raw(guest.tx_q, heads, avail_idx)
        for _ in range(RING + 1):
            before = guest.tx.last_avail_idx
            drops = sum(guest.net.drops.values())
            try:
                with deadline(DEADLINE_SECONDS):
                    frames = guest.net.pop_tx(guest.tx, 256)
            except RingError as exc:
                event(f"TX ring broken: {ring_error_kind(exc)}")
                break
            if frames:
                event("TX frames came out")
            popped = (guest.tx.last_avail_idx - before) & 0xFFFF
            assert popped == len(frames) + sum(guest.net.drops.values()) - drops
            assert all(14 <= len(f.data) <= MAX_FRAME for f in frames)
            assert guest.tx.walked < WALK_BUDGET + 2 * MAX_INDIRECT_ENTRIES + RING
            if not popped:
                break
    finally:
        for reason in guest.net.drops:
            event(f"dropped: {reason}")
        guest.close()


@BOTH_WALKS
@bounded_given(
    FUZZ,
    seed=st.integers(0, 1 << 32),
    ring=st.lists(descriptors, min_size=1, max_size=RING),
    indirect=st.lists(tables, max_size=4),
    heads=st.lists(st.integers(0, RING + 2), min_size=1, max_size=RING),
    avail_idx=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF)),
    sizes=st.lists(st.integers(14, MAX_FRAME + 2), min_size=1, max_size=12),
    mergeable=st.booleans(),
)
def test_hostile_rx_rings_break_only_the_ring_and_account_for_every_frame(
        seed, ring, indirect, heads, avail_idx, sizes, mergeable):
    guest = Guest(seed, mergeable=mergeable)
    try:
        write_descriptors(guest, guest.rx_q, ring, indirect, VIRTQ_DESC_F_WRITE)
        publish_raw(guest.rx_q, heads, avail_idx)
        frames = deque(Frame(bytes(size)) for size in sizes)
        if push_until_stuck(guest, frames, len(sizes)):
            event("RX frames delivered")
    finally:
        for reason in guest.net.drops:
            event(f"dropped: {reason}")
        guest.close()


def ring_error_kind(exc: RingError) -> str:
    """The message without its numbers, for the statistics."""
    return " ".join(w for w in str(exc).split()[2:6] if not any(c.isdigit() for c in w))


def push_until_stuck(guest: Guest, frames: deque, total: int) -> int:
    """push_rx until no frame moves; returns frames delivered.  Every frame is accounted for."""
    delivered = 0
    for _ in range(total + 2):
        queued = len(frames)
        try:
            with deadline(DEADLINE_SECONDS):
                delivered += guest.net.push_rx(guest.rx, frames, 8)[0]
        except RingError as exc:
            event(f"RX ring broken: {ring_error_kind(exc)}")
            return delivered
        assert delivered + sum(guest.net.drops.values()) + len(frames) == total
        if len(frames) == queued:
            break
    return delivered


@BOTH_WALKS
@bounded_given(
    FUZZ,
    buffers=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 96)), min_size=1,
                     max_size=RING),
    sizes=st.lists(st.one_of(st.integers(14, 200), st.integers(14, MAX_FRAME + 2)),
                   min_size=1, max_size=10),
    indirect=st.booleans(),
    fill=st.booleans(),
)
def test_mergeable_rx_over_tiny_buffers_delivers_exact_frames_or_drops_them(
        buffers, sizes, indirect, fill):
    """A well-formed but stingy guest: chains of 1-3 buffers of 1-96 bytes (each chain holds
    at least a virtio-net header, as the spec asks of a mergeable driver), some or all of
    the descriptors it has.  What arrives is
    exactly what was sent, in order; what cannot fit all the room the guest can ever offer
    is dropped, never left blocking the queue."""
    guest = Guest(0, mergeable=True)
    try:
        if fill:  # the guest offers every descriptor it has
            buffers = (buffers * RING)[:RING]
        for count, size in buffers:
            if not indirect and count > guest.rx_q.free_descriptors:
                break  # the driver is out of descriptors with fewer than RING chains posted
            size = max(size, -(-VIRTIO_NET_HDR_LEN // count))
            guest.rx_q.add_chain([], [size] * count, indirect=indirect)
        guest.rx_q.publish()
        frames = deque(Frame(bytes([n]) * size) for n, size in enumerate(sizes))
        push_until_stuck(guest, frames, len(sizes))
        got = [data for _, data in guest.driver.receive()]
        event("all delivered" if len(got) == len(sizes) else "some delivered" if got else "none")
        for reason in guest.net.drops:
            event(f"dropped: {reason}")
        sent = [bytes([n]) * size for n, size in enumerate(sizes)]
        assert got == [f for f in sent if f in got]  # in order, byte for byte
        assert len(got) + sum(guest.net.drops.values()) + len(frames) == len(sizes)
        if frames:  # waiting for more buffers is only fair if the guest could add some
            assert not guest.rx.driver_descriptors_exhausted()
            assert guest.net.drops.keys() <= {"rx_ring_too_small", "rx_oversize",
                                              "rx_too_fragmented"}
    finally:
        guest.close()


# -- (a) vhost-user messages into the device --------------------------------------------------

RAM = 1 << 20
UVA = 0x7F00_0000_0000
FD_KINDS = ("eventfd", "memfd", "short_memfd", "pipe")
HANDLED = [Request.GET_FEATURES, Request.SET_FEATURES, Request.SET_OWNER, Request.RESET_OWNER,
           Request.SET_MEM_TABLE, Request.SET_VRING_NUM, Request.SET_VRING_ADDR,
           Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_KICK,
           Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.GET_PROTOCOL_FEATURES,
           Request.SET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM, Request.SET_VRING_ENABLE]
requests = st.one_of(st.sampled_from(HANDLED), st.sampled_from(HANDLED),
                     st.sampled_from(list(Request)), st.integers(0, 64))
region = st.tuples(
    st.sampled_from([0, RAM, 1 << 32, (1 << 64) - 4096]),  # gpa
    st.sampled_from([0, 4096, RAM, RAM + 4096, 1 << 40]),  # size
    st.sampled_from([UVA, UVA + RAM, (1 << 64) - 4096]),  # uva
    st.sampled_from([0, 4096, RAM, (1 << 64) - 1]),  # mmap_offset
)


@st.composite
def payloads(draw, request: int) -> bytes:
    """A well-formed payload for `request` with hostile values, or random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300))
    small = st.integers(0, 9)
    u32 = st.one_of(small, st.integers(0, (1 << 32) - 1))
    u64 = st.one_of(small, st.sampled_from([UVA, UVA + 0x1000, UVA + RAM - 8]),
                    st.integers(0, (1 << 64) - 1))
    if request == Request.SET_MEM_TABLE:
        regions = draw(st.lists(region, max_size=9))
        count = draw(st.one_of(st.just(len(regions)), st.integers(0, 10)))
        return struct.pack("<II", count, 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)
    if request == Request.SET_VRING_ADDR:
        return struct.pack("<IIQQQQ", draw(small), draw(u32), draw(u64), draw(u64), draw(u64),
                           draw(u64))
    if request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
                   Request.SET_VRING_ENABLE):
        num = draw(st.one_of(st.sampled_from([0, 1, 64, 256, 1 << 15, 1 << 16]), u32))
        return struct.pack("<II", draw(small), num)
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        return struct.pack("<Q", draw(st.one_of(small, st.sampled_from([0x100, 0x101, 0x200]))))
    if request == Request.SET_FEATURES:
        return struct.pack("<Q", draw(st.one_of(st.just(DEVICE_FEATURES),
                                                st.integers(0, DEVICE_FEATURES),
                                                st.integers(0, (1 << 64) - 1))))
    return draw(st.sampled_from([b"", struct.pack("<Q", draw(u64))]))


@st.composite
def messages(draw) -> tuple[int, int, bytes, list[str]]:
    request = draw(requests)
    flags = draw(st.sampled_from([FLAG_VERSION, FLAG_VERSION | FLAG_NEED_REPLY, 0, 0x7]))
    payload = draw(payloads(int(request)))
    fds = draw(st.lists(st.sampled_from(FD_KINDS), max_size=10))
    return int(request), flags, payload, fds


def make_fd(kind: str, rng: random.Random) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM if kind == "memfd" else 4096)
    os.pwrite(fd, rng.randbytes(256 * KiB if kind == "memfd" else 4096), 0)  # ring garbage
    return fd


def start_block(device: VhostUserDevice, memfd: int) -> list[Message]:
    """A sane bring-up to mutate from: features, memory, ring 0 and 1 live."""
    state = struct.Struct("<II")
    msgs = [Message(Request.SET_FEATURES, FLAG_VERSION, struct.pack("<Q", DEVICE_FEATURES)),
            Message(Request.SET_MEM_TABLE, FLAG_VERSION, struct.pack("<II", 1, 0)
                    + struct.pack("<QQQQ", 0, RAM, UVA, 0), [memfd])]
    for q in (0, 1):
        base = UVA + 0x10000 * (q + 1)
        msgs += [Message(Request.SET_VRING_NUM, FLAG_VERSION, state.pack(q, 64)),
                 Message(Request.SET_VRING_ADDR, FLAG_VERSION, struct.pack(
                     "<IIQQQQ", q, 0, base, base + 0x2000, base + 0x1000, 0)),
                 Message(Request.SET_VRING_KICK, FLAG_VERSION, struct.pack("<Q", q),
                         [os.eventfd(0, os.EFD_NONBLOCK)]),
                 Message(Request.SET_VRING_ENABLE, FLAG_VERSION, state.pack(q, 1))]
    return msgs


def exercise_rings(device: VhostUserDevice) -> None:
    """What the shell's ring tasks would do next, with the shell's guard."""
    for queue in device.live_queues():
        event("a ring went live")
        try:
            if queue.index % 2:
                device.net.pop_tx(queue, 64)
            else:
                device.net.push_rx(queue, deque([Frame(bytes(1500))]), 8)
        except RingError as exc:
            event("a ring broke")
            device.latch_broken(str(exc))


# The messages are handled the same whichever walk serves the rings they set up: half the
# examples under each walk still give the protocol layer as many as the other fuzzers get.
FRONT_END = settings(FUZZ, max_examples=max(FUZZ_EXAMPLES // 2, 1))


@BOTH_WALKS
@bounded_given(FRONT_END, seed=st.integers(0, 1 << 32), sane_start=st.booleans(),
               script=st.lists(messages(), min_size=1, max_size=25))
def test_hostile_front_end_messages_raise_only_protocol_errors_and_leak_nothing(
        seed, sane_start, script):
    rng = random.Random(seed)
    baseline = open_fds()
    device = VhostUserDevice("fuzz")
    pending: list[Message] = []
    try:
        pending += start_block(device, make_fd("memfd", rng)) if sane_start else []
        pending += [Message(request, flags, payload, [make_fd(kind, rng) for kind in fds])
                    for request, flags, payload, fds in script]
        while pending:
            msg = pending.pop(0)
            fds = list(msg.fds)
            try:
                with deadline(DEADLINE_SECONDS):
                    reply = device.handle(msg)
                    exercise_rings(device)
            except ProtocolError:
                event("a message closed the connection")
                break  # the shell closes the connection: nothing after it is read
            assert reply is None or struct.unpack_from("<III", reply)[1] == 0x5
            closing = device.take_closing()
            kept = {v.kick_fd for v in device.vrings} | {v.call_fd for v in device.vrings} \
                | {v.err_fd for v in device.vrings}
            assert set(fds) <= set(closing) | kept  # every fd kept or handed back
            for fd in closing:
                os.close(fd)
    finally:
        for msg in pending:  # never read: the connection was closed before them
            for fd in msg.fds:
                os.close(fd)
        device.close()
        for fd in device.take_closing():
            os.close(fd)
    assert open_fds() == baseline
    assert device.memory is None


def test_the_fuzzers_deadline_interrupts_a_busy_loop():
    with pytest.raises(Hang), deadline(0.05):
        while True:
            pass


# -- (c) the native ring walk against the Python reference -------------------------------------

TOP = (1 << 64) - 2 * REGION  # guest memory ending exactly at the top of the address space
frame_data = st.one_of(
    st.integers(0, MAX_FRAME + 2).map(lambda size: bytes([size & 0xFF]) * size),
    st.integers(14, 2000).map(lambda size: bytearray([size & 0xFF]) * size),
    st.integers(7, 1000).map(lambda size: memoryview(bytes(2 * size)).cast("H")),  # not bytes
)
offloads = st.one_of(
    st.none(),
    st.tuples(*[st.sampled_from([0, 1, 0xFF, 0x100, 0xFFFF, 0x10000, -1])] * 6),
    st.tuples(st.sampled_from([0, HDR_F_NEEDS_CSUM]), st.sampled_from([0, 1, 3, 4, 0x80]),
              *[st.integers(0, 0xFFFF)] * 4),
)
queues = st.sampled_from(["tx", "rx"])
steps = st.one_of(
    st.tuples(st.just("pop_tx"), st.integers(0, 300)),
    st.tuples(st.just("push_rx"), st.lists(st.tuples(frame_data, offloads), max_size=12),
              st.integers(1, 16)),
    st.tuples(st.just("pop"), queues, st.integers(0, RING + 8)),
    st.tuples(st.just("desc"), queues, st.integers(0, RING - 1), descriptors),
    st.tuples(st.just("table"), st.integers(0, 3), tables, st.booleans()),
    st.tuples(st.just("avail"), queues, st.lists(st.integers(0, RING + 2), max_size=RING),
              st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF))),
)
heads = st.lists(st.one_of(st.integers(0, 8), st.integers(0, RING + 2)), max_size=RING)
# Two guests per example and guest memory compared after every step: a quarter of the
# examples of the other fuzzers takes about as long.
DIFFERENTIAL = settings(FUZZ, max_examples=max(FUZZ_EXAMPLES // 4, 1))


class Twins:
    """The same guest twice, one served by the Python walk, one by the native walk."""

    def __init__(self, seed: int, mergeable: bool, top: bool) -> None:
        base = TOP if top else 0
        self.guests = [Guest(seed, mergeable, gpa_base=base, native=False),
                       Guest(seed, mergeable, gpa_base=base, native=True)]
        self.regions = [{id(r.mm): k for k, r in enumerate(g.memory.regions)}
                        for g in self.guests]
        self.broken: set[str] = set()

    def close(self) -> None:
        for guest in self.guests:
            guest.close()


def spans_seen(regions: dict[int, int], spans: list) -> list[tuple[int, int, int]]:
    return [(regions[id(mm)], start, stop) for mm, start, stop in spans]


def run_step(twins: Twins, guest: Guest, regions: dict[int, int], step: tuple) -> object:
    """One step against one twin: what a caller could observe of it."""
    kind = step[0]
    if kind == "pop_tx":
        frames = guest.net.pop_tx(guest.tx, step[1])
        return [(bytes(f.data), tuple(f.offload)) for f in frames]
    if kind == "push_rx":
        frames = deque(Frame(data) if offload is None else Frame(data, offload)
                       for data, offload in step[1])
        result = guest.net.push_rx(guest.rx, frames, step[2])
        return result, [bytes(f.data) for f in frames]
    if kind == "pop":
        chains = (guest.tx if step[1] == "tx" else guest.rx).pop(step[2])
        return [(head, spans_seen(regions, r), spans_seen(regions, w)) for head, r, w in chains]
    # The guest rewrites its memory between our calls.
    if kind == "desc":
        _, name, index, (addr_kind, offset, length, flags, nxt) = step
        q = guest.tx_q if name == "tx" else guest.rx_q
        q.write_desc(index, guest.address(addr_kind, offset) & ((1 << 64) - 1), length, flags, nxt)
    elif kind == "table":
        _, which, entries, write = step
        write_flag = VIRTQ_DESC_F_WRITE if write else 0
        guest.ram.write(guest.tables[which], b"".join(
            struct.pack("<QIHH", guest.address(kind, offset) & ((1 << 64) - 1), length,
                        flags | write_flag, nxt)
            for kind, offset, length, flags, nxt in entries))
    elif kind == "avail":
        _, name, heads, avail_idx = step
        q = guest.tx_q if name == "tx" else guest.rx_q
        start = (guest.tx if name == "tx" else guest.rx).last_avail_idx
        for k, head in enumerate(heads):
            q.set_avail_entry((start + k) % RING, head)
        q.set_avail_idx((start + len(heads)) & 0xFFFF if avail_idx is None else avail_idx)
    return None


def observe(twins: Twins, index: int, step: tuple) -> tuple:
    guest = twins.guests[index]
    try:
        with deadline(DEADLINE_SECONDS):
            seen = run_step(twins, guest, twins.regions[index], step)
        error = None
    except RingError as exc:
        seen, error = None, str(exc)
    queues = [(q.last_avail_idx, q.used_idx,
               None if error is not None or name in twins.broken else q.walked)
              for name, q in (("tx", guest.tx), ("rx", guest.rx))]
    memory = [bytes(region.mapping) for region in guest.ram.regions]
    return seen, error, dict(guest.net.drops), queues, memory


def queue_of(step: tuple) -> str | None:
    return {"pop_tx": "tx", "push_rx": "rx", "pop": step[1] if step[0] == "pop" else None}.get(
        step[0])


@bounded_given(
    DIFFERENTIAL,
    seed=st.integers(0, 1 << 32),
    mergeable=st.booleans(),
    top=st.booleans(),
    tx_ring=st.lists(descriptors, max_size=RING),
    rx_ring=st.lists(descriptors, max_size=RING),
    indirect=st.lists(tables, max_size=4),
    tx_heads=heads,
    rx_heads=heads,
    script=st.lists(steps, min_size=1, max_size=10),
)
def test_native_and_python_walks_give_identical_results_on_hostile_rings(
        seed, mergeable, top, tx_ring, rx_ring, indirect, tx_heads, rx_heads, script):
    """Same frames, same used entries and guest memory, same RingError messages, same drops,
    same indexes and walked counts, step by step, while the guest rewrites descriptors,
    indirect tables and the avail ring between calls.  A ring that broke is not used again
    (the device latches it); `walked` is not compared after a RingError (it is reset before
    the next batch)."""
    twins = Twins(seed, mergeable, top)
    try:
        for guest in twins.guests:
            write_descriptors(guest, guest.tx_q, tx_ring, indirect, 0)
            write_descriptors(guest, guest.rx_q, rx_ring, indirect, VIRTQ_DESC_F_WRITE)
            publish_raw(guest.tx_q, tx_heads, None)
            publish_raw(guest.rx_q, rx_heads, None)
        for step in script:
            name = queue_of(step)
            if name in twins.broken:
                continue
            python, native = observe(twins, 0, step), observe(twins, 1, step)
            assert python[:4] == native[:4]
            assert python[4] == native[4], "guest memory differs"
            if python[1] is not None:
                event(f"ring broken: {ring_error_kind(RingError(python[1]))}")
                twins.broken.add(name)
            elif step[0] in ("pop_tx", "push_rx", "pop") and python[0]:
                event(f"{step[0]} moved something")
    finally:
        twins.close()

