"""The vhost-user state machine, fed messages directly (no sockets): every order QEMU 7.2 and
DPDK virtio-user use, replies, NEED_REPLY acks, payload/fd validation, stop and restart."""

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from virtio.protocol import (
    DEVICE_FEATURES,
    PROTOCOL_FEATURES,
    Message,
    ProtocolError,
    VhostUserDevice,
    parse_header,
)
from virtio.spec import FLAG_NEED_REPLY, FLAG_VERSION, Feature, ProtocolFeature, Request, bit

# Each test runs over both ring walks, the Python reference and the native one.
pytestmark = pytest.mark.usefixtures("ring_walk")

RAM = 1 << 20
UVA = 0x7F00_0000_0000
RING = 256
NET_FEATURES = bit(Feature.VERSION_1) | bit(Feature.NET_MRG_RXBUF) | bit(Feature.RING_EVENT_IDX)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def msg(request: int, payload: bytes = b"", fds=(), need_reply=False) -> Message:
    flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return Message(int(request), flags, payload, list(fds))


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def memfd() -> int:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    return fd


def mem_table(fd: int, gpa: int = 0, size: int = RAM, uva: int = UVA, offset: int = 0):
    return msg(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack(
        "<QQQQ", gpa, size, uva, offset), [fd], need_reply=True)


def ring_addr(index: int) -> bytes:
    base = UVA + 0x10000 * (index + 1)
    desc, avail, used = base, base + 16 * RING, base + 0x8000
    return struct.pack("<IIQQQQ", index, 0, desc, used, avail, 0)


def reply_payload(reply: bytes) -> bytes:
    _request, flags, size = struct.unpack_from("<III", reply)
    assert flags == 0x5
    assert len(reply) == 12 + size
    return reply[12:]


def qemu_connect_block(dev: VhostUserDevice) -> None:
    assert reply_payload(dev.handle(msg(Request.GET_FEATURES))) == u64(DEVICE_FEATURES)
    assert reply_payload(dev.handle(msg(Request.GET_PROTOCOL_FEATURES))) == u64(
        PROTOCOL_FEATURES)
    assert dev.handle(msg(Request.SET_PROTOCOL_FEATURES, u64(PROTOCOL_FEATURES))) is None
    assert reply_payload(dev.handle(msg(Request.GET_QUEUE_NUM))) == u64(dev.queue_pairs)
    dev.handle(msg(Request.SET_OWNER))
    for q in (0, 1):
        dev.handle(msg(Request.SET_VRING_CALL, u64(q), [eventfd()]))
        dev.handle(msg(Request.SET_VRING_ERR, u64(q), [eventfd()]))
    # QEMU 7.2 enables pair 0 at every device reset, long before the rings exist.
    for q, on in ((0, 1), (1, 1), (2, 0), (3, 0)):
        dev.handle(msg(Request.SET_VRING_ENABLE, state(q, on)))


def qemu_start_block(dev: VhostUserDevice, features: int = NET_FEATURES) -> None:
    dev.handle(msg(Request.SET_FEATURES, u64(features | bit(Feature.PROTOCOL_FEATURES))))
    assert reply_payload(dev.handle(mem_table(memfd()))) == u64(0)
    for q in (0, 1):
        dev.handle(msg(Request.SET_VRING_NUM, state(q, RING)))
        dev.handle(msg(Request.SET_VRING_BASE, state(q, 0)))
        dev.handle(msg(Request.SET_VRING_ADDR, ring_addr(q)))
        dev.handle(msg(Request.SET_VRING_KICK, u64(q), [eventfd()]))
        dev.handle(msg(Request.SET_VRING_CALL, u64(q), [eventfd()]))
    for q, on in ((0, 1), (1, 1), (2, 0), (3, 0)):
        dev.handle(msg(Request.SET_VRING_ENABLE, state(q, on)))


def close_all(dev: VhostUserDevice) -> None:
    dev.close()
    for fd in dev.take_closing():
        os.close(fd)


@pytest.fixture
def dev() -> Iterator[VhostUserDevice]:
    """A device brought up in QEMU 7.2's order (connect block, start block), closed after."""
    device = VhostUserDevice("t")
    qemu_connect_block(device)
    qemu_start_block(device)
    yield device
    close_all(device)


def test_qemu_72_order_brings_pair_zero_live():
    dev = VhostUserDevice("t")
    qemu_connect_block(dev)
    assert not dev.live_queues()
    qemu_start_block(dev)
    assert [q.index for q in dev.live_queues()] == [0, 1]
    assert dev.net is not None and dev.net.mergeable
    close_all(dev)


def test_dpdk_order_enables_rings_last():
    dev = VhostUserDevice("t")
    dev.handle(msg(Request.SET_OWNER))
    dev.handle(msg(Request.GET_FEATURES))
    dev.handle(msg(Request.GET_PROTOCOL_FEATURES))
    dev.handle(msg(Request.SET_PROTOCOL_FEATURES, u64(PROTOCOL_FEATURES)))
    dev.handle(msg(Request.SET_FEATURES, u64(NET_FEATURES)))
    dev.handle(mem_table(memfd()))
    for q in (0, 1):
        dev.handle(msg(Request.SET_VRING_NUM, state(q, RING)))
        dev.handle(msg(Request.SET_VRING_BASE, state(q, 0)))
        dev.handle(msg(Request.SET_VRING_ADDR, ring_addr(q)))
        dev.handle(msg(Request.SET_VRING_KICK, u64(q), [eventfd()]))
    assert not dev.live_queues()  # protocol features negotiated: rings start disabled
    for q in (0, 1):
        dev.handle(msg(Request.SET_VRING_ENABLE, state(q, 1)))
    assert len(dev.live_queues()) == 2
    close_all(dev)


def test_without_protocol_features_rings_start_enabled():
    dev = VhostUserDevice("t")
    dev.handle(msg(Request.SET_FEATURES, u64(NET_FEATURES)))
    dev.handle(mem_table(memfd()))
    dev.handle(msg(Request.SET_VRING_NUM, state(1, RING)))
    dev.handle(msg(Request.SET_VRING_ADDR, ring_addr(1)))
    dev.handle(msg(Request.SET_VRING_KICK, u64(1), [eventfd()]))
    assert [q.index for q in dev.live_queues()] == [1]
    close_all(dev)


def test_get_vring_base_stops_the_ring_and_reports_the_index(dev):
    dev.vrings[1].queue.last_avail_idx = 77
    for fd in dev.take_closing():  # the call fds the start block replaced
        os.close(fd)
    ring_fds = sorted((dev.vrings[1].kick_fd, dev.vrings[1].call_fd))
    reply = dev.handle(msg(Request.GET_VRING_BASE, state(1, 0)))
    assert reply_payload(reply) == state(1, 77)
    assert [q.index for q in dev.live_queues()] == [0]
    assert sorted(dev.take_closing()) == ring_fds  # its kick and call, handed back for closing
    for fd in ring_fds:
        os.close(fd)


def test_reboot_replays_the_start_block_and_rings_come_back(dev):
    for q in (0, 1):
        dev.handle(msg(Request.GET_VRING_BASE, state(q, 0)))
    assert not dev.live_queues()
    for q, on in ((0, 1), (1, 1)):
        dev.handle(msg(Request.SET_VRING_ENABLE, state(q, on)))
    qemu_start_block(dev)
    assert [q.index for q in dev.live_queues()] == [0, 1]


def test_repeated_identical_memory_table_keeps_the_mapping(dev):
    memory = dev.memory
    queue = dev.vrings[0].queue
    dev.handle(mem_table(memfd()))
    assert dev.memory is memory and dev.vrings[0].queue is queue


def test_new_memory_table_while_running_rebuilds_queues_keeping_indices(dev):
    dev.vrings[1].queue.last_avail_idx = 5
    dev.handle(mem_table(memfd(), gpa=0x1000_0000))  # a different table
    queue = dev.vrings[1].queue
    assert queue is not None and queue.last_avail_idx == 5


def test_need_reply_is_acked_once_reply_ack_is_negotiated():
    dev = VhostUserDevice("t")
    assert dev.handle(msg(Request.SET_OWNER, need_reply=True)) is None
    dev.handle(msg(Request.SET_PROTOCOL_FEATURES, u64(bit(ProtocolFeature.REPLY_ACK))))
    reply = dev.handle(msg(Request.SET_VRING_ENABLE, state(0, 1), need_reply=True))
    assert reply == struct.pack("<III", Request.SET_VRING_ENABLE, 0x5, 8) + u64(0)
    # GET requests answer with their value, never an extra ack.
    reply = dev.handle(msg(Request.GET_QUEUE_NUM, need_reply=True))
    assert reply_payload(reply) == u64(dev.queue_pairs)


def test_failed_memory_mapping_is_acked_with_an_error_and_the_connection_survives():
    dev = VhostUserDevice("t")
    dev.handle(msg(Request.SET_PROTOCOL_FEATURES, u64(PROTOCOL_FEATURES)))
    fd = memfd()
    read_only = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # cannot be mapped shared+writable
    os.close(fd)
    reply = dev.handle(mem_table(read_only))
    assert reply_payload(reply) != u64(0)
    assert dev.memory is None
    for fd in dev.take_closing():
        os.close(fd)


def pipe_reader() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


@pytest.mark.parametrize(
    ("make_fd", "size", "offset", "why"),
    [
        (memfd, RAM + 4096, 0, "beyond its file"),
        (memfd, RAM, 4096, "beyond its file"),
        (pipe_reader, RAM, 0, "not a regular file"),
    ],
)
def test_memory_table_that_lies_about_its_files_closes_the_connection(make_fd, size, offset,
                                                                       why):
    dev = VhostUserDevice("t")
    dev.handle(msg(Request.SET_PROTOCOL_FEATURES, u64(PROTOCOL_FEATURES)))
    with pytest.raises(ProtocolError, match=why):
        dev.handle(mem_table(make_fd(), size=size, offset=offset))
    assert dev.memory is None
    for fd in dev.take_closing():
        os.close(fd)


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (msg(Request.SET_FEATURES, b"\0" * 4), "payload"),
        (msg(Request.SET_VRING_ADDR, b"\0" * 39), "payload"),
        (msg(Request.SET_VRING_NUM, state(0, 100)), "power of two"),
        (msg(Request.SET_VRING_NUM, state(0, 65536)), "power of two"),
        (msg(Request.SET_VRING_NUM, state(200, 256)), "queue 200"),
        (msg(Request.SET_VRING_KICK, u64(0)), "fds"),
        (msg(Request.SET_VRING_ENABLE, state(0, 7)), "SET_VRING_ENABLE"),
        (msg(Request.SET_FEATURES, u64(bit(Feature.VERSION_1) | bit(Feature.RING_PACKED))),
         "unoffered"),
        (msg(Request.SET_FEATURES, u64(bit(Feature.NET_MRG_RXBUF))), "legacy"),
        (msg(Request.SET_MEM_TABLE, struct.pack("<II", 9, 0) + b"\0" * 288), "regions"),
        (msg(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + b"\0" * 32), "fds"),
        (msg(Request.SET_LOG_BASE, u64(0)), "unsupported"),
        (msg(99), "unsupported"),
        (msg(Request.SET_VRING_BASE, state(0, 70000)), "16 bits"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(message, why):
    dev = VhostUserDevice("t")
    with pytest.raises(ProtocolError, match=why):
        dev.handle(message)


def test_every_fd_of_a_refused_message_is_handed_back_for_closing():
    dev = VhostUserDevice("t")
    fds = [eventfd(), eventfd()]
    with pytest.raises(ProtocolError):
        dev.handle(msg(Request.SET_VRING_KICK, u64(0), fds))
    assert sorted(dev.take_closing()) == sorted(fds)
    for fd in fds:
        os.close(fd)


def test_unexpected_fds_are_closed_not_kept():
    dev = VhostUserDevice("t")
    fd = eventfd()
    dev.handle(msg(Request.SET_OWNER, fds=[fd]))
    assert dev.take_closing() == [fd]
    os.close(fd)


def test_header_checks():
    assert parse_header(struct.pack("<III", 1, 1, 0)) == (1, 1, 0)
    with pytest.raises(ProtocolError, match="version"):
        parse_header(struct.pack("<III", 1, 2, 0))
    with pytest.raises(ProtocolError, match="reply"):
        parse_header(struct.pack("<III", 1, 5, 0))
    with pytest.raises(ProtocolError, match="payload"):
        parse_header(struct.pack("<III", 1, 1, 1 << 20))


def test_broken_device_stops_rings_until_the_driver_resets_it(dev):
    dev.latch_broken("test")
    assert not dev.live_queues()
    for q in (0, 1):
        dev.handle(msg(Request.GET_VRING_BASE, state(q, 0)))
    qemu_start_block(dev)
    assert dev.broken is None and len(dev.live_queues()) == 2


def test_mem_table_is_mapped_from_offset_zero_plus_mmap_offset():
    fd = memfd()
    with mmap.mmap(fd, RAM) as m:
        m[4096:4100] = b"ABCD"
    dev = VhostUserDevice("t")
    dev.handle(mem_table(fd, size=RAM - 4096, offset=4096))
    assert bytes(dev.memory.gpa(0, 4)) == b"ABCD"
    close_all(dev)


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                      Request.SET_VRING_ERR], ids=lambda r: r.name)
@pytest.mark.parametrize("kind", ["pipe", "memfd"])
def test_a_ring_fd_that_is_not_an_eventfd_closes_the_connection(request_, kind):
    # The shell writes call fds and reads kick fds on the event loop: a pipe the front-end
    # filled would block it.
    dev = VhostUserDevice("t")
    if kind == "pipe":
        keep, fd = os.pipe()
    else:
        keep, fd = None, memfd()
    with pytest.raises(ProtocolError, match="not an eventfd"):
        dev.handle(msg(request_, u64(1), [fd]))
    assert dev.take_closing() == [fd]
    os.close(fd)
    if keep is not None:
        os.close(keep)


def test_a_blocking_eventfd_is_kept_non_blocking():
    dev = VhostUserDevice("t")
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as a front-end may send it
    dev.handle(msg(Request.SET_VRING_CALL, u64(1), [fd]))
    assert dev.vrings[1].call_fd == fd
    assert not os.get_blocking(fd)
    dev.close()
    assert dev.take_closing() == [fd]
    os.close(fd)
