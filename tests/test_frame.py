"""The frame type's helpers: stable MACs and MAC text."""

import pytest

from netstack.frame import QEMU_OUI, format_mac, parse_mac, stable_mac


def test_stable_mac_is_unicast_locally_administered_and_stable():
    mac = stable_mac("alice")
    assert mac == stable_mac("alice") != stable_mac("bob")
    assert mac[0] & 0x03 == 0x02


@pytest.mark.parametrize(("seed", "oui", "expected"), [
    # The values the four former copies gave: a restarted host keeps its MAC across upgrades.
    ("alice", None, "2a:d8:06:c9:7f:0e"),
    ("/run/a.sock", QEMU_OUI, "52:54:00:93:d3:f0"),
    ("lab/g1", QEMU_OUI, "52:54:00:4d:53:82"),
    ("10.0.0.0/24", b"\x02\x76\x76", "02:76:76:a3:4d:80"),
])
def test_stable_mac_keeps_the_values_it_always_had(seed, oui, expected):
    assert format_mac(stable_mac(seed, oui)) == expected


def test_stable_mac_refuses_an_oui_that_is_not_three_bytes():
    with pytest.raises(ValueError, match="three bytes"):
        stable_mac("x", b"\x02\x00")


def test_parse_mac_round_trips_and_names_bad_input():
    assert parse_mac(format_mac(b"\x02\x00\x00\x00\x00\x01")) == b"\x02\x00\x00\x00\x00\x01"
    with pytest.raises(ValueError, match="02:00"):
        parse_mac("02:00")
