"""What the hub's DHCP server hands out (`DhcpConfig`), checked once when it is made.

The hub builds one from its flags (tunnel/hub.py; the CLI and the lab file check the lease
time against the same limits); the server (dhcp_server.py) and its lease table
(dhcp_leases.py) trust it after that.  A setting that cannot be served is a ValueError here,
never a surprise at the first DISCOVER.
"""

from __future__ import annotations

import ipaddress
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from netstack.frame import ETH_ADDR_LEN, format_mac
from netstack.wire.dhcp import INFINITE_LEASE, MIN_MTU, OPTION_MAX_LEN

MIN_LEASE_SECONDS = 60
MAX_LEASE_SECONDS = INFINITE_LEASE - 1  # "infinite" (RFC 2132 9.2) is not offered
MAX_DNS_SERVERS = OPTION_MAX_LEN // 4  # what option 6 holds
MAX_POOL_SIZE = 1 << 16  # the free set holds a number per address: keep it bounded


@dataclass(frozen=True)
class DhcpConfig:
    """What the server hands out.  Strings are accepted for addresses and converted."""

    subnet: IPv4Network
    gateway: IPv4Address  # server identifier, and the router option when `router`
    server_mac: bytes  # the source MAC of replies
    pool: tuple[IPv4Address, IPv4Address] | None = None  # default: after the gateway .. last
    lease_seconds: int = 3600
    dns: tuple[IPv4Address, ...] = ()
    mtu: int | None = None  # option 26 when set
    router: bool = True  # option 3 (the gateway as default route); off: the hub routes nothing
    domain: str | None = None
    reservations: Mapping[bytes, IPv4Address] = field(default_factory=dict)  # MAC -> address
    state_path: Path | None = None  # the lease file (dhcp_store.py); None: in memory only

    def __post_init__(self) -> None:
        subnet = ipaddress.IPv4Network(self.subnet)
        gateway = IPv4Address(self.gateway)
        set_ = object.__setattr__
        set_(self, "subnet", subnet)
        set_(self, "gateway", gateway)
        if subnet.prefixlen > 30:
            raise ValueError(f"subnet {subnet} has no room for clients (want /30 or larger)")
        if not self.is_host(gateway):
            raise ValueError(f"gateway {gateway} is not a host address of {subnet}")
        if not isinstance(self.server_mac, bytes) or len(self.server_mac) != ETH_ADDR_LEN:
            raise ValueError(f"server_mac must be 6 bytes, got {self.server_mac!r}")
        if self.pool is None:
            last = subnet.broadcast_address - 1
            first = gateway + 1 if gateway < last else subnet.network_address + 1
            if gateway >= last:
                last = gateway - 1
            set_(self, "pool", (first, last))
        else:
            first, last = IPv4Address(self.pool[0]), IPv4Address(self.pool[1])
            if not (self.is_host(first) and self.is_host(last) and first <= last):
                raise ValueError(f"pool {first}..{last} is not a range of hosts of {subnet}")
            set_(self, "pool", (first, last))
        first, last = self.pool
        if int(last) - int(first) + 1 > MAX_POOL_SIZE:
            raise ValueError(f"pool {first}..{last} is larger than {MAX_POOL_SIZE} addresses")
        if not MIN_LEASE_SECONDS <= self.lease_seconds <= MAX_LEASE_SECONDS:
            raise ValueError(
                f"lease_seconds {self.lease_seconds} outside "
                f"{MIN_LEASE_SECONDS}..{MAX_LEASE_SECONDS}"
            )
        dns = tuple(IPv4Address(a) for a in self.dns)
        if len(dns) > MAX_DNS_SERVERS:
            raise ValueError(f"{len(dns)} DNS servers, at most {MAX_DNS_SERVERS} fit in option 6")
        set_(self, "dns", dns)
        if self.mtu is not None and not MIN_MTU <= self.mtu <= 0xFFFF:
            raise ValueError(f"mtu {self.mtu} outside 68..65535 (RFC 2132 5.1)")
        if self.domain is not None:
            encoded = self.domain.encode("ascii")  # raises for non-ASCII: use IDNA yourself
            if not 0 < len(encoded) <= OPTION_MAX_LEN:
                raise ValueError(f"domain {self.domain!r} must be 1..255 bytes")
        reservations: dict[bytes, IPv4Address] = {}
        for mac, address in self.reservations.items():
            address = IPv4Address(address)
            if not isinstance(mac, bytes) or len(mac) != ETH_ADDR_LEN:
                raise ValueError(f"reservation key must be a 6-byte MAC, got {mac!r}")
            if not self.is_host(address) or address == gateway:
                raise ValueError(f"reservation {format_mac(mac)} -> {address}: not a client "
                                 f"address of {subnet}")
            if address in reservations.values():
                raise ValueError(f"address {address} reserved twice")
            reservations[mac] = address
        set_(self, "reservations", types.MappingProxyType(reservations))
        if self.state_path is not None:
            set_(self, "state_path", Path(self.state_path))

    def is_host(self, address: IPv4Address) -> bool:
        """In the subnet, and neither its network nor its broadcast address."""
        return (
            address in self.subnet
            and address != self.subnet.network_address
            and address != self.subnet.broadcast_address
        )

    def in_pool(self, address: IPv4Address) -> bool:
        assert self.pool is not None
        return self.pool[0] <= address <= self.pool[1] and address != self.gateway

