"""What a TUN host learns from the segment's router advertisements (RFC 4861 6.3.4, RFC 4862
SLAAC, RFC 8106 DNS): the default router and its lifetime, the on-link prefixes, the
addresses it forms, the DNS servers and the MTU.  Part of netstack.host.l3host, which reads
and checks the RA (netstack.neighbour) and hands the parts here; it sends nothing.

Addresses are the modified EUI-64 of the host's MAC in each autonomous /64 (other lengths
counted `slaac_prefix_not_64`); a lifetime is never shortened below two hours by an RA (RFC
4862 5.5.3 e).  Prefixes, addresses and DNS servers are bounded (MAX_PREFIXES, MAX_DNS);
everything expires at `tick(now)`.  It reports the addresses it forms and loses; the L3 host
tells its owner.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from netstack.neighbour import Options, is_link_local6
from netstack.wire.icmpv6 import (
    OPT_MTU,
    OPT_PREFIX_INFORMATION,
    OPT_RDNSS,
    PREFIX_FLAG_AUTONOMOUS,
    PREFIX_FLAG_ON_LINK,
    PrefixInformation,
    RouterAdvertisement,
)

INFINITE_LIFETIME = 0xFFFFFFFF
SLAAC_PREFIX_LEN = 64  # RFC 4862 5.5.3 with a 64-bit interface identifier (RFC 4291)
TWO_HOURS = 7200.0  # RFC 4862 5.5.3 e
IPV6_MIN_MTU = 1280
RDNSS_MIN_LEN = 24  # one address (RFC 8106 5.1)

MAX_PREFIXES = 16  # on-link IPv6 prefixes and SLAAC addresses learned from RAs, each
MAX_DNS = 8


def _lifetime(now: float, seconds: int) -> float:
    return float("inf") if seconds == INFINITE_LIFETIME else now + seconds


class Slaac:
    """The router, prefixes, addresses, DNS servers and MTU learned from RAs."""

    def __init__(self, interface_id: bytes, counters: Counter[str], *, enabled: bool = True
                 ) -> None:
        self.interface_id = interface_id  # the low 64 bits of our addresses
        self.counters = counters
        self.enabled = enabled  # form addresses (prefixes and routers are learned anyway)
        self.mtu: int | None = None
        self.router: bytes | None = None
        self.router_until = 0.0
        self.addresses: dict[bytes, float] = {}  # address -> valid until
        self.prefixes: dict[tuple[int, int], float] = {}  # (network, prefixlen) -> until
        self.dns: dict[bytes, float] = {}

    def router_advertisement(self, src: bytes, ra: RouterAdvertisement, options: Options,
                             now: float) -> list[bytes]:
        """Learn from the checked RA `ra` from the link-local router `src`: the addresses
        formed."""
        formed: list[bytes] = []
        self.counters["ra_received"] += 1
        if ra.router_lifetime:
            self.router, self.router_until = src, now + ra.router_lifetime
        elif self.router == src:
            self.router = None
        for code, option in options:
            if code == OPT_MTU and len(option) == 8:
                mtu = int.from_bytes(option[4:8], "big")
                if mtu >= IPV6_MIN_MTU:
                    self.mtu = mtu
            elif code == OPT_PREFIX_INFORMATION:
                formed += self._prefix_information(PrefixInformation(option), now)
            elif code == OPT_RDNSS and len(option) >= RDNSS_MIN_LEN:
                seconds = int.from_bytes(option[4:8], "big")
                for at in range(8, len(option) - 15, 16):
                    server = bytes(option[at:at + 16])
                    self.dns.pop(server, None)
                    if seconds and len(self.dns) < MAX_DNS:
                        self.dns[server] = _lifetime(now, seconds)
        return formed

    def _prefix_information(self, info: PrefixInformation, now: float) -> list[bytes]:
        length, valid, preferred = info.prefix_length, info.valid_lifetime, \
            info.preferred_lifetime
        if length > 128 or is_link_local6(info.prefix) or preferred > valid:
            self.counters["ra_prefix_ignored"] += 1  # RFC 4862 5.5.3 a, c
            return []
        network = ipaddress.IPv6Network((info.prefix, length), strict=False)
        if info.flags & PREFIX_FLAG_ON_LINK:
            key = (int(network.network_address), length)
            self.prefixes.pop(key, None)
            if valid and len(self.prefixes) < MAX_PREFIXES:
                self.prefixes[key] = _lifetime(now, valid)
        if not info.flags & PREFIX_FLAG_AUTONOMOUS or not self.enabled:
            return []
        if length != SLAAC_PREFIX_LEN:
            self.counters["slaac_prefix_not_64"] += 1
            return []
        address = network.network_address.packed[:8] + self.interface_id
        until = self.addresses.get(address)
        if until is None:
            if valid == 0 or len(self.addresses) >= MAX_PREFIXES:
                return []
            self.addresses[address] = _lifetime(now, valid)
            self.counters["slaac_address"] += 1
            return [address]
        # RFC 4862 5.5.3 e: a lifetime is never shortened below two hours by an RA.
        remaining = until - now
        if valid > TWO_HOURS or _lifetime(now, valid) > until:
            self.addresses[address] = _lifetime(now, valid)
        elif remaining > TWO_HOURS:
            self.addresses[address] = now + TWO_HOURS
        return []

    def tick(self, now: float) -> list[bytes]:
        """Expire the router, prefixes, DNS servers and addresses: the addresses lost."""
        if self.router is not None and self.router_until <= now:
            self.router = None
            self.counters["router6_expired"] += 1
        for key in [k for k, until in self.prefixes.items() if until <= now]:
            del self.prefixes[key]
        for address in [a for a, until in self.dns.items() if until <= now]:
            del self.dns[address]
        lost = [a for a, until in self.addresses.items() if until <= now]
        for address in lost:
            del self.addresses[address]
            self.counters["slaac_expired"] += 1
        return lost

    def deadlines(self) -> list[float]:
        router = [self.router_until] if self.router is not None else []
        return [*router, *self.prefixes.values(), *self.addresses.values(), *self.dns.values()]
