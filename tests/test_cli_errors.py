"""What a user sees when `vhostvpn` cannot do what it was asked, from the real command: exit
status 1 (2 for a flag argparse refuses), ONE line on stderr that names the flag and the
cause, no traceback; where the conflict is with a live process, that process still serves.

Start-up OS errors (a port in use, an address the machine lacks, a privileged port, an
existing non-TAP interface, a busy TAP) come from the kernel at run time; the others are
flags that were unclear or silently wrong, and `--config` files with a bad value."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.hub import free_tcp_port
from tests.support.processes import stop
from tunnel.control import query
from tunnel.keys import keygen

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 15.0


def vhostvpn(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "tunnel.cli", *args],
                          capture_output=True, text=True, timeout=60,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})


def one_line(result: subprocess.CompletedProcess, status: int = 1) -> str:
    """The single stderr line of a refused command (asserting it is one, with `status`)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, result.stderr
    return lines[0]


@pytest.fixture
def hub_files(tmp_path: Path) -> list[str]:
    """The flags of a hub with a key and a peers file, less --listen."""
    keygen(tmp_path / "hub")
    (tmp_path / "peers").write_text(f"alice {keygen(tmp_path / 'alice')}\n")
    return ["--identity", str(tmp_path / "hub"), "--peers", str(tmp_path / "peers"),
            "--log-level", "warning"]


def start(argv: list[str], control: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "tunnel.cli", *argv, "--control",
                                str(control)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True,
                               env=os.environ | {"PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            query(str(control))
            return process
        except OSError:
            assert process.poll() is None, f"{argv} exited early"
            assert time.monotonic() < deadline, f"{argv} did not start"
            time.sleep(0.05)


def accepts_tcp(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# -- the tunnel's port ------------------------------------------------------------------------

def test_a_port_in_use_by_a_live_hub_is_one_line_and_the_live_hub_still_serves(
        tmp_path, hub_files):
    port = free_tcp_port()
    first = start(["hub", "--listen", f"127.0.0.1:{port}", *hub_files], tmp_path / "one.ctl")
    try:
        second = vhostvpn("hub", "--listen", f"127.0.0.1:{port}", *hub_files, "--control",
                          str(tmp_path / "two.ctl"))
        line = one_line(second)
        assert line.startswith(f"vhostvpn hub: --listen 127.0.0.1:{port}: port {port} is "
                               f"already in use by another process")
        assert first.poll() is None
        assert query(str(tmp_path / "one.ctl"))["tunnel"]["listen"] == [f"127.0.0.1:{port}"]
        assert accepts_tcp(port)
        assert not (tmp_path / "two.ctl").exists()
    finally:
        stop(first)


def test_an_address_the_machine_lacks_is_one_line(hub_files):
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): no machine has it
    line = one_line(vhostvpn("hub", "--listen", "192.0.2.77:7777", *hub_files))
    assert line.startswith("vhostvpn hub: --listen 192.0.2.77:7777: this machine has no "
                           "address 192.0.2.77")


def privileged_port_prefix() -> tuple[str, ...]:
    """How to run without the right to bind ports below 1024: root drops the capability
    from its bounding set (the venv's interpreter may be out of reach of `nobody`)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop CAP_NET_BIND_SERVICE")
    return ("setpriv", "--bounding-set=-net_bind_service")


def test_a_privileged_port_without_the_right_to_bind_it_is_one_line(hub_files):
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 1:
        pytest.skip("every port is unprivileged on this machine")
    result = vhostvpn("hub", "--listen", "127.0.0.1:1", *hub_files,
                      prefix=privileged_port_prefix())
    assert one_line(result) == (
        "vhostvpn hub: --listen 127.0.0.1:1: ports below 1024 need root or "
        "CAP_NET_BIND_SERVICE (choose a port such as 7777, or grant the capability)")


def nice_of_every_thread(pid: int) -> set[int]:
    """The nice values of a process's threads (/proc/PID/task/TID/stat, field 19)."""
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        values.add(int(stat.rpartition(")")[2].split()[16]))
    return values


def test_nice_sets_the_priority_of_every_thread_of_the_daemon(tmp_path, hub_files):
    port = free_tcp_port()
    hub = start(["hub", "--listen", f"127.0.0.1:{port}", "--nice", "7", *hub_files],
                tmp_path / "hub.ctl")
    try:
        threads = list(Path(f"/proc/{hub.pid}/task").iterdir())
        assert len(threads) > 1  # Trio's I/O thread is there too, and inherited it
        assert nice_of_every_thread(hub.pid) == {7}
        assert accepts_tcp(port)
    finally:
        stop(hub)


def test_a_nice_value_this_user_may_not_take_is_one_line(tmp_path, hub_files):
    prefix = (("setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice")
              if os.geteuid() == 0 else ())
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop CAP_SYS_NICE")
    result = vhostvpn("hub", "--listen", f"127.0.0.1:{free_tcp_port()}", "--nice", "-5",
                      *hub_files, "--control", str(tmp_path / "hub.ctl"), prefix=prefix)
    assert one_line(result) == (
        "vhostvpn hub: --nice -5: not permitted below the current value (0) without root or "
        "CAP_SYS_NICE (under systemd, set Nice= in the unit instead)")
    assert not (tmp_path / "hub.ctl").exists()


# -- files and flags ----------------------------------------------------------------------------

def test_a_peers_folder_instead_of_a_file_is_named(tmp_path, hub_files):
    hub_files[hub_files.index("--peers") + 1] = str(tmp_path)
    line = one_line(vhostvpn("hub", "--listen", "127.0.0.1:7777", *hub_files))
    assert line == (f"vhostvpn hub: --peers: peers file {tmp_path} is not a regular file "
                    f"(want a file of `name fingerprint` lines)")


def test_fingerprint_takes_the_key_file_and_explains_other_files(tmp_path):
    fingerprint = keygen(tmp_path / "id")
    assert vhostvpn("fingerprint", str(tmp_path / "id" / "key.pem")).stdout.strip() == \
        fingerprint
    assert vhostvpn("fingerprint", str(tmp_path / "id" / "cert.pem")).stdout.strip() == \
        fingerprint
    (tmp_path / "notes.txt").write_text("x")
    line = one_line(vhostvpn("fingerprint", str(tmp_path / "notes.txt")))
    assert "give the identity folder `vhostvpn keygen DIR` made" in line


HUB = ["hub", "--socket", "/tmp/wipcli-never.sock"]


@pytest.mark.parametrize(("args", "status", "message"), [
    ([*HUB, "--subnet", "10.77.0.5/24"], 2,
     "argument --subnet: 10.77.0.5/24 has host bits set: the subnet is 10.77.0.0/24"),
    ([*HUB, "--subnet", "10.77.0.0/24", "--dhcp-range", "10.78.0.1-10.78.0.5"], 1,
     "vhostvpn hub: --dhcp-range 10.78.0.1-10.78.0.5 is not a range of hosts of 10.77.0.0/24 "
     "(--subnet)"),
    ([*HUB, "--subnet", "10.77.0.0/24", "--dns", "fd77::53"], 1,
     "vhostvpn hub: --dns fd77::53: IPv6 DNS servers are announced in router advertisements, "
     "which need --ipv6-prefix"),
    ([*HUB, "--subnet", "10.77.0.0/24", "--no-dhcp", "--dns", "10.77.0.53"], 1,
     "--dns 10.77.0.53: IPv4 DNS servers are handed out by DHCP"),
    ([*HUB, "--subnet", "10.77.0.0/24", "--dhcp-reserve", "01:00:5e:00:00:01=10.77.0.9"], 1,
     "a multicast MAC is no NIC's address"),
    (["hub", "--socket", "/tmp/a,b.sock"], 1,
     "vhostvpn hub: --socket /tmp/a,b.sock: a comma in the path breaks QEMU's -chardev"),
    (["vm", "--client-socket", "/tmp/a,b.sock", "--hub", "h:1", "--identity", "/x",
      "--hub-fingerprint", "SHA256:" + "A" * 43], 1, "--client-socket /tmp/a,b.sock: a comma"),
    (["host", "--tap", "vv0", "--address", "10.77.0.300/24"], 2,
     "argument --address: '10.77.0.300/24': Octet 300 (> 255) not permitted"),
    (["host", "--tap", "vv0", "--address", "10.77.0.3"], 2,
     "argument --address: 10.77.0.3: give the prefix length too, e.g. 10.77.0.3/24"),
    (["host", "--tun", "vv0", "--address", "fd77::3"], 2,
     "give the prefix length too, e.g. fd77::3/64"),
    (["qemu-args", "--socket", "/tmp/a.sock", "--mac", "01:00:5e:00:00:01"], 1,
     "--mac: 01:00:5e:00:00:01 is a multicast address"),
    (["qemu-args", "--socket", "/tmp/a.sock", "--mac", "00:00:00:00:00:00"], 1,
     "is the zero address"),
    (["qemu-args", "--socket", "/tmp/a.sock", "--queues", "8"], 1,
     "--queues 8: the hub or `vhostvpn vm` serving the socket offers 4 queue pairs"),
    (["qemu-args", "--socket", "/tmp/a,b.sock"], 1, "a comma in the path"),
    (["qemu-args", "--socket", "/tmp/a.sock", "--mem", "lots"], 2,
     "argument --mem: 'lots': want a size as QEMU's -m takes it"),
    (["status", "--control", "/nonexistent/x.ctl"], 1, "cannot reach /nonexistent/x.ctl"),
    (["hub", "--nice", "20"], 2, "argument --nice: 20: want -20 to 19"),
    (["host", "--tap", "vv0", "--nice", "-21"], 2, "argument --nice: -21: want -20 to 19"),
    (["vm", "--nice", "high"], 2, "argument --nice: 'high' is not a whole number"),
])
def test_unclear_or_silently_wrong_flags_are_refused_in_one_line(args, status, message):
    assert message in one_line(vhostvpn(*args), status)


def test_qemu_args_mem_is_mib_like_qemus_m():
    out = vhostvpn("qemu-args", "--socket", "/tmp/a.sock", "--mem", "1024").stdout
    assert "memory-backend-memfd,id=net0-mem,size=1024M,share=on" in out.split()
    out = vhostvpn("qemu-args", "--socket", "/tmp/a.sock", "--mem", "2g").stdout
    assert "size=2G" in out


def test_qemu_args_queues_up_to_what_the_backend_offers():
    result = vhostvpn("qemu-args", "--socket", "/tmp/a.sock", "--queues", "8",
                      "--backend-queues", "8")
    assert result.returncode == 0 and "queues=8" in result.stdout


def test_version_is_the_projects():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = vhostvpn("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"vhostvpn {version}"


# -- --config -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ('no-port-policy = "yes"\n', "no-port-policy = 'yes': want true or false"),
    ('subnet = "10.77.0.5/24"\n', "subnet = '10.77.0.5/24': 10.77.0.5/24 has host bits set"),
    ('log-level = "loud"\n', "log-level = 'loud': want one of debug, info, warning, error"),
    ("queues = [1, [2]]\n", "queues = [2]: want a string or a number"),
    ("socket = 1.5e3\n[x]\n", "unknown setting 'x'"),
    ("subnet = \n", "not valid TOML"),
])
def test_a_bad_config_value_names_the_file_and_the_key(tmp_path, text, message):
    config = tmp_path / "hub.toml"
    config.write_text(text)
    line = one_line(vhostvpn("hub", "--config", str(config)), 2)
    assert line.startswith(f"vhostvpn hub: --config {config}: ")
    assert message in line



def test_a_config_file_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    config = tmp_path / "hub.toml"
    config.write_bytes(b'name = "\xff\xfe"\n')
    line = one_line(vhostvpn("hub", "--config", str(config)), 2)
    assert line.startswith(f"vhostvpn hub: --config {config}: not valid TOML: ")

def test_config_sets_tap_and_paths_relative_to_its_folder(tmp_path, monkeypatch):
    from tunnel.cli.main import parse_args

    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "host.toml"
    config.write_text('tap = "vv0"\nidentity = "keys/me"\ncontrol = "/run/x.ctl"\n'
                      'address = ["10.77.0.9/24"]\nhub = "hub.example:7777"\n')
    monkeypatch.chdir("/")
    args = parse_args(["host", "--config", str(config)])
    assert args.tap == "vv0" and args.tun is None
    assert args.identity == tmp_path / "etc" / "keys" / "me"
    assert args.control == "/run/x.ctl"
    assert args.hub == ("hub.example", 7777)
    # the command line's choice of device replaces the file's
    args = parse_args(["host", "--config", str(config), "--tun", "vv1"])
    assert args.tun == "vv1" and args.tap is None


def test_config_file_relative_to_the_working_directory_resolves_from_its_folder(
        tmp_path, monkeypatch):
    from tunnel.cli.main import parse_args

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "vm.toml").write_text('socket = ["vm1.sock"]\n')
    monkeypatch.chdir(tmp_path)
    args = parse_args(["vm", "--config", "etc/vm.toml", "--socket", "vm2.sock"])
    assert args.socket == [str(tmp_path / "etc" / "vm1.sock"), "vm2.sock"]


# -- TAP and TUN devices (root, in a network namespace of this test's own) ---------------------

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2")


@pytest.fixture
def netns():
    name = f"wipcli{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer",
                        "name", "eth1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def host_flags(tmp_path: Path) -> list[str]:
    hub_fp = keygen(tmp_path / "hub")
    keygen(tmp_path / "me")
    return ["--hub", "127.0.0.1:1", "--identity", str(tmp_path / "me"), "--hub-fingerprint",
            hub_fp, "--log-level", "error"]


@needs_netns
@pytest.mark.parametrize("mode", ["tap", "tun"])
def test_an_existing_interface_that_is_not_a_tap_is_one_line(tmp_path, netns, mode):
    result = vhostvpn("host", f"--{mode}", "eth0", *host_flags(tmp_path),
                      prefix=("ip", "netns", "exec", netns))
    assert one_line(result) == (
        f"vhostvpn host: --{mode} eth0: a network interface named eth0 exists and is not a "
        f"{mode.upper()} device vhostvpn can attach to: choose a name no interface has")


@needs_netns
def test_a_busy_tap_is_one_line_and_its_owner_still_serves(tmp_path, netns):
    flags = host_flags(tmp_path)
    first = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "tunnel.cli", "host", "--tap",
         "vv0", *flags, "--control", str(tmp_path / "one.ctl")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + START_SECONDS
        while not (tmp_path / "one.ctl").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        result = vhostvpn("host", "--tap", "vv0", *flags, "--control",
                          str(tmp_path / "two.ctl"), prefix=("ip", "netns", "exec", netns))
        assert one_line(result) == (
            "vhostvpn host: --tap vv0: TAP device vv0 is in use by another process (another "
            "`vhostvpn host`?): stop it, or choose another name")
        result = vhostvpn("host", "--tun", "vv0", *flags, "--control",
                          str(tmp_path / "two.ctl"), prefix=("ip", "netns", "exec", netns))
        assert "--tun vv0: a network interface named vv0 exists and is not a TUN" in \
            one_line(result)
        assert first.poll() is None
        state = query(str(tmp_path / "one.ctl"))
        tap = next(p for p in state["ports"] if p["name"] == "vv0")
        assert tap["kernel"]["admin_up"] and tap["kernel"]["carrier"]
    finally:
        stop(first)
