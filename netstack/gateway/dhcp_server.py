"""The hub's DHCPv4 server (RFC 2131/2132): Ethernet frames in, Ethernet frames out, no
sockets and no files.

The gateway port (gateway/port.py) hands `DhcpServer.handle` every IPv4/UDP frame addressed
to port 67 and puts the frames it returns into the switch; its timed work calls `expire`.
The hub's shell (tunnel/hub.py) reads the lease file once (dhcp_store.read_state) and passes
what it read to the constructor; whenever the server is `dirty` it takes `write_job()`, runs
it through dhcp_store.write_state in a worker thread and reports back (`persisted`,
`persist_failed`).  The server must never raise on what a guest sends, never give a guest a
lease for a MAC other than its own, and never let one client (a switch port) take more than
its budget of messages, declines, table entries or time; who holds which address is the
lease table's (dhcp_leases.py), which never hands one address to two MACs.

Rules
-----
* Parsing is apart from deciding.  `parse_request` turns bytes into a `DhcpRequest` through
  the codec (netstack/wire/dhcp.py: every length a guest supplies is checked there) or raises
  `Malformed(reason)`; `handle` catches `Malformed` and nothing else: a bug in the logic is a
  bug, not a dropped frame.
* One method per message type decides (`_TRANSITIONS` is the table), each in terms of the
  lease table's operations; `_reply` builds every answer.
* Nothing is acknowledged that is not on disk (when `state_path` is set): the ACK of a grant,
  or of a renewal beyond what is on disk, is held until the shell reports the write that
  contains it done (`persisted`); if the write fails it keeps waiting.  Freeing an address
  (RELEASE, DECLINE, expiry) needs no wait: until written, the file still shows the address
  as held, which errs on the safe side.  So a crash loses at most the changes of the shell's
  write interval (dhcp_store.PERSIST_INTERVAL_SECONDS), none of them acknowledged.

Theory of operation
-------------------
The path of a frame:

0. `_budget(source MAC).messages.take`: a token from the client's bucket, else the frame is
   ignored unparsed (`rate_limited`).
1. `parse_request`: the codec's checks (Ethernet II carrying IPv4 with a valid header
   checksum, not a fragment, UDP 68 -> 67, a BOOTREQUEST for Ethernet with the cookie, its
   options with overload and RFC 3396 joins, a message type), then a message type a client
   sends, and fixed-size options of their size.  The UDP checksum is not verified: a guest
   with virtio-net checksum offload leaves it partial, and the bytes we get do not say so.
2. `_refuse`: frames not addressed to us (Ethernet broadcast or our MAC; IP broadcast, the
   subnet broadcast or our address), relayed requests (giaddr != 0: we serve one segment),
   a group or zero source MAC, and a `chaddr` that is not the Ethernet source (a guest must
   not obtain leases for other MACs) are dropped and counted.
3. `_TRANSITIONS[msg_type]` decides and returns the reply, if any, built by `_reply`: options
   in the client's parameter-request order where we have them, trimmed to its maximum message
   size, padded to the 300-byte BOOTP minimum, sent from the gateway address, port 67 -> 68,
   to the destination RFC 2131 4.1 prescribes (`_destination`).

Budgets (step 0, before parsing): each client -- the switch port behind the source MAC
(`port_of`), else the MAC -- has a token bucket for messages and may decline at most
`DECLINE_BUDGET` addresses per `DECLINE_WINDOW_SECONDS`; beyond, frames are ignored and
counted (`rate_limited`, `decline_over_budget`).

REQUEST (RFC 2131 4.3.2), told apart by its fields: *selecting* carries our server identifier
and the requested address; a REQUEST for another server's identifier is ignored
(`other_server`).  *Init-reboot* has no server identifier and a requested address;
*renewing* (unicast) and *rebinding* (broadcast) carry `ciaddr`.  We are the only server on
the segment, so we answer all of them authoritatively: ACK if the table says the address
may be this client's (also after a hub restart that lost the lease), else NAK.

What is written.  A renewal that extends a lease by less than `PERSIST_SLACK_SECONDS` beyond
what is on disk is not written (a guest flooding REQUESTs must not turn into an fsync per
frame), and leases restored as running get that slack added back, so a restored lease never
ends earlier than the one the client was given.  Offers are not persisted.

INFORM (RFC 2131 3.4) is answered for any `ciaddr`: it grants nothing.

Not served: plain BOOTP (no option 53), relays, VLAN-tagged frames, the requested lease time
(option 51 in a request: everyone gets `lease_seconds`), static routes, PXE.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from netstack.frame import ETH_ADDR_LEN, format_mac
from netstack.gateway.dhcp_config import DhcpConfig
from netstack.gateway.dhcp_leases import (
    DECLINE_HOLD_SECONDS,
    Lease,
    LeaseTable,
    plausible_hostname,
)
from netstack.gateway.dhcp_store import LeaseWrite, StoredState, encode_lease
from netstack.ratelimit import TokenBucket
from netstack.wire import Malformed
from netstack.wire.dhcp import (
    BOOTP_HEADER_LEN,
    BOOTREPLY,
    BOOTREQUEST,
    BROADCAST_FLAG,
    DHCPACK,
    DHCPDECLINE,
    DHCPDISCOVER,
    DHCPINFORM,
    DHCPNAK,
    DHCPOFFER,
    DHCPRELEASE,
    DHCPREQUEST,
    IP_UDP_OVERHEAD,
    IPV4_BROADCAST,
    IPV4_UNSPECIFIED,
    MIN_MAX_MESSAGE_SIZE,
    OPT_CLIENT_ID,
    OPT_DNS,
    OPT_DOMAIN,
    OPT_HOSTNAME,
    OPT_LEASE_TIME,
    OPT_MAX_MESSAGE_SIZE,
    OPT_MESSAGE,
    OPT_MESSAGE_TYPE,
    OPT_MTU,
    OPT_PARAM_REQUEST,
    OPT_REBINDING_TIME,
    OPT_RENEWAL_TIME,
    OPT_REQUESTED_IP,
    OPT_ROUTER,
    OPT_SERVER_ID,
    OPT_SUBNET_MASK,
    DhcpFrame,
    build_frame,
)
from netstack.wire.ethernet import BROADCAST as BROADCAST_MAC

log = logging.getLogger(__name__)

CLIENT_MESSAGE_NAMES = {
    DHCPDISCOVER: "discover",
    DHCPREQUEST: "request",
    DHCPDECLINE: "decline",
    DHCPRELEASE: "release",
    DHCPINFORM: "inform",
}

PERSIST_SLACK_SECONDS = 60.0  # renewals extending a lease by less than this are not written
# What one client -- a switch port, or a MAC on no known port -- may make the server do.
RATE_PER_SECOND = 4.0  # DHCP messages a second, sustained...
RATE_BURST = 16.0  # ...and at once (a boot: firmware's DORA, then the OS's, retransmissions)
DECLINE_BUDGET = 4  # addresses it may decline...
DECLINE_WINDOW_SECONDS = 600.0  # ...in this long; later DECLINEs are ignored
MAX_CLIENTS_TRACKED = 1024  # budgets kept; the least recently used is dropped first


# --- Parsing: bytes to a DhcpRequest, or Malformed ----------------------------------------


@dataclass(frozen=True)
class DhcpRequest:
    """What `parse_request` found in a client's frame, every field checked."""

    eth_dst: bytes
    eth_src: bytes
    ip_dst: IPv4Address
    msg_type: int
    xid: int
    flags: int
    ciaddr: IPv4Address
    giaddr: IPv4Address
    chaddr: bytes  # the first hlen (6) bytes
    requested_ip: IPv4Address | None = None
    server_id: IPv4Address | None = None
    client_id: bytes | None = None
    hostname: str | None = None  # None if absent or not a plausible host name
    param_request: bytes = b""
    max_message_size: int | None = None


def parse_request(frame: bytes) -> DhcpRequest:
    """Check and decode a client's DHCP frame; raise Malformed for anything else."""
    view = DhcpFrame(frame, BOOTREQUEST)
    message = view.message
    if message.msg_type not in CLIENT_MESSAGE_NAMES:
        raise Malformed("bad_message_type", f"message type {message.msg_type} from a client")
    return DhcpRequest(
        eth_dst=view.eth_dst,
        eth_src=view.eth_src,
        ip_dst=view.ip_dst,
        msg_type=message.msg_type,
        xid=message.xid,
        flags=message.flags,
        ciaddr=message.ciaddr,
        giaddr=message.giaddr,
        chaddr=message.chaddr,
        requested_ip=message.option_address(OPT_REQUESTED_IP),
        server_id=message.option_address(OPT_SERVER_ID),
        client_id=message.client_id(),
        hostname=_hostname(message.options.get(OPT_HOSTNAME)),
        param_request=message.options.get(OPT_PARAM_REQUEST, b""),
        max_message_size=message.option_int(OPT_MAX_MESSAGE_SIZE, 2),
    )


def _hostname(value: bytes | None) -> str | None:
    """The client's host name if it is one (it goes into logs and the state file)."""
    if value is None:
        return None
    text = value.rstrip(b"\x00").decode("ascii", errors="replace")
    return text if plausible_hostname(text) else None


# --- The server ---------------------------------------------------------------------------


class _ClientBudget:
    """What one client (a switch port, or a MAC on no known port) may still do: a token
    bucket for its messages, and the times of its last declines."""

    __slots__ = ("declines", "messages")

    def __init__(self, now: float) -> None:
        self.messages = TokenBucket(RATE_PER_SECOND, RATE_BURST, now)
        self.declines: collections.deque[float] = collections.deque(maxlen=DECLINE_BUDGET)

    def may_decline(self, now: float) -> bool:
        declines = self.declines
        return len(declines) < DECLINE_BUDGET or declines[0] <= now - DECLINE_WINDOW_SECONDS


class DhcpServer:
    """Leases for one segment.  No sockets, no files (`stored` is what the shell read from
    the lease file); the clock is injectable."""

    def __init__(self, config: DhcpConfig, clock: Callable[[], float] = time.time,
                 stored: StoredState | None = None) -> None:
        self.config = config
        self.clock = clock
        self.counters: collections.Counter[str] = collections.Counter()
        self.on_lease: Callable[[Lease], None] | None = None
        self.on_release: Callable[[Lease], None] | None = None
        # Is this address in use by someone other than this MAC (say, a host configured by
        # hand that the switch saw sending from it)?  Such an address is not offered or
        # granted: the lease would collide with it.  The hub asks its switch.
        self.in_use: Callable[[IPv4Address, bytes], bool] | None = None
        # Which switch port is this MAC behind (None: unknown)?  Rate and decline budgets
        # are per port, so that a guest changing MACs gains nothing; per MAC without it.
        self.port_of: Callable[[bytes], object | None] | None = None
        # Called when the table changed and should be written (`write_job`, `persisted`).
        self.on_dirty: Callable[[], None] | None = None
        self.table = LeaseTable(config, self.counters, self._in_use,
                                track_changes=config.state_path is not None)
        self._budgets: collections.OrderedDict[object, _ClientBudget] = (
            collections.OrderedDict())  # port (or MAC) -> budget, least recently used first
        # MAC -> its record encoded for the state file, made when it changed (so a write of
        # a /16 is joined in milliseconds, not encoded in a third of a second).
        self._encoded: dict[bytes, bytes] = {}
        self._written: dict[bytes, float] = {}  # MAC -> expiry in the state file
        self._held: dict[bytes, tuple[int, IPv4Address, bytes]] = {}  # ACKs waiting for disk
        self._generation = 0  # changes of the table so far
        self._saved_generation = 0  # changes in the state file
        self._persist_failing = False
        if stored is not None:
            self._restore(stored)

    # -- public view --

    @property
    def leases(self) -> Mapping[bytes, Lease]:
        """The running leases, MAC -> Lease (a read-only snapshot)."""
        return self.table.leases

    def lease_for_ip(self, ip: IPv4Address | str) -> Lease | None:
        return self.table.lease_for_ip(IPv4Address(ip))

    def handle(self, frame: bytes) -> list[bytes]:
        """One client frame in, the reply frames (zero or one) out.

        Never raises because of what the frame holds; exceptions from `on_lease`/`on_release`
        (the caller's code) do propagate.  An ACK that grants or extends a lease beyond what
        is on disk is not returned here but by `persisted`, once it is written."""
        now = self.clock()
        if not self._budget(bytes(frame[6:12]), now).messages.take(now):
            self.counters["rate_limited"] += 1
            return []
        try:
            request = parse_request(frame)
        except Malformed as error:
            self.counters[error.reason] += 1
            log.debug("DHCP frame dropped: %s", error)
            return []
        refusal = self._refuse(request)
        if refusal is not None:
            self.counters[refusal] += 1
            log.debug("DHCP %s from %s dropped: %s", CLIENT_MESSAGE_NAMES[request.msg_type],
                      format_mac(request.eth_src), refusal)
            return []
        self.counters[CLIENT_MESSAGE_NAMES[request.msg_type]] += 1
        return _TRANSITIONS[request.msg_type](self, request, now)

    def table_sizes(self) -> dict[str, int]:
        """How many entries each table holds (what clients made the server keep)."""
        sizes = self.table.sizes()
        return {"records": sizes["records"], "bound": sizes["bound"], "offers": sizes["offers"],
                "declined": sizes["declined"], "budgets": len(self._budgets),
                "held_acks": len(self._held), "free": sizes["free"],
                "in_use_resting": sizes["in_use_resting"]}

    def expire(self, now: float) -> None:
        """End leases, offers and declines whose time is up.  The gateway calls this every
        few seconds, never per frame; `now` is on the server's clock (wall time by default:
        expiries outlive the process).  Costs the expired entries, not the table."""
        for lease in self.table.expire(now):
            self._held.pop(lease.mac, None)
            if self.on_release is not None:
                self.on_release(lease)

    # -- persistence, for the shell: write_job, write it (off the event loop), persisted --

    @property
    def dirty(self) -> bool:
        """Has the table changed since the last write that succeeded?"""
        return self.config.state_path is not None and self._generation != self._saved_generation

    def write_job(self) -> LeaseWrite:
        """The table as it is now, for dhcp_store.write_state (copies of three dicts)."""
        assert self.config.state_path is not None, "no state file configured"
        self._encode_changes()
        return LeaseWrite(self.config.state_path, self._generation, self.table.records.copy(),
                          self._encoded.copy(), self.table.declined.copy())

    def persisted(self, job: LeaseWrite, on_disk: dict[bytes, float]) -> list[bytes]:
        """`job` is on disk (`on_disk`: what write_state returned): the ACKs that waited for
        it, to be sent now."""
        if self._persist_failing:
            log.info("DHCP leases written to %s again", job.path)
            self._persist_failing = False
        self._saved_generation = max(self._saved_generation, job.generation)
        self._written = on_disk
        released = []
        for mac, (generation, ip, ack) in list(self._held.items()):
            if generation > job.generation:
                continue
            del self._held[mac]
            lease = self.table.bound_lease(mac)
            if lease is None or lease.ip != ip:
                continue  # declined, NAKed or expired while it waited
            self.counters["ack"] += 1
            released.append(ack)
        return released

    def persist_failed(self, job: LeaseWrite, error: OSError) -> None:
        """`job` could not be written: its ACKs keep waiting (the shell tries again)."""
        self.counters["persist_failed"] += 1
        if not self._persist_failing:
            log.error("could not write DHCP leases to %s: %s (%d ACKs wait)", job.path,
                      error, len(self._held))
            self._persist_failing = True

    def _mark_dirty(self) -> None:
        self._generation += 1
        if self.on_dirty is not None and self.config.state_path is not None:
            self.on_dirty()

    def _must_write(self, lease: Lease) -> bool:
        return lease.expires >= self._written.get(lease.mac, 0.0) + PERSIST_SLACK_SECONDS

    def _encode_changes(self) -> None:
        changed = self.table.changed
        assert changed is not None
        for mac in changed:
            record = self.table.record(mac)
            if record is None:
                self._encoded.pop(mac, None)
            else:
                self._encoded[mac] = encode_lease(record)
        changed.clear()

    def _restore(self, stored: StoredState) -> None:
        """Fill the table from the lease file: records whose address is a client address of
        our subnet, running if they have not expired (plus the slack: what is on disk may
        lag the lease the client got by that much)."""
        config, now = self.config, self.clock()
        if stored.corrupt:
            self.counters["state_corrupt"] += 1
        self.counters["state_entry_skipped"] += stored.skipped
        for lease in stored.leases:
            if not config.is_host(lease.ip) or lease.ip == config.gateway:
                reason = f"{lease.ip} is not a client address of {config.subnet}"
            elif not self.table.load(
                    replace(lease, expires=lease.expires + PERSIST_SLACK_SECONDS)
                    if lease.expires > now else lease, lease.expires > now):
                reason = "a duplicate"
            else:
                self._written[lease.mac] = lease.expires
                continue
            self.counters["state_entry_skipped"] += 1
            log.warning("%s: skipping lease %s %s: %s", config.state_path, format_mac(lease.mac),
                        lease.ip, reason)
        for ip, until in stored.declined:
            if until > now and ip in config.subnet:
                self.table.load_declined(ip, until)
        if self.table.changed is not None:
            self._encode_changes()
        log.info("%d DHCP leases loaded from %s (%d running)", len(self.table.records),
                 config.state_path, len(self.table.leases))

    # -- step 0: what a client may do at all --

    def _budget(self, mac: bytes, now: float) -> _ClientBudget:
        port = self.port_of(mac) if self.port_of is not None else None
        key = mac if port is None else port
        budgets = self._budgets
        budget = budgets.get(key)
        if budget is None:
            if len(budgets) >= MAX_CLIENTS_TRACKED:
                budgets.popitem(last=False)
            budget = budgets[key] = _ClientBudget(now)
        else:
            budgets.move_to_end(key)
        return budget

    def _in_use(self, ip: IPv4Address, mac: bytes) -> bool:
        return self.in_use is not None and self.in_use(ip, mac)

    # -- step 2: frames we refuse whatever they ask --

    def _refuse(self, request: DhcpRequest) -> str | None:
        config = self.config
        if request.eth_dst not in (BROADCAST_MAC, config.server_mac):
            return "not_for_us"
        if request.ip_dst not in (IPV4_BROADCAST, config.gateway, config.subnet.broadcast_address):
            return "not_for_us"
        if request.eth_src[0] & 1 or request.eth_src == bytes(ETH_ADDR_LEN):
            return "bad_mac"
        if request.chaddr != request.eth_src:
            return "chaddr_mismatch"
        if request.giaddr != IPV4_UNSPECIFIED:
            return "relayed"
        return None

    # -- step 3: decisions, one method per message type --

    def _on_discover(self, request: DhcpRequest, now: float) -> list[bytes]:
        mac = request.chaddr
        ip = self.table.choose(mac, request.client_id, request.requested_ip, now)
        if ip is None:
            return []
        self.table.offer(mac, ip, now)
        log.debug("offer %s to %s", ip, format_mac(mac))
        self.counters["offer"] += 1
        return [self._reply(request, DHCPOFFER, yiaddr=ip, hostname=self._hostname_for(request))]

    def _on_request(self, request: DhcpRequest, now: float) -> list[bytes]:
        mac, table = request.chaddr, self.table
        if request.server_id is not None:  # SELECTING: the client chose an offer
            if request.server_id != self.config.gateway:
                table.drop_offer(mac)
                self.counters["other_server"] += 1
                return []
            if request.requested_ip is None:
                self.counters["bad_request"] += 1
                return []
            ip = request.requested_ip
        elif request.requested_ip is not None:  # INIT-REBOOT: "may I keep this address?"
            ip = request.requested_ip
        elif request.ciaddr != IPV4_UNSPECIFIED:  # RENEWING (unicast) or REBINDING (broadcast)
            ip = request.ciaddr
        else:
            self.counters["bad_request"] += 1
            return []

        refusal = table.available(ip, mac, now)
        if refusal is not None:
            return self._nak(request, ip, refusal)
        old = table.record(mac)
        renewal = old is not None and old.ip == ip and table.bound_lease(mac) is not None
        lease = Lease(
            mac=mac,
            ip=ip,
            expires=now + self.config.lease_seconds,
            hostname=request.hostname or (old.hostname if old is not None and old.ip == ip
                                          else None),
            client_id=request.client_id,
        )
        must_write = not renewal or self._must_write(lease)
        ended = table.grant(lease)
        if ended is not None and self.on_release is not None:
            self.on_release(ended)
        if must_write:
            self._mark_dirty()
        if renewal:
            log.debug("lease renewed: %s %s", format_mac(mac), ip)
        else:
            log.info("lease granted: %s %s%s", format_mac(mac), ip,
                     f" ({lease.hostname})" if lease.hostname else "")
        if self.on_lease is not None:
            self.on_lease(lease)
        ack = self._reply(request, DHCPACK, yiaddr=ip, hostname=lease.hostname)
        if must_write and self.config.state_path is not None:
            self._held[mac] = (self._generation, ip, ack)  # sent by `persisted`
            return []
        self.counters["ack"] += 1
        return [ack]

    def _on_decline(self, request: DhcpRequest, now: float) -> list[bytes]:
        mac, ip, table = request.chaddr, request.requested_ip, self.table
        if request.server_id is not None and request.server_id != self.config.gateway:
            self.counters["other_server"] += 1
            return []
        held = table.bound_lease(mac)
        # Only the address this MAC holds or was offered: a guest must not blacklist others'.
        if ip is None or not ((held is not None and held.ip == ip) or table.offer_of(mac) == ip):
            self.counters["decline_unknown"] += 1
            return []
        budget = self._budget(mac, now)
        if not budget.may_decline(now):
            self.counters["decline_over_budget"] += 1
            log.debug("DECLINE of %s by %s ignored: %d declines in %ds already", ip,
                      format_mac(mac), DECLINE_BUDGET, DECLINE_WINDOW_SECONDS)
            return []
        if not table.can_rest():
            self.counters["decline_table_full"] += 1
            log.debug("DECLINE of %s by %s ignored: the table of resting addresses is full",
                      ip, format_mac(mac))
            return []
        budget.declines.append(now)
        ended = table.decline(mac, ip, now)
        if ended is not None:
            self._held.pop(mac, None)
        self._mark_dirty()
        if ended is not None and self.on_release is not None:
            self.on_release(ended)
        log.warning("address declined (in use on the segment?): %s %s, resting %ds",
                    format_mac(mac), ip, DECLINE_HOLD_SECONDS)
        return []

    def _on_release(self, request: DhcpRequest, now: float) -> list[bytes]:
        mac = request.chaddr
        if request.server_id is not None and request.server_id != self.config.gateway:
            self.counters["other_server"] += 1
            return []
        lease = self.table.bound_lease(mac)
        if lease is None or lease.ip != request.ciaddr:
            self.counters["release_unknown"] += 1
            return []
        released = self.table.release(mac, now)  # remembered: the client gets it back
        self._held.pop(mac, None)
        self._mark_dirty()
        log.info("lease released: %s %s", format_mac(mac), lease.ip)
        if self.on_release is not None:
            self.on_release(released)
        return []

    def _on_inform(self, request: DhcpRequest, now: float) -> list[bytes]:
        # RFC 2131 3.4: configuration only; no lease time, no yiaddr, sent to ciaddr.
        self.counters["ack"] += 1
        return [self._reply(request, DHCPACK, yiaddr=IPV4_UNSPECIFIED, lease=False)]

    def _nak(self, request: DhcpRequest, ip: IPv4Address, reason: str) -> list[bytes]:
        mac = request.chaddr
        record = self.table.record(mac)
        log.debug("NAK %s for %s: %s", ip, format_mac(mac), reason)
        if record is not None and record.ip == ip:
            # The client must stop using it; if its lease ran, it ends now.
            was_bound = self.table.forget(mac)
            self._held.pop(mac, None)
            self._mark_dirty()
            if was_bound and self.on_release is not None:
                self.on_release(record)
        self.counters["nak"] += 1
        self.counters[f"nak_{reason}"] += 1
        return [self._reply(request, DHCPNAK, yiaddr=IPV4_UNSPECIFIED, message=reason)]

    def _hostname_for(self, request: DhcpRequest) -> str | None:
        if request.hostname is not None:
            return request.hostname
        record = self.table.record(request.chaddr)
        return record.hostname if record is not None else None

    # -- replies (step 3) --

    def _reply(
        self,
        request: DhcpRequest,
        msg_type: int,
        *,
        yiaddr: IPv4Address,
        lease: bool = True,
        hostname: str | None = None,
        message: str | None = None,
    ) -> bytes:
        config = self.config
        head: list[tuple[int, bytes]] = [
            (OPT_MESSAGE_TYPE, bytes([msg_type])),
            (OPT_SERVER_ID, config.gateway.packed),
        ]
        extra: list[tuple[int, bytes]] = []
        if msg_type == DHCPNAK:
            if message is not None:
                head.append((OPT_MESSAGE, message.encode("ascii")))
        else:
            if lease:
                seconds = config.lease_seconds
                head += [
                    (OPT_LEASE_TIME, seconds.to_bytes(4, "big")),
                    (OPT_RENEWAL_TIME, (seconds // 2).to_bytes(4, "big")),
                    (OPT_REBINDING_TIME, (seconds * 7 // 8).to_bytes(4, "big")),
                ]
            head.append((OPT_SUBNET_MASK, config.subnet.netmask.packed))
            if config.router:
                head.append((OPT_ROUTER, config.gateway.packed))
            offered = {code: value for code, value in self._optional_options(hostname)}
            # RFC 2132 9.8: in the order the client asked for them, then the rest.
            order = [c for c in dict.fromkeys(request.param_request) if c in offered]
            order += [c for c in offered if c not in order]
            extra = [(code, offered[code]) for code in order]
        if request.client_id is not None:  # RFC 6842: echo it
            head.append((OPT_CLIENT_ID, request.client_id))

        budget = max(request.max_message_size or 0, MIN_MAX_MESSAGE_SIZE) - IP_UDP_OVERHEAD
        size = BOOTP_HEADER_LEN + sum(2 + len(v) for _, v in head) + 1
        options = list(head)
        for code, value in extra:  # trimmed from the end to fit the client's maximum
            if size + 2 + len(value) > budget:
                self.counters["option_trimmed"] += 1
                continue
            size += 2 + len(value)
            options.append((code, value))

        dst_mac, dst_ip = self._destination(request, msg_type, yiaddr)
        return build_frame(
            BOOTREPLY, options, xid=request.xid, chaddr=request.chaddr,
            flags=request.flags & BROADCAST_FLAG,
            ciaddr=request.ciaddr if msg_type == DHCPACK else IPV4_UNSPECIFIED, yiaddr=yiaddr,
            eth_src=config.server_mac, eth_dst=dst_mac, ip_src=config.gateway, ip_dst=dst_ip)

    def _optional_options(self, hostname: str | None) -> list[tuple[int, bytes]]:
        config = self.config
        options: list[tuple[int, bytes]] = []
        if config.dns:
            options.append((OPT_DNS, b"".join(a.packed for a in config.dns)))
        if config.domain is not None:
            options.append((OPT_DOMAIN, config.domain.encode("ascii")))
        if config.mtu is not None:
            options.append((OPT_MTU, config.mtu.to_bytes(2, "big")))
        if hostname is not None:
            options.append((OPT_HOSTNAME, hostname.encode("ascii")))
        return options

    @staticmethod
    def _destination(request: DhcpRequest, msg_type: int,
                     yiaddr: IPv4Address) -> tuple[bytes, IPv4Address]:
        """RFC 2131 4.1, with giaddr always 0: NAKs are broadcast; replies to a client that
        has an address go to it; a client that asked for broadcast, or whom we give no
        address, gets a broadcast; else unicast to the new address at the client's MAC."""
        if msg_type == DHCPNAK:
            return BROADCAST_MAC, IPV4_BROADCAST
        if request.ciaddr != IPV4_UNSPECIFIED:
            return request.chaddr, request.ciaddr
        if request.flags & BROADCAST_FLAG or yiaddr == IPV4_UNSPECIFIED:
            return BROADCAST_MAC, IPV4_BROADCAST
        return request.chaddr, yiaddr


# The state transitions, one entry per client message type (RFC 2131 4.3).
_TRANSITIONS: dict[int, Callable[[DhcpServer, DhcpRequest, float], list[bytes]]] = {
    DHCPDISCOVER: DhcpServer._on_discover,
    DHCPREQUEST: DhcpServer._on_request,
    DHCPDECLINE: DhcpServer._on_decline,
    DHCPRELEASE: DhcpServer._on_release,
    DHCPINFORM: DhcpServer._on_inform,
}
