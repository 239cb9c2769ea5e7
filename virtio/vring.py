"""A split virtqueue seen from the device side, over guest memory (virtio 1.x, 2.7).

Theory of operation.  The driver (guest) owns the descriptor table and the avail ring; the
device (us) owns the used ring.  `pop()` reads avail.idx once, then walks each new chain from
its head, translating every buffer through GuestMemory into bounds-checked spans.
`push_used()` writes used elements and publishes them with ONE used.idx store per batch;
`should_notify()` then decides whether the driver wants an interrupt (EVENT_IDX or the
NO_INTERRUPT flag).  `arm_kicks()` asks the driver to kick on its next addition and re-checks
for work that raced in; `arm_kicks_for_more(seen)` does the same beyond the avail index the
caller's placement saw (RX buffers too few or too small for the next frame).  Both follow
vhost's rule: arm at the index the last look at the ring saw, then re-read avail.idx against
it -- never at an avail.idx read afresh, which would arm beyond buffers the driver added
unkicked in between, and they would wait for the shell's re-poll.

Work per batch is bounded: `pop()` counts its work in `walked` -- one per descriptor walked,
one per chain taken by the one-descriptor fast path -- and stops once that reaches WALK_BUDGET,
so a guest that fills its ring with 1024-entry indirect tables gets ~2 ms per batch, and the
shell yields between batches.

The guest is hostile.  Every index, length and address is checked; each descriptor field is
read exactly once into a local (a guest may rewrite memory under us); indirect tables are
copied before they are walked.  A violation raises RingError, and the device that owns the
queue latches itself broken: no more work on its rings, nothing else disturbed.

Two walks, one behaviour.  The walk above exists twice: in Python (this module and
virtio/net.py, the reference) and in C (virtio/_ring.c, `SplitQueue.native`), chosen per queue
when it is made: VHOSTVPN_RING=native|python, native by default when it was built (`pip
install .` compiles it; without a compiler the package installs, and the first queue made logs
a warning that rings use Python).  The native walk does a whole batch per call: `pop` (the
same chains as `pop` here), `pop_frames` (pop_tx: walk, copy each TX chain into one bytes
object, make the Frames, write the used entries and the one used.idx store) and `pop_rx`
(push_rx: walk, then place every frame that fits its chain's first writable buffer -- header
and frame, one copy -- and hand the rest back to the Python loop, which does everything
unusual: mergeable gathering, drops) and `scatter` (a frame over several buffers, for that
loop).  It makes the same checks in the same
order, raises RingError with the same messages and counts `walked` the same, and reaches guest
memory only through a RegionTable (GuestMemory.native_table: each region's buffer, held until
the memory is closed), with [addr, addr+len) checked against one region.  Guest regions may not
overlap (GuestMemory refuses it), so which region translates an address never depends on the
order regions are searched in.  tests/test_fuzz_virtio.py drives hostile rings, rewritten
between calls, through both and requires identical frames, used entries, guest memory, drops,
indexes and error messages.

Memory ordering.  On x86-64 loads are not reordered with loads nor stores with stores, and
every CPython access to the mapping is an opaque C call, so read barriers and write barriers
cost nothing here.  Two places need a store->load fence, which x86 does reorder: after
publishing used.idx and before reading used_event/avail.flags, and after writing
avail_event/clearing NO_NOTIFY and before re-reading avail.idx.  `full_fence` (virtio._fence,
an mfence) is called at exactly those two points, once per batch.  Without a compiler
`full_fence` takes and gives back an uncontended threading.Lock instead, which is a full
barrier too: CPython's lock is a POSIX semaphore on Linux, whose uncontended sem_trywait and
sem_post are a `lock cmpxchg` and a `lock xadd`, and x86-64 never reorders loads or stores
across a LOCK-prefixed instruction (Intel SDM vol. 3, "Memory Ordering"); both are opaque
calls, so neither the compiler nor the interpreter moves the ring accesses across them.  The
native walk stores used.idx after the used elements behind a compiler barrier, and reads each
descriptor once into a local behind one.  Other architectures would also need real rmb/wmb;
vhostvpn supports x86-64 only.
"""

from __future__ import annotations

import logging
import os
import threading
from array import array
from collections import deque
from typing import Any

from virtio.memory import GuestMemory, GuestMemoryError, Span, read_spans
from virtio.spec import (
    AVAIL_ALIGN,
    AVAIL_F_NO_INTERRUPT,
    DESC_ALIGN,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    MAX_CHAIN_BUFFERS,
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_ENTRIES,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    USED_F_NO_NOTIFY,
)

log = logging.getLogger(__name__)

try:
    from virtio import _fence
except ImportError:  # built without a compiler: see "Memory ordering" above
    _fence = None
try:
    from virtio import _ring
except ImportError:  # built without a compiler: the Python walk is used
    _ring = None


class RingError(Exception):
    """The driver broke the ring protocol; the device must stop using this ring."""


if _fence is not None:
    full_fence = _fence.full_fence
else:
    _FENCE_LOCK = threading.Lock()

    def full_fence() -> None:
        """A full barrier without native code: an uncontended lock taken and given back."""
        _FENCE_LOCK.acquire()
        _FENCE_LOCK.release()


if _ring is not None:
    _ring.set_ring_error(RingError)

# Which walk new queues use: VHOSTVPN_RING=native|python, native by default when built.
RING_ENV = "VHOSTVPN_RING"
RING_CHOICES = ("native", "python")


def _ring_from_environment() -> bool:
    wanted = os.environ.get(RING_ENV, "native")
    if wanted not in RING_CHOICES:
        log.warning("%s=%r is none of %s; using the default", RING_ENV, wanted,
                    "|".join(RING_CHOICES))
        wanted = "native"
    return wanted == "native" and _ring is not None


NATIVE = _ring_from_environment()
_announced = False


def use_ring(name: str) -> None:
    """Select the ring walk for queues made from now on ("native" or "python")."""
    global NATIVE
    if name not in RING_CHOICES:
        raise ValueError(f"ring implementation {name!r} is none of {RING_CHOICES}")
    NATIVE = name == "native" and _ring is not None
    if name == "native" and _ring is None:
        log.warning("native ring walk requested but virtio._ring is not built; using Python")


def ring_implementation() -> str:
    """What new queues use: "native" or "python"."""
    return "native" if NATIVE else "python"


def _announce() -> None:
    """Log once per process which walk the rings use (and why, when it is the fallback)."""
    global _announced
    if _announced:
        return
    _announced = True
    if _ring is None:
        log.warning("virtio._ring is not built (no C compiler at install?): rings use the "
                    "pure-Python walk, about half the speed")
    if _fence is None:
        log.warning("virtio._fence is not built: ring fences use a lock instead of mfence")
    log.info("virtio rings: %s walk (%s=%s)", ring_implementation(), RING_ENV,
             os.environ.get(RING_ENV, "unset"))


def register_frame_type(frame_type: type, plain: tuple) -> None:
    """Tell the native walk how to make frames (net.py calls this once at import)."""
    if _ring is not None:
        _ring.set_frame_type(frame_type, plain)


# Work units in one batch before the batch ends early: one per descriptor walked (about
# 1.1 us), one per chain of the one-descriptor fast path (cheaper), so a batch holds the
# event loop for ~2 ms, plus at most one more chain (1024 buffers + a 1024-entry indirect
# table).  A ring of 256 chains x 1024 indirect descriptors cost ~300 ms in one batch without
# it; mergeable RX gathering over one-byte fast-path chains, seconds.  The caller resets
# `walked`.
WALK_BUDGET = 2048


# One descriptor chain popped from the avail ring: (head, readable spans, writable spans).
# A plain tuple: this is made once per frame on the hot path.
Chain = tuple[int, list[Span], list[Span]]


def _table_views(table: memoryview) -> tuple[memoryview, memoryview, memoryview]:
    """Typed views of a descriptor table: addr at q[2i], len at w[4i+2], flags/next at h[8i+6/7]."""
    return table.cast("Q"), table.cast("I"), table.cast("H")


class SplitQueue:
    """Device side of one split virtqueue.  Plain class: no I/O, no Trio."""

    def __init__(
        self,
        index: int,
        size: int,
        memory: GuestMemory,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        last_avail_idx: int,
        *,
        event_idx: bool,
        indirect: bool,
        native: bool | None = None,
    ) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise RingError(f"queue {index}: size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        for name, addr, align in (
            ("descriptor table", desc_uva, DESC_ALIGN),
            ("avail ring", avail_uva, AVAIL_ALIGN),
            ("used ring", used_uva, USED_ALIGN),
        ):
            if addr % align:
                raise RingError(f"queue {index}: {name} at {addr:#x} is not {align}-byte aligned")
        self.index = index
        self.size = size
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect
        self.addresses = (desc_uva, avail_uva, used_uva)
        try:
            desc = memory.uva(desc_uva, DESC_SIZE * size)
            avail = memory.uva(avail_uva, 4 + 2 * size + 2)
            used = memory.uva(used_uva, 4 + 8 * size + 2)
        except GuestMemoryError as exc:
            raise RingError(f"queue {index}: {exc}") from exc
        self._desc_q, self._desc_w, self._desc_h = _table_views(desc)
        self._views = (desc, avail, used)
        _announce()
        if native is None:
            native = NATIVE
        # The native walk (virtio._ring.Ring) when selected; None: the Python walk below.
        self.native: Any = None
        if native:
            if _ring is None:
                raise RingError(f"queue {index}: native ring walk requested but not built")
            self.native = _ring.Ring(memory.native_table(), desc, avail, used, size, index,
                                     indirect)
        self._avail = avail.cast("H")  # [0] flags, [1] idx, [2+slot] ring, [2+size] used_event
        self._used_h = used.cast("H")  # [0] flags, [1] idx, [2+4*size] avail_event
        self._used_w = used[: 4 + 8 * size].cast("I")  # element i: id [1+2i], len [2+2i]
        self._used_event_at = 2 + size
        self._avail_event_at = 2 + 4 * size
        self.last_avail_idx = last_avail_idx & 0xFFFF
        # The used index lives in guest memory; after a reboot or reconnect it is re-read there.
        self.used_idx = self._used_h[1]
        self._signalled_used = self.used_idx
        self._signalled_valid = False
        # Work units (see WALK_BUDGET) since the caller last reset this.
        self.walked = 0

    def release(self) -> None:
        """Drop every view into guest memory (before the memory is unmapped)."""
        if self.native is not None:
            self.native.release()
        for view in (self._desc_q, self._desc_w, self._desc_h, self._avail, self._used_h,
                     self._used_w, *self._views):
            view.release()

    # -- the driver's side: what is available -------------------------------------------

    def avail_count(self) -> int:
        """How many chains the driver has made available beyond what we consumed."""
        count = (self._avail[1] - self.last_avail_idx) & 0xFFFF
        if count > self.size:
            raise RingError(
                f"queue {self.index}: avail index moved {count} entries ahead of "
                f"{self.last_avail_idx} in a ring of {self.size}"
            )
        return count

    def pop(self, limit: int) -> list[Chain]:
        """Take up to `limit` available chains, walked and translated.

        Fewer when `walked` reaches WALK_BUDGET, but always one if any is available.  Adds one
        to `walked` per fast-path chain, one per descriptor for the others.
        """
        if self.native is not None:
            chains, self.walked = self.native.pop(self.last_avail_idx, limit, self.walked)
            self.last_avail_idx = (self.last_avail_idx + len(chains)) & 0xFFFF
            return chains
        count = min(self.avail_count(), limit)
        chains: list[Chain] = []
        avail = self._avail
        size = self.size
        mask = size - 1
        idx = self.last_avail_idx
        desc_q, desc_w, desc_h = self._desc_q, self._desc_w, self._desc_h
        region = self.memory.regions[0]
        region_gpa, region_size = region.gpa, region.size
        region_mm, region_base = region.mm, region.base
        walk = self._walk
        walks = 0  # chains that took the full walk (it counts their descriptors itself)
        # The heads, read in one go (one or two slices of the ring: it may wrap).
        first = 2 + (idx & mask)
        heads = avail[first : min(first + count, 2 + size)].tolist()
        if len(heads) < count:
            heads += avail[2 : 2 + count - len(heads)].tolist()
        for head in heads:
            # Fast path: one direct descriptor inside the most recently used region.  Anything
            # else -- or anything odd -- goes through the full walk, which reads and checks
            # the descriptor afresh (nothing read here is used then).
            if head < size:
                flags = desc_h[8 * head + 6]
                if not flags & (DESC_F_NEXT | DESC_F_INDIRECT):
                    length = desc_w[4 * head + 2]
                    offset = desc_q[2 * head] - region_gpa
                    if length and offset >= 0 and offset + length <= region_size:
                        start = region_base + offset
                        span = (region_mm, start, start + length)
                        if flags & DESC_F_WRITE:
                            chains.append((head, [], [span]))
                        else:
                            chains.append((head, [span], []))
                        continue
            chains.append(walk(head))
            walks += 1
            if self.walked + len(chains) - walks >= WALK_BUDGET:
                break
        self.walked += len(chains) - walks  # the fast-path chains
        self.last_avail_idx = (idx + len(chains)) & 0xFFFF
        return chains

    def pop_frames(
        self, limit: int, shortest: int, longest: int
    ) -> tuple[list, list[int], int, int, RingError | None]:
        """Native TX: pop up to `limit` chains, copy each readable part out as a Frame, return
        every chain as used (length 0) with one used.idx store.

        Returns (frames, indexes of frames whose offload metadata the caller must check,
        chains shorter than `shortest`, chains longer than `longest` -- both dropped -- and
        the RingError to raise once those are counted: a chain with no readable buffer, the
        frames before it kept, the chains up to it returned).  Only with `native`:
        NetQueues.pop_tx is the Python reference.
        """
        frames, checks, runts, oversize, popped, self.used_idx, self.walked, error = (
            self.native.tx(self.last_avail_idx, limit, self.used_idx, self.walked, shortest,
                           longest))
        self.last_avail_idx = (self.last_avail_idx + popped) & 0xFFFF
        return frames, checks, runts, oversize, None if error is None else RingError(error)

    def pop_rx(
        self, count: int, frames: deque, used: list[int]
    ) -> tuple[list[Chain], int, int, int]:
        """RX: pop up to `count` chains (as `pop`); natively, also place frames from the left
        of `frames` while each fits its chain's first writable buffer (header + frame, the one
        copy), appending head and length to `used`.

        Returns (the chains not used yet, chains popped, frames placed, their bytes).  The
        Python path places nothing here: NetQueues.push_rx does, and is the reference.
        """
        if self.native is None:
            chains = self.pop(count)
            return chains, len(chains), 0, 0
        rest, popped, self.walked, delivered, nbytes = self.native.rx(
            self.last_avail_idx, count, self.walked, frames, used)
        self.last_avail_idx = (self.last_avail_idx + popped) & 0xFFFF
        return rest, popped, delivered, nbytes

    def avail_idx(self) -> int:
        """The driver's avail.idx as it is now (it moves when the driver adds chains)."""
        return self._avail[1]

    def unpop(self, count: int) -> None:
        """Give back the last `count` popped chains (not yet used) to be popped again."""
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF

    def driver_descriptors_exhausted(self) -> bool:
        """Do the chains now available use every descriptor of the table?

        Then the driver cannot add a buffer until we return some: RX room that is too small
        now stays too small.  Only the direct links of each chain are followed (an indirect
        chain takes one descriptor), at most `size` of them in all, each counted in `walked`;
        what the guest wrote here decides nothing but the fate of its own frame.
        """
        count = self.avail_count()
        size = self.size
        if count == size:
            return True
        avail, desc_h = self._avail, self._desc_h
        mask = size - 1
        idx = self.last_avail_idx
        taken = 0
        try:
            for k in range(count):
                i = avail[2 + ((idx + k) & mask)]
                while i < size:
                    taken += 1
                    if taken >= size:
                        return True
                    flags = desc_h[8 * i + 6]
                    if flags & DESC_F_INDIRECT or not flags & DESC_F_NEXT:
                        break
                    i = desc_h[8 * i + 7]
            return False
        finally:
            self.walked += taken

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise RingError(f"queue {self.index}: head {head} outside ring of {size}")
        desc_q, desc_w, desc_h = self._desc_q, self._desc_w, self._desc_h
        table_size = size
        gpa_buffers = self.memory.gpa_buffers
        readable: list[Span] = []
        writable: list[Span] = []
        total = 0
        hops = 0
        walked = self.walked
        in_indirect = False
        i = head
        while True:
            hops += 1
            walked += 1
            if hops > table_size:
                raise RingError(f"queue {self.index}: descriptor chain from {head} loops")
            addr = desc_q[2 * i]
            length = desc_w[4 * i + 2]
            flags = desc_h[8 * i + 6]
            next_i = desc_h[8 * i + 7]
            if flags & DESC_F_INDIRECT:
                if in_indirect or not self.indirect:
                    raise RingError(f"queue {self.index}: unexpected indirect descriptor {i}")
                if flags & DESC_F_NEXT:
                    raise RingError(f"queue {self.index}: indirect descriptor {i} has NEXT set")
                entries, rest = divmod(length, DESC_SIZE)
                if rest or not 0 < entries <= MAX_INDIRECT_ENTRIES:
                    raise RingError(
                        f"queue {self.index}: indirect table of {length} bytes "
                        f"(want a multiple of {DESC_SIZE}, at most {MAX_INDIRECT_ENTRIES} entries)"
                    )
                table: list[Span] = []
                try:
                    gpa_buffers(addr, length, table)
                except GuestMemoryError as exc:
                    raise RingError(f"queue {self.index}: indirect table: {exc}") from exc
                # A private copy: the guest cannot change the table while we walk it.
                desc_q, desc_w, desc_h = _table_views(memoryview(read_spans(table)))
                table_size = entries
                in_indirect = True
                hops = 0
                i = 0
                continue
            if length == 0:
                raise RingError(f"queue {self.index}: zero-length descriptor {i} in chain {head}")
            total += length
            if total >= MAX_CHAIN_BYTES:
                raise RingError(f"queue {self.index}: chain {head} is longer than 4 GiB")
            try:
                if flags & DESC_F_WRITE:
                    gpa_buffers(addr, length, writable)
                elif writable:
                    raise RingError(
                        f"queue {self.index}: readable descriptor {i} after a writable one"
                    )
                else:
                    gpa_buffers(addr, length, readable)
            except GuestMemoryError as exc:
                raise RingError(f"queue {self.index}: descriptor {i}: {exc}") from exc
            if len(readable) + len(writable) > MAX_CHAIN_BUFFERS:
                raise RingError(f"queue {self.index}: chain {head} has too many buffers")
            if not flags & DESC_F_NEXT:
                self.walked = walked
                return head, readable, writable
            if next_i >= table_size:
                raise RingError(
                    f"queue {self.index}: descriptor {i} links to {next_i} outside table of "
                    f"{table_size}"
                )
            i = next_i

    # -- our side: returning buffers -----------------------------------------------------

    def push_used(self, used: list[int]) -> None:
        """Return chains and publish them with one used.idx store.

        `used` is flat: head, bytes written, head, bytes written, ... (the used ring's own
        layout, so the elements go in with one or two slice stores).
        """
        count = len(used) // 2
        if not count:
            return
        idx = self.used_idx
        slot = idx & (self.size - 1)
        first = min(count, self.size - slot)
        used_w = self._used_w
        used_w[1 + 2 * slot : 1 + 2 * (slot + first)] = array("I", used[: 2 * first])
        if first < count:  # the batch wraps around the end of the ring
            used_w[1 : 1 + 2 * (count - first)] = array("I", used[2 * first :])
        idx = (idx + count) & 0xFFFF
        self._used_h[1] = idx  # elements before index: x86 keeps store order
        self.used_idx = idx

    def should_notify(self) -> bool:
        """After publishing: does the driver want an interrupt for what we added?"""
        full_fence()  # used.idx store -> used_event / avail.flags load
        if self.event_idx:
            new = self.used_idx
            old = self._signalled_used
            valid = self._signalled_valid
            self._signalled_used = new
            self._signalled_valid = True
            if not valid:
                return True
            used_event = self._avail[self._used_event_at]
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._avail[0] & AVAIL_F_NO_INTERRUPT

    def arm_kicks(self) -> bool:
        """Ask the driver to kick when it adds work.  Returns True if work is already there."""
        return self._arm_kicks(self.last_avail_idx)

    def arm_kicks_for_more(self, seen: int) -> bool:
        """Ask the driver to kick when it adds chains beyond avail index `seen` (RX: read
        before a placement that found the chains up to it too few or too small for the next
        frame).  Returns True if the driver added some since then: it may have done so
        before kicks were armed, without kicking, and the caller must place again."""
        return self._arm_kicks(seen)

    def _arm_kicks(self, avail_idx: int) -> bool:
        if self.event_idx:
            self._used_h[self._avail_event_at] = avail_idx
        else:
            self._used_h[0] = 0
        full_fence()  # avail_event / flags store -> avail.idx load
        return self._avail[1] != avail_idx

    def mute_kicks(self) -> None:
        """Tell the driver not to kick while we are polling anyway."""
        if not self.event_idx:
            self._used_h[0] = USED_F_NO_NOTIFY
        # With EVENT_IDX a stale avail_event already means "no kicks for now".
