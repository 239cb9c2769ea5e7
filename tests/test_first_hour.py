"""The first hour of a new user, with real processes on loopback.

README.md's Use section, followed literally: its commands are read from the README and run
as written, with only the machine's paths moved into a tmp dir (/etc/vhostvpn, /run), the
hub's address made loopback and the fingerprints the keygens printed filled in.  The peers
file's name for the endpoint is not this machine's hostname, and the session must come up:
the key names the endpoint.  QEMU is not booted; `qemu-args` must point at the socket.

Then what a user sees when it goes wrong, at --log-level warning: a key the hub does not
know and a hub whose key is not the pinned one are one ERROR each, saying what to do, and
the endpoint waits the longest backoff before it tries again.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.hub import free_tcp_port
from tunnel.endpoint import BACKOFF_SECONDS, JITTER
from tunnel.keys import keygen

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START_SECONDS = 20.0  # for a process to be up, or a session to come up


def use_section_commands() -> list[str]:
    """The shell commands in README.md's Use section, in order: indented code lines, with
    backslash continuations joined and trailing comments dropped."""
    text = README.read_text()
    section = text[text.index("\n## Use\n"):]
    section = section[: section.index("\n## ", 1)]
    commands: list[str] = []
    pending = ""
    for line in section.splitlines():
        if not line.startswith("    "):
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        commands.append(re.sub(r"\s+#\s.*$", "", line))
    return commands


class Machine:
    """The README's machines, all in one tmp dir: `vhostvpn` on PATH runs this tree's code."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_tcp_port()
        self.fingerprints: dict[str, str] = {}  # identity directory name -> fingerprint
        self.daemons: list[tuple[subprocess.Popen, Path]] = []
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "vhostvpn"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m tunnel.cli "$@"\n')
        wrapper.chmod(0o755)
        (tmp / "run").mkdir()
        self.common_env = os.environ | {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "STATE_DIRECTORY": str(tmp / "state"),  # the hub's leases (systemd's variable)
        }
        self.on("hub")

    def on(self, name: str) -> None:
        """Run the next commands on machine `name`: its own folder of default control
        sockets, as on a machine of its own (`vhostvpn status` there finds its process)."""
        (self.tmp / f"run-{name}").mkdir(exist_ok=True)
        self.env = self.common_env | {"RUNTIME_DIRECTORY": str(self.tmp / f"run-{name}")}

    def localize(self, command: str) -> str:
        """The README's command for this tmp dir: paths, the hub's address, fingerprints."""
        tmp = str(self.tmp)
        command = command.replace("/etc/vhostvpn/", f"{tmp}/etc/vhostvpn/")
        command = command.replace("/run/", f"{tmp}/run/")
        command = command.replace("--listen :7777", f"--listen 127.0.0.1:{self.port}")
        command = command.replace("hub:7777", f"127.0.0.1:{self.port}")
        for placeholder, key in (("SHA256:<alice's fingerprint>", "alice"), ("SHA256:…", "hub")):
            if placeholder in command:
                command = command.replace(placeholder, self.fingerprints[key])
        return command

    def run(self, command: str) -> str:
        result = subprocess.run(["sh", "-c", f"umask 022; {command}"], env=self.env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        return result.stdout

    def start(self, command: str) -> None:
        log_path = self.tmp / f"daemon{len(self.daemons)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(["sh", "-c", f"exec {command}"], env=self.env,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.daemons.append((process, log_path))

    def eventually(self, command: str, expected: str) -> str:
        """Run `command` until its output holds `expected` (a session takes a moment)."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            for process, log_path in self.daemons:
                assert process.poll() is None, log_path.read_text()
            result = subprocess.run(["sh", "-c", command], env=self.env, capture_output=True,
                                    text=True, timeout=60)
            if result.returncode == 0 and expected in result.stdout:
                return result.stdout
            assert time.monotonic() < deadline, (
                f"{command}: no {expected!r} in\n{result.stdout}{result.stderr}\n"
                + "\n".join(log.read_text() for _, log in self.daemons))
            time.sleep(0.2)

    def stop(self) -> None:
        for process, _ in self.daemons:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.daemons:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_readme_use_section_works_as_written_on_a_machine_not_called_alice(tmp_path):
    assert os.uname().nodename.split(".")[0] != "alice"  # else this proves nothing
    machine = Machine(tmp_path)
    commands = use_section_commands()
    statuses: list[str] = []
    # The first word of each command and the machine the README runs it on.
    machines = [("vhostvpn", "hub"), ("vhostvpn", "alice"), ("echo", "hub"),
                ("vhostvpn", "hub"), ("vhostvpn", "alice"), ("qemu-system-x86_64", "alice"),
                ("vhostvpn", "alice"), ("vhostvpn", "hub"), ("vhostvpn", "hub")]
    assert [c.split()[0] for c in commands] == [word for word, _ in machines]
    try:
        for command, (_, on) in zip(commands, machines, strict=True):
            machine.on(on)
            words = command.split()
            if words[:2] == ["vhostvpn", "keygen"]:
                machine.fingerprints[Path(words[2]).name] = machine.run(
                    machine.localize(command)).strip()
            elif words[0] == "echo":
                machine.run(machine.localize(command))
            elif words[1] in ("hub", "vm"):
                machine.start(machine.localize(command))
            elif words[0] == "qemu-system-x86_64":
                inner = re.search(r"\$\((vhostvpn qemu-args [^)]*)\)", command).group(1)
                output = machine.run(machine.localize(inner))
                assert f"path={tmp_path}/run/vm1.sock," in output
                assert "size=1G" in output and "-netdev vhost-user" in output
            elif words[1] == "status" and on == "alice":
                statuses.append(machine.eventually(machine.localize(command),
                                                   f"session to 127.0.0.1:{machine.port}: up"))
            elif words[1] == "status":
                statuses.append(machine.eventually(machine.localize(command),
                                                   "alice: session up from 127.0.0.1"))
                assert statuses[-1].startswith("hub (pid ")  # only the hub runs "there"
            elif words[1] == "capture":  # a second of it, into a file instead of Wireshark
                pcap = tmp_path / "alice.pcapng"
                machine.run(machine.localize(command).replace(
                    " | wireshark -k -i -", f" --seconds 1 > {pcap}"))
                assert pcap.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"  # a pcapng section
            else:
                raise AssertionError(f"README command this test does not know: {command}")
    finally:
        machine.stop()
    assert len(statuses) == 2
    assert "two places" not in "".join(log.read_text() for _, log in machine.daemons)


def errors(log_path: Path) -> list[str]:
    return [line for line in log_path.read_text().splitlines() if " ERROR " in line]


@pytest.mark.parametrize("case", ["unknown_key", "wrong_hub"])
def test_a_refused_endpoint_logs_one_error_at_warning_level_and_waits_the_longest(
        tmp_path, case):
    hub_fp = keygen(tmp_path / "hub")
    endpoint_fp = keygen(tmp_path / "alice")
    other_fp = keygen(tmp_path / "other")
    peers = tmp_path / "peers"
    peers.write_text(f"alice {endpoint_fp}\n" if case == "wrong_hub" else "")
    port = free_tcp_port()
    python = [sys.executable, "-m", "tunnel.cli"]
    hub_log, vm_log = tmp_path / "hub.log", tmp_path / "vm.log"
    with open(hub_log, "wb") as out:
        hub = subprocess.Popen([*python, "hub", "--listen", f"127.0.0.1:{port}", "--identity",
                                str(tmp_path / "hub"), "--peers", str(peers),
                                "--control", str(tmp_path / "hub.ctl")],
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    vm = None
    try:
        deadline = time.monotonic() + START_SECONDS
        while not (tmp_path / "hub.ctl").exists():
            assert hub.poll() is None and time.monotonic() < deadline, hub_log.read_text()
            time.sleep(0.05)
        with open(vm_log, "wb") as out:
            vm = subprocess.Popen([*python, "vm", "--hub", f"127.0.0.1:{port}", "--identity",
                                   str(tmp_path / "alice"), "--hub-fingerprint",
                                   other_fp if case == "wrong_hub" else hub_fp,
                                   "--socket", str(tmp_path / "vm1.sock"),
                                   "--log-level", "warning"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while not errors(vm_log):
            assert vm.poll() is None and time.monotonic() < deadline, vm_log.read_text()
            time.sleep(0.05)
        time.sleep(2)  # long enough for a few tries if it hammered
        [error] = errors(vm_log)
        assert vm_log.read_text().splitlines() == [error]  # nothing else at this level
        if case == "unknown_key":
            assert f"give the hub this fingerprint: {endpoint_fp}" in error
        else:
            assert f"presented key {hub_fp} but --hub-fingerprint is {other_fp}" in error
        wait = float(re.search(r"retrying in (\d+) s", error).group(1))
        assert wait >= BACKOFF_SECONDS[1] * (1 - JITTER) - 1
    finally:
        for process in (vm, hub):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(10)
