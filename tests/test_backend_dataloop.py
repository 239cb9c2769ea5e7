"""The vhost-user rings on the data loop (virtio/dataloop.py), as the daemons run them: kicks
served straight from epoll without waking the ring tasks, and the guards that keep a handler
off a ring retired, restarted or given a new kick fd while the loop serves it.  Plain test
functions, each running a real DataLoop: pytest-trio's tests take serve_readable's fallback."""

import os
import struct
from collections import Counter

import pytest
import trio
import trio.testing

from netstack.frame import Frame
from tests.support.virtio_driver import (
    DEFAULT_NET_FEATURES,
    GuestRam,
    VhostUserFrontend,
    VirtioFeature,
)
from tests.test_backend_hostile import Collector, connected, eth, receive, served
from virtio import backend
from virtio.dataloop import DataLoop
from virtio.protocol import Message
from virtio.spec import FLAG_VERSION, Request

# Each test runs over both ring walks, the Python reference and the native one.
pytestmark = pytest.mark.usefixtures("ring_walk")


@pytest.fixture(autouse=True)
def no_repoll(monkeypatch) -> None:
    """Only kicks and frames move the rings: the lost-kick re-poll would hide a lost kick."""
    monkeypatch.setattr(backend, "REPOLL_SECONDS", 3600.0)


class RingSteps(trio.abc.Instrument):
    """Counts the steps Trio runs of the ring tasks (VhostUserServer._run_ring), in all and
    by the ring loop they run (`by_loop["_rx_loop"]`, `by_loop["_tx_loop"]`)."""

    def __init__(self) -> None:
        self.steps = 0
        self.by_loop: Counter[str] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("._run_ring"):
            self.steps += 1
            self.by_loop[task.coro.cr_frame.f_locals["loop"].__name__] += 1


def on_loop(main) -> DataLoop:
    """Run `main()` as a daemon does, on a DataLoop of its own; that loop, once done."""
    loop = DataLoop()

    async def bounded() -> None:
        with trio.fail_after(20):
            await main(loop)

    loop.run(bounded)
    return loop


def epoll_targets(loop: DataLoop) -> list[int]:
    """The fd numbers the loop's epoll set holds an entry for (/proc's view, not the loop's)."""
    with open(f"/proc/self/fdinfo/{loop._epoll.fileno()}") as info:
        return [int(line.split()[1]) for line in info if line.startswith("tfd:")]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def control(server, request: Request, payload: bytes, fds: list[int] | None = None) -> None:
    """What the control loop does with one message: handle it, then reconcile the ring
    tasks; no await in between, so the tasks it stops have not unwound yet."""
    device = server.port.device
    device.handle(Message(request, FLAG_VERSION, payload, fds or []))
    server._apply(device)


def test_tx_kicks_are_served_from_the_loop_without_waking_the_ring_task(tmp_path):
    async def main(loop: DataLoop) -> None:
        collector = Collector()
        async with served(tmp_path, collector) as server, connected(server) as fe:
            steps = RingSteps()
            trio.lowlevel.add_instrument(steps)
            for n in range(20):
                fe.net.send([eth(n)])
                fe.kick(1)
                await collector.wait_for(n + 1)
            trio.lowlevel.remove_instrument(steps)
            assert collector.frames == [eth(n) for n in range(20)]
            assert steps.steps == 0

    on_loop(main)


def test_rx_frames_waiting_for_buffers_are_placed_by_the_kick_handler(tmp_path):
    async def main(loop: DataLoop) -> None:
        async with served(tmp_path) as server, connected(server) as fe:
            steps = RingSteps()
            trio.lowlevel.add_instrument(steps)
            server.port.deliver([Frame(eth(n)) for n in range(3)])  # no buffers yet
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.port.queue) == 3
            fe.net.post_rx(2)
            fe.kick(0)
            assert await receive(fe, 2) == [eth(0), eth(1)]
            fe.net.post_rx(8)
            fe.kick(0)
            assert await receive(fe, 1) == [eth(2)]
            server.port.deliver([Frame(eth(3))])  # buffers are there: placed at once
            assert [frame for _, frame in fe.net.receive()] == [eth(3)]
            trio.lowlevel.remove_instrument(steps)
            assert steps.steps == 0

    on_loop(main)


@pytest.mark.parametrize("ring", [0, 1])
def test_a_kick_fd_replaced_while_served_is_forgotten_by_the_loop_before_it_is_closed(
        tmp_path, ring):
    """SET_VRING_KICK hands the device a new kick fd while a ring task, stopped but not yet
    unwound, serves the old one.  The front-end keeps its copy of the old eventfd (QEMU
    does), so closing ours while the loop serves it would leave a stale epoll entry that no
    unregister can reach, polled forever."""
    async def main(loop: DataLoop) -> None:
        collector = Collector()
        async with served(tmp_path, collector) as server, connected(server) as fe:
            device = server.port.device
            if ring == 0:  # the RX task serves ring 0's kicks while frames wait for buffers
                server.port.deliver([Frame(eth(0))])
            for _ in range(4):
                await trio.testing.wait_all_tasks_blocked()
                fds = open_fds()
                old = device.vrings[ring].kick_fd
                new = fe._new_eventfd(fe._kick_fds, ring)  # the front-end's copy
                control(server, Request.SET_VRING_KICK, struct.pack("<Q", ring), [os.dup(new)])
                assert device.vrings[ring].kick_fd not in (None, old)
                fe.kick(ring)  # the old ring task's handler may run before the task unwinds
                await trio.testing.wait_all_tasks_blocked()
                # The loop's epoll set holds its wake-up fd and the kick fds served now.
                assert sorted(epoll_targets(loop)) == sorted([loop._wake, *server._kick_served])
                assert loop.served == len(server._kick_served)
                assert open_fds() == fds + 1  # ours: new in, old out; the front-end's new one
                assert device.broken is None
            if ring == 0:
                fe.net.post_rx(4)
                fe.kick(0)
                assert await receive(fe, 1) == [eth(0)]
            else:
                fe.net.send([eth(1)])
                fe.kick(1)
                assert await collector.wait_for(1) == [eth(1)]

    on_loop(main)


def test_a_ring_restarted_on_the_same_kick_fd_is_served_by_one_task_at_a_time(tmp_path):
    """A new call fd restarts the ring's task on the same queue and kick fd; the stopped task
    still serves the fd until it unwinds, and the loop serves an fd once: the new task waits
    for it (it raised BusyResourceError, and the device latched broken)."""
    async def main(loop: DataLoop) -> None:
        collector = Collector()
        async with served(tmp_path, collector) as server, connected(server) as fe:
            device = server.port.device
            for round_ in range(8):  # Trio runs a batch in either order: each round a draw
                await trio.testing.wait_all_tasks_blocked()
                control(server, Request.SET_VRING_CALL, struct.pack("<Q", 1),
                        [os.dup(fe._new_eventfd(fe._call_fds, 1))])
                await trio.testing.wait_all_tasks_blocked()
                assert device.broken is None
                fe.net.send([eth(round_)])
                fe.kick(1)
                await collector.wait_for(round_ + 1)
            assert collector.frames == [eth(n) for n in range(8)]

    on_loop(main)


@pytest.mark.parametrize("ring", [0, 1])
def test_a_ring_retired_with_a_kick_pending_is_not_touched_by_its_handler(tmp_path, ring):
    """The guest kicks, and SET_VRING_ENABLE(0) retires the ring before the loop's next
    epoll_wait: the handler that kick reaches must leave the retired ring alone.  Had it
    popped, the frames would cross twice (again from the ring's base when re-enabled); had
    it placed, frames would land in a ring the device had already handed back."""
    async def main(loop: DataLoop) -> None:
        collector = Collector()
        async with served(tmp_path, collector) as server, connected(server) as fe:
            device = server.port.device
            if ring == 0:
                server.port.deliver([Frame(eth(0))])  # waits for buffers
                await trio.testing.wait_all_tasks_blocked()
            for round_ in range(4):
                queue = device.vrings[ring].queue
                if ring == 0:
                    fe.net.post_rx(1)
                else:
                    fe.net.send([eth(round_)])
                fe.kick(ring)
                control(server, Request.SET_VRING_ENABLE, struct.pack("<II", ring, 0))
                assert device.vrings[ring].queue is None
                await trio.testing.wait_all_tasks_blocked()
                assert device.broken is None
                if ring == 0:
                    assert len(server.port.queue) == 1
                    assert fe.net.receive() == []
                else:
                    assert len(collector.frames) == round_
                    assert queue.last_avail_idx == device.vrings[ring].base
                control(server, Request.SET_VRING_ENABLE, struct.pack("<II", ring, 1))
                if ring == 0:
                    assert await receive(fe, 1) == [eth(round_)]
                    server.port.deliver([Frame(eth(round_ + 1))])  # waits for the next round
                else:
                    await collector.wait_for(round_ + 1)
                    assert collector.frames == [eth(n) for n in range(round_ + 1)]
                await trio.testing.wait_all_tasks_blocked()

    on_loop(main)


def test_a_hostile_rx_ring_met_by_push_now_latches_its_device_at_once(tmp_path):
    """push_now meets the bad descriptor in whoever switched the frames; the RX task is
    parked on the loop, and the error must reach it (and the ring's guard) without a kick
    from the guest or the re-poll."""
    async def main(loop: DataLoop) -> None:
        async with served(tmp_path) as server, connected(server) as fe:
            device = server.port.device
            rx = fe.queues[0]
            (head,) = fe.net.post_rx(1)
            rx.write_desc(head, fe.ram.size + 4096, 2048, 2, 0)  # outside guest memory
            server.port.deliver([Frame(eth(1))])
            while device.broken is None:
                await trio.sleep(0.001)
            assert "outside guest memory" in device.broken
            await trio.testing.wait_all_tasks_blocked()
            assert not server.port.link_up and loop.served == 0

    on_loop(main)


@pytest.mark.parametrize("ring", [0, 1])
def test_a_ring_restarted_with_more_than_a_batch_waiting_gets_it_all_without_a_kick(
        tmp_path, monkeypatch, ring):
    """A (re)started ring task tries the ring at once, a batch per call: the calls after the
    first come from the loop only if the kick fd is readable, which no guest kick makes it
    here (the frames or buffers were posted while the ring was stopped)."""
    monkeypatch.setattr(backend, "BATCH", 4)

    async def main(loop: DataLoop) -> None:
        collector = Collector()
        async with served(tmp_path, collector) as server, connected(server) as fe:
            frames = [eth(n) for n in range(10)]
            if ring == 0:
                server.port.deliver([Frame(frame) for frame in frames])  # no buffers yet
                await trio.testing.wait_all_tasks_blocked()
                fe.net.post_rx(16)  # no kick: the guest sees kicks muted
                control(server, Request.SET_VRING_CALL, struct.pack("<Q", 0),
                        [os.dup(fe._new_eventfd(fe._call_fds, 0))])  # restarts the RX task
                assert await receive(fe, 10) == frames
            else:
                control(server, Request.SET_VRING_ENABLE, struct.pack("<II", 1, 0))
                fe.net.send(frames)
                control(server, Request.SET_VRING_ENABLE, struct.pack("<II", 1, 1))
                assert await collector.wait_for(10) == frames

    on_loop(main)


def guest_posts_in_the_window(monkeypatch, queue, at_call: int, post) -> None:
    """Run `post()` (the guest adding RX buffers) in the RX handler's window, on its
    `at_call`th arming: after its placement read avail.idx and found no room for the frames
    left, before it asks the guest to kick (avail_event, or clearing NO_NOTIFY)."""
    arm = queue.arm_kicks_for_more
    calls = 0

    def arm_once_the_guest_posted(*args):
        nonlocal calls
        calls += 1
        if calls == at_call:
            post()
        return arm(*args)

    monkeypatch.setattr(queue, "arm_kicks_for_more", arm_once_the_guest_posted)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("placer", ["push_now", "kick_handler", "mergeable_gather"])
def test_rx_buffers_posted_while_the_handler_arms_kicks_get_the_waiting_frames_at_once(
        tmp_path, monkeypatch, placer, event_idx):
    """The guest posts buffers after the placement looked at the ring and before kicks are
    armed: it sees kicks muted and does not kick, as a virtio driver would not.  The
    handler must find them by re-checking against what the placement saw, not against
    avail.idx re-read when it arms (that arms beyond the new buffers, and the frames waited
    for the 0.25 s re-poll, unreachable here).  The placement that found no room: push_now
    (frames arrive, no buffers), the kick handler (buffers for some of the frames), the
    mergeable gather (buffers too small for the frame, the ring not full)."""
    features = DEFAULT_NET_FEATURES
    if not event_idx:
        features &= ~VirtioFeature.EVENT_IDX

    async def main(loop: DataLoop) -> None:
        async with served(tmp_path) as server:
            with GuestRam(1 << 22) as ram:
                async with VhostUserFrontend.connect(server.path, ram, features=features) as fe:
                    await trio.testing.wait_all_tasks_blocked()
                    queue = server.port.device.vrings[0].queue
                    assert queue.event_idx == event_idx
                    # Traffic before: buffers posted and used up; kicks not armed since.
                    fe.net.post_rx(2)
                    fe.kick(0)
                    await trio.testing.wait_all_tasks_blocked()
                    server.port.deliver([Frame(eth(0)), Frame(eth(1))])
                    assert await receive(fe, 2) == [eth(0), eth(1)]
                    kicked: list[bool] = []

                    def post() -> None:
                        fe.net.post_rx(2)
                        kicked.append(fe.kick_if_needed(0))

                    if placer == "push_now":
                        frames = [eth(2)]
                        guest_posts_in_the_window(monkeypatch, queue, 1, post)
                        server.port.deliver([Frame(frame) for frame in frames])
                    elif placer == "kick_handler":
                        frames = [eth(n) for n in range(2, 5)]
                        guest_posts_in_the_window(monkeypatch, queue, 2, post)
                        server.port.deliver([Frame(frame) for frame in frames])  # 1st arming
                        fe.net.post_rx(2)
                        assert fe.kick_if_needed(0)  # kicks armed: the guest kicks
                    else:
                        frames = [eth(2, 5000)]  # three 2 KiB buffers
                        fe.net.post_rx(2)
                        fe.kick_if_needed(0)
                        guest_posts_in_the_window(monkeypatch, queue, 1, post)
                        server.port.deliver([Frame(frame) for frame in frames])
                    assert await receive(fe, len(frames)) == frames
                    assert kicked == [False]  # the race: the guest did not kick
                    assert server.port.device.broken is None

    on_loop(main)


@pytest.mark.parametrize("placer", ["push_now", "kick_handler", "mergeable_gather"])
def test_rx_frames_waiting_for_a_guest_that_posts_nothing_arm_kicks_once_and_sleep(
        tmp_path, monkeypatch, placer):
    """The other side of re-checking against what the placement saw: with nothing added
    since, the handler arms once and is not called again (buffers given back by a gather
    that failed must not look like new ones)."""
    async def main(loop: DataLoop) -> None:
        async with served(tmp_path) as server, connected(server) as fe:
            queue = server.port.device.vrings[0].queue
            armed = []
            arm = queue.arm_kicks_for_more

            def counted(*args):
                armed.append(arm(*args))
                return armed[-1]

            monkeypatch.setattr(queue, "arm_kicks_for_more", counted)
            if placer == "push_now":
                server.port.deliver([Frame(eth(0))])
            elif placer == "kick_handler":
                server.port.deliver([Frame(eth(n)) for n in range(3)])
                await trio.testing.wait_all_tasks_blocked()
                fe.net.post_rx(2)
                fe.kick(0)
            else:
                fe.net.post_rx(2)
                fe.kick(0)
                await trio.testing.wait_all_tasks_blocked()
                server.port.deliver([Frame(eth(0, 5000))])  # three 2 KiB buffers
            for _ in range(50):
                await trio.sleep(0)  # the loop polls its fds between Trio's ticks
            assert armed == ([False, False] if placer == "kick_handler" else [False])
            assert len(server.port.queue) == 1

    on_loop(main)


@pytest.mark.parametrize("kick", ["fd", "nofd"])
def test_an_idle_rx_ring_is_not_polled_and_frames_waiting_for_buffers_are(
        tmp_path, monkeypatch, kick):
    """The rings' safety nets cost wake-ups: the RX task (re-)polls only while frames wait
    for buffers (an idle RX ring waits for nothing: push_now reads the ring itself), the TX
    task always.  A lost kick (here the guest posts without one; NOFD: it has none) still
    only delays frames that wait."""
    monkeypatch.setattr(backend, "REPOLL_SECONDS", 0.01)

    async def main(loop: DataLoop) -> None:
        async with served(tmp_path) as server, connected(server) as fe:
            if kick == "nofd":
                await fe.set_vring_kick(0, None)
            await trio.testing.wait_all_tasks_blocked()
            steps = RingSteps()
            trio.lowlevel.add_instrument(steps)
            await trio.sleep(0.2)  # 20 re-polls, 200 NOFD polls
            assert steps.by_loop["_rx_loop"] == 0
            assert steps.by_loop["_tx_loop"] >= 5
            server.port.deliver([Frame(eth(n)) for n in range(3)])  # no buffers
            await trio.sleep(0.05)
            fe.net.post_rx(4)  # and no kick
            assert await receive(fe, 3) == [eth(n) for n in range(3)]
            assert steps.by_loop["_rx_loop"] > 0
            trio.lowlevel.remove_instrument(steps)
            server.port.deliver([Frame(eth(3))])  # buffers are there: placed at once
            assert [frame for _, frame in fe.net.receive()] == [eth(3)]

    on_loop(main)


def test_a_tx_ring_without_a_kick_fd_is_polled(tmp_path):
    async def main(loop: DataLoop) -> None:
        collector = Collector()
        async with served(tmp_path, collector) as server, connected(server) as fe:
            await fe.set_vring_kick(1, None)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(3):
                fe.net.send([eth(n)])  # no kick: there is no fd
                await collector.wait_for(n + 1)
            assert collector.frames == [eth(n) for n in range(3)]
            assert server.port.device.broken is None

    on_loop(main)


@pytest.mark.parametrize("placer", ["push_now", "kick_handler", "repoll"])
def test_an_rx_avail_index_past_the_ring_while_frames_wait_latches_only_that_device(
        tmp_path, monkeypatch, placer):
    """A hostile guest's RX avail.idx, more chains ahead than its ring holds, met by whatever
    places the frames that wait for buffers (push_now, the kick handler, the re-poll): the
    device is latched broken, the loop goes on."""
    monkeypatch.setattr(backend, "REPOLL_SECONDS", 0.01)

    async def main(loop: DataLoop) -> None:
        async with served(tmp_path) as server, connected(server) as fe:
            server.port.deliver([Frame(eth(n)) for n in range(3)])  # no buffers: they wait
            await trio.testing.wait_all_tasks_blocked()
            rx = fe.net.rx
            rx.set_avail_idx((rx.avail_idx + rx.size + 1) & 0xFFFF)
            if placer == "push_now":
                server.port.queue.clear()  # an empty queue again: deliver places at once
                server.port.deliver([Frame(eth(9))])
            elif placer == "kick_handler":
                fe.kick(0)
            device = server.port.device
            while not device.broken:
                await trio.sleep(0.005)
            assert "avail" in device.broken
            assert not server.port.link_up
            await trio.sleep(0.05)  # the loop still serves (Trio's timers too)

    on_loop(main)
