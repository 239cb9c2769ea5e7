"""A learning Ethernet switch in userspace: the heart of `vhostvpn hub`.

Frames arrive in batches from a port (`forward`).  For each frame the fast path reads only the
Ethernet addresses: it learns the source MAC on the ingress port, then sends the frame to the
port that owns the destination, or floods it (broadcast, multicast, unknown unicast) to every
other port.  Frames are regrouped per egress port and each port gets one `deliver` call per
batch.  A frame that needs an offload (TSO, partial checksum) the egress port does not accept
is dropped there and counted as `offload` (software segmentation comes with the netstack issue).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from netstack.frame import ETH_HEADER_LEN, PLAIN, Frame, format_mac
from netstack.port import Port

log = logging.getLogger(__name__)

# How long a learned MAC stays bound to its port without being seen (IEEE 802.1D default).
MAC_AGING_SECONDS = 300.0
# Refresh a learned entry's timestamp at most this often (saves a tuple per frame).
_REFRESH_SECONDS = 1.0


class Switch:
    """MAC learning and flooding among ports.  No I/O; `clock` is injectable for tests."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        aging: float = MAC_AGING_SECONDS,
    ) -> None:
        self.clock = clock
        self.aging = aging
        self.ports: list[Port] = []
        self.mac_table: dict[bytes, tuple[Port, float]] = {}

    def attach(self, port: Port) -> None:
        if port in self.ports:
            raise ValueError(f"port {port.name} is already attached")
        self.ports.append(port)
        log.info("port %s attached", port.name)

    def detach(self, port: Port) -> None:
        if port not in self.ports:
            return
        self.ports.remove(port)
        stale = [mac for mac, (owner, _) in self.mac_table.items() if owner is port]
        for mac in stale:
            del self.mac_table[mac]
        log.info("port %s detached, %d MACs forgotten", port.name, len(stale))

    def forget(self, port: Port) -> None:
        """Drop what was learned on `port` (its guest rebooted or its peer reconnected)."""
        for mac in [m for m, (owner, _) in self.mac_table.items() if owner is port]:
            del self.mac_table[mac]

    def forward(self, ingress: Port, frames: list[Frame]) -> None:
        """Switch a batch of frames that arrived on `ingress`."""
        now = self.clock()
        table = self.mac_table
        aging = self.aging
        counters = ingress.counters
        debug = log.isEnabledFor(logging.DEBUG)
        by_port: dict[Port, list[Frame]] = {}
        flood: list[Frame] = []
        nbytes = 0
        for frame in frames:
            data = frame.data
            nbytes += len(data)
            if len(data) < ETH_HEADER_LEN:
                counters.drop("runt")
                continue
            # Slices of bytes are bytes; slices of a memoryview hash and compare like bytes,
            # so lookups need no copy.  Only a newly learned key is made bytes.
            src = data[6:12]
            if src[0] & 1:
                counters.drop("multicast_source")
                continue
            entry = table.get(src)
            if entry is None or entry[0] is not ingress or now - entry[1] > _REFRESH_SECONDS:
                if entry is not None and entry[0] is not ingress and debug:
                    log.debug("mac %s moved from %s to %s",
                              format_mac(bytes(src)), entry[0].name, ingress.name)
                table[bytes(src)] = (ingress, now)
            dst = data[0:6]
            if dst[0] & 1:
                flood.append(frame)
                continue
            entry = table.get(dst)
            if entry is None or now - entry[1] > aging:
                flood.append(frame)
                continue
            egress = entry[0]
            if egress is ingress:
                counters.drop("same_port")
                continue
            batch = by_port.get(egress)
            if batch is None:
                by_port[egress] = [frame]
            else:
                batch.append(frame)
        counters.in_frames += len(frames)
        counters.in_bytes += nbytes
        if flood:
            for port in self.ports:
                if port is not ingress:
                    batch = by_port.get(port)
                    by_port[port] = flood if batch is None else batch + flood
        for egress, batch in by_port.items():
            self._deliver(egress, batch)

    @staticmethod
    def _deliver(egress: Port, batch: list[Frame]) -> None:
        accepts = egress.accepts
        fitting = [f for f in batch if f.offload is PLAIN
                   or not (f.offload[0] or f.offload[1])
                   or not (f.required_offloads & ~accepts)]
        if len(fitting) != len(batch):
            egress.counters.drop("offload", len(batch) - len(fitting))
        if fitting:
            egress.deliver(fitting)

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {
            "macs": [
                {"mac": format_mac(mac), "port": port.name, "age": round(now - seen, 1)}
                for mac, (port, seen) in self.mac_table.items()
                if now - seen <= self.aging
            ],
        }
