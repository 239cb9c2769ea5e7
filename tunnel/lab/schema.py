"""The lab file: TOML in, a checked `LabSpec` out (`parse_lab`, `load_lab`).

Every value is checked here, before anything starts: a LabError names the table and key at
fault ("[[guest]] 'vm': memory '1x': ..."), with what was expected.  The hub's limits and the
syntax it shares with `vhostvpn hub` come from tunnel/settings.py.  Nothing here does I/O but
reading the file in `load_lab`.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from netstack.frame import QEMU_OUI, format_mac, stable_mac
from netstack.gateway.dhcp_config import MAX_LEASE_SECONDS, MIN_LEASE_SECONDS
from netstack.nat.forward import ForwardSpec, parse_forward
from tunnel.lab import LabError
from tunnel.lab.netns import DIRECT_NETWORK
from tunnel.lab.state import lab_state_dir, lab_tag
from tunnel.settings import HUB_MIN_MTU, LOG_LEVELS, MAX_MTU, address_range, is_host_address

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")
Address = TypeVar("Address")


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
    nat: bool = False  # --nat; the hub then runs in the caller's namespace (netns.plan)
    map_host_loopback: bool = False  # --map-host-loopback (needs nat)
    forwards: tuple[ForwardSpec, ...] = ()  # --forward each; member names resolved
    direct: bool = False  # members --listen on the lab's LAN (netns.DIRECT_NETWORK)


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
        return {guest_mac(self.tag, g.name): g.address for g in self.guests
                if g.address is not None}

    @property
    def members(self) -> list[GuestSpec | HostSpec]:
        return [*self.guests, *self.hosts]

    def forward_targets(self) -> list[tuple[ForwardSpec, str]]:
        """Each port forward with what it reaches: `member:port`, or `address:port` for an
        address no member has."""
        names = {address: name for name, address in fixed_addresses(self.guests,
                                                                     self.hosts).items()}
        return [(spec, f"{names.get(spec.guest) or _bracketed(spec.guest)}:{spec.guest_port}")
                for spec in self.hub.forwards]


def _bracketed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def fixed_addresses(guests: tuple[GuestSpec, ...] | list[GuestSpec],
                    hosts: tuple[HostSpec, ...] | list[HostSpec]
                    ) -> dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The members whose IPv4 address is known before they start, by name: guests with an
    `address`, hosts with a static IPv4 address."""
    found: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {
        g.name: g.address for g in guests if g.address is not None}
    for host in hosts:
        ipv4 = [ip for ip in (ipaddress.ip_interface(a).ip for a in host.addresses)
                if ip.version == 4]
        if ipv4:
            found[host.name] = ipv4[0]
    return found


def guest_mac(tag: str, name: str) -> str:
    """The MAC of guest `name` of the lab tagged `tag`: stable across `up`s, so a reserved
    address stays its own."""
    return format_mac(stable_mac(f"{tag}/{name}", QEMU_OUI))


_HUB_KEYS = {"subnet", "gateway", "ipv6_prefix", "dhcp", "dhcp_range", "lease_time", "domain",
             "mtu", "dns", "pcap", "port_policy",
             "log_level", "nat", "map_host_loopback", "forward", "direct"}
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
    hub_table = _check_keys("[hub]", data.get("hub", {}), _HUB_KEYS)
    hub = _parse_hub(hub_table, path)

    guests: list[GuestSpec] = []
    for where, name, table in _tables(data, "guest", _GUEST_KEYS):
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
    for where, name, table in _tables(data, "host", _HOST_KEYS):
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
    forwards = _forwards(hub_table, hub, guests, hosts)
    return LabSpec(path, dataclasses.replace(hub, forwards=forwards), tuple(guests),
                   tuple(hosts))


def _forwards(table: dict, hub: HubSpec, guests: list[GuestSpec],
              hosts: list[HostSpec]) -> tuple[ForwardSpec, ...]:
    """[hub] forward: each spec parsed with the members' fixed addresses as names, its
    guest address on the segment, none twice."""
    texts = _typed("[hub]", table, "forward", list, [])
    if texts and not hub.nat:
        raise LabError("[hub]: forward needs nat = true (forwards go through the NAT)")
    names = fixed_addresses(guests, hosts)
    unaddressed = {m.name for m in [*guests, *hosts]} - set(names)
    forwards: list[ForwardSpec] = []
    for text in texts:
        if not isinstance(text, str):
            raise LabError(f"[hub]: forward {text!r}: want a string like \"tcp:2222:vm1:22\"")
        try:
            spec = parse_forward(text, names)
        except ValueError as exc:
            named = next((n for n in unaddressed if f"guest address {n!r} is" in str(exc)), None)
            if named is not None:
                raise LabError(f"[hub]: forward {text!r}: member {named!r} has no fixed "
                               "address to forward to: give it one (a guest's address = "
                               "\"10.77.0.10\", a host's static IPv4 address)") from None
            raise LabError(f"[hub]: forward {exc}") from None
        segment = hub.subnet if spec.guest.version == 4 else hub.ipv6_prefix
        if segment is None or spec.guest not in segment:
            raise LabError(f"[hub]: forward {text!r}: {spec.guest} is not in the hub's "
                           f"{'subnet' if spec.guest.version == 4 else 'ipv6_prefix'} "
                           f"{segment}")
        if any((f.protocol, f.bind, f.host_port) == (spec.protocol, spec.bind, spec.host_port)
               for f in forwards):
            raise LabError(f"[hub]: forward {text!r}: {spec.protocol} port {spec.host_port} "
                           "is forwarded twice")
        forwards.append(spec)
    return tuple(forwards)


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
        if not is_host_address(gateway, subnet):
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
        server = _address("[hub]", "dns", text, ipaddress.ip_address,
                          "an IPv4 or IPv6 address (a string or a list of strings)")
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
        if not all(is_host_address(a, subnet) for a in dhcp_range):
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
    nat = _typed("[hub]", hub, "nat", bool, False)
    map_host_loopback = _typed("[hub]", hub, "map_host_loopback", bool, False)
    if map_host_loopback and not nat:
        raise LabError("[hub]: map_host_loopback needs nat = true (it maps the gateway's "
                       "address through the NAT)")
    direct = _typed("[hub]", hub, "direct", bool, False)
    if direct and subnet.overlaps(DIRECT_NETWORK):
        raise LabError(f"[hub]: direct = true puts the members' --listen addresses on "
                       f"{DIRECT_NETWORK}, which the subnet {subnet} overlaps: choose another "
                       "subnet")
    return HubSpec(subnet, gateway, prefix, dhcp, mtu, tuple(dns), pcap, port_policy, log_level,
                   dhcp_range, lease_time, domain, nat, map_host_loopback, direct=direct)


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
        address = _address(where, "address", text, ipaddress.IPv4Address,
                           "an IPv4 address like \"10.77.0.10\" (the prefix is the subnet's)")
        if not is_host_address(address, subnet) or address == hub.gateway:
            raise LabError(f"{where}: address {text!r} is not a host address of the hub's "
                           f"subnet {subnet} (other than the gateway {hub.gateway})")
        addresses.append(address)
    return addresses


def _address(where: str, key: str, text: object, parse: Callable[[str], Address],
             want: str) -> Address:
    """One address of a `key` that holds a string or a list of them, parsed by `parse`;
    LabError saying what was wanted if it is not a string or does not parse."""
    try:
        if not isinstance(text, str):
            raise ValueError
        return parse(text)
    except ValueError:
        raise LabError(f"{where}: {key} {text!r}: want {want}") from None


def _tables(data: dict, key: str, allowed: set[str]) -> Iterator[tuple[str, str, dict]]:
    """Each [[key]] table, its keys checked, with how errors name it and its name."""
    for index, table in enumerate(_array(data, key)):
        where = f"[[{key}]] #{index + 1}"
        table = _check_keys(where, table, allowed)
        name = _name(where, table)
        yield f"[[{key}]] {name!r}", name, table


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
        if not is_host_address(iface.ip, subnet) or iface.ip == hub.gateway:
            raise LabError(f"{where}: address {text!r} is not a host address of the hub's "
                           f"subnet {subnet} (other than the gateway {hub.gateway})")
    elif hub.ipv6_prefix is None or iface.ip not in hub.ipv6_prefix:
        raise LabError(f"{where}: address {text!r} is not in the hub's ipv6_prefix "
                       f"{hub.ipv6_prefix}")


def load_lab(path: Path | str) -> LabSpec:
    """Read and parse the lab file at `path` (parse_lab); LabError if it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabError(f"{path}: {exc}") from None
    return parse_lab(text, path)
