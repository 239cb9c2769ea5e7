"""The Port interface: anything the switch can hand frames to (a guest NIC, a tunnel session,
a TAP device, a gateway service), with the counters `vhostvpn status` shows.

A port is sans-I/O: `deliver()` never blocks and never awaits.  A port that moves frames to a
device queues them (bounded) and lets its I/O shell drain the queue; what does not fit is
dropped and counted by reason.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from netstack.frame import Frame, Offload
from netstack.pcap import PcapWriter
from netstack.policy import PortPolicy


class PortCounters:
    """Traffic through one port, seen from the switch: `in_*` entered the switch from the port,
    `out_*` left through the port (counted when the port's device took them); `drops` counts
    frames lost at this port, by reason."""

    __slots__ = ("drops", "in_bytes", "in_frames", "out_bytes", "out_frames", "software_offloads")

    def __init__(self) -> None:
        self.in_frames = 0
        self.in_bytes = 0
        self.out_frames = 0
        self.out_bytes = 0
        self.software_offloads = 0  # frames checksummed or segmented for this port
        self.drops: Counter[str] = Counter()

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] += count

    def as_dict(self) -> dict[str, object]:
        return {
            "in_frames": self.in_frames,
            "in_bytes": self.in_bytes,
            "out_frames": self.out_frames,
            "out_bytes": self.out_bytes,
            "software_offloads": self.software_offloads,
            "drops": dict(self.drops),
        }


class Port:
    """Base class of switch ports.  Subclasses implement `deliver`.

    `accepts` lists the offloads this port can take (see `Frame.required_offloads`); the switch
    never hands a port a frame that needs more.  `policy` is what the switch enforces on frames
    from this port (netstack.policy); None means trusted (the hub's own services).
    """

    def __init__(
        self, name: str, accepts: Offload = Offload.NONE, policy: PortPolicy | None = None
    ) -> None:
        self.name = name
        self.accepts = accepts
        self.policy = policy
        self.counters = PortCounters()
        # A capture of what this port sends and receives (netstack.pcap.PcapWriter), if asked.
        self.capture: PcapWriter | None = None

    def deliver(self, frames: list[Frame]) -> None:
        """Take a batch of frames from the switch.  Must not block."""
        raise NotImplementedError

    def status(self) -> dict[str, object]:
        return {"name": self.name, "accepts": str(self.accepts), **self.counters.as_dict()}


class SpeakingPort(Port):
    """A port that also sends frames of its own (the gateway's replies, a TUN host's ARP and
    DHCP): they wait in `outbox` until its shell takes them (`take_outbox`) and forwards
    them; `on_ready` is called when the outbox stops being empty."""

    def __init__(
        self, name: str, accepts: Offload = Offload.NONE, policy: PortPolicy | None = None
    ) -> None:
        super().__init__(name, accepts, policy)
        self.outbox: list[Frame] = []
        self.on_ready: Callable[[], None] | None = None  # wakes the shell's outbox task

    def _send(self, frames: list[Frame]) -> None:
        if not frames:
            return
        was_empty = not self.outbox
        self.outbox.extend(frames)
        if was_empty and self.on_ready is not None:
            self.on_ready()

    def take_outbox(self) -> list[Frame]:
        frames, self.outbox = self.outbox, []
        return frames


# Frames a QueuedPort holds before it drops: about one guest RX ring's worth, four times over.
DEFAULT_QUEUE_FRAMES = 1024


class QueuedPort(Port):
    """A port whose frames wait in a bounded queue until its I/O shell drains them.

    `on_ready` is called (with no arguments) when frames arrive in an empty queue; the shell
    uses it to wake its sender task, or to send them at once when that task is idle (it must
    not block).  Overflow is dropped and counted as `queue_full`.
    """

    def __init__(
        self,
        name: str,
        accepts: Offload = Offload.NONE,
        limit: int = DEFAULT_QUEUE_FRAMES,
        policy: PortPolicy | None = None,
    ) -> None:
        super().__init__(name, accepts, policy)
        self.limit = limit
        self.queue: deque[Frame] = deque()
        self.on_ready: Callable[[], None] | None = None

    def deliver(self, frames: list[Frame]) -> None:
        queue = self.queue
        was_empty = not queue
        room = self.limit - len(queue)
        if len(frames) > room:
            self.counters.drop("queue_full", len(frames) - max(room, 0))
            frames = frames[: max(room, 0)]
        queue.extend(frames)
        if was_empty and queue and self.on_ready is not None:
            self.on_ready()
