"""The Trio shell end to end over real unix sockets: a hub with vhost-user ports, driven by the
model front-end (tests/support/virtio_driver.py) in QEMU's and DPDK's orders.  Frames cross
the switch; reconnects, reboots, client mode, protocol violations and broken rings each
affect only their own device."""

import os
import struct
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from netstack.frame import Frame
from tests.support.virtio_driver import (
    VIRTQ_DESC_F_NEXT,
    BringUpOrder,
    GuestRam,
    VhostUserDisconnected,
    VhostUserFrontend,
)
from tunnel.control import query
from tunnel.hub import Hub, HubConfig
from virtio.backend import VirtioNetPort
from virtio.spec import Request

# Each test runs over both ring walks, the Python reference and the native one.
pytestmark = pytest.mark.usefixtures("ring_walk")

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
BROADCAST = b"\xff" * 6


def eth(dst: bytes, src: bytes, n: int, size: int = 100) -> bytes:
    # EtherType 0x88b5 (local experimental): the switch's IP policies have nothing to check.
    return dst + src + b"\x88\xb5" + bytes([n & 0xFF]) * (size - 14)


@asynccontextmanager
async def running_hub(tmp_path, names=("a", "b"), client=()):
    config = HubConfig(
        sockets=[str(tmp_path / f"{n}.sock") for n in names],
        client_sockets=[str(tmp_path / f"{n}.sock") for n in client],
        control=str(tmp_path / "control"),
    )
    hub = Hub(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        yield hub
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def guest(path, order=BringUpOrder.QEMU_7_2, **kw):
    with GuestRam(1 << 22) as ram:
        async with VhostUserFrontend.connect(path, ram, order=order, **kw) as fe:
            fe.net.post_rx(128, 2048)
            fe.kick(0)
            await trio.testing.wait_all_tasks_blocked()  # the hub has applied every message
            yield fe


def post_rx(fe: VhostUserFrontend, count: int = 16) -> None:
    """Post `count` RX buffers and kick the RX queue: the buffers are there now."""
    fe.net.post_rx(count)
    fe.kick(0)


async def send(fe: VhostUserFrontend, frames: list[bytes]) -> None:
    fe.net.send(frames)
    fe.kick(1)


async def receive(fe: VhostUserFrontend, count: int, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    rx = fe.queues[0]
    with trio.fail_after(timeout):
        while len(got) < count:
            got.extend(frame for _, frame in fe.net.receive())
            if len(got) >= count:
                break
            # Like Linux virtqueue_enable_cb: ask for an interrupt at the next used entry,
            # then look once more before sleeping.
            rx.set_used_event(rx.used_idx())
            got.extend(frame for _, frame in fe.net.receive())
            if len(got) < count:
                await fe.wait_call(0, timeout)
    return got


async def learn(a: VhostUserFrontend, b: VhostUserFrontend) -> None:
    """Each guest says hello once, so the switch knows both MACs."""
    await send(a, [eth(BROADCAST, MAC_A, 0)])
    await receive(b, 1)
    await send(b, [eth(BROADCAST, MAC_B, 0)])
    await receive(a, 1)


@pytest.mark.parametrize("order", list(BringUpOrder))
async def test_frames_cross_the_hub_between_two_guests(tmp_path, order):
    async with running_hub(tmp_path) as hub:
        async with guest(tmp_path / "a.sock", order) as a, guest(tmp_path / "b.sock", order) as b:
            await learn(a, b)
            frames = [eth(MAC_B, MAC_A, i, 60 + i * 13) for i in range(100)]
            for chunk in range(0, 100, 20):
                await send(a, frames[chunk : chunk + 20])
                await trio.sleep(0)
            assert await receive(b, 100) == frames
            replies = [eth(MAC_A, MAC_B, i) for i in range(10)]
            await send(b, replies)
            assert await receive(a, 10) == replies
            ports = {p.name: p.counters for p in hub.switch.ports}
            assert ports["a.sock"].in_frames == 101
            assert ports["b.sock"].out_frames == 101
            state = await trio.to_thread.run_sync(query, str(tmp_path / "control"))
            assert state["ok"] and {p["name"] for p in state["ports"]} == {"a.sock", "b.sock"}
            assert all(p["link_up"] for p in state["ports"])


async def test_guest_that_posts_buffers_late_still_gets_its_frames(tmp_path):
    async with running_hub(tmp_path):
        with GuestRam(1 << 22) as ram:
            async with guest(tmp_path / "a.sock") as a, VhostUserFrontend.connect(
                tmp_path / "b.sock", ram
            ) as b:
                await send(b, [eth(BROADCAST, MAC_B, 0)])
                await receive(a, 1)
                await send(a, [eth(MAC_B, MAC_A, i) for i in range(5)])
                await trio.testing.wait_all_tasks_blocked()
                post_rx(b)
                assert len(await receive(b, 5)) == 5


async def test_guest_reconnects_after_disconnect_and_reboot(tmp_path):
    async with running_hub(tmp_path) as hub:
        async with guest(tmp_path / "a.sock") as a:
            async with guest(tmp_path / "b.sock") as b:
                await learn(a, b)
            # b disconnected (QEMU died): the socket accepts the next connection
            async with guest(tmp_path / "b.sock") as b:
                await send(b, [eth(BROADCAST, MAC_B, 1)])
                await receive(a, 1)
                await send(a, [eth(MAC_B, MAC_A, 2)])
                assert len(await receive(b, 1)) == 1
                bases = await b.reboot()
                assert bases[1] == 1  # one TX chain consumed before the reboot
                b.net.post_rx(32)
                b.kick(0)
                await send(a, [eth(MAC_B, MAC_A, 3)])
                assert await receive(b, 1) == [eth(MAC_B, MAC_A, 3)]
        port_b = next(p for p in hub.switch.ports if p.name == "b.sock")
        assert port_b.connections == 2


async def test_client_mode_backend_dials_a_listening_front_end(tmp_path):
    async with running_hub(tmp_path, names=("a",), client=("c",)):
        with GuestRam(1 << 22) as ram:
            async with guest(tmp_path / "a.sock") as a, VhostUserFrontend.accept(
                tmp_path / "c.sock", ram, accept_timeout=10
            ) as c:
                post_rx(c)
                await send(a, [eth(BROADCAST, MAC_A, 1)])
                assert len(await receive(c, 1)) == 1


async def test_protocol_violation_closes_only_that_connection(tmp_path):
    async with running_hub(tmp_path):
        async with guest(tmp_path / "a.sock") as a, guest(tmp_path / "b.sock") as b:
            await learn(a, b)
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.connect(str(tmp_path / "a.sock"))
            # a second front-end on a busy socket is refused (after a short grace period)
            assert await sock.recv(1) == b""
            sock.close()
            # a's own connection sends garbage: wrong payload size for SET_FEATURES
            with pytest.raises((VhostUserDisconnected, OSError, trio.BrokenResourceError)):
                await a.request(Request.SET_FEATURES, b"\0\0\0", need_reply=True)
                await a.request(Request.GET_FEATURES)
            await send(b, [eth(MAC_A, MAC_B, 5)])
            async with guest(tmp_path / "a.sock") as a2:
                await send(b, [eth(BROADCAST, MAC_B, 6)])
                assert len(await receive(a2, 1)) == 1


async def latched_broken(hub: Hub, name: str) -> VirtioNetPort:
    """The hub's port `name`, once its device has latched broken (within 5 s)."""
    port = next(p for p in hub.switch.ports if p.name == name)
    with trio.fail_after(5):
        while port.device.broken is None:
            await trio.sleep(0.01)
    return port


def _open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def _guest_mappings() -> int:
    with open(f"/proc/{os.getpid()}/maps") as maps:
        return sum(1 for line in maps if "memfd:" in line)


async def test_hostile_ring_latches_only_its_device_broken(tmp_path):
    async with running_hub(tmp_path) as hub:
        async with guest(tmp_path / "a.sock") as a, guest(tmp_path / "b.sock") as b:
            await learn(a, b)
            tx = a.queues[1]
            gpa = a.ram.alloc(64)
            tx.write_desc(0, gpa, 16, VIRTQ_DESC_F_NEXT, 0)  # a descriptor that loops
            avail_idx = a.ram.read_u16(tx.avail_gpa + 2)
            tx.set_avail_entry(avail_idx % tx.size, 0)
            tx.set_avail_idx((avail_idx + 1) & 0xFFFF)
            a.kick(1)
            port_a = await latched_broken(hub, "a.sock")
            assert "loops" in port_a.device.broken
            assert not port_a.link_up
            # b still talks to the hub; frames for a are dropped and counted
            await send(b, [eth(MAC_A, MAC_B, 1)])
            await trio.testing.wait_all_tasks_blocked()
            assert port_a.counters.drops["link_down"] >= 1
            state = await trio.to_thread.run_sync(query, str(tmp_path / "control"))
            assert next(p["broken"] for p in state["ports"] if p["name"] == "a.sock")
            # the driver resets the device (reboot): the latch clears and traffic resumes
            await a.reboot()
            post_rx(a)
            await send(b, [eth(BROADCAST, MAC_B, 2)])
            assert len(await receive(a, 1)) == 1


async def test_frames_for_a_waiting_guest_are_placed_by_the_task_that_switched_them(tmp_path):
    async with running_hub(tmp_path) as hub:
        async with guest(tmp_path / "a.sock") as a, guest(tmp_path / "b.sock") as b:
            await learn(a, b)
            await trio.testing.wait_all_tasks_blocked()  # a's RX task waits for frames
            port_a, port_b = (next(p for p in hub.switch.ports if p.name == f"{n}.sock")
                              for n in "ab")
            sent = port_a.counters.out_frames
            frames = [eth(MAC_A, MAC_B, i) for i in range(3)]
            # No await: the frames are in a's RX ring when forward returns.
            hub.switch.forward(port_b, [Frame(frame) for frame in frames])
            assert [frame for _, frame in a.net.receive()] == frames
            assert port_a.counters.out_frames == sent + 3
            assert not port_a.queue
            # The RX task still serves what the guest has no room for yet.
            a.net.receive()
            more = [eth(MAC_A, MAC_B, i) for i in range(200)]
            await send(b, more)
            got = await receive(a, 124)  # 128 posted, 4 taken
            post_rx(a, 128)
            got += await receive(a, 76)
            assert got == more


async def test_unexpected_fds_are_closed(tmp_path):
    async with running_hub(tmp_path):
        async with guest(tmp_path / "a.sock") as a:
            before = _open_fds()
            for _ in range(20):
                r, w = os.pipe()
                await a.request(Request.SET_OWNER, b"", fds=[r, w], need_reply=True)
                os.close(r)
                os.close(w)
            after = _open_fds()
            assert after <= before + 2
            assert struct.unpack("<Q", await a.request(Request.GET_QUEUE_NUM))[0] == 4


async def test_disconnects_free_every_mapping_and_fd(tmp_path):
    async with running_hub(tmp_path):
        async with guest(tmp_path / "a.sock") as a:
            await send(a, [eth(BROADCAST, MAC_A, 0)])
        await trio.testing.wait_all_tasks_blocked()
        fds, mappings = _open_fds(), _guest_mappings()
        for round_ in range(5):
            async with guest(tmp_path / "a.sock") as a:
                await send(a, [eth(BROADCAST, MAC_A, round_)])
                await trio.testing.wait_all_tasks_blocked()
                assert _guest_mappings() > mappings  # the hub mapped this guest's memory
            await trio.testing.wait_all_tasks_blocked()
        assert _open_fds() == fds
        assert _guest_mappings() == mappings


async def test_memory_table_change_while_rings_run(tmp_path):
    """Memory hotplug: a second region appears while traffic flows; rings keep their place."""
    async with running_hub(tmp_path):
        async with guest(tmp_path / "a.sock") as a, guest(tmp_path / "b.sock") as b:
            await learn(a, b)
            with GuestRam(1 << 20, gpa_base=1 << 30, uva_base=0x7E00_0000_0000) as extra:
                table = a.ram.memory_table() + extra.memory_table()
                payload = struct.pack("<II", len(table), 0) + b"".join(
                    struct.pack("<QQQQ", *region) for region in table)
                await a.request(Request.SET_MEM_TABLE, payload,
                                fds=a.ram.region_fds() + extra.region_fds(), need_reply=True)
                frames = [eth(MAC_B, MAC_A, i) for i in range(20)]
                await send(a, frames)
                assert await receive(b, 20) == frames
                await send(b, [eth(MAC_A, MAC_B, 1)])
                assert len(await receive(a, 1)) == 1


async def test_hostile_rx_ring_breaks_its_device_while_frames_flow(tmp_path):
    async with running_hub(tmp_path) as hub:
        async with guest(tmp_path / "a.sock") as a, guest(tmp_path / "b.sock") as b:
            await learn(a, b)
            rx = a.queues[0]
            avail_idx = a.ram.read_u16(rx.avail_gpa + 2)
            # Everything posted so far is still available (only one frame was delivered):
            # turn the next head into a descriptor whose buffer lies outside guest memory.
            head = a.ram.read_u16(rx.avail_gpa + 4 + 2 * ((avail_idx - 127) % rx.size))
            rx.write_desc(head, a.ram.size + 4096, 2048, 2, 0)
            await send(b, [eth(MAC_A, MAC_B, i) for i in range(50)])
            port_a = await latched_broken(hub, "a.sock")
            assert "outside guest memory" in port_a.device.broken
            # the TX side of the broken device is stopped too, and the hub serves b
            await send(a, [eth(MAC_B, MAC_A, 1)])
            await send(b, [eth(BROADCAST, MAC_B, 2)])
            await trio.testing.wait_all_tasks_blocked()
            assert not port_a.link_up
            assert port_a.device.live_queues() == []
