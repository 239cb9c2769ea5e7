"""`--metrics HOST:PORT`: the process's state for Prometheus, at http://HOST:PORT/metrics.

Two halves.  `state_families(state)` turns the dict `vhostvpn status` shows (`Hub.status()`,
`Endpoint.status()`) into prometheus_client metric families; it does no I/O, and a scrape
reads the same numbers the control socket does, at the moment of the scrape, in the Trio
thread: nothing races the data path, and nothing is counted twice.  `serve_metrics` is a
minimal HTTP/1.x server for it, on a socket bound before the event loop starts
(`bind_metrics`: a port in use is a start-up error, not a traceback).

The port is unauthenticated TCP, so it is contained like the control socket
(tunnel/control.py): the accept loop never dies; at most MAX_CLIENTS are served at once
(more are closed and counted); a client has REQUEST_SECONDS to send a request of at most
MAX_REQUEST bytes and CLIENT_SECONDS for the whole exchange (a slowloris or a client that
never reads is cut, counted, and holds at most SEND_BUFFER of kernel memory meanwhile); a
request gets one reply and the connection closes.  A bug
in a collector answers 500 and is logged with its traceback; it never ends the server.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterator

import trio
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from tunnel.control import serve_clients

log = logging.getLogger(__name__)

MAX_CLIENTS = 16
MAX_REQUEST = 8192  # request line and headers; a scrape needs a few hundred bytes
REQUEST_SECONDS = 5.0
CLIENT_SECONDS = 10.0  # request and reply together
LISTEN_BACKLOG = MAX_CLIENTS
# The kernel's send buffer per client (it doubles the figure): a client that never reads
# holds this much kernel memory, not the 4 MiB TCP autotuning would grow it to.
SEND_BUFFER = 256 * 1024
PATH = "/metrics"

Status = Callable[[], dict[str, object]]


# -- the state as metric families ---------------------------------------------------------


def _family(kind: type[Metric], name: str, doc: str, labels: list[str]) -> Metric:
    return kind(f"vhostvpn_{name}", doc, labels=labels)


def state_families(state: dict) -> Iterator[Metric]:
    """Metric families for one status dict (a hub's or an endpoint's)."""
    info = _family(GaugeMetricFamily, "info", "The process's role and key fingerprint",
                   ["role", "fingerprint"])
    tunnel = state.get("tunnel") or {}
    info.add_metric([str(state.get("role", "")),
                     str(state.get("fingerprint") or tunnel.get("fingerprint") or "")], 1)
    yield info
    yield from _port_families(state.get("ports", []))
    macs = _family(GaugeMetricFamily, "switch_macs", "MAC addresses the switch has learned",
                   [])
    macs.add_metric([], len(state.get("macs", [])))
    yield macs
    if tunnel:
        yield from _tunnel_families(tunnel)
    session = state.get("session")
    if session is not None:
        yield from _uplink_families(session)
    direct = state.get("direct")
    if direct is not None:
        yield from _direct_families(direct)


def _port_families(ports: list[dict]) -> Iterator[Metric]:
    labels = ["port", "kind"]
    frames = _family(CounterMetricFamily, "port_frames", "Frames through a port: in entered "
                     "the switch from it, out left through it", [*labels, "direction"])
    nbytes = _family(CounterMetricFamily, "port_bytes", "Bytes through a port (frames "
                     "without virtio-net headers)", [*labels, "direction"])
    drops = _family(CounterMetricFamily, "port_drops", "Frames lost at a port, by reason "
                    "(switch, policy and queue drops; tx_/rx_ ones in the guest's rings)",
                    [*labels, "reason"])
    offloads = _family(CounterMetricFamily, "port_software_offloads", "Frames checksummed "
                       "or segmented in software for a port that could not take them", labels)
    link = _family(GaugeMetricFamily, "port_link_up", "1 when the port's link is up (a "
                   "guest's driver is running, a session has a live connection)", labels)
    broken = _family(GaugeMetricFamily, "port_broken", "1 when a guest broke its rings and "
                     "the device is stopped until it resets (the reason: vhostvpn status)",
                     labels)
    connections = _family(CounterMetricFamily, "port_connections", "Connections a port has "
                          "had: QEMU's on a vhost-user socket, links of a session", labels)
    session_up = _family(GaugeMetricFamily, "session_up", "1 when a session is up", ["session"])
    rtt = _family(GaugeMetricFamily, "session_rtt_seconds", "A session's last measured "
                  "round-trip time (keepalive PING to PONG)", ["session"])
    control_dropped = _family(CounterMetricFamily, "session_control_dropped", "PINGs/PONGs "
                              "not sent: the peer sent PINGs faster than it read", ["session"])
    device = _family(CounterMetricFamily, "device_frames", "Frames through a TUN/TAP device, "
                     "from its side: read came out of the kernel, written went in",
                     ["port", "direction"])
    device_bytes = _family(CounterMetricFamily, "device_bytes", "Bytes through a TUN/TAP "
                           "device", ["port", "direction"])
    device_errors = _family(CounterMetricFamily, "device_errors", "Packets a TUN/TAP device "
                            "refused or damaged, by reason", ["port", "reason"])
    answered = _family(CounterMetricFamily, "gateway_answered", "What the hub's gateway "
                       "answered (ARP, ICMP, NDP, router advertisements), by kind", ["what"])
    dhcp = _family(CounterMetricFamily, "dhcp_events", "The DHCP server's messages, replies "
                   "and refusals, by kind", ["event"])
    leases = _family(GaugeMetricFamily, "dhcp_leases", "DHCP leases running now", [])
    offers = _family(GaugeMetricFamily, "dhcp_offers", "DHCP offers waiting for a REQUEST", [])
    pool_free = _family(GaugeMetricFamily, "dhcp_pool_free", "Pool addresses nobody holds, "
                        "is offered or rests (declined)", [])
    client = _family(GaugeMetricFamily, "dhcp_client_bound", "1 when a TUN host holds a "
                     "lease from the hub (the address is a label)", ["port", "address"])
    for port in ports:
        name, kind = str(port.get("name")), str(port.get("kind", "port"))
        ident = [name, kind]
        frames.add_metric([*ident, "in"], port.get("in_frames", 0))
        frames.add_metric([*ident, "out"], port.get("out_frames", 0))
        nbytes.add_metric([*ident, "in"], port.get("in_bytes", 0))
        nbytes.add_metric([*ident, "out"], port.get("out_bytes", 0))
        reasons: Counter[str] = Counter(port.get("drops", {}))
        reasons.update(port.get("guest_drops") or {})
        for reason, count in sorted(reasons.items()):
            drops.add_metric([*ident, reason], count)
        offloads.add_metric(ident, port.get("software_offloads", 0))
        if "link_up" in port:
            link.add_metric(ident, 1 if port["link_up"] else 0)
        if kind == "vhost-user":
            broken.add_metric(ident, 1 if port.get("broken") else 0)
        if "connections" in port:
            connections.add_metric(ident, port["connections"])
        if kind == "session":
            session_up.add_metric([name], 1 if port.get("state") == "up" else 0)
            if port.get("rtt_ms") is not None:
                rtt.add_metric([name], port["rtt_ms"] / 1000)
            control_dropped.add_metric([name], port.get("control_dropped", 0))
        counters = port.get("device_counters")
        if counters is not None:
            device.add_metric([name, "read"], counters["read_frames"])
            device.add_metric([name, "written"], counters["written_frames"])
            device_bytes.add_metric([name, "read"], counters["read_bytes"])
            device_bytes.add_metric([name, "written"], counters["written_bytes"])
            for reason, count in sorted(counters.get("errors", {}).items()):
                device_errors.add_metric([name, reason], count)
        if kind == "gateway":
            for what, count in sorted(port.get("services", {}).items()):
                answered.add_metric([what], count)
            for event, count in sorted(port.get("dhcp", {}).items()):
                dhcp.add_metric([event], count)
            tables = port.get("dhcp_tables")
            if tables is not None:
                leases.add_metric([], tables["bound"])
                offers.add_metric([], tables["offers"])
                pool_free.add_metric([], tables["free"])
        if kind == "tun" and port.get("dhcp") is not None:
            lease = port["dhcp"]
            client.add_metric([name, lease.get("address") or ""],
                              1 if lease.get("address") else 0)
    yield from (frames, nbytes, drops, offloads, link, broken, connections, session_up, rtt,
                control_dropped, device, device_bytes, device_errors, answered, dhcp)
    yield from (family for family in (leases, offers, pool_free, client) if family.samples)


def _tunnel_families(tunnel: dict) -> Iterator[Metric]:
    peers = _family(GaugeMetricFamily, "tunnel_peers", "Endpoints the peers file lets in", [])
    peers.add_metric([], tunnel.get("peers", 0))
    handshakes = _family(GaugeMetricFamily, "tunnel_handshakes_in_progress",
                         "Connections between accept and an authenticated session", [])
    handshakes.add_metric([], tunnel.get("handshakes", 0))
    refused = _family(CounterMetricFamily, "tunnel_refused", "Connections refused or failed "
                      "before a session: limits, handshake failures, auth_* refusals",
                      ["reason"])
    for reason, count in sorted(tunnel.get("refused", {}).items()):
        refused.add_metric([reason], count)
    ended = _family(CounterMetricFamily, "tunnel_links_ended", "Authenticated links that "
                    "ended, by how", ["kind"])
    for kind, count in sorted(tunnel.get("links_ended", {}).items()):
        ended.add_metric([kind], count)
    yield from (peers, handshakes, refused, ended)


def _uplink_families(session: dict) -> Iterator[Metric]:
    reconnects = _family(CounterMetricFamily, "uplink_reconnects", "Sessions to the hub "
                         "after the first (the previous one ended)", [])
    reconnects.add_metric([], session.get("reconnects", 0))
    rekeys = _family(CounterMetricFamily, "uplink_rekeys", "Fresh connections (new keys) "
                     "that took over a live session", [])
    rekeys.add_metric([], session.get("rekeys", 0))
    yield from (reconnects, rekeys)


def _direct_families(direct: dict) -> Iterator[Metric]:
    """An endpoint's direct paths (tunnel/direct_link.py): its listener, and each peer the
    hub introduced, labelled by the peer's name in the hub's peers file."""
    intros = _family(CounterMetricFamily, "direct_intros", "Introductions (INTRO records) "
                     "the hub sent", [])
    intros.add_metric([], direct.get("intros", 0))
    handshakes = _family(GaugeMetricFamily, "direct_handshakes_in_progress", "Connections "
                         "to --listen between accept and an authenticated direct session", [])
    handshakes.add_metric([], direct.get("handshakes", 0))
    refused = _family(CounterMetricFamily, "direct_refused", "Connections to --listen "
                      "refused or failed before a direct session, by reason", ["reason"])
    for reason, count in sorted(direct.get("refused", {}).items()):
        refused.add_metric([reason], count)
    labels = ["peer"]
    path = _family(GaugeMetricFamily, "direct_peer_direct", "1 while frames to an "
                   "introduced peer go over its direct session, 0 while they take the hub",
                   labels)
    frames = _family(CounterMetricFamily, "direct_peer_frames", "Frames over a peer's "
                     "direct sessions (those received also count as the uplink port's in)",
                     [*labels, "direction"])
    nbytes = _family(CounterMetricFamily, "direct_peer_bytes", "Bytes over a peer's direct "
                     "sessions", [*labels, "direction"])
    drops = _family(CounterMetricFamily, "direct_peer_drops", "Frames from or to a peer's "
                    "direct sessions that were dropped, by reason", [*labels, "reason"])
    rtt = _family(GaugeMetricFamily, "direct_peer_rtt_seconds", "A direct session's last "
                  "measured round-trip time", labels)
    sessions = _family(CounterMetricFamily, "direct_peer_sessions", "Direct sessions a peer "
                       "has had", labels)
    failures = _family(CounterMetricFamily, "direct_peer_failures", "Dials or direct "
                       "sessions to a peer that failed", labels)
    for peer in direct.get("peers", []):
        ident = [str(peer.get("name"))]
        path.add_metric(ident, 1 if peer.get("path") == "direct" else 0)
        for direction in ("in", "out"):
            frames.add_metric([*ident, direction], peer.get(f"{direction}_frames", 0))
            nbytes.add_metric([*ident, direction], peer.get(f"{direction}_bytes", 0))
        for reason, count in sorted((peer.get("drops") or {}).items()):
            drops.add_metric([*ident, reason], count)
        if peer.get("rtt_ms") is not None:
            rtt.add_metric(ident, peer["rtt_ms"] / 1000)
        sessions.add_metric(ident, peer.get("sessions", 0))
        failures.add_metric(ident, peer.get("failures", 0))
    yield from (intros, handshakes, refused, path, frames, nbytes, drops, rtt, sessions,
                failures)


class StatusCollector:
    """A prometheus_client collector reading `status()` at scrape time."""

    def __init__(self, status: Status, requests: Counter[str]) -> None:
        self.status = status
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        yield from state_families(self.status())
        served = _family(CounterMetricFamily, "metrics_requests", "Requests to this metrics "
                         "port, by outcome", ["outcome"])
        for outcome, count in sorted(self.requests.items()):
            served.add_metric([outcome], count)
        yield served


def make_registry(status: Status, requests: Counter[str]) -> CollectorRegistry:
    """Our families, and the process's CPU, memory and open files (process_*)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status, requests))
    ProcessCollector(registry=registry)
    return registry


# -- the HTTP shell -------------------------------------------------------------------------


def bind_metrics(host: str | None, port: int) -> socket.socket:
    """A listening TCP socket for the metrics server (host None: every address).  Raises
    OSError (port in use, an address this machine lacks, a privileged port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    infos.sort(key=lambda info: info[0] != socket.AF_INET6)  # [::] covers IPv4 too
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host is None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise
            error = exc  # this family is not usable here; try the next
            continue
        return sock
    raise error or OSError(errno.EADDRNOTAVAIL, f"no address for {host!r}")


async def serve_metrics(
    listen: socket.socket,
    status: Status,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer GET /metrics on the listening socket `listen` until cancelled."""
    requests: Counter[str] = Counter()
    registry = make_registry(status, requests)
    listener = trio.socket.from_stdlib_socket(listen)
    host, port = listen.getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("metrics on http://%s%s", where, PATH)
    task_status.started()

    async def serve(conn: trio.socket.SocketType) -> None:
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError as exc:  # reset already: serving it finds out
            log.debug("metrics %s: SO_SNDBUF: %s", where, exc)
        try:
            with trio.move_on_after(CLIENT_SECONDS) as whole:
                outcome = await _exchange(trio.SocketStream(conn), registry)
        except Exception:
            requests["internal_error"] += 1
            raise  # serve_clients logs it and closes this client only
        requests["timeout" if whole.cancelled_caught else outcome] += 1

    def busy(clients: int) -> None:
        if requests["refused_busy"] % 100 == 0:  # a flood logs every hundredth
            log.warning("metrics %s: %d clients being served, one refused", where, clients)
        requests["refused_busy"] += 1

    with listener:
        await serve_clients(listener, serve, what=f"metrics {where}", max_clients=MAX_CLIENTS,
                            on_busy=busy)


async def _exchange(stream: trio.SocketStream, registry: CollectorRegistry) -> str:
    """Read one request, send one reply; the outcome for counting."""
    head = b""
    with trio.move_on_after(REQUEST_SECONDS):
        try:
            while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST - len(head))
                if not chunk:
                    return "closed_early"
                head += chunk
        except trio.BrokenResourceError:
            return "closed_early"
    if b"\r\n\r\n" not in head and b"\n\n" not in head:
        outcome = "request_too_large" if len(head) >= MAX_REQUEST else "timeout"
        await _reply(stream, 400 if outcome == "request_too_large" else 408, "text/plain",
                     f"{outcome}\n".encode())
        return outcome
    lines = head.split(b"\n")
    parts = lines[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        await _reply(stream, 400, "text/plain", b"bad request line\n")
        return "bad_request"
    method, target = parts[0], parts[1].split("?", 1)[0]
    if target != PATH:
        await _reply(stream, 404, "text/plain", f"try {PATH}\n".encode())
        return "not_found"
    if method not in ("GET", "HEAD"):
        await _reply(stream, 405, "text/plain", b"GET or HEAD\n", allow="GET, HEAD")
        return "bad_method"
    accept = ""
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    try:
        body = encoder(registry)
    except Exception as exc:
        log.error("metrics: collecting failed: %r", exc, exc_info=exc)
        await _reply(stream, 500, "text/plain", b"collecting failed; see the log\n")
        return "internal_error"
    await _reply(stream, 200, content_type, body, head_only=method == "HEAD")
    return "ok"


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 500: "Internal Server Error"}


async def _reply(stream: trio.SocketStream, code: int, content_type: str, body: bytes, *,
                 head_only: bool = False, allow: str | None = None) -> None:
    headers = (f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n"
               + (f"Allow: {allow}\r\n" if allow else "") + "\r\n")
    try:
        await stream.send_all(headers.encode() + (b"" if head_only else body))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
