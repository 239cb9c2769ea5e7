"""The virtio-net data path on split virtqueues: guest TX chains become netstack Frames, and
Frames are written into guest RX buffers (virtio 1.x, 5.1.6).

Path of a frame out of the guest (`pop_tx`): pop the TX chain -> check its length (an
Ethernet header up to MAX_FRAME, before anything is copied) -> read the 12-byte virtio_net_hdr
once -> copy the frame bytes out of guest memory (the one copy) -> check the offload metadata
against what was negotiated -> return the chain as used (len 0).

Path of a frame into the guest (`push_rx`): reserve enough RX chains for header + frame (one
chain, or several with MRG_RXBUF, all or nothing) -> write the header and scatter the frame
(the one copy) -> record used entries; one used.idx store and at most one call per batch.
The caller (the Trio shell) does the notifying: this module never touches an fd.

One frame never breaks a port: a frame that is too short, too long, carries offload metadata
that was not negotiated, or can never fit the guest's receive buffers is dropped and counted
in `drops` by reason, and its chain goes back to the guest; only a broken ring (RingError)
stops the device.  A batch ends early once its chains cost WALK_BUDGET (vring.py); a frame
dropped counts against a batch's frame limit like one delivered.  A guest whose RX ring cannot
hold a frame even with every descriptor offered is remembered (`_rx_too_small`: the ring's
total room, until the guest moves avail.idx), so the frames after it that do not fit either
are dropped without walking the ring again.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, deque

from netstack.frame import (
    ETH_HEADER_LEN,
    GSO_ECN,
    GSO_NONE,
    HDR_F_NEEDS_CSUM,
    PLAIN,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_LEN,
    Frame,
    Offload,
    needed_offloads,
)
from virtio.memory import Span, read_spans
from virtio.spec import MAX_FRAME, Feature, has
from virtio.vring import WALK_BUDGET, Chain, RingError, SplitQueue, register_frame_type

register_frame_type(Frame, PLAIN)

log = logging.getLogger(__name__)

_HDR = struct.Struct("<BBHHHH")  # the offload part; num_buffers is ignored on TX
# The header of a plain frame in a single RX buffer: no offloads, num_buffers = 1.
_PLAIN_HEADER = VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)
# A TX chain's bytes: the virtio-net header, then at least an Ethernet header, at most
# MAX_FRAME.
_TX_MIN = VIRTIO_NET_HDR_LEN + ETH_HEADER_LEN
_TX_MAX = VIRTIO_NET_HDR_LEN + MAX_FRAME
_NUM_BUFFERS = struct.Struct("<H")  # the header's last field


def offloads_from_features(features: int, *, guest: bool) -> Offload:
    """What the guest accepts (guest=True: GUEST_* bits) or may send (HOST_* bits)."""
    if guest:
        csum, tso4, tso6, ecn, ufo = (Feature.NET_GUEST_CSUM, Feature.NET_GUEST_TSO4,
                                      Feature.NET_GUEST_TSO6, Feature.NET_GUEST_ECN,
                                      Feature.NET_GUEST_UFO)
    else:
        csum, tso4, tso6, ecn, ufo = (Feature.NET_CSUM, Feature.NET_HOST_TSO4,
                                      Feature.NET_HOST_TSO6, Feature.NET_HOST_ECN,
                                      Feature.NET_HOST_UFO)
    if not has(features, csum):
        return Offload.NONE  # every segmentation offload depends on checksum offload
    result = Offload.CSUM
    for bit_no, flag in ((tso4, Offload.TSO4), (tso6, Offload.TSO6), (ecn, Offload.ECN),
                         (ufo, Offload.UFO)):
        if has(features, bit_no):
            result |= flag
    return result


class NetQueues:
    """The data path of one virtio-net device: offload policy plus per-frame ring work."""

    def __init__(self, features: int, name: str = "virtio-net") -> None:
        self.name = name
        self.mergeable = has(features, Feature.NET_MRG_RXBUF)
        self.tx_offloads = offloads_from_features(features, guest=False)
        self.rx_offloads = offloads_from_features(features, guest=True)
        self.drops: Counter[str] = Counter()
        self._malformed_logged = False
        # (queue, its avail.idx, the room of all its buffers) when every descriptor was
        # offered and a frame still did not fit: until avail.idx moves, a frame needing more
        # is dropped at once instead of gathering over the whole ring again.
        self._rx_too_small: tuple[SplitQueue, int, int] | None = None

    # -- guest -> us ---------------------------------------------------------------------

    def pop_tx(self, queue: SplitQueue, limit: int) -> list[Frame]:
        """Pop up to `limit` TX chains, return their frames, and give the chains back as used.

        Fewer than `limit` when the chains cost WALK_BUDGET descriptors (`queue.walked`).
        """
        queue.walked = 0
        if queue.native is not None:
            return self._pop_tx_native(queue, limit)
        chains = queue.pop(limit)
        if not chains:
            return []
        frames = []
        used: list[int] = []  # flat: head, length, head, length, ...
        unpack_header = _HDR.unpack_from
        drops = self.drops
        for head, spans, _ in chains:
            used += (head, 0)  # every chain goes back, whatever becomes of its frame
            if not spans:
                queue.push_used(used)
                raise RingError(f"queue {queue.index}: TX chain {head} has no readable buffer")
            mm, start, stop = spans[0]
            length = stop - start if len(spans) == 1 else _room(spans)
            if not _TX_MIN <= length <= _TX_MAX:  # checked before a byte is copied
                drops["tx_runt" if length < _TX_MIN else "tx_oversize"] += 1
                continue
            try:
                if stop - start >= VIRTIO_NET_HDR_LEN:
                    # Two header bytes say whether there is offload metadata at all; each field
                    # is read once, and the frame bytes are copied once, straight into bytes.
                    if mm[start] or mm[start + 1]:
                        header = unpack_header(mm, start)
                        if not self._tx_header_ok(header, length - VIRTIO_NET_HDR_LEN):
                            continue
                    else:
                        header = PLAIN
                    if len(spans) == 1:
                        data = mm[start + VIRTIO_NET_HDR_LEN : stop]
                    else:
                        data = read_spans([(mm, start + VIRTIO_NET_HDR_LEN, stop), *spans[1:]])
                else:  # the header itself is split over descriptors (rare)
                    whole = read_spans(spans)
                    if whole[0] or whole[1]:
                        header = unpack_header(whole, 0)
                        if not self._tx_header_ok(header, length - VIRTIO_NET_HDR_LEN):
                            continue
                    else:
                        header = PLAIN
                    data = whole[VIRTIO_NET_HDR_LEN:]
            except Exception:  # a bug met by one frame: drop that frame, keep the port
                self._malformed("tx")
                continue
            frames.append(Frame(data, header))
        queue.push_used(used)
        return frames

    def _pop_tx_native(self, queue: SplitQueue, limit: int) -> list[Frame]:
        """pop_tx through the native walk (virtio._ring): the same frames, drops and errors."""
        frames, checks, runts, oversize, error = queue.pop_frames(limit, _TX_MIN, _TX_MAX)
        if runts:
            self.drops["tx_runt"] += runts
        if oversize:
            self.drops["tx_oversize"] += oversize
        if checks:
            refused = {at for at in checks
                       if not self._tx_header_ok(frames[at].offload, len(frames[at].data))}
            if refused:
                frames = [frame for at, frame in enumerate(frames) if at not in refused]
        if error is not None:
            raise error
        return frames

    def _malformed(self, direction: str) -> None:
        """Count a frame that raised while being handled; the first traceback is logged."""
        self.drops[f"{direction}_malformed"] += 1
        if not self._malformed_logged:
            self._malformed_logged = True
            log.exception("%s: dropped a %s frame that could not be handled (traceback logged "
                          "once, then counted as %s_malformed)", self.name, direction.upper(),
                          direction)

    def _tx_header_ok(self, header: tuple, length: int) -> bool:
        """Check offload metadata from the guest against what it negotiated; count refusals.

        `length` is the frame's (without the virtio-net header).
        """
        flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = header
        if flags & HDR_F_NEEDS_CSUM:
            if not self.tx_offloads & Offload.CSUM:
                self.drops["tx_csum_not_negotiated"] += 1
                return False
            if csum_start + csum_offset + 2 > length:
                self.drops["tx_bad_csum_offsets"] += 1
                return False
        if (gso_type & ~GSO_ECN) != GSO_NONE:
            need = needed_offloads(flags, gso_type)
            if need is None or need & ~int(self.tx_offloads):
                self.drops["tx_gso_not_negotiated"] += 1
                return False
            if gso_size == 0:
                self.drops["tx_gso_size_zero"] += 1
                return False
        return True

    # -- us -> guest ---------------------------------------------------------------------

    def push_rx(self, queue: SplitQueue, frames: deque[Frame], limit: int) -> tuple[int, int]:
        """Take up to `limit` frames from the left of `frames`: into RX buffers, or dropped.

        Stops early, leaving the rest queued, when the guest has no room for the next frame
        yet or the batch has cost WALK_BUDGET (`queue.walked`).  A frame that can never be
        placed is dropped and counted; it counts against `limit` like one delivered.  Returns
        (frames delivered, bytes delivered).
        """
        used: list[int] = []  # flat: head, length, head, length, ...
        mergeable = self.mergeable
        pack_header = VIRTIO_NET_HDR.pack_into
        scatter = _scatter if queue.native is None else queue.native.scatter
        drops = self.drops
        # Every pass of the loop below takes one frame off `frames` (delivered or dropped) or
        # ends the batch: at most `limit` passes.
        stop_at = max(len(frames) - limit, 0)
        # Chains popped ahead for the frames at hand; what is left over is given back.  The
        # native walk places the frames that fit their chain's first buffer as it pops (the
        # fast path below, in C); `ready` is then what is left for this loop.
        queue.walked = 0
        ready, popped, delivered, nbytes = queue.pop_rx(len(frames) - stop_at, frames, used)
        next_ready = 0
        while len(frames) > stop_at:
            if next_ready == len(ready):
                if queue.walked >= WALK_BUDGET:
                    break
                ready, popped, placed, placed_bytes = queue.pop_rx(len(frames) - stop_at,
                                                                   frames, used)
                delivered += placed
                nbytes += placed_bytes
                next_ready = 0
                if not popped:
                    break
                continue
            frame = frames[0]
            head, _, writable = ready[next_ready]
            if not writable:
                raise RingError(f"queue {queue.index}: RX chain {head} has no writable buffer")
            mm, start, stop = writable[0]
            # Anything the frame itself raises comes before a chain is consumed: the frame is
            # dropped, the chain serves the next one.
            try:
                data = frame.data
                need = VIRTIO_NET_HDR_LEN + len(data)
                if stop - start >= need:
                    # The common case: the first buffer holds header and frame.
                    offload = frame.offload
                    if offload is PLAIN:
                        mm[start : start + VIRTIO_NET_HDR_LEN] = _PLAIN_HEADER
                    else:
                        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = offload
                        pack_header(mm, start, flags, gso_type, hdr_len, gso_size, csum_start,
                                    csum_offset, 1)
                    mm[start + VIRTIO_NET_HDR_LEN : start + need] = data  # the one copy
                    used += (head, need)
                    next_ready += 1
                else:
                    room = _room(writable)
                    if room < need:
                        if need > VIRTIO_NET_HDR_LEN + MAX_FRAME:
                            drops["rx_oversize"] += 1
                            frames.popleft()
                            continue
                        if not mergeable:
                            # The guest's buffer cannot hold it: drop the frame, keep the buffer.
                            drops["rx_buffer_too_small"] += 1
                            frames.popleft()
                            continue
                        too_small = self._rx_too_small
                        if (too_small is not None and need > too_small[2]
                                and too_small[0] is queue and too_small[1] == queue.avail_idx()):
                            # Nothing was added since the whole ring proved too small.
                            drops["rx_ring_too_small"] += 1
                            frames.popleft()
                            continue
                    header = bytearray(VIRTIO_NET_HDR_LEN)
                    frame.pack_virtio_header(header, 0, 1)
                    source = memoryview(data).cast("B")
                    if room >= need:
                        scatter(header, source, [ready[next_ready]], used)
                        next_ready += 1
                    else:
                        avail_idx = queue.avail_idx()  # before the gather reads the ring
                        walked = queue.walked
                        taken, room = _gather(queue, ready, next_ready, room, need)
                        ready, next_ready = [], 0
                        if taken is None:
                            if queue.walked - walked >= WALK_BUDGET:
                                drops["rx_too_fragmented"] += 1
                            elif queue.driver_descriptors_exhausted():
                                # All the guest can offer is there and still too small.
                                drops["rx_ring_too_small"] += 1
                                self._rx_too_small = (queue, avail_idx, room)
                            else:
                                break  # the guest may add buffers: keep the frame queued
                            frames.popleft()
                            continue
                        _NUM_BUFFERS.pack_into(header, VIRTIO_NET_HDR_LEN - 2, len(taken))
                        scatter(header, source, taken, used)
            except RingError:
                raise
            except Exception:
                frames.popleft()
                self._malformed("rx")
                continue
            frames.popleft()
            delivered += 1
            nbytes += need - VIRTIO_NET_HDR_LEN
        if next_ready < len(ready):
            queue.unpop(len(ready) - next_ready)
        queue.push_used(used)
        return delivered, nbytes


def _gather(
    queue: SplitQueue, ready: list[Chain], start: int, room: int, need: int
) -> tuple[list[Chain] | None, int]:
    """Mergeable RX: chains from `ready[start:]` (then the ring) until `need` bytes fit.

    Returns (the chains, their room).  All or nothing: on success the chains not needed go
    back to the ring; on failure (None: the ring ran out, or the chains popped here cost
    WALK_BUDGET) all of them do (and cost `walked` again when the batch pops them again).
    """
    taken = [ready[start]]
    rest = ready[start + 1 :]
    next_rest = 0
    chain_room = room
    walked = queue.walked
    while room < need:
        if next_rest == len(rest):
            # As many more chains as the frame needs if they are like the last one.
            want = -(-(need - room) // chain_room)
            rest = queue.pop(want) if queue.walked - walked < WALK_BUDGET else []
            next_rest = 0
            if not rest:
                queue.unpop(len(taken))
                return None, room
        chain = rest[next_rest]
        next_rest += 1
        taken.append(chain)
        if not chain[2]:
            raise RingError(f"queue {queue.index}: RX chain {chain[0]} has no writable buffer")
        chain_room = _room(chain[2])
        room += chain_room
    queue.unpop(len(rest) - next_rest)
    return taken, room


def _scatter(header: bytearray, source: memoryview, chains: list[Chain], used: list[int]) -> None:
    """Header then frame bytes, spread over the chains' writable spans in order (the native
    walk's Ring.scatter does the same in C)."""
    sources = (memoryview(header), source)
    source_index = 0
    source_offset = 0
    for head, _, writable in chains:
        written = 0
        for mm, start, stop in writable:
            position = start
            while position < stop and source_index < len(sources):
                source = sources[source_index]
                take = min(stop - position, len(source) - source_offset)
                mm[position : position + take] = source[source_offset : source_offset + take]
                position += take
                source_offset += take
                written += take
                if source_offset == len(source):
                    source_index += 1
                    source_offset = 0
            if source_index == len(sources):
                break
        used += (head, written)


def _room(spans: list[Span]) -> int:
    return sum(stop - start for _, start, stop in spans)
