"""A guest booted by a real libvirtd on a `vhostvpn hub` socket pings the hub's gateway.

The domain is built from what `vhostvpn qemu-args --libvirt` prints (shared memory, the
vhost-user <interface>, vectors=0 through <qemu:override> for QEMU 7.2 under TCG), so the
printed XML is what is proven.  libvirt runs QEMU as its own user (Debian: libvirt-qemu), so
the guest only reaches the hub through `--socket-group`.

libvirtd: a running system daemon is used as it is; otherwise the test starts libvirtd (with
a private config: its sockets in the test's folder, no auth) and virtlogd, and stops both by
PID at the end.  It skips, saying why, when libvirt is not installed or libvirtd cannot start.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from tests.support.guest import RUN_VM, ensure_image, qemu_available
from tests.support.processes import answers, stop
from tunnel.lab.console import parse_booted

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
]

QEMU_USER = "libvirt-qemu"  # Debian's qemu.conf default (user and group)
SYSTEM_SOCKET = "/run/libvirt/libvirt-sock"
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"
DAEMON_START_SECONDS = 20.0
HUB_START_SECONDS = 15.0
VIRSH_SECONDS = 30.0  # QEMU waits for the vhost-user socket before `virsh create` returns
GUEST_SECONDS = 45.0  # boot (about 4 s here under TCG), DHCP, three pings
SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
GATEWAY = "10.77.0.1"
MAC = "52:54:00:77:10:01"


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """libvirt's QEMU user must reach the socket, kernel and initrd: a folder it may traverse
    (pytest's tmp_path sits under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="vv-libvirt-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def libvirt(workdir: Path) -> Iterator[str]:
    """The URI of a running libvirtd: the system one, or one started here."""
    if os.geteuid() != 0:
        pytest.skip("needs root: libvirt's system instance runs QEMU as another user")
    missing = [b for b in ("libvirtd", "virtlogd", "virsh") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install libvirt-daemon-system)")
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        pytest.skip(f"no {QEMU_USER} user (apt-get install libvirt-daemon-system)")
    if answers(SYSTEM_SOCKET):
        yield "qemu:///system"
        return
    started = []
    try:
        if not answers(VIRTLOGD_SOCKET):  # libvirtd hands QEMU's stderr log to virtlogd
            started.append(daemon(["virtlogd", "--pid-file", str(workdir / "virtlogd.pid")],
                                  VIRTLOGD_SOCKET, workdir / "virtlogd.log"))
        sockets = workdir / "libvirt"
        sockets.mkdir()
        config = workdir / "libvirtd.conf"
        config.write_text(f'unix_sock_dir = "{sockets}"\nunix_sock_rw_perms = "0700"\n'
                          'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                          f'log_outputs = "3:file:{workdir / "libvirtd.log"}"\n')
        started.append(daemon(["libvirtd", "--config", str(config), "--pid-file",
                               str(workdir / "libvirtd.pid")],
                              sockets / "libvirt-sock", workdir / "libvirtd.log"))
        yield f"qemu+unix:///system?socket={sockets / 'libvirt-sock'}"
    finally:
        for process in reversed(started):
            stop(process)


def daemon(argv: list[str], ready: Path | str, log: Path) -> subprocess.Popen:
    """Start a libvirt daemon in the foreground (its PID is ours to stop) and wait until it
    answers on `ready`; skip, saying why, if it cannot start."""
    with open(log, "ab") as output:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + DAEMON_START_SECONDS
    while not answers(ready):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            pytest.skip(f"{' '.join(argv)} could not start (exit status {process.returncode}):"
                        f"\n{tail(log)}")
        time.sleep(0.1)
    return process


def virsh(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True,
                          timeout=VIRSH_SECONDS)


def printed_xml(socket_path: Path) -> dict[str, ET.Element]:
    """What `vhostvpn qemu-args --libvirt` prints, by element name."""
    result = subprocess.run(
        [sys.executable, "-m", "tunnel.cli", "qemu-args", "--libvirt", "--socket",
         str(socket_path), "--mem", "256M", "--vectors", "0", "--mac", MAC],
        capture_output=True, text=True, timeout=30, check=True)
    fragment = ET.fromstring(f"<fragment>{result.stdout}</fragment>")
    return {element.tag.rpartition("}")[2]: element for element in fragment}


def kernel_and_cmdline(socket_path: Path, name: str, command: str) -> tuple[str, str, str]:
    """Kernel, initrd and kernel command line from qemu/run-vm.sh (the one place the guest's
    boot line lives)."""
    argv = subprocess.run(
        [str(RUN_VM), "--socket", str(socket_path), "--name", name, "--accel", "tcg",
         "--append", "vv.dhcp=1 vv.cmd=" + base64.b64encode(command.encode()).decode(),
         "--dry-run"], capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")
    return tuple(argv[argv.index(flag) + 1] for flag in ("-kernel", "-initrd", "-append"))


def domain_xml(name: str, parts: dict[str, ET.Element], kernel: str, initrd: str,
               cmdline: str, console: Path) -> str:
    """A TCG domain (<domain type='qemu'>, cpu qemu64) booting the test guest directly."""
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    domain.append(parts["memory"])
    ET.SubElement(domain, "vcpu").text = "1"
    domain.append(parts["memoryBacking"])
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_element, "kernel").text = kernel
    ET.SubElement(os_element, "initrd").text = initrd
    ET.SubElement(os_element, "cmdline").text = cmdline
    cpu = ET.SubElement(domain, "cpu", mode="custom", match="exact")
    ET.SubElement(cpu, "model", fallback="forbid").text = "qemu64"
    devices = ET.SubElement(domain, "devices")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    devices.append(parts["interface"])
    domain.append(parts["override"])
    return ET.tostring(domain, encoding="unicode")


def wait_for_console(console: Path, marker: str, hub_log: Path) -> str:
    """The guest's console once `marker` is on it (libvirt writes it to a file)."""
    deadline = time.monotonic() + GUEST_SECONDS
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        if marker in text:
            return text
        assert time.monotonic() < deadline, f"no {marker}; console:\n{text}\nhub:\n" \
                                            f"{tail(hub_log)}"
        time.sleep(0.2)


def qemu_uid(name: str) -> int:
    """The user libvirt runs the domain's QEMU as (its pid file, then /proc)."""
    pid = Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)[1])


def test_a_libvirt_guest_on_a_group_socket_leases_an_address_and_pings_the_gateway(
        libvirt: str, workdir: Path) -> None:
    ensure_image()
    qemu_user = pwd.getpwnam(QEMU_USER)
    sock = workdir / "vm1.sock"
    hub_log = workdir / "hub.log"
    with open(hub_log, "wb") as output:
        hub = subprocess.Popen(
            [sys.executable, "-m", "tunnel.cli", "hub", "--socket", str(sock),
             "--socket-group", str(qemu_user.pw_gid), "--subnet", str(SUBNET),
             "--state-dir", str(workdir / "state")],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)
    name = f"vv-libvirt-{secrets.token_hex(4)}"
    console = workdir / "console.log"
    try:
        deadline = time.monotonic() + HUB_START_SECONDS
        while not answers(sock):
            assert hub.poll() is None and time.monotonic() < deadline, tail(hub_log)
            time.sleep(0.05)
        kernel, initrd, cmdline = kernel_and_cmdline(sock, name, f"ping -c 3 -W 2 {GATEWAY}")
        for image in (kernel, initrd):  # libvirt relabels them: copies, not the build's own
            shutil.copy(image, workdir)
        xml = workdir / "domain.xml"
        xml.write_text(domain_xml(name, printed_xml(sock), str(workdir / Path(kernel).name),
                                  str(workdir / Path(initrd).name), cmdline, console))
        qemu_log = Path(f"/var/log/libvirt/qemu/{name}.log")
        try:
            result = virsh(libvirt, "create", str(xml))
        except subprocess.TimeoutExpired:
            pytest.fail(f"virsh create: no answer in {VIRSH_SECONDS} s (QEMU waits until it "
                        f"reaches the socket); QEMU's log:\n{tail(qemu_log, 3)}")
        assert result.returncode == 0, f"{result.stderr}\nQEMU:\n{tail(qemu_log)}\nhub:\n" \
                                       f"{tail(hub_log)}"
        assert qemu_uid(name) == qemu_user.pw_uid  # not root: the socket's group lets it in

        text = wait_for_console(console, "VV-CMD-END", hub_log)
        booted = next(filter(None, map(parse_booted, text.splitlines())))
        address = ipaddress.IPv4Interface(booted["ip"])
        assert address.network == SUBNET and str(address.ip) != GATEWAY, text  # a DHCP lease
        assert booted["mac"] == MAC and booted["carrier"] == "1", text
        assert "VV-CMD-END rc=0" in text and "3 packets received" in text, text
    finally:
        subprocess.run(["virsh", "-c", libvirt, "destroy", name], capture_output=True,
                       timeout=VIRSH_SECONDS)  # also after a `create` that timed out
        stop(hub)
