"""`vhostvpn hub`: one process, one learning switch, and its ports: one per vhost-user
socket, the gateway (the hub's own addresses and services: ARP, ICMP, NDP, router
advertisements, DHCP), and one per endpoint connected through the tunnel (tunnel/listener.py).
With `nat`, the gateway routes: what guests send it for elsewhere goes to the NAT
(tunnel/nat.py NatShell, run in the hub's nursery), DHCP and router advertisements name it
as default router and (unless `dns` names servers) as DNS server; without, they name no
default route (a host joining through TAP keeps its own).

The Trio side is thin: each vhost-user socket has its server (virtio.backend), the gateway's
frames enter the switch from whatever made them (`Switch.send`: a reply from the handler
that delivered the request) and a task does its timed work, the DHCP
server's lease file is read once at start-up and written by a task of its own (in a worker
thread, batched), so are the --pcap capture files (tunnel/capture.py FileCaptures), and a
housekeeping task ages the switch's tables.  The hub also answers `vhostvpn status`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from netstack.frame import Frame, stable_mac
from netstack.gateway.dhcp_config import DhcpConfig
from netstack.gateway.dhcp_leases import Lease
from netstack.gateway.dhcp_server import DhcpServer
from netstack.gateway.dhcp_store import PERSIST_INTERVAL_SECONDS, read_state, write_state
from netstack.gateway.port import GatewayConfig, GatewayPort
from netstack.nat.forward import ForwardSpec
from netstack.nat.packet import DenyList, NatConfig
from netstack.pcap import CAPTURE_DIR_MODE
from netstack.port import Port
from netstack.switch import Switch
from tunnel.capture import FileCaptures
from tunnel.control import serve_control
from tunnel.keys import load_identity
from tunnel.listener import TunnelListener
from tunnel.nat import NatShell
from tunnel.session import SessionPort
from virtio.backend import attach_sockets
from virtio.unixsock import OWNER_ONLY, SocketAccess

log = logging.getLogger(__name__)

# How often learned MACs and IP claims are swept.
HOUSEKEEPING_SECONDS = 10.0


def default_state_dir() -> Path:
    """Where leases live unless --state-dir says otherwise."""
    if "STATE_DIRECTORY" in os.environ:  # systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/vhostvpn")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "vhostvpn"


GATEWAY_OUI = b"\x02\x76\x76"  # locally administered: 02 'v' 'v'


def gateway_mac(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bytes:
    """A locally administered MAC, stable for a subnet (guests' ARP caches survive restarts)."""
    return stable_mac(str(subnet), GATEWAY_OUI)


@dataclass
class HubConfig:
    sockets: list[str] = field(default_factory=list)
    client_sockets: list[str] = field(default_factory=list)
    control: str | None = None
    queue_pairs: int = 4
    subnet: ipaddress.IPv4Network | None = None
    gateway: ipaddress.IPv4Address | None = None  # default: the subnet's first address
    dhcp: bool = True
    dhcp_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None  # the pool
    lease_seconds: int = 3600
    domain: str | None = None  # DHCP option 15
    dhcp_reservations: dict[bytes, ipaddress.IPv4Address] = field(default_factory=dict)
    ipv6_prefix: ipaddress.IPv6Network | None = None
    mtu: int = 1500
    dns: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(default_factory=list)
    state_dir: Path | None = None
    pcap_dir: Path | None = None
    port_policy: bool = True  # police guest ports (netstack.policy); off trusts every guest
    listen: tuple[str | None, int] | None = None  # the tunnel: host (None: all), TCP port
    identity_dir: Path | None = None
    peers_file: Path | None = None
    name: str = "hub"
    # who may connect to the --socket files (--socket-mode, --socket-group)
    socket_access: SocketAccess = OWNER_ONLY
    nat: bool = False  # the gateway routes guests' traffic through the hub host's sockets
    map_host_loopback: bool = False  # the gateway's address reaches the host's 127.0.0.1/::1
    nat_deny: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    dns_upstreams: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(
        default_factory=list)  # the resolvers the gateway's DNS asks; empty: /etc/resolv.conf
    forwards: list[ForwardSpec] = field(default_factory=list)
    direct: bool = True  # introduce endpoints to each other (off: `hub --no-direct`)


class Hub:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.switch = Switch()
        self.servers = attach_sockets(self.switch, config.sockets, config.client_sockets,
                                      config.queue_pairs, policy=config.port_policy,
                                      access=config.socket_access)
        self.tunnel: TunnelListener | None = None
        if config.listen is not None:
            if config.identity_dir is None or config.peers_file is None:
                raise ValueError("a tunnel listener needs an identity and a peers file")
            self.tunnel = TunnelListener(
                self.switch, load_identity(config.identity_dir), config.peers_file,
                config.listen[0], config.listen[1], name=config.name, mtu=config.mtu,
                port_policy=config.port_policy, direct=config.direct)
        self.dhcp: DhcpServer | None = None
        self.gateway = self._make_gateway(config)
        if self.gateway is not None:
            self.switch.attach(self.gateway)
            self.switch.reserve(self.gateway, self.gateway.mac, self.gateway.addresses)
        self.nat: NatShell | None = None
        if config.nat:
            if self.gateway is None:
                raise ValueError("the NAT needs a gateway: a subnet or an IPv6 prefix")
            self.nat = self.gateway.nat = self._make_nat(config, self.gateway)
        self.captures: FileCaptures | None = None
        if config.pcap_dir is not None:
            config.pcap_dir.mkdir(mode=CAPTURE_DIR_MODE, parents=True, exist_ok=True)
            self.captures = FileCaptures(config.pcap_dir)
            for port in self.ports:
                self.captures.add(port)
            self.switch.on_attach = self.captures.add  # sessions attach when their peer arrives

    @property
    def ports(self) -> list[Port]:
        return list(self.switch.ports)

    def _make_gateway(self, config: HubConfig) -> GatewayPort | None:
        if config.subnet is None and config.ipv6_prefix is None:
            return None
        ipv4 = None
        if config.subnet is not None:
            address = config.gateway or next(config.subnet.hosts())
            ipv4 = ipaddress.IPv4Interface(f"{address}/{config.subnet.prefixlen}")
        mac = gateway_mac(config.subnet or config.ipv6_prefix)
        dns6 = tuple(a for a in config.dns if isinstance(a, ipaddress.IPv6Address))
        if config.nat and not dns6 and config.ipv6_prefix is not None:
            dns6 = (config.ipv6_prefix.network_address + 1,)  # the gateway's DNS forwarder
        gateway_config = GatewayConfig(mac=mac, ipv4=ipv4, ipv6_prefix=config.ipv6_prefix,
                                       mtu=config.mtu, dns6=dns6, router=config.nat)
        dhcp = None
        if config.subnet is not None and config.dhcp:
            dhcp = self.dhcp = self._make_dhcp(config, ipv4, mac)
        return GatewayPort(gateway_config, dhcp=dhcp)

    def _make_dhcp(self, config: HubConfig, ipv4: ipaddress.IPv4Interface,
                   mac: bytes) -> DhcpServer:
        state_dir = config.state_dir or default_state_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        subnet_name = str(config.subnet).replace("/", "_")
        dns4 = tuple(a for a in config.dns if isinstance(a, ipaddress.IPv4Address))
        if config.nat and not dns4:
            dns4 = (ipv4.ip,)  # the gateway's DNS forwarder
        dhcp_config = DhcpConfig(
            subnet=config.subnet, gateway=ipv4.ip, server_mac=mac, dns=dns4, mtu=config.mtu,
            pool=config.dhcp_range, lease_seconds=config.lease_seconds, domain=config.domain,
            reservations=config.dhcp_reservations, router=config.nat,
            state_path=state_dir / f"leases-{subnet_name}.json",
        )
        # Read once, before the event loop runs; writes go through `_persist_leases`.
        server = DhcpServer(dhcp_config, stored=read_state(dhcp_config.state_path))
        server.on_lease = self._leased
        server.on_release = lambda lease: self.switch.unbind_lease(lease.ip.packed)
        server.in_use = lambda ip, mac: self.switch.used_by_another_port(ip.packed, mac)
        server.port_of = self._port_of
        for lease in server.leases.values():  # from the state file: bound once MACs are seen
            log.info("lease %s for %s restored", lease.ip, lease.mac.hex(":"))
        return server

    def _leased(self, lease: Lease) -> None:
        self.switch.bind_lease(lease.ip.packed, lease.mac)
        if self.gateway is not None:  # port forwards find the guest by its lease
            self.gateway.learn(lease.ip.packed, lease.mac)

    def _make_nat(self, config: HubConfig, gateway: GatewayPort) -> NatShell:
        # The segment's own networks: its members are reached on the segment, never through
        # the NAT (a guest with a stale route would otherwise reach them from the hub host).
        segment = [n for n in (config.subnet, config.ipv6_prefix) if n is not None]
        nat_config = NatConfig(
            gateway_mac=gateway.mac, gateway_ips=frozenset(gateway.addresses),
            deny=DenyList.with_defaults(str(network) for network in segment + config.nat_deny),
            map_host_loopback=config.map_host_loopback, mtu=config.mtu)
        upstreams = config.dns_upstreams or None  # None: /etc/resolv.conf
        # A guest's caps are its port's (the MAC table names the port behind a MAC).
        return NatShell(nat_config, gateway.to_guests, upstreams=upstreams,
                        forwards=config.forwards, resolve=gateway.resolve,
                        port_of=self._port_of)

    def _nat_status(self, nat: NatShell) -> dict[str, object]:
        """The NAT's tables and counters, and what each guest (by port) holds in it."""
        status = nat.status()
        # The shell lists its forwards with their state once it runs them; until then, which.
        status.setdefault("forwards", [{"forward": str(spec)} for spec in self.config.forwards])
        return status

    def _port_of(self, mac: bytes) -> Port | None:
        """The port the switch learned `mac` on (DHCP budgets and NAT caps are per port)."""
        entry = self.switch.mac_table.get(mac)
        return entry[0] if entry is not None else None

    def status(self) -> dict[str, object]:
        ports = []
        for port in self.ports:
            entry = port.status()
            server = next((s for s in self.servers if s.port is port), None)
            if server is not None:
                entry |= {"socket": server.path, "mode": "client" if server.client else "server"}
            if self.tunnel is not None and isinstance(port, SessionPort):
                direct = self.tunnel.introducer.status_of(port)
                if direct is not None:
                    entry["direct"] = direct
            ports.append(entry)
        state = {"role": "hub", "pid": os.getpid(), "ports": ports, **self.switch.status()}
        if self.tunnel is not None:
            state["tunnel"] = self.tunnel.status()
        if self.nat is not None:
            state["nat"] = self._nat_status(self.nat)
        return state

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                if self.nat is not None:  # before any port can hand it a frame
                    await nursery.start(self.nat.run)
                for server in self.servers:
                    await nursery.start(server.run)
                if self.config.control:
                    ports = partial(list, self.switch.ports)  # `vhostvpn capture PORT`
                    await nursery.start(partial(serve_control, ports=ports),
                                        self.config.control, self.status)
                if self.gateway is not None:
                    nursery.start_soon(self._run_gateway, self.gateway)
                if self.dhcp is not None:
                    nursery.start_soon(self._persist_leases, self.dhcp)
                if self.captures is not None:
                    nursery.start_soon(self.captures.run)
                if self.tunnel is not None:
                    await nursery.start(self.tunnel.run)
                nursery.start_soon(self._housekeeping)
                log.info("hub ready: %d vhost-user sockets%s%s", len(self.servers),
                         f", gateway {self.config.subnet}" if self.gateway else "",
                         ", NAT on" if self.nat else "")
                task_status.started()
        finally:
            if self.dhcp is not None and self.dhcp.dirty:  # once more at shutdown
                with trio.CancelScope(shield=True):
                    await self._write_leases(self.dhcp, send_acks=False)
            if self.captures is not None:  # what is queued goes to the files
                with trio.CancelScope(shield=True):
                    await self.captures.close()

    async def _run_gateway(self, gateway: GatewayPort) -> None:
        """The gateway's timed work (router advertisements, lease expiry) when it is due.
        Its frames leave from whatever made them, through `Switch.send`: a reply from the
        switch's call that delivered its request (the handler that read it: no task wakes),
        the NAT's frames from its sockets' handlers, a timer's from here.  This task
        forwards only what `send` left (answers drawing answers for too long)."""
        left = trio.Event()

        def on_ready() -> None:
            if not self.switch.send(gateway):
                left.set()

        gateway.on_ready = on_ready
        while True:
            gateway.tick(gateway.clock())
            frames = gateway.take_outbox()
            if frames:
                self.switch.forward(gateway, frames)
                await trio.lowlevel.checkpoint()
                continue
            left = trio.Event()
            with trio.move_on_after(max(0.0, gateway.next_deadline() - gateway.clock())):
                await left.wait()

    async def _persist_leases(self, dhcp: DhcpServer) -> None:
        """Write the lease table whenever it changed, at most every PERSIST_INTERVAL_SECONDS
        (the changes of that time go in one write), and send the ACKs that waited for it."""
        while True:
            if not dhcp.dirty:
                changed = trio.Event()
                dhcp.on_dirty = changed.set
                await changed.wait()
            await self._write_leases(dhcp, send_acks=True)
            await trio.sleep(PERSIST_INTERVAL_SECONDS)

    async def _write_leases(self, dhcp: DhcpServer, *, send_acks: bool) -> None:
        job = dhcp.write_job()
        try:
            # Encoding and the fsyncs run in a worker thread; not abandoned on cancellation,
            # so a shutdown waits for a write under way.
            on_disk = await trio.to_thread.run_sync(write_state, job)
        except OSError as error:
            dhcp.persist_failed(job, error)
            return
        acks = dhcp.persisted(job, on_disk)
        if acks and send_acks and self.gateway is not None:
            self.switch.forward(self.gateway, [Frame(ack) for ack in acks])

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(HOUSEKEEPING_SECONDS)
            self.switch.expire(self.switch.clock())
