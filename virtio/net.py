"""The virtio-net data path on split virtqueues: guest TX chains become netstack Frames, and
Frames are written into guest RX buffers (virtio 1.x, 5.1.6).

Path of a frame out of the guest (`pop_tx`): pop the TX chain -> read the 12-byte
virtio_net_hdr once -> copy the frame bytes out of guest memory (the one copy) -> check the
offload metadata against what was negotiated -> return the chain as used (len 0).

Path of a frame into the guest (`push_rx`): reserve enough RX chains for header + frame (one
chain, or several with MRG_RXBUF, all or nothing) -> write the header and scatter the frame
(the one copy) -> record used entries; one used.idx store and at most one call per batch.
The caller (the Trio shell) does the notifying: this module never touches an fd.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, deque

from netstack.frame import (
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR,
    Frame,
    Offload,
)
from virtio.spec import NET_HDR_LEN, Feature, has
from virtio.vring import RingError, SplitQueue

log = logging.getLogger(__name__)

_HDR = struct.Struct("<BBHHHH")  # the offload part; num_buffers is ignored on TX
_NUM_BUFFERS = struct.Struct("<H")
_ZERO_HDR = bytes(NET_HDR_LEN)


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


_GSO_OFFLOAD = {
    GSO_TCPV4: Offload.TSO4,
    GSO_TCPV6: Offload.TSO6,
    GSO_UDP: Offload.UFO,
    GSO_UDP_L4: Offload.USO,
}


class NetQueues:
    """The data path of one virtio-net device: offload policy plus per-frame ring work."""

    def __init__(self, features: int) -> None:
        self.mergeable = has(features, Feature.NET_MRG_RXBUF)
        self.tx_offloads = offloads_from_features(features, guest=False)
        self.rx_offloads = offloads_from_features(features, guest=True)
        self.drops: Counter[str] = Counter()

    # -- guest -> us ---------------------------------------------------------------------

    def pop_tx(self, queue: SplitQueue, limit: int) -> list[Frame]:
        """Pop up to `limit` TX chains, return their frames, and give the chains back as used."""
        chains = queue.pop(limit)
        if not chains:
            return []
        frames = []
        used = []
        unpack_header = _HDR.unpack_from
        for head, buffers, _ in chains:
            used.append((head, 0))
            first = buffers[0]
            if len(first) >= NET_HDR_LEN:
                header = unpack_header(first, 0)  # read once, before the copy
                if len(buffers) == 1:
                    data = bytes(first[NET_HDR_LEN:])  # the one copy
                else:
                    data = b"".join([first[NET_HDR_LEN:], *buffers[1:]])  # the one copy
            else:  # the header itself is split over descriptors (rare)
                whole = b"".join(buffers)
                if len(whole) < NET_HDR_LEN:
                    queue.push_used(used)
                    raise RingError(
                        f"queue {queue.index}: TX chain {head} holds {len(whole)} bytes, "
                        f"less than the {NET_HDR_LEN}-byte virtio-net header"
                    )
                header = unpack_header(whole, 0)
                data = whole[NET_HDR_LEN:]
            if header[0] or header[1]:
                frame = Frame(data, header)
                if not self._tx_header_ok(frame):
                    continue
            else:
                frame = Frame(data)
            frames.append(frame)
        queue.push_used(used)
        return frames

    def _tx_header_ok(self, frame: Frame) -> bool:
        """Check offload metadata from the guest against what it negotiated; count refusals."""
        length = len(frame.data)
        if frame.flags & HDR_F_NEEDS_CSUM:
            if not self.tx_offloads & Offload.CSUM:
                self.drops["tx_csum_not_negotiated"] += 1
                return False
            if frame.csum_start + frame.csum_offset + 2 > length:
                self.drops["tx_bad_csum_offsets"] += 1
                return False
        gso = frame.gso_type & ~GSO_ECN
        if gso != GSO_NONE:
            need = _GSO_OFFLOAD.get(gso)
            if need is None or not self.tx_offloads & need:
                self.drops["tx_gso_not_negotiated"] += 1
                return False
            if frame.gso_type & GSO_ECN and not self.tx_offloads & Offload.ECN:
                self.drops["tx_gso_not_negotiated"] += 1
                return False
            if frame.gso_size == 0:
                self.drops["tx_gso_size_zero"] += 1
                return False
        return True

    # -- us -> guest ---------------------------------------------------------------------

    def push_rx(self, queue: SplitQueue, frames: deque[Frame], limit: int) -> tuple[int, int]:
        """Move up to `limit` frames from the left of `frames` into RX buffers.

        Stops early, leaving the rest queued, when the guest has no buffers left.
        Returns (frames delivered, bytes delivered).
        """
        used: list[tuple[int, int]] = []
        delivered = 0
        nbytes = 0
        mergeable = self.mergeable
        pack_header = VIRTIO_NET_HDR.pack_into
        # Chains popped ahead for the frames at hand; what is left over is given back.
        ready = queue.pop(min(len(frames), limit))
        next_ready = 0
        while frames and delivered < limit:
            if next_ready == len(ready):
                ready = queue.pop(min(len(frames), limit - delivered))
                next_ready = 0
                if not ready:
                    break
            frame = frames[0]
            data = frame.data
            need = NET_HDR_LEN + len(data)
            head, _, writable = ready[next_ready]
            if len(writable) == 1 and len(writable[0]) >= need:
                # The common case: one buffer holds header and frame.
                buf = writable[0]
                pack_header(buf, 0, *frame.offload, 1)
                buf[NET_HDR_LEN:need] = data  # the one copy
                used.append((head, need))
                next_ready += 1
            else:
                room = sum(map(len, writable))
                if room >= need:
                    self._write_frame(frame, [ready[next_ready]], need, used)
                    next_ready += 1
                elif mergeable:
                    taken = self._gather(queue, ready, next_ready, room, need)
                    if taken is None:  # not enough buffers yet: keep the frame queued
                        ready, next_ready = [], 0
                        break
                    self._write_frame(frame, taken, need, used)
                    ready, next_ready = [], 0
                else:
                    # The guest's buffer cannot hold it: drop the frame, keep the buffer.
                    frames.popleft()
                    self.drops["rx_buffer_too_small"] += 1
                    continue
            frames.popleft()
            delivered += 1
            nbytes += need - NET_HDR_LEN
        if next_ready < len(ready):
            queue.unpop(len(ready) - next_ready)
        queue.push_used(used)
        return delivered, nbytes

    @staticmethod
    def _gather(
        queue: SplitQueue, ready: list, start: int, room: int, need: int
    ) -> list | None:
        """Mergeable RX: chains from `ready[start:]` (then the ring) until `need` bytes fit.

        On success the chains not used are given back to the ring; on failure all are.
        """
        taken = [ready[start]]
        rest = ready[start + 1 :]
        while room < need:
            if not rest:
                rest = queue.pop(1)
                if not rest:
                    queue.unpop(len(taken))
                    return None
            chain = rest.pop(0)
            taken.append(chain)
            room += sum(map(len, chain[2]))
        queue.unpop(len(rest))
        return taken

    @staticmethod
    def _write_frame(frame: Frame, chains: list, need: int, used: list[tuple[int, int]]) -> None:
        """Header then frame bytes, scattered over the chains' writable buffers."""
        data = frame.data
        header = bytearray(NET_HDR_LEN)
        frame.pack_virtio_header(header, 0, len(chains))
        source = memoryview(header)
        src_off = 0
        in_header = True
        remaining = need
        for head, _, writable in chains:
            written = 0
            for buf in writable:
                buf_off = 0
                space = len(buf)
                while space and remaining:
                    take = min(space, len(source) - src_off)
                    buf[buf_off : buf_off + take] = source[src_off : src_off + take]
                    buf_off += take
                    space -= take
                    src_off += take
                    written += take
                    remaining -= take
                    if src_off == len(source) and in_header:
                        source = memoryview(data)
                        src_off = 0
                        in_header = False
                if not remaining:
                    break
            used.append((head, written))
