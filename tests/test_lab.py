"""`vhostvpn lab`: the lab file parser refuses bad input with a message naming the table and
key (fast), and the example lab comes up, its members ping each other through `lab run`, and
`lab down` leaves no namespace, link, process or state behind (slow: boots two guests)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunnel.lab import LabError
from tunnel.lab.boot import ipv6_addresses
from tunnel.lab.schema import parse_lab
from tunnel.lab.up import guest_flags, host_flags, hub_flags

ROOT = Path(__file__).resolve().parent.parent
LABS = ROOT / "qemu" / "labs"
EXAMPLE = LABS / "guests-tap-tun.toml"

GOOD = """
[hub]
subnet = "10.77.0.0/24"
ipv6_prefix = "fd77::/64"
[[guest]]
name = "vm"
count = 2
memory = "256M"
qemu_args = ["-rtc", "base=utc"]
command = "iperf3 -s -D"
[[guest]]
name = "solo"
[[host]]
name = "h1"
mode = "tap"
address = ["10.77.0.50/24", "fd77::50/64"]
[[host]]
name = "t1"
mode = "tun"
dhcp = true
"""


def test_a_good_lab_file_expands_counts_and_keeps_settings():
    spec = parse_lab(GOOD, "x/my-lab.toml")
    assert [g.name for g in spec.guests] == ["vm1", "vm2", "solo"]
    assert spec.guests[0].qemu_args == ("-rtc", "base=utc")
    assert spec.guests[0].command == "iperf3 -s -D" and spec.guests[2].command is None
    assert [(h.name, h.mode, h.dhcp) for h in spec.hosts] == [("h1", "tap", False),
                                                                ("t1", "tun", True)]
    assert spec.hosts[0].addresses == ("10.77.0.50/24", "fd77::50/64")
    assert str(spec.hub.subnet) == "10.77.0.0/24" and str(spec.hub.ipv6_prefix) == "fd77::/64"
    assert spec.state_dir.name.startswith("my-lab-")


def test_hub_settings_default_to_what_vhostvpn_hub_defaults_to(tmp_path):
    spec = parse_lab(HUB + '[[guest]]\nname = "a"\n', "lab.toml")
    hub = spec.hub
    assert (str(hub.gateway), hub.ipv6_prefix, hub.dhcp, hub.mtu, hub.dns, hub.pcap,
            hub.port_policy, hub.log_level, hub.direct) == ("10.77.0.1", None, True, 1500, (),
                                                            None, True, None, False)
    flags = hub_flags(hub, tmp_path, "info")
    assert flags[flags.index("--gateway") + 1] == "10.77.0.1"
    assert flags[flags.index("--mtu") + 1] == "1500"
    assert flags[flags.index("--log-level") + 1] == "info"
    assert flags[flags.index("--control") + 1] == str(tmp_path / "hub.control")
    for absent in ("--ipv6-prefix", "--no-dhcp", "--dns", "--pcap", "--no-port-policy",
                   "--dhcp-range", "--lease-time", "--domain"):
        assert absent not in flags


def test_guest_addresses_become_dhcp_reservations_for_their_macs(tmp_path):
    spec = parse_lab(HUB + '[[guest]]\nname = "vm"\ncount = 2\n'
                     'address = ["10.77.0.10", "10.77.0.11"]\n[[guest]]\nname = "free"\n',
                     tmp_path / "lab.toml")
    assert [str(g.address) if g.address else None for g in spec.guests] == [
        "10.77.0.10", "10.77.0.11", None]
    flags = hub_flags(spec.hub, tmp_path, "info", spec.reservations)
    reserved = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--dhcp-reserve"]
    assert len(reserved) == 2 and [r.split("=")[1] for r in reserved] == ["10.77.0.10",
                                                                          "10.77.0.11"]
    from tunnel.cli.main import parse_args

    args = parse_args(["hub", *flags])
    assert sorted(str(ip) for _, ip in args.dhcp_reserve) == ["10.77.0.10", "10.77.0.11"]


HUB_SETTINGS = """
[hub]
subnet = "10.77.0.0/24"
gateway = "10.77.0.254"
ipv6_prefix = "fd77::/64"
dhcp = true
mtu = 1400
dns = ["10.77.0.53", "fd77::53"]
dhcp_range = "10.77.0.100-10.77.0.199"
lease_time = 600
domain = "lab.example"
pcap = "captures"
port_policy = false
log_level = "debug"
[[host]]
name = "h1"
address = ["10.77.0.1/24", "fd77::1/64"]
[[host]]
name = "t1"
mode = "tun"
dhcp = true
"""


def test_hub_settings_become_the_hubs_flags_and_the_hosts_mtu(tmp_path):
    spec = parse_lab(HUB_SETTINGS, tmp_path / "lab.toml")
    hub = spec.hub
    assert str(hub.gateway) == "10.77.0.254" and hub.mtu == 1400
    assert hub.pcap == tmp_path / "captures"  # relative to the lab file
    flags = hub_flags(hub, tmp_path / "state", "info")
    pairs = list(zip(flags, [*flags[1:], None], strict=True))
    for flag, value in [("--subnet", "10.77.0.0/24"), ("--gateway", "10.77.0.254"),
                        ("--ipv6-prefix", "fd77::/64"), ("--mtu", "1400"),
                        ("--dns", "10.77.0.53"), ("--dns", "fd77::53"),
                        ("--pcap", str(tmp_path / "captures")), ("--log-level", "debug"),
                        ("--dhcp-range", "10.77.0.100-10.77.0.199"), ("--lease-time", "600"),
                        ("--domain", "lab.example")]:
        assert (flag, value) in pairs
    assert "--no-port-policy" in flags and "--no-dhcp" not in flags
    # the hub's flags parse as `vhostvpn hub` flags
    from tunnel.cli.main import parse_args

    args = parse_args(["hub", *flags])
    assert args.mtu == 1400 and args.no_port_policy and str(args.gateway) == "10.77.0.254"
    assert [str(a) for a in args.dns] == ["10.77.0.53", "fd77::53"]
    assert [str(a) for a in args.dhcp_range] == ["10.77.0.100", "10.77.0.199"]
    assert args.lease_time == 600 and args.domain == "lab.example"
    assert host_flags(hub, spec.hosts[0]) == ["--tap", "vv0", "--mtu", "1400",
                                              "--address", "10.77.0.1/24",
                                              "--address", "fd77::1/64"]
    assert host_flags(hub, spec.hosts[1]) == ["--tun", "vv0", "--mtu", "1400", "--dhcp"]


@pytest.mark.parametrize(("port_policy", "extra"), [("true", []), ("false", ["--no-port-policy"])])
def test_port_policy_false_trusts_the_guests_at_their_endpoints_too(port_policy, extra):
    spec = parse_lab(HUB + f'port_policy = {port_policy}\n[[guest]]\nname = "a"\n', "lab.toml")
    flags = guest_flags(spec.hub, "/run/a.sock")
    assert flags == ["--socket", "/run/a.sock", "--queues", "1", *extra]
    assert ("--no-port-policy" in hub_flags(spec.hub, Path("/run/x"), "info")) == bool(extra)


def test_a_hub_without_dhcp_is_started_with_no_dhcp(tmp_path):
    spec = parse_lab(HUB + 'dhcp = false\n[[host]]\nname = "h"\naddress = "10.77.0.9/24"\n',
                     "lab.toml")
    assert "--no-dhcp" in hub_flags(spec.hub, tmp_path, "info")


IPROUTE2 = """\
5: vv0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1400 state UNKNOWN qlen 1000
    inet6 fd77::50/64 scope global tentative
       valid_lft forever preferred_lft forever
    inet6 fd77::8c1d:4ff:fe1a:9b2c/64 scope global dynamic mngtmpaddr
       valid_lft 86397sec preferred_lft 14397sec
    inet6 fd78::1/64 scope global
       valid_lft forever preferred_lft forever
"""
BUSYBOX = """\
2: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1400 qdisc pfifo_fast qlen 1000
    link/ether 52:54:00:7a:01:02 brd ff:ff:ff:ff:ff:ff
    inet6 fd77::5054:ff:fe7a:102/64 scope global dynamic flags 100
       valid_lft 86395sec preferred_lft 14395sec
    inet6 fd77::99/64 scope global dadfailed tentative
"""


def test_ipv6_addresses_are_those_in_the_prefix_with_dad_done():
    prefix = ipaddress.IPv6Network("fd77::/64")
    assert [str(a) for a in ipv6_addresses(IPROUTE2, prefix)] == [
        "fd77::8c1d:4ff:fe1a:9b2c/64"]
    assert [str(a) for a in ipv6_addresses(BUSYBOX, prefix)] == ["fd77::5054:ff:fe7a:102/64"]
    assert ipv6_addresses("", prefix) == []


@pytest.mark.parametrize(("example", "members"), [
    ("two-guests-one-host.toml", ["vm1", "vm2", "h1"]),
    ("guests-tap-tun.toml", ["vm1", "vm2", "h1", "t1"]),
])
def test_the_example_labs_parse(example, members):
    spec = parse_lab((LABS / example).read_text(), LABS / example)
    assert [m.name for m in spec.members] == members


HUB = '[hub]\nsubnet = "10.77.0.0/24"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hub\n", "not valid TOML"),
        (HUB + "[guests]\n", "unknown table 'guests'"),
        (HUB + '[[guest]]\nname = "a"\nmemroy = "1G"\n', "[[guest]] #1: unknown key 'memroy'"),
        (HUB + '[[host]]\nname = "h"\naddress = "10.77.0.5/24"\nip = 1\n',
         "[[host]] #1: unknown key 'ip'"),
        ('[hub]\nsubnet = "10.77.0.0/24"\nleases = 60\n[[guest]]\nname = "a"\n',
         "[hub]: unknown key 'leases'"),
        (HUB + 'gateway = "10.77.1.1"\n[[guest]]\nname = "a"\n',
         "[hub]: gateway 10.77.1.1 is not a host address of the subnet 10.77.0.0/24"),
        (HUB + 'gateway = "10.77.0.255"\n[[guest]]\nname = "a"\n',
         "[hub]: gateway 10.77.0.255 is not a host address"),
        (HUB + 'gateway = "gw"\n[[guest]]\nname = "a"\n', "[hub]: gateway 'gw'"),
        ('[hub]\nsubnet = "10.198.7.0/24"\ndirect = true\n[[guest]]\nname = "a"\n',
         "[hub]: direct = true puts the members' --listen addresses on 10.198.0.0/16, which "
         "the subnet 10.198.7.0/24 overlaps"),
        (HUB + 'direct = "yes"\n[[guest]]\nname = "a"\n',
         "[hub]: direct must be true or false, got 'yes'"),
        (HUB + 'gateway = 1\n[[guest]]\nname = "a"\n', "[hub]: gateway must be a string, got 1"),
        (HUB + 'gateway = "10.77.0.9"\n[[host]]\nname = "h"\naddress = "10.77.0.9/24"\n',
         "(other than the gateway 10.77.0.9)"),
        (HUB + 'mtu = 1400.0\n[[guest]]\nname = "a"\n',
         "[hub]: mtu must be an integer, got 1400.0"),
        (HUB + 'mtu = true\n[[guest]]\nname = "a"\n', "[hub]: mtu must be an integer, got True"),
        (HUB + 'mtu = 100\n[[guest]]\nname = "a"\n', "[hub]: mtu 100: want 576 to 65535"),
        (HUB + 'mtu = 70000\n[[guest]]\nname = "a"\n', "[hub]: mtu 70000: want 576 to 65535"),
        (HUB + 'dhcp = "no"\n[[guest]]\nname = "a"\n',
         "[hub]: dhcp must be true or false, got 'no'"),
        (HUB + 'dhcp_range = "10.77.0.9"\n[[guest]]\nname = "a"\n',
         "[hub]: dhcp_range '10.77.0.9': want FIRST-LAST"),
        (HUB + 'dhcp_range = "10.77.0.9-10.78.0.1"\n[[guest]]\nname = "a"\n',
         "is not a range of host addresses of 10.77.0.0/24"),
        (HUB + 'dhcp_range = "10.77.0.40-10.77.0.60"\n[[host]]\nname = "h"\n'
         'address = "10.77.0.50/24"\n', "is inside the hub's dhcp_range"),
        (HUB + 'lease_time = 10\n[[guest]]\nname = "a"\n', "[hub]: lease_time 10: want 60"),
        (HUB + '[[guest]]\nname = "vm"\ncount = 2\naddress = "10.77.0.10"\n',
         "address: 1 given for 2 guests: want one each"),
        (HUB + '[[guest]]\nname = "a"\naddress = "10.77.0.10/24"\n',
         "want an IPv4 address like \"10.77.0.10\""),
        (HUB + '[[guest]]\nname = "a"\naddress = "10.77.0.1"\n',
         "is not a host address of the hub's subnet 10.77.0.0/24 (other than the gateway"),
        (HUB + '[[guest]]\nname = "a"\naddress = "10.77.0.50"\n[[host]]\nname = "h"\n'
         'address = "10.77.0.50/24"\n', "address 10.77.0.50 is given to both 'a' and 'h'"),
        (HUB + 'dhcp = false\nlease_time = 600\n[[host]]\nname = "h"\n'
         'address = "10.77.0.50/24"\n', "[hub]: lease_time is a DHCP setting"),
        (HUB + 'dhcp = false\n[[guest]]\nname = "vm"\ncount = 2\n',
         "[hub]: dhcp = false, but 'vm1', 'vm2' lease their address by DHCP"),
        (HUB + 'dhcp = false\n[[host]]\nname = "t"\nmode = "tun"\ndhcp = true\n',
         "[hub]: dhcp = false, but 't' lease"),
        (HUB + 'dns = "dns.example"\n[[guest]]\nname = "a"\n', "[hub]: dns 'dns.example'"),
        (HUB + 'dns = [53]\n[[guest]]\nname = "a"\n', "[hub]: dns 53: want an IPv4 or IPv6"),
        (HUB + 'dns = {a = 1}\n[[guest]]\nname = "a"\n', "[hub]: dns must be a string or an array"),
        (HUB + 'dns = "fd77::53"\n[[guest]]\nname = "a"\n',
         "[hub]: dns 'fd77::53': IPv6 servers are announced in router advertisements: "
         "set ipv6_prefix"),
        (HUB + 'dhcp = false\ndns = "10.77.0.53"\n[[host]]\nname = "h"\n'
         'address = "10.77.0.9/24"\n', "[hub]: dns '10.77.0.53': IPv4 servers are handed out"),
        (HUB + 'pcap = ""\n[[guest]]\nname = "a"\n', "[hub]: pcap: want a directory"),
        (HUB + 'pcap = true\n[[guest]]\nname = "a"\n', "[hub]: pcap must be a string, got True"),
        (HUB + 'port_policy = "off"\n[[guest]]\nname = "a"\n',
         "[hub]: port_policy must be true or false"),
        (HUB + 'log_level = "loud"\n[[guest]]\nname = "a"\n',
         "[hub]: log_level 'loud': want one of debug, info, warning, error"),
        ('[hub]\nsubnet = "10.77.0.0/24"\nmtu = 1400\nmtu = 1300\n', "not valid TOML"),
        (HUB + "[[guest]]\ncount = 2\n", "[[guest]] #1: missing name"),
        (HUB + '[[host]]\nmode = "tap"\n', "[[host]] #1: missing name"),
        (HUB + '[[guest]]\nname = "Bad_Name"\n', "name 'Bad_Name'"),
        ('[[guest]]\nname = "a"\n', "[hub]: missing subnet"),
        ('[hub]\nsubnet = "10.77.0.300/24"\n[[guest]]\nname = "a"\n', "subnet '10.77.0.300/24'"),
        ('[hub]\nsubnet = "10.77.0.0/24"\nipv6_prefix = "fd77::/48"\n[[guest]]\nname = "a"\n',
         "needs a /64"),
        (HUB + '[[host]]\nname = "h"\naddress = "10.77.0.500/24"\n',
         "[[host]] 'h': address '10.77.0.500/24'"),
        (HUB + '[[host]]\nname = "h"\naddress = "10.78.0.5/24"\n',
         "not a host address of the hub's subnet"),
        (HUB + '[[host]]\nname = "h"\naddress = "10.77.0.5"\n', "give a prefix length"),
        (HUB + '[[host]]\nname = "h"\naddress = "fd77::5/64"\n', "not in the hub's ipv6_prefix"),
        (HUB + '[[host]]\nname = "h"\n', "give an IPv4 address"),
        (HUB + '[[host]]\nname = "h"\nmode = "tap"\ndhcp = true\n', "needs mode = \"tun\""),
        (HUB + '[[host]]\nname = "h"\nmode = "tep"\naddress = "10.77.0.5/24"\n', "mode 'tep'"),
        (HUB + '[[guest]]\nname = "a"\ncount = "2"\n', "count must be an integer"),
        (HUB + '[[guest]]\nname = "a"\ncount = 0\n', "count 0"),
        (HUB + '[[guest]]\nname = "a"\nmemory = "lots"\n', "memory 'lots'"),
        (HUB + '[[guest]]\nname = "a"\nqemu_args = [1]\n', "qemu_args must be a list of str"),
        (HUB + '[[guest]]\nname = "vm"\ncount = 2\n[[guest]]\nname = "vm1"\n', "used twice"),
        (HUB + '[[guest]]\nname = "hub"\n', "'hub' is reserved"),
        (HUB + '[guest]\nname = "a"\n', "write [[guest]]"),
        (HUB, "nothing to start"),
    ],
)
def test_bad_lab_files_are_refused_with_a_clear_message(text, message):
    with pytest.raises(LabError) as info:
        parse_lab(text, "lab.toml")
    assert message in str(info.value)


def test_the_cli_reports_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(HUB + "[[guest]]\ncount = 2\n")
    result = subprocess.run([sys.executable, "-m", "tunnel.cli", "lab", "up", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == "vhostvpn lab up: [[guest]] #1: missing name"


def test_status_run_and_down_need_only_the_path(tmp_path, monkeypatch):
    """What `up` recorded is all they read: a file edited into garbage (or gone) after `up`
    must not keep anyone from looking at or removing the lab."""
    monkeypatch.setenv("VV_LAB_STATE_ROOT", str(tmp_path / "state"))
    garbage = tmp_path / "edited.toml"
    garbage.write_text("this is [not toml")

    def lab(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tunnel.cli", "lab", *args],
                              capture_output=True, text=True, timeout=30)

    status = lab("status", str(garbage))
    assert status.returncode == 1 and "is not up" in status.stderr
    run = lab("run", str(garbage), "vm1", "--", "true")
    assert run.returncode == 1 and "is not up" in run.stderr
    for path in (garbage, tmp_path / "deleted.toml"):
        down = lab("down", str(path))
        assert down.returncode == 0 and "was not up" in down.stdout


# --- the example lab, up and down ---------------------------------------------------------

def lab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunnel.cli", "lab", *args],
                          capture_output=True, text=True, timeout=timeout)


def gone(pid: int) -> bool:
    """No such process, or a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line mentions `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:
                continue
            if text in cmdline and not gone(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def ping_all(lab_file: Path, member: str, targets: list[str]) -> None:
    """Ping every target once from `member` in one `lab run`; fail naming those that did not
    answer."""
    script = "; ".join(f"ping -{6 if ':' in t else 4} -c 1 -W 3 {t} >/dev/null 2>&1 || "
                       f"echo unreachable {t}" for t in targets)
    result = lab("run", str(lab_file), member, "--", "sh", "-c", script)
    assert result.returncode == 0 and "unreachable" not in result.stdout, (
        f"{member}: {result.stdout}{result.stderr}")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun")
                    or shutil.which("ip") is None or shutil.which("qemu-system-x86_64") is None,
                    reason="needs root, /dev/net/tun, iproute2 and QEMU")
def test_example_lab_guests_tap_and_dhcp_tun_host_ping_over_ipv4_and_ipv6_then_nothing_left(
        tmp_path):
    from tests.support.guest import ensure_image
    from tunnel.control import query

    ensure_image()
    lab_file = tmp_path / EXAMPLE.name
    shutil.copy(EXAMPLE, lab_file)  # its own path: its own namespaces and state directory
    spec = parse_lab(lab_file.read_text(), lab_file)
    state_dir = spec.state_dir
    prefix = f"vvlab-{spec.tag}-"
    pids: list[int] = []
    paths: list[str] = []
    try:
        up = lab("up", str(lab_file), timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "lab is up" in up.stdout and "mtu 1400" in up.stdout
        state = json.loads((state_dir / "state.json").read_text())
        members = {m["name"]: m for m in state["members"]}
        pids = [state["hub"]["pid"], *(p["pid"] for m in state["members"]
                                       for p in m["processes"].values())]
        assert len(pids) == 1 + 2 * 2 + 2  # hub, 2 x (endpoint + QEMU), two hosts' endpoints
        assert all(not gone(pid) for pid in pids)  # they outlived `lab up`
        paths = [state["hub_control"], *(m[key] for m in state["members"]
                                         for key in ("control", "socket", "console") if m[key])]
        assert all(os.path.exists(path) for path in paths)
        address = {name: m["address"].split("/")[0] for name, m in members.items()}
        assert address["h1"] == "10.77.0.50"
        # the guests' `address`: reserved for their MACs in the hub's DHCP server
        assert (address["vm1"], address["vm2"]) == ("10.77.0.10", "10.77.0.11")

        # t1 asked the hub's DHCP server for its address (it was given none)
        tun = next(p for p in query(members["t1"]["control"])["ports"] if p.get("kind") == "tun")
        assert tun["dhcp"]["state"] == "bound"
        assert tun["dhcp"]["address"].split("/")[0] == address["t1"]
        assert address["t1"].startswith("10.77.0.") and address["t1"] not in (
            "10.77.0.1", "10.77.0.50", address["vm1"], address["vm2"])
        shown = lab("run", str(lab_file), "t1", "--", "ip", "-4", "addr", "show", "dev", "vv0")
        assert shown.returncode == 0 and f"inet {address['t1']}/24" in shown.stdout

        # the hub's mtu = 1400: DHCP option 26 in the guests, the hosts' devices
        mtu = lab("run", str(lab_file), "vm2", "--", "cat", "/sys/class/net/eth0/mtu")
        assert mtu.returncode == 0 and mtu.stdout.strip() == "1400", mtu.stdout + mtu.stderr
        for host in ("h1", "t1"):
            mtu = lab("run", str(lab_file), host, "--", "cat", "/sys/class/net/vv0/mtu")
            assert mtu.stdout.strip() == "1400", host

        # IPv6: h1's static address; SLAAC from the hub's router advertisements for the rest,
        # DAD done before `lab up` returned
        ipv6 = {name: m["address6"].split("/")[0] for name, m in members.items()}
        assert ipv6["h1"] == "fd77::50"
        assert all(ipv6[name].startswith("fd77::") for name in ("vm1", "vm2", "t1"))
        assert f"{members['t1']['address6']} (SLAAC)" in up.stdout
        shown = lab("run", str(lab_file), "vm1", "--", "ip", "-6", "addr", "show", "dev", "eth0")
        assert f"inet6 {members['vm1']['address6']} " in shown.stdout
        assert ipv6["t1"] in lab("status", str(lab_file)).stdout
        # everyone pings everyone else, IPv4 and IPv6
        for member in ("vm1", "vm2", "h1", "t1"):
            ping_all(lab_file, member, [a for name in ("vm1", "vm2", "h1", "t1")
                                        if name != member
                                        for a in (address[name], ipv6[name])])

        # direct = true: each endpoint listens on the lab's LAN, every pair of members is
        # direct, and the pings above took the direct sessions (after their first frames)
        for name, member in members.items():
            assert member["listen"].startswith("10.198.0."), member
            deadline = time.monotonic() + 15
            while True:
                peers = query(member["control"])["direct"]["peers"]
                if len(peers) == 3 and all(p["path"] == "direct" for p in peers):
                    break
                assert time.monotonic() < deadline, (name, peers)
                time.sleep(0.2)
        ping_all(lab_file, "vm1", [address[name] for name in ("vm2", "h1", "t1")])
        vm1_peers = {p["name"]: p for p in query(members["vm1"]["control"])["direct"]["peers"]}
        assert all(p["out_frames"] > 0 and p["in_frames"] > 0
                   for p in vm1_peers.values()), vm1_peers
        assert "direct paths: members listen on 10.198.0.0/16" in up.stdout

        failing = lab("run", str(lab_file), "vm1", "--", "sh", "-c", "echo oops; exit 7")
        assert failing.returncode == 7 and failing.stdout.strip() == "oops"
        failing = lab("run", str(lab_file), "t1", "--", "sh", "-c", "echo tun; exit 3")
        assert failing.returncode == 3 and failing.stdout.strip() == "tun"
        status = lab("status", str(lab_file))
        assert status.returncode == 0 and address["vm1"] in status.stdout
        assert address["t1"] in status.stdout
    finally:
        lab_file.write_text("edited after up [")  # down reads only what up recorded
        down = lab("down", str(lab_file))
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(ns.startswith(prefix)
                   for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                            text=True).stdout.split())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"vh{spec.tag}" not in links and f"vm{spec.tag}" not in links
    deadline = time.monotonic() + 5
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if not gone(pid)] == []
    assert processes_naming(str(state_dir)) == []  # nor any child of theirs
    assert [path for path in paths if os.path.exists(path)] == []  # sockets
    assert not state_dir.exists()
    again = lab("down", str(lab_file))  # idempotent
    assert again.returncode == 0 and "was not up" in again.stdout
