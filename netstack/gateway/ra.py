"""IPv6 router advertisements (RFC 4861 section 6, RFC 8106 for DNS): the hub tells guests
the segment's prefix (SLAAC), its MTU and, when it routes (the hub's --nat), itself as the
default router; otherwise the router lifetime is 0 (RFC 4861 4.2: not a default router) and
hosts keep their own default route while still learning the prefix.

Sans-I/O: `solicited(now)` answers a router solicitation, `tick(now)` sends the periodic
advertisements (a few quickly after start, RFC 4861 6.2.4, then every MAX_INTERVAL or so
with jitter), `next_deadline()` says when to call `tick` again.  It builds frames, never
sends them.  Router solicitations are rate limited (MIN_DELAY_BETWEEN_RAS).
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

from netstack.frame import Frame
from netstack.neighbour import ALL_NODES, icmpv6_frame, link_local_from_mac, multicast_mac6
from netstack.wire.icmpv6 import (
    OPT_SOURCE_LINK_ADDRESS,
    PREFIX_FLAG_AUTONOMOUS,
    PREFIX_FLAG_ON_LINK,
    link_address_option,
    mtu_option,
    prefix_information_option,
    rdnss_option,
    router_advertisement,
)

# RFC 4861 section 6.2.1 and 10 defaults.
MAX_INTERVAL = 600.0
MIN_INTERVAL = 200.0
INITIAL_ADVERTISEMENTS = 3
INITIAL_INTERVAL = 4.0  # a little faster than MAX_INITIAL_RTR_ADVERT_INTERVAL (16 s)
MIN_DELAY_BETWEEN_RAS = 0.5  # answering solicitations
ROUTER_LIFETIME = 1800
VALID_LIFETIME = 86400
PREFERRED_LIFETIME = 14400
CUR_HOP_LIMIT = 64
DNS_LIFETIME = 1800


class RouterAdvertiser:
    def __init__(
        self,
        mac: bytes,
        prefix: ipaddress.IPv6Network,
        mtu: int,
        dns: tuple[ipaddress.IPv6Address, ...] = (),
        rng: random.Random | None = None,
        router: bool = True,
    ) -> None:
        if prefix.prefixlen != 64:
            raise ValueError(f"SLAAC needs a /64 prefix, got {prefix}")
        self.mac = mac
        self.prefix = prefix
        self.mtu = mtu
        self.dns = dns
        self.router_lifetime = ROUTER_LIFETIME if router else 0
        self.source = link_local_from_mac(mac)
        self.rng = rng or random.Random()
        self.counters: Counter[str] = Counter()
        self._frame = self._build()
        self._sent_initial = 0
        self._next: float | None = None  # set at the first tick
        self._last_sent = float("-inf")

    def _build(self) -> bytes:
        options = link_address_option(OPT_SOURCE_LINK_ADDRESS, self.mac) + mtu_option(self.mtu)
        options += prefix_information_option(
            self.prefix.network_address.packed, 64,
            PREFIX_FLAG_ON_LINK | PREFIX_FLAG_AUTONOMOUS, VALID_LIFETIME, PREFERRED_LIFETIME)
        if self.dns:
            options += rdnss_option(DNS_LIFETIME, [address.packed for address in self.dns])
        message = router_advertisement(self.source.packed, ALL_NODES, CUR_HOP_LIMIT,
                                       self.router_lifetime, options)
        return icmpv6_frame(self.mac, multicast_mac6(ALL_NODES), self.source.packed, ALL_NODES,
                            message).data

    def advertisement(self) -> Frame:
        return Frame(self._frame)

    def solicited(self, now: float) -> list[Frame]:
        """A router solicitation arrived: answer at once, unless we just did."""
        if now - self._last_sent < MIN_DELAY_BETWEEN_RAS:
            self.counters["rs_rate_limited"] += 1
            return []
        self.counters["rs_answered"] += 1
        self._last_sent = now
        return [self.advertisement()]

    def tick(self, now: float) -> list[Frame]:
        if self._next is None:
            self._next = now
        if now < self._next:
            return []
        if self._sent_initial < INITIAL_ADVERTISEMENTS:
            self._sent_initial += 1
            self._next = now + INITIAL_INTERVAL
        else:
            self._next = now + self.rng.uniform(MIN_INTERVAL, MAX_INTERVAL)
        self._last_sent = now
        self.counters["ra_periodic"] += 1
        return [self.advertisement()]

    def next_deadline(self) -> float | None:
        return self._next
