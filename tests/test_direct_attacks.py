"""Direct paths under attack (the red team's findings, each a test that failed before its
fix): an ADVERTISE that points remote peers at their own loopback through an IPv4-mapped
IPv6 address, and a listener that pushes frames at its dialer before its verdict (held in
memory, unbounded, until the PONG).  The attacks that held are in tests/test_direct_links.py,
tests/test_direct_netns.py and tests/test_hub_direct.py."""

from __future__ import annotations

import pytest

from tunnel.introducer import resolve


@pytest.mark.parametrize("sent", [
    ("::ffff:127.0.0.1", 22),  # the dialer's own 127.0.0.1:22 (Linux maps it to IPv4)
    ("::ffff:127.1.2.3", 22),
])
def test_a_remote_peer_cannot_point_its_peers_at_their_own_loopback_through_mapped_ipv6(sent):
    assert resolve((sent,), "192.0.2.1") == ()


def test_a_mapped_wildcard_is_a_wildcard_not_the_dialers_own_machine():
    # connect() to ::ffff:0.0.0.0 reaches the dialer's own machine, like 0.0.0.0
    assert resolve((("::ffff:0.0.0.0", 22),), "192.0.2.1") == (("192.0.2.1", 22),)


def test_an_ipv4_mapped_advertise_is_introduced_as_the_ipv4_address():
    assert resolve((("::ffff:198.51.100.7", 9),), "192.0.2.1") == (("198.51.100.7", 9),)

