"""`vhostvpn hub --nat` and its flags: what reaches HubConfig (from the command line and a
--config file), each refusal one line naming the flag, and TAB completion knowing them."""

from __future__ import annotations

import ipaddress

import pytest

import tunnel.cli.roles
import tunnel.hub
from netstack.nat.forward import parse_forward
from tests.test_cli_errors import one_line, vhostvpn
from tests.test_completion import complete, script  # noqa: F401 (the fixture)
from tunnel.cli.main import main

HUB = ["hub", "--socket", "/tmp/natwire-never.sock"]
V4 = ["--subnet", "10.77.0.0/24"]
V6 = ["--ipv6-prefix", "fd77::/64"]


@pytest.fixture
def hub_configs(monkeypatch) -> list:
    """The HubConfig each `main(["hub", ...])` would start a hub with (none is started)."""
    configs = []

    class Recorder:
        tunnel = None

        def __init__(self, config):
            configs.append(config)

        async def run(self):
            raise AssertionError("not started in this test")

        def status(self):
            return {}

    monkeypatch.setattr(tunnel.hub, "Hub", Recorder)
    monkeypatch.setattr(tunnel.cli.roles, "run_role", lambda *args, **kwargs: 0)
    return configs


def test_nat_flags_reach_the_hub_config(tmp_path, hub_configs):
    assert main([*HUB[:1], "--socket", str(tmp_path / "a.sock"), *V4, *V6, "--nat",
                 "--map-host-loopback", "--nat-deny", "192.168.0.0/16", "--nat-deny",
                 "fd00:1::/48", "--dns-upstream", "192.0.2.53", "--dns-upstream", "::1",
                 "--forward", "tcp:2222:10.77.0.10:22", "--forward",
                 "udp:[::1]:5353:[fd77::10]:53", "--state-dir", str(tmp_path)]) == 0
    (config,) = hub_configs
    assert config.nat and config.map_host_loopback
    assert config.nat_deny == [ipaddress.ip_network("192.168.0.0/16"),
                               ipaddress.ip_network("fd00:1::/48")]
    assert config.dns_upstreams == [ipaddress.ip_address("192.0.2.53"),
                                    ipaddress.ip_address("::1")]
    assert config.forwards == [parse_forward("tcp:2222:10.77.0.10:22"),
                               parse_forward("udp:[::1]:5353:[fd77::10]:53")]


def test_without_nat_the_hub_config_has_none_of_it(tmp_path, hub_configs):
    assert main(["hub", "--socket", str(tmp_path / "a.sock"), *V4,
                 "--state-dir", str(tmp_path)]) == 0
    (config,) = hub_configs
    assert not config.nat and not config.map_host_loopback
    assert config.nat_deny == config.dns_upstreams == config.forwards == []


def test_nat_settings_in_a_config_file(tmp_path, hub_configs):
    config_file = tmp_path / "hub.toml"
    config_file.write_text('subnet = "10.77.0.0/24"\nnat = true\nmap-host-loopback = true\n'
                           'nat-deny = ["10.0.0.0/8"]\ndns-upstream = ["192.0.2.53"]\n'
                           'forward = ["tcp:2222:10.77.0.10:22"]\n')
    assert main(["hub", "--socket", str(tmp_path / "a.sock"), "--config", str(config_file),
                 "--state-dir", str(tmp_path)]) == 0
    (config,) = hub_configs
    assert config.nat and config.map_host_loopback
    assert config.nat_deny == [ipaddress.ip_network("10.0.0.0/8")]
    assert config.forwards == [parse_forward("tcp:2222:10.77.0.10:22")]


def test_a_bad_forward_in_a_config_file_names_the_file_and_key(tmp_path):
    config_file = tmp_path / "hub.toml"
    config_file.write_text('nat = true\nforward = ["tcp:2222:10.77.0.10"]\n')
    line = one_line(vhostvpn(*HUB, "--config", str(config_file)), status=2)
    assert f"--config {config_file}: forward = 'tcp:2222:10.77.0.10': " in line
    assert "want PROTO:[BIND_ADDR:]HOSTPORT:GUEST_ADDR:GUEST_PORT" in line


@pytest.mark.parametrize(("args", "status", "message"), [
    ([*HUB, "--nat"], 1, "vhostvpn hub: --nat needs --subnet or --ipv6-prefix"),
    ([*HUB, *V4, "--map-host-loopback"], 1, "vhostvpn hub: --map-host-loopback needs --nat"),
    ([*HUB, *V4, "--nat-deny", "10.0.0.0/8"], 1, "vhostvpn hub: --nat-deny needs --nat"),
    ([*HUB, *V4, "--dns-upstream", "1.1.1.1"], 1, "vhostvpn hub: --dns-upstream needs --nat"),
    ([*HUB, *V4, "--forward", "tcp:2222:10.77.0.10:22"], 1,
     "vhostvpn hub: --forward needs --nat"),
    ([*HUB, *V4, "--nat", "--forward", "tcp:2222:10.78.0.10:22"], 1,
     "vhostvpn hub: --forward tcp:2222:10.78.0.10:22: 10.78.0.10 is not in --subnet "
     "10.77.0.0/24"),
    ([*HUB, *V4, "--nat", "--forward", "tcp:2222:[fd77::10]:22"], 1,
     "--forward tcp:2222:[fd77::10]:22: fd77::10 is not in --ipv6-prefix (none given)"),
    ([*HUB, *V4, "--nat", "--forward", "tcp:2222:10.77.0.10:22", "--forward",
      "tcp:2222:10.77.0.11:22"], 1, "--forward: the same protocol, address and host port"),
    ([*HUB, *V4, "--nat", "--forward", "sctp:2222:10.77.0.10:22"], 2,
     "argument --forward: 'sctp:2222:10.77.0.10:22': protocol 'sctp': want tcp or udp"),
    ([*HUB, *V4, "--nat", "--nat-deny", "10.0.0.1/8"], 2,
     "argument --nat-deny: '10.0.0.1/8': want a network such as 10.0.0.0/8"),
    ([*HUB, *V4, "--nat", "--dns-upstream", "resolver"], 2,
     "argument --dns-upstream: invalid ip_address value: 'resolver'"),
])
def test_bad_nat_flags_get_one_line_naming_the_flag(args, status, message):
    assert message in one_line(vhostvpn(*args), status)


def test_tab_completes_the_nat_flags(script):  # noqa: F811 (the fixture)
    assert complete(script, "vhostvpn", "hub", "--nat") == ["--nat", "--nat-deny"]
    assert complete(script, "vhostvpn", "hub", "--dns-") == ["--dns-upstream"]
    assert complete(script, "vhostvpn", "hub", "--forward", "") == []  # free text
    assert "--map-host-loopback" in complete(script, "vhostvpn", "hub", "--")


def test_status_text_shows_the_nat_and_what_each_port_holds():
    from tunnel.cli.status import format_status

    text = format_status({"role": "hub", "pid": 7, "ports": [], "nat": {
        "tcp": {"flows": 2, "states": {"ESTABLISHED": 2}, "drops": {"bad_checksum": 1},
                "resets_sent": 0},
        "udp": {"flows": 1, "drops": {}}, "echo": {"flows": 0, "drops": {}},
        "dns": {"pending": 0, "answered": 4, "upstreams": ["127.0.0.53"], "drops": {}},
        "echo_on": {"4": False, "6": False}, "drops": {"denied": 3}, "socket_errors": {},
        "refusals": {"flow_limit": 5},
        "ports": {"vm1.sock": {"flows": {"tcp": 2, "udp": 1}, "half_open": 0, "buffered": 1500,
                               "dns_pending": 1, "lingering": 0,
                               "macs": {"52:54:00:00:00:01": 3}},
                  "lan": {"flows": {"udp": 40}, "half_open": 0, "buffered": 0,
                          "dns_pending": 0, "lingering": 2,
                          "macs": {f"52:54:00:00:01:{n:02x}": 4 for n in range(10)}}},
        "forwards": [{"forward": "tcp:2222:10.77.0.10:22", "listening": True, "active": 1,
                      "counters": {"accepted": 3}}, {"forward": "udp:53:10.77.0.10:53"}]}})
    assert ("  NAT: tcp 2 flows (ESTABLISHED=2), udp 1, echo off, dns 4 answered/0 pending "
            "via 127.0.0.53") in text
    assert "    drops denied=3, tcp_bad_checksum=1" in text
    assert "    refused flow_limit=5" in text
    assert ("    vm1.sock: tcp=2, udp=1, 0 half-open, 1500 B buffered, 1 DNS pending, "
            "0 lingering, 1 MAC") in text
    assert ("    lan: udp=40, 0 half-open, 0 B buffered, 0 DNS pending, 2 lingering, "
            "10 MACs") in text
    assert "    forward tcp:2222:10.77.0.10:22: listening, 1 active, accepted=3" in text
    assert "    forward udp:53:10.77.0.10:53\n" in text + "\n"
    assert "NAT" not in format_status({"role": "hub", "pid": 7, "ports": []})
