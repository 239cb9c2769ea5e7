"""A learning Ethernet switch in userspace: the heart of `vhostvpn hub`.

Path of a batch through `forward(ingress, frames)`:
1. policy (netstack.policy), for ports that have one: MAC anti-spoofing and limit, the
   broadcast/multicast token bucket, then the fixed-offset network-layer checks (IP source
   binding, ARP sender, DHCP and RA guards).  Trusted ports (the hub's services) skip it.
2. learning: the source MAC is (re)bound to the ingress port.
3. lookup: the destination's port, or flooding (broadcast, multicast, unknown unicast) to
   every other port; frames are regrouped per egress port.
4. delivery: each egress port gets one `deliver` call per batch, with frames it can take as
   they are; frames needing an offload it did not accept go through `netstack.offload.adapt`
   (segmented or checksummed in software, counted as `software_offloads`), or are dropped as
   `offload_<reason>` if they are malformed.
Every drop is counted on a port, by reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from netstack.frame import ETH_HEADER_LEN, PLAIN, Frame, format_mac
from netstack.offload import OffloadError, adapt
from netstack.policy import (
    DHCPV4_SERVER_PORT,
    ETHERTYPE_IPV4,
    IPPROTO_UDP,
    AddressBook,
    check_l3,
)
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
        self.mac_counts: dict[Port, int] = {}
        self.addresses = AddressBook(aging)
        # Called with each port as it is attached (the hub opens its capture there).
        self.on_attach: Callable[[Port], None] | None = None

    def attach(self, port: Port) -> None:
        if port in self.ports:
            raise ValueError(f"port {port.name} is already attached")
        self.ports.append(port)
        self.mac_counts[port] = 0
        log.info("port %s attached", port.name)
        if self.on_attach is not None:
            self.on_attach(port)

    def detach(self, port: Port) -> None:
        if port not in self.ports:
            return
        self.ports.remove(port)
        forgotten = self.forget(port)
        del self.mac_counts[port]
        log.info("port %s detached, %d MACs forgotten", port.name, forgotten)

    def forget(self, port: Port) -> int:
        """Drop what was learned on `port`, MACs and IP claims (its guest went away)."""
        stale = [mac for mac, (owner, _) in self.mac_table.items() if owner is port]
        for mac in stale:
            del self.mac_table[mac]
        self.mac_counts[port] = 0
        self.addresses.forget(port)
        return len(stale)

    def expire(self) -> None:
        """Sweep aged MACs and IP claims (the hub calls this every few seconds)."""
        now = self.clock()
        for mac, (owner, seen) in list(self.mac_table.items()):
            if now - seen > self.aging:
                del self.mac_table[mac]
                self.mac_counts[owner] -= 1
        self.addresses.expire(now)

    def bind_lease(self, ip: bytes, mac: bytes) -> None:
        """The hub's DHCP server leased `ip` to `mac`: only the port behind `mac` may use it."""
        entry = self.mac_table.get(mac)
        if entry is None:
            log.warning("lease of %s to %s, a MAC on no port", ip.hex(), format_mac(mac))
            return
        self.addresses.bind(ip, entry[0], self.clock())

    def unbind_lease(self, ip: bytes) -> None:
        self.addresses.unbind(ip)

    def used_by_another_port(self, ip: bytes, mac: bytes) -> bool:
        """Has a port other than the one behind `mac` sent from `ip` lately (a claim that has
        not aged out)?  The DHCP server asks before it offers `ip` to `mac`.  Only policed
        ports record claims; leases are the DHCP server's own business."""
        entry = self.addresses.owners.get(ip)
        if entry is None:
            return False
        owner, seen, leased = entry
        if leased or self.clock() - seen > self.addresses.aging:
            return False
        learned = self.mac_table.get(mac)
        return learned is None or learned[0] is not owner

    def forward(self, ingress: Port, frames: list[Frame]) -> None:
        """Switch a batch of frames that arrived on `ingress`."""
        now = self.clock()
        if ingress.capture is not None:
            ingress.capture.write([frame.data for frame in frames], "in")
        policy = ingress.policy
        table = self.mac_table
        counts = self.mac_counts
        aging = self.aging
        owners = self.addresses.owners
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
            if policy is not None:
                # 1. policy (netstack.policy): MAC first, then the network layer.
                if entry is None or entry[0] is not ingress:
                    if entry is not None and now - entry[1] <= aging:
                        counters.drop("mac_spoof")
                        continue
                    if counts[ingress] >= policy.mac_limit:
                        counters.drop("mac_limit")
                        continue
                if data[0] & 1 and not policy.take_flood_token(now):
                    counters.drop("flood_rate")
                    continue
                # Fast path: plain IPv4 (no options, not a DHCP server's port) from an address
                # this port owns and was seen with just now; it was checked when claimed.
                owner = None
                if len(data) >= 38 and data[12:14] == ETHERTYPE_IPV4 and data[14] == 0x45 \
                        and not (data[23] == IPPROTO_UDP and data[34:36] == DHCPV4_SERVER_PORT):
                    owner = owners.get(data[26:30])
                if owner is None or owner[0] is not ingress or (
                    not owner[2] and now - owner[1] > _REFRESH_SECONDS
                ):
                    reason = check_l3(data, ingress, self.addresses, now)
                    if reason is not None:
                        counters.drop(reason)
                        continue
            # 2. learning
            if entry is None or entry[0] is not ingress or now - entry[1] > _REFRESH_SECONDS:
                if entry is None or entry[0] is not ingress:
                    counts[ingress] += 1
                    if entry is not None:
                        counts[entry[0]] -= 1
                        if debug:
                            log.debug("mac %s moved from %s to %s",
                                      format_mac(bytes(src)), entry[0].name, ingress.name)
                table[bytes(src)] = (ingress, now)
            # 3. lookup
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
        # 4. delivery
        for egress, batch in by_port.items():
            self._deliver(egress, batch)

    @staticmethod
    def _deliver(egress: Port, batch: list[Frame]) -> None:
        for frame in batch:
            if frame.offload is not PLAIN:
                batch = _fit(egress, batch)
                break
        if batch:
            if egress.capture is not None:
                egress.capture.write([frame.data for frame in batch], "out")
            egress.deliver(batch)

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {
            "macs": [
                {"mac": format_mac(mac), "port": port.name, "age": round(now - seen, 1)}
                for mac, (port, seen) in self.mac_table.items()
                if now - seen <= self.aging
            ],
        }


def _fit(egress: Port, batch: list[Frame]) -> list[Frame]:
    """The batch as `egress` can take it: frames needing an offload it did not accept are
    checksummed or segmented in software (netstack.offload); malformed ones are dropped."""
    accepts = egress.accepts
    counters = egress.counters
    fitted: list[Frame] = []
    for frame in batch:
        if frame.offload is PLAIN:
            fitted.append(frame)
            continue
        try:
            adapted = adapt(frame, accepts)  # [frame] itself when the port takes it as it is
        except OffloadError as exc:
            counters.drop(f"offload_{exc.reason}")
            continue
        if len(adapted) != 1 or adapted[0] is not frame:
            counters.software_offloads += 1
        fitted.extend(adapted)
    return fitted
