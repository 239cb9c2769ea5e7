"""The NAT's Trio shell: the host sockets the sans-I/O cores of netstack.nat ask for (TCP,
UDP, ICMP echo, DNS), the frames they answer with handed to `deliver`, their timers driven.

A guest frame's path: the gateway port calls `from_guests(frames)` (a batch; `from_guest(frame)`
is a batch of one) -> the IP layer read once
(netstack.nat.packet) -> UDP to UdpTable (the gateway's :53 to the DnsForwarder), echo to
EchoTable -> their actions performed at once, without waiting: a connected non-blocking UDP
socket per flow (IP_TTL / IPV6_UNICAST_HOPS from the guest's TTL less one hop, IP_RECVERR /
IPV6_RECVERR on), an unprivileged ping socket per echo flow (SOCK_DGRAM, IPPROTO_ICMP or
IPPROTO_ICMPV6), a query on the upstream resolver's socket; a datagram the kernel cannot take
now is dropped (UDP's promise), counted.
A host socket's path: one task per socket waits for it to be readable, then reads its error
queue (MSG_ERRQUEUE: ICMP errors about what the guest sent, mapped back by ErrorReporter) and
up to READS_PER_WAKE datagrams (to the guest through the core); the cores' caps bound the
sockets, so they bound the tasks.  One task sleeps until the cores' next deadline and runs
their `tick`: idle flows closed, DNS retries and SERVFAILs, TCP retransmissions and probes.
Whoever hands a core something (`from_guests`, a TCP socket's reader handler, a connection's
task after its connect, a forward) lowers that sleep's deadline in place when the cores'
earliest moved earlier (`_arm`: no task woken), so a guest that lost what the server sent
and says nothing gets it again within the RTO.  (UDP and echo reads only push deadlines
later, an idle flow's, or drop a DNS query's: their handlers leave the sleep alone.)

TCP: a guest segment goes to TcpTable (netstack.nat.tcp_flows: caps, deny list, one sans-I/O
TcpConnection per flow); a connection's Connect opens a non-blocking socket connected in a
task within CONNECT_TIMEOUT (failure -> RST to the guest); its Sends are written once per
batch of guest frames, after the batch, as far as the socket takes them (Written to the core),
the rest by a writer task, then the ACKs the batch owes go out, one per connection, with the
window the writes left (the guest's room under its cap reopens windows: TcpTable.reopen); a
reader task reads at most `read_budget` (the connection's room for the guest within the
guest's cap on buffered bytes; 0 -> it waits for the guest's next ACK, or, while the guest's
other flows hold the cap, for bytes given back to that guest), in whole segments toward the
guest (`read_size`: one TSO frame per read).  Backpressure both ways: the window we
advertise is what the host socket has not taken (the core's RCV_BUFFER), and what the guest
has not acknowledged stops our reads (SND_BUFFER), so a stalled peer leaves its bytes in the
kernel's socket buffers.

DNS over TCP: a guest's connection to the gateway's TCP port 53 is relayed to an upstream
resolver's TCP port 53 (the preferred one first, the next when one does not connect within
DNS_CONNECT_TIMEOUT; the upstream's family may differ from the guest's); when none connects,
the guest gets a RST.

Port forwards (`forwards`, netstack.nat.forward): a TCP forward's listening socket (IPV6_V6ONLY
for IPv6, SO_REUSEADDR) accepts; each connection waits up to NEIGHBOUR_WAIT for `resolve` to
know the guest's MAC, then becomes an active open toward the guest (TcpTable.open_forward)
and, once the guest accepts, the same relay as an outgoing connection.  A UDP forward's bound
socket feeds UdpForwards (one flow per outside client); the guest's answers go back with
sendto.  Per forward at most `forward_cap` connections or clients; a forward that cannot
listen is logged and counted, the shell goes on.

Caps per guest: the NAT's cores count a guest's flows, buffered bytes and DNS queries, and
this shell its lingering closes, against the switch port its frames came in on (`port_of`,
the hub's MAC table; a tunnel session with 256 MACs is one guest), fixed when each flow is
admitted (netstack.nat.limits).

Containment: a flow's socket error closes that flow only (counted by errno, the first of each
logged); an unexpected exception closes it too, its traceback logged once; a socket that
cannot be opened (EMFILE, ENETUNREACH) is a counted refusal for that flow.  If the host's
`net.ipv4.ping_group_range` does not admit the hub, one log line says so and echo is off;
UDP and DNS keep working.  `deliver` (the gateway port's) must not block or raise.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import trio

from netstack.frame import Frame, format_mac
from netstack.nat.dns import DNS_PORT, DnsForwarder, IpAddress, SendQuery, parse_resolv_conf
from netstack.nat.forward import MAX_FORWARD_FLOWS, ForwardSpec
from netstack.nat.icmp import (
    ICMP_IDLE_SECONDS,
    ClosePingSocket,
    EchoTable,
    ErrorReporter,
    HostError,
    OpenPingSocket,
    SendEcho,
)
from netstack.nat.limits import FlowKey, FlowLimits, IdleFlows, Owner
from netstack.nat.packet import GuestPacket, NatConfig, Refused, read_guest_packet
from netstack.nat.tcp import (
    CONNECT_TIMEOUT,
    REFUSED_BY_GUEST,
    SYN_TIMEOUT,
    Abort,
    Close,
    Connect,
    Connected,
    Eof,
    Established,
    Received,
    Send,
    ShutdownWrite,
    Written,
)
from netstack.nat.tcp import HostError as TcpHostError
from netstack.nat.tcp import Refused as TcpRefused
from netstack.nat.tcp_flows import DNS, HostCall, TcpTable
from netstack.nat.udp import UDP_IDLE_SECONDS, CloseSocket, OpenSocket, SendDatagram, UdpTable
from netstack.nat.udp_forward import SendToClient, UdpForwards
from netstack.port import Port
from netstack.wire import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Malformed
from virtio.dataloop import notify_closing, serve_readable, serve_writable

log = logging.getLogger(__name__)

Deliver = Callable[[list[Frame]], None]
# The gateway's neighbour table: a guest's packed address -> its MAC, None while unknown.
Resolve = Callable[[bytes], bytes | None]
# The switch's MAC table: the port a MAC was last seen on, None if on none.
PortOf = Callable[[bytes], Port | None]

# linux/in.h, linux/in6.h, linux/errqueue.h (Python's socket module lacks them).
IP_RECVERR = 11
IPV6_RECVERR = 25
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data
_OFFENDER = _EXTENDED_ERR.size  # SO_EE_OFFENDER: the sockaddr right after it
_RECVERR = {(socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)}
# The longest datagram read, and room for one extended error with its offender's address.
MAX_DATAGRAM = 65535
ERR_ANCILLARY = socket.CMSG_SPACE(_EXTENDED_ERR.size + 28)
# Datagrams (and queued errors) one socket hands over per wake before the others get a turn.
READS_PER_WAKE = 64
# How often the ICMP error rate limiter forgets the guests whose buckets have filled up.
ERROR_SWEEP_SECONDS = 10.0
RESOLV_CONF = Path("/etc/resolv.conf")
# resolv.conf(5): no nameserver line means the name server on the local machine.
LOCAL_RESOLVERS = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")
# A send refused with these is about the remote (an ICMP error the socket learned, or no route
# now): that datagram is lost, the flow lives on.  Any other send/recv error closes the flow.
_REMOTE_ERRORS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                            errno.EHOSTDOWN, errno.ENETDOWN, errno.EMSGSIZE, errno.ENOBUFS,
                            errno.EPROTO, errno.ETIMEDOUT, errno.EACCES, errno.EPERM})
_FAMILY = {4: socket.AF_INET, 16: socket.AF_INET6}
# DNS over TCP: how long one upstream resolver has to accept before the next is tried.
DNS_CONNECT_TIMEOUT = 5.0
# Port forwards: how long an accepted connection waits for the gateway to learn the guest's
# MAC (it asks with ARP / NS itself), polled this often; then it is reset (`no_neighbour`).
NEIGHBOUR_WAIT = 3.0
NEIGHBOUR_POLL = 0.05
LISTEN_BACKLOG = 128
ACCEPTS_PER_WAKE = 64
# After accept() failed (EMFILE, ENFILE), the next try: the connection waits in the backlog.
ACCEPT_RETRY_SECONDS = 0.1


def _errno_name(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, "unknown").lower()


def _sockaddr(address: bytes, port: int) -> tuple:
    text = ipaddress.ip_address(address).compressed
    return (text, port) if len(address) == 4 else (text, port, 0, 0)


def _address_family(sockaddr: tuple) -> int:
    return socket.AF_INET6 if len(sockaddr) == 4 else socket.AF_INET


def _reset(sock: socket.socket) -> None:
    """Close an accepted connection with a reset (SO_LINGER 0): the client sees it refused."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def _port_or_mac(port_of: PortOf, mac: bytes) -> Owner:
    """Whose caps a new flow of `mac`'s counts against: the port the switch has it on, or,
    on none (a forward's guest whose MAC aged out), the MAC itself."""
    port = port_of(mac)
    return mac if port is None else port


def owner_name(owner: Owner) -> str:
    """How status names an owner: its port's name, or its MAC."""
    return owner.name if isinstance(owner, Port) else format_mac(owner)


def _tcp_key(packet: GuestPacket) -> FlowKey:
    ports = packet.data[packet.l4_offset:packet.l4_offset + 4]
    return FlowKey(IPPROTO_TCP, packet.src, int.from_bytes(ports[:2], "big"), packet.dst,
                   int.from_bytes(ports[2:], "big"))


async def _serve_socket(sock: socket.socket, on_readable: Callable[[], bool]) -> bool:
    """Serve `sock`'s reads on the data loop until `on_readable` says stop (True) or the
    socket is closed (False: then, or already closed, nothing more to read)."""
    fd = sock.fileno()
    if fd < 0:
        return False
    try:
        await serve_readable(fd, on_readable)
    except trio.ClosedResourceError:
        return False
    return True


def _flow_name(key: FlowKey) -> str:
    return (f"{ipaddress.ip_address(key.guest_ip)}:{key.guest_port} -> "
            f"{ipaddress.ip_address(key.remote_ip)}:{key.remote_port} (proto {key.proto})")


def host_error(cmsg: bytes) -> HostError | None:
    """The ICMP error in an IP_RECVERR/IPV6_RECVERR control message (struct
    sock_extended_err, then SO_EE_OFFENDER's sockaddr); None for a local error."""
    if len(cmsg) < _EXTENDED_ERR.size:
        return None
    _errno, origin, kind, code, _pad, info, _data = _EXTENDED_ERR.unpack_from(cmsg)
    if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
        return None
    offender = None
    if len(cmsg) >= _OFFENDER + 2:
        family = int.from_bytes(cmsg[_OFFENDER:_OFFENDER + 2], "little")
        if family == socket.AF_INET and len(cmsg) >= _OFFENDER + 8:
            offender = bytes(cmsg[_OFFENDER + 4:_OFFENDER + 8])
        elif family == socket.AF_INET6 and len(cmsg) >= _OFFENDER + 24:
            offender = bytes(cmsg[_OFFENDER + 8:_OFFENDER + 24])
    return HostError(kind, code, info, offender)


def connected_socket(family: int, proto: int, address: tuple) -> socket.socket:
    """A non-blocking datagram socket connected to `address`, ICMP errors queued for it
    (IP_RECVERR / IPV6_RECVERR); OSError if it cannot be had."""
    sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def read_upstreams(path: Path = RESOLV_CONF) -> list[IpAddress]:
    """The host's resolvers from resolv.conf; the local machine's when it names none or
    cannot be read (said in the log)."""
    try:
        found = parse_resolv_conf(path.read_text(errors="replace"))
    except OSError as error:
        log.warning("nat dns: cannot read %s (%s); asking %s", path, error.strerror,
                    ", ".join(map(str, LOCAL_RESOLVERS)))
        return list(LOCAL_RESOLVERS)
    if not found:
        log.warning("nat dns: %s names no nameserver; asking %s", path,
                    ", ".join(map(str, LOCAL_RESOLVERS)))
        return list(LOCAL_RESOLVERS)
    return found


class HostSocket:
    """One socket the shell owns: a flow's (UDP or echo) or an upstream resolver's."""

    __slots__ = ("key", "sock", "table", "ttl", "upstream")

    def __init__(self, sock: socket.socket, key: FlowKey | None, table: IdleFlows | None,
                 upstream: IpAddress | None = None) -> None:
        self.sock = sock
        self.key = key
        self.table = table
        self.upstream = upstream
        self.ttl = -1  # the TTL last set on it


# The most one recv() on a TCP host socket asks for (also bounded by the core's budget).
TCP_READ_CHUNK = 65536
# A flow the guest has closed whose host socket still takes its last bytes: at most this
# long, at most this many at once (each holds at most the core's RCV_BUFFER), else a RST.
# One guest's (one port's) share of them: its closed flows never take the others' places.
LINGER_SECONDS = 10.0
LINGERING_MAX = 256
LINGERING_PER_GUEST = 16
# Where readers held by all guests' buffer cap (not their own guest's) wait: any guest's
# credit wakes them.  (An owner is a Port or a MAC, never this.)
ALL_GUESTS = b""
_PROTOCOL_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp",
                   IPPROTO_ICMPV6: "icmpv6"}


class TcpSocket:
    """A TCP flow's host socket: bytes of Send actions not yet written, a pending shutdown,
    and the event its reader waits on while the core's read budget is 0."""

    __slots__ = ("budget", "forward", "key", "lingering", "owner", "pending", "shutdown",
                 "sock", "writable", "write_scope")

    def __init__(self, sock: socket.socket, key: FlowKey, owner: Owner,
                 forward: Forward | None = None) -> None:
        self.sock = sock
        self.key = key
        self.owner = owner  # its flow's owner (port), whose caps it shares
        self.forward = forward  # the port forward that accepted it (until it closes)
        self.pending = bytearray()
        self.shutdown = False
        self.budget = trio.Event()  # set when the guest's ACKs free room to read into
        self.writable = trio.Event()  # set when pending gets bytes
        self.write_scope: trio.CancelScope | None = None  # while its writer task runs
        self.lingering = False  # the flow is gone; its last bytes are still being written


class Forward:
    """One port forward: its listening (TCP) or bound (UDP) socket, the TCP connections it
    holds, what happened, by reason."""

    __slots__ = ("active", "counters", "sock", "spec")

    def __init__(self, spec: ForwardSpec) -> None:
        self.spec = spec
        self.sock: socket.socket | None = None
        self.active = 0  # TCP connections accepted and not yet closed
        self.counters: Counter[str] = Counter()


class NatShell:
    """The host side of the NAT's cores for one gateway.  `run()` owns the sockets' tasks;
    `from_guest(frame)` takes a frame a guest routed to the gateway."""

    def __init__(self, config: NatConfig, deliver: Deliver,
                 upstreams: Sequence[IpAddress] | None = None,
                 limits: FlowLimits | None = None,
                 udp_idle_seconds: float = UDP_IDLE_SECONDS,
                 echo_idle_seconds: float = ICMP_IDLE_SECONDS,
                 forwards: Sequence[ForwardSpec] = (),
                 resolve: Resolve | None = None,
                 forward_cap: int = MAX_FORWARD_FLOWS,
                 port_of: PortOf | None = None) -> None:
        self.config = config
        self.deliver = deliver
        self.limits = limits or FlowLimits()
        if port_of is not None:  # a guest is the port its MAC is on (else its MAC)
            self.limits.owner_of = partial(_port_or_mac, port_of)
        self.dns = DnsForwarder(config, read_upstreams() if upstreams is None else upstreams,
                                owner_of=self.limits.owner_of)
        self.udp = UdpTable(config, self.limits, self.dns, udp_idle_seconds)
        self.echo = EchoTable(config, self.limits, echo_idle_seconds)
        self.tcp = TcpTable(config, self.limits, dns_over_tcp=bool(self.dns.upstreams))
        self.forwards = [Forward(spec) for spec in forwards]
        self.resolve = resolve
        self.forward_cap = forward_cap
        self.udp_forwards = UdpForwards(
            config, self.limits, [(f.guest.packed, f.guest_port) for f in forwards],
            lambda key: key in self.udp.flows, udp_idle_seconds, forward_cap)
        self.tcp_sockets: dict[FlowKey, TcpSocket] = {}
        # Readers waiting for their owner's other flows to free buffer, by owner.
        self._capped: dict[Owner, set[TcpSocket]] = {}
        self.errors = ErrorReporter(config)
        self.echo_on = {4: False, 6: False}  # set by run() once the ping sockets are tried
        self.sockets: dict[FlowKey, HostSocket] = {}
        self.upstream_sockets: dict[IpAddress, HostSocket] = {}
        self.drops: Counter[str] = Counter()  # frames the shell did not carry, by reason
        self.socket_errors: Counter[str] = Counter()  # flows closed by a socket error
        self._logged: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._lingering = 0  # closed flows' sockets still writing their last bytes
        self._lingering_by_owner: Counter[Owner] = Counter()
        # The timer task's sleep, whose deadline `_arm` lowers in place (unentered: none yet).
        self._sleep = trio.CancelScope()
        self._batch: list[Frame] | None = None  # frames of the from_guests call under way
        self._unwritten: dict[TcpSocket, None] = {}  # sockets it gave bytes, in order

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until cancelled; every socket is closed on the way out."""
        self._probe_ping()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for upstream in self.dns.upstreams:
                    self._open_upstream(upstream)
                for number, forward in enumerate(self.forwards):
                    self._listen(number, forward)
                nursery.start_soon(self._timer)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for entry in [*self.sockets.values(), *self.upstream_sockets.values(),
                          *self.tcp_sockets.values(), *self.forwards]:
                if entry.sock is not None:
                    entry.sock.close()
            self.sockets.clear()
            self.tcp_sockets.clear()
            self.upstream_sockets.clear()

    def _probe_ping(self) -> None:
        """Can the hub open ping sockets?  One clear line if the host says no."""
        refused: dict[int, OSError] = {}
        for version, family, proto in ((4, socket.AF_INET, IPPROTO_ICMP),
                                       (6, socket.AF_INET6, IPPROTO_ICMPV6)):
            try:
                socket.socket(family, socket.SOCK_DGRAM, proto).close()
            except OSError as error:
                refused[version] = error
            else:
                self.echo_on[version] = True
        if refused:
            self._echo_off(refused)

    def _echo_off(self, refused: dict[int, OSError]) -> None:
        """Echo off for the IP versions in `refused` (the error each ping socket met)."""
        for version in refused:
            self.echo_on[version] = False
        which = " and ".join("ICMP" if version == 4 else "ICMPv6" for version in refused)
        error = next(iter(refused.values()))
        if error.errno in (errno.EACCES, errno.EPERM):
            try:
                allowed = " ".join(PING_GROUP_RANGE.read_text().split())
            except OSError:
                allowed = "unreadable"
            self._log_once("echo_off", logging.WARNING,
                           "nat: %s echo through the NAT is off: net.ipv4.ping_group_range "
                           "(%s) does not include the hub's group %d; UDP, TCP and DNS are "
                           "unaffected", which, allowed, os.getgid())
        else:
            self._log_once("echo_off", logging.WARNING,
                           "nat: %s echo through the NAT is off: no ping socket (%s)", which,
                           error.strerror)

    async def _timer(self) -> None:
        """Tick the cores at their earliest deadline.  Whoever moves a deadline earlier than
        this sleep's end lowers it with `_arm`."""
        while True:
            with trio.CancelScope(deadline=self._next_deadline()) as self._sleep:
                await trio.sleep_forever()
            self.tick(trio.current_time())

    def _arm(self, deadline: float | None) -> None:
        """The timer's sleep ends by `deadline` (None: nothing timed).  Only a deadline
        earlier than the sleep's costs anything, and no task wakes for it: Trio's I/O thread
        is told the sooner timeout (on the data loop one cross-thread wake-up, as a task's
        would be, but no task runs until the deadline).  Every call that hands a core
        something (a guest's frames, a host socket's bytes, EOF or connect) arms it after."""
        if deadline is not None and deadline < self._sleep.deadline:
            self._sleep.deadline = deadline

    def _next_deadline(self) -> float:
        deadlines = [d for d in (self.udp.next_deadline(), self.echo.next_deadline(),
                                 self.dns.next_deadline(), self.tcp.next_deadline(),
                                 self.udp_forwards.next_deadline())
                     if d is not None]
        if self.errors.buckets:
            deadlines.append(trio.current_time() + ERROR_SWEEP_SECONDS)
        return min(deadlines, default=math.inf)

    def tick(self, now: float) -> None:
        """The cores' timed work: idle flows closed, DNS retried or failed."""
        self._perform([*self.udp.tick(now), *self.echo.tick(now), *self.dns.tick(now),
                       *self.tcp.tick(now)], now)
        self.udp_forwards.tick(now)
        self.errors.tick(now)

    # -- from the guest -----------------------------------------------------------------------

    def from_guest(self, frame: Frame) -> None:
        """Carry one frame a guest routed to the gateway (dropped: counted in a drops)."""
        self.from_guests([frame])

    def from_guests(self, frames: Sequence[Frame]) -> None:
        """Carry a batch of frames guests routed to the gateway.  TCP in a batch is written
        to each host socket once, after the batch, and in-order data is acknowledged once
        per connection (TcpTable.flush_ack), with the window the writes left."""
        now = trio.current_time()
        out: list[Frame] = []
        self._batch = out
        try:
            for frame in frames:
                self._from_guest(frame, now)
            for entry in self._unwritten:
                try:
                    self._tcp_write(entry, out, now)
                except Exception as error:  # a bug for one connection ends that one only
                    self._tcp_crash(entry.key, entry, error)
            self._unwritten.clear()
            for key in self.tcp.take_owed():
                try:
                    self._perform_into(self.tcp.flush_ack(key), out, now)
                except Exception as error:
                    self._tcp_crash(key, self.tcp_sockets.get(key), error)
        finally:
            self._batch = None
            for entry in self._unwritten:  # left by an exception: their writers write them
                entry.writable.set()
            self._unwritten.clear()
        if out:
            self.deliver(out)
        self._arm(self._next_deadline())

    def _from_guest(self, frame: Frame, now: float) -> None:
        try:
            packet = read_guest_packet(frame, self.config.gateway_mac)
            if packet.protocol == IPPROTO_TCP:
                key = _tcp_key(packet)
                try:
                    self._perform(self.tcp.guest_segment(packet, frame.offload[0], now,
                                                         defer_ack=True), now)
                except (Malformed, Refused):
                    raise
                except Exception as error:  # a bug for one connection ends that one only
                    self._tcp_crash(key, self.tcp_sockets.get(key), error)
                    return
                entry = self.tcp_sockets.get(key)
                if entry is not None:
                    if self.tcp.read_budget(key) > 0:
                        entry.budget.set()  # the guest's ACK freed room: resume reading
                    elif self.tcp.guest_limited(key):  # (its handshake's ACK: no room yet)
                        self._hold(entry)
                return
            if packet.protocol == IPPROTO_UDP:
                if self.udp_forwards.flows and packet.dst in self.config.gateway_ips:
                    answer = self.udp_forwards.guest_datagram(packet, frame.offload[0], now)
                    if answer is not None:
                        self._send_to_client(answer)
                        return
                actions = self.udp.guest_datagram(packet, frame.offload[0], now)
            elif packet.protocol in (IPPROTO_ICMP, IPPROTO_ICMPV6):
                if not self.echo_on[packet.version]:
                    raise Refused("echo_off")
                actions = self.echo.guest_echo(packet, now)
            else:
                raise Refused("protocol", f"protocol {packet.protocol}")
        except (Malformed, Refused) as error:
            self.drops[error.reason] += 1
            return
        self._perform(actions, now)

    def _perform(self, actions: list, now: float) -> None:
        if self._batch is not None:  # from_guests delivers the batch's frames at its end
            self._perform_into(actions, self._batch, now)
            return
        frames: list[Frame] = []
        self._perform_into(actions, frames, now)
        if frames:
            self.deliver(frames)

    def _perform_into(self, actions: list, frames: list, now: float) -> None:
        for action in actions:
            if isinstance(action, HostCall):
                self._tcp_action(action, frames, now)
            elif isinstance(action, (SendDatagram, SendEcho)):
                entry = self.sockets.get(action.key)
                if entry is not None:  # None: its socket could not be opened
                    payload = action.payload if isinstance(action, SendDatagram) \
                        else action.message
                    self._send(entry, payload, action.ttl, frames, now)
            elif isinstance(action, OpenSocket):
                self._open_flow(action.key, self.udp, socket.IPPROTO_UDP,
                                _sockaddr(action.host_ip, action.host_port))
            elif isinstance(action, OpenPingSocket):
                proto = IPPROTO_ICMP if len(action.key.remote_ip) == 4 else IPPROTO_ICMPV6
                self._open_flow(action.key, self.echo, proto,
                                _sockaddr(action.key.remote_ip, 0))
            elif isinstance(action, SendQuery):
                upstream = self.upstream_sockets.get(action.upstream)
                if upstream is None:
                    self.drops["upstream_unavailable"] += 1  # the core retries the next
                else:
                    self._send(upstream, action.payload, -1, frames, now)
            elif isinstance(action, (CloseSocket, ClosePingSocket)):
                entry = self.sockets.pop(action.key, None)
                if entry is not None:
                    self._close(entry)
            elif isinstance(action, Frame):
                frames.append(action)
        if self.tcp.credited:
            self._wake_capped(frames, now)

    def _hold(self, entry: TcpSocket) -> None:
        """`entry`'s reader waits for bytes given back: its owner's, or any owner's when
        all guests' cap holds it."""
        capped = ALL_GUESTS if self.limits.host_room() <= 0 else entry.owner
        self._capped.setdefault(capped, set()).add(entry)

    def _wake_capped(self, frames: list | None, now: float) -> None:
        """Readers held by their owner's cap look again and windows its room held down are
        announced again: the owner was given bytes back."""
        owners = list(self.tcp.credited)
        self.tcp.credited.clear()
        if owners:  # bytes given back: all guests' cap has room again too
            for entry in self._capped.pop(ALL_GUESTS, ()):
                entry.budget.set()
        updates: list = []
        for owner in owners:
            for entry in self._capped.pop(owner, ()):
                entry.budget.set()
            updates += self.tcp.reopen(owner)
        if updates:
            if frames is None:
                self._perform(updates, now)
            else:
                self._perform_into(updates, frames, now)

    # -- TCP host sockets ---------------------------------------------------------------------

    def _tcp_action(self, call: HostCall, frames: list, now: float) -> None:
        key, action = call.key, call.action
        entry = self.tcp_sockets.get(key)
        if isinstance(action, Send):
            if entry is not None:
                entry.pending += action.data
                if self._batch is None:
                    self._tcp_write(entry, frames, now)
                else:
                    self._unwritten[entry] = None  # written once, after the batch
        elif isinstance(action, Connect):
            if entry is not None:  # a replaced TIME-WAIT flow's socket
                self._tcp_close(entry)
            self._tcp_connect(key, frames, now)
        elif isinstance(action, ShutdownWrite):
            if entry is not None:
                entry.shutdown = True
                if self._batch is None:
                    self._tcp_write(entry, frames, now)
                else:
                    self._unwritten[entry] = None
        elif isinstance(action, Established):
            if entry is not None and self._nursery is not None:
                self._nursery.start_soon(self._tcp_relay_task, entry)
        elif isinstance(action, Close) and entry is not None:
            self._unwritten.pop(entry, None)
            self._tcp_write(entry, frames, now)  # the guest's last bytes, its FIN
            if self.tcp_sockets.get(key) is not entry:
                pass  # the write failed: that closed it
            elif entry.pending or entry.shutdown:
                self._tcp_linger(entry)
            else:
                self._tcp_close(entry)
        elif isinstance(action, Abort) and entry is not None:
            if entry.forward is not None and action.reason in (REFUSED_BY_GUEST, SYN_TIMEOUT):
                entry.forward.counters[action.reason] += 1
            self._tcp_forget(entry)
            self._tcp_reset(entry)

    def _tcp_event(self, key: FlowKey, event: object, frames: list, now: float) -> None:
        self._perform_into(self.tcp.on_host(key, event, now), frames, now)

    def _tcp_connect(self, key: FlowKey, frames: list, now: float) -> None:
        if self.tcp.kind(key) == DNS:  # the upstream resolvers, the preferred one first
            upstreams = self.dns.upstreams
            first = self.dns.preferred % len(upstreams)
            addresses = [_sockaddr(upstream.packed, DNS_PORT)
                         for upstream in upstreams[first:] + upstreams[:first]]
            timeout = DNS_CONNECT_TIMEOUT
        else:
            addresses = [_sockaddr(self.tcp.host_ip(key), key.remote_port)]
            timeout = CONNECT_TIMEOUT
        try:
            sock = socket.socket(_address_family(addresses[0]), socket.SOCK_STREAM)
        except OSError as error:  # EMFILE, ENFILE: this flow is refused, counted
            reason = _errno_name(error)
            self.drops[f"open_{reason}"] += 1
            self._log_once(f"open_{reason}", logging.WARNING,
                           "nat: cannot open a socket for %s: %s (counted as open_%s; later "
                           "ones only counted)", _flow_name(key), error.strerror, reason)
            self._tcp_event(key, TcpRefused(reason), frames, now)
            return
        sock.setblocking(False)
        entry = TcpSocket(sock, key, self.tcp.flows[key].owner)
        self.tcp_sockets[key] = entry
        if self._nursery is None:
            raise RuntimeError("NatShell.from_guest before run() started")
        self._nursery.start_soon(self._tcp_run, entry, addresses, timeout)

    async def _tcp_run(self, entry: TcpSocket, addresses: list[tuple], timeout: float) -> None:
        """A connection's task: a bug while serving it ends that connection only."""
        try:
            await self._tcp_serve(entry, addresses, timeout)
        except Exception as error:
            self._tcp_crash(entry.key, entry, error)

    async def _tcp_relay_task(self, entry: TcpSocket) -> None:
        """A forwarded connection's task, once the guest accepted it."""
        try:
            await self._tcp_relay(entry)
        except Exception as error:
            self._tcp_crash(entry.key, entry, error)

    def _tcp_crash(self, key: FlowKey, entry: TcpSocket | None, error: BaseException) -> None:
        """An unexpected exception for `key`: its socket closed, its flow forgotten (the
        guest's next segment gets a reset), the traceback logged once, counted."""
        self.socket_errors["exception"] += 1
        if "exception" not in self._logged:
            self._logged.add("exception")
            log.error("nat: closing flow %s after an unexpected error (later ones only "
                      "counted)", _flow_name(key), exc_info=error)
        if entry is not None:
            self._tcp_close(entry)
        if key not in self.tcp_sockets:  # not a newer connection's socket on the same key
            self.tcp.discard(key)
        if self.tcp.credited:
            self._wake_capped(None, trio.current_time())

    async def _tcp_serve(self, entry: TcpSocket, addresses: list[tuple],
                         timeout: float) -> None:
        """Connect to the first of `addresses` that accepts within `timeout`, then read and
        write until the socket closes."""
        key = entry.key
        reason: str | None = None
        for number, address in enumerate(addresses):
            if number:  # the next one (DNS upstreams): a new socket, maybe of another family
                try:
                    sock = socket.socket(_address_family(address), socket.SOCK_STREAM)
                except OSError as error:
                    reason = _errno_name(error)
                    break
                sock.setblocking(False)
                self._close(entry)
                entry.sock = sock
            reason = await self._tcp_connect_one(entry.sock, address, timeout)
            if self.tcp_sockets.get(key) is not entry:
                return  # closed while connecting (the guest reset it, or the core gave up)
            if reason is None:
                break
        frames: list = []
        if reason is not None:
            if self.tcp.kind(key) == DNS:
                self.drops["dns_tcp_no_upstream"] += 1  # the guest gets a RST
            self._tcp_close(entry)
            self._tcp_event(key, TcpRefused(reason), frames, trio.current_time())
        else:
            self._tcp_event(key, Connected(), frames, trio.current_time())
        if frames:
            self.deliver(frames)
        self._arm(self.tcp.next_deadline())  # the SYN-ACK's retransmission
        if self.tcp_sockets.get(key) is not entry:
            return
        await self._tcp_relay(entry)

    @staticmethod
    async def _tcp_connect_one(sock: socket.socket, address: tuple,
                               timeout: float) -> str | None:
        """Connect `sock` to `address`: None when it did, else why not."""
        with trio.move_on_after(timeout) as scope:
            try:
                error = sock.connect_ex(address)
                if error == errno.EINPROGRESS:
                    await trio.lowlevel.wait_writable(sock)
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except trio.ClosedResourceError:
                return "closed"
            except OSError as error:
                return _errno_name(error)
        if scope.cancelled_caught:
            return "timeout"
        return errno.errorcode.get(error, "unknown").lower() if error else None

    async def _tcp_relay(self, entry: TcpSocket) -> None:
        """Read and write the connected socket until it closes."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tcp_writer, entry)
            await self._tcp_reader(entry)  # the writer ends when the socket closes

    async def _tcp_reader(self, entry: TcpSocket) -> None:
        """Server -> guest: the socket is served by the data loop (virtio/dataloop.py)
        while the guest has room; with none, this task waits until bytes are given back."""
        key, sock = entry.key, entry.sock
        ended = False  # the server's EOF, or the socket failed

        def on_readable() -> bool:
            """One read within the guest's room; True when serving must stop (no room,
            the flow gone, EOF)."""
            nonlocal ended
            if self.tcp_sockets.get(key) is not entry:
                return True
            # The guest's other flows may have used its buffer cap while this one waited:
            # recv(0) would return b"" and look like the server's EOF.
            budget = self.tcp.read_budget(key)
            if budget == 0:
                return True
            frames: list = []
            now = trio.current_time()
            try:
                data = sock.recv(self.tcp.read_size(key, min(budget, TCP_READ_CHUNK)))
            except BlockingIOError:
                return False
            except OSError as error:
                self._tcp_fail(entry, error, frames, now)
                data = None
            except Exception as error:  # one flow's bug closes that flow, not the shell
                self._tcp_fail(entry, error, frames, now)
                data = None
            if data is not None:
                self._tcp_event(key, Received(data) if data else Eof(), frames, now)
            if frames:
                self.deliver(frames)
            # Their retransmission; with no window for them, the persist timer.
            self._arm(self.tcp.next_deadline())
            if not data:
                ended = True  # EOF: nothing more to read (writing goes on in the writer)
            return ended

        while self.tcp_sockets.get(key) is entry and not ended:
            if self.tcp.read_budget(key) == 0:
                entry.budget = trio.Event()
                if self.tcp.guest_limited(key):
                    self._hold(entry)
                await entry.budget.wait()
                continue
            if not await _serve_socket(sock, on_readable):
                return

    async def _tcp_writer(self, entry: TcpSocket) -> None:
        """Guest -> server, for what the socket did not take at once (`_tcp_write` writes
        inline): written from the data loop as room comes, this task waking when all is out."""
        key = entry.key

        def on_writable() -> bool:
            if self.tcp_sockets.get(key) is not entry:
                return True
            frames: list = []
            self._tcp_write(entry, frames, trio.current_time())
            if frames:
                self.deliver(frames)
            return not entry.pending

        try:
            with trio.CancelScope() as entry.write_scope:  # a lingering socket's deadline
                while self.tcp_sockets.get(key) is entry:
                    if entry.pending:
                        fd = entry.sock.fileno()
                        if fd < 0:
                            return
                        await serve_writable(fd, on_writable)
                    else:
                        entry.writable = trio.Event()
                        await entry.writable.wait()
                if entry.lingering:
                    await self._tcp_linger_out(entry)
        except trio.ClosedResourceError:
            return
        except OSError as error:  # only a lingering socket's: the flow is gone
            self.socket_errors[_errno_name(error)] += 1
        finally:
            entry.write_scope = None
            if entry.lingering:
                self._tcp_lingered(entry)

    def _tcp_write(self, entry: TcpSocket, frames: list, now: float) -> None:
        """Write what the socket takes now (Written to the core); the rest waits for the
        writer task; a shutdown follows the last byte."""
        if self.tcp_sockets.get(entry.key) is not entry:
            return
        try:
            if entry.pending:
                sent = entry.sock.send(entry.pending)
                del entry.pending[:sent]
                if sent:
                    self._tcp_event(entry.key, Written(sent), frames, now)
            if entry.shutdown and not entry.pending:
                entry.shutdown = False
                entry.sock.shutdown(socket.SHUT_WR)
        except BlockingIOError:
            pass
        except OSError as error:
            self._tcp_fail(entry, error, frames, now)
            return
        if entry.pending:
            entry.writable.set()

    def _tcp_fail(self, entry: TcpSocket, error: BaseException, frames: list,
                  now: float) -> None:
        """One connection's socket failed: that connection ends (RST to its guest)."""
        if isinstance(error, OSError):
            reason = _errno_name(error)
            self._log_once(f"socket_{reason}", logging.WARNING,
                           "nat: closing flow %s: %s (counted as %s; later ones only counted)",
                           _flow_name(entry.key), error.strerror, reason)
        else:
            reason = "exception"
            if reason not in self._logged:
                self._logged.add(reason)
                log.error("nat: closing flow %s after an unexpected error",
                          _flow_name(entry.key), exc_info=error)
        self.socket_errors[reason] += 1
        self._tcp_close(entry)
        self._tcp_event(entry.key, TcpHostError(reason), frames, now)

    def _tcp_linger(self, entry: TcpSocket) -> None:
        """The guest's side of `entry` is done but its host socket has not taken the last
        bytes (the guest sent them with its FIN): its writer task writes them, then the FIN,
        within LINGER_SECONDS; past that, or with LINGERING_MAX sockets already lingering
        (LINGERING_PER_GUEST of its owner's), the host peer gets a reset (counted
        `linger_reset`), as a closing kernel socket would.  The flow is gone from the table
        meanwhile (its key free for a new flow)."""
        self._tcp_forget(entry)
        if entry.write_scope is None or self._lingering >= LINGERING_MAX \
                or self._lingering_by_owner[entry.owner] >= LINGERING_PER_GUEST:
            self.drops["linger_reset"] += 1
            self._tcp_reset(entry)
            return
        self._lingering += 1
        self._lingering_by_owner[entry.owner] += 1
        entry.lingering = True
        entry.write_scope.deadline = trio.current_time() + LINGER_SECONDS
        entry.writable.set()

    @staticmethod
    async def _tcp_linger_out(entry: TcpSocket) -> None:
        """Write a lingering socket's last bytes and its FIN (no core to tell: it is gone)."""
        while entry.pending:
            await trio.lowlevel.wait_writable(entry.sock)
            try:
                del entry.pending[:entry.sock.send(entry.pending)]
            except BlockingIOError:
                pass
        if entry.shutdown:
            entry.sock.shutdown(socket.SHUT_WR)
            entry.shutdown = False

    def _tcp_lingered(self, entry: TcpSocket) -> None:
        """A lingering socket's end: closed when all was written, else reset."""
        entry.lingering = False
        self._lingering -= 1
        self._lingering_by_owner[entry.owner] -= 1
        if not self._lingering_by_owner[entry.owner]:
            del self._lingering_by_owner[entry.owner]
        if entry.pending or entry.shutdown:
            self.drops["linger_reset"] += 1
            self._tcp_reset(entry)
        else:
            self._close(entry)

    def _tcp_reset(self, entry: TcpSocket) -> None:
        """Close `entry`'s socket with a RST (SO_LINGER 0)."""
        entry.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._close(entry)

    def _tcp_close(self, entry: TcpSocket) -> None:
        self._tcp_forget(entry)
        self._close(entry)

    def _tcp_forget(self, entry: TcpSocket) -> None:
        """`entry` leaves the flows' sockets; its reader and writer tasks end."""
        if self.tcp_sockets.get(entry.key) is entry:
            del self.tcp_sockets[entry.key]
        if entry.forward is not None:
            entry.forward.active -= 1
            entry.forward = None
        for capped in (entry.owner, ALL_GUESTS):
            waiting = self._capped.get(capped)
            if waiting is not None:
                waiting.discard(entry)
                if not waiting:
                    del self._capped[capped]
        entry.budget.set()
        entry.writable.set()

    # -- port forwards ------------------------------------------------------------------------

    def _listen(self, number: int, forward: Forward) -> None:
        """Open forward number `number`'s socket and start its task; a forward that cannot
        (the port taken, the address not the host's) is logged and counted, the rest go on."""
        spec = forward.spec
        v6 = spec.guest.version == 6
        bind = str(spec.bind) if spec.bind is not None else ("::" if v6 else "0.0.0.0")
        tcp = spec.protocol == "tcp"
        try:
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                                 socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                if tcp:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if v6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((bind, spec.host_port))
                if tcp:
                    sock.listen(LISTEN_BACKLOG)
            except OSError:
                sock.close()
                raise
        except OSError as error:
            forward.counters[f"listen_{_errno_name(error)}"] += 1
            log.warning("nat: forward %s cannot listen on %s port %d: %s; the NAT and the "
                        "other forwards go on", spec, bind, spec.host_port, error.strerror)
            return
        forward.sock = sock
        if self.resolve is None:
            self._log_once("no_resolve", logging.WARNING,
                           "nat: forwards without the gateway's neighbour table: every "
                           "connection is refused (no_neighbour)")
        log.info("nat: forward %s listening", spec)
        if self._nursery is not None:
            if tcp:
                self._nursery.start_soon(self._accept, forward)
            else:
                self._nursery.start_soon(self._udp_forward_read, number, forward)

    async def _accept(self, forward: Forward) -> None:
        """A TCP forward's accept loop: it ends only with the shell."""
        sock = forward.sock
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                return
            try:
                failed = self._accept_some(forward)
            except Exception as error:  # a bug costs the connection at hand, not the forward
                failed = True
                forward.counters["exception"] += 1
                if "forward_exception" not in self._logged:
                    self._logged.add("forward_exception")
                    log.error("nat: forward %s: accept failed unexpectedly", forward.spec,
                              exc_info=error)
            if failed:  # EMFILE and the like: the connection waits in the backlog meanwhile
                await trio.sleep(ACCEPT_RETRY_SECONDS)

    def _accept_some(self, forward: Forward) -> bool:
        """Accept what the backlog holds (up to ACCEPTS_PER_WAKE); True if accept() failed."""
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _client = forward.sock.accept()
            except BlockingIOError:
                return False
            except OSError as error:  # EMFILE, ENFILE, ENOBUFS: try again shortly
                reason = f"accept_{_errno_name(error)}"
                forward.counters[reason] += 1
                self._log_once(reason, logging.WARNING, "nat: forward %s: accept failed: %s "
                               "(later ones only counted)", forward.spec, error.strerror)
                return True
            if forward.active >= self.forward_cap:
                forward.counters["forward_limit"] += 1
                _reset(conn)
                continue
            forward.active += 1
            forward.counters["accepted"] += 1
            self._nursery.start_soon(self._forward_open, forward, conn)
        return False

    async def _forward_open(self, forward: Forward, conn: socket.socket) -> None:
        """An accepted connection: once the guest's MAC is known, the active open toward
        the guest; refused (reset, counted) when it is not known within NEIGHBOUR_WAIT or
        the guest's caps refuse it."""
        spec = forward.spec
        owned = True  # until the TcpSocket holds it
        try:
            conn.setblocking(False)
            guest_ip = spec.guest.packed
            guest_mac = await self._neighbour(guest_ip)
            if guest_mac is None:
                forward.counters["no_neighbour"] += 1
                return
            now = trio.current_time()
            try:
                key, out = self.tcp.open_forward(guest_mac, guest_ip, spec.guest_port, now)
            except Refused as refused:
                forward.counters[refused.reason] += 1
                return
            self.tcp_sockets[key] = TcpSocket(conn, key, self.tcp.owner(key), forward)
            owned = False
            self._perform(out, now)
            self._arm(self._next_deadline())
        except Exception as error:  # one connection's bug ends that connection only
            forward.counters["exception"] += 1
            if "forward_exception" not in self._logged:
                self._logged.add("forward_exception")
                log.error("nat: forward %s: closing a connection after an unexpected error",
                          spec, exc_info=error)
        finally:
            if owned:
                forward.active -= 1
                _reset(conn)

    async def _neighbour(self, guest_ip: bytes) -> bytes | None:
        """The guest's MAC, waiting up to NEIGHBOUR_WAIT for the gateway to learn it."""
        if self.resolve is None:
            return None
        give_up = trio.current_time() + NEIGHBOUR_WAIT
        while (guest_mac := self.resolve(guest_ip)) is None \
                and trio.current_time() < give_up:
            await trio.sleep(NEIGHBOUR_POLL)
        return guest_mac

    async def _udp_forward_read(self, number: int, forward: Forward) -> None:
        """A UDP forward's socket, served by the data loop: each client's datagrams to the
        guest through UdpForwards; a bad datagram or a bug costs that datagram only."""
        sock = forward.sock
        guest_ip = forward.spec.guest.packed

        def on_readable() -> bool:
            frames: list[Frame] = []
            now = trio.current_time()
            try:
                for _ in range(READS_PER_WAKE):
                    try:
                        data, client = sock.recvfrom(MAX_DATAGRAM)
                    except BlockingIOError:
                        break
                    except OSError as error:
                        forward.counters[f"recv_{_errno_name(error)}"] += 1
                        break
                    guest_mac = None if self.resolve is None else self.resolve(guest_ip)
                    frame = self.udp_forwards.from_client(number, client, data, guest_mac, now)
                    if frame is not None:
                        frames.append(frame)
            except Exception as error:
                forward.counters["exception"] += 1
                if "forward_exception" not in self._logged:
                    self._logged.add("forward_exception")
                    log.error("nat: forward %s: a datagram dropped after an unexpected error",
                              forward.spec, exc_info=error)
            if frames:
                self.deliver(frames)
                self._arm(self._next_deadline())
            return False

        try:
            await serve_readable(sock.fileno(), on_readable)
        except trio.ClosedResourceError:
            return

    def _send_to_client(self, answer: SendToClient) -> None:
        """The guest's answer on a UDP forward's flow, back to the outside client."""
        forward = self.forwards[answer.forward]
        if forward.sock is None:
            return
        try:
            forward.sock.sendto(answer.payload, answer.client)
        except BlockingIOError:
            forward.counters["send_full"] += 1
        except OSError as error:
            forward.counters[f"send_{_errno_name(error)}"] += 1

    def _forwards_status(self) -> list[dict[str, object]]:
        return [{"forward": str(forward.spec), "listening": forward.sock is not None,
                 "active": forward.active if forward.spec.protocol == "tcp"
                 else self.udp_forwards.active[number], "counters": dict(forward.counters)}
                for number, forward in enumerate(self.forwards)]

    # -- sockets ------------------------------------------------------------------------------

    def _open_flow(self, key: FlowKey, table: IdleFlows, proto: int, address: tuple) -> None:
        family = _FAMILY[len(key.remote_ip)]
        try:
            sock = connected_socket(family, proto, address)
        except OSError as error:
            if proto != socket.IPPROTO_UDP and error.errno in (errno.EACCES, errno.EPERM):
                self._echo_off({4 if family == socket.AF_INET else 6: error})
            self._refuse(key, table, error)
            return
        self._start(HostSocket(sock, key, table))

    def _refuse(self, key: FlowKey, table: IdleFlows, error: OSError) -> None:
        reason = _errno_name(error)
        table.open_failed(key, reason)
        self._log_once(f"open_{reason}", logging.WARNING,
                       "nat: cannot open a socket for %s: %s (counted as open_%s; later "
                       "ones only counted)", _flow_name(key), error.strerror, reason)

    def _open_upstream(self, upstream: IpAddress) -> None:
        try:
            family, _kind, proto, _name, address = socket.getaddrinfo(
                str(upstream), DNS_PORT, type=socket.SOCK_DGRAM,
                flags=socket.AI_NUMERICHOST)[0]
            sock = connected_socket(family, proto, address)
        except OSError as error:
            log.warning("nat dns: no socket for upstream %s (%s); its queries will time out",
                        upstream, error.strerror)
            return
        entry = HostSocket(sock, None, None, upstream)
        self.upstream_sockets[upstream] = entry
        self._start(entry)

    def _start(self, entry: HostSocket) -> None:
        if self._nursery is None:
            entry.sock.close()
            raise RuntimeError("NatShell.from_guest before run() started")
        if entry.key is not None:
            self.sockets[entry.key] = entry
        self._nursery.start_soon(self._read, entry)

    def _close(self, entry: HostSocket | TcpSocket) -> None:
        notify_closing(entry.sock)
        entry.sock.close()

    def _fail(self, entry: HostSocket, error: BaseException) -> None:
        """Close `entry`'s flow (or upstream socket) after an error on its socket."""
        if isinstance(error, OSError):
            reason = _errno_name(error)
            self._log_once(f"socket_{reason}", logging.WARNING,
                           "nat: closing flow %s: %s (counted as %s; later ones only counted)",
                           self._entry_name(entry), error.strerror, reason)
        else:
            reason = "exception"
            if reason not in self._logged:
                self._logged.add(reason)
                log.error("nat: closing flow %s after an unexpected error",
                          self._entry_name(entry), exc_info=error)
        self.socket_errors[reason] += 1
        if entry.key is not None:
            if self.sockets.get(entry.key) is entry:
                del self.sockets[entry.key]
                entry.table.forget(entry.key)
        elif self.upstream_sockets.get(entry.upstream) is entry:
            del self.upstream_sockets[entry.upstream]
        self._close(entry)

    def _entry_name(self, entry: HostSocket) -> str:
        return _flow_name(entry.key) if entry.key is not None else f"upstream {entry.upstream}"

    def _send(self, entry: HostSocket, payload: bytes, ttl: int, frames: list[Frame],
              now: float) -> None:
        sock = entry.sock
        try:
            if ttl >= 0 and ttl != entry.ttl:
                if sock.family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
                entry.ttl = ttl
            sock.send(payload)
        except BlockingIOError:
            self.drops["send_full"] += 1  # the socket's buffer is full: UDP drops
        except OSError as error:
            if error.errno not in _REMOTE_ERRORS:
                self._fail(entry, error)
                return
            self.drops[f"send_{_errno_name(error)}"] += 1
            self._read_errors(entry, frames, now)  # what the error queue says about it

    async def _read(self, entry: HostSocket) -> None:
        """A flow's (or an upstream's) datagrams, served by the data loop."""
        sock = entry.sock

        def on_readable() -> bool:
            frames: list[Frame] = []
            try:
                self._drain(entry, frames, trio.current_time())
            except Exception as error:  # one flow's bug closes that flow, not the shell
                self._fail(entry, error)
            if frames:
                self.deliver(frames)
            return sock.fileno() < 0

        await _serve_socket(sock, on_readable)

    def _drain(self, entry: HostSocket, frames: list[Frame], now: float) -> None:
        """The errors queued on `entry`'s socket, then up to READS_PER_WAKE datagrams."""
        self._read_errors(entry, frames, now)
        for _ in range(READS_PER_WAKE):
            try:
                data = entry.sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in _REMOTE_ERRORS:
                    continue  # an error queued after our read: its details come next wake
                self._fail(entry, error)
                return
            if entry.key is None:
                frame = self.dns.answer(entry.upstream, data, now)
            elif entry.table is self.udp:
                frame = self.udp.from_host(entry.key, data, now)
            else:
                frame = self.echo.from_host(entry.key, data, now)
            if frame is not None:
                frames.append(frame)

    def _read_errors(self, entry: HostSocket, frames: list[Frame], now: float) -> None:
        """Map the ICMP errors queued on `entry`'s socket (IP_RECVERR) back to the guest."""
        for _ in range(READS_PER_WAKE):
            try:
                data, ancillary, _flags, _address = entry.sock.recvmsg(
                    MAX_DATAGRAM, ERR_ANCILLARY, socket.MSG_ERRQUEUE)
            except BlockingIOError:
                return
            for level, kind, cmsg in ancillary:
                if (level, kind) not in _RECVERR:
                    continue
                error = host_error(cmsg)
                if error is None:
                    self.drops["local_error"] += 1
                    continue
                if entry.key is None:
                    self.drops["upstream_icmp"] += 1  # the DNS core moves on at its timeout
                    continue
                guest_mac = entry.table.guest_mac(entry.key)
                if guest_mac is None:
                    continue
                frame = self.errors.error_frame(entry.key, guest_mac, error, data, now,
                                                entry.table.owner(entry.key))
                if frame is not None:
                    frames.append(frame)

    # -- reporting ----------------------------------------------------------------------------

    def _log_once(self, reason: str, level: int, message: str, *args: object) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.log(level, message, *args)

    def _ports_status(self) -> dict[str, dict[str, object]]:
        """What each guest (its port, named; a MAC on no port by itself) holds now: flows by
        protocol, half-open connections, buffered bytes, DNS queries in flight, lingering
        closes, and the flows of each of its MACs."""
        held = self.limits.by_owner()
        owners = [*held, *(o for o in self.dns.per_owner if o not in held),
                  *(o for o in self._lingering_by_owner
                    if o not in held and o not in self.dns.per_owner)]
        macs: dict[Owner, Counter[str]] = {}
        for table in (self.tcp.flows, self.udp.flows, self.echo.flows,
                      self.udp_forwards.flows):
            for flow in table.values():
                macs.setdefault(flow.owner, Counter())[format_mac(flow.guest_mac)] += 1
        ports: dict[str, dict[str, object]] = {}
        for owner in owners:
            account = held.get(owner, {"flows": {}, "half_open": 0, "buffered": 0})
            flows = account["flows"]
            assert isinstance(flows, dict)
            name = base = owner_name(owner)
            number = 1
            while name in ports:  # two ports of one name (a session port made anew)
                number += 1
                name = f"{base}#{number}"
            ports[name] = {
                "flows": {_PROTOCOL_NAMES.get(proto, str(proto)): n
                          for proto, n in sorted(flows.items())},
                "half_open": account["half_open"], "buffered": account["buffered"],
                "dns_pending": self.dns.per_owner.get(owner, 0),
                "lingering": self._lingering_by_owner.get(owner, 0),
                "macs": dict(macs.get(owner, {}))}
        return ports

    def status(self) -> dict[str, object]:
        return {"tcp": self.tcp.status(), "tcp_sockets": len(self.tcp_sockets),
                "udp": self.udp.status(), "echo": self.echo.status(), "dns": self.dns.status(),
                "echo_on": dict(self.echo_on), "sockets": len(self.sockets),
                "icmp_errors_sent": dict(self.errors.sent),
                "icmp_errors_dropped": dict(self.errors.drops), "drops": dict(self.drops),
                "socket_errors": dict(self.socket_errors), "refusals":
                dict(self.limits.refusals), "forwards": self._forwards_status(),
                "udp_forwards": self.udp_forwards.status(), "ports": self._ports_status()}
