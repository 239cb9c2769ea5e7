"""A lab's [hub] nat and forward keys: a member's name stands for its fixed address, the
hub is started with --nat and --forward, `lab up` says how to reach each forward, and bad
values are refused naming [hub] and the key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tunnel.lab import LabError
from tunnel.lab.schema import parse_lab
from tunnel.lab.up import forward_lines, hub_flags

HUB = '[hub]\nsubnet = "10.77.0.0/24"\nipv6_prefix = "fd77::/64"\n'
MEMBERS = ('[[guest]]\nname = "vm1"\naddress = "10.77.0.10"\n[[guest]]\nname = "vm2"\n'
           '[[host]]\nname = "h1"\naddress = ["fd77::50/64", "10.77.0.50/24"]\n')


def lab(hub_keys: str):
    return parse_lab(HUB + hub_keys + MEMBERS, "lab.toml")


def test_forwards_name_members_and_reach_the_hub_as_flags():
    spec = lab('nat = true\nforward = ["tcp:2222:vm1:22", "udp:127.0.0.1:5353:h1:53", '
               '"tcp:8080:10.77.0.99:80", "tcp:[::1]:8022:[fd77::50]:22"]\n')
    assert spec.hub.nat
    assert [str(f) for f in spec.hub.forwards] == [
        "tcp:2222:10.77.0.10:22", "udp:127.0.0.1:5353:10.77.0.50:53",
        "tcp:8080:10.77.0.99:80", "tcp:[::1]:8022:[fd77::50]:22"]
    flags = hub_flags(spec.hub, Path("/run/x"), "info")
    assert "--nat" in flags
    assert [v for f, v in itertools.pairwise(flags) if f == "--forward"] == [
        "tcp:2222:10.77.0.10:22", "udp:127.0.0.1:5353:10.77.0.50:53",
        "tcp:8080:10.77.0.99:80", "tcp:[::1]:8022:[fd77::50]:22"]
    from tunnel.cli.main import parse_args

    args = parse_args(["hub", *flags])
    assert args.nat and args.forward == list(spec.hub.forwards)
    assert forward_lines(spec, "vvlab-abc-hub") == [
        "  forward vm1:22 <- tcp 127.0.0.1:2222 in the hub's namespace "
        "(ip netns exec vvlab-abc-hub ...)",
        "  forward h1:53 <- udp 127.0.0.1:5353 in the hub's namespace "
        "(ip netns exec vvlab-abc-hub ...)",
        "  forward 10.77.0.99:80 <- tcp 127.0.0.1:8080 in the hub's namespace "
        "(ip netns exec vvlab-abc-hub ...)",
        "  forward [fd77::50]:22 <- tcp [::1]:8022 in the hub's namespace "
        "(ip netns exec vvlab-abc-hub ...)"]


def test_without_nat_the_hub_has_no_nat_flags():
    spec = lab("")
    assert not spec.hub.nat and spec.hub.forwards == ()
    flags = hub_flags(spec.hub, Path("/run/x"), "info")
    assert "--nat" not in flags and "--forward" not in flags
    assert forward_lines(spec, "ns") == []
    assert lab("nat = true\n").hub.nat and lab("nat = true\n").hub.forwards == ()


@pytest.mark.parametrize(("keys", "message"), [
    ('nat = "yes"\n', "[hub]: nat must be true or false, got 'yes'"),
    ('forward = ["tcp:2222:vm1:22"]\n',
     "[hub]: forward needs nat = true (forwards go through the NAT)"),
    ('nat = true\nforward = "tcp:2222:vm1:22"\n', "[hub]: forward must be an array"),
    ('nat = true\nforward = [22]\n', "[hub]: forward 22: want a string like"),
    ('nat = true\nforward = ["tcp:2222:vm2:22"]\n',
     "[hub]: forward 'tcp:2222:vm2:22': member 'vm2' has no fixed address to forward to"),
    ('nat = true\nforward = ["tcp:2222:vm9:22"]\n',
     "[hub]: forward guest address 'vm9' is not an IP address"),
    ('nat = true\nforward = ["tcp:2222:10.78.0.5:22"]\n',
     "[hub]: forward 'tcp:2222:10.78.0.5:22': 10.78.0.5 is not in the hub's subnet "
     "10.77.0.0/24"),
    ('nat = true\nforward = ["tcp:2222:[fd78::5]:22"]\n', "is not in the hub's ipv6_prefix"),
    ('nat = true\nforward = ["tcp:2222:vm1:22", "tcp:2222:h1:22"]\n',
     "[hub]: forward 'tcp:2222:h1:22': tcp port 2222 is forwarded twice"),
    ('nat = true\nforward = ["icmp:2222:vm1:22"]\n', "protocol 'icmp': want tcp or udp"),
])
def test_bad_nat_keys_are_refused_naming_the_hub_table(keys, message):
    with pytest.raises(LabError) as info:
        lab(keys)
    assert message in str(info.value)
