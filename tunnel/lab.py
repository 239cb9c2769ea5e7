"""`vhostvpn lab`: a hub, QEMU guests and TAP/TUN hosts declared in one TOML file, started in
the background (`up`), driven (`run`, `status`) and removed without a trace (`down`).

Layout of a running lab (docs/lab.md):
* state directory /run/vhostvpn-lab/<stem>-<tag>/ (tag: 6 hex digits of the file's absolute
  path), holding keys/, peers, hub-state/, *.control, *.sock, *.console, logs/<member>.log
  and state.json (what `down` undoes: PIDs with their start times, namespaces);
* network namespace vvlab-<tag>-hub with the hub listening on :7777, and one namespace
  vvlab-<tag>-<member> per member, joined to the hub's by a veth pair
  (10.199.N.1/24 on the hub's side, 10.199.N.2/24 on the member's);
* per guest a `vhostvpn vm` endpoint in its namespace and QEMU (run-vm.sh, console on a
  unix socket) in the caller's; per host a `vhostvpn host --tap/--tun` in its namespace.
run-vm.sh, the image builder and the example labs are found by tunnel/assets.py (qemu/ in a
checkout, package data when installed), as is the guest image's folder.
Every process runs in its own session (it outlives `lab up`) and is stopped by its recorded
PID: SIGTERM to its process group, SIGKILL after STOP_TIMEOUT.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from netstack.frame import QEMU_OUI, format_mac, stable_mac
from netstack.gateway.dhcp_config import MAX_LEASE_SECONDS, MIN_LEASE_SECONDS
from tunnel import assets
from tunnel.cli import HUB_MIN_MTU, LOG_LEVELS, MAX_MTU, address_range
from tunnel.console import ConsoleError, UnixConsole

RUN_VM = Path(os.environ.get("VV_RUN_VM", assets.run_vm()))
STATE_ROOT = Path(os.environ.get("VV_LAB_STATE_ROOT", "/run/vhostvpn-lab"))
HUB_PORT = 7777
START_TIMEOUT = 15.0
BOOT_TIMEOUT = 120.0
ADDRESS_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")


class LabError(Exception):
    """A lab file that does not parse, or a lab that cannot be brought up or reached."""


# --- the lab file ------------------------------------------------------------------------

@dataclass(frozen=True)
class GuestSpec:
    name: str
    memory: str = "256M"
    smp: int = 1
    qemu_args: tuple[str, ...] = ()
    command: str | None = None
    address: ipaddress.IPv4Address | None = None  # reserved for its MAC in the hub's DHCP


@dataclass(frozen=True)
class HostSpec:
    name: str
    mode: str  # tap | tun
    addresses: tuple[str, ...] = ()
    dhcp: bool = False


@dataclass(frozen=True)
class HubSpec:
    """The [hub] table: the flags `vhostvpn hub` is started with (hub_flags)."""

    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address  # default: the subnet's first address
    ipv6_prefix: ipaddress.IPv6Network | None = None
    dhcp: bool = True
    mtu: int = 1500  # announced by DHCP and RAs; also the hosts' device MTU
    dns: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    pcap: Path | None = None  # absolute; kept by `down`
    port_policy: bool = True  # false: the hub and the guests' endpoints do not police
    log_level: str | None = None  # default: `lab up --log-level`
    dhcp_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    lease_time: int | None = None  # seconds; default: the hub's
    domain: str | None = None


@dataclass(frozen=True)
class LabSpec:
    path: Path
    hub: HubSpec
    guests: tuple[GuestSpec, ...]
    hosts: tuple[HostSpec, ...]

    @property
    def tag(self) -> str:
        return lab_tag(self.path)

    @property
    def state_dir(self) -> Path:
        return lab_state_dir(self.path)

    @property
    def reservations(self) -> dict[str, ipaddress.IPv4Address]:
        """Guest MAC -> the fixed address its `address` asks for."""
        return {_mac(self.tag, g.name): g.address for g in self.guests
                if g.address is not None}

    @property
    def members(self) -> list[GuestSpec | HostSpec]:
        return [*self.guests, *self.hosts]


def _is_host(address: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network) -> bool:
    """`address` is one a host of `subnet` may have (not its network or broadcast address)."""
    return address in subnet and address not in (subnet.network_address,
                                                 subnet.broadcast_address)


def lab_tag(path: Path) -> str:
    """6 hex digits of the lab file's absolute path: its namespaces' and state's names."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:6]


def lab_state_dir(path: Path) -> Path:
    """Where a running lab keeps its state; found from the file's path alone, so `down`,
    `status` and `run` work even after the file was edited into something that no longer
    parses (or was deleted)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)[:40]
    return STATE_ROOT / f"{stem}-{lab_tag(path)}"


_HUB_KEYS = {"subnet", "gateway", "ipv6_prefix", "dhcp", "dhcp_range", "lease_time", "domain",
             "mtu", "dns", "pcap", "port_policy",
             "log_level"}
_GUEST_KEYS = {"name", "count", "memory", "smp", "qemu_args", "command", "address"}
_HOST_KEYS = {"name", "mode", "address", "dhcp"}


def _check_keys(where: str, table: object, allowed: set[str]) -> dict:
    if not isinstance(table, dict):
        raise LabError(f"{where}: must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise LabError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(map(repr, unknown))} (allowed: {', '.join(sorted(allowed))})")
    return table


# How a lab file's author calls each value type (TOML's words, not Python's).
TOML_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false",
                   list: "an array", dict: "a table", float: "a number"}


def _typed(where: str, table: dict, key: str, kind: type | tuple[type, ...], default=None):
    value = table.get(key, default)
    if value is not None and (not isinstance(value, kind) or
                              (isinstance(value, bool) and kind is int)):
        kinds = (kind,) if isinstance(kind, type) else kind
        name = " or ".join(TOML_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise LabError(f"{where}: {key} must be {name}, got {value!r}")
    return value


def _name(where: str, table: dict) -> str:
    name = _typed(where, table, "name", str)
    if name is None:
        raise LabError(f"{where}: missing name")
    if not NAME_RE.fullmatch(name):
        raise LabError(f"{where}: name {name!r}: want lowercase letters, digits and '-', "
                       "starting with a letter or digit, at most 31 characters")
    return name


def parse_lab(text: str, path: Path | str = "lab.toml") -> LabSpec:
    """Parse and check a lab file; LabError names the table and key at fault."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LabError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"hub", "guest", "host"})
    if unknown:
        raise LabError(f"{path}: unknown table{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(map(repr, unknown))} (allowed: hub, [[guest]], [[host]])")
    hub = _parse_hub(_check_keys("[hub]", data.get("hub", {}), _HUB_KEYS), path)

    guests: list[GuestSpec] = []
    for index, table in enumerate(_array(data, "guest")):
        where = f"[[guest]] #{index + 1}"
        table = _check_keys(where, table, _GUEST_KEYS)
        name = _name(where, table)
        where = f"[[guest]] {name!r}"
        count = _typed(where, table, "count", int, 1)
        if not 1 <= count <= 16:
            raise LabError(f"{where}: count {count}: want 1 to 16")
        memory = _typed(where, table, "memory", str, "256M")
        if not re.fullmatch(r"[1-9][0-9]*[MG]", memory):
            raise LabError(f"{where}: memory {memory!r}: want a size like \"256M\" or \"1G\"")
        smp = _typed(where, table, "smp", int, 1)
        if not 1 <= smp <= 64:
            raise LabError(f"{where}: smp {smp}: want 1 to 64")
        qemu_args = _typed(where, table, "qemu_args", list, [])
        if not all(isinstance(a, str) for a in qemu_args):
            raise LabError(f"{where}: qemu_args must be a list of strings")
        command = _typed(where, table, "command", str)
        names = [name] if count == 1 else [f"{name}{i}" for i in range(1, count + 1)]
        reserved = _guest_addresses(where, table, count, hub)
        guests += [GuestSpec(n, memory, smp, tuple(qemu_args), command, address)
                   for n, address in zip(names, reserved, strict=True)]

    hosts: list[HostSpec] = []
    for index, table in enumerate(_array(data, "host")):
        where = f"[[host]] #{index + 1}"
        table = _check_keys(where, table, _HOST_KEYS)
        name = _name(where, table)
        where = f"[[host]] {name!r}"
        mode = _typed(where, table, "mode", str, "tap")
        if mode not in ("tap", "tun"):
            raise LabError(f"{where}: mode {mode!r}: want \"tap\" or \"tun\"")
        dhcp = _typed(where, table, "dhcp", bool, False)
        address = _typed(where, table, "address", (str, list), [])
        addresses = [address] if isinstance(address, str) else address
        for text in addresses:
            _check_address(where, text, hub)
            static = ipaddress.ip_interface(text).ip
            if (hub.dhcp_range is not None and static.version == 4
                    and hub.dhcp_range[0] <= static <= hub.dhcp_range[1]):
                raise LabError(f"{where}: address {text!r} is inside the hub's dhcp_range "
                               f"{hub.dhcp_range[0]}-{hub.dhcp_range[1]}: DHCP could lease it "
                               "to another member")
        if dhcp and mode == "tap":
            raise LabError(f"{where}: dhcp = true needs mode = \"tun\"")
        if not dhcp and not any(ipaddress.ip_interface(a).version == 4 for a in addresses):
            raise LabError(f"{where}: give an IPv4 address (address = \"10.77.0.50/24\") or "
                           "dhcp = true (mode = \"tun\")")
        if dhcp and any(ipaddress.ip_interface(a).version == 4 for a in addresses):
            raise LabError(f"{where}: an IPv4 address and dhcp = true: choose one")
        hosts.append(HostSpec(name, mode, tuple(addresses), dhcp))

    static = [(g.name, g.address) for g in guests if g.address is not None] + [
        (h.name, ip) for h in hosts for ip in (ipaddress.ip_interface(a).ip for a in h.addresses)
        if ip.version == 4]
    owners: dict[ipaddress.IPv4Address, str] = {}
    for name, address in static:
        if address in owners:
            raise LabError(f"{path}: address {address} is given to both {owners[address]!r} "
                           f"and {name!r}")
        owners[address] = name
    seen: set[str] = set()
    for member in [*guests, *hosts]:
        if member.name == "hub" or member.name in seen:
            raise LabError(f"{path}: member name {member.name!r} is used twice"
                           if member.name in seen else f"{path}: 'hub' is reserved")
        seen.add(member.name)
    if not seen:
        raise LabError(f"{path}: no [[guest]] or [[host]]: nothing to start")
    if not hub.dhcp:
        leasing = [g.name for g in guests] + [h.name for h in hosts if h.dhcp]
        if leasing:
            raise LabError(f"[hub]: dhcp = false, but {', '.join(map(repr, leasing))} lease "
                           "their address by DHCP (guests always do; hosts with dhcp = true)")
    return LabSpec(path, hub, tuple(guests), tuple(hosts))


def _parse_hub(hub: dict, path: Path) -> HubSpec:
    subnet_text = _typed("[hub]", hub, "subnet", str)
    if subnet_text is None:
        raise LabError("[hub]: missing subnet (e.g. subnet = \"10.77.0.0/24\")")
    try:
        subnet = ipaddress.IPv4Network(subnet_text)
    except ValueError as exc:
        raise LabError(f"[hub]: subnet {subnet_text!r}: {exc}") from None
    if subnet.num_addresses < 8:
        raise LabError(f"[hub]: subnet {subnet}: too small")
    gateway = subnet[1]
    if (gateway_text := _typed("[hub]", hub, "gateway", str)) is not None:
        try:
            gateway = ipaddress.IPv4Address(gateway_text)
        except ValueError as exc:
            raise LabError(f"[hub]: gateway {gateway_text!r}: {exc}") from None
        if not _is_host(gateway, subnet):
            raise LabError(f"[hub]: gateway {gateway} is not a host address of the subnet "
                           f"{subnet}")
    prefix = None
    if (prefix_text := _typed("[hub]", hub, "ipv6_prefix", str)) is not None:
        try:
            prefix = ipaddress.IPv6Network(prefix_text)
        except ValueError as exc:
            raise LabError(f"[hub]: ipv6_prefix {prefix_text!r}: {exc}") from None
        if prefix.prefixlen != 64:
            raise LabError(f"[hub]: ipv6_prefix {prefix}: SLAAC needs a /64")
    dhcp = _typed("[hub]", hub, "dhcp", bool, True)
    mtu = _typed("[hub]", hub, "mtu", int, 1500)
    if not HUB_MIN_MTU <= mtu <= MAX_MTU:
        raise LabError(f"[hub]: mtu {mtu}: want {HUB_MIN_MTU} to {MAX_MTU}")
    dns_value = _typed("[hub]", hub, "dns", (str, list), [])
    dns = []
    for text in [dns_value] if isinstance(dns_value, str) else dns_value:
        try:
            if not isinstance(text, str):
                raise ValueError
            server = ipaddress.ip_address(text)
        except ValueError:
            raise LabError(f"[hub]: dns {text!r}: want an IPv4 or IPv6 address "
                           "(a string or a list of strings)") from None
        if server.version == 4 and not dhcp:
            raise LabError(f"[hub]: dns {text!r}: IPv4 servers are handed out by DHCP, which "
                           "dhcp = false turns off")
        if server.version == 6 and prefix is None:
            raise LabError(f"[hub]: dns {text!r}: IPv6 servers are announced in router "
                           "advertisements: set ipv6_prefix")
        dns.append(server)
    pcap = None
    if (pcap_text := _typed("[hub]", hub, "pcap", str)) is not None:
        if not pcap_text.strip():
            raise LabError("[hub]: pcap: want a directory, got an empty string")
        pcap = path.resolve().parent / pcap_text  # relative to the lab file
    port_policy = _typed("[hub]", hub, "port_policy", bool, True)
    log_level = _typed("[hub]", hub, "log_level", str)
    if log_level is not None and log_level not in LOG_LEVELS:
        raise LabError(f"[hub]: log_level {log_level!r}: want one of {', '.join(LOG_LEVELS)}")
    dhcp_range = None
    if (range_text := _typed("[hub]", hub, "dhcp_range", str)) is not None:
        try:
            dhcp_range = address_range(range_text)
        except argparse.ArgumentTypeError as exc:
            raise LabError(f"[hub]: dhcp_range {exc}") from None
        if not all(_is_host(a, subnet) for a in dhcp_range):
            raise LabError(f"[hub]: dhcp_range {range_text!r} is not a range of host "
                           f"addresses of {subnet}")
    lease_time = _typed("[hub]", hub, "lease_time", int)
    if lease_time is not None and not MIN_LEASE_SECONDS <= lease_time <= MAX_LEASE_SECONDS:
        raise LabError(f"[hub]: lease_time {lease_time}: want {MIN_LEASE_SECONDS} to "
                       f"{MAX_LEASE_SECONDS} seconds")
    domain = _typed("[hub]", hub, "domain", str)
    if domain is not None and not (0 < len(domain) <= 253 and domain.isascii()):
        raise LabError(f"[hub]: domain {domain!r}: want an ASCII name of 1 to 253 characters")
    if not dhcp:
        for key, value in (("dhcp_range", dhcp_range), ("lease_time", lease_time),
                           ("domain", domain)):
            if value is not None:
                raise LabError(f"[hub]: {key} is a DHCP setting, and dhcp = false")
    return HubSpec(subnet, gateway, prefix, dhcp, mtu, tuple(dns), pcap, port_policy, log_level,
                   dhcp_range, lease_time, domain)


def _guest_addresses(where: str, table: dict, count: int,
                     hub: HubSpec) -> list[ipaddress.IPv4Address | None]:
    """A guest's `address`: one IPv4 address per guest of the table (a string when there is
    one), each reserved for that guest's MAC in the hub's DHCP server; None each if absent."""
    value = _typed(where, table, "address", (str, list))
    if value is None:
        return [None] * count
    texts = [value] if isinstance(value, str) else value
    if len(texts) != count:
        raise LabError(f"{where}: address: {len(texts)} given for {count} guest"
                       f"{'s' if count > 1 else ''}: want one each")
    addresses = []
    subnet = hub.subnet
    for text in texts:
        try:
            if not isinstance(text, str):
                raise ValueError
            address = ipaddress.IPv4Address(text)
        except ValueError:
            raise LabError(f"{where}: address {text!r}: want an IPv4 address like "
                           "\"10.77.0.10\" (the prefix is the subnet's)") from None
        if not _is_host(address, subnet) or address == hub.gateway:
            raise LabError(f"{where}: address {text!r} is not a host address of the hub's "
                           f"subnet {subnet} (other than the gateway {hub.gateway})")
        addresses.append(address)
    return addresses


def _array(data: dict, key: str) -> list:
    value = data.get(key, [])
    if isinstance(value, dict):
        raise LabError(f"[{key}] must be an array of tables: write [[{key}]]")
    return value


def _check_address(where: str, text: object, hub: HubSpec) -> None:
    if not isinstance(text, str):
        raise LabError(f"{where}: address must be a string like \"10.77.0.50/24\", got {text!r}")
    if "/" not in text:
        raise LabError(f"{where}: address {text!r}: give a prefix length, e.g. {text}/24")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise LabError(f"{where}: address {text!r}: {exc}") from None
    subnet = hub.subnet
    if iface.version == 4:
        if not _is_host(iface.ip, subnet) or iface.ip == hub.gateway:
            raise LabError(f"{where}: address {text!r} is not a host address of the hub's "
                           f"subnet {subnet} (other than the gateway {hub.gateway})")
    elif hub.ipv6_prefix is None or iface.ip not in hub.ipv6_prefix:
        raise LabError(f"{where}: address {text!r} is not in the hub's ipv6_prefix "
                       f"{hub.ipv6_prefix}")


def load_lab(path: Path | str) -> LabSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabError(f"{path}: {exc}") from None
    return parse_lab(text, path)


# --- state -------------------------------------------------------------------------------

@dataclass
class Proc:
    pid: int
    start: int  # /proc/PID/stat starttime: a PID reused by someone else is never signalled
    argv: list[str]


@dataclass
class Member:
    name: str
    kind: str  # guest | tap | tun
    netns: str
    veth: str
    link: str  # hub address on the veth: HOST:PORT
    control: str
    log: str
    socket: str = ""
    console: str = ""
    processes: dict[str, Proc] = field(default_factory=dict)  # endpoint, qemu
    address: str | None = None
    address6: str | None = None


@dataclass
class State:
    lab: str
    tag: str
    dir: str
    hub_netns: str
    hub: Proc | None = None
    hub_control: str = ""
    members: list[Member] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)  # all that were ever created

    def save(self) -> None:
        path = Path(self.dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, directory: Path) -> State | None:
        try:
            data = json.loads((directory / "state.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"{directory}/state.json: {exc}") from None
        members = []
        for m in data.pop("members"):
            procs = {k: Proc(**v) for k, v in m.pop("processes").items()}
            members.append(Member(**m, processes=procs))
        hub = data.pop("hub")
        return cls(**data, hub=Proc(**hub) if hub else None, members=members)

    def member(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise LabError(f"no member {name!r}; members: "
                       f"{', '.join(m.name for m in self.members)}")


def _asdict(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _asdict(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: _asdict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_asdict(v) for v in obj]
    return obj


def _starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(proc: Proc) -> bool:
    """True while the recorded process (same PID and start time) exists and is not a zombie."""
    if _starttime(proc.pid) != proc.start:
        return False
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(proc: Proc, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process's group (it leads its own session), SIGKILL after `timeout`."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if not alive(proc):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signum)
        deadline = time.monotonic() + timeout
        while alive(proc) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(proc.pid, os.WNOHANG)  # our child if `up` is tearing down
            time.sleep(0.05)


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    with open(log, "ab") as out:
        out.write(f"# {shlex.join(argv)}\n".encode())
        out.flush()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
    start = _starttime(popen.pid)
    # The Popen object is dropped on purpose: the process outlives this one. Keep Python from
    # warning about it.
    popen.returncode = 0
    return Proc(popen.pid, start or 0, argv)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_list() -> set[str]:
    out = _ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# --- up ----------------------------------------------------------------------------------

def _say(text: str) -> None:
    print(text, flush=True)


def _wait_paths(proc: Proc, paths: list[str], log: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if not alive(proc):
            raise LabError(f"exited early (pid {proc.pid}):\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise LabError(f"no {', '.join(paths)} within {timeout} s:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _mac(tag: str, name: str) -> str:
    return format_mac(stable_mac(f"{tag}/{name}", QEMU_OUI))


def _image_ready() -> None:
    build = assets.image_dir()
    if (build / "vmlinuz").exists() and (build / "initramfs.gz").exists():
        return
    build_image()


def build_image(force: bool = False) -> Path:
    """Build (or confirm up to date) the guest image in assets.image_dir(); return that."""
    build = assets.image_dir()
    _say(f"building the guest image into {build} ({assets.build_image_script()})")
    argv = [sys.executable, str(assets.build_image_script()), *(["--force"] if force else [])]
    if subprocess.run(argv, env=_tool_env()).returncode != 0:
        raise LabError("guest image build failed")
    return build


def _tool_env() -> dict[str, str]:
    """The environment of run-vm.sh and build_image.py: the image folder made explicit (their
    own default, next to themselves, is right in a checkout only)."""
    return {**os.environ, "VV_BUILD_DIR": str(assets.image_dir())}


def hub_flags(hub: HubSpec, directory: Path, log_level: str,
              reservations: dict[str, ipaddress.IPv4Address] | None = None) -> list[str]:
    """The flags of the lab's `vhostvpn hub`, its files in the state directory `directory`;
    `reservations` (MAC -> address) are the guests' fixed addresses."""
    flags = ["--listen", f"0.0.0.0:{HUB_PORT}", "--identity", str(directory / "keys" / "hub"),
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
    return flags


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
    from tunnel.keys import keygen

    directory = spec.state_dir
    if (directory / "state.json").exists():
        raise LabError(f"lab {spec.path} is already up (state in {directory}); "
                       f"run `vhostvpn lab down {spec.path}` first")
    if spec.guests:
        _image_ready()
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "logs").mkdir(parents=True)
    directory.chmod(0o700)
    state = State(lab=str(spec.path.resolve()), tag=spec.tag, dir=str(directory),
                  hub_netns=f"vvlab-{spec.tag}-hub",
                  hub_control=str(directory / "hub.control"))
    state.save()
    try:
        _up(spec, state, directory, log_level, keygen)
    except BaseException:
        kept = Path(f"/tmp/vhostvpn-lab-{spec.tag}-logs")
        shutil.rmtree(kept, ignore_errors=True)
        with contextlib.suppress(OSError):
            shutil.copytree(directory / "logs", kept)
        _say(f"lab up failed; tearing down (logs kept in {kept})")
        down_state(state)
        raise
    return state


def _up(spec: LabSpec, state: State, directory: Path, log_level: str, keygen) -> None:
    logs = directory / "logs"
    _say(f"lab {spec.path.name}: state in {directory}, logs in {logs}")
    hub_fp = keygen(directory / "keys" / "hub")
    peers = [f"{m.name} {keygen(directory / 'keys' / m.name)}" for m in spec.members]
    (directory / "peers").write_text("\n".join(peers) + "\n")
    (directory / "peers").chmod(0o600)

    # namespaces and veths
    state.namespaces.append(state.hub_netns)
    state.save()
    _ip("netns", "add", state.hub_netns)
    _ip("-n", state.hub_netns, "link", "set", "lo", "up")
    for index, spec_member in enumerate(spec.members, start=1):
        kind = "guest" if isinstance(spec_member, GuestSpec) else spec_member.mode
        netns = f"vvlab-{spec.tag}-{spec_member.name}"
        member = Member(name=spec_member.name, kind=kind, netns=netns,
                        veth=f"vh{spec.tag}{index:02d}",
                        link=f"10.199.{index}.1:{HUB_PORT}",
                        control=str(directory / f"{spec_member.name}.control"),
                        log=str(logs / f"{spec_member.name}.log"))
        if kind == "guest":
            member.socket = str(directory / f"{spec_member.name}.sock")
            member.console = str(directory / f"{spec_member.name}.console")
        state.members.append(member)
        state.namespaces.append(netns)
        state.save()
        _ip("netns", "add", netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        peer = f"vm{spec.tag}{index:02d}"
        _ip("link", "add", member.veth, "netns", state.hub_netns, "type", "veth",
            "peer", "name", peer, "netns", netns)
        _ip("-n", state.hub_netns, "addr", "add", f"10.199.{index}.1/24", "dev", member.veth)
        _ip("-n", netns, "addr", "add", f"10.199.{index}.2/24", "dev", peer)
        _ip("-n", state.hub_netns, "link", "set", member.veth, "up")
        _ip("-n", netns, "link", "set", peer, "up")
    _say(f"namespaces: {state.hub_netns} and {len(state.members)} member namespaces")

    # the hub
    vv = [sys.executable, "-m", "tunnel.cli"]
    hub_argv = ["ip", "netns", "exec", state.hub_netns, *vv, "hub",
                *hub_flags(spec.hub, directory, log_level, spec.reservations)]
    state.hub = _spawn(hub_argv, logs / "hub.log")
    state.save()
    try:
        _wait_paths(state.hub, [state.hub_control], str(logs / "hub.log"))
    except LabError as exc:
        raise LabError(f"hub: {exc}") from None
    hub = spec.hub
    _say(f"hub: pid {state.hub.pid}, {hub.subnet}"
         + (f", {hub.ipv6_prefix}" if hub.ipv6_prefix else "") + f", gateway {hub.gateway}"
         + ("" if hub.dhcp else ", no DHCP") + (f", mtu {hub.mtu}" if hub.mtu != 1500 else "")
         + (f", pcap in {hub.pcap}" if hub.pcap else ""))

    # endpoints
    specs = {m.name: m for m in spec.members}
    for member in state.members:
        s = specs[member.name]
        argv = ["ip", "netns", "exec", member.netns, *vv,
                "vm" if member.kind == "guest" else "host",
                "--hub", member.link, "--identity", str(directory / "keys" / member.name),
                "--hub-fingerprint", hub_fp, "--name", member.name,
                "--control", member.control, "--log-level", log_level]
        if member.kind == "guest":
            argv += guest_flags(spec.hub, member.socket)
        else:
            assert isinstance(s, HostSpec)
            argv += host_flags(spec.hub, s)
        member.processes["endpoint"] = _spawn(argv, Path(member.log))
        state.save()
    for member in state.members:
        paths = [member.control, *([member.socket] if member.socket else [])]
        try:
            _wait_paths(member.processes["endpoint"], paths, member.log)
        except LabError as exc:
            raise LabError(f"{member.name}: endpoint {exc}") from None
        _say(f"{member.name}: endpoint pid {member.processes['endpoint'].pid} in {member.netns}")

    # guests
    consoles: dict[str, UnixConsole] = {}
    try:
        for member in state.members:
            if member.kind != "guest":
                continue
            s = specs[member.name]
            assert isinstance(s, GuestSpec)
            argv = [str(RUN_VM), "--socket", member.socket, "--mac", _mac(spec.tag, s.name),
                    "--mem", s.memory, "--smp", str(s.smp), "--name", s.name,
                    "--append", "vv.dhcp=1", "--console", f"unix:{member.console}"]
            if s.qemu_args:
                argv += ["--", *s.qemu_args]
            member.processes["qemu"] = _spawn(argv, Path(member.log), _tool_env())
            state.save()
            _say(f"{member.name}: booting QEMU (pid {member.processes['qemu'].pid})")
        for member in state.members:
            if member.kind == "guest":
                try:
                    _wait_paths(member.processes["qemu"], [member.console], member.log)
                except LabError as exc:
                    raise LabError(f"{member.name}: QEMU {exc}") from None
                consoles[member.name] = UnixConsole(
                    member.console, log=Path(member.log).with_suffix(".console.log"))
        _wait_booted(state, consoles,
                     {g.name: g.address for g in spec.guests if g.address is not None})
        for member in state.members:
            command = getattr(specs[member.name], "command", None)
            if member.kind == "guest" and command:
                rc, out = consoles[member.name].run(command, timeout=60)
                _say(f"{member.name}$ {command}  -> rc={rc}" + (f"\n{out}" if out else ""))
                if rc != 0:
                    raise LabError(f"{member.name}: command {command!r} exited with rc={rc}")
        _wait_hosts(state)
        if spec.hub.ipv6_prefix is not None:
            _wait_ipv6(state, spec, spec.hub.ipv6_prefix, consoles)
    finally:
        for console in consoles.values():
            console.close()
    state.save()
    _say("lab is up:")
    _say(format_status(state))


def _wait_booted(state: State, consoles: dict[str, UnixConsole],
                 reserved: dict[str, ipaddress.IPv4Address]) -> None:
    """Every guest booted with an IPv4 address (the one `reserved` names, for those it does)."""
    started = time.monotonic()
    deadline = started + BOOT_TIMEOUT
    waiting = dict(consoles)
    selector = selectors.DefaultSelector()
    for name, console in waiting.items():
        selector.register(console, selectors.EVENT_READ, name)
    try:
        while waiting:
            if time.monotonic() > deadline:
                names = ", ".join(waiting)
                raise LabError(f"{names}: not booted within {BOOT_TIMEOUT} s; console tail:\n"
                               + "\n".join(c.lines[-1] if c.lines else "" for c in
                                           waiting.values()))
            for key, _ in selector.select(timeout=1.0):
                name = key.data
                console = waiting[name]
                try:
                    console.read_some(0.001)
                except ConsoleError as exc:
                    raise LabError(f"{name}: {exc}\n{_tail(state.member(name).log)}") from None
                if (booted := console.booted()) is not None:
                    fields, failed = booted
                    member = state.member(name)
                    member.address = None if fields.get("ip") in (None, "none") else fields["ip"]
                    ip6 = fields.get("ip6")
                    member.address6 = None if ip6 in (None, "none") else ip6
                    if failed or member.address is None:
                        raise LabError(f"{name}: booted without an address (reason="
                                       f"{failed}); console:\n" + "\n".join(console.lines[-20:]))
                    want = reserved.get(name)
                    if want is not None and ipaddress.ip_interface(member.address).ip != want:
                        raise LabError(f"{name}: DHCP gave {member.address}, but the lab file "
                                       f"reserves {want} for it")
                    _say(f"{name}: booted, DHCP gave {member.address} "
                         f"({time.monotonic() - started:.1f} s)")
                    selector.unregister(console)
                    del waiting[name]
    finally:
        selector.close()


def _wait_hosts(state: State) -> None:
    from tunnel.control import query

    deadline = time.monotonic() + ADDRESS_TIMEOUT
    for member in state.members:
        if member.kind == "guest":
            continue
        while True:
            endpoint = member.processes["endpoint"]
            if not alive(endpoint):
                raise LabError(f"{member.name}: endpoint exited:\n{_tail(member.log)}")
            try:
                status = query(member.control)
            except OSError:
                status = {}
            session_up = (status.get("session") or {}).get("state") == "up"
            address = _host_address(member)
            if session_up and address is not None:
                member.address = address
                _say(f"{member.name}: {member.kind} vv0 {address}, session up")
                break
            if time.monotonic() > deadline:
                raise LabError(f"{member.name}: no session/address within {ADDRESS_TIMEOUT} s "
                               f"(session {status.get('session')}):\n{_tail(member.log)}")
            time.sleep(0.2)


def _wait_ipv6(state: State, spec: LabSpec, prefix: ipaddress.IPv6Network,
               consoles: dict[str, UnixConsole]) -> None:
    """Every member's IPv6 address in the hub's prefix, DAD done: a host's static one if it
    has one, else the one SLAAC made from the hub's router advertisements."""
    specs = {m.name: m for m in spec.members}
    deadline = time.monotonic() + ADDRESS_TIMEOUT
    for member in state.members:
        static = [ipaddress.ip_interface(a) for a in getattr(specs[member.name], "addresses", ())
                  if ipaddress.ip_interface(a).version == 6]
        while True:
            if member.kind == "guest":
                try:
                    _, shown = consoles[member.name].run("ip -6 addr show dev eth0 scope global",
                                                         timeout=10)
                except ConsoleError as exc:
                    raise LabError(f"{member.name}: {exc}\n{_tail(member.log)}") from None
            else:
                shown = _ip("-n", member.netns, "-6", "addr", "show", "dev", "vv0", "scope",
                            "global", check=False).stdout
            usable = [a for a in ipv6_addresses(shown, prefix) if not static or a in static]
            if usable:
                member.address6 = str(usable[0])
                _say(f"{member.name}: IPv6 {member.address6}"
                     + ("" if static else " (SLAAC)"))
                break
            if time.monotonic() > deadline:
                raise LabError(f"{member.name}: no IPv6 address in {prefix} within "
                               f"{ADDRESS_TIMEOUT} s; ip -6 addr said:\n{shown}")
            time.sleep(0.2)


def ipv6_addresses(shown: str, prefix: ipaddress.IPv6Network) -> list[ipaddress.IPv6Interface]:
    """The addresses in `prefix` that `ip -6 addr show` (iproute2 or busybox) lists as
    usable: neither tentative (DAD still running) nor dadfailed."""
    found = []
    for line in shown.splitlines():
        words = line.split()
        if "inet6" not in words or "tentative" in words or "dadfailed" in words:
            continue
        try:
            address = ipaddress.IPv6Interface(words[words.index("inet6") + 1])
        except (IndexError, ValueError):
            continue
        if address.ip in prefix:
            found.append(address)
    return found


def _host_address(member: Member) -> str | None:
    out = _ip("-n", member.netns, "-o", "-4", "addr", "show", "dev", "vv0", check=False).stdout
    for line in out.split("\n"):
        words = line.split()
        if "inet" in words:
            return words[words.index("inet") + 1]
    return None


# --- down, run, status -------------------------------------------------------------------

def down(path: Path) -> bool:
    """Stop and remove the lab of the file at `path`; False if there was nothing to remove.
    Idempotent; needs only the file's path, not its contents."""
    directory, tag = lab_state_dir(path), lab_tag(path)
    state = State.load(directory)
    found = state is not None or directory.exists()
    if state is None:
        state = State(lab=str(Path(path).resolve()), tag=tag, dir=str(directory),
                      hub_netns=f"vvlab-{tag}-hub")
    # Namespaces named after this lab's tag, also those a crashed `up` did not record.
    stray = {ns for ns in netns_list() if ns.startswith(f"vvlab-{tag}-")}
    found = found or bool(stray)
    state.namespaces = sorted(set(state.namespaces) | stray)
    down_state(state)
    return found


def down_state(state: State) -> None:
    procs = [m.processes["qemu"] for m in state.members if "qemu" in m.processes]
    for group in (procs, [m.processes["endpoint"] for m in state.members
                          if "endpoint" in m.processes], [state.hub] if state.hub else []):
        for proc in group:  # SIGTERM them all, then wait
            if alive(proc):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in group:
            stop(proc)
    existing = netns_list()
    for netns in state.namespaces:  # deleting a namespace deletes its veth ends
        if netns in existing:
            _ip("netns", "del", netns, check=False)
    shutil.rmtree(state.dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the parent too, once no other lab uses it
        Path(state.dir).parent.rmdir()


def load_state(path: Path) -> State:
    """The state `lab up` recorded for the lab file at `path`."""
    directory = lab_state_dir(path)
    state = State.load(directory)
    if state is None:
        raise LabError(f"lab {path} is not up (no {directory}/state.json)")
    return state


def run(path: Path, name: str, argv: list[str], timeout: float = 60.0) -> int:
    """Run argv in a member of the lab of `path` (guest: its console; host: its namespace);
    print its output and return its exit code."""
    if not argv:
        raise LabError("give a command after --")
    state = load_state(path)
    member = state.member(name)
    if member.kind != "guest":
        try:
            return subprocess.run(["ip", "netns", "exec", member.netns, *argv],
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise LabError(f"{name}: {shlex.join(argv)} did not finish within {timeout} s") \
                from None
    script = argv[0] if len(argv) == 1 else shlex.join(argv)
    try:
        with UnixConsole(member.console, timeout=10,
                         log=Path(member.log).with_suffix(".console.log")) as console:
            rc, output = console.run(script, timeout=timeout)
    except ConsoleError as exc:
        raise LabError(f"{name}: {exc}") from None
    if output:
        print(output, flush=True)
    return rc


def format_status(state: State) -> str:
    lines = [f"  hub    netns {state.hub_netns}, pid {state.hub.pid if state.hub else '-'}"
             + ("" if state.hub and alive(state.hub) else " (not running)")]
    for member in state.members:
        dead = [k for k, p in member.processes.items() if not alive(p)]
        lines.append(f"  {member.name:<6} {member.kind:<5} {member.address or '-':<18} "
                     f"netns {member.netns}"
                     + (f", ipv6 {member.address6}" if member.address6 else "")
                     + (f", console {member.console}" if member.console else "")
                     + (f" ({', '.join(dead)} not running)" if dead else ""))
    return "\n".join(lines)


# --- the command line --------------------------------------------------------------------

def add_lab_parser(sub, add_common) -> None:
    """`vhostvpn lab up|down|run|status FILE`, `lab examples`, `lab image` (wired into
    tunnel/cli.py).  FILE may name an example lab instead (tunnel/assets.py)."""
    lab = sub.add_parser("lab", help="test labs from a TOML file: a hub, QEMU guests and "
                                     "TAP/TUN hosts in network namespaces")
    actions = lab.add_subparsers(dest="lab_command", required=True)
    examples = actions.add_parser("examples", help="list the example labs (give a name as "
                                                   "FILE: vhostvpn lab up two-guests-one-host)")
    add_common(examples)
    image = actions.add_parser("image", help="build the guest image (lab up builds it when "
                                             "missing) and print its folder")
    image.add_argument("--force", action="store_true", help="rebuild even if up to date")
    add_common(image)
    for name, text in (("up", "start the lab in the background; return once every member "
                              "has its addresses"),
                       ("down", "stop the lab and remove all it created (idempotent)"),
                       ("status", "list the members, their addresses and processes"),
                       ("run", "run a command in a member: vhostvpn lab run FILE MEMBER -- CMD")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("file", type=assets.resolve_lab, metavar="FILE",
                            help="the lab file (TOML), or the name of an example lab")
        if name == "run":
            action.add_argument("member", metavar="MEMBER")
            action.add_argument("--timeout", type=float, default=60.0, metavar="S",
                                help="give up after S seconds (default 60)")
            action.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
        add_common(action)


def command(args) -> int:
    """Entry point of `vhostvpn lab`."""
    try:
        if args.lab_command == "examples":
            for path in assets.example_labs():
                print(f"{path.stem:<24} {path}")
            return 0
        if args.lab_command == "image":
            print(build_image(force=args.force))
            return 0
        if args.lab_command == "up":
            spec = load_lab(args.file)
            if os.geteuid() != 0:
                raise LabError("lab up needs root (network namespaces, TAP/TUN devices)")
            up(spec, log_level=args.log_level)
            return 0
        # The others read only what `up` recorded: the file may have changed since.
        if args.lab_command == "down":
            print(f"lab {args.file.name}: {'down' if down(args.file) else 'was not up'}")
            return 0
        if args.lab_command == "status":
            state = load_state(args.file)
            print(f"lab {args.file.name} ({state.dir})")
            print(format_status(state))
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return run(args.file, args.member, cmd, timeout=args.timeout)
    except LabError as exc:
        print(f"vhostvpn lab {args.lab_command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
