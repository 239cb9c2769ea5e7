"""The systemd units in packaging/systemd: `systemd-analyze verify` finds nothing to say about
them, `systemd-analyze security` rates them OK, their ExecStart lines parse with our own
command line, and each role really runs with what its unit grants and nothing more: the hub
and a vm as an unprivileged user without capabilities (ready, and the vm's session up), a
TUN host with CAP_NET_ADMIN alone (and refused, one line, without it).  The users and
capabilities are applied with setpriv, as systemd's User= and AmbientCapabilities= would:
this machine's PID 1 is not systemd, so the units themselves cannot be started here."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.hub import free_tcp_port
from tests.support.netns import ip
from tunnel.cli.main import build_parser
from tunnel.keys import keygen

UNITS = Path(__file__).resolve().parent.parent / "packaging" / "systemd"
INSTALLED_BINARY = "/usr/local/bin/vhostvpn"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(Debian: apt-get install systemd)")
# How the units are named when verified: templates need an instance.
INSTANCES = {"vhostvpn-hub.service": "vhostvpn-hub.service",
             "vhostvpn-vm@.service": "vhostvpn-vm@alice.service",
             "vhostvpn-host@.service": "vhostvpn-host@office.service"}
UNPRIVILEGED = 65534  # nobody
STEP_SECONDS = 20.0


def unit_settings(name: str) -> dict[str, list[str]]:
    """KEY -> its values in [Service] order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def exec_start(name: str, instance: str = "alice") -> list[str]:
    return shlex.split(unit_settings(name)["ExecStart"][0].replace("%i", instance))


def copies_runnable_here(folder: Path) -> list[str]:
    """The units copied to `folder` with ExecStart's binary where this machine has it
    (verify checks that it exists); the paths to verify, instances named."""
    binary = shutil.which("vhostvpn", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("no vhostvpn script next to this Python (pip install -e .)")
    for name in INSTANCES:
        text = (UNITS / name).read_text()
        assert text.count(INSTALLED_BINARY) == 1, name
        (folder / name).write_text(text.replace(INSTALLED_BINARY, binary))
    return [str(folder / instance) for instance in INSTANCES.values()]


def analyze(*args: str) -> subprocess.CompletedProcess:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


@needs_analyze
def test_systemd_analyze_verify_has_nothing_to_say_about_the_units(tmp_path):
    result = analyze("verify", "--man=no", *copies_runnable_here(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_analyze
def test_systemd_analyze_verify_does_catch_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt setting and a missing binary are reported."""
    paths = copies_runnable_here(tmp_path)
    hub = tmp_path / "vhostvpn-hub.service"
    hub.write_text(hub.read_text().replace("Type=notify", "Tpye=notify"))
    result = analyze("verify", "--man=no", paths[0])
    assert "Unknown key" in result.stderr and "Tpye" in result.stderr
    result = analyze("verify", "--man=no", str(UNITS / "vhostvpn-hub.service"))
    assert result.returncode != 0 or INSTALLED_BINARY in result.stderr


@needs_analyze
@pytest.mark.parametrize("name", list(INSTANCES))
def test_systemd_analyze_security_rates_each_unit_ok(name):
    result = analyze("security", "--offline=true", "--no-pager", str(UNITS / name))
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert exposure is not None, result.stdout + result.stderr
    assert float(exposure.group(1)) < 3.0, result.stdout  # systemd: below 3 is "OK"


@pytest.mark.parametrize(
    ("name", "capabilities"),
    [
        ("vhostvpn-hub.service", ""),
        ("vhostvpn-vm@.service", ""),
        ("vhostvpn-host@.service", "CAP_NET_ADMIN"),
    ],
)
def test_each_unit_is_a_notify_service_of_an_unprivileged_user_with_its_capabilities(
        name, capabilities):
    settings = unit_settings(name)
    assert settings["Type"] == ["notify"]
    assert settings["User"] == ["vhostvpn"] and settings["NoNewPrivileges"] == ["yes"]
    assert settings["CapabilityBoundingSet"] == [capabilities]
    assert settings["AmbientCapabilities"] == [capabilities]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["Nice"] == ["-10"]  # what --nice would need CAP_SYS_NICE for
    argv = exec_start(name)
    assert argv[0] == INSTALLED_BINARY
    # Every flag the unit passes exists (a host's device is in its config file).
    device = ["--tun", "vv0"] if name.startswith("vhostvpn-host") else []
    args = build_parser().parse_args(argv[1:] + device)
    assert args.command == name.removeprefix("vhostvpn-").split("@")[0].split(".")[0]
    control_folder = os.path.dirname(args.control)
    assert control_folder == "/run/" + settings["RuntimeDirectory"][0].replace("%i", "alice")


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers is not installed")
def test_the_sysusers_file_creates_the_vhostvpn_user(tmp_path):
    result = subprocess.run(["systemd-sysusers", "--dry-run", f"--root={tmp_path}",
                             str(UNITS / "vhostvpn.sysusers.conf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Creating user 'vhostvpn'" in result.stdout + result.stderr


# -- each role with what its unit grants, as a real process -----------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to become an unprivileged user")


def as_unit_user(name: str) -> list[str]:
    """setpriv options giving a process what the unit `name` gives it: an unprivileged user,
    the unit's capabilities (AmbientCapabilities=) and no others, no new privileges."""
    granted = "".join(f",+{cap.removeprefix('CAP_').lower()}"
                      for cap in unit_settings(name)["AmbientCapabilities"][0].split())
    return ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}",
            "--clear-groups", f"--bounding-set=-all{granted}", f"--inh-caps=-all{granted}",
            f"--ambient-caps=-all{granted}", "--no-new-privs"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder the unprivileged user owns (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="vhostvpn-unit-"))
    os.chmod(path, 0o755)
    os.chown(path, UNPRIVILEGED, UNPRIVILEGED)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def own_identity(path: Path) -> str:
    """A key the unprivileged user owns (a private key must be its owner's alone)."""
    fingerprint = keygen(path)
    for item in [path, *path.iterdir()]:
        os.chown(item, UNPRIVILEGED, UNPRIVILEGED)
    return fingerprint


class Daemon:
    """One role as a real process, with a notify socket of its own."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.process: trio.Process | None = None
        self.notify: trio.socket.SocketType | None = None

    async def start(self, prefix: list[str], argv: list[str]) -> None:
        self.notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = self.workdir / f"{self.name}.notify"
        await self.notify.bind(str(path))
        os.chown(path, UNPRIVILEGED, UNPRIVILEGED)
        env = dict(os.environ, NOTIFY_SOCKET=str(path), HOME=str(self.workdir),
                   PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        with open(self.workdir / f"{self.name}.log", "wb") as log:
            self.process = await trio.lowlevel.open_process(
                [*prefix, sys.executable, "-m", "tunnel.cli", *argv], env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)

    async def ready(self) -> str:
        """Wait for READY=1; its STATUS=."""
        assert self.notify is not None
        with trio.fail_after(STEP_SECONDS):
            while True:
                message = dict(line.split("=", 1) for line in
                               (await self.notify.recv(4096)).decode().splitlines())
                if message.get("READY") == "1":
                    return message.get("STATUS", "")

    async def stop(self) -> str:
        if self.notify is not None:
            self.notify.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with trio.move_on_after(STEP_SECONDS):
                await self.process.wait()
            if self.process.poll() is None:
                self.process.kill()
                await self.process.wait()
        return (self.workdir / f"{self.name}.log").read_text()


@pytest.mark.slow
@needs_root
async def test_the_hub_and_a_vm_run_as_an_unprivileged_user_without_capabilities(workdir):
    hub_fp = own_identity(workdir / "hub-id")
    peers = workdir / "peers"
    peers.write_text(f"alice {own_identity(workdir / 'alice-id')}\n")
    port, metrics = free_tcp_port(), free_tcp_port()
    hub, vm = Daemon(workdir, "hub"), Daemon(workdir, "vm")
    try:
        await hub.start(as_unit_user("vhostvpn-hub.service"), [
            "hub", "--listen", f"127.0.0.1:{port}", "--identity", str(workdir / "hub-id"),
            "--peers", str(peers), "--socket", str(workdir / "hub-guest.sock"),
            "--control", str(workdir / "hub.control"), "--metrics", f"127.0.0.1:{metrics}"])
        await hub.ready()
        await vm.start(as_unit_user("vhostvpn-vm@.service"), [
            "vm", "--hub", f"127.0.0.1:{port}", "--identity", str(workdir / "alice-id"),
            "--hub-fingerprint", hub_fp, "--socket", str(workdir / "guest.sock"),
            "--control", str(workdir / "vm.control")])
        await vm.ready()
        for path in ("hub-guest.sock", "hub.control", "guest.sock", "vm.control"):
            assert os.stat(workdir / path).st_uid == UNPRIVILEGED, path
        with trio.fail_after(STEP_SECONDS):
            while True:
                state = await trio.to_thread.run_sync(_query, str(workdir / "vm.control"))
                if state["session"]["state"] == "up":
                    break
                await trio.sleep(0.2)
    finally:
        vm_log, hub_log = await vm.stop(), await hub.stop()
    assert "Traceback" not in hub_log + vm_log, hub_log + vm_log


def _query(path: str) -> dict:
    from tunnel.control import query

    return query(path)


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"vvunit{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.mark.slow
@needs_root
@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun")
@pytest.mark.parametrize("granted", [True, False], ids=["with_net_admin", "without"])
async def test_a_tun_host_needs_net_admin_and_nothing_more(workdir, namespace, granted):
    hub_fp = keygen(workdir / "hub-id")
    own_identity(workdir / "host-id")
    prefix = as_unit_user("vhostvpn-host@.service")
    if not granted:
        prefix = [arg.replace(",+net_admin", "") for arg in prefix]
    host = Daemon(workdir, "host")
    argv = ["host", "--tun", "vvunit0", "--address", "10.77.0.9/24", "--hub",
            f"127.0.0.1:{free_tcp_port()}", "--identity", str(workdir / "host-id"),
            "--hub-fingerprint", hub_fp, "--control", str(workdir / "host.control")]
    try:
        await host.start(["ip", "netns", "exec", namespace, *prefix], argv)
        if granted:
            status = await host.ready()
            assert status.startswith("session to 127.0.0.1:")
            assert "10.77.0.9/24" in ip("-n", namespace, "addr", "show", "dev", "vvunit0")
        else:
            assert host.process is not None
            with trio.fail_after(STEP_SECONDS):
                assert await host.process.wait() == 1
    finally:
        log = await host.stop()
    if not granted:
        lines = [line for line in log.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)]
        assert len(lines) == 1 and lines[0].startswith("vhostvpn host: "), log
        assert "Traceback" not in log
