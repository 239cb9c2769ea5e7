"""A guest reaches the outside through `vhostvpn hub --nat`, through QEMU's `-netdev user`
(libslirp) and through passt: the same guest image under the same TCG, measured in the same
run, rounds interleaved.  What a guest sees: TCP throughput guest -> outside, outside -> guest
on the guest's connection (iperf3 -R) and on a port forward (`--forward` / `hostfwd` / passt
`-t`), connection setup rate and DNS latency; CPU seconds per GB moved for QEMU and the hub
(slirp and passt run inside QEMU or beside it: every process of the setup is counted).

Topology (tests/support/outside.py): the hub (or QEMU with slirp, or passt) in the hub
namespace, the servers (iperf3, HTTP, DNS) in the outside namespace, joined by a veth.

Run (root): .venv/bin/python bench/nat_slirp.py [--rounds 2] [--seconds 5]
                 [--only vhostvpn,slirp,passt] [--json FILE] [--hub-arg=ARG]...
                 [--device-opts PROPS]
Everything lives in namespaces and a temp dir made and removed here; only PIDs started here
are signalled; the whole run is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.softether import CLK_TCK, apt_install, cpu_ticks, system_busy_ticks
from tests.support import outside
from tests.support.guest import Guest, ensure_image
from tests.support.hub import VhostvpnProcess

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["iperf3", "passt"]
SETUPS = ("vhostvpn", "slirp", "passt")
GUEST_IP, GATEWAY = "10.77.0.50", "10.77.0.1"
SLIRP_DNS = "10.0.2.3"
FORWARD_PORT = 5202  # on the hub namespace's veth address, to the guest's iperf3 (5201)
CONNECTIONS = 200  # sequential HTTP fetches for the setup rate
LOOKUPS = 100  # nslookup runs (busybox nslookup asks A and AAAA: 2 queries each)
BOOT_TIMEOUT = 120.0
COMMAND_TIMEOUT = 120.0
RUN_TIMEOUT = 1800.0  # the whole benchmark


# --------------------------------------------------------------------------- the setups


@dataclass
class NetnsGuest(Guest):
    """A guest whose QEMU runs in `netns` with `netdev` (run-vm.sh's own command line, from
    its --dry-run, with the -netdev user replaced): slirp's and passt's sockets leave from
    the hub's namespace, as the hub's do.  `ip netns exec` execs QEMU: the PID is QEMU's."""

    netns: str = ""
    netdev: str = ""

    def argv(self) -> list[str]:
        script = super().argv()
        printed = subprocess.run([script[0], "--dry-run", *script[1:]], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.splitlines()
        index = printed.index("-netdev") + 1
        if not printed[index].startswith("user,id=net0"):
            raise RuntimeError(f"run-vm.sh --user-net gave {printed[index]!r}")
        printed[index] = self.netdev
        return ["ip", "netns", "exec", self.netns, *printed]


@dataclass
class Setup:
    """One booted guest behind one NAT: its processes (for CPU), its DNS server, and how the
    outside reaches its iperf3 through a forward (None: the setup has none)."""

    name: str
    guest: Guest
    pids: dict[str, int]
    dns: str
    forward: tuple[str, int] | None


def hub_has_forward() -> bool:
    """Does this tree's NAT carry `--forward`s (the flag parses before the shell takes them)?"""
    from tunnel.nat import NatShell

    return "forwards" in inspect.signature(NatShell).parameters


@contextlib.asynccontextmanager
async def vhostvpn_setup(names: dict[str, str], work: Path,
                         options: argparse.Namespace) -> AsyncIterator[Setup]:
    args = [*options.hub_arg, "--nat", "--subnet", "10.77.0.0/24", "--ipv6-prefix", "fd77::/64",
            "--dns-upstream", outside.OUT4, "--state-dir", str(work / "state"),
            "--log-level", "warning"]
    forward = None
    if hub_has_forward():
        args += ["--forward", f"tcp:{outside.HUB4}:{FORWARD_PORT}:{GUEST_IP}:5201"]
        forward = (outside.HUB4, FORWARD_PORT)
    hub = VhostvpnProcess(work, "hub", ["g.sock"], args, "hub",
                          prefix=outside.netns_exec(names["hub"]))
    await hub.start()
    try:
        guest = Guest("natvv", socket=Path(hub.socket("g.sock")), ip=f"{GUEST_IP}/24",
                      gw=GATEWAY, stay=True, accel="tcg", log_dir=work,
                      device_opts=options.device_opts)
        async with guest:
            await guest.wait_booted(BOOT_TIMEOUT)
            assert hub.process is not None and guest.process is not None
            yield Setup("vhostvpn", guest, {"qemu": guest.process.pid, "hub": hub.process.pid},
                        GATEWAY, forward)
    finally:
        await hub.stop()


@contextlib.asynccontextmanager
async def slirp_setup(names: dict[str, str], work: Path,
                      options: argparse.Namespace) -> AsyncIterator[Setup]:
    netdev = f"user,id=net0,hostfwd=tcp:{outside.HUB4}:{FORWARD_PORT}-:5201"
    guest = NetnsGuest("natslirp", user_net=True, dhcp=True, stay=True, accel="tcg",
                       log_dir=work, device_opts=options.device_opts, netns=names["hub"],
                       netdev=netdev)
    async with guest:
        await guest.wait_booted(BOOT_TIMEOUT)
        assert guest.process is not None
        yield Setup("slirp", guest, {"qemu": guest.process.pid}, SLIRP_DNS,
                    (outside.HUB4, FORWARD_PORT))


@contextlib.asynccontextmanager
async def passt_setup(names: dict[str, str], work: Path,
                      options: argparse.Namespace) -> AsyncIterator[Setup]:
    # passt drops root for nobody before it binds its socket: a folder nobody can write to.
    folder = Path(tempfile.mkdtemp(prefix="vv-natbench-passt-"))
    folder.chmod(0o777)
    path = folder / "passt.socket"
    # passt copies the host's address and default route to the guest (the hub namespace
    # gets a default route toward the outside for it to find its interface); --no-map-gw:
    # the gateway's address is the outside's server, not the hub namespace's loopback.
    with open(work / "passt.log", "wb") as log:
        passt = await trio.lowlevel.open_process(
            outside.netns_exec(names["hub"], "passt", "--foreground", "--no-map-gw",
                               "--socket", str(path), "-t", f"{FORWARD_PORT}:5201",
                               "--dns", outside.OUT4),
            stdout=log, stderr=log)
    try:
        with trio.fail_after(10):
            while not path.exists():
                if passt.poll() is not None:
                    raise RuntimeError(f"passt exited: {(work / 'passt.log').read_text()}")
                await trio.sleep(0.05)
        netdev = f"stream,id=net0,server=off,addr.type=unix,addr.path={path}"
        guest = NetnsGuest("natpasst", user_net=True, dhcp=True, stay=True, accel="tcg",
                           log_dir=work, device_opts=options.device_opts,
                           netns=names["hub"], netdev=netdev)
        async with guest:
            await guest.wait_booted(BOOT_TIMEOUT)
            assert guest.process is not None
            yield Setup("passt", guest, {"qemu": guest.process.pid, "passt": passt.pid},
                        outside.OUT4, (outside.HUB4, FORWARD_PORT))
    finally:
        with contextlib.suppress(ProcessLookupError):
            passt.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await passt.wait()
        shutil.rmtree(folder, ignore_errors=True)


SETUP_FACTORIES: dict[str, Callable] = {"vhostvpn": vhostvpn_setup, "slirp": slirp_setup,
                                        "passt": passt_setup}


# --------------------------------------------------------------------------- measures


class CpuMeter:
    """CPU seconds of the setup's processes (and of the whole machine) across a block."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = {name: cpu_ticks(pid) for name, pid in self.pids.items()}
        self._busy = system_busy_ticks()
        self._wall = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._wall
        self.seconds = {name: (cpu_ticks(pid) - self._start[name]) / CLK_TCK
                        for name, pid in self.pids.items()}
        self.seconds["machine"] = (system_busy_ticks() - self._busy) / CLK_TCK
        self.seconds["wall"] = wall


def iperf3_summary(text: str) -> tuple[float, float]:
    """(Mbit/s, MB) of the receiver line of iperf3's text summary (its MBytes are MiB)."""
    match = re.search(r"([\d.]+) (K|M|G)Bytes\s+([\d.]+) Mbits/sec\s+receiver", text)
    if match is None:
        raise RuntimeError(f"no receiver summary in iperf3's output:\n{text}")
    scale = {"K": 1e-3, "M": 1.0, "G": 1e3}[match.group(2)]
    return float(match.group(3)), float(match.group(1)) * scale * 1.048576


def stream_row(mbits: float, megabytes: float, cpu: CpuMeter) -> dict:
    gigabytes = megabytes / 1000
    row = {"mbits": round(mbits, 1), "MB": round(megabytes, 1)}
    for name, seconds in cpu.seconds.items():
        row[f"cpu_{name}"] = round(seconds, 2)
        if name not in ("wall", "machine") and gigabytes > 0:
            row[f"cpu_s_per_GB_{name}"] = round(seconds / gigabytes, 1)
    setup_cpu = sum(s for n, s in cpu.seconds.items() if n not in ("wall", "machine"))
    if gigabytes > 0:
        row["cpu_s_per_GB_total"] = round(setup_cpu / gigabytes, 1)
    return row


async def timed_loop(guest: Guest, count: int, body: str) -> float:
    """Seconds per iteration of `body` run `count` times in the guest (its /proc/uptime,
    10 ms resolution); every iteration must succeed."""
    out = await guest.check(
        f"a=$(cut -d' ' -f1 /proc/uptime); fails=0; for i in $(seq {count}); do {body}"
        " || fails=$((fails+1)); done; b=$(cut -d' ' -f1 /proc/uptime); echo $a $b $fails",
        timeout=COMMAND_TIMEOUT)
    start, end, fails = out.split()[-3:]
    if int(fails):
        raise RuntimeError(f"{fails} of {count} iterations of {body!r} failed")
    return (float(end) - float(start)) / count


async def measure(setup: Setup, names: dict[str, str], seconds: int) -> dict:
    guest, out4 = setup.guest, outside.OUT4
    row: dict = {}
    await guest.check(f"wget -q -O /dev/null http://{out4}/small")
    for name, flags in (("guest_to_outside", ""), ("outside_to_guest_R", " -R")):
        with CpuMeter(setup.pids) as cpu:
            text = await guest.check(f"iperf3 -c {out4} -t {seconds} -f m{flags}",
                                     timeout=seconds + 60)
        row[name] = stream_row(*iperf3_summary(text), cpu)
    if setup.forward is not None:
        address, port = setup.forward
        await guest.start_iperf3_server(once=True)
        with CpuMeter(setup.pids) as cpu, trio.fail_after(seconds + 60):
            done = await trio.run_process(
                outside.netns_exec(names["outside"], "iperf3", "-c", address, "-p", str(port),
                                   "-t", str(seconds), "-J"),
                capture_stdout=True, capture_stderr=True, check=False)
        report = json.loads(done.stdout or b"{}")
        received = report.get("end", {}).get("sum_received")
        if received is None:
            raise RuntimeError(f"{setup.name}: iperf3 through the forward: {done.stdout[-400:]!r}"
                               f" {done.stderr[-400:]!r}")
        row["outside_to_guest_forward"] = stream_row(received["bits_per_second"] / 1e6,
                                                     received["bytes"] / 1e6, cpu)
    fetch = f"wget -q -O /dev/null http://{out4}/small"
    row["connect_ms"] = round(1000 * await timed_loop(guest, CONNECTIONS, fetch), 2)
    # The floor: wget's own cost in the guest (its process, a refused loopback connect).
    row["connect_floor_ms"] = round(1000 * await timed_loop(
        guest, CONNECTIONS, "! wget -q -O /dev/null http://127.0.0.1:1/ 2>/dev/null"), 2)
    row["dns_lookup_ms"] = round(1000 * await timed_loop(
        guest, LOOKUPS, f"nslookup {outside.NAME} {setup.dns} >/dev/null"), 2)
    await guest.run("killall iperf3 2>/dev/null")
    return row


async def bench(args: argparse.Namespace, work: Path) -> dict:
    folder = work / "www"
    folder.mkdir()
    (folder / "small").write_text("small\n")
    results: dict = {"runs": [], "load_before": os.getloadavg(), "hub_args": args.hub_arg,
                     "device_opts": args.device_opts}
    tag = "natb" + uuid.uuid4().hex[:4]
    resolv = Path("/etc/netns") / f"{tag}h"
    with outside.world(tag, with_host=False) as names:
        resolv.mkdir(parents=True, exist_ok=True)  # slirp forwards to the resolv.conf it sees
        (resolv / "resolv.conf").write_text(f"nameserver {outside.OUT4}\n")
        try:
            outside.ip("-n", names["hub"], "route", "add", "default", "via", outside.OUT4)
            async with outside.servers(names["outside"], folder, work):
                for round_number in range(args.rounds):
                    for name in args.only:
                        started = time.monotonic()
                        folder = work / f"{name}{round_number}"
                        folder.mkdir()
                        async with SETUP_FACTORIES[name](names, folder, args) as setup:
                            row = await measure(setup, names, args.seconds)
                        row.update(setup=name, round=round_number,
                                   seconds=round(time.monotonic() - started, 1),
                                   load=os.getloadavg())
                        results["runs"].append(row)
                        print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(resolv, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    results["summary"] = summarize(results["runs"])
    return results


def summarize(runs: list[dict]) -> dict:
    """Per setup, the median over rounds of every number."""
    summary: dict = {}
    for name in {r["setup"] for r in runs}:
        rows = [r for r in runs if r["setup"] == name]
        entry: dict = {}
        for key, value in rows[0].items():
            if isinstance(value, dict):
                entry[key] = {k: round(statistics.median(r[key][k] for r in rows if key in r), 2)
                              for k in value}
            elif isinstance(value, float) and key != "seconds":
                entry[key] = round(statistics.median(r[key] for r in rows), 2)
        summary[name] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5, help="each iperf3 stream")
    parser.add_argument("--only", default=",".join(SETUPS),
                        help=f"comma-separated, in round order (default {','.join(SETUPS)})")
    parser.add_argument("--json", type=Path, help="write every row and the summary here")
    parser.add_argument("--hub-arg", action="append", default=[],
                        help="an extra `vhostvpn hub` argument (repeatable), e.g. "
                             "--hub-arg=--no-port-policy")
    parser.add_argument("--device-opts", default="",
                        help="extra virtio-net-pci properties for every guest, e.g. "
                             "host_tso4=off,host_tso6=off")
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT)
    args = parser.parse_args()
    args.only = [s for s in args.only.split(",") if s]
    if unknown := set(args.only) - set(SETUPS):
        parser.error(f"unknown setups {sorted(unknown)}; choose from {SETUPS}")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    apt_install(PACKAGES)
    ensure_image()
    work = Path(tempfile.mkdtemp(prefix="vv-natbench-"))

    async def bounded() -> dict:
        with trio.fail_after(args.timeout):
            return await bench(args, work)

    try:
        results = trio.run(bounded)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
