"""The limits and value syntax of a hub's settings, said once for the two places that take
them: the command line (tunnel/cli/) and a lab file's [hub] table (tunnel/lab/schema.py).

The lab checks its file with these before it starts anything, so that a bad value is reported
with its table and key rather than as a `vhostvpn hub` flag the user never typed.  This module
imports neither of them (the CLI registers the lab's commands; the lab never imports the CLI).
"""

from __future__ import annotations

import argparse
import ipaddress

LOG_LEVELS = ("debug", "info", "warning", "error")
HUB_MIN_MTU = 576  # the IPv4 minimum datagram every host must accept (RFC 791)
MAX_MTU = 65535


def is_host_address(address: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network) -> bool:
    """`address` is one a host of `subnet` may have (not its network or broadcast address)."""
    return address in subnet and address not in (subnet.network_address,
                                                 subnet.broadcast_address)


def address_range(text: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """FIRST-LAST, two IPv4 addresses, FIRST <= LAST (argparse type)."""
    first, sep, last = text.partition("-")
    try:
        if not sep:
            raise ValueError
        start, end = ipaddress.IPv4Address(first.strip()), ipaddress.IPv4Address(last.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want FIRST-LAST, e.g. 10.77.0.100-10.77.0.199") from None
    if start > end:
        raise argparse.ArgumentTypeError(f"{text!r}: {start} comes after {end}")
    return start, end
