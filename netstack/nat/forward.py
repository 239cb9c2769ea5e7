"""Port forwards: `--forward PROTO:[BIND_ADDR:]HOSTPORT:GUEST_ADDR:GUEST_PORT`, parsed and
checked.  The hub listens on BIND_ADDR:HOSTPORT of its host and relays each connection (TCP)
or each client's datagrams (UDP) into GUEST_ADDR:GUEST_PORT through the NAT's stack
(tunnel/nat.py); the guest sees them come from the gateway's address.

IPv6 addresses are written in brackets (`tcp:[::1]:8022:[fd00::10]:22`); without
BIND_ADDR the forward listens on every address of the guest address's family.

Also here: the bounds of one forward, and how a forwarded flow gets its gateway-side
address and port (`gateway_address`, `free_port`), shared by the TCP and UDP tables.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = ("tcp", "udp")

# Connections (TCP) or outside clients (UDP) one forward carries at once; past it a new
# connection is accepted and reset, a new client's datagram dropped, counted `forward_limit`.
# The target guest's own caps (netstack.nat.limits) apply as well: forwarded flows are its.
MAX_FORWARD_FLOWS = 256
# The ports the gateway opens forwarded flows from toward the guest (Linux's default
# ip_local_port_range), picked so that no two flows share a FlowKey.
FORWARD_PORTS = range(32768, 61000)

# PROTO : [BIND :] HOSTPORT : GUEST : GUEST_PORT, an address bracketed when it is IPv6.
_ADDRESS = r"(\[[^\]]*\]|[^:\[\]]+)"
_SPEC = re.compile(rf"^([a-z]+):(?:{_ADDRESS}:)?(\d+):{_ADDRESS}:(\d+)$")


@dataclass(frozen=True)
class ForwardSpec:
    protocol: str  # "tcp" or "udp"
    bind: IpAddress | None  # None: every address of the guest address's family
    host_port: int
    guest: IpAddress
    guest_port: int

    def __str__(self) -> str:
        bind = f"{_bracketed(self.bind)}:" if self.bind is not None else ""
        return (f"{self.protocol}:{bind}{self.host_port}:{_bracketed(self.guest)}:"
                f"{self.guest_port}")


def _bracketed(address: IpAddress) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def _address(text: str, what: str) -> IpAddress:
    try:
        address = ipaddress.ip_address(text[1:-1] if text.startswith("[") else text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IP address") from None
    if text.startswith("[") != (address.version == 6):
        raise ValueError(f"{what} {text!r}: write IPv6 addresses in brackets, IPv4 without")
    return address


def _port(text: str, what: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{what} {port} is not a port (1-65535)")
    return port


def parse_forward(text: str, names: dict[str, IpAddress] | None = None) -> ForwardSpec:
    """The spec `text` names; `names` maps names (a lab's members) to addresses usable as
    GUEST_ADDR.  ValueError says what is wrong, in words an operator can act on."""
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(f"{text!r}: want PROTO:[BIND_ADDR:]HOSTPORT:GUEST_ADDR:GUEST_PORT, "
                         f"e.g. tcp:8022:10.77.0.10:22")
    protocol, bind_text, host_port, guest_text, guest_port = match.groups()
    if protocol not in PROTOCOLS:
        raise ValueError(f"{text!r}: protocol {protocol!r}: want tcp or udp")
    if names is not None and guest_text in names:
        guest = names[guest_text]
    else:
        guest = _address(guest_text, "guest address")
    bind = _address(bind_text, "bind address") if bind_text is not None else None
    if bind is not None and bind.version != guest.version:
        raise ValueError(f"{text!r}: the bind address and the guest address are of different "
                         f"families (the NAT does not translate between IPv4 and IPv6)")
    if guest.is_multicast or guest.is_unspecified or guest.is_loopback:
        raise ValueError(f"{text!r}: guest address {guest} is not a guest's unicast address")
    return ForwardSpec(protocol, bind, _port(host_port, "host port"), guest,
                       _port(guest_port, "guest port"))


def gateway_address(gateway_ips: Iterable[bytes], length: int) -> bytes | None:
    """The gateway's address of the family whose packed addresses are `length` bytes long
    (the lowest when it has several); None when it has none of that family."""
    return min((ip for ip in gateway_ips if len(ip) == length), default=None)


def free_port(in_use: Callable[[int], bool]) -> int | None:
    """A port of FORWARD_PORTS for which `in_use` is False, starting at a random one (as a
    host picks its ephemeral ports); None when every one is in use."""
    start = secrets.randbelow(len(FORWARD_PORTS))
    for n in range(len(FORWARD_PORTS)):
        port = FORWARD_PORTS[(start + n) % len(FORWARD_PORTS)]
        if not in_use(port):
            return port
    return None
