"""SoftEther VPN baseline: one iperf3 TCP stream host-to-host through a SoftEther server, two
client sessions (one TCP+TLS connection each, UDP acceleration off), both directions.

Run (root): .venv/bin/python bench/softether.py [--seconds 5]; bench/tunnel.py runs it too.
Everything lives in network namespaces it creates and removes; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

LIBEXEC = Path("/usr/libexec/softether")
SERVER_BINARY = LIBEXEC / "vpnserver" / "vpnserver"
CLIENT_BINARY = LIBEXEC / "vpnclient" / "vpnclient"
VPNCMD_BINARY = LIBEXEC / "vpncmd" / "vpncmd"
PACKAGES = ["softether-vpnserver", "softether-vpnclient", "softether-vpncmd", "iperf3",
            "busybox"]
# The Debian build has these compiled in (strings of the binary): config, logs, pid files.
# Made (empty) if missing and left in place: removing one while another run's SoftEther has
# its bind mount on it detaches that mount, and that SoftEther then writes its config and
# logs into the real directory (seen 2026-12-05 with two helpers' runs overlapping).
STATE_DIRS = [Path("/var/lib/softether"), Path("/var/log/softether"), Path("/run/softether")]

PORT = 5555  # inside the private namespace NS0, which has nothing but loopback
HUB = "VPN"
ADDR_A, ADDR_B = "10.99.0.1", "10.99.0.2"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
APT_TIMEOUT = 600.0

# Each SoftEther process gets its own copy of the state dirs, bind-mounted over the compiled-in
# paths in a private mount namespace, so nothing outside this run's temp dir is written.
WRAPPER = """#!/bin/sh
# usage: wrap.sh STATE_DIR COMMAND...   (run under unshare --mount --propagation private)
S=$1; shift
mount --bind "$S/lib" /var/lib/softether && mount --bind "$S/log" /var/log/softether && \\
  mount --bind "$S/run" /run/softether || exit 99
exec "$@"
"""


@dataclass
class Direction:
    """One iperf3 run through SoftEther."""

    direction: str  # "A->B" or "B->A" (data flow)
    seconds: float
    gbps_sender: float
    gbps_receiver: float
    retransmits: int
    cpu_percent: dict[str, float]
    foreign_cpu_percent: float
    ping_under_load_ms: float | None
    error: str | None = None


@dataclass
class SoftEtherResult:
    version: str = ""
    session: dict[str, str] = field(default_factory=dict)
    ping_idle_ms: float | None = None
    runs: list[Direction] = field(default_factory=list)
    placement: str = "unpinned: the kernel schedules vpnserver, vpnclient and iperf3 on CPUs 0-1"
    error: str | None = None
    log_dir: str = ""


# --------------------------------------------------------------------------- helpers


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads) from /proc/PID/stat; 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def system_busy_ticks() -> int:
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in cpu[:8])
    return user + nice + system + irq + softirq + steal


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def run(argv: Sequence[str], timeout: float = 30.0, check: bool = True) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> rc {done.returncode}:\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def apt_install(packages: list[str]) -> list[str]:
    """apt-get install (without recommends) those of `packages` that are missing, updating
    the package lists once if that fails; returns what was installed."""
    missing = [p for p in packages if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True,
        check=False).stdout.strip() != "install ok installed"]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        done = subprocess.run(install, capture_output=True, text=True, timeout=APT_TIMEOUT,
                              check=False, env=env)
        if done.returncode != 0:
            run(["apt-get", "update"], timeout=APT_TIMEOUT)
            subprocess.run(install, capture_output=True, text=True, timeout=APT_TIMEOUT,
                           check=True, env=env)
    return missing


def parse_ping_avg(text: str) -> float | None:
    match = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", text)
    return float(match.group(1)) if match else None


# --------------------------------------------------------------------------- the setup


class SoftEther:
    """Server + client (two accounts, two TAP NICs) in namespace ns0; the NICs moved to nsa and
    nsb.  Only PIDs started here are signalled; namespaces and temp dirs are removed."""

    def __init__(self, log_dir: Path) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns0, self.nsa, self.nsb = f"vvse{tag}s", f"vvse{tag}a", f"vvse{tag}b"
        self.tmp = Path(tempfile.mkdtemp(prefix="softether-bench-"))
        self.log_dir = log_dir
        self.wrapper = self.tmp / "wrap.sh"
        self.processes: dict[str, subprocess.Popen] = {}
        self.namespaces: list[str] = []
        self.vpncmd_log = (log_dir / "vpncmd.log").open("a")

    # -- lifetime

    def start(self) -> None:
        self.wrapper.write_text(WRAPPER)
        self.wrapper.chmod(0o755)
        for sub in ("lib", "log", "run"):  # vpncmd's own state dirs
            (self.tmp / "vpncmd" / sub).mkdir(parents=True)
        for path in STATE_DIRS:  # mount points for the bind mounts
            path.mkdir(parents=True, exist_ok=True)
        for ns in (self.ns0, self.nsa, self.nsb):
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self._spawn("server", SERVER_BINARY)
        self._wait_vpncmd([f"localhost:{PORT}", "/SERVER"], "HubList")
        self.vpncmd([f"localhost:{PORT}", "/SERVER"], [
            f"HubCreate {HUB} /PASSWORD:bench-hub",
            f"Hub {HUB}",
            "UserCreate ua /GROUP:none /REALNAME:none /NOTE:none",
            "UserPasswordSet ua /PASSWORD:bench-a",
            "UserCreate ub /GROUP:none /REALNAME:none /NOTE:none",
            "UserPasswordSet ub /PASSWORD:bench-b",
            "ExtOptionSet DisableUdpAcceleration /VALUE:1",
        ])
        self._spawn("client", CLIENT_BINARY)
        self._wait_vpncmd(["/CLIENT", "localhost"], "AccountList")
        commands = []
        for account, user, password, nic in (("ca", "ua", "bench-a", "sea"),
                                             ("cb", "ub", "bench-b", "seb")):
            commands += [
                f"NicCreate {nic}",
                f"AccountCreate {account} /SERVER:127.0.0.1:{PORT} /HUB:{HUB} /USERNAME:{user}"
                f" /NICNAME:{nic}",
                f"AccountPasswordSet {account} /PASSWORD:{password} /TYPE:standard",
                # one TCP connection, full duplex, no QoS queue, no UDP acceleration
                f"AccountDetailSet {account} /MAXTCP:1 /INTERVAL:1 /TTL:0 /HALF:no /BRIDGE:no"
                " /MONITOR:no /NOTRACK:no /NOQOS:yes /DISABLEUDP:yes",
                f"AccountEncryptEnable {account}",
                f"AccountConnect {account}",
            ]
        self.vpncmd(["/CLIENT", "localhost"], commands)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            listing = self.vpncmd(["/CLIENT", "localhost"], ["AccountList"], check=False)
            links = run(["ip", "-n", self.ns0, "link"])
            if listing.count("|Connected") == 2 and "vpn_sea" in links and "vpn_seb" in links:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"SoftEther sessions not up in {START_TIMEOUT} s:\n{listing}")
            time.sleep(0.5)
        for nic, ns, addr in (("vpn_sea", self.nsa, ADDR_A), ("vpn_seb", self.nsb, ADDR_B)):
            run(["ip", "-n", self.ns0, "link", "set", nic, "netns", ns])
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", nic])
            run(["ip", "-n", ns, "link", "set", nic, "up"])

    def stop(self) -> None:
        for name in ("client", "server"):
            process = self.processes.get(name)
            if process is None:
                continue
            pids = [*children(process.pid), process.pid]  # the worker, then its watchdog
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + STOP_TIMEOUT
                while time.monotonic() < deadline and any(_alive(p) for p in pids):
                    with contextlib.suppress(ChildProcessError):
                        process.poll()
                    time.sleep(0.1)
                if not any(_alive(p) for p in pids):
                    break
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        for sub in ("server", "client"):
            config = self.tmp / sub / "lib"
            for name in ("vpn_server.config", "vpn_client.config"):
                if (config / name).exists():
                    shutil.copy(config / name, self.log_dir / name)
        self.vpncmd_log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- processes

    def _spawn(self, name: str, binary: Path) -> None:
        state = self.tmp / name
        for sub in ("lib", "log", "run"):
            (state / sub).mkdir(parents=True)
        with (self.log_dir / f"{name}.log").open("wb") as log:
            # ip netns exec, unshare and the wrapper all exec: the PID is SoftEther's watchdog,
            # which forks the worker (its only child).
            self.processes[name] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns0, "unshare", "--mount", "--propagation",
                 "private", str(self.wrapper), str(state), str(binary), "execsvc"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def worker_pid(self, name: str) -> int:
        process = self.processes[name]
        kids = children(process.pid)
        return kids[0] if kids else process.pid

    def vpncmd(self, target: Sequence[str], commands: Sequence[str], check: bool = True) -> str:
        batch = self.tmp / "vpncmd-batch.txt"
        batch.write_text("\n".join(commands) + "\n")
        argv = ["ip", "netns", "exec", self.ns0, "unshare", "--mount", "--propagation",
                "private", str(self.wrapper), str(self.tmp / "vpncmd"), str(VPNCMD_BINARY),
                *target, f"/IN:{batch}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                              stdin=subprocess.DEVNULL)
        output = done.stdout + done.stderr
        self.vpncmd_log.write(f"### {' '.join(target)}: {commands}\n{output}\n")
        self.vpncmd_log.flush()
        if check and (done.returncode != 0 or "Error occurred" in output):
            raise RuntimeError(f"vpncmd {' '.join(target)} failed (rc {done.returncode}):\n"
                               f"{output[-3000:]}")
        return output

    def _wait_vpncmd(self, target: Sequence[str], command: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            output = self.vpncmd(target, [command], check=False)
            if "The command completed successfully" in output:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"vpncmd {' '.join(target)} never answered:\n{output[-2000:]}")
            time.sleep(0.5)

    def session_info(self) -> dict[str, str]:
        text = self.vpncmd(["/CLIENT", "localhost"], ["AccountStatusGet ca"])
        keys = ("Number of TCP Connections", "Maximum Number of TCP Connections", "Encryption",
                "Use of Compression", "UDP Acceleration is Supported",
                "UDP Acceleration is Active", "Half Duplex TCP Connection Mode")
        info = {}
        for line in text.splitlines():
            name, _, value = line.partition("|")
            if name.strip() in keys:
                info[name.strip()] = value.strip()
        return info


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --------------------------------------------------------------------------- measuring


def iperf(se: SoftEther, seconds: float, reverse: bool) -> Direction:
    """iperf3 server in nsb, client in nsa; reverse: data flows B -> A."""
    direction = "B->A" if reverse else "A->B"
    server = subprocess.Popen(
        ["ip", "netns", "exec", se.nsb, "iperf3", "-s", "-1", "-B", ADDR_B],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        client = subprocess.Popen(
            ["ip", "netns", "exec", se.nsa, "iperf3", "-c", ADDR_B, "-t", str(seconds), "-J",
             *(["-R"] if reverse else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        ping = subprocess.Popen(
            ["ip", "netns", "exec", se.nsa, "busybox", "ping", "-q", "-c",
             str(max(1, int(seconds * 5) - 5)), "-i", "0.2", ADDR_B],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True)
        time.sleep(0.5)  # past slow start; the window below is the rest of the run
        pids = {"vpnserver": se.worker_pid("server"), "vpnclient": se.worker_pid("client"),
                "iperf3 client": client.pid, "iperf3 server": server.pid}
        own = [*pids.values(), ping.pid, os.getpid()]
        t0 = {k: cpu_ticks(p) for k, p in pids.items()}
        busy0, wall0 = system_busy_ticks() - sum(cpu_ticks(p) for p in own), time.monotonic()
        time.sleep(max(0.5, seconds - 1.5))
        t1 = {k: cpu_ticks(p) for k, p in pids.items()}
        busy1, wall1 = system_busy_ticks() - sum(cpu_ticks(p) for p in own), time.monotonic()
        out, err = client.communicate(timeout=seconds + 30)
        ping_out, _ = ping.communicate(timeout=seconds + 30)
        elapsed = wall1 - wall0
        cpu = {k: round(100.0 * (t1[k] - t0[k]) / CLK_TCK / elapsed, 1) for k in pids}
        foreign = round(100.0 * (busy1 - busy0) / CLK_TCK / elapsed, 1)
        try:
            report = json.loads(out)
            end = report["end"]
            return Direction(direction=direction, seconds=seconds,
                             gbps_sender=end["sum_sent"]["bits_per_second"] / 1e9,
                             gbps_receiver=end["sum_received"]["bits_per_second"] / 1e9,
                             retransmits=int(end["sum_sent"].get("retransmits", 0)),
                             cpu_percent=cpu, foreign_cpu_percent=foreign,
                             ping_under_load_ms=parse_ping_avg(ping_out))
        except (ValueError, KeyError) as error:
            return Direction(direction=direction, seconds=seconds, gbps_sender=0.0,
                             gbps_receiver=0.0, retransmits=0, cpu_percent=cpu,
                             foreign_cpu_percent=foreign, ping_under_load_ms=None,
                             error=f"iperf3: {error}: {out[-500:]} {err[-500:]}")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)


def measure(seconds: float = 5.0, log_dir: Path | None = None) -> SoftEtherResult:
    """Set up, ping idle, iperf3 A->B and B->A, tear down.  Never raises: errors go in the
    result."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="softether-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    result = SoftEtherResult(log_dir=str(log_dir))
    try:
        apt_install(PACKAGES)
        result.version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "softether-vpnserver"], capture_output=True,
            text=True, check=False).stdout.strip()
    except (subprocess.SubprocessError, OSError, RuntimeError) as error:
        result.error = f"install: {error}"
        return result
    se = SoftEther(log_dir)
    try:
        se.start()
        result.session = se.session_info()
        ping = run(["ip", "netns", "exec", se.nsa, "busybox", "ping", "-c", "10", "-i", "0.2",
                    "-W", "2", ADDR_B], timeout=30, check=False)
        result.ping_idle_ms = parse_ping_avg(ping)
        for reverse in (False, True):
            result.runs.append(iperf(se, seconds, reverse))
    except (subprocess.SubprocessError, OSError, RuntimeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        se.stop()
    return result


def markdown(result: SoftEtherResult) -> str:
    lines = ["| SoftEther, iperf3 1 TCP stream | Gbit/s (receiver) | retransmits | vpnserver CPU % "
             "| vpnclient CPU % | iperf3 CPU % (client+server) | ping under load ms "
             "| other CPU % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.runs:
        if r.error:
            lines.append(f"| {r.direction} | error: {r.error[:80]} | | | | | | |")
            continue
        ping = "-" if r.ping_under_load_ms is None else f"{r.ping_under_load_ms:.2f}"
        iperf_cpu = r.cpu_percent["iperf3 client"] + r.cpu_percent["iperf3 server"]
        lines.append(f"| {r.direction} | {r.gbps_receiver:.2f} | {r.retransmits} | "
                     f"{r.cpu_percent['vpnserver']:.0f} | {r.cpu_percent['vpnclient']:.0f} | "
                     f"{iperf_cpu:.0f} | {ping} | {r.foreign_cpu_percent:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 time per direction")
    args = parser.parse_args(argv)
    result = measure(args.seconds)
    print(markdown(result))
    print(json.dumps(asdict(result), indent=2))
    return 0 if result.error is None and all(r.error is None for r in result.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
