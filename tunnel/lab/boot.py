"""Waiting until a lab's members are up: every guest booted with its DHCP address (read off
its serial console, console.py), every host's endpoint with its session up and its address
on vv0, and with an ipv6_prefix every member's IPv6 address, DAD done.

Each wait is bounded (BOOT_TIMEOUT, ADDRESS_TIMEOUT) and fails with a LabError carrying what
the member said last: its console or its log.
"""

from __future__ import annotations

import ipaddress
import selectors
import time

from tunnel.control import query
from tunnel.lab import LabError, say
from tunnel.lab.console import ConsoleError, UnixConsole
from tunnel.lab.netns import ip
from tunnel.lab.processes import alive, tail
from tunnel.lab.schema import LabSpec
from tunnel.lab.state import Member, State

BOOT_TIMEOUT = 120.0
ADDRESS_TIMEOUT = 30.0


def wait_booted(state: State, consoles: dict[str, UnixConsole],
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
                    raise LabError(f"{name}: {exc}\n{tail(state.member(name).log)}") from None
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
                    say(f"{name}: booted, DHCP gave {member.address} "
                         f"({time.monotonic() - started:.1f} s)")
                    selector.unregister(console)
                    del waiting[name]
    finally:
        selector.close()


def wait_hosts(state: State) -> None:
    """Every host member's endpoint running with its session up and an IPv4 address on vv0
    (recorded in its Member)."""
    deadline = time.monotonic() + ADDRESS_TIMEOUT
    for member in state.members:
        if member.kind == "guest":
            continue
        while True:
            endpoint = member.processes["endpoint"]
            if not alive(endpoint):
                raise LabError(f"{member.name}: endpoint exited:\n{tail(member.log)}")
            try:
                status = query(member.control)
            except OSError:
                status = {}
            session_up = (status.get("session") or {}).get("state") == "up"
            address = _host_address(member)
            if session_up and address is not None:
                member.address = address
                say(f"{member.name}: {member.kind} vv0 {address}, session up")
                break
            if time.monotonic() > deadline:
                raise LabError(f"{member.name}: no session/address within {ADDRESS_TIMEOUT} s "
                               f"(session {status.get('session')}):\n{tail(member.log)}")
            time.sleep(0.2)


def wait_ipv6(state: State, spec: LabSpec, prefix: ipaddress.IPv6Network,
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
                    raise LabError(f"{member.name}: {exc}\n{tail(member.log)}") from None
            else:
                shown = ip("-n", member.netns, "-6", "addr", "show", "dev", "vv0", "scope",
                            "global", check=False).stdout
            usable = [a for a in ipv6_addresses(shown, prefix) if not static or a in static]
            if usable:
                member.address6 = str(usable[0])
                say(f"{member.name}: IPv6 {member.address6}"
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
    """The IPv4 address (with its prefix length) on a host member's vv0, or None."""
    out = ip("-n", member.netns, "-o", "-4", "addr", "show", "dev", "vv0", check=False).stdout
    for line in out.split("\n"):
        words = line.split()
        if "inet" in words:
            return words[words.index("inet") + 1]
    return None
