"""A learning Ethernet switch in userspace: the heart of `vhostvpn hub`.

Path of a batch through `forward(ingress, frames)`:
0. size and metadata: runts (shorter than an Ethernet header) and frames longer than
   MAX_FRAME_LEN are dropped (`runt`, `oversize`), as are multicast sources and frames whose
   offload metadata `netstack.offload.check_offload` refuses (`offload_<reason>`: unknown
   flags, checksum offsets past the frame, an unknown GSO type, a gso_size of 0 or below
   MIN_GSO_SIZE), from any port.
1. policy (netstack.policy), for ports that have one: MAC anti-spoofing and limit, the
   broadcast/multicast token bucket (a GSO frame costs a token per segment it may become),
   then the fixed-offset network-layer checks (IP source and ND target binding, the claim
   limit, ARP sender, DHCP and RA guards, stacked VLAN tags, 802.3/LLC).  Trusted ports (the
   hub's services) skip it.
2. learning: the source MAC is (re)bound to the ingress port -- unless it is bound for good
   elsewhere: reserved (`reserve`, the gateway's MAC) or pinned by a running DHCP lease
   (`bind_lease`); such MACs never age and cannot move (`mac_spoof`, policed or not).
3. lookup: the destination's port, or flooding (broadcast, multicast, unknown unicast) to
   every other port -- but no unknown unicast to a `service` port (the gateway), which reads
   only its own; frames are regrouped per egress port.  A policed port pays its flood token
   for unknown unicast here (`flood_rate`), and a service token for a frame to a service
   port (`service_rate`).
4. delivery: each egress port gets one `deliver` call per batch, with frames it can take as
   they are; frames needing an offload it did not accept go through `netstack.offload.adapt`
   (segmented or checksummed in software, counted as `software_offloads`), or are dropped as
   `offload_<reason>` if they are malformed.  Software offloads of one batch, over all its
   egress ports, make at most `segment_budget` frames; the frames after that which need
   one are dropped (`offload_budget`, on the ingress port).  A service port gets no GSO
   frame it does not accept (`offload_ignored`): cutting one up costs the most, and the
   gateway takes TSO frames whole (its NAT reads a 64 KiB segment as one) but no UDP GSO.
A frame with the same destination and source as the frame just queued (a run: one flow's
frames in a row) meets the same table, so it skips the MAC part of steps 1-3 and joins the
same queue (an egress port's, or the flood); its own checks (0, the network layer, its flood
or service token) still run.  tests/test_switch_runs.py holds a batch to the same results as its
frames one by one.
Frames a port makes itself (netstack.port.SpeakingPort: the gateway's replies, a TUN host's
ARP) enter through `send(port)`, from the handler that made them: at once, or, when the port
answered a frame this switch was delivering, right after that batch's delivery, in the same
`forward` call (the switch is never re-entered from inside a port's `deliver`, and what the
ingress sent is delivered before the answers).  Ports that keep answering each other get
SEND_ROUNDS rounds per batch; `send` then says False and the port's shell forwards the rest.
Every drop is counted on a port, by reason.  Containment: an exception while switching one
frame drops that frame (`malformed` on the ingress port); one raised by an egress port's
`deliver` drops that batch (`internal_error` on the egress port) and the other ports still
get theirs; either way the traceback is logged (rate limited) and `forward` returns normally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from netstack.frame import (
    ETH_HEADER_LEN,
    ETHERTYPE_IP,
    GSO_NONE,
    MAX_FRAME_LEN,
    PLAIN,
    Frame,
    Offload,
    format_mac,
    needed_offloads,
)
from netstack.offload import OffloadError, adapt, check_offload
from netstack.policy import (
    DHCPV4_SERVER_PORT,
    IPPROTO_UDP,
    PERMANENT,
    AddressBook,
    check_l3,
)
from netstack.port import Port, SpeakingPort

log = logging.getLogger(__name__)

# How long a learned MAC stays bound to its port without being seen (IEEE 802.1D default).
MAC_AGING_SECONDS = 300.0
# Refresh a learned entry's timestamp at most this often (saves a tuple per frame).
_REFRESH_SECONDS = 1.0
# Frames the software offloads of one forward() call may make, over all egress ports: a
# full TX batch (256 chains) of 64 KiB TSO frames at MSS 1448 is 11.6k segments for one
# port that takes no TSO; at ~3 us a segment the bound is ~50 ms of work per call.
SEGMENT_BUDGET = 16384
# Rounds of ports' own frames one forward() sends after its batch (a reply, the answer a
# reply drew from another speaking port, ...); beyond, they wait for their ports' shells.
SEND_ROUNDS = 4
# How the frame that started a run was queued: to a known port, or flooded as a group
# (broadcast, multicast) or as unknown unicast.
_UNICAST, _GROUP, _UNKNOWN = "unicast", "group", "unknown"


class Switch:
    """MAC learning and flooding among ports.  No I/O; `clock` is injectable for tests.

    `mac_table` maps a MAC to (port, last seen); `seen` is PERMANENT for a reserved or pinned
    MAC, which every aging test then finds alive and never stale.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        aging: float = MAC_AGING_SECONDS,
        segment_budget: int = SEGMENT_BUDGET,
    ) -> None:
        self.clock = clock
        self.aging = aging
        self.segment_budget = segment_budget
        self.ports: list[Port] = []
        self.mac_table: dict[bytes, tuple[Port, float]] = {}
        self.mac_counts: dict[Port, int] = {}
        self.addresses = AddressBook(aging)
        self.reserved_macs: set[bytes] = set()
        # Leases the DHCP server told us of: leased IP -> the MAC it is pinned for; and how
        # many leases pin each MAC (as many entries as running leases: bounded by the pool).
        self._lease_macs: dict[bytes, bytes] = {}
        self._pins: dict[bytes, int] = {}
        # Called with each port as it is attached (the hub opens its capture there).
        self.on_attach: Callable[[Port], None] | None = None
        # `send`'s state: is a batch being delivered, whose outboxes wait for its end, and
        # how many more rounds of them this forward() sends.
        self._delivering = False
        self._speakers: list[SpeakingPort] = []
        self._rounds_left = SEND_ROUNDS

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
            self.reserved_macs.discard(mac)
        self.mac_counts[port] = 0
        self.addresses.forget(port)
        return len(stale)

    def reserve(self, port: Port, mac: bytes, ips: Iterable[bytes]) -> None:
        """Bind `mac` and `ips` to `port` for good (the gateway's): they never age, no other
        port may send from them (`mac_spoof`, `ip_spoof`), and no lease takes them."""
        if port not in self.ports:
            raise ValueError(f"port {port.name} is not attached")
        mac = bytes(mac)
        addresses = [bytes(ip) for ip in ips]
        self._move(mac, port, PERMANENT)
        self.reserved_macs.add(mac)
        for ip in addresses:
            self.addresses.reserve(ip, port)
        log.info("port %s: %s reserved with %d addresses", port.name, format_mac(mac),
                 len(addresses))

    def _move(self, mac: bytes, port: Port, seen: float) -> None:
        entry = self.mac_table.get(mac)
        if entry is None or entry[0] is not port:
            self.mac_counts[port] += 1
            if entry is not None:
                self.mac_counts[entry[0]] -= 1
        self.mac_table[mac] = (port, seen)

    def expire(self, now: float) -> None:
        """Sweep aged MACs and IP claims (the hub calls this every few seconds); `now` is on
        the switch's clock."""
        for mac, (owner, seen) in list(self.mac_table.items()):
            if now - seen > self.aging:
                del self.mac_table[mac]
                self.mac_counts[owner] -= 1
        self.addresses.expire(now)

    def bind_lease(self, ip: bytes, mac: bytes) -> None:
        """The hub's DHCP server leased `ip` to `mac`: only the port behind `mac` may use it,
        and `mac` stays pinned to that port while the lease runs (until `unbind_lease`)."""
        ip, mac = bytes(ip), bytes(mac)
        entry = self.mac_table.get(mac)
        if entry is None:
            log.warning("lease of %s to %s, a MAC on no port", ip.hex(), format_mac(mac))
            return
        port = entry[0]
        if not self.addresses.bind(ip, port, self.clock()):
            log.warning("port %s: lease of reserved address %s refused", port.name, ip.hex())
            return
        previous = self._lease_macs.get(ip)
        if previous != mac:
            if previous is not None:
                self._unpin(previous)
            self._lease_macs[ip] = mac
            self._pins[mac] = self._pins.get(mac, 0) + 1
        if entry[1] != PERMANENT:
            self.mac_table[mac] = (port, PERMANENT)

    def unbind_lease(self, ip: bytes) -> None:
        self.addresses.unbind(ip)
        mac = self._lease_macs.pop(ip, None)
        if mac is not None:
            self._unpin(mac)

    def _unpin(self, mac: bytes) -> None:
        """One lease of `mac` ended; with none left it ages again from now."""
        pins = self._pins[mac] - 1
        if pins:
            self._pins[mac] = pins
            return
        del self._pins[mac]
        entry = self.mac_table.get(mac)
        if entry is not None and entry[1] == PERMANENT and mac not in self.reserved_macs:
            self.mac_table[mac] = (entry[0], self.clock())

    def used_by_another_port(self, ip: bytes, mac: bytes) -> bool:
        """Is `ip` reserved, or has a port other than the one behind `mac` sent from it lately
        (a claim that has not aged out)?  The DHCP server asks before it offers `ip` to
        `mac`.  Only policed ports record claims; leases are the DHCP server's own business."""
        entry = self.addresses.owners.get(ip)
        if entry is None:
            return False
        owner, seen, leased = entry
        if seen == PERMANENT:
            return True
        if leased or self.clock() - seen > self.addresses.aging:
            return False
        learned = self.mac_table.get(mac)
        return learned is None or learned[0] is not owner

    def send(self, port: SpeakingPort) -> bool:
        """Forward the frames `port` made itself (its outbox), from the caller: now, or, when
        called while a batch is delivered (the port answered a frame of it), once that
        batch's delivery is over, in the same `forward` call.  False when the ports' answers
        to each other ran SEND_ROUNDS rounds in this call: the frames stay in the outbox,
        for the port's shell."""
        if self._delivering:
            if self._rounds_left <= 0:
                return False
            if port not in self._speakers:
                self._speakers.append(port)
            return True
        frames = port.take_outbox()
        if frames:
            self.forward(port, frames)
        return True

    def _send_waiting(self) -> None:
        """The outboxes filled while a batch was delivered (forward's tail): forwarded, the
        answers they draw in their turn too, up to SEND_ROUNDS rounds."""
        try:
            for rounds_left in range(SEND_ROUNDS - 1, -1, -1):
                self._rounds_left = rounds_left
                speakers, self._speakers = self._speakers, []
                for port in speakers:
                    frames = port.take_outbox()
                    if frames:
                        self.forward(port, frames)
                if not self._speakers:
                    break
        finally:
            self._rounds_left = SEND_ROUNDS
            self._speakers.clear()

    def forward(self, ingress: Port, frames: list[Frame]) -> None:
        """Switch a batch of frames that arrived on `ingress`.  Never raises because of what
        a frame holds or what an egress port does with it."""
        now = self.clock()
        if ingress.capture is not None:
            ingress.capture.write([frame.data for frame in frames], "in")
        policy = ingress.policy
        table = self.mac_table
        counts = self.mac_counts
        aging = self.aging
        owners = self.addresses.owners
        counters = ingress.counters
        by_port: dict[Port, list[Frame]] = {}
        flood: list[Frame] = []
        unknown = 0  # how many frames of `flood` are unknown unicast
        nbytes = 0
        # The run: the addresses (destination and source, 12 bytes) of the frame just queued,
        # the queue it joined (an egress port's, or `flood`) and how (_UNICAST, _GROUP,
        # _UNKNOWN).  A frame with the same addresses right after it meets the same table,
        # so its steps 1 (MAC), 2 and 3 give the same answer: only its own checks are left
        # (size, offload, the network layer, its flood or service token).  Any frame that
        # takes the long way ends the run first.
        run_key = None
        run_batch: list[Frame] = []
        run_kind = _UNICAST
        run_service = False
        offloaded = False  # does any frame carry offload metadata (then _fit may apply)?
        for frame in frames:
            try:
                data = frame.data
                size = len(data)
                nbytes += size
                if size < ETH_HEADER_LEN or size > MAX_FRAME_LEN:
                    counters.drop("runt" if size < ETH_HEADER_LEN else "oversize")
                    continue
                offload = frame.offload
                if offload is not PLAIN:
                    offloaded = True
                    reason = check_offload(offload, size)
                    if reason is not None:
                        counters.drop(f"offload_{reason}")
                        continue
                if run_key is not None:
                    if data[0:12] == run_key:
                        if policy is not None:
                            if run_kind is _GROUP and not policy.take_flood_token(
                                    now, _cost(offload, size)):
                                counters.drop("flood_rate")
                                continue
                            if not _l3_fast(data, size, owners, ingress, now):
                                reason = check_l3(data, ingress, self.addresses, now,
                                                  policy.claim_limit)
                                if reason is not None:
                                    counters.drop(reason)
                                    continue
                            if run_kind is _UNKNOWN and not policy.take_flood_token(
                                    now, _cost(offload, size)):
                                counters.drop("flood_rate")
                                continue
                            if run_service and not policy.take_service_token(now):
                                counters.drop("service_rate")
                                continue
                        run_batch.append(frame)
                        if run_kind is _UNKNOWN:
                            unknown += 1
                        continue
                    run_key = None
                # Slices of bytes are bytes; slices of a memoryview hash and compare like
                # bytes, so lookups need no copy.  Only a newly learned key is made bytes.
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
                    if data[0] & 1 and not policy.take_flood_token(now, _cost(offload, size)):
                        counters.drop("flood_rate")
                        continue
                    if not _l3_fast(data, size, owners, ingress, now):
                        reason = check_l3(data, ingress, self.addresses, now, policy.claim_limit)
                        if reason is not None:
                            counters.drop(reason)
                            continue
                # 2. learning
                if entry is None or entry[0] is not ingress or now - entry[1] > _REFRESH_SECONDS:
                    if entry is None or entry[0] is not ingress:
                        if entry is not None:
                            if entry[1] == PERMANENT:  # reserved or pinned: never moves
                                counters.drop("mac_spoof")
                                continue
                            counts[entry[0]] -= 1
                            if log.isEnabledFor(logging.DEBUG):
                                log.debug("mac %s moved from %s to %s",
                                          format_mac(bytes(src)), entry[0].name, ingress.name)
                        counts[ingress] += 1
                    table[bytes(src)] = (ingress, now)
                # 3. lookup
                dst = data[0:6]
                if dst[0] & 1:
                    flood.append(frame)
                    run_key, run_batch, run_kind, run_service = data[0:12], flood, _GROUP, False
                    continue
                entry = table.get(dst)
                if entry is None or now - entry[1] > aging:
                    if policy is not None and not policy.take_flood_token(
                            now, _cost(offload, size)):
                        counters.drop("flood_rate")
                        continue
                    flood.append(frame)
                    unknown += 1
                    run_key, run_batch, run_kind, run_service = data[0:12], flood, _UNKNOWN, False
                    continue
                egress = entry[0]
                if egress is ingress:
                    counters.drop("same_port")
                    continue
                if egress.service and policy is not None and not policy.take_service_token(now):
                    counters.drop("service_rate")
                    continue
                batch = by_port.get(egress)
                if batch is None:
                    batch = by_port[egress] = [frame]
                else:
                    batch.append(frame)
                run_key, run_batch, run_kind, run_service = data[0:12], batch, _UNICAST, \
                    egress.service
            except Exception:  # one frame's trouble is that frame's
                ingress.drop_unexpected("malformed", 1, "switching a frame")
        counters.in_frames += len(frames)
        counters.in_bytes += nbytes
        if flood:
            group = None
            for port in self.ports:
                if port is not ingress:
                    extra = flood
                    if port.service:
                        if group is None:  # a service port reads no unicast but its own
                            group = ([frame for frame in flood if frame.data[0] & 1]
                                     if unknown else flood)
                        extra = group
                    if not extra:
                        continue
                    batch = by_port.get(port)
                    by_port[port] = extra if batch is None else batch + extra
        # 4. delivery
        budget = [self.segment_budget]
        delivering, self._delivering = self._delivering, True
        try:
            for egress, batch in by_port.items():
                try:
                    if offloaded or egress.capture is not None:
                        self._deliver(ingress, egress, batch, budget, offloaded)
                    else:  # (the common batch: nothing to fit or capture)
                        egress.deliver(batch)
                except Exception:  # one port's trouble is that port's
                    egress.drop_unexpected("internal_error", len(batch),
                                           f"delivering frames from {ingress.name}")
        finally:
            self._delivering = delivering
        # What ports answered meanwhile (`send`), unless an outer forward's tail sends it.
        if self._speakers and self._rounds_left == SEND_ROUNDS:
            self._send_waiting()

    @staticmethod
    def _deliver(ingress: Port, egress: Port, batch: list[Frame], budget: list[int],
                 offloaded: bool) -> None:
        if offloaded:
            for frame in batch:
                if frame.offload is not PLAIN:
                    batch = _fit(ingress, egress, batch, budget)
                    break
        if batch:
            if egress.capture is not None:
                egress.capture.write([frame.data for frame in batch], "out")
            egress.deliver(batch)

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {
            "macs": [
                {"mac": format_mac(mac), "port": port.name,
                 "age": None if seen == PERMANENT else round(now - seen, 1)}
                for mac, (port, seen) in self.mac_table.items()
                if now - seen <= self.aging
            ],
        }


def _l3_fast(data: bytes, size: int, owners: dict, ingress: Port, now: float) -> bool:
    """The network layer's fast path: plain IPv4 (no options, not from a DHCP server's port)
    from an address `ingress` owns and was seen with just now; it was checked when claimed.
    False: `check_l3` decides."""
    if size >= 38 and data[12:14] == ETHERTYPE_IP and data[14] == 0x45 \
            and not (data[23] == IPPROTO_UDP and data[34:36] == DHCPV4_SERVER_PORT):
        owner = owners.get(data[26:30])
        return owner is not None and owner[0] is ingress and (
            owner[2] or now - owner[1] <= _REFRESH_SECONDS)
    return False


def _cost(offload: tuple, size: int) -> int:
    """Flood tokens a frame costs: one, or for a GSO frame one per segment it may become."""
    if offload[1] == GSO_NONE:
        return 1
    return size // offload[3] + 1  # check_offload saw a gso_size > 0


def _cannot_take(offload: tuple, accepts: Offload) -> bool:
    """Does a port that accepts `accepts` need this frame adapted (or can it never take it)?"""
    need = needed_offloads(offload[0], offload[1])
    return need is None or bool(need & ~accepts)


def _fit(ingress: Port, egress: Port, batch: list[Frame], budget: list[int]) -> list[Frame]:
    """The batch as `egress` can take it: frames needing an offload it did not accept are
    checksummed or segmented in software (netstack.offload), each output frame taken from
    `budget[0]` (shared by the ingress batch's egress ports); once it is spent, such frames
    are dropped (`offload_budget` on `ingress`), as are malformed ones.  A service port
    gets no GSO frame it does not accept whole (`offload_ignored`)."""
    accepts = egress.accepts
    counters = egress.counters
    service = egress.service
    fitted: list[Frame] = []
    for frame in batch:
        if frame.offload is PLAIN:
            fitted.append(frame)
            continue
        if service and frame.offload[1] != GSO_NONE and _cannot_take(frame.offload, accepts):
            counters.drop("offload_ignored")
            continue
        if budget[0] <= 0 and _cannot_take(frame.offload, accepts):
            ingress.counters.drop("offload_budget")
            continue
        try:
            adapted = adapt(frame, accepts)  # [frame] itself when the port takes it as it is
        except OffloadError as exc:
            counters.drop(f"offload_{exc.reason}")
            continue
        except Exception:  # one frame's trouble is that frame's
            egress.drop_unexpected("offload_internal_error", 1, "fitting a frame")
            continue
        if len(adapted) != 1 or adapted[0] is not frame:
            counters.software_offloads += 1
            budget[0] -= len(adapted)
        fitted.extend(adapted)
    return fitted
