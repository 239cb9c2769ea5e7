"""One guest TCP connection terminated by the NAT, sans-I/O: the guest's segments in, segments
to the guest and actions on the host socket out (the passt/slirp model: the hub's own socket
carries the bytes onward).  No sockets, no clock, no Trio here; the shell owns those.

Theory of operation.  The guest opens; we are the passive end (RFC 9293 3.5).  A guest SYN
makes the connection CONNECTING and emits `Connect`; the SYN/ACK goes out only when the shell
reports `Connected` (the remote accepted), so a refused connection is a RST to the guest, as
if the remote itself had answered.  Then:

  guest -> host   in-order payload becomes `Send(data)` at once; the shell writes those in
                  order and reports `Written(n)` as the host socket takes them.  Bytes handed
                  over and not yet written (`host_unwritten`) are what we hold for the host
                  socket: the window advertised to the guest is RCV_BUFFER minus them, so a
                  slow remote closes the guest's window (backpressure), and never more than
                  the guest may still make the NAT hold (`hold_limit`: its FlowLimits room,
                  set by the table; `window_update()` when the room grows again).  Segments ahead of
                  RCV.NXT wait in an out-of-order queue (merged runs, OOO_MAX_RUNS holes,
                  inside the advertised window) so one lost frame costs the guest one
                  retransmission, not its whole flight; when the guest offers SACK, our
                  ACKs carry up to SACK_BLOCKS of those runs (RFC 2018, receiver side only:
                  the guest's sender repairs several holes a round trip).
                  The guest's FIN, in order, becomes `ShutdownWrite` after its last Send.
  host -> guest   the shell reads at most `host_read_budget()` bytes from the host socket
                  and reports `Received(data)`; that is free space in SND_BUFFER, which
                  holds everything unacknowledged, so the send buffer IS the retransmission
                  queue and the guest's window holds back the host socket (the shell stops
                  reading at budget 0 and the kernel's buffer fills, as passt does).
                  Segments are cut at the guest's MSS, never past the window it advertised
                  (with `tso`, up to TSO_MAX_PAYLOAD: the table sends each as one TSO frame
                  with gso_size = the MSS and a partial checksum, `partial_header`; the
                  switch cuts it for a guest port without TSO); `Eof` sends our FIN after
                  the data.  A guest's own TSO segment (up to 64 KiB) is one segment here.
  ACKs            one per data segment, or with `defer_ack` (the shell's batches) one per
                  batch for in-order data (`ack_owed`, `flush_ack()`), at least every
                  ACK_STRETCH bytes; out-of-order data, a filled hole and a FIN are
                  acknowledged at once (the guest's fast retransmit needs the dup ACKs).
  timers          one retransmission timer (RFC 6298: SRTT/RTTVAR, Karn, doubling backoff up
                  to RTO_MAX, MAX_RETRIES then abort), or instead the persist timer while the
                  guest's window is zero (window probes; a window held at zero for
                  ZERO_WINDOW_MAX with data waiting aborts); the state deadline (connect
                  timeout, FIN-WAIT-2, a short TIME-WAIT); the idle timeout.  `tick(now)` runs
                  what expired, `next_deadline()` says when to call it next.
  ending          a clean close of both directions emits `Close` (the shell closes the host
                  socket); any abort emits RST to the guest and `Abort` to the host side.
                  After either, `closed` tells the NAT's table to forget the connection
                  (TIME-WAIT stays reachable for TIME_WAIT seconds to re-ACK a lost FIN).

The guest is hostile.  Every number it sends is checked before use: sequence numbers against
the receive window (RFC 9293 3.10.7.4), acknowledgments against what we sent (RFC 5961 5),
RST and SYN by RFC 5961 (exact RCV.NXT resets; anything else in-window gets a rate-limited
challenge ACK; out of window is dropped), options parsed by netstack.wire.tcp (malformed ones
ignored and counted), payload length bounded.  Nothing a guest sends raises; each oddity is a
counter in `counters`.  Memory per connection is bounded by RCV_BUFFER + SND_BUFFER plus the
out-of-order queue's own cap.

Not built here: congestion control (the link to the guest is virtual; the guest's window is
the only limit, recovery is NewReno-like: after a fast retransmit or a timeout each partial
ACK retransmits the next hole), SACK as a sender (the guest's SACK blocks are ignored),
timestamps, timed delayed ACKs (RFC 1122's 200 ms: the batch is the delay), and
simultaneous open.

Active open (port forwards, `open_to_guest`): the host side accepted a connection and we are
the opening end toward the guest.  SYN-SENT sends our SYN (our MSS, window scale offered) and
retransmits it on the RTO with backoff, SYN_RETRIES times, then gives up (`Abort(SYN_TIMEOUT)`,
no RST: the guest never spoke).  The guest's SYN/ACK must acknowledge exactly our SYN (any
other ACK draws <SEQ=SEG.ACK><RST> and we keep waiting, RFC 9293 3.10.7.3); its options are
read as a passive open reads a SYN's; then our ACK and `Established` (the shell starts
relaying).  The guest's RST with the right ACK is `Abort(REFUSED_BY_GUEST)`.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import struct
from dataclasses import dataclass, fields

from netstack.wire import IPPROTO_TCP, Malformed
from netstack.wire.checksum import folded, pseudo_header_sum
from netstack.wire.tcp import (
    ACK,
    FIN,
    MIN_HEADER_LEN,
    OPT_MSS,
    OPT_NOP,
    OPT_SACK_PERMITTED,
    OPT_WSCALE,
    PSH,
    RST,
    SYN,
    Tcp,
    parse_options,
    tcp_segment,
)

log = logging.getLogger(__name__)

# Buffers: what one connection may make us hold (the containment bound).
RCV_BUFFER = 256 * 1024  # guest -> host bytes held until the host socket takes them
SND_BUFFER = 256 * 1024  # host -> guest bytes held until the guest acknowledges them
OOO_MAX_RUNS = 16  # holes the out-of-order queue tracks (its bytes lie inside the window)
SACK_BLOCKS = 4  # per ACK: 2 NOPs + kind/length + 4 x 8 bytes fill the 40-byte option space
OPT_SACK = 5  # RFC 2018 3
MAX_PAYLOAD = 65535  # a guest TSO segment is one segment, up to 64 KiB (IPv4's limit)
# Toward a guest, a segment of up to this many payload bytes leaves as one TSO frame (its
# IP packet within IPv4's 64 KiB limit with a 20-byte IP and a 60-byte TCP header).
TSO_MAX_PAYLOAD = 65535 - 20 - 60
# Deferred ACKs (the shell's batches): in-order data is acknowledged once per batch, but at
# least once per this many bytes (RFC 9293 3.8.6.3's "every second full segment" is what a
# guest without stretch-ACK tolerance would want; Linux's GRO acknowledges ~64 KiB at once).
ACK_STRETCH = 64 * 1024

# MSS (RFC 9293 3.7.1, RFC 8200 5): defaults when the SYN has no option, and the clamp.
DEFAULT_MSS_V4 = 536
DEFAULT_MSS_V6 = 1220
MIN_MSS = 88  # below this a guest would make us cut absurdly many segments (Linux's floor)
MAX_WSCALE = 14  # RFC 7323 2.3
RCV_WSCALE = next(s for s in range(MAX_WSCALE + 1) if 0xFFFF << s >= RCV_BUFFER)

# Retransmission (RFC 6298).  RTO_MIN follows Linux's 200 ms, not the RFC's 1 s: the guest is
# one virtual link away, and the RFC's floor would stall a loss for a second.
RTO_INITIAL = 1.0
RTO_MIN = 0.2
RTO_MAX = 30.0
CLOCK_GRANULARITY = 0.001
MAX_RETRIES = 8  # consecutive timeouts without progress, then abort (~1 min at RTO_MIN)
SYNACK_RETRIES = 5
SYN_RETRIES = 5  # active open: SYNs after the first (1+2+4+8+16 s, then 32 s for the last)
DUP_ACK_THRESHOLD = 3  # RFC 5681 3.2

# Persist timer (RFC 9293 3.8.6.1) and the bound on a window held shut.
PERSIST_MIN = 0.2
PERSIST_MAX = 30.0
ZERO_WINDOW_MAX = 120.0  # seconds a guest may keep a zero window while we hold data for it

# State timeouts.  Established idle follows RFC 5382 REQ-5 (at least 2 h 4 min), so guest
# keepalives at Linux's default 2 h keep a connection alive.
CONNECT_TIMEOUT = 75.0  # CONNECTING: the host's connect() did not answer
IDLE_TIMEOUT = 7440.0
FIN_WAIT_2_TIMEOUT = 60.0  # our FIN acknowledged, the guest never closes its side
TIME_WAIT_SECONDS = 2.0  # short: it only re-ACKs a retransmitted FIN; the table bounds how many
CHALLENGE_ACKS_PER_SECOND = 10  # RFC 5961 7, per connection

_SEQ_MASK = 0xFFFFFFFF
_TCP_HEADER = struct.Struct("!HHIIBBHHH")  # ports, seq, ack, offset, flags, window, sum, urg
_SACK_BLOCK = struct.Struct("!II")


def _lt(a: int, b: int) -> bool:
    """a < b in sequence space (RFC 9293 3.4)."""
    return ((a - b) & _SEQ_MASK) > 0x7FFFFFFF


def _le(a: int, b: int) -> bool:
    return a == b or _lt(a, b)


def _dist(a: int, b: int) -> int:
    """b - a in sequence space, for b at or after a."""
    return (b - a) & _SEQ_MASK


# --- states -----------------------------------------------------------------------------
LISTEN = "LISTEN"
SYN_SENT = "SYN-SENT"  # active open (a port forward): our SYN sent to the guest
CONNECTING = "CONNECTING"  # guest SYN seen, host connect() under way, nothing sent yet
SYN_RECEIVED = "SYN-RECEIVED"
ESTABLISHED = "ESTABLISHED"
FIN_WAIT_1 = "FIN-WAIT-1"
FIN_WAIT_2 = "FIN-WAIT-2"
CLOSE_WAIT = "CLOSE-WAIT"
CLOSING = "CLOSING"
LAST_ACK = "LAST-ACK"
TIME_WAIT = "TIME-WAIT"
CLOSED = "CLOSED"

_SYNCHRONIZED = frozenset({SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT,
                           CLOSING, LAST_ACK, TIME_WAIT})
_RECEIVING = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})  # guest has not sent FIN
_SENDING = frozenset({ESTABLISHED, CLOSE_WAIT})  # we have not sent FIN


# --- outputs and events -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ToGuest:
    """A segment for the guest (from the remote's address and port to the guest's);
    `TcpConnection.encode` makes its bytes."""

    seq: int
    ack: int
    flags: int
    window: int
    options: bytes = b""
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Connect:
    """Open the host socket to the remote; answer with Connected or Refused."""


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the host socket, after every earlier Send; report Written."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ShutdownWrite:
    """The guest finished sending: shut down the host socket's writing side once every
    earlier Send is written."""


@dataclass(frozen=True, slots=True)
class Abort:
    """Reset the host socket (close with linger 0) and forget it."""

    reason: str


@dataclass(frozen=True, slots=True)
class Close:
    """Both directions are done (or the host socket already failed): close it."""


@dataclass(frozen=True, slots=True)
class Established:
    """Active open: the guest accepted our SYN; start relaying the host socket."""


# Abort reasons of an active open, counted by the shell per forward.
REFUSED_BY_GUEST = "refused_by_guest"
SYN_TIMEOUT = "syn_timeout"

HostAction = Connect | Established | Send | ShutdownWrite | Abort | Close
Output = ToGuest | HostAction


@dataclass(frozen=True, slots=True)
class Connected:
    """The host socket's connect() succeeded."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The host socket's connect() failed (refused, unreachable, timed out)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Received:
    """Bytes read from the host socket, at most host_read_budget()."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Eof:
    """The remote closed its sending side (read returned b"")."""


@dataclass(frozen=True, slots=True)
class Written:
    """The host socket took n more of the bytes from Send actions."""

    n: int


@dataclass(frozen=True, slots=True)
class HostError:
    """The established host socket failed (reset by the remote, or another error)."""

    reason: str


HostEvent = Connected | Refused | Received | Eof | Written | HostError


@dataclass(slots=True)
class TcpCounters:
    """What happened on one connection; every guest oddity has a counter."""

    segments_in: int = 0
    segments_out: int = 0
    bytes_to_host: int = 0
    bytes_to_guest: int = 0
    retransmits: int = 0
    fast_retransmits: int = 0
    timeouts: int = 0
    dup_acks: int = 0
    dup_segments: int = 0  # entirely before RCV.NXT (a retransmission we already have)
    out_of_window: int = 0
    ooo_queued: int = 0
    ooo_dropped: int = 0
    bad_option: int = 0
    bad_flags: int = 0
    oversize: int = 0
    no_ack: int = 0
    ack_unsent: int = 0  # acknowledges bytes we never sent
    ack_too_old: int = 0
    challenge_acks: int = 0
    challenge_acks_suppressed: int = 0
    rst_ignored: int = 0
    window_probes: int = 0
    keepalives: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _endpoint(ip: bytes, port: int) -> str:
    address = ipaddress.ip_address(ip)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def reset_for(seg: Tcp) -> ToGuest | None:
    """The RST answering a segment that has no connection (RFC 9293 3.10.7.1); None for a
    RST, which is never answered."""
    flags = seg.flags
    if flags & RST:
        return None
    if flags & ACK:
        return ToGuest(seg.ack, 0, RST, 0)
    length = len(seg.payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
    return ToGuest(0, (seg.seq + length) & _SEQ_MASK, RST | ACK, 0)


class TcpConnection:
    """One guest connection: from_guest / on_host / tick in, lists of Output out."""

    def __init__(self, guest_ip: bytes, guest_port: int, remote_ip: bytes, remote_port: int,
                 now: float, *, mss: int | None = None, iss: int | None = None) -> None:
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        v6 = len(guest_ip) == 16
        self.name = f"{_endpoint(guest_ip, guest_port)} -> {_endpoint(remote_ip, remote_port)}"
        self.counters = TcpCounters()
        self.state = LISTEN
        # What we advertise as our MSS (the guest cuts its segments at it; TSO ignores it).
        self.our_mss = mss if mss is not None else (1440 if v6 else 1460)
        self._default_mss = DEFAULT_MSS_V6 if v6 else DEFAULT_MSS_V4
        # Receive side (guest -> host).
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0  # right edge of the window we advertised: never moves left
        self.rcv_wscale = 0
        self.host_unwritten = 0  # bytes in Send actions the host socket has not taken
        # The most this connection may hold (`buffered`): its guest's FlowLimits room plus
        # what it holds already, set by the table before each call; the window offers no
        # more than what is left of it.
        self.hold_limit = RCV_BUFFER + SND_BUFFER
        self.ack_owed = False  # in-order data arrived and its ACK waits for flush_ack()
        self._acked_to = 0  # the ACK number we last sent
        self._ooo: list[tuple[int, bytes]] = []
        self._ooo_bytes = 0
        self.sack_ok = False  # the guest offered SACK-permitted and we answered it
        self._ooo_last = 0  # sequence number of the latest out-of-order segment (SACK order)
        # Send side (host -> guest).
        self.iss = secrets.randbits(32) if iss is None else iss & _SEQ_MASK
        self.snd_una = self.iss
        self.snd_nxt = self.iss
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.snd_wscale = 0
        self.snd_mss = self._default_mss
        self.tso = False  # the guest takes TSO frames: segments up to TSO_MAX_PAYLOAD
        self.max_snd_wnd = 0
        self.max_snd_edge = self.iss  # furthest right edge the guest ever allowed
        self._snd_buf = bytearray()  # from SND.UNA (data only): the retransmission queue
        self._fin_pending = False  # the host sent EOF; our FIN follows the data
        self._fin_seq: int | None = None  # sequence number of our FIN once sent
        # Retransmission (RFC 6298).
        self._srtt: float | None = None
        self._rttvar = 0.0
        self.rto = RTO_INITIAL
        self._rtx_at: float | None = None
        self._retries = 0
        self._rtt_seq: int | None = None
        self._rtt_start = 0.0
        self._dup_acks = 0
        self._recover: int | None = None
        # Persist timer.
        self._persist_at: float | None = None
        self._persist_interval = PERSIST_MIN
        self._zero_window_since: float | None = None
        # State deadline and idle.
        self._state_deadline: float | None = None
        self._last_activity = now
        self._challenge_second = -1
        self._challenge_count = 0

    # --- queries ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Nothing left to do: the NAT's table may forget this connection."""
        return self.state == CLOSED

    def host_read_budget(self) -> int:
        """How many bytes the shell may read from the host socket now (0: stop reading)."""
        if self.state not in _SENDING or self._fin_pending:
            return 0
        return SND_BUFFER - len(self._snd_buf)

    @property
    def buffered(self) -> int:
        """Bytes this connection makes the NAT hold: for the host (in Send actions not yet
        written, out of order) and for the guest (not yet acknowledged)."""
        return self.host_unwritten + self._ooo_bytes + len(self._snd_buf)

    def next_deadline(self) -> float | None:
        """When tick() next has something to do (None: nothing timed)."""
        if self.state == CLOSED:
            return None
        candidates = [self._last_activity + IDLE_TIMEOUT]
        for at in (self._rtx_at, self._persist_at, self._state_deadline):
            if at is not None:
                candidates.append(at)
        if self._zero_window_since is not None:
            candidates.append(self._zero_window_since + ZERO_WINDOW_MAX)
        return min(candidates)

    def partial_header(self, seg: ToGuest) -> bytes:
        """The TCP header (options included) of a segment for a TSO frame, its payload to
        follow: the checksum field holds the pseudo-header sum only (NEEDS_CSUM: whoever
        segments it, or the guest, finishes it)."""
        header_len = MIN_HEADER_LEN + len(seg.options)
        pseudo = folded(pseudo_header_sum(self.remote_ip, self.guest_ip, IPPROTO_TCP,
                                          header_len + len(seg.payload)))
        return _TCP_HEADER.pack(self.remote_port, self.guest_port, seg.seq, seg.ack,
                                (header_len // 4) << 4, seg.flags, seg.window, pseudo,
                                0) + seg.options

    def encode(self, seg: ToGuest) -> bytes:
        """The TCP bytes of a segment to the guest, checksum included (the shell adds the IP
        header from remote_ip to guest_ip)."""
        return tcp_segment(self.remote_ip, self.guest_ip, self.remote_port, self.guest_port,
                           seg.seq, seg.ack, seg.flags, seg.window, seg.options, seg.payload)

    # --- guest segments --------------------------------------------------------------------
    def from_guest(self, seg: Tcp, now: float, *, defer_ack: bool = False) -> list[Output]:
        """One segment from the guest (the caller checked its IP header, checksum and that
        its addresses and ports are this connection's).  With `defer_ack` (the shell hands
        over a batch), in-order data that makes no segment of its own leaves its ACK owed
        (`ack_owed`) for `flush_ack()` after the batch, unless ACK_STRETCH bytes are
        unacknowledged; anything out of order, a FIN or a filled hole is acknowledged at
        once (the guest's fast retransmit counts those dup ACKs)."""
        out: list[Output] = []
        counters = self.counters
        counters.segments_in += 1
        flags = seg.flags
        if flags & SYN and flags & (FIN | RST):
            counters.bad_flags += 1
            return out
        if len(seg.payload) > MAX_PAYLOAD:
            counters.oversize += 1
            return out
        state = self.state
        if state == LISTEN:
            self._on_listen(seg, now, out)
        elif state == CONNECTING:
            self._on_connecting(seg, out)
        elif state == SYN_SENT:
            self._on_syn_sent(seg, now, out)
        elif state == CLOSED:
            reply = reset_for(seg)
            if reply is not None:
                self._emit(out, reply)
        else:
            self._on_synchronized(seg, now, out, defer_ack)
        return out

    def flush_ack(self) -> list[Output]:
        """The ACK owed for data taken with `defer_ack` ([] when none is owed any more)."""
        out: list[Output] = []
        if self.ack_owed:
            self.ack_owed = False
            if self.state != CLOSED:
                self._emit_ack(out)
        return out

    def _on_listen(self, seg: Tcp, now: float, out: list[Output]) -> None:
        flags = seg.flags
        if flags & RST:
            return
        if flags & ACK or not flags & SYN:
            reply = reset_for(seg)
            if reply is not None:
                self._emit(out, reply)
            self.state = CLOSED
            return
        self._negotiate(seg)
        self.irs = seg.seq
        self.rcv_nxt = (seg.seq + 1) & _SEQ_MASK
        self.rcv_adv = self.rcv_nxt
        self.snd_wnd = seg.window  # a SYN's window is never scaled (RFC 7323 2.2)
        self.max_snd_wnd = self.snd_wnd
        self.snd_wl1 = seg.seq
        self.snd_wl2 = self.iss
        self.state = CONNECTING
        self._state_deadline = now + CONNECT_TIMEOUT
        self._last_activity = now
        out.append(Connect())
        # A SYN's payload (no TFO cookie was offered) is dropped; the guest sends it again.

    def _negotiate(self, seg: Tcp) -> None:
        try:
            opts = parse_options(seg.options)
        except Malformed as e:
            self.counters.bad_option += 1
            log.debug("tcp %s: SYN options ignored (%s)", self.name, e)
            return
        if opts.mss is not None:
            if opts.mss < MIN_MSS:
                self.counters.bad_option += 1
            # Never past what the link carries (our MSS is the MTU's): a guest's 65535 made
            # segments the MTU dropped, and with TSO a send quantum of 0 bytes.
            self.snd_mss = max(MIN_MSS, min(opts.mss, self.our_mss))
        self.sack_ok = opts.sack_permitted
        if opts.wscale is not None:
            if opts.wscale > MAX_WSCALE:
                self.counters.bad_option += 1
            self.snd_wscale = min(opts.wscale, MAX_WSCALE)
            self.rcv_wscale = RCV_WSCALE

    # --- active open (port forwards) --------------------------------------------------------
    def open_to_guest(self, now: float) -> list[Output]:
        """Open this connection toward the guest (we send the SYN): the host side has
        accepted a connection a port forward relays."""
        if self.state != LISTEN:
            raise ValueError(f"open_to_guest in {self.state}")
        self.state = SYN_SENT
        self.snd_nxt = (self.iss + 1) & _SEQ_MASK
        self._last_activity = now
        self._rtt_seq, self._rtt_start = self.snd_nxt, now
        out: list[Output] = []
        self._send_syn(out, now)
        return out

    def _send_syn(self, out: list[Output], now: float) -> None:
        options = bytes((OPT_MSS, 4)) + self.our_mss.to_bytes(2, "big") \
            + bytes((OPT_NOP, OPT_WSCALE, 3, RCV_WSCALE))
        self._rtx_at = now + self.rto
        self._emit(out, ToGuest(self.iss, 0, SYN, min(RCV_BUFFER, 0xFFFF), options))

    def _on_syn_sent(self, seg: Tcp, now: float, out: list[Output]) -> None:
        """RFC 9293 3.10.7.3, without simultaneous open."""
        flags = seg.flags
        counters = self.counters
        if flags & ACK and seg.ack != self.snd_nxt:
            counters.ack_unsent += 1
            if not flags & RST:
                self._emit(out, ToGuest(seg.ack, 0, RST, 0))
            return
        if flags & RST:
            if flags & ACK:
                self._forget(REFUSED_BY_GUEST)
                out.append(Abort(REFUSED_BY_GUEST))
            else:
                counters.rst_ignored += 1  # a RST acknowledging nothing (RFC 9293 3.10.7.3)
            return
        if not flags & SYN or not flags & ACK:
            counters.bad_flags += 1  # no simultaneous open; an ACK alone is not an answer
            return
        self._negotiate(seg)
        self.irs = seg.seq
        self.rcv_nxt = self.rcv_adv = (seg.seq + 1) & _SEQ_MASK
        self.snd_una = seg.ack
        self._take_rtt(seg.ack, now)
        self._stop_rtx()
        self._update_window(seg, force=True)
        self.snd_wnd = seg.window  # a SYN's window is never scaled (RFC 7323 2.2)
        self.max_snd_wnd = self.snd_wnd
        self.max_snd_edge = (self.snd_wl2 + self.snd_wnd) & _SEQ_MASK
        self.state = ESTABLISHED
        self._last_activity = now
        # Data on the SYN/ACK is not taken: our ACK covers the SYN only, the guest resends.
        self._emit_ack(out)
        out.append(Established())
        log.debug("tcp %s: established (active open)", self.name)

    def _on_connecting(self, seg: Tcp, out: list[Output]) -> None:
        flags = seg.flags
        if flags & RST and seg.seq == self.rcv_nxt:
            self._forget("guest reset while connecting")
            out.append(Abort("guest reset while connecting"))
        elif flags & SYN and seg.seq == self.irs:
            self.counters.dup_segments += 1  # the guest retransmits its SYN; we still wait
        else:
            self.counters.out_of_window += 1

    def _on_synchronized(self, seg: Tcp, now: float, out: list[Output],
                         defer_ack: bool = False) -> None:
        counters = self.counters
        flags = seg.flags
        seq = seg.seq
        payload = seg.payload
        if flags & SYN and self.state == SYN_RECEIVED and not flags & ACK and seq == self.irs:
            counters.dup_segments += 1
            self._send_syn_ack(out, now, retransmit=True)
            return
        # 1. Sequence acceptability (RFC 9293 3.10.7.4).
        seg_len = len(payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        rcv_wnd = _dist(self.rcv_nxt, self.rcv_adv)
        if not self._acceptable(seq, seg_len, rcv_wnd):
            if flags & RST:
                counters.rst_ignored += 1
                return
            if flags & ACK and len(payload) <= 1 and not flags & (SYN | FIN) \
                    and seq == (self.rcv_nxt - 1) & _SEQ_MASK:
                # A keepalive (RFC 9293 3.8.4): answered, and it keeps the connection alive.
                counters.keepalives += 1
                self._last_activity = now
            elif seg_len and _le((seq + seg_len) & _SEQ_MASK, self.rcv_nxt):
                counters.dup_segments += 1
            else:
                counters.out_of_window += 1
            self._emit_ack(out)
            return
        self._last_activity = now
        # 2. RST (RFC 5961 3.2): only exactly RCV.NXT resets; in-window gets a challenge.
        if flags & RST:
            if seq == self.rcv_nxt:
                self._forget("guest reset")
                out.append(Abort("guest reset"))
            else:
                counters.rst_ignored += 1
                self._challenge_ack(out, now)
            return
        # 3. SYN in a synchronized state (RFC 5961 4.2): challenge ACK, never a reset.
        if flags & SYN:
            self._challenge_ack(out, now)
            return
        # 4. ACK.
        if not flags & ACK:
            counters.no_ack += 1
            return
        if not self._on_ack(seg, now, out):
            return
        if self.state == CLOSED:
            return
        # 5. Payload and FIN.
        if self.state in _RECEIVING and (payload or flags & FIN):
            in_order = seq == self.rcv_nxt and not self._ooo and not flags & FIN
            self._receive(seq, payload, bool(flags & FIN), now, out)
            pushed_from = len(out)
            self._push(now, out)
            # Segments pushed now carry the new RCV.NXT; without any, a pure ACK (or one
            # owed till the end of the batch).
            if not any(isinstance(o, ToGuest) for o in out[pushed_from:]):
                if defer_ack and in_order and not self._ooo \
                        and _dist(self._acked_to, self.rcv_nxt) < ACK_STRETCH:
                    self.ack_owed = True
                else:
                    self._emit_ack(out)
        else:
            self._push(now, out)

    def _acceptable(self, seq: int, seg_len: int, rcv_wnd: int) -> bool:
        rcv_nxt = self.rcv_nxt
        if seg_len == 0:
            if rcv_wnd == 0:
                return seq == rcv_nxt
            return _le(rcv_nxt, seq) and _lt(seq, (rcv_nxt + rcv_wnd) & _SEQ_MASK)
        if rcv_wnd == 0:
            return False
        edge = (rcv_nxt + rcv_wnd) & _SEQ_MASK
        last = (seq + seg_len - 1) & _SEQ_MASK
        return (_le(rcv_nxt, seq) and _lt(seq, edge)) or (_le(rcv_nxt, last) and _lt(last, edge))

    def _on_ack(self, seg: Tcp, now: float, out: list[Output]) -> bool:
        """Process SEG.ACK; False when the segment must go no further."""
        counters = self.counters
        ack = seg.ack
        if self.state == SYN_RECEIVED:
            if ack != self.snd_nxt:
                # RFC 9293: a bad ACK in SYN-RECEIVED draws <SEQ=SEG.ACK><RST>; ours stays.
                counters.ack_unsent += 1
                self._emit(out, ToGuest(ack, 0, RST, 0))
                return False
            self.snd_una = ack
            self.state = ESTABLISHED
            self._state_deadline = None
            self._take_rtt(ack, now)
            self._stop_rtx()
            self._update_window(seg, force=True)
            log.debug("tcp %s: established", self.name)
            return True
        if _lt(self.snd_nxt, ack):
            counters.ack_unsent += 1
            self._emit_ack(out)
            return False
        if _lt(ack, (self.snd_una - self.max_snd_wnd) & _SEQ_MASK):
            counters.ack_too_old += 1
            self._challenge_ack(out, now)
            return False
        if _lt(self.snd_una, ack):
            self._ack_advances(ack, now, out)
        elif ack == self.snd_una and self.snd_una != self.snd_nxt and not seg.payload \
                and not seg.flags & FIN and self._scaled_window(seg) == self.snd_wnd:
            counters.dup_acks += 1
            self._dup_acks += 1
            if self._dup_acks == DUP_ACK_THRESHOLD:
                counters.fast_retransmits += 1
                self._recover = self.snd_nxt
                self._rtt_seq = None
                self._retransmit_first(out, now)
        self._update_window(seg, force=False)
        return self.state != CLOSED

    def _ack_advances(self, ack: int, now: float, out: list[Output]) -> None:
        acked = _dist(self.snd_una, ack)
        fin_acked = self._fin_seq is not None and ack == ((self._fin_seq + 1) & _SEQ_MASK)
        data_acked = acked - (1 if fin_acked else 0)
        del self._snd_buf[:data_acked]
        self.snd_una = ack
        self._dup_acks = 0
        self._retries = 0
        self._take_rtt(ack, now)
        if self.snd_una == self.snd_nxt:
            self._stop_rtx()
            self._recover = None
        else:
            self._rtx_at = now + self.rto
            if self._recover is not None:
                if _lt(ack, self._recover):
                    self._retransmit_first(out, now)  # partial ACK: the next hole
                else:
                    self._recover = None
        if fin_acked:
            if self.state == FIN_WAIT_1:
                self.state = FIN_WAIT_2
                self._state_deadline = now + FIN_WAIT_2_TIMEOUT
            elif self.state == CLOSING:
                self._enter_time_wait(now, out)
            elif self.state == LAST_ACK:
                self._forget("closed")
                out.append(Close())

    def _scaled_window(self, seg: Tcp) -> int:
        return seg.window << self.snd_wscale

    def _update_window(self, seg: Tcp, *, force: bool) -> None:
        """RFC 9293 3.10.7.4 (SND.WL1/WL2): only a newer segment moves the window."""
        seq, ack = seg.seq, seg.ack
        if not (force or _lt(self.snd_wl1, seq)
                or (self.snd_wl1 == seq and _le(self.snd_wl2, ack))):
            return
        self.snd_wnd = self._scaled_window(seg)
        self.snd_wl1 = seq
        self.snd_wl2 = ack
        self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
        edge = self._send_edge()
        if _lt(self.max_snd_edge, edge):
            self.max_snd_edge = edge

    def _send_edge(self) -> int:
        """The right edge of the guest's window: relative to the ACK of the segment that set
        it (SND.WL2), not to SND.UNA, which may have moved on since (a guest's window update
        can be older than its latest ACK; RFC 9293 3.10.7.4)."""
        return (self.snd_wl2 + self.snd_wnd) & _SEQ_MASK

    def _receive(self, seq: int, payload: bytes | memoryview, fin: bool, now: float,
                 out: list[Output]) -> None:
        """Trim to the window; deliver in order, queue ahead of RCV.NXT."""
        rcv_nxt = self.rcv_nxt
        if _lt(seq, rcv_nxt):  # starts before RCV.NXT: cut the part we have
            cut = _dist(seq, rcv_nxt)
            if cut > len(payload):  # only the FIN is new... or nothing: acceptable said so
                cut = len(payload)
            payload = payload[cut:]
            seq = rcv_nxt
        room = _dist(seq, self.rcv_adv) if _le(seq, self.rcv_adv) else 0
        if len(payload) > room:
            payload = payload[:room]
            fin = False  # the FIN lies past the window: the guest sends it again
        if seq != rcv_nxt:
            if payload:
                self._ooo_last = seq
                self._queue_ooo(seq, bytes(payload))
            return
        if payload:
            self._deliver(bytes(payload), out)
            self._drain_ooo(out)
        if fin:
            # Anything queued beyond the FIN is bogus: the guest's stream ends here.
            self.counters.ooo_dropped += len(self._ooo)
            self._ooo, self._ooo_bytes = [], 0
            self.rcv_nxt = (self.rcv_nxt + 1) & _SEQ_MASK
            out.append(ShutdownWrite())
            if self.state == ESTABLISHED:
                self.state = CLOSE_WAIT
                self._push(now, out)  # our FIN may already be due
            elif self.state == FIN_WAIT_1:
                self.state = CLOSING
            elif self.state == FIN_WAIT_2:
                self._enter_time_wait(now, out)

    def _deliver(self, data: bytes, out: list[Output]) -> None:
        self.rcv_nxt = (self.rcv_nxt + len(data)) & _SEQ_MASK
        self.host_unwritten += len(data)
        self.counters.bytes_to_host += len(data)
        out.append(Send(data))

    def _queue_ooo(self, seq: int, data: bytes) -> None:
        """Keep a segment that arrived ahead of RCV.NXT, merged with the runs it overlaps or
        touches, so the queue holds one run per hole however many segments fill it."""
        base = self.rcv_nxt
        start = _dist(base, seq)
        runs: list[tuple[int, bytes]] = []
        merged_start, merged = start, data
        for run_seq, run in self._ooo:  # sorted, disjoint and never adjacent
            run_start = _dist(base, run_seq)
            run_end = run_start + len(run)
            if run_start <= start and start + len(data) <= run_end:
                self.counters.dup_segments += 1
                return
            merged_end = merged_start + len(merged)
            if run_end < merged_start or run_start > merged_end:
                runs.append((run_start, run))
            elif run_start <= merged_start:
                merged = run + merged[run_end - merged_start:]
                merged_start = run_start
            else:
                merged = merged + run[merged_end - run_start:]
        runs.append((merged_start, merged))
        if len(runs) > OOO_MAX_RUNS:
            self.counters.ooo_dropped += 1
            return
        runs.sort()
        self._ooo = [((base + offset) & _SEQ_MASK, run) for offset, run in runs]
        self._ooo_bytes = sum(len(run) for _, run in runs)
        self.counters.ooo_queued += 1

    def _drain_ooo(self, out: list[Output]) -> None:
        while self._ooo:
            seq, data = self._ooo[0]
            if _lt(self.rcv_nxt, seq):
                break
            del self._ooo[0]
            self._ooo_bytes -= len(data)
            cut = _dist(seq, self.rcv_nxt)
            if cut < len(data):
                self._deliver(data[cut:], out)

    # --- host events -----------------------------------------------------------------------
    def on_host(self, event: HostEvent, now: float) -> list[Output]:
        """An event from the host socket (see the event classes for what each means)."""
        out: list[Output] = []
        state = self.state
        if state == CLOSED:
            return out
        if isinstance(event, Written):
            if not 0 < event.n <= self.host_unwritten:
                raise ValueError(f"Written({event.n}) with {self.host_unwritten} unwritten")
            before = _dist(self.rcv_nxt, self.rcv_adv)
            self.host_unwritten -= event.n
            # Receiver SWS avoidance (RFC 9293 3.8.6.2.2): announce only a worthwhile opening.
            if state in _RECEIVING \
                    and before < min(RCV_BUFFER // 2, self.our_mss) <= self._free_window():
                self._emit_ack(out)
        elif isinstance(event, Received):
            if len(event.data) > self.host_read_budget():
                raise ValueError(f"Received {len(event.data)} bytes, budget "
                                 f"{self.host_read_budget()}")
            self._last_activity = now
            self._snd_buf += event.data
            self._push(now, out)
        elif isinstance(event, Connected):
            if state == CONNECTING:
                self._state_deadline = None
                self._send_syn_ack(out, now, retransmit=False)
        elif isinstance(event, Refused):
            if state == CONNECTING:
                log.debug("tcp %s: refused (%s)", self.name, event.reason)
                self._emit(out, ToGuest(0, self.rcv_nxt, RST | ACK, 0))
                self._forget("refused")
                out.append(Close())
        elif isinstance(event, Eof):
            if state in _SENDING:
                self._fin_pending = True
                self._push(now, out)
        elif isinstance(event, HostError):
            log.debug("tcp %s: host socket failed (%s)", self.name, event.reason)
            if state == SYN_SENT:  # the guest may be in SYN-RECEIVED: this RST is in order
                self._emit(out, ToGuest(self.snd_nxt, 0, RST, 0))
            elif state != CONNECTING:
                self._emit(out, ToGuest(self.snd_nxt, self.rcv_nxt, RST | ACK, 0))
            else:
                self._emit(out, ToGuest(0, self.rcv_nxt, RST | ACK, 0))
            self._forget(event.reason)
            out.append(Close())
        return out

    # --- timers ----------------------------------------------------------------------------
    def tick(self, now: float) -> list[Output]:
        """Run whatever timer expired at `now`."""
        out: list[Output] = []
        if self.state == CLOSED:
            return out
        if now >= self._last_activity + IDLE_TIMEOUT:
            self._abort(out, "idle timeout")
            return out
        if self._state_deadline is not None and now >= self._state_deadline:
            if self.state == TIME_WAIT:
                self._forget("time-wait over")
            elif self.state == CONNECTING:
                self._emit(out, ToGuest(0, self.rcv_nxt, RST | ACK, 0))
                self._forget("connect timeout")
                out.append(Abort("connect timeout"))
            else:
                self._abort(out, f"{self.state} timeout")
            return out
        if self._zero_window_since is not None \
                and now >= self._zero_window_since + ZERO_WINDOW_MAX:
            self._abort(out, "zero window held too long")
            return out
        if self._rtx_at is not None and now >= self._rtx_at:
            self._on_rtx_timeout(now, out)
        elif self._persist_at is not None and now >= self._persist_at:
            self.counters.window_probes += 1
            # A probe below SND.UNA (as Linux does): the guest answers with its window, and
            # no byte goes past the window it advertised.
            self._emit(out, ToGuest((self.snd_una - 1) & _SEQ_MASK, self.rcv_nxt, ACK,
                                    self._window_field()))
            self._persist_interval = min(self._persist_interval * 2, PERSIST_MAX)
            self._persist_at = now + self._persist_interval
        return out

    def _on_rtx_timeout(self, now: float, out: list[Output]) -> None:
        self.counters.timeouts += 1
        self._retries += 1
        if self.state == SYN_SENT:
            self._syn_timeout(now, out)
            return
        limit = SYNACK_RETRIES if self.state == SYN_RECEIVED else MAX_RETRIES
        if self._retries > limit:
            self._abort(out, f"{self._retries - 1} retransmissions unanswered")
            return
        self.rto = min(self.rto * 2, RTO_MAX)  # RFC 6298 5.5
        self._rtt_seq = None  # Karn
        self._dup_acks = 0
        if self.state == SYN_RECEIVED:
            self._send_syn_ack(out, now, retransmit=True)
            return
        self._recover = self.snd_nxt
        self._retransmit_first(out, now)

    def _syn_timeout(self, now: float, out: list[Output]) -> None:
        """Our SYN went unanswered: again with backoff, SYN_RETRIES times, then give up."""
        if self._retries > SYN_RETRIES:
            self._forget(SYN_TIMEOUT)
            out.append(Abort(SYN_TIMEOUT))
            return
        self.rto = min(self.rto * 2, RTO_MAX)
        self._rtt_seq = None  # Karn
        self.counters.retransmits += 1
        self._send_syn(out, now)

    def _take_rtt(self, ack: int, now: float) -> None:
        if self._rtt_seq is None or _lt(ack, self._rtt_seq):
            return
        sample = max(now - self._rtt_start, 0.0)
        self._rtt_seq = None
        if self._srtt is None:  # RFC 6298 2.2
            self._srtt = sample
            self._rttvar = sample / 2
        else:  # RFC 6298 2.3
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - sample)
            self._srtt = 0.875 * self._srtt + 0.125 * sample
        self.rto = min(max(self._srtt + max(CLOCK_GRANULARITY, 4 * self._rttvar), RTO_MIN),
                       RTO_MAX)

    def _stop_rtx(self) -> None:
        self._rtx_at = None
        self._retries = 0

    # --- sending ---------------------------------------------------------------------------
    @property
    def send_quantum(self) -> int:
        """The payload of one full segment toward the guest (a TSO segment with `tso`)."""
        return self._segment_limit()

    def _segment_limit(self) -> int:
        """The largest payload of one segment to the guest: its MSS, or with `tso` as many
        MSS-sized pieces as fit TSO_MAX_PAYLOAD (the table sends such a segment as one TSO
        frame with gso_size = snd_mss, which the switch cuts for a port without TSO)."""
        if self.tso:
            return TSO_MAX_PAYLOAD // self.snd_mss * self.snd_mss
        return self.snd_mss

    def _send_syn_ack(self, out: list[Output], now: float, *, retransmit: bool) -> None:
        options = bytes((OPT_MSS, 4)) + self.our_mss.to_bytes(2, "big")
        if self.rcv_wscale:
            options += bytes((OPT_NOP, OPT_WSCALE, 3, self.rcv_wscale))
        if self.sack_ok:
            options += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))
        window = min(self._free_window(), 0xFFFF)
        self.rcv_adv = (self.rcv_nxt + window) & _SEQ_MASK
        self.state = SYN_RECEIVED
        self.snd_nxt = (self.iss + 1) & _SEQ_MASK
        if retransmit:
            self.counters.retransmits += 1
        else:
            self._rtt_seq, self._rtt_start = self.snd_nxt, now
        self._rtx_at = now + self.rto
        self._emit(out, ToGuest(self.iss, self.rcv_nxt, SYN | ACK, window, options))

    def _push(self, now: float, out: list[Output]) -> None:
        """Send what the guest's window allows of the buffer, then our FIN if due."""
        if self.state not in (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK):
            return
        buf = self._snd_buf
        sent = _dist(self.snd_una, self.snd_nxt)
        if self._fin_seq is not None:
            sent -= 1
        edge = self._send_edge()
        start = self.snd_nxt
        limit = self._segment_limit()
        while sent < len(buf) and self._fin_seq is None:
            usable = _dist(self.snd_nxt, edge) if _lt(self.snd_nxt, edge) else 0
            if usable == 0:
                break
            n = min(len(buf) - sent, limit, usable)
            last = sent + n == len(buf)
            if self._rtt_seq is None:
                self._rtt_seq, self._rtt_start = (self.snd_nxt + n) & _SEQ_MASK, now
            # One copy of the payload (the view is gone before the buffer is cut again).
            self._emit(out, ToGuest(self.snd_nxt, self.rcv_nxt, ACK | (PSH if last else 0),
                                    self._window_field(), b"",
                                    bytes(memoryview(buf)[sent:sent + n])))
            self.counters.bytes_to_guest += n
            self.snd_nxt = (self.snd_nxt + n) & _SEQ_MASK
            sent += n
        if self._fin_pending and self._fin_seq is None and sent == len(buf):
            self._fin_seq = self.snd_nxt
            self._emit(out, ToGuest(self.snd_nxt, self.rcv_nxt, FIN | ACK,
                                    self._window_field()))
            self.snd_nxt = (self.snd_nxt + 1) & _SEQ_MASK
            self.state = FIN_WAIT_1 if self.state == ESTABLISHED else LAST_ACK
        if self.snd_nxt != self.snd_una and self._rtx_at is None:
            self._rtx_at = now + self.rto
        self._update_persist(now, sent < len(buf), self.snd_nxt != start)

    def _update_persist(self, now: float, waiting: bool, progressed: bool) -> None:
        """Arm the persist timer when data waits on a closed window and nothing is in flight
        (no ACK would come to reopen it); disarm it otherwise.  The zero-window clock runs
        from the first push that could send nothing until one sends again."""
        if progressed or not waiting:
            self._zero_window_since = None
        elif self._zero_window_since is None:
            self._zero_window_since = now
        if waiting and self.snd_una == self.snd_nxt:
            if self._persist_at is None:
                self._persist_interval = max(self.rto, PERSIST_MIN)
                self._persist_at = now + self._persist_interval
        else:
            self._persist_at = None

    def _retransmit_first(self, out: list[Output], now: float) -> None:
        """Resend the first unacknowledged segment (data, or our FIN)."""
        self.counters.retransmits += 1
        in_flight = _dist(self.snd_una, self.snd_nxt)
        fin_in_flight = self._fin_seq is not None
        data_in_flight = in_flight - (1 if fin_in_flight else 0)
        window = self._window_field()
        if data_in_flight > 0:
            n = min(data_in_flight, self._segment_limit())
            fin = FIN if fin_in_flight and n == data_in_flight else 0
            self._emit(out, ToGuest(self.snd_una, self.rcv_nxt, ACK | PSH | fin, window, b"",
                                    bytes(self._snd_buf[:n])))
        elif fin_in_flight:
            self._emit(out, ToGuest(self.snd_una, self.rcv_nxt, FIN | ACK, window))
        self._rtx_at = now + self.rto

    def _free_window(self) -> int:
        unwritten = self.host_unwritten
        return max(min(RCV_BUFFER, self.hold_limit - len(self._snd_buf)) - unwritten, 0)

    @property
    def promised_window(self) -> int:
        """Bytes between RCV.NXT and the right edge we advertised."""
        return _dist(self.rcv_nxt, self.rcv_adv) if _le(self.rcv_nxt, self.rcv_adv) else 0

    @property
    def room_limited(self) -> bool:
        """The guest's room (not the host socket) holds the window a segment or more below
        what RCV_BUFFER would offer."""
        return self.state in _RECEIVING \
            and self.hold_limit - len(self._snd_buf) < RCV_BUFFER \
            and RCV_BUFFER - self.host_unwritten - self.promised_window \
            >= min(RCV_BUFFER // 2, self.our_mss)

    def window_update(self) -> list[Output]:
        """The guest's room grew (its other flows gave bytes back): an ACK announcing the
        wider window when it opens by a segment or more ([] otherwise)."""
        out: list[Output] = []
        if self.state in _RECEIVING and self._free_window() - self.promised_window \
                >= min(RCV_BUFFER // 2, self.our_mss):
            self._emit_ack(out)
        return out

    def _window_field(self) -> int:
        """The window field to send, scaled; records the right edge it promises (which
        never moves left: RFC 9293 3.8.6.2.1)."""
        promised = _dist(self.rcv_nxt, self.rcv_adv) if _le(self.rcv_nxt, self.rcv_adv) else 0
        free = max(self._free_window(), promised)
        value = min(free >> self.rcv_wscale, 0xFFFF)
        if self.state in _RECEIVING or self.state == SYN_RECEIVED:
            edge = (self.rcv_nxt + (value << self.rcv_wscale)) & _SEQ_MASK
            if _lt(self.rcv_adv, edge):
                self.rcv_adv = edge
        return value

    def _emit_ack(self, out: list[Output]) -> None:
        options = self._sack_option() if self.sack_ok and self._ooo else b""
        self._emit(out, ToGuest(self.snd_nxt, self.rcv_nxt, ACK, self._window_field(), options))

    def _sack_option(self) -> bytes:
        """SACK blocks for the out-of-order runs (RFC 2018 4): the run holding the latest
        segment first, then the others in sequence order, at most SACK_BLOCKS."""
        latest = self._ooo_last
        runs = sorted(self._ooo, key=lambda run: not (
            _le(run[0], latest) and _lt(latest, (run[0] + len(run[1])) & _SEQ_MASK)))
        blocks = b"".join(_SACK_BLOCK.pack(seq, (seq + len(data)) & _SEQ_MASK)
                          for seq, data in runs[:SACK_BLOCKS])
        return bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + len(blocks))) + blocks

    def _challenge_ack(self, out: list[Output], now: float) -> None:
        second = int(now)
        if second != self._challenge_second:
            self._challenge_second, self._challenge_count = second, 0
        if self._challenge_count >= CHALLENGE_ACKS_PER_SECOND:
            self.counters.challenge_acks_suppressed += 1
            return
        self._challenge_count += 1
        self.counters.challenge_acks += 1
        self._emit_ack(out)

    def _emit(self, out: list[Output], seg: ToGuest) -> None:
        self.counters.segments_out += 1
        if seg.flags & ACK:
            self.ack_owed = False  # this segment carries it
            self._acked_to = seg.ack
        out.append(seg)

    # --- ending ----------------------------------------------------------------------------
    def _enter_time_wait(self, now: float, out: list[Output]) -> None:
        self.state = TIME_WAIT
        self._state_deadline = now + TIME_WAIT_SECONDS
        self._rtx_at = self._persist_at = self._zero_window_since = None
        out.append(Close())

    def _abort(self, out: list[Output], reason: str) -> None:
        log.info("tcp %s: aborted: %s", self.name, reason)
        self._emit(out, ToGuest(self.snd_nxt, self.rcv_nxt, RST | ACK, 0))
        self._forget(reason)
        out.append(Abort(reason))

    def _forget(self, reason: str) -> None:
        log.debug("tcp %s: closed in %s (%s)", self.name, self.state, reason)
        self.state = CLOSED
        self._snd_buf = bytearray()
        self._ooo = []
        self._ooo_bytes = 0
        self._rtx_at = self._persist_at = self._state_deadline = None
        self._zero_window_since = None
