"""`vhostvpn status` as a user runs it: without --control it finds every process on its
default control socket, and `capture` the one process there (a second daemon of a kind is
refused that path in one line, the first still serving); on the hub it lists the peers
file's offline peers with when they were last seen, from where, with their addresses; on a
host it shows the TAP/TUN device's link as the kernel has it and the leased address, in
plain output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.hub import free_tcp_port
from tests.support.netns import hub_and_hosts
from tests.support.processes import stop
from tunnel.control import query
from tunnel.keys import keygen

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 20.0


def vhostvpn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunnel.cli", *args], capture_output=True,
                          text=True, timeout=60, env=os.environ | {"PYTHONPATH": str(ROOT)})


class Daemons:
    """The processes a test started (only those are ever signalled)."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        process = subprocess.Popen([*prefix, sys.executable, "-m", "tunnel.cli", *args],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True,
                                   env=os.environ | {"PYTHONPATH": str(ROOT)})
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            stop(process)


@pytest.fixture
def daemons():
    started = Daemons()
    try:
        yield started
    finally:
        started.stop_all()


def eventually(check, what: str, processes=()):
    deadline = time.monotonic() + START_SECONDS
    while True:
        for process in processes:
            assert process.poll() is None, f"exited: {process.stderr.read()}"
        try:
            result = check()
        except (OSError, KeyError, StopIteration):
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def test_status_without_control_finds_every_process_on_its_default_socket(
        tmp_path, runtime_directory, daemons):
    hub = daemons.start("hub", "--socket", str(tmp_path / "vm1.sock"), "--log-level", "warning")
    eventually(lambda: (runtime_directory / "hub.ctl").exists(), "hub.ctl", [hub])
    result = vhostvpn("status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"hub (pid {hub.pid})")
    capture = subprocess.run(  # the one process there: capture asks it
        [sys.executable, "-m", "tunnel.cli", "capture", "vm1", "--seconds", "0.5"],
        capture_output=True, timeout=60, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert capture.returncode == 0 and capture.stdout[:4] == b"\x0a\x0d\x0d\x0a"

    fingerprint = keygen(tmp_path / "hub-id")
    keygen(tmp_path / "me")
    vm_flags = ["--hub", "127.0.0.1:1", "--identity", str(tmp_path / "me"),
                "--hub-fingerprint", fingerprint, "--log-level", "error"]
    vm = daemons.start("vm", "--socket", str(tmp_path / "vm2.sock"), *vm_flags)
    eventually(lambda: (runtime_directory / "vm.ctl").exists(), "vm.ctl", [vm])
    result = vhostvpn("status")
    assert f"{runtime_directory}/hub.ctl:\nhub (pid {hub.pid})" in result.stdout
    assert f"{runtime_directory}/vm.ctl:\nendpoint (pid {vm.pid})" in result.stdout
    both = vhostvpn("status", "--json")
    assert both.returncode == 1 and "2 processes answer" in both.stderr
    capture = vhostvpn("capture", "vm2")  # which one? it does not guess
    assert capture.returncode == 1 and capture.stderr.strip() == (
        f"vhostvpn capture: 2 processes answer ({runtime_directory}/hub.ctl, "
        f"{runtime_directory}/vm.ctl): give --control PATH")

    second = vhostvpn("vm", "--socket", str(tmp_path / "vm3.sock"), *vm_flags)
    assert "Traceback" not in second.stderr and second.returncode == 1
    assert second.stderr.strip() == (
        f"vhostvpn vm: --control (not given; the default) {runtime_directory}/vm.ctl: a "
        f"process is listening on it; is another vhostvpn running? (stop it, or choose "
        f"another path)")
    assert query(str(runtime_directory / "vm.ctl"))["pid"] == vm.pid


def test_status_with_nothing_running_says_where_it_looked(runtime_directory):
    result = vhostvpn("status")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"vhostvpn status: no vhostvpn process answers in {runtime_directory} (give "
        f"--control PATH if it was started with one)")


def test_hub_status_lists_offline_peers_with_last_seen_and_address(tmp_path, daemons):
    port = free_tcp_port()
    hub_fp = keygen(tmp_path / "hub")
    (tmp_path / "peers").write_text(f"alice {keygen(tmp_path / 'alice')}\n"
                                    f"bob {keygen(tmp_path / 'bob')}\n")
    hub_ctl = str(tmp_path / "hub.ctl")
    hub = daemons.start("hub", "--listen", f"127.0.0.1:{port}", "--identity",
                        str(tmp_path / "hub"), "--peers", str(tmp_path / "peers"),
                        "--control", hub_ctl, "--log-level", "warning")
    eventually(lambda: query(hub_ctl), "the hub's status", [hub])
    alice = daemons.start("vm", "--socket", str(tmp_path / "a.sock"), "--hub",
                          f"127.0.0.1:{port}", "--identity", str(tmp_path / "alice"),
                          "--hub-fingerprint", hub_fp, "--control", str(tmp_path / "a.ctl"),
                          "--log-level", "warning")
    eventually(lambda: next(p for p in query(hub_ctl)["tunnel"]["peer_list"]
                            if p["name"] == "alice")["online"], "alice online", [hub, alice])
    shown = vhostvpn("status", "--control", hub_ctl).stdout
    assert "offline peers:\n    bob: not seen since the hub started" in shown
    assert "alice: last seen" not in shown
    before = time.time()
    stop(alice)
    peers = eventually(lambda: [p for p in query(hub_ctl)["tunnel"]["peer_list"]
                                if not p["online"] and p["name"] == "alice"], "alice offline")
    assert peers[0]["from"] == "127.0.0.1" and before - 1 <= peers[0]["last_seen"] <= \
        time.time()
    shown = vhostvpn("status", "--control", hub_ctl).stdout
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(peers[0]["last_seen"]))
    assert f"    alice: last seen {when}" in shown and "ago) from 127.0.0.1" in shown
    assert "    bob: not seen since the hub started" in shown


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun")
                    or shutil.which("ip") is None, reason="needs root, /dev/net/tun, iproute2")
@pytest.mark.parametrize("mode", ["tap", "tun"])
def test_host_status_shows_the_kernels_link_and_the_lease_and_the_hub_its_last_address(
        tmp_path, daemons, mode):
    hub_fp = keygen(tmp_path / "hub")
    (tmp_path / "peers").write_text(f"h1 {keygen(tmp_path / 'h1')}\n")
    hub_ctl, host_ctl = str(tmp_path / "hub.ctl"), str(tmp_path / "host.ctl")
    with hub_and_hosts(1) as names:
        hub = daemons.start(
            "hub", "--listen", "10.201.1.1:7777", "--identity", str(tmp_path / "hub"),
            "--peers", str(tmp_path / "peers"), "--subnet", "10.77.0.0/24", "--state-dir",
            str(tmp_path / "state"), "--control", hub_ctl, "--log-level", "warning",
            prefix=("ip", "netns", "exec", names["hub"]))
        eventually(lambda: query(hub_ctl), "the hub's status", [hub])
        device = ["--tun", "vv0", "--dhcp"] if mode == "tun" else [
            "--tap", "vv0", "--address", "10.77.0.9/24"]
        host = daemons.start(
            "host", *device, "--hub", "10.201.1.1:7777", "--identity", str(tmp_path / "h1"),
            "--hub-fingerprint", hub_fp, "--control", host_ctl, "--log-level", "warning",
            prefix=("ip", "netns", "exec", names["h1"]))
        expected = "leased 10.77.0." if mode == "tun" else "addresses: 10.77.0.9/24"
        shown = eventually(lambda: (out := vhostvpn("status", "--control", host_ctl).stdout)
                           and expected in out and out, "the host's address", [hub, host])
        assert f"  vv0 ({mode}): link up, carrier on, operstate " in shown
        if mode == "tap":  # the host speaks from its address: the hub sees it claimed
            subprocess.run(["ip", "netns", "exec", names["h1"], "ping", "-c", "1", "-W", "2",
                            "10.77.0.1"], check=False, capture_output=True)
        address = next(line for line in shown.splitlines() if expected in line)
        leased = address.split()[-1].split("/")[0] if mode == "tun" else "10.77.0.9"
        stop(host)
        shown = eventually(lambda: (out := vhostvpn("status", "--control", hub_ctl).stdout)
                           and "h1: last seen" in out and out, "h1 offline", [hub])
        line = next(line for line in shown.splitlines() if "h1: last seen" in line)
        assert f"from 10.201.1.2, addresses {leased}" in line, shown
