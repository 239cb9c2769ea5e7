"""`--forward` specs: what parses, what each refusal says."""

import ipaddress

import pytest

from netstack.nat.forward import ForwardSpec, parse_forward


def test_forward_spec_without_bind_address_listens_everywhere():
    spec = parse_forward("tcp:8022:10.77.0.10:22")
    assert spec == ForwardSpec("tcp", None, 8022, ipaddress.ip_address("10.77.0.10"), 22)
    assert str(spec) == "tcp:8022:10.77.0.10:22"


def test_forward_spec_with_bind_address_and_ipv6_in_brackets():
    spec = parse_forward("udp:[::1]:5353:[fd00::10]:53")
    assert spec.bind == ipaddress.ip_address("::1")
    assert spec.guest == ipaddress.ip_address("fd00::10")
    assert (spec.protocol, spec.host_port, spec.guest_port) == ("udp", 5353, 53)
    assert parse_forward(str(spec)) == spec


def test_forward_spec_guest_may_be_a_member_name():
    names = {"vm1": ipaddress.ip_address("10.77.0.10")}
    assert parse_forward("tcp:2222:vm1:22", names).guest == names["vm1"]


@pytest.mark.parametrize("text, says", [
    ("tcp:8022:10.77.0.10", "want PROTO"),
    ("sctp:8022:10.77.0.10:22", "want tcp or udp"),
    ("tcp:0:10.77.0.10:22", "not a port"),
    ("tcp:8022:10.77.0.10:70000", "not a port"),
    ("tcp:8022:vm9:22", "not an IP address"),
    ("tcp:8022:fd00::10:22", "want PROTO"),
    ("tcp:8022:[10.0.0.1]:22", "in brackets"),
    ("tcp:127.0.0.1:8022:[fd00::10]:22", "different families"),
    ("tcp:8022:224.0.0.1:22", "unicast"),
    ("tcp:8022:127.0.0.1:22", "unicast"),
])
def test_bad_forward_specs_say_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        parse_forward(text)
