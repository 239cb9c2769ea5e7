"""Idle cost of the vhost-user rings: the CPU time and wake-ups of a `vhostvpn vm` whose guest
sends nothing (the rings' safety nets: the re-poll every REPOLL_SECONDS, the NOFD poll),
interleaved A/B between source trees.

Each round starts a hub (loopback) and `vhostvpn vm --socket S --queues 1 --hub ...` from one
tree, waits for the vm's session, and connects the model front-end
(tests/support/virtio_driver.py) from this process: queue pair 0 up, 256 RX buffers posted
and kicked (with --nofd-rx the RX ring's kick fd is then replaced by none, NOFD), 2 s to
settle, then the vm's CPU time (every thread's /proc/PID/task/*/schedstat) and context
switches (wake-ups) over --seconds (the session's keepalive included, the same in every
tree); the next round does the same from the next tree.

Run: .venv/bin/python bench/idle_rings.py --tree /work/main --tree . [--rounds 3]
     [--seconds 20] [--nofd-rx]   (a tree given as PATH@PYTHON runs under that interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.virtio_driver import GuestRam, VhostUserFrontend  # noqa: E402
from tunnel.keys import identity_fingerprint, keygen  # noqa: E402

SETTLE_SECONDS = 2.0
START_TIMEOUT = 20.0
HUB = "127.0.0.1:47816"


def threads_cpu_and_switches(pid: int) -> tuple[int, int]:
    """(CPU ns, context switches) summed over every thread of `pid`."""
    cpu = switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    switches += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return cpu, switches


async def idle_round(pid: int, sock: Path, seconds: float, nofd_rx: bool) -> dict[str, float]:
    with GuestRam(1 << 24) as ram:
        async with VhostUserFrontend.connect(sock, ram) as fe:
            fe.net.post_rx(256)
            fe.kick(0)
            if nofd_rx:
                await fe.set_vring_kick(0, None)
            await trio.sleep(SETTLE_SECONDS)
            cpu0, switches0 = threads_cpu_and_switches(pid)
            start = time.monotonic()
            await trio.sleep(seconds)
            cpu1, switches1 = threads_cpu_and_switches(pid)
            elapsed = time.monotonic() - start
    return {"cpu_ms_per_s": round((cpu1 - cpu0) / 1e6 / elapsed, 3),
            "switches_per_s": round((switches1 - switches0) / elapsed, 1)}


def run_round(tree_arg: Path, workdir: Path, seconds: float, nofd_rx: bool) -> dict[str, float]:
    tree_text, _, interpreter = str(tree_arg).partition("@")
    tree = Path(tree_text).resolve()
    env = {"PYTHONPATH": f"{tree}:{sysconfig.get_path('purelib')}",
           "PATH": os.environ.get("PATH", "")}
    w = workdir
    if not (w / "hub-id").exists():
        keygen(w / "hub-id")
        (w / "peers").write_text(f"vm {keygen(w / 'vm-id')}\n")
    python = [interpreter or sys.executable, "-m", "tunnel.cli"]
    sock = w / "vm.sock"
    processes = []
    try:
        for argv in (
            ["hub", "--listen", HUB, "--identity", str(w / "hub-id"), "--peers",
             str(w / "peers")],
            ["vm", "--socket", str(sock), "--queues", "1", "--hub", HUB, "--identity",
             str(w / "vm-id"), "--hub-fingerprint", identity_fingerprint(w / "hub-id"),
             "--control", str(w / "vm.ctl")],
        ):
            with open(w / f"{argv[0]}.log", "ab") as log:
                processes.append(subprocess.Popen([*python, *argv, "--log-level", "warning"],
                                                  stdout=log, stderr=subprocess.STDOUT,
                                                  cwd=tree, env=env))
            time.sleep(0.3)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            state = json.loads(subprocess.run(
                [*python, "status", "--control", str(w / "vm.ctl"), "--json"],
                capture_output=True, text=True, cwd=tree, env=env).stdout or "{}")
            if state.get("session", {}).get("state") == "up" and sock.exists():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vm from {tree} did not come up: see {w}/*.log")
            time.sleep(0.2)
        return trio.run(idle_round, processes[1].pid, sock, seconds, nofd_rx)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--nofd-rx", action="store_true",
                        help="the RX ring without a kick fd (VRING_NOFD): polled")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {str(tree): [] for tree in args.tree}
    with tempfile.TemporaryDirectory(prefix="vring16-idle-") as tmp:
        for round_ in range(args.rounds):
            for tree in args.tree:
                row = run_round(tree, Path(tmp), args.seconds, args.nofd_rx)
                rows[str(tree)].append(row)
                print(json.dumps({"round": round_, "tree": str(tree), **row}), flush=True)
    for tree, results in rows.items():
        print(json.dumps({"tree": tree, "median": {
            key: statistics.median(r[key] for r in results) for key in results[0]}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
