"""A lab's [hub] nat, map_host_loopback and forward keys: a member's name stands for its fixed
address, the hub is started with --nat and --forward, `lab up` says how to reach each forward,
and bad values are refused naming [hub] and the key.  A NAT lab's hub runs in the caller's
namespace with its veths' hub ends there (netns.plan), and a lab whose 10.199.N.0/24 is in
use there is refused."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tunnel.lab import LabError, netns
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
    # the hub runs in the caller's namespace: forwards listen on this machine
    assert forward_lines(spec) == [
        "  forward vm1:22 <- tcp 0.0.0.0:2222 (ssh -p 2222 127.0.0.1)",
        "  forward h1:53 <- udp 127.0.0.1:5353 (udp 127.0.0.1:5353 on this machine)",
        "  forward 10.77.0.99:80 <- tcp 0.0.0.0:8080 (tcp 127.0.0.1:8080 on this machine)",
        "  forward [fd77::50]:22 <- tcp [::1]:8022 (ssh -p 8022 ::1)"]


def test_without_nat_the_hub_has_no_nat_flags():
    spec = lab("")
    assert not spec.hub.nat and spec.hub.forwards == ()
    flags = hub_flags(spec.hub, Path("/run/x"), "info")
    assert "--nat" not in flags and "--forward" not in flags
    assert forward_lines(spec) == []
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


# --- where the hub runs: its own namespace, or the caller's for a NAT lab --------------------

def test_a_nat_labs_hub_runs_in_the_callers_namespace_with_the_veths_hub_ends_there():
    plan = netns.plan("abc123", ["vm1", "h1"], nat=True)
    assert plan.hub_netns is None
    assert plan.namespaces == ["vvlab-abc123-vm1", "vvlab-abc123-h1"]
    assert [(v.member, v.index, v.hub_end, v.member_end) for v in plan.veths] == [
        ("vm1", 1, "vhabc12301", "vmabc12301"), ("h1", 2, "vhabc12302", "vmabc12302")]
    assert netns.join_commands(plan, plan.veths[1]) == [
        ["link", "add", "vhabc12302", "type", "veth", "peer", "name", "vmabc12302",
         "netns", "vvlab-abc123-h1"],
        ["addr", "add", "10.199.2.1/24", "dev", "vhabc12302"],
        ["-n", "vvlab-abc123-h1", "addr", "add", "10.199.2.2/24", "dev", "vmabc12302"],
        ["link", "set", "vhabc12302", "up"],
        ["-n", "vvlab-abc123-h1", "link", "set", "vmabc12302", "up"]]


def test_a_lab_without_nat_keeps_its_hub_and_the_hub_ends_in_a_namespace_of_its_own():
    plan = netns.plan("abc123", ["vm1"], nat=False)
    assert plan.hub_netns == "vvlab-abc123-hub"
    assert plan.namespaces == ["vvlab-abc123-hub", "vvlab-abc123-vm1"]
    assert netns.join_commands(plan, plan.veths[0]) == [
        ["link", "add", "vhabc12301", "netns", "vvlab-abc123-hub", "type", "veth",
         "peer", "name", "vmabc12301", "netns", "vvlab-abc123-vm1"],
        ["-n", "vvlab-abc123-hub", "addr", "add", "10.199.1.1/24", "dev", "vhabc12301"],
        ["-n", "vvlab-abc123-vm1", "addr", "add", "10.199.1.2/24", "dev", "vmabc12301"],
        ["-n", "vvlab-abc123-hub", "link", "set", "vhabc12301", "up"],
        ["-n", "vvlab-abc123-vm1", "link", "set", "vmabc12301", "up"]]
    netns.check_free(plan, [ipaddress.IPv4Network("10.199.0.0/16")])  # not the caller's


@pytest.mark.parametrize("used", ["10.199.2.0/24", "10.0.0.0/8", "10.199.2.128/25",
                                  "10.199.0.0/16"])
def test_a_nat_lab_whose_veth_network_is_in_use_in_the_callers_namespace_is_refused(used):
    plan = netns.plan("abc123", ["vm1", "h1"], nat=True)
    with pytest.raises(LabError) as info:
        netns.check_free(plan, [ipaddress.IPv4Network("192.0.2.0/24"),
                                ipaddress.IPv4Network(used)])
    message = str(info.value)
    assert "\n" not in message and used in message
    assert message.startswith("nat = true: the hub runs in this namespace and ")
    netns.check_free(plan, [ipaddress.IPv4Network("192.0.2.0/24"),
                            ipaddress.IPv4Network("10.199.3.0/24")])


def test_a_nat_labs_hub_keeps_guests_from_the_labs_veths_and_maps_loopback_when_asked():
    spec = lab("nat = true\nmap_host_loopback = true\n")
    assert spec.hub.map_host_loopback
    flags = hub_flags(spec.hub, Path("/run/x"), "info", port=40123)
    assert flags[flags.index("--listen") + 1] == "0.0.0.0:40123"
    assert flags[flags.index("--nat-deny") + 1] == "10.199.0.0/16"
    from tunnel.cli.main import parse_args

    args = parse_args(["hub", *flags])
    assert args.map_host_loopback and [str(n) for n in args.nat_deny] == ["10.199.0.0/16"]
    assert "--map-host-loopback" not in hub_flags(lab("nat = true\n").hub, Path("/x"), "info")
    with pytest.raises(LabError, match=r"^\[hub\]: map_host_loopback needs nat = true"):
        lab("map_host_loopback = true\n")


@pytest.fixture
def caller_netns():
    """A namespace of this test's own standing in for the machine's (the caller's)."""
    from tests.support.nat_netns import ip as must

    name = f"labnat{uuid.uuid4().hex[:6]}c"
    must("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="needs root and iproute2")
def test_nat_plumbing_puts_the_hub_ends_in_the_callers_namespace_and_a_second_lab_is_refused(
        caller_netns):
    """Run from `caller_netns`: the hub ends and their /24s land there, the member reaches
    10.199.N.1, a second NAT lab needing the same /24 is refused, and deleting the member
    namespaces takes the hub ends along (nothing left for delete_links)."""
    from tests.support.nat_netns import inside

    tag = uuid.uuid4().hex[:4]
    plan = netns.Plan(None, tuple(
        netns.Veth(name, index, f"labnat{tag}h{index}", f"labnat{tag}m{index}",
                   f"labnat{tag}{name}") for index, name in ((1, "a"), (2, "b"))))
    try:
        with inside(caller_netns):
            netns.check_free(plan, netns.networks_in_use())
            for veth in plan.veths:
                netns.add(veth.netns)
                netns.join(plan, veth)
            in_use = netns.networks_in_use()
            assert {ipaddress.IPv4Network("10.199.1.0/24"),
                    ipaddress.IPv4Network("10.199.2.0/24")} <= set(in_use)
            with pytest.raises(LabError, match=r"a's veth needs 10\.199\.1\.0/24"):
                netns.check_free(plan, in_use)
            links = netns.ip("-o", "-4", "addr", "show").stdout
            assert f"labnat{tag}h2    inet 10.199.2.1/24" in links
        reached = subprocess.run(["ip", "netns", "exec", plan.veths[1].netns, "ping", "-c", "1",
                                  "-W", "3", "10.199.2.1"], capture_output=True, text=True)
        assert reached.returncode == 0, reached.stdout + reached.stderr
        assert f"labnat{tag}h" not in netns.ip("-o", "link", "show").stdout  # not in ours
        netns.delete(plan.namespaces)
        with inside(caller_netns):  # the kernel deletes a namespace's veths a little later
            deadline = time.monotonic() + 10
            while (f"labnat{tag}" in netns.ip("-o", "link", "show").stdout
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            assert f"labnat{tag}" not in netns.ip("-o", "link", "show").stdout
            assert not any(n.overlaps(netns.VETH_NETWORKS) for n in netns.networks_in_use())
    finally:
        netns.delete(plan.namespaces)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="needs root and iproute2")
def test_down_deletes_a_nat_labs_hub_ends_left_in_the_callers_namespace(caller_netns):
    from tests.support.nat_netns import inside
    from tests.support.nat_netns import ip as must

    tag = "lbn" + uuid.uuid4().hex[:3]
    must("-n", caller_netns, "link", "add", f"vh{tag}01", "type", "veth", "peer", "name",
         f"labnat{tag}p")
    must("-n", caller_netns, "link", "add", f"vh{tag}x", "type", "veth", "peer", "name",
         f"labnat{tag}q")  # not a lab's hub end: no member number
    with inside(caller_netns):
        assert netns.lab_links(tag) == [f"vh{tag}01"]
        netns.delete_links(tag)
        names = netns.ip("-o", "link", "show").stdout
    assert f"vh{tag}01" not in names and f"labnat{tag}p" not in names  # the pair, at once
    assert f"vh{tag}x" in names


# --- a NAT lab, up and down (slow: boots a guest) ---------------------------------------------

def lab_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunnel.cli", "lab", *args],
                          capture_output=True, text=True, timeout=timeout)


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_once(listener: socket.socket, answer: bytes, got: list[bytes]) -> threading.Thread:
    """Accept one connection on `listener` (in a thread, bounded), send `answer`, record what
    the client sent before closing, close."""
    def run() -> None:
        listener.settimeout(240)
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(30)
                conn.sendall(answer)
                conn.shutdown(socket.SHUT_WR)
                got.append(conn.recv(4096))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


H1_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); s.settimeout(240)
print("ready", flush=True)
c, peer = s.accept(); c.settimeout(30)
c.sendall(b"h1 saw " + c.recv(100) + b" from " + peer[0].encode()); c.close()
"""


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun")
                    or shutil.which("ip") is None or shutil.which("qemu-system-x86_64") is None,
                    reason="needs root, /dev/net/tun, iproute2 and QEMU")
def test_a_nat_lab_reaches_the_machine_is_reached_by_a_forward_and_leaves_nothing(tmp_path):
    """nat = true: the hub runs in this (the caller's) namespace, so the guest reaches a server
    on this machine's 127.0.0.1 (map_host_loopback) and one on an address of this namespace
    (a veth this test makes to a namespace of its own), not the lab's veth networks
    (--nat-deny); a forward on 127.0.0.1 here reaches the TAP host's server; `lab down` leaves
    no namespace, link, address, process or listening port."""
    from tests.support.guest import ensure_image
    from tests.support.nat_netns import inside
    from tests.support.nat_netns import ip as must
    from tunnel.control import query

    ensure_image()
    tag = uuid.uuid4().hex[:4]
    outside, near, far = f"labnat{tag}o", f"labnat{tag}a", f"labnat{tag}b"
    forward_port, h1_port = free_local_port(), 8022
    lab_file = tmp_path / "nat-lab.toml"
    lab_file.write_text(
        '[hub]\nsubnet = "10.77.0.0/24"\nnat = true\nmap_host_loopback = true\n'
        f'forward = ["tcp:127.0.0.1:{forward_port}:h1:{h1_port}"]\n'
        '[[guest]]\nname = "vm1"\naddress = "10.77.0.10"\n'
        '[[host]]\nname = "h1"\nmode = "tap"\naddress = "10.77.0.50/24"\n')
    spec = parse_lab(lab_file.read_text(), lab_file)
    token_lo, token_out = uuid.uuid4().hex, uuid.uuid4().hex
    got_lo: list[bytes] = []
    got_out: list[bytes] = []
    h1_server = None
    pids: list[int] = []
    hub_port = None
    listeners: list[socket.socket] = []
    try:
        must("netns", "add", outside)
        must("link", "add", near, "type", "veth", "peer", "name", far, "netns", outside)
        must("addr", "add", "198.18.77.1/30", "dev", near)
        must("link", "set", near, "up")
        must("-n", outside, "addr", "add", "198.18.77.2/30", "dev", far)
        must("-n", outside, "link", "set", far, "up")
        loopback = socket.create_server(("127.0.0.1", 0))
        listeners.append(loopback)
        with inside(outside):
            remote = socket.create_server(("198.18.77.2", 0))
        listeners.append(remote)
        servers = [serve_once(loopback, token_lo.encode(), got_lo),
                   serve_once(remote, token_out.encode(), got_out)]

        up = lab_cli("up", str(lab_file), timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((spec.state_dir / "state.json").read_text())
        assert state["hub_netns"] == "" and state["hub"]["argv"][0] != "ip"
        hub_port = int(state["hub_listen"].rsplit(":", 1)[1])
        pids = [state["hub"]["pid"], *(p["pid"] for m in state["members"]
                                       for p in m["processes"].values())]
        assert "hub    the caller's namespace (NAT)" in up.stdout
        assert (f"forward h1:{h1_port} <- tcp 127.0.0.1:{forward_port} "
                f"(tcp 127.0.0.1:{forward_port} on this machine)") in up.stdout
        links = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True,
                               text=True).stdout
        assert f"vh{spec.tag}01    inet 10.199.1.1/24" in links  # the hub ends are here
        assert f"vh{spec.tag}02    inet 10.199.2.1/24" in links
        assert not any(ns == f"vvlab-{spec.tag}-hub" for ns in netns.netns_list())

        # the guest reaches this machine's loopback through the gateway, and an address of
        # this namespace directly
        said = lab_cli("run", str(lab_file), "vm1", "--", "sh", "-c",
                       f"echo vm1-lo | nc 10.77.0.1 {loopback.getsockname()[1]}; "
                       f"echo vm1-out | nc 198.18.77.2 {remote.getsockname()[1]}", timeout=120)
        assert said.returncode == 0, said.stdout + said.stderr
        assert token_lo in said.stdout and token_out in said.stdout
        for thread in servers:
            thread.join(30)
        assert got_lo == [b"vm1-lo\n"] and got_out == [b"vm1-out\n"]

        # not the lab's veths, where the hub's own tunnel listens
        denied = lab_cli("run", str(lab_file), "vm1", "--", "sh", "-c",
                         f"nc -w 2 10.199.1.1 {hub_port} </dev/null; echo rc=$?", timeout=60)
        assert "rc=0" not in denied.stdout, denied.stdout
        nat = query(state["hub_control"])["nat"]
        assert nat["drops"].get("denied", 0) >= 1, nat["drops"]

        # a forward on this machine's 127.0.0.1 into the TAP host h1
        h1_server = subprocess.Popen(
            ["ip", "netns", "exec", f"vvlab-{spec.tag}-h1", sys.executable, "-c", H1_SERVER,
             str(h1_port)], stdout=subprocess.PIPE, text=True)
        assert h1_server.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", forward_port), timeout=30) as client:
            client.sendall(b"hello")
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
        assert answer == b"h1 saw hello from 10.77.0.1"  # the gateway's address
        h1_server.wait(30)

        # a second NAT lab needs 10.199.1.0/24 too: refused in one line, nothing of it left
        second = tmp_path / "second.toml"
        second.write_text('[hub]\nsubnet = "10.78.0.0/24"\nnat = true\n'
                          '[[host]]\nname = "h9"\naddress = "10.78.0.9/24"\n')
        refused = lab_cli("up", str(second))
        assert refused.returncode == 1
        assert refused.stderr == (
            "vhostvpn lab up: nat = true: the hub runs in this namespace and h9's veth needs "
            "10.199.1.0/24, but 10.199.1.0/24 is in use here already (another NAT lab, or this "
            "machine's own network)\n")
        assert "lab up failed" not in refused.stdout  # nothing was made to tear down
        second_spec = parse_lab(second.read_text(), second)
        assert not second_spec.state_dir.exists()
        assert not Path(f"/tmp/vhostvpn-lab-{second_spec.tag}-logs").exists()
        assert not any(ns.startswith(f"vvlab-{second_spec.tag}-") for ns in netns.netns_list())
        assert netns.lab_links(second_spec.tag) == []
        assert lab_cli("status", str(lab_file)).returncode == 0  # the first lab untouched
        assert f"vh{spec.tag}01" in netns.lab_links(spec.tag)
    finally:
        if h1_server is not None and h1_server.poll() is None:
            h1_server.kill()
            h1_server.wait()
        down = lab_cli("down", str(lab_file))
        for listener in listeners:
            listener.close()
        subprocess.run(["ip", "netns", "del", outside], capture_output=True)
        subprocess.run(["ip", "link", "del", near], capture_output=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(ns.startswith(f"vvlab-{spec.tag}-") for ns in netns.netns_list())
    links = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    assert f"vh{spec.tag}" not in links and f"vm{spec.tag}" not in links
    assert "10.199." not in links
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)] == []
    listening = subprocess.run(["ss", "-Htln"], capture_output=True, text=True).stdout
    assert f":{forward_port} " not in listening and f":{hub_port} " not in listening
    assert not spec.state_dir.exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
