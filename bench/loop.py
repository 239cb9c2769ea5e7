"""The loop harness: one testpmd forwards in mac mode between two virtio-user ports, a
vhost-user back-end closes the loop, and frames circulate testpmd -> back-end -> testpmd.

Run: .venv/bin/python bench/loop.py [--rounds 3] [--seconds 5] [--sizes 64,1500]
                                    [--backends hub,forwarder,dpdk] [--ring python,native]
Starts and stops only processes it spawned itself (by PID); writes bench/results/loop-*.json.

Topology (see docs/benchmarks.md, "The loop harness"):
1. the back-end under test listens on a.sock and b.sock, pinned to --backend-cpu:
   hub        `vhostvpn hub --socket a.sock --socket b.sock --no-port-policy` (this tree);
   forwarder  bench/loop_forwarder.py: busy-polling Python, A's TX -> B's RX and back, no
              switch (the same-run reference);
   (--ring python,native: one hub and one forwarder variant per value, VHOSTVPN_RING set;
   without it they inherit VHOSTVPN_RING from the environment, if any)
   dpdk       testpmd's vhost PMD, io forwarding (the native ceiling);
2. testpmd, its forwarding lcore on --testpmd-cpu, ports 0 (a.sock) and 1 (b.sock), mac
   forwarding: what port 0 receives goes out of port 1 addressed to port 0's MAC, and back;
   --tx-first injects one burst of --burst frames per port, which then circulate (rings of
   --queue-size hold them all, so none is lost to a full ring);
3. throughput = frames received by both testpmd ports per second, over --seconds, from its
   periodic counters (--stats-period 1): every frame crossed the back-end once.
Rounds are interleaved (round 1: every back-end, round 2: every back-end...); the table gives
the median of rounds.  Each hub run's log is checked for tracebacks and broken devices.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
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

from bench.vhost_switch import (  # noqa: E402
    BACKEND_START_TIMEOUT,
    CLK_TCK,
    _stop_process,
    _tail,
    cpu_ticks,
    foreign_ticks,
    machine_info,
)
from tests.support.testpmd import (  # noqa: E402
    TestpmdConfig,
    VirtioUserPort,
    run_testpmd,
    vhost_switch_config,
    wait_for_path,
)

RESULTS_DIR = ROOT / "bench" / "results"
FORWARDER = ROOT / "bench" / "loop_forwarder.py"
MAC_A = "02:00:00:00:0a:01"  # testpmd port 0, on a.sock
MAC_B = "02:00:00:00:0b:01"  # testpmd port 1, on b.sock
# Bound on one measurement beyond its warm-up and window: starts, stops, stats prints.
RUN_MARGIN_SECONDS = 60.0
BACKENDS = ("hub", "forwarder", "dpdk")
RINGS = ("python", "native")


@dataclass
class Run:
    """One back-end, one frame size, one round."""

    backend: str  # hub, hub[ring=native], forwarder, dpdk
    frame_bytes: int
    round: int
    seconds: float = 0.0
    frames: int = 0
    mpps: float = 0.0
    gbps: float = 0.0
    backend_cpu_percent: float = 0.0
    # Frames per CPU-second the back-end got: what it does per core when it is not starved
    # (a busy poller counts its idle polling too).
    mpps_per_core: float = 0.0
    foreign_cpu_percent: float = 0.0
    load_before: float = 0.0
    tracebacks: int = 0
    broken: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- back-ends


@contextlib.asynccontextmanager
async def python_backend(argv: list[str], env: dict[str, str], sock_a: Path, sock_b: Path,
                         cpu: int, log_path: Path) -> AsyncIterator[int]:
    """A Python back-end process pinned to `cpu`, until both sockets exist; stopped by PID."""
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=ROOT)
    try:
        os.sched_setaffinity(process.pid, {cpu})
        with trio.move_on_after(BACKEND_START_TIMEOUT) as scope:
            while not (sock_a.exists() and sock_b.exists()):
                if process.poll() is not None:
                    raise RuntimeError(f"{argv[2]} exited with code {process.returncode} before "
                                       f"creating its sockets; log tail:\n{_tail(log_path)}")
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            raise RuntimeError(f"no {sock_a} and {sock_b} within {BACKEND_START_TIMEOUT} s; "
                               f"log tail:\n{_tail(log_path)}")
        yield process.pid
    finally:
        with trio.CancelScope(shield=True):
            await _stop_process(process)


@contextlib.asynccontextmanager
async def backend(name: str, workdir: Path, cpu: int, testpmd_cpu: int
                  ) -> AsyncIterator[int]:
    sock_a, sock_b = workdir / "a.sock", workdir / "b.sock"
    log_path = workdir / "backend.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if "[ring=" in name:
        env["VHOSTVPN_RING"] = name.split("[ring=")[1].rstrip("]")
    if name == "dpdk":
        config = vhost_switch_config(sock_a, sock_b, lcores=f"0@{testpmd_cpu},1@{cpu}")
        async with run_testpmd(config, log_path=log_path) as pmd:
            await wait_for_path(sock_a, BACKEND_START_TIMEOUT)
            await wait_for_path(sock_b, BACKEND_START_TIMEOUT)
            yield pmd.pid
        return
    if name.startswith("forwarder"):
        argv = [sys.executable, str(FORWARDER), str(sock_a), str(sock_b)]
    else:  # hub, hub[ring=X]
        argv = [sys.executable, "-m", "tunnel.cli", "hub", "--socket", str(sock_a),
                "--socket", str(sock_b), "--no-port-policy", "--control",
                str(workdir / "hub.control")]
    async with python_backend(argv, env, sock_a, sock_b, cpu, log_path) as pid:
        yield pid


# --------------------------------------------------------------------------- one run


async def measure(name: str, size: int, round_: int, args: argparse.Namespace,
                  log_dir: Path) -> Run:
    run = Run(backend=name, frame_bytes=size, round=round_, load_before=os.getloadavg()[0])
    workdir = Path(tempfile.mkdtemp(prefix="loop-run-"))  # short: socket paths <= 107 bytes
    config = TestpmdConfig(
        ports=[VirtioUserPort(workdir / "a.sock", mac=MAC_A, queue_size=args.queue_size),
               VirtioUserPort(workdir / "b.sock", mac=MAC_B, queue_size=args.queue_size)],
        forward_mode="mac", eth_peers={0: MAC_B, 1: MAC_A}, tx_first=True, txpkts=size,
        burst=args.burst, lcores=f"(0,1)@{args.testpmd_cpu}", total_num_mbufs=16384)
    try:
        with trio.fail_after(args.warmup + args.seconds + RUN_MARGIN_SECONDS):
            async with (
                backend(name, workdir, args.backend_cpu, args.testpmd_cpu) as pid,
                run_testpmd(config, log_path=workdir / "testpmd.log") as pmd,
            ):
                own = [pid, pmd.pid, os.getpid()]
                await trio.sleep(args.warmup)
                await pmd.next_sample()
                start = _received(pmd)
                ticks0, foreign0, wall0 = cpu_ticks(pid), foreign_ticks(own), time.monotonic()
                await trio.sleep(args.seconds)
                await pmd.next_sample()
                end = _received(pmd)
                ticks1, foreign1, wall1 = cpu_ticks(pid), foreign_ticks(own), time.monotonic()
        run.seconds = round(end[0] - start[0], 3)
        run.frames = end[1] - start[1]
        run.mpps = run.frames / run.seconds / 1e6
        run.gbps = run.frames * size * 8 / run.seconds / 1e9
        run.backend_cpu_percent = 100.0 * (ticks1 - ticks0) / CLK_TCK / (wall1 - wall0)
        run.foreign_cpu_percent = 100.0 * (foreign1 - foreign0) / CLK_TCK / (wall1 - wall0)
        if run.backend_cpu_percent > 0:
            run.mpps_per_core = run.mpps * 100.0 / run.backend_cpu_percent
        if run.frames == 0:
            run.error = "no frames circulated"
    except Exception as error:  # one failed run must not hide the others
        run.error = f"{type(error).__name__}: {error}"
    finally:
        log_path = workdir / "backend.log"
        if log_path.exists():
            text = log_path.read_text(errors="replace")
            run.tracebacks = text.count("Traceback")
            run.broken = text.count("device broken")
            if run.tracebacks or run.broken:
                run.notes.append(f"back-end log: {run.tracebacks} tracebacks, {run.broken} "
                                 "broken devices")
        keep = log_dir / f"{name}-{size}-r{round_}"
        keep.mkdir(parents=True, exist_ok=True)
        for log in workdir.glob("*.log"):
            shutil.copy(log, keep / log.name)
        shutil.rmtree(workdir, ignore_errors=True)
    return run


def _received(pmd: object) -> tuple[float, int]:
    """(time of the stats print, frames received by ports 0 and 1 so far)."""
    stats = [pmd.stats(port) for port in (0, 1)]  # type: ignore[attr-defined]
    if any(s is None for s in stats):
        raise RuntimeError("testpmd printed no statistics for a port")
    return max(s.time for s in stats if s), sum(s.rx_packets for s in stats if s)


# --------------------------------------------------------------------------- report


def medians(runs: Sequence[Run], names: Sequence[str], sizes: Sequence[int]) -> list[dict]:
    rows = []
    for size in sizes:
        for name in names:
            ok = [r for r in runs if r.backend == name and r.frame_bytes == size and not r.error]
            failed = [r for r in runs if r.backend == name and r.frame_bytes == size and r.error]
            rows.append({
                "backend": name, "frame_bytes": size, "rounds": len(ok), "failed": len(failed),
                "mpps": statistics.median(r.mpps for r in ok) if ok else None,
                "gbps": statistics.median(r.gbps for r in ok) if ok else None,
                "mpps_all": [round(r.mpps, 3) for r in ok],
                "backend_cpu_percent": statistics.median(r.backend_cpu_percent for r in ok)
                if ok else None,
                "mpps_per_core": statistics.median(r.mpps_per_core for r in ok) if ok else None,
                "foreign_cpu_percent": statistics.median(r.foreign_cpu_percent for r in ok)
                if ok else None,
                "tracebacks": sum(r.tracebacks for r in runs
                                  if r.backend == name and r.frame_bytes == size)})
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    ref = {(r["backend"], r["frame_bytes"]): r["mpps"] for r in rows}
    lines = ["| back-end | frame B | Mpps (median) | Gbit/s | rounds (Mpps) | CPU % "
             "| Mpps per core | vs forwarder | vs DPDK | others' CPU % | tracebacks |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["mpps"] is None:
            lines.append(f"| {r['backend']} | {r['frame_bytes']} | failed | | | | | | | | |")
            continue
        cells = []
        ring = r["backend"][r["backend"].find("[") :] if "[" in r["backend"] else ""
        for other in (f"forwarder{ring}", "dpdk"):  # the forwarder over the same ring walk
            base = ref.get((other, r["frame_bytes"]))
            cells.append(f"{r['mpps'] / base:.2f}" if base else "-")
        rounds = " ".join(f"{m:.3f}" for m in r["mpps_all"])
        lines.append(f"| {r['backend']} | {r['frame_bytes']} | {r['mpps']:.3f} | "
                     f"{r['gbps']:.2f} | {rounds} | {r['backend_cpu_percent']:.0f} | "
                     f"{r['mpps_per_core']:.3f} | {cells[0]} | {cells[1]} | "
                     f"{r['foreign_cpu_percent']:.0f} | {r['tracebacks']} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="window per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="before the window (default 1)")
    parser.add_argument("--sizes", default="64,1500", help="frame sizes in bytes, no FCS")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma list of {', '.join(BACKENDS)} (default: all)")
    parser.add_argument("--ring", default="",
                        help="comma list of VHOSTVPN_RING values (python, native): one hub "
                             "and one forwarder variant each; default: the environment's")
    parser.add_argument("--burst", type=int, default=512,
                        help="frames injected per port by --tx-first (testpmd's max, 512)")
    parser.add_argument("--queue-size", type=int, default=1024,
                        help="virtio-user ring size: at least the frames in flight")
    parser.add_argument("--backend-cpu", type=int, default=1)
    parser.add_argument("--testpmd-cpu", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if any(not 60 <= s <= 2000 for s in args.sizes):
        parser.error(f"frame sizes must be 60..2000 bytes (one mbuf), got {args.sizes}")
    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown back-ends {sorted(unknown)}; pick from {BACKENDS}")
    rings = [r for r in args.ring.split(",") if r]
    if unknown := set(rings) - set(RINGS):
        parser.error(f"unknown --ring values {sorted(unknown)}; pick from {RINGS}")
    if 2 * args.burst > args.queue_size:
        parser.error("--queue-size must hold every frame in flight (2 x --burst)")
    args.names = []
    for name in backends:
        if name in ("hub", "forwarder") and rings:
            args.names += [f"{name}[ring={ring}]" for ring in rings]
        else:
            args.names.append(name)
    return args


async def run_all(args: argparse.Namespace, log_dir: Path) -> list[Run]:
    runs = []
    for round_ in range(1, args.rounds + 1):
        for size in args.sizes:
            for name in args.names:
                print(f"-- round {round_}: {name} {size} B", file=sys.stderr, flush=True)
                run = await measure(name, size, round_, args, log_dir)
                print(f"   {run.mpps:.3f} Mpps, back-end CPU {run.backend_cpu_percent:.0f}%"
                      + (f", error: {run.error.splitlines()[0]}" if run.error else "")
                      + (f", {'; '.join(run.notes)}" if run.notes else ""),
                      file=sys.stderr, flush=True)
                runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="loop-logs-"))
    load = os.getloadavg()
    runs = trio.run(run_all, args, log_dir)
    rows = medians(runs, args.names, args.sizes)
    table = markdown_table(rows)
    print(table)
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; logs in {log_dir}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = args.output or RESULTS_DIR / f"loop-{stamp}.json"
    output.write_text(json.dumps({
        "machine": machine_info(), "timestamp": stamp, "load_before": load,
        "load_after": os.getloadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "medians": rows, "runs": [asdict(r) for r in runs], "table": table}, indent=2))
    print(f"JSON: {output}")
    return 0 if all(r["mpps"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
