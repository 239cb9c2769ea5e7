"""`lab up`: bring a checked LabSpec up in the background, in this order:
  keys (one identity per member and the hub, the hub's peers file) ->
  namespaces and veths (netns.py) -> the hub (`vhostvpn hub` in its namespace; a NAT lab's
  in the caller's, so that its NAT reaches the machine's networks and its forwards listen on
  the machine) ->
  the endpoints (`vhostvpn vm` / `vhostvpn host` in each member's) ->
  QEMU per guest (run-vm.sh, console on a unix socket) -> waiting for every member's
  addresses (boot.py) and running each guest's `command`.
Everything is recorded in state.json as soon as it exists, so that a failure at any step (or
a later `lab down`) removes exactly what was made.  The processes are `vhostvpn` itself,
run as `python -m tunnel.cli` with this interpreter.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from tunnel.lab import LabError, assets, netns, say
from tunnel.lab.boot import wait_booted, wait_hosts, wait_ipv6
from tunnel.lab.console import UnixConsole
from tunnel.lab.down import down_state
from tunnel.lab.image import image_ready, tool_env
from tunnel.lab.processes import spawn, wait_paths
from tunnel.lab.schema import GuestSpec, HostSpec, HubSpec, LabSpec, guest_mac
from tunnel.lab.state import STATE_ROOT, Member, State, format_lab

RUN_VM = Path(os.environ.get("VV_RUN_VM", assets.run_vm()))
HUB_PORT = 7777  # in the hub's own namespace; a NAT lab's hub takes a free port instead
VHOSTVPN = [sys.executable, "-m", "tunnel.cli"]


def hub_flags(hub: HubSpec, directory: Path, log_level: str,
              reservations: dict[str, ipaddress.IPv4Address] | None = None,
              port: int = HUB_PORT) -> list[str]:
    """The flags of the lab's `vhostvpn hub`, its tunnel on `port`, its files in the state
    directory `directory`; `reservations` (MAC -> address) are the guests' fixed addresses.
    With nat, guests are kept away from every lab's veth networks (--nat-deny)."""
    flags = ["--listen", f"0.0.0.0:{port}", "--identity", str(directory / "keys" / "hub"),
             "--peers", str(directory / "peers"), "--subnet", str(hub.subnet),
             "--gateway", str(hub.gateway), "--mtu", str(hub.mtu),
             "--state-dir", str(directory / "hub-state"),
             "--control", str(directory / "hub.control"),
             "--log-level", hub.log_level or log_level]
    if hub.ipv6_prefix is not None:
        flags += ["--ipv6-prefix", str(hub.ipv6_prefix)]
    if not hub.dhcp:
        flags.append("--no-dhcp")
    for server in hub.dns:
        flags += ["--dns", str(server)]
    if hub.dhcp_range is not None:
        flags += ["--dhcp-range", f"{hub.dhcp_range[0]}-{hub.dhcp_range[1]}"]
    if hub.lease_time is not None:
        flags += ["--lease-time", str(hub.lease_time)]
    if hub.domain is not None:
        flags += ["--domain", hub.domain]
    for mac, address in (reservations or {}).items():
        flags += ["--dhcp-reserve", f"{mac}={address}"]
    if hub.pcap is not None:
        flags += ["--pcap", str(hub.pcap)]
    if not hub.port_policy:
        flags.append("--no-port-policy")
    if hub.nat:
        flags += ["--nat", "--nat-deny", str(netns.VETH_NETWORKS)]
    if hub.map_host_loopback:
        flags.append("--map-host-loopback")
    for spec in hub.forwards:
        flags += ["--forward", str(spec)]
    return flags


def forward_lines(spec: LabSpec) -> list[str]:
    """How to reach each of the lab's port forwards: they listen on this machine (a NAT
    lab's hub runs in the caller's namespace), on every address of the family unless bound."""
    lines = []
    for forward, target in spec.forward_targets():
        v4 = forward.guest.version == 4
        bind = forward.bind or ipaddress.ip_address("0.0.0.0" if v4 else "::")
        reach = bind if not bind.is_unspecified else ipaddress.ip_address(
            "127.0.0.1" if v4 else "::1")
        if forward.protocol == "tcp" and forward.guest_port == 22:
            how = f"ssh -p {forward.host_port} {reach}"
        else:
            how = f"{forward.protocol} {_bracketed(reach)}:{forward.host_port} on this machine"
        lines.append(f"  forward {target} <- {forward.protocol} "
                     f"{_bracketed(bind)}:{forward.host_port} ({how})")
    return lines


def _bracketed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def free_port(taken: set[int]) -> int:
    """A TCP port free on every IPv4 address of the caller's namespace and not in `taken`
    (the lab's TCP forwards), for a NAT lab's hub (7777 may be anyone's there).  The hub
    binds it a moment later; if someone took it meanwhile, the hub exits and `up` says so
    with its log."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("0.0.0.0", 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port


def guest_flags(hub: HubSpec, socket: str) -> list[str]:
    """The flags of a guest's `vhostvpn vm`: one vhost-user socket, policed unless the hub's
    port_policy is false."""
    return ["--socket", socket, "--queues", "1",
            *([] if hub.port_policy else ["--no-port-policy"])]


def host_flags(hub: HubSpec, host: HostSpec) -> list[str]:
    """The device flags of a host's `vhostvpn host`: its device vv0 takes the hub's MTU."""
    flags = [f"--{host.mode}", "vv0", "--mtu", str(hub.mtu)]
    if host.dhcp:
        flags.append("--dhcp")
    for address in host.addresses:
        flags += ["--address", address]
    return flags


def up(spec: LabSpec, log_level: str = "info") -> State:
    """Start the lab in the background; return once every member has its addresses (IPv4,
    and IPv6 with an ipv6_prefix)."""
    directory = spec.state_dir
    if (directory / "state.json").exists():
        raise LabError(f"lab {spec.path} is already up (state in {directory}); "
                       f"run `vhostvpn lab down {spec.path}` first")
    plumbing = netns.plan(spec.tag, [m.name for m in spec.members], spec.hub.nat)
    if spec.hub.nat:  # refused before anything is made (checked again under the lock)
        netns.check_free(plumbing, netns.networks_in_use())
    if spec.guests:
        image_ready()
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "logs").mkdir(parents=True)
    directory.chmod(0o700)
    port = free_port({f.host_port for f in spec.hub.forwards if f.protocol == "tcp"}) \
        if spec.hub.nat else HUB_PORT
    state = State(lab=str(spec.path.resolve()), tag=spec.tag, dir=str(directory),
                  hub_netns=plumbing.hub_netns or "",
                  hub_control=str(directory / "hub.control"), hub_listen=f"0.0.0.0:{port}")
    state.save()
    try:
        _up(spec, state, plumbing, port, log_level)
    except BaseException:
        kept = Path(f"/tmp/vhostvpn-lab-{spec.tag}-logs")
        shutil.rmtree(kept, ignore_errors=True)
        with contextlib.suppress(OSError):
            shutil.copytree(directory / "logs", kept)
        say(f"lab up failed; tearing down (logs kept in {kept})")
        down_state(state)
        raise
    return state


def _up(spec: LabSpec, state: State, plumbing: netns.Plan, port: int, log_level: str) -> None:
    directory = spec.state_dir
    say(f"lab {spec.path.name}: state in {directory}, logs in {directory / 'logs'}")
    hub_fp = _make_keys(spec, directory)
    _make_namespaces(spec, state, plumbing, port)
    _start_hub(spec, state, port, log_level)
    _start_endpoints(spec, state, directory, log_level, hub_fp)
    _start_guests(spec, state)
    state.save()
    say("lab is up:")
    say(format_lab(state))
    for line in forward_lines(spec):
        say(line)


def _make_keys(spec: LabSpec, directory: Path) -> str:
    """An identity for the hub and each member, and the hub's peers file naming the members'
    keys; returns the hub's fingerprint."""
    from tunnel.keys import keygen

    hub_fp = keygen(directory / "keys" / "hub")
    peers = [f"{m.name} {keygen(directory / 'keys' / m.name)}" for m in spec.members]
    (directory / "peers").write_text("\n".join(peers) + "\n")
    (directory / "peers").chmod(0o600)
    return hub_fp


@contextlib.contextmanager
def _plumbing_lock(nat: bool) -> Iterator[None]:
    """For a NAT lab, held while it checks and takes its veth networks, so that two NAT labs
    coming up at once cannot both find 10.199.N.0/24 free in the caller's namespace (an
    flock on the state root directory itself: no file to leave behind)."""
    if not nat:
        yield
        return
    fd = os.open(STATE_ROOT, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_namespaces(spec: LabSpec, state: State, plumbing: netns.Plan, port: int) -> None:
    """The hub's namespace (none for a NAT lab), and per member a namespace joined to the
    hub's (or the caller's) by a veth pair; each recorded before it is made."""
    directory = spec.state_dir
    specs = {m.name: m for m in spec.members}
    with _plumbing_lock(spec.hub.nat):
        netns.check_free(plumbing, netns.networks_in_use() if spec.hub.nat else [])
        if plumbing.hub_netns:
            state.namespaces.append(plumbing.hub_netns)
            state.save()
            netns.add(plumbing.hub_netns)
        if spec.hub.direct:
            lan = netns.lan_netns(spec.tag)
            state.namespaces.append(lan)
            state.save()
            netns.add(lan)
            netns.make_lan(spec.tag)
        for veth in plumbing.veths:
            spec_member = specs[veth.member]
            kind = "guest" if isinstance(spec_member, GuestSpec) else spec_member.mode
            member = Member(name=veth.member, kind=kind, netns=veth.netns, veth=veth.hub_end,
                            link=f"{netns.hub_side(veth.index)}:{port}",
                            control=str(directory / f"{veth.member}.control"),
                            log=str(directory / "logs" / f"{veth.member}.log"))
            if kind == "guest":
                member.socket = str(directory / f"{veth.member}.sock")
                member.console = str(directory / f"{veth.member}.console")
            state.members.append(member)
            state.namespaces.append(member.netns)
            state.save()
            netns.add(member.netns)
            netns.join(plumbing, veth)
            if spec.hub.direct:
                netns.join_lan(spec.tag, veth)
                member.listen = f"{netns.direct_address(veth.index)}:{netns.DIRECT_PORT}"
    if spec.hub.direct:
        say(f"direct paths: members listen on {netns.DIRECT_NETWORK} (the bridge in "
            f"{netns.lan_netns(spec.tag)}), port {netns.DIRECT_PORT}")
    say(f"namespaces: {plumbing.hub_netns} and {len(state.members)} member namespaces"
        if plumbing.hub_netns else
        f"namespaces: {len(state.members)} member namespaces, their veths' hub ends "
        f"{', '.join(v.hub_end for v in plumbing.veths)} here (NAT: the hub runs in this "
        "namespace)")


def _start_hub(spec: LabSpec, state: State, port: int, log_level: str) -> None:
    directory = spec.state_dir
    logs = directory / "logs"
    where = ["ip", "netns", "exec", state.hub_netns] if state.hub_netns else []
    hub_argv = [*where, *VHOSTVPN, "hub",
                *hub_flags(spec.hub, directory, log_level, spec.reservations, port)]
    state.hub = spawn(hub_argv, logs / "hub.log")
    state.save()
    try:
        wait_paths(state.hub, [state.hub_control], str(logs / "hub.log"))
    except LabError as exc:
        raise LabError(f"hub: {exc}") from None
    hub = spec.hub
    say(f"hub: pid {state.hub.pid}, {hub.subnet}"
        + (f", {hub.ipv6_prefix}" if hub.ipv6_prefix else "") + f", gateway {hub.gateway}"
        + ("" if hub.dhcp else ", no DHCP") + (f", mtu {hub.mtu}" if hub.mtu != 1500 else "")
        + (f", pcap in {hub.pcap}" if hub.pcap else "")
        + (f", NAT, tunnel on 0.0.0.0:{port} of this machine" if hub.nat else ""))


def _start_endpoints(spec: LabSpec, state: State, directory: Path, log_level: str,
                     hub_fp: str) -> None:
    """Each member's `vhostvpn vm` or `vhostvpn host` in its namespace; returns once each
    listens on its control socket (and a guest's on its vhost-user socket)."""
    specs = {m.name: m for m in spec.members}
    for member in state.members:
        s = specs[member.name]
        argv = ["ip", "netns", "exec", member.netns, *VHOSTVPN,
                "vm" if member.kind == "guest" else "host",
                "--hub", member.link, "--identity", str(directory / "keys" / member.name),
                "--hub-fingerprint", hub_fp, "--name", member.name,
                "--control", member.control, "--log-level", log_level]
        if member.kind == "guest":
            argv += guest_flags(spec.hub, member.socket)
        else:
            assert isinstance(s, HostSpec)
            argv += host_flags(spec.hub, s)
        if member.listen:
            argv += ["--listen", member.listen]
        member.processes["endpoint"] = spawn(argv, Path(member.log))
        state.save()
    for member in state.members:
        paths = [member.control, *([member.socket] if member.socket else [])]
        try:
            wait_paths(member.processes["endpoint"], paths, member.log)
        except LabError as exc:
            raise LabError(f"{member.name}: endpoint {exc}") from None
        say(f"{member.name}: endpoint pid {member.processes['endpoint'].pid} in {member.netns}")


def _start_guests(spec: LabSpec, state: State) -> None:
    """QEMU for each guest, then every member's addresses (boot.py) and each guest's
    `command` run on its console."""
    specs = {m.name: m for m in spec.members}
    consoles: dict[str, UnixConsole] = {}
    try:
        for member in state.members:
            if member.kind != "guest":
                continue
            s = specs[member.name]
            assert isinstance(s, GuestSpec)
            argv = [str(RUN_VM), "--socket", member.socket, "--mac", guest_mac(spec.tag, s.name),
                    "--mem", s.memory, "--smp", str(s.smp), "--name", s.name,
                    "--append", "vv.dhcp=1", "--console", f"unix:{member.console}"]
            if s.qemu_args:
                argv += ["--", *s.qemu_args]
            member.processes["qemu"] = spawn(argv, Path(member.log), tool_env())
            state.save()
            say(f"{member.name}: booting QEMU (pid {member.processes['qemu'].pid})")
        for member in state.members:
            if member.kind == "guest":
                try:
                    wait_paths(member.processes["qemu"], [member.console], member.log)
                except LabError as exc:
                    raise LabError(f"{member.name}: QEMU {exc}") from None
                consoles[member.name] = UnixConsole(
                    member.console, log=Path(member.log).with_suffix(".console.log"))
        wait_booted(state, consoles,
                    {g.name: g.address for g in spec.guests if g.address is not None})
        for member in state.members:
            command = getattr(specs[member.name], "command", None)
            if member.kind == "guest" and command:
                rc, out = consoles[member.name].run(command, timeout=60)
                say(f"{member.name}$ {command}  -> rc={rc}" + (f"\n{out}" if out else ""))
                if rc != 0:
                    raise LabError(f"{member.name}: command {command!r} exited with rc={rc}")
        wait_hosts(state)
        if spec.hub.ipv6_prefix is not None:
            wait_ipv6(state, spec, spec.hub.ipv6_prefix, consoles)
    finally:
        for console in consoles.values():
            console.close()
