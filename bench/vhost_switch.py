"""Benchmark a two-port vhost-user switch back-end: DPDK testpmd's vhost PMD vs `vhostvpn hub`.

Run: .venv/bin/python bench/vhost_switch.py [--seconds N] [--sizes 64,1500] [--backend both]
Starts and stops only processes it spawned itself; writes bench/results/*.json (gitignored).

Path of a frame (topology "combined", the default; see docs/benchmarks.md):
1. one testpmd, two virtio-user ports (A on a.sock, B on b.sock), flowgen on one lcore:
   every loop it receives-and-frees on each port, then transmits a burst on each port;
2. the back-end under test moves frames a.sock -> b.sock and b.sock -> a.sock;
3. the same testpmd counts them as RX on the other port.
Topology "split" is txonly testpmd -> back-end -> rxonly testpmd (three busy pollers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.testpmd import (  # noqa: E402
    Testpmd,
    TestpmdConfig,
    VirtioUserPort,
    run_testpmd,
    vhost_switch_config,
    wait_for_path,
)

RESULTS_DIR = ROOT / "bench" / "results"
VHOSTVPN_BINARY = ROOT / ".venv" / "bin" / "vhostvpn"

MAC_A = "02:00:00:00:0a:01"  # virtio-user port on a.sock (sender in split topology)
MAC_B = "02:00:00:00:0b:01"  # virtio-user port on b.sock (receiver in split topology)

BACKEND_START_TIMEOUT = 20.0
BACKEND_STOP_TIMEOUT = 5.0
PERF_TIMEOUT_MARGIN = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
FOREIGN_CPU_WARNING = 10.0  # percent of one CPU used by others before a result is flagged


@dataclass
class Result:
    """One (backend, frame size) measurement."""

    backend: str
    topology: str
    frame_bytes: int
    seconds: float
    rx_frames: int
    tx_frames: int
    rx_mpps: float
    rx_gbps: float
    tx_mpps: float
    backend_pid: int
    backend_cpu_percent: float
    syscall_tool: str
    # CPU used by processes this benchmark did not start, during the window (0 = quiet machine).
    foreign_cpu_percent: float = 0.0
    syscalls_per_second: float | None = None
    syscalls_per_frame: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- back-ends


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; fields[0] is state
    return int(fields[11]) + int(fields[12])  # stat fields 14 and 15


def system_busy_ticks() -> int:
    """Non-idle ticks of all CPUs (user+nice+system+irq+softirq+steal) from /proc/stat."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in cpu[:8])
    return user + nice + system + irq + softirq + steal


def foreign_ticks(own_pids: Sequence[int]) -> int:
    """Busy ticks of the whole machine minus those of our own processes."""
    return system_busy_ticks() - sum(cpu_ticks(pid) for pid in own_pids)


@contextlib.asynccontextmanager
async def dpdk_backend(sock_a: Path, sock_b: Path, cpu: int, gen_cpu: int,
                       log_dir: Path) -> AsyncIterator[int]:
    """testpmd vhost PMD io-fwd: forwarding lcore alone on `cpu`, sleeping main lcore on gen_cpu."""
    config = vhost_switch_config(sock_a, sock_b, lcores=f"0@{gen_cpu},1@{cpu}")
    async with run_testpmd(config, log_path=log_dir / "backend.log") as pmd:
        await wait_for_path(sock_a, BACKEND_START_TIMEOUT)
        await wait_for_path(sock_b, BACKEND_START_TIMEOUT)
        yield pmd.pid


@contextlib.asynccontextmanager
async def vhostvpn_backend(sock_a: Path, sock_b: Path, cpu: int,
                           log_dir: Path) -> AsyncIterator[int]:
    """`vhostvpn hub --socket A --socket B` pinned to `cpu`; it listens, testpmd connects.
    Its control socket sits next to A (the default path is shared by every hub on the host).

    Port policies are off (`--no-port-policy`), as the reference has none, and testpmd's
    flowgen sends the same source IP on both ports (IP anti-spoofing would drop one direction).
    Their cost is measured in-process by bench/datapath.py --policy.
    """
    if not VHOSTVPN_BINARY.exists():
        raise RuntimeError(f"{VHOSTVPN_BINARY} not found (pip install -e . in the venv)")
    log_path = log_dir / "backend.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [str(VHOSTVPN_BINARY), "hub", "--socket", str(sock_a), "--socket", str(sock_b),
             "--no-port-policy", "--control", str(sock_a.parent / "hub.ctl")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        os.sched_setaffinity(process.pid, {cpu})  # threads started later inherit it
        with trio.move_on_after(BACKEND_START_TIMEOUT) as scope:
            while not (sock_a.exists() and sock_b.exists()):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"vhostvpn hub exited with code {process.returncode} before creating "
                        f"its sockets; log tail:\n{_tail(log_path)}")
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            raise RuntimeError(f"vhostvpn hub did not create {sock_a} and {sock_b} within "
                               f"{BACKEND_START_TIMEOUT} s; log tail:\n{_tail(log_path)}")
        yield process.pid
    finally:
        with trio.CancelScope(shield=True):
            await _stop_process(process)


async def _stop_process(process: trio.Process) -> None:
    """SIGINT this one process, wait, then SIGKILL it by PID as a last resort."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    with trio.move_on_after(BACKEND_STOP_TIMEOUT):
        await process.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with trio.move_on_after(BACKEND_STOP_TIMEOUT):
        await process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


# --------------------------------------------------------------------------- generators


@dataclass
class Counters:
    """Receiver/sender totals at one stats print."""

    time: float
    rx: int
    tx: int


class Generator:
    """Where frames come from and are counted: one combined testpmd or a tx/rx pair."""

    def __init__(self, sender: Testpmd, receiver: Testpmd, rx_ports: Sequence[int],
                 tx_ports: Sequence[int]) -> None:
        self.sender, self.receiver = sender, receiver
        self.rx_ports, self.tx_ports = rx_ports, tx_ports

    @property
    def pids(self) -> list[int]:
        return sorted({self.sender.pid, self.receiver.pid})

    async def sample(self) -> Counters:
        """Wait for the receiver's next stats print and read both sides' totals."""
        await self.receiver.next_sample()
        rx_stats = [self.receiver.stats(p) for p in self.rx_ports]
        tx_stats = [self.sender.stats(p) for p in self.tx_ports]
        if any(s is None for s in rx_stats + tx_stats):
            raise RuntimeError("testpmd printed no statistics for some port")
        return Counters(time=max(s.time for s in rx_stats if s),
                        rx=sum(s.rx_packets for s in rx_stats if s),
                        tx=sum(s.tx_packets for s in tx_stats if s))


@contextlib.asynccontextmanager
async def combined_generator(sock_a: Path, sock_b: Path, size: int, cpu: int,
                             log_dir: Path) -> AsyncIterator[Generator]:
    """One testpmd, ports A and B, flowgen on one lcore: sends and receives on both ports.

    The ports' MACs and --eth-peer are set, but flowgen ignores them: on both ports every
    frame goes from 00:01:02:03:04:00 to 00:01:02:03:04:01, which no port owns, so a learning
    switch floods each frame (to the one other port) and moves the source MAC between the
    ports each batch.  bench/loop.py measures learned unicast."""
    config = TestpmdConfig(
        ports=[VirtioUserPort(sock_a, mac=MAC_A), VirtioUserPort(sock_b, mac=MAC_B)],
        forward_mode="flowgen", flowgen_flows=1, lcores=f"(0,1)@{cpu}", txpkts=size,
        eth_peers={0: MAC_B, 1: MAC_A}, total_num_mbufs=16384)
    async with run_testpmd(config, log_path=log_dir / "generator.log") as pmd:
        yield Generator(pmd, pmd, rx_ports=[0, 1], tx_ports=[0, 1])


@contextlib.asynccontextmanager
async def split_generator(sock_a: Path, sock_b: Path, size: int, cpu: int,
                          log_dir: Path, *, rx_cpu: int | None = None,
                          rx_app_args: Sequence[str] = (), log_prefix: str = ""
                          ) -> AsyncIterator[Generator]:
    """txonly testpmd on A addressed to B's MAC; rxonly testpmd on B (on `rx_cpu` if given,
    with `rx_app_args`); their logs are <log_prefix>sender.log and <log_prefix>receiver.log.

    The receiver starts first with --tx-first: one burst of 32 frames B -> A (to MAC_A) so a
    learning switch knows MAC_B before the sender starts; the sender's frames are then
    unicast to B (with only two ports, flooding would deliver them to B anyway)."""
    rx = TestpmdConfig(ports=[VirtioUserPort(sock_b, mac=MAC_B)], forward_mode="rxonly",
                       lcores=f"(0,1)@{cpu if rx_cpu is None else rx_cpu}", tx_first=True,
                       eth_peers={0: MAC_A}, txpkts=size, extra_app_args=rx_app_args)
    tx = TestpmdConfig(ports=[VirtioUserPort(sock_a, mac=MAC_A)], forward_mode="txonly",
                       lcores=f"(0,1)@{cpu}", txpkts=size, eth_peers={0: MAC_B})
    async with (
        run_testpmd(rx, log_path=log_dir / f"{log_prefix}receiver.log") as receiver,
        run_testpmd(tx, log_path=log_dir / f"{log_prefix}sender.log") as sender,
    ):
        yield Generator(sender, receiver, rx_ports=[0], tx_ports=[0])


# --------------------------------------------------------------------------- syscalls


async def count_syscalls(pid: int, seconds: float, tool: str, log_dir: Path) -> float | None:
    """Syscalls/s of `pid` (all threads) over `seconds`; None if the tool is unavailable.

    perf counts the raw_syscalls:sys_enter tracepoint in the kernel (cheap); strace -c stops
    the process at every syscall (slows it a lot, so rates then are lower bounds)."""
    if tool == "perf" and shutil.which("perf"):
        argv = ["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p", str(pid),
                "--", "sleep", str(seconds)]
        result = await _run_bounded(argv, seconds + PERF_TIMEOUT_MARGIN)
        (log_dir / "perf.txt").write_text(result)
        for line in result.splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[2].startswith("raw_syscalls:sys_enter"):
                return float(parts[0]) / seconds if parts[0].isdigit() else 0.0
        return None
    if tool == "strace" and shutil.which("strace"):
        out = log_dir / "strace.txt"
        process = await trio.lowlevel.open_process(
            ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await trio.sleep(seconds)
        with trio.CancelScope(shield=True):
            await _stop_process(process)
        match = re.search(r"\s(\d+)(?:\s+\d+)?\s+total\s*$", out.read_text(), re.MULTILINE)
        return int(match.group(1)) / seconds if match else None
    return None


async def _run_bounded(argv: list[str], timeout: float) -> str:
    with trio.fail_after(timeout):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      check=False)
    return (done.stdout + done.stderr).decode(errors="replace")


# --------------------------------------------------------------------------- one run


async def measure(backend: str, topology: str, size: int, args: argparse.Namespace,
                  log_dir: Path) -> Result:
    """Start back-end then generator, warm up, measure throughput+CPU, then syscalls."""
    workdir = Path(tempfile.mkdtemp(prefix=f"vhost-switch-{backend}-"))
    log_dir = log_dir / f"{backend}-{topology}-{size}"
    log_dir.mkdir(parents=True, exist_ok=True)
    sock_a, sock_b = workdir / "a.sock", workdir / "b.sock"
    if backend == "dpdk":
        backend_cm = dpdk_backend(sock_a, sock_b, args.backend_cpu, args.gen_cpu, log_dir)
    else:
        backend_cm = vhostvpn_backend(sock_a, sock_b, args.backend_cpu, log_dir)
    generator_cm = combined_generator if topology == "combined" else split_generator
    try:
        with trio.fail_after(args.warmup + args.seconds + args.syscall_seconds + 90):
            async with backend_cm as pid, generator_cm(
                    sock_a, sock_b, size, args.gen_cpu, log_dir) as gen:
                await trio.sleep(args.warmup)
                own = [pid, os.getpid(), *gen.pids]
                start = await gen.sample()
                ticks0, foreign0, wall0 = cpu_ticks(pid), foreign_ticks(own), time.monotonic()
                await trio.sleep(args.seconds)
                end = await gen.sample()
                ticks1, foreign1, wall1 = cpu_ticks(pid), foreign_ticks(own), time.monotonic()
                elapsed = end.time - start.time
                rx, tx = end.rx - start.rx, end.tx - start.tx
                result = Result(
                    backend=backend, topology=topology, frame_bytes=size,
                    seconds=round(elapsed, 3), rx_frames=rx, tx_frames=tx,
                    rx_mpps=rx / elapsed / 1e6, rx_gbps=rx * size * 8 / elapsed / 1e9,
                    tx_mpps=tx / elapsed / 1e6, backend_pid=pid,
                    backend_cpu_percent=100.0 * (ticks1 - ticks0) / CLK_TCK / (wall1 - wall0),
                    syscall_tool=args.syscalls,
                    foreign_cpu_percent=100.0 * (foreign1 - foreign0) / CLK_TCK / (wall1 - wall0))
                if result.foreign_cpu_percent > FOREIGN_CPU_WARNING:
                    result.notes.append(f"other processes used {result.foreign_cpu_percent:.0f}% "
                                        "CPU during the window: numbers are contaminated")
                if args.syscalls != "none" and args.syscall_seconds > 0:
                    before = await gen.sample()
                    per_second = await count_syscalls(pid, args.syscall_seconds, args.syscalls,
                                                      log_dir)
                    after = await gen.sample()
                    frames_per_second = (after.rx - before.rx) / (after.time - before.time)
                    if per_second is not None:
                        result.syscalls_per_second = per_second
                        if frames_per_second > 0:
                            result.syscalls_per_frame = per_second / frames_per_second
                    if args.syscalls == "strace":
                        result.notes.append("strace slows the back-end; syscalls/frame is "
                                            "measured at the strace-reduced rate")
                return result
    except Exception as error:  # one failed combination must not hide the others
        return Result(backend=backend, topology=topology, frame_bytes=size, seconds=0.0,
                      rx_frames=0, tx_frames=0, rx_mpps=0.0, rx_gbps=0.0, tx_mpps=0.0,
                      backend_pid=0, backend_cpu_percent=0.0, syscall_tool=args.syscalls,
                      error=f"{type(error).__name__}: {error}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- report


def markdown_table(results: Sequence[Result]) -> str:
    reference = {(r.topology, r.frame_bytes): r for r in results
                 if r.backend == "dpdk" and r.error is None}
    lines = ["| back-end | topology | frame B | RX Mpps | RX Gbit/s | TX Mpps | back-end CPU % "
             "| syscalls/frame | vs DPDK | other CPU % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.backend} | {r.topology} | {r.frame_bytes} | error: "
                         f"{r.error.splitlines()[0][:80]} | | | | | | |")
            continue
        ref = reference.get((r.topology, r.frame_bytes))
        ratio = f"{r.rx_mpps / ref.rx_mpps:.3f}" if ref and ref.rx_mpps > 0 else "-"
        per_frame = "-" if r.syscalls_per_frame is None else f"{r.syscalls_per_frame:.4f}"
        lines.append(f"| {r.backend} | {r.topology} | {r.frame_bytes} | {r.rx_mpps:.3f} | "
                     f"{r.rx_gbps:.2f} | {r.tx_mpps:.3f} | {r.backend_cpu_percent:.0f} | "
                     f"{per_frame} | {ratio} | {r.foreign_cpu_percent:.0f} |")
    return "\n".join(lines)


def machine_info() -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown")
    dpdk = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpdk"], capture_output=True,
                          text=True, check=False).stdout.strip()
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "dpdk_package": dpdk or "unknown"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="measurement window per run (default 4)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up before measuring (default 1)")
    parser.add_argument("--sizes", default="64,1500", help="frame sizes in bytes, no FCS")
    parser.add_argument("--backend", choices=["dpdk", "vhostvpn", "both"], default="both")
    parser.add_argument("--topology", choices=["combined", "split", "both"], default="combined",
                        help="combined: one flowgen testpmd on both ports (default); "
                             "split: txonly testpmd -> back-end -> rxonly testpmd")
    parser.add_argument("--syscalls", choices=["perf", "strace", "none"], default="perf",
                        help="how to count back-end syscalls (default perf: in-kernel count)")
    parser.add_argument("--syscall-seconds", type=float, default=2.0,
                        help="syscall counting window, after the throughput window")
    parser.add_argument("--backend-cpu", type=int, default=1, help="CPU for the back-end")
    parser.add_argument("--gen-cpu", type=int, default=0, help="CPU for testpmd generator(s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per combination; the table keeps the one with the least "
                             "CPU used by other processes (shared machines)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if any(not 60 <= s <= 2000 for s in args.sizes):
        parser.error(f"frame sizes must be 60..2000 bytes (one mbuf), got {args.sizes}")
    return args


async def run(args: argparse.Namespace) -> tuple[list[Result], list[Result]]:
    backends = ["dpdk", "vhostvpn"] if args.backend == "both" else [args.backend]
    topologies = ["combined", "split"] if args.topology == "both" else [args.topology]
    log_dir = Path(tempfile.mkdtemp(prefix="vhost-switch-logs-"))
    results: list[Result] = []
    all_runs: list[Result] = []
    for topology in topologies:
        for size in args.sizes:
            for backend in backends:
                runs = []
                for attempt in range(args.repeat):
                    print(f"-- {backend} {topology} {size} B (run {attempt + 1}/{args.repeat})",
                          file=sys.stderr, flush=True)
                    result = await measure(backend, topology, size, args, log_dir)
                    if result.error:
                        print(f"   {result.error.splitlines()[0]}", file=sys.stderr)
                    runs.append(result)
                results.append(least_contaminated(runs))
                all_runs.extend(runs)
    print(f"   logs in {log_dir}", file=sys.stderr)
    return results, all_runs


def least_contaminated(runs: Sequence[Result]) -> Result:
    """The successful run with the least CPU used by other processes (else the first)."""
    ok = [r for r in runs if r.error is None]
    return min(ok, key=lambda r: r.foreign_cpu_percent) if ok else runs[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results, all_runs = trio.run(run, args)
    table = markdown_table(results)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = args.output or RESULTS_DIR / f"vhost_switch-{stamp}.json"
    output.write_text(json.dumps({
        "machine": machine_info(), "timestamp": stamp,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [asdict(r) for r in results], "all_runs": [asdict(r) for r in all_runs],
        "table": table}, indent=2))
    print(f"\nJSON: {output}")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
