"""What the hub tells an endpoint about a peer it may reach directly (an introduction).

The hub sends the whole current set in one INTRO record (tunnel/wire.py) whenever it changes
(the endpoint receives each peer as a wire.IntroEntry, bindings read later, as DirectPeer's);
the endpoint dials or accepts direct sessions only with the peers of the latest set, pins
their keys to `fingerprint`, and polices what they send with `macs`, `ipv4` and `ipv6` (the
bindings the hub's own port policy holds for that peer).  docs/protocol.md has the argument.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# Bounds an endpoint enforces on what the hub sends (a hub is trusted, but not its bugs).
MAX_INTRO_PEERS = 256
MAX_INTRO_ADDRESSES = 4  # direct addresses per peer
MAX_INTRO_MACS = 256  # a session's MAC limit (tunnel/listener.py SESSION_MAC_LIMIT)
MAX_INTRO_IPS = 1024  # per family


@dataclass(frozen=True, slots=True)
class DirectPeer:
    """One introduced peer: its name on the hub, its pinned key, where it accepts direct
    sessions (empty: it does not listen, it may only dial), and what it may send from."""

    name: str
    fingerprint: str  # "SHA256:..." (tunnel/keys.py format_fingerprint)
    addresses: tuple[tuple[str, int], ...]  # (host, port), IPv4 or IPv6 literals
    macs: frozenset[bytes]  # 6-byte MACs
    ipv4: frozenset[ipaddress.IPv4Address]
    ipv6: frozenset[ipaddress.IPv6Address]

    @property
    def size(self) -> int:
        """Its MACs and addresses: the work of reading them into a filter."""
        return len(self.macs) + len(self.ipv4) + len(self.ipv6)

    def bindings(self) -> tuple[frozenset[bytes], frozenset[bytes], frozenset[bytes]]:
        """Its MACs, IPv4 and IPv6 addresses, packed (as wire.IntroEntry gives them)."""
        return (self.macs, frozenset(ip.packed for ip in self.ipv4),
                frozenset(ip.packed for ip in self.ipv6))

    def decoded(self) -> DirectPeer:
        return self
