"""The Port interface: anything the switch can hand frames to (a guest NIC, a tunnel session,
a TAP device, a gateway service), with the counters `vhostvpn status` shows.

A port is sans-I/O: `deliver()` never blocks and never awaits.  A port that moves frames to a
device queues them (bounded) and lets its I/O shell drain the queue; what does not fit is
dropped and counted by reason.  A port whose `deliver` parses frames catches what one frame
raises, counts it and logs the traceback once in a while (`drop_unexpected`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from itertools import islice

from netstack.frame import Frame, Offload
from netstack.pcap import CaptureSink
from netstack.policy import PortPolicy

log = logging.getLogger(__name__)

# An unexpected exception's traceback is logged at most this often per port (or per L3
# host); every frame it cost is counted.
TRACEBACK_INTERVAL_SECONDS = 60.0


class TracebackLog:
    """Logs the traceback of the exception being handled at most once per interval: what a
    data path does with an unexpected exception from one frame, which may recur per frame."""

    __slots__ = ("logger", "name", "next_at")

    def __init__(self, logger: logging.Logger, name: str) -> None:
        self.logger = logger
        self.name = name
        self.next_at = 0.0

    def log(self, what: str) -> None:
        """Call from an `except` block."""
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + TRACEBACK_INTERVAL_SECONDS
        self.logger.error("%s: unexpected error %s (the next %.0f s of these are only counted)",
                          self.name, what, TRACEBACK_INTERVAL_SECONDS, exc_info=True)


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

    `accepts` lists the offloads this port can take (see `netstack.frame.needed_offloads`);
    the switch never hands a port a frame that needs more.  `policy` is what the switch
    enforces on frames from this port (netstack.policy); None means trusted (the hub's own
    services).

    `service` marks a port that is a host the hub runs on the segment (the gateway), not a
    way to other machines: it reads only frames to its own (reserved) MAC and group
    addresses, so the switch floods no unknown unicast to it, and a policed port's frames to
    it take a token of that port's service bucket (the hub's CPU answers each one).
    """

    service = False

    def __init__(
        self, name: str, accepts: Offload = Offload.NONE, policy: PortPolicy | None = None
    ) -> None:
        self.name = name
        self.accepts = accepts
        self.policy = policy
        self.counters = PortCounters()
        # A capture of what this port sends and receives (netstack.pcap: a file, a live
        # stream, or a tee of several), if asked.
        self.capture: CaptureSink | None = None
        self.tracebacks = TracebackLog(log, name)

    def deliver(self, frames: list[Frame]) -> None:
        """Take a batch of frames from the switch.  Must not block."""
        raise NotImplementedError

    def drop_unexpected(self, reason: str, count: int, what: str) -> None:
        """Count `count` frames lost to the exception being handled, as `reason`, and log its
        traceback (rate limited).  Call from an `except` block."""
        self.counters.drop(reason, count)
        self.tracebacks.log(f"{what}; {count} frame(s) dropped as {reason}")

    def status(self) -> dict[str, object]:
        return {"name": self.name, "accepts": str(self.accepts), **self.counters.as_dict()}


# Frames a SpeakingPort's outbox holds until its shell takes them; beyond: `outbox_full`.
OUTBOX_FRAMES = 1024


class SpeakingPort(Port):
    """A port that also sends frames of its own (the gateway's replies, a TUN host's ARP and
    DHCP): they wait in `outbox` (at most OUTBOX_FRAMES) until its shell takes them
    (`take_outbox`) and forwards them; `on_ready` is called when the outbox stops being
    empty.  The shells hand the port to `Switch.send` there, so a reply leaves from the
    handler that delivered its request (after that batch), and a timer's frames from the
    timer's task; their own task forwards only what `send` leaves (it says False)."""

    def __init__(
        self, name: str, accepts: Offload = Offload.NONE, policy: PortPolicy | None = None
    ) -> None:
        super().__init__(name, accepts, policy)
        self.outbox: list[Frame] = []
        self.on_ready: Callable[[], None] | None = None  # the shell: Switch.send, or a wake-up

    def _send(self, frames: list[Frame]) -> None:
        if not frames:
            return
        was_empty = not self.outbox
        room = OUTBOX_FRAMES - len(self.outbox)
        if len(frames) > room:
            self.counters.drop("outbox_full", len(frames) - room)
            frames = frames[:room]
        self.outbox.extend(frames)
        if was_empty and self.on_ready is not None:
            self.on_ready()

    def take_outbox(self) -> list[Frame]:
        frames, self.outbox = self.outbox, []
        return frames


# What a QueuedPort holds before it drops: about one guest RX ring's worth of frames, four
# times over, or 4 MiB (64 maximal TSO frames), whichever comes first.
DEFAULT_QUEUE_FRAMES = 1024
DEFAULT_QUEUE_BYTES = 4 << 20


class QueuedPort(Port):
    """A port whose frames wait in a bounded queue until its I/O shell drains them.

    `on_ready` is called (with no arguments) when frames arrive in an empty queue; the shell
    uses it to wake its sender task, or to send them at once when that task is idle (it must
    not block).  The queue holds at most `limit` frames and `limit_bytes` bytes; what does
    not fit (the tail of a batch) is dropped and counted as `queue_full`.

    The shell takes frames from the left of `queue` only (popleft, clear; putting back on
    the left what it could not send), so the bytes queued are known without its help: each
    delivered batch is remembered as [frames, bytes], oldest first, and the frames the shell
    took since the last delivery are the oldest ones.  Only a batch it took part of is
    counted again (what is left of it).
    """

    def __init__(
        self,
        name: str,
        accepts: Offload = Offload.NONE,
        limit: int = DEFAULT_QUEUE_FRAMES,
        policy: PortPolicy | None = None,
        limit_bytes: int = DEFAULT_QUEUE_BYTES,
    ) -> None:
        super().__init__(name, accepts, policy)
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.queue: deque[Frame] = deque()
        self.on_ready: Callable[[], None] | None = None
        self._batches: deque[list[int]] = deque()  # [frames, bytes] of each batch queued
        self._held_frames = 0  # what those batches add up to
        self._held_bytes = 0

    @property
    def queued_bytes(self) -> int:
        self._account_taken()
        return self._held_bytes

    def deliver(self, frames: list[Frame]) -> None:
        queue = self.queue
        was_empty = not queue
        if len(queue) != self._held_frames:
            if was_empty:  # the shell took everything (_account_taken's first case)
                self._batches.clear()
                self._held_frames = self._held_bytes = 0
            else:
                self._account_taken()
        nbytes = (len(frames[0].data) if len(frames) == 1
                  else sum([len(frame.data) for frame in frames]))
        if len(queue) + len(frames) > self.limit or self._held_bytes + nbytes > self.limit_bytes:
            frames, nbytes = self._fit(frames)
        if frames:
            queue.extend(frames)
            self._batches.append([len(frames), nbytes])
            self._held_frames += len(frames)
            self._held_bytes += nbytes
        if was_empty and queue and self.on_ready is not None:
            self.on_ready()

    def _fit(self, frames: list[Frame]) -> tuple[list[Frame], int]:
        """The head of `frames` that fits in the queue, and its bytes; the rest is counted."""
        room = max(self.limit - len(self.queue), 0)
        budget = self.limit_bytes - self._held_bytes
        fit = nbytes = 0
        for frame in frames[:room]:
            size = len(frame.data)
            if nbytes + size > budget:
                break
            nbytes += size
            fit += 1
        self.counters.drop("queue_full", len(frames) - fit)
        return frames[:fit], nbytes

    def _account_taken(self) -> None:
        """Forget what the shell took from the left of the queue since we last looked."""
        queued = len(self.queue)
        if not queued:
            self._batches.clear()
            self._held_frames = self._held_bytes = 0
            return
        taken = self._held_frames - queued
        batches = self._batches
        while taken > 0:
            oldest = batches[0]
            if oldest[0] <= taken:
                batches.popleft()
                taken -= oldest[0]
                self._held_frames -= oldest[0]
                self._held_bytes -= oldest[1]
                continue
            # Taken in part: what is left of it is at the head of the queue.
            left = oldest[0] - taken
            left_bytes = sum([len(frame.data) for frame in islice(self.queue, left)])
            self._held_frames -= taken
            self._held_bytes -= oldest[1] - left_bytes
            oldest[0], oldest[1] = left, left_bytes
            break
