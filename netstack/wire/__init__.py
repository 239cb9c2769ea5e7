"""Packet formats, one module each: checked views over a buffer and the builders of replies.

A view checks every length it will read once, when it is made, and raises `Malformed` with a
reason from a closed set; after that its accessors are plain reads.  Everything above the
frame (the switch's policies, the gateway, the L3 host, the NAT) parses through here.
"""

from __future__ import annotations

# IP protocol numbers (IANA; the IPv4 protocol field and the IPv6 next header alike).
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58


class Malformed(ValueError):
    """Bytes that are not the packet they claim to be; `reason` names the check that failed
    (a short snake_case word, counted by the caller as a drop reason)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
