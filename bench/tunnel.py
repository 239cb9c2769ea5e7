"""Through the VPN: testpmd -> endpoint A -> TLS -> hub -> TLS -> endpoint B -> testpmd, real
processes on loopback: received Mpps/Gbit/s, CPU % per process, session RTT idle and loaded;
plus the in-process TLS+codec ceiling, SoftEther (bench/softether.py) and QEMU guests' iperf3.

Run (root): .venv/bin/python bench/tunnel.py [--parts split,loop,codec,softether,guests]
Starts/stops only its own processes; JSON to bench/results/ (gitignored); docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file is bench/tunnel.py: keep `import tunnel` for the package, not for this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from bench import softether  # noqa: E402
from bench.vhost_switch import (  # noqa: E402
    CLK_TCK,
    MAC_A,  # testpmd port on endpoint A's socket
    MAC_B,  # testpmd port on endpoint B's socket
    RESULTS_DIR,
    VHOSTVPN_BINARY,
    Generator,
    _stop_process,
    _tail,
    cpu_ticks,
    machine_info,
    split_generator,
    system_busy_ticks,
)
from tests.support.testpmd import TestpmdConfig, VirtioUserPort, run_testpmd  # noqa: E402
from tunnel.control import query  # noqa: E402
from tunnel.keys import keygen  # noqa: E402

START_TIMEOUT = 30.0
LOOP_BURST = 256  # frames per port put in flight by --tx-first (loop mode)
POLL_SECONDS = 1.0  # status polling for RTT (the endpoints PING every 5 s)


@dataclass
class Placement:
    """CPU sets.  testpmd: both lcores (main, forwarding) on one CPU."""

    tx_cpu: int = 0  # split: txonly testpmd on A
    rx_cpu: int = 0  # split: rxonly testpmd on B
    gen_cpu: int = 0  # loop: the one mac-forwarding testpmd on A and B
    hub: list[int] = field(default_factory=lambda: [1])
    ep_a: list[int] = field(default_factory=lambda: [1])
    ep_b: list[int] = field(default_factory=lambda: [1])


@dataclass
class RunResult:
    mode: str  # split | loop
    frame_bytes: int
    port_policy: bool
    seconds: float = 0.0
    rx_mpps: float = 0.0
    rx_gbps: float = 0.0
    tx_mpps: float = 0.0
    cpu_percent: dict[str, float] = field(default_factory=dict)
    foreign_cpu_percent: float = 0.0
    # irq+softirq of the whole machine: mostly the kernel's loopback TCP work for our tunnel
    softirq_percent: float = 0.0
    rtt_ms_under_load: list[float] = field(default_factory=list)
    placement: str = ""
    counters: dict[str, object] = field(default_factory=dict)
    error: str | None = None


# --------------------------------------------------------------------------- the VPN


class Stack:
    """A hub and two endpoints (A, B) on loopback; vhost-user sockets a.sock, b.sock."""

    def __init__(self, workdir: Path, *, policy: bool, placement: Placement,
                 subnet: str | None = None) -> None:
        self.workdir, self.policy, self.placement, self.subnet = workdir, policy, placement, subnet
        self.processes: dict[str, trio.Process] = {}
        self.controls = {n: str(workdir / f"{n}.ctl") for n in ("hub", "epa", "epb")}
        self.sock_a, self.sock_b = workdir / "a.sock", workdir / "b.sock"
        self.rtt: list[tuple[float, str, float]] = []  # (time, who, rtt_ms), changes only

    @property
    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.processes.items()}

    async def _spawn(self, name: str, argv: list[str], cpus: list[int]) -> None:
        with (self.workdir / f"{name}.log").open("wb") as log:
            process = await trio.lowlevel.open_process(
                [str(VHOSTVPN_BINARY), *argv, "--log-level", "warning"], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        if cpus:
            os.sched_setaffinity(process.pid, set(cpus))  # threads started later inherit it

    async def start(self) -> None:
        w = self.workdir
        hub_fp = keygen(w / "hub-id")
        peers = [f"{n} {keygen(w / f'{n}-id')}" for n in ("epa", "epb")]
        (w / "peers").write_text("\n".join(peers) + "\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        hub_args = ["hub", "--listen", f"127.0.0.1:{port}", "--identity", str(w / "hub-id"),
                    "--peers", str(w / "peers"), "--control", self.controls["hub"]]
        if not self.policy:
            hub_args.append("--no-port-policy")
        if self.subnet:
            hub_args += ["--subnet", self.subnet, "--state-dir", str(w / "state")]
        await self._spawn("hub", hub_args, self.placement.hub)
        await self._wait_paths("hub", [self.controls["hub"]])
        for name, sock, cpus in (("epa", self.sock_a, self.placement.ep_a),
                                 ("epb", self.sock_b, self.placement.ep_b)):
            await self._spawn(name, [
                "vm", "--socket", str(sock), "--hub", f"127.0.0.1:{port}", "--identity",
                str(w / f"{name}-id"), "--hub-fingerprint", hub_fp, "--name", name,
                "--control", self.controls[name]], cpus)
        await self._wait_paths("epa", [str(self.sock_a), self.controls["epa"]])
        await self._wait_paths("epb", [str(self.sock_b), self.controls["epb"]])
        with trio.fail_after(START_TIMEOUT):
            while True:
                states = [(await self.status(n))["session"]["state"] for n in ("epa", "epb")]
                if states == ["up", "up"]:
                    break
                await trio.sleep(0.1)

    async def _wait_paths(self, name: str, paths: list[str]) -> None:
        with trio.move_on_after(START_TIMEOUT):
            while not all(os.path.exists(p) for p in paths):
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{_tail(self.workdir / f'{name}.log')}")
                await trio.sleep(0.05)
            return
        raise RuntimeError(f"{name}: {paths} not there after {START_TIMEOUT} s")

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            for process in reversed(list(self.processes.values())):
                await _stop_process(process)

    async def status(self, name: str) -> dict:
        with trio.fail_after(10):
            return await trio.to_thread.run_sync(query, self.controls[name],
                                                 abandon_on_cancel=True)

    async def poll_rtt(self) -> None:
        """Record every change of the session RTTs the endpoints and the hub report."""
        last: dict[str, float] = {}
        while True:
            for name in ("epa", "epb", "hub"):
                try:
                    state = await self.status(name)
                except (OSError, ValueError, trio.TooSlowError):
                    continue
                if name == "hub":
                    values = {f"hub:{p['name']}": p.get("rtt_ms") for p in state["ports"]
                              if p.get("kind") == "session"}
                else:
                    values = {name: state["session"]["rtt_ms"]}
                for who, rtt in values.items():
                    if rtt is not None and last.get(who) != rtt:
                        last[who] = rtt
                        self.rtt.append((time.monotonic(), who, rtt))
            await trio.sleep(POLL_SECONDS)

    def rtt_between(self, start: float, end: float) -> list[float]:
        return [rtt for t, _who, rtt in self.rtt if start <= t <= end]


@contextlib.asynccontextmanager
async def vpn_stack(log_dir: Path, tag: str, **kwargs: object) -> AsyncIterator[Stack]:
    """A Stack for the block; its logs end up in log_dir as TAG-NAME.log."""
    workdir = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    stack = Stack(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        async with trio.open_nursery() as nursery:
            try:
                await stack.start()
                nursery.start_soon(stack.poll_rtt)
                yield stack
            finally:
                nursery.cancel_scope.cancel()
                await stack.stop()
    finally:
        for log in workdir.glob("*.log"):
            shutil.copy(log, log_dir / f"{tag}-{log.name}")
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- testpmd runs


def softirq_ticks() -> int:
    """irq + softirq ticks of all CPUs (/proc/stat): not charged to any process."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return int(cpu[5]) + int(cpu[6])


def placement_text(mode: str, p: Placement) -> str:
    gen = (f"txonly testpmd CPU {p.tx_cpu}, rxonly testpmd CPU {p.rx_cpu}" if mode == "split"
           else f"mac-forwarding testpmd CPU {p.gen_cpu}")
    return f"{gen}; hub CPUs {p.hub}, endpoint A CPUs {p.ep_a}, endpoint B CPUs {p.ep_b}"


@contextlib.asynccontextmanager
async def generator(mode: str, stack: Stack, size: int, p: Placement, log_dir: Path,
                    loop_burst: int = LOOP_BURST) -> AsyncIterator[Generator]:
    if mode == "split":
        # The receiver's first burst B -> A comes from its own IP (198.18.0.2) so that the
        # hub's source-address policy lets it through.
        async with split_generator(stack.sock_a, stack.sock_b, size, p.tx_cpu, log_dir,
                                   rx_cpu=p.rx_cpu,
                                   rx_app_args=["--tx-ip=198.18.0.2,198.18.0.1"],
                                   log_prefix=f"split-{size}-") as split:
            yield split
    else:
        # loop: one testpmd, ports A and B, "mac" forwarding (each frame leaves with the
        # sending port's own MAC as source and the other port's as destination, as the
        # endpoints' MAC policy requires).  --tx-first puts one burst per port in flight;
        # after that the same frames circulate A -> B -> A ... (closed loop, both ways).
        config = TestpmdConfig(
            ports=[VirtioUserPort(stack.sock_a, mac=MAC_A),
                   VirtioUserPort(stack.sock_b, mac=MAC_B)],
            forward_mode="mac", lcores=f"(0,1)@{p.gen_cpu}", txpkts=size, tx_first=True,
            burst=loop_burst, eth_peers={0: MAC_B, 1: MAC_A}, total_num_mbufs=16384)
        async with run_testpmd(config, log_path=log_dir / f"loop-{size}.log") as pmd:
            yield Generator(pmd, pmd, rx_ports=[0, 1], tx_ports=[0, 1])


async def measure(mode: str, stack: Stack, size: int, args: argparse.Namespace,
                  log_dir: Path) -> RunResult:
    result = RunResult(mode=mode, frame_bytes=size, port_policy=stack.policy,
                       placement=placement_text(mode, args.placement))
    try:
        with trio.fail_after(args.warmup + args.seconds + 120):
            async with generator(mode, stack, size, args.placement, log_dir,
                                 args.loop_burst) as gen:
                load_start = time.monotonic()
                await trio.sleep(args.warmup)
                pids = {**stack.pids}
                if mode == "split":
                    pids |= {"testpmd tx": gen.sender.pid, "testpmd rx": gen.receiver.pid}
                else:
                    pids["testpmd"] = gen.sender.pid
                start = await gen.sample()
                t0 = {k: cpu_ticks(v) for k, v in pids.items()}
                irq0 = softirq_ticks()
                busy0, wall0, me0 = system_busy_ticks(), time.monotonic(), cpu_ticks(os.getpid())
                await trio.sleep(args.seconds)
                end = await gen.sample()
                t1 = {k: cpu_ticks(v) for k, v in pids.items()}
                busy1, wall1, me1 = system_busy_ticks(), time.monotonic(), cpu_ticks(os.getpid())
                irq1 = softirq_ticks()
                elapsed, wall = end.time - start.time, wall1 - wall0
                rx, tx = end.rx - start.rx, end.tx - start.tx
                result.seconds = round(elapsed, 3)
                result.rx_mpps, result.tx_mpps = rx / elapsed / 1e6, tx / elapsed / 1e6
                result.rx_gbps = rx * size * 8 / elapsed / 1e9
                result.cpu_percent = {k: round(100.0 * (t1[k] - t0[k]) / CLK_TCK / wall, 1)
                                      for k in pids}
                own_ticks = sum(t1[k] - t0[k] for k in pids) + me1 - me0 + irq1 - irq0
                result.softirq_percent = round(100.0 * (irq1 - irq0) / CLK_TCK / wall, 1)
                result.foreign_cpu_percent = round(
                    100.0 * (busy1 - busy0 - own_ticks) / CLK_TCK / wall, 1)
                result.rtt_ms_under_load = stack.rtt_between(load_start + 1.0, time.monotonic())
                result.counters = {n: await stack.status(n) for n in ("hub", "epa", "epb")}
    except Exception as error:  # one failed run must not hide the others
        result.error = f"{type(error).__name__}: {error}"
    return result


async def wait_quiet(limit: float, timeout: float) -> float:
    """Wait (at most `timeout` s) until the machine's busy CPU over 1 s is below `limit` %
    (other sessions' QEMU/testpmd share these 2 CPUs); returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        busy0, t0 = system_busy_ticks(), time.monotonic()
        await trio.sleep(1.0)
        busy = 100.0 * (system_busy_ticks() - busy0) / CLK_TCK / (time.monotonic() - t0)
        if busy < limit or time.monotonic() > deadline:
            return busy
        print(f"   machine busy ({busy:.0f} % CPU), waiting", file=sys.stderr, flush=True)


async def idle_rtt(stack: Stack, seconds: float) -> list[float]:
    start = time.monotonic()
    await trio.sleep(seconds)
    return stack.rtt_between(start - 60, time.monotonic())


# --------------------------------------------------------------------------- in-process ceiling


def codec_ceiling(size: int, seconds: float, identity_dir: Path) -> dict[str, float]:
    """One TLS hop in one process, one CPU: encode a batch of 64 frames into a FRAMES record,
    TLS-encrypt it (memory BIOs, the contexts the tunnel uses), decrypt, decode."""
    from bench.wire import BATCH, open_pair
    from netstack.frame import Frame
    from tunnel.keys import client_ssl_context, load_identity, server_ssl_context
    from tunnel.session import RECEIVE_SIZE
    from tunnel.wire import Frames

    keygen(identity_dir)
    server_ctx = server_ssl_context(load_identity(identity_dir))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ssl_context().wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    wire_c, wire_s = open_pair()
    batch = [Frame(os.urandom(size)) for _ in range(BATCH)]

    def one_batch() -> int:
        record = memoryview(wire_c.send_frames(batch))
        while record:
            record = record[client.write(record):]
        s_in.write(c_out.read())
        while True:
            try:
                wire_s.receive_data(server.read(RECEIVE_SIZE))
            except ssl.SSLWantReadError:
                break
        return sum(len(e.frames) for e in wire_s.next_events() if isinstance(e, Frames))

    best = 0.0
    for _ in range(3):
        frames, t0 = 0, time.perf_counter()
        while (now := time.perf_counter()) - t0 < seconds / 3:
            frames += one_batch()
        best = max(best, frames / (now - t0))
    return {"frame_bytes": size, "mframes_per_s": best / 1e6, "ns_per_frame": 1e9 / best,
            "gbps": best * size * 8 / 1e9, "cipher": client.cipher()[0]}


# --------------------------------------------------------------------------- QEMU guests


async def guests_iperf(args: argparse.Namespace, log_dir: Path) -> dict[str, object]:
    """Two TCG guests, one per endpoint, DHCP from the hub, iperf3 5 s each way."""
    from tests.support.guest import Guest, ensure_image, qemu_available, wait_all_booted

    if not qemu_available():
        return {"error": "qemu-system-x86_64 not installed"}
    await trio.to_thread.run_sync(ensure_image)
    out: dict[str, object] = {"placement": "all unpinned (TCG needs both CPUs)", "runs": []}
    async with vpn_stack(log_dir, "guests", policy=True,
                         placement=Placement(hub=[], ep_a=[], ep_b=[]),
                         subnet="10.77.0.0/24") as stack:
        ga = Guest("ga", socket=stack.sock_a, dhcp=True, stay=True, log_dir=log_dir)
        gb = Guest("gb", socket=stack.sock_b, dhcp=True, stay=True, log_dir=log_dir)
        async with ga, gb:
            boots = await wait_all_booted([ga, gb])
            ip_b = boots[1].ip.split("/")[0]
            await gb.check("iperf3 -s -D >/dev/null 2>&1")
            await trio.sleep(1)
            assert ga.process is not None and gb.process is not None
            pids = {**stack.pids, "qemu A": ga.process.pid, "qemu B": gb.process.pid}
            for reverse in (False, True):
                t0 = {k: cpu_ticks(v) for k, v in pids.items()}
                busy0, wall0 = system_busy_ticks(), time.monotonic()
                start = time.monotonic()
                text = await ga.check(f"iperf3 -c {ip_b} -t {args.iperf_seconds:g} -f m"
                                      f"{' -R' if reverse else ''}", timeout=120)
                t1 = {k: cpu_ticks(v) for k, v in pids.items()}
                busy1, wall1 = system_busy_ticks(), time.monotonic()
                wall = wall1 - wall0
                used = sum(t1[k] - t0[k] for k in pids)
                match = re.search(r"([\d.]+) Mbits/sec\s+(?:\d+\s+)?receiver", text)
                out["runs"].append({  # type: ignore[union-attr]
                    "direction": "B->A" if reverse else "A->B",
                    "gbps_receiver": float(match.group(1)) / 1000 if match else None,
                    "cpu_percent": {k: round(100.0 * (t1[k] - t0[k]) / CLK_TCK / wall, 1)
                                    for k in pids},
                    "foreign_cpu_percent": round(
                        100.0 * (busy1 - busy0 - used) / CLK_TCK / wall, 1),
                    "rtt_ms_under_load": stack.rtt_between(start + 1, time.monotonic()),
                    "iperf3_tail": text.strip().splitlines()[-4:]})
            await ga.check("killall iperf3 || true")
            await gb.check("killall iperf3 || true")
    return out


# --------------------------------------------------------------------------- report


def runs_table(results: Sequence[RunResult]) -> str:
    lines = ["| mode | policy | frame B | RX Mpps | RX Gbit/s | TX Mpps | hub CPU % | ep A CPU % "
             "| ep B CPU % | testpmd CPU % | softirq % | RTT ms under load | other CPU % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.mode} | {'on' if r.port_policy else 'off'} | {r.frame_bytes} | "
                         f"error: {r.error.splitlines()[0][:100]} | | | | | | | | | |")
            continue
        c = r.cpu_percent
        pmd = "+".join(f"{c[k]:.0f}" for k in c if k.startswith("testpmd"))
        rtt = ", ".join(f"{v:.2f}" for v in r.rtt_ms_under_load) or "-"
        lines.append(f"| {r.mode} | {'on' if r.port_policy else 'off'} | {r.frame_bytes} | "
                     f"{r.rx_mpps:.3f} | {r.rx_gbps:.2f} | {r.tx_mpps:.3f} | {c['hub']:.0f} | "
                     f"{c['epa']:.0f} | {c['epb']:.0f} | {pmd} | {r.softirq_percent:.0f} | {rtt} | "
                     f"{r.foreign_cpu_percent:.0f} |")
    return "\n".join(lines)


def report(data: dict) -> str:
    parts = []
    if data.get("idle_rtt_ms"):
        parts.append("Idle session RTT (ms, keepalive PING/PONG, endpoints and hub): "
                     + json.dumps(data["idle_rtt_ms"]))
    if data.get("runs"):
        parts.append(runs_table([RunResult(**r) for r in data["runs"]]))
    for c in data.get("codec", []):
        parts.append(f"codec+TLS ceiling {c['frame_bytes']} B: {c['mframes_per_s']:.3f} Mframes/s"
                     f" ({c['ns_per_frame']:.0f} ns/frame, {c['gbps']:.2f} Gbit/s, "
                     f"{c['cipher']})")
    if data.get("softether"):
        parts.append(softether.markdown(softether.SoftEtherResult(**{
            **data["softether"],
            "runs": [softether.Direction(**r) for r in data["softether"]["runs"]]})))
        if data["softether"].get("error"):
            parts.append(f"SoftEther error: {data['softether']['error']}")
    if data.get("guests"):
        for r in data["guests"].get("runs", []):
            parts.append(f"guests iperf3 {r['direction']}: {r['gbps_receiver']} Gbit/s, CPU "
                         f"{r['cpu_percent']}, other {r['foreign_cpu_percent']} %")
        if data["guests"].get("error"):
            parts.append(f"guests error: {data['guests']['error']}")
    return "\n\n".join(parts)


def cpus(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c != ""]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="split,loop,codec,softether,guests",
                        help="what to run: split (txonly->rxonly, policies on), loop "
                             "(one mac-forwarding testpmd, frames circulate A<->B, "
                             "--no-port-policy), codec, softether, guests")
    parser.add_argument("--sizes", default="64,1500")
    parser.add_argument("--seconds", type=float, default=8.0, help="window per testpmd run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--idle-rtt-seconds", type=float, default=11.0)
    parser.add_argument("--iperf-seconds", type=float, default=5.0)
    parser.add_argument("--tx-cpu", type=int, default=0)
    parser.add_argument("--rx-cpu", type=int, default=0)
    parser.add_argument("--gen-cpu", type=int, default=0)
    parser.add_argument("--hub-cpus", type=cpus, default=[1], help="e.g. 1 or 0,1; empty: any")
    parser.add_argument("--ep-a-cpus", type=cpus, default=[1])
    parser.add_argument("--ep-b-cpus", type=cpus, default=[1])
    parser.add_argument("--loop-burst", type=int, default=LOOP_BURST,
                        help="loop mode: frames per port put in flight (testpmd --burst)")
    parser.add_argument("--quiet-percent", type=float, default=25.0,
                        help="before each run wait until the machine is below this busy %%")
    parser.add_argument("--quiet-timeout", type=float, default=300.0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.parts = [p for p in args.parts.split(",") if p]
    args.placement = Placement(args.tx_cpu, args.rx_cpu, args.gen_cpu, args.hub_cpus,
                               args.ep_a_cpus, args.ep_b_cpus)
    return args


async def run(args: argparse.Namespace, log_dir: Path, data: dict) -> None:
    for mode in ("split", "loop"):
        if mode not in args.parts:
            continue
        policy = mode == "split"  # loop: both ports send from 198.18.0.1
        print(f"-- {mode}: starting hub and endpoints", file=sys.stderr, flush=True)
        async with vpn_stack(log_dir, mode, policy=policy, placement=args.placement) as stack:
            if "idle_rtt_ms" not in data:
                data["idle_rtt_ms"] = await idle_rtt(stack, args.idle_rtt_seconds)
            for size in args.sizes:
                print(f"-- {mode} {size} B", file=sys.stderr, flush=True)
                await wait_quiet(args.quiet_percent, args.quiet_timeout)
                result = await measure(mode, stack, size, args, log_dir)
                if result.error:
                    print(f"   {result.error}", file=sys.stderr)
                data["runs"].append(asdict(result))
    if "guests" in args.parts:
        print("-- QEMU guests", file=sys.stderr, flush=True)
        try:
            data["guests"] = await guests_iperf(args, log_dir)
        except Exception as error:
            data["guests"] = {"error": f"{type(error).__name__}: {error}"}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="tunnel-bench-logs-"))
    data: dict = {"machine": machine_info(), "timestamp": time.strftime("%Y%m%d-%H%M%S"),
                  "settings": {k: (asdict(v) if isinstance(v, Placement) else
                                   str(v) if isinstance(v, Path) else v)
                               for k, v in vars(args).items()},
                  "runs": [], "log_dir": str(log_dir)}
    trio.run(run, args, log_dir, data)
    if "codec" in args.parts:
        print("-- codec+TLS ceiling", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            data["codec"] = [codec_ceiling(s, 3.0, Path(tmp) / f"id{s}") for s in args.sizes]
    if "softether" in args.parts:
        print("-- SoftEther", file=sys.stderr, flush=True)
        data["softether"] = asdict(softether.measure(args.iperf_seconds, log_dir / "softether"))
    text = report(data)
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    output = args.output or RESULTS_DIR / f"tunnel-{data['timestamp']}.json"
    output.write_text(json.dumps({**data, "report": text}, indent=2, default=str))
    print(f"\nJSON: {output}\nlogs: {log_dir}", file=sys.stderr)
    return 0 if all(r["error"] is None for r in data["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
