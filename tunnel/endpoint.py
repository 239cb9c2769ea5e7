"""`vhostvpn vm` and `vhostvpn host`: join local guests, or this host, to a hub over one session.

The endpoint is a small switch of its own: each local vhost-user socket is a port, so is the
host's TAP device (`vhostvpn host --tap`, tunnel/host/tuntap.py) or its TUN device behind an
L3 adapter (`vhostvpn host --tun`, tunnel/host/tunport.py), and so is the uplink to the hub (a
SessionPort, trusted here; the hub polices it).  Guests on the same endpoint reach each other
locally; everything else crosses the uplink.  A host's link, addresses and MTU are set through
netlink (tunnel/host/hostnet.py) and removed again when the endpoint exits, even on SIGTERM.

The uplink's life (`_uplink`): connect (TCP, TLS 1.3) -> check the hub's certificate against
the pinned fingerprint (nothing is sent to a hub that fails) -> HELLO both ways -> AUTH, the
endpoint's signature over the hub's challenge, and a PING right behind it: the hub's codec
holds the PING until it has accepted AUTH, so its PONG is the hub's "yes" and a CLOSE
AUTH_FAILED its "no" (`_await_verdict`) -> the link carries frames.  The key is the
endpoint's identity: the hub names the session after its peers file; `--name` only adds a
claim the hub checks (with no `--name` the HELLO and the signed name are empty).  When a link
ends, the endpoint retries with exponential backoff and jitter (BACKOFF_SECONDS); the guests
keep their NICs up meanwhile and what they send is dropped and counted (`link_down`).  A
refusal (the hub does not know this key or name, or the hub is not the pinned one) and a
session taken over by another connection with the same key are not transient: they are
logged as ERROR/WARNING saying what to do, and the next try waits the longest backoff.
Rekeying is make before break: after REKEY_SECONDS, or before the TLS records on either
direction's key near REKEY_RECORDS (`records_on_key`: TLS 1.3 keys each direction apart, and
the hub never rekeys, so the endpoint counts what it receives too), a new connection is made
and takes over; the old one drains and closes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import trio

from netstack.frame import ALL_OFFLOADS, Frame, stable_mac
from netstack.switch import Switch
from tunnel.control import serve_control
from tunnel.direct import DirectPeers, SteeringUplink
from tunnel.direct_link import DirectLinks
from tunnel.host.hostnet import HostNetwork, HostNetworkError
from tunnel.host.tunport import TunPort
from tunnel.host.tuntap import TapPort, TunTapDevice, TunTapError, run_device
from tunnel.introductions import MAX_INTRO_ADDRESSES
from tunnel.keys import (
    AuthError,
    check_server,
    client_ssl_context,
    fingerprint_of_certificate,
    format_fingerprint,
    load_identity,
    sign_client_auth,
)
from tunnel.session import HANDSHAKE_READ, Link, SessionPort, await_hello, tune_tcp
from tunnel.startup import StartupError
from tunnel.tls import MAX_SOCKET_READ, TLSStream
from tunnel.wire import (
    CloseCode,
    Closed,
    Eof,
    Frames,
    Intro,
    Ping,
    Pong,
    WireConnection,
    WireError,
)
from virtio.backend import attach_sockets
from virtio.unixsock import OWNER_ONLY, SocketAccess

log = logging.getLogger(__name__)

CONNECT_SECONDS = 10.0
BACKOFF_SECONDS = (0.25, 30.0)  # first retry, longest wait
JITTER = 0.25  # +-25 %
REKEY_SECONDS = 3600.0
# TLS records on one key before we rekey: well under the 2^24.5 AES-GCM limit (RFC 8446 5.5).
REKEY_RECORDS = 1 << 24
TLS_RECORD_PLAINTEXT = 16384


def records_on_key(wire: WireConnection) -> int:
    """An upper estimate of the TLS records the busier direction's key has protected: every
    wire record is at least one TLS record, and a full TLS record carries
    TLS_RECORD_PLAINTEXT bytes."""
    return max(counters.records + counters.bytes // TLS_RECORD_PLAINTEXT
               for counters in (wire.sent, wire.received))


def rekey_due(link: Link, rekey_seconds: float) -> bool:
    """Time for a fresh connection: `link` is `rekey_seconds` old (Trio's clock), or the
    key of either direction protected nearly REKEY_RECORDS records."""
    return (trio.current_time() - link.started >= rekey_seconds
            or records_on_key(link.wire) >= REKEY_RECORDS)


@dataclass
class EndpointConfig:
    hub_host: str
    hub_port: int
    identity_dir: Path
    hub_fingerprint: bytes
    sockets: list[str] = field(default_factory=list)
    client_sockets: list[str] = field(default_factory=list)
    control: str | None = None
    name: str = ""
    queue_pairs: int = 4
    port_policy: bool = True  # police the local guests' ports (netstack.policy); off trusts them
    mtu: int = 1500
    rekey_seconds: float = REKEY_SECONDS
    tap: str | None = None  # host mode, L2: the TAP device's name
    tun: str | None = None  # host mode, L3: the TUN device's name
    dhcp: bool = False  # host mode, TUN: lease the IPv4 address from the hub
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = field(
        default_factory=list)
    # who may connect to the --socket files (--socket-mode, --socket-group)
    socket_access: SocketAccess = OWNER_ONLY
    # direct paths: where this endpoint accepts direct sessions (--listen), and the
    # addresses the hub gives its peers for it (--advertise; default: --listen's)
    listen: tuple[str | None, int] | None = None
    advertise: list[tuple[str, int]] = field(default_factory=list)


# The nonce of the PING sent right behind AUTH; its PONG says the hub accepted us.
VERDICT_NONCE = 0xA5_7E_D0
# The hub's CLOSE reason for a link another connection of the same peer took over.
SUPERSEDED = "superseded"
# How much of a refusal reason we did not expect goes into the log.
MAX_REASON_SHOWN = 64


class HandshakeError(Exception):
    pass


class Refused(Exception):
    """The hub, or this endpoint, will not go on with this login until an operator acts: the
    message says what to do.  `reason` is the hub's word (unknown_key, name_mismatch, ...)
    or server_mismatch."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def open_device(name: str, mode: Literal["tap", "tun"]) -> TunTapDevice:
    """The host's TAP or TUN device; a StartupError naming the flag if it cannot be had."""
    try:
        return TunTapDevice.open(name, mode)
    except TunTapError as exc:
        raise StartupError(f"--{mode} {name}", exc.strerror or str(exc)) from None


class Endpoint:
    def __init__(self, config: EndpointConfig, *,
                 open_stream: Callable[[], Awaitable[trio.abc.Stream]] | None = None) -> None:
        """`open_stream` makes the connection to the hub that TLS runs on: TCP to
        config.hub_host:hub_port unless given (the tests give memory streams)."""
        self.config = config
        self.open_stream = open_stream or self._open_tcp
        self.identity = load_identity(config.identity_dir)
        self.ssl_context = client_ssl_context(self.identity)
        self.name = config.name  # a claim the hub checks; "" lets the peers file name us
        self.switch = Switch()
        self.servers = attach_sockets(self.switch, config.sockets, config.client_sockets,
                                      config.queue_pairs, policy=config.port_policy,
                                      access=config.socket_access)
        self.uplink = SteeringUplink("hub")
        self.switch.attach(self.uplink)
        self.direct = DirectLinks(
            self.identity,
            DirectPeers(self.identity.fingerprint_bytes, config.listen is not None,
                        self.uplink, self._is_local),
            self._forward_direct, listen=config.listen, mtu=config.mtu,
            rekey_due=partial(rekey_due, rekey_seconds=config.rekey_seconds))
        self.device: TunTapDevice | None = None
        self.device_port: TapPort | None = None
        self.tun_port: TunPort | None = None
        self.network: HostNetwork | None = None
        self.reconnects = 0
        self.rekeys = 0  # fresh connections that took over a live session
        self.last_error: str | None = None
        self.rng = random.Random()

    def status(self) -> dict[str, object]:
        ports = []
        for port in self.switch.ports:
            entry = port.status()
            server = next((s for s in self.servers if s.port is port), None)
            if server is not None:
                entry |= {"socket": server.path}
            if port is self.device_port or port is self.tun_port:
                entry["kernel"] = self._device_state()
            ports.append(entry)
        return {
            "role": "endpoint", "pid": os.getpid(), "name": self.name or None,
            "fingerprint": self.identity.fingerprint,
            "hub": f"{self.config.hub_host}:{self.config.hub_port}",
            "session": {"state": self.uplink.state, "rtt_ms": self.uplink.rtt_ms,
                        "reconnects": self.reconnects, "rekeys": self.rekeys,
                        "last_error": self.last_error,
                        "connections": self.uplink.connections},
            "ports": ports, "direct": self.direct.status(), **self.switch.status(),
        }

    def _device_state(self) -> dict[str, object]:
        """The TAP/TUN device's link as the kernel sees it (netlink: one round trip)."""
        assert self.device is not None and self.network is not None
        try:
            return self.network.link_state(self.device.name)
        except (OSError, HostNetworkError) as exc:
            return {"error": str(exc)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:

        try:
            if self.config.tap is not None:
                self._open_tap(self.config.tap)
            elif self.config.tun is not None:
                self._open_tun(self.config.tun)
            await self._run(task_status)
        finally:
            self._close_host()

    def _open_tap(self, name: str) -> None:
        """The host's TAP device, up, with its addresses; undone by `_close_host`."""
        self.device = open_device(name, "tap")
        self.device_port = TapPort(self.device.name, self.device)
        self.switch.attach(self.device_port)
        self.network = HostNetwork()
        # The same MAC on every start: after a restart, the neighbours' ARP/ND caches (and
        # the hub's DHCP lease) still point at this host, not at a random address the kernel
        # picked for the new device (traffic would wait ~30 s for their caches to expire).
        mac = stable_mac(f"vhostvpn tap {self.identity.fingerprint} {self.device.name}")
        self.network.set_mac(self.device.name, mac)
        self.network.set_up(self.device.name, self.config.mtu)
        for address in self.config.addresses:
            self.network.add_address(self.device.name, address)
        log.info("%s: up, mac %s, mtu %d, addresses %s", self.device.name, mac.hex(":"),
                 self.config.mtu, ", ".join(map(str, self.config.addresses)) or "none")

    def _open_tun(self, name: str) -> None:
        """The host's TUN device, up, with L3Host speaking for it on the segment; static
        addresses now, leased and SLAAC ones as they come; all undone by `_close_host`."""
        self.device = open_device(name, "tun")
        self.network = HostNetwork()
        self.network.set_up(self.device.name, self.config.mtu)
        ipv4 = next((a for a in self.config.addresses if a.version == 4), None)
        ipv6 = next((a for a in self.config.addresses if a.version == 6), None)
        self.tun_port = TunPort(self.device, self.network, ipv4=ipv4, ipv6=ipv6,
                                dhcp=self.config.dhcp, mac_seed=self.identity.fingerprint)
        self.switch.attach(self.tun_port)
        for address in self.config.addresses:
            self.network.add_address(self.device.name, address)
        log.info("%s: up (tun), mtu %d, addresses %s%s", self.device.name, self.config.mtu,
                 ", ".join(map(str, self.config.addresses)) or "none",
                 ", DHCP" if self.config.dhcp else "")

    def _close_host(self) -> None:
        if self.network is not None:
            self.network.undo()
            self.network = None
        if self.device is not None:
            self.device.close()
            self.device = None

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            for server in self.servers:
                await nursery.start(server.run)
            if self.device is not None and self.device_port is not None:
                nursery.start_soon(run_device, self.device, self.device_port,
                                   self.switch.forward)
            if self.tun_port is not None:
                nursery.start_soon(self.tun_port.run, self.switch)
            if self.config.control:
                ports = partial(list, self.switch.ports)  # `vhostvpn capture PORT`
                await nursery.start(partial(serve_control, ports=ports),
                                    self.config.control, self.status)
            await nursery.start(self.direct.run)
            nursery.start_soon(self._uplink)
            nursery.start_soon(self._housekeeping)
            task_status.started()

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(10)
            self.switch.expire(self.switch.clock())

    # -- the uplink ---------------------------------------------------------------------------

    async def _uplink(self) -> None:
        delay = BACKOFF_SECONDS[0]
        where = f"hub {self.config.hub_host}:{self.config.hub_port}"
        while True:
            try:
                link = await self._connect()
            except Refused as exc:
                self.last_error = f"refused: {exc.reason}"
                delay = BACKOFF_SECONDS[1]
                wait = delay * self.rng.uniform(1 - JITTER, 1 + JITTER)
                log.error("%s: %s; retrying in %.0f s", where, exc, wait)
                await trio.sleep(wait)
                continue
            except (OSError, trio.BrokenResourceError, HandshakeError, WireError,
                    trio.TooSlowError) as exc:
                self.last_error = str(exc)
                log.warning("%s: %s", where, exc)
            except Exception as exc:  # whatever the hub sent: this attempt fails, we go on
                self.last_error = f"internal error: {exc!r}"
                log.exception("%s: connecting failed unexpectedly", where)
            else:
                self.last_error = None
                # The hub may have restarted and forgotten what it saw from us: every
                # source crosses it once again before it goes direct (tunnel/direct.py).
                self.uplink.vouched.clear()
                if not link.wire.introducing and self.direct.peers.ports:  # it vouches for none
                    self.direct.introduce(())
                await self._session(link)
                if self.uplink.connections > 1:
                    self.reconnects += 1
                # The hub took us: it is there, so the first retry comes soon (a hub that
                # restarts is back within a second or two), then the backoff grows again.
                delay = BACKOFF_SECONDS[0]
            if self.last_error == SUPERSEDED:
                log.warning("%s: another connection with this endpoint's key (%s) took the "
                            "session over: is the key in use on another machine too? Each "
                            "endpoint needs its own (vhostvpn keygen DIR)", where,
                            self.identity.fingerprint)
                delay = BACKOFF_SECONDS[1]
            wait = delay * self.rng.uniform(1 - JITTER, 1 + JITTER)
            log.info("hub: reconnecting in %.2f s", wait)
            await trio.sleep(wait)
            delay = min(delay * 2, BACKOFF_SECONDS[1])

    async def _session(self, link: Link) -> None:
        """Run links until one ends without a successor; rekey by making a new one first."""
        async with trio.open_nursery() as nursery:
            current = link
            ended = trio.Event()

            async def run(one: Link) -> None:
                result = await one.run()
                log.info("hub link ended: %s", result.reason)
                if one is current:
                    self.last_error = result.reason
                    ended.set()

            link.activate()
            nursery.start_soon(run, link)
            while True:
                with trio.move_on_after(1.0):
                    await ended.wait()
                if ended.is_set():
                    break
                if not rekey_due(current, self.config.rekey_seconds):
                    continue
                log.info("hub: rekeying (link %.0f s old, ~%d records)",
                         trio.current_time() - current.started, records_on_key(current.wire))
                try:
                    fresh = await self._connect(await_verdict=False)
                except (OSError, trio.BrokenResourceError, HandshakeError, Refused,
                        WireError, trio.TooSlowError) as exc:
                    log.warning("hub: rekey failed, keeping the current link: %s", exc)
                    current.started = trio.current_time() - self.config.rekey_seconds + 30
                    continue
                current = fresh
                self.rekeys += 1
                # The old link stops sending but stays open until the hub, once it accepted
                # the new one, closes it: frames the hub sends meanwhile are not lost.
                fresh.activate(retire_previous=False)
                nursery.start_soon(run, fresh)
            nursery.cancel_scope.cancel()

    async def _connect(self, *, await_verdict: bool = True) -> Link:
        """A new authenticated link.  With `await_verdict`, return only once the hub accepted
        it (Refused if it says no); a rekey does not wait: its link is made current at once,
        so the old one is not mistaken for the session's end when the hub supersedes it."""
        config = self.config
        where = f"{config.hub_host}:{config.hub_port}"
        with trio.fail_after(CONNECT_SECONDS):
            stream = await self.open_stream()
            try:
                tls = TLSStream(stream, self.ssl_context, server_side=False,
                                read_size=MAX_SOCKET_READ)
                await tls.do_handshake()
                server_fp = config.hub_fingerprint
                try:
                    check_server(tls, server_fp)  # nothing is sent to a hub we do not trust
                except AuthError as exc:
                    raise self._wrong_hub(tls, exc) from None
                wire = WireConnection("client", name=self.name, offloads=int(ALL_OFFLOADS),
                                      mtu=config.mtu, introductions=True)
                await tls.send_all(wire.send_hello())
                hello = await await_hello(tls, wire, HandshakeError,
                                          "hub closed the connection: ",
                                          "hub closed the connection during the handshake")
                certificate, signature = sign_client_auth(self.identity, hello.challenge,
                                                          server_fp, self.name)
                auth = wire.send_auth(certificate, signature)
                if wire.introducing:  # where we accept direct sessions; INTROs, please
                    auth += wire.send_advertise(self.advertised())
                if not await_verdict:
                    # No wait between AUTH and the caller's activate(): were the hub to
                    # accept it (and close the old link) meanwhile, the old link would end
                    # while still the active one.  What the transport does not take now
                    # goes first when the new link's writer starts.
                    tls.send_now(auth)
                else:
                    await tls.send_all(auth + wire.send_ping(VERDICT_NONCE, time.monotonic_ns()))
                    await self._await_verdict(tls, wire)
            except BaseException:
                with trio.move_on_after(1) as cleanup:
                    cleanup.shield = True
                    await stream.aclose()
                raise
        self.uplink.peer_address = where
        if await_verdict:
            log.info("hub %s: session up (hub %r), %s", where, hello.name,
                     f"name {self.name!r} accepted" if self.name else
                     f"named by the hub's peers file (key {self.identity.fingerprint})")
        link = Link(self.uplink, tls, wire, self._forward)
        link.on_introduction = self._hub_event
        return link

    async def _open_tcp(self) -> trio.abc.Stream:
        """A TCP connection to the hub, tuned for latency (tunnel/session.tune_tcp)."""
        stream = await trio.open_tcp_stream(self.config.hub_host, self.config.hub_port)
        try:
            tune_tcp(stream.socket)
        except OSError:
            stream.socket.close()
            raise
        return stream

    async def _await_verdict(self, tls: TLSStream, wire: WireConnection) -> None:
        """Wait for the PONG to the PING sent behind AUTH: the hub's codec holds that PING
        until the hub has accepted us.  A CLOSE AUTH_FAILED instead is a refusal.  What the
        hub sends along with the PONG (frames, PINGs) is forwarded or answered here."""
        accepted = False
        while not accepted:
            wire.receive_data(await tls.receive_some(HANDSHAKE_READ))
            for event in wire.next_events():
                if isinstance(event, Pong) and event.nonce == VERDICT_NONCE:
                    self.uplink.rtt_ms = (time.monotonic_ns() - event.timestamp_ns) / 1e6
                    accepted = True
                elif isinstance(event, Frames):
                    self._forward(self.uplink, event.frames)
                elif isinstance(event, Intro):
                    self.direct.introduce(event.peers)
                elif isinstance(event, Ping):
                    await tls.send_all(wire.send_pong(event.nonce, event.timestamp_ns))
                elif isinstance(event, Closed):
                    if event.code == CloseCode.AUTH_FAILED and not accepted:
                        raise self._refusal(event.reason)
                    raise HandshakeError(f"hub closed the connection: {event.reason}")
                elif isinstance(event, Eof):
                    raise HandshakeError("hub closed the connection during the handshake")

    def _refusal(self, reason: str) -> Refused:
        """What the operator must do about the hub's AUTH_FAILED `reason`."""
        fingerprint = self.identity.fingerprint
        if reason == "unknown_key":
            return Refused(reason, f"the hub does not know this endpoint's key (unknown_key): "
                                   f"give the hub this fingerprint: {fingerprint} (a line "
                                   f"'NAME {fingerprint}' in its peers file, then SIGHUP it)")
        if reason == "name_mismatch":
            return Refused(reason, f"the hub refused the name {self.name!r} given with --name "
                                   f"(name_mismatch): its peers file lists this endpoint's key "
                                   f"{fingerprint} under another name; drop --name (the hub "
                                   f"then uses its peers-file name) or correct the peers file")
        shown = reason[:MAX_REASON_SHOWN]  # the hub's words: quoted, cut, one line
        return Refused(shown or "auth_failed",
                       f"the hub refused this endpoint's login ({shown!r}; key {fingerprint})")

    def _wrong_hub(self, tls: TLSStream, error: AuthError) -> Refused:
        """check_server's AuthError as what the operator must do about it."""
        if error.reason != "server_mismatch":
            return Refused(error.reason, f"the hub's TLS is not usable: {error}")
        der = tls.getpeercert(binary_form=True)
        seen = fingerprint_of_certificate(der) if isinstance(der, bytes) else "?"
        expected = format_fingerprint(self.config.hub_fingerprint)
        return Refused(error.reason, f"the hub presented key {seen} but --hub-fingerprint is "
                                     f"{expected}, so nothing was sent to it: if the hub's key "
                                     f"changed, pin the new one (`vhostvpn fingerprint DIR` on "
                                     f"the hub prints it); if not, something else answers at "
                                     f"this address")

    def _forward(self, port: SessionPort, frames: list[Frame]) -> None:
        self.switch.forward(port, frames)

    # -- direct paths (tunnel/direct.py, tunnel/direct_link.py) --------------------------------

    def advertised(self) -> list[tuple[str, int]]:
        """Where peers reach our direct sessions: --advertise, else what --listen bound
        (a wildcard stands for the address the hub sees us from); none without --listen."""
        if self.config.advertise:
            return self.config.advertise[:MAX_INTRO_ADDRESSES]
        if self.config.listen is None:
            return []
        host, _ = self.config.listen
        bound = [(h, p) for h, p in self.direct.bound]
        if host is None or host in ("", "0.0.0.0", "::"):
            # each wildcard socket stands for its own family only (an IPv6 one is V6ONLY);
            # ':PORT' binds one of each where the host has both
            port = bound[0][1] if bound else self.config.listen[1]
            wildcards = [h for h, _ in bound if h in ("0.0.0.0", "::")] or (
                [host] if host else ["0.0.0.0", "::"])
            return [(h, port) for h in dict.fromkeys(wildcards)]
        return bound[:MAX_INTRO_ADDRESSES]

    def _hub_event(self, link: Link, event: object) -> None:
        """What the hub's link hands over beyond frames and pings: INTRO."""
        if isinstance(event, Intro):
            self.direct.introduce(event.peers)

    def _is_local(self, mac: bytes) -> bool:
        """Is `mac` behind one of this endpoint's own ports (not the hub's)?"""
        entry = self.switch.mac_table.get(mac)
        return entry is not None and entry[0] is not self.uplink

    def _forward_direct(self, frames: list[Frame]) -> None:
        """Frames a direct peer sent, admitted by its filter: switched as if from the hub."""
        self.switch.forward(self.uplink, frames)
