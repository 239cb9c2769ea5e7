"""Port forwards: `--forward PROTO:[BIND_ADDR:]HOSTPORT:GUEST_ADDR:GUEST_PORT`, parsed and
checked.  The hub listens on BIND_ADDR:HOSTPORT of its host and relays each connection (TCP)
or each client's datagrams (UDP) into GUEST_ADDR:GUEST_PORT through the NAT's stack
(tunnel/nat.py); the guest sees them come from the gateway's address.

IPv6 addresses are written in brackets (`tcp:[::1]:8022:[fd00::10]:22`); without
BIND_ADDR the forward listens on every address of the guest address's family.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = ("tcp", "udp")

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
