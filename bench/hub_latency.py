"""Latency and CPU per GB through the hub, interleaved A/B between source trees: the probe
behind "Latency through the hub (issue 13)" in docs/benchmarks.md.

Two namespaces with `vhostvpn host --tap` joined to a hub in a third (as bench/hosts.py's
TAP row); each round starts the three processes from one tree, measures, stops them, and
the next round does the same with the next tree, so every tree sees the same machine load:
  idle:  ping every 0.2 s (the issue's idle ping), p50/p99
  fast:  ping every 10 ms, p50/p99, and the CPU time of the three processes per ping
  load:  one iperf3 stream A -> B with a ping every 50 ms alongside: Gbit/s, ping p50/p99,
         machine CPU s per GB received (both vCPUs' busy time from /proc/stat)
plus, once, the raw veth's CPU s/GB and `openssl speed`'s AES-256-GCM rate: the floor of the
hub topology (3 x veth + 4 AES passes) the issue measures CPU per GB against.
`--target gateway`: the hub gets a subnet and A's idle and fast pings go to its gateway
address (answered by the hub's own services: A's endpoint and the hub, no B).

Run (root): .venv/bin/python bench/hub_latency.py --tree OLD --tree NEW [--rounds 4]
(a tree given as PATH@PYTHON runs under that interpreter, with this one's packages).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import CLK_TCK, Netns, rtt_percentiles  # noqa: E402
from bench.softether import system_busy_ticks  # noqa: E402
from tunnel.keys import identity_fingerprint, keygen  # noqa: E402

HUB_PORT = 7777
START_TIMEOUT = 20.0
A, B = "10.78.0.1", "10.78.0.2"
SUBNET, GATEWAY = "10.78.0.0/24", "10.78.0.254"  # --target gateway
FAST_COUNT = 400


def in_ns(ns: str, *argv: str, timeout: float) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout).stdout


def ping(ns: str, address: str, interval: float, count: int) -> dict[str, float] | None:
    return rtt_percentiles(in_ns(ns, "ping", "-i", str(interval), "-c", str(count), address,
                                 timeout=interval * count + 20))


def stream(client: str, server: str, address: str, seconds: float) -> dict[str, object]:
    """One iperf3 stream client -> server, a ping every 50 ms alongside."""
    srv = subprocess.Popen(["ip", "netns", "exec", server, "iperf3", "-s", "-1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        pinger = subprocess.Popen(["ip", "netns", "exec", client, "ping", "-i", "0.05", "-c",
                                   str(int(seconds * 20) - 10), address],
                                  stdout=subprocess.PIPE, text=True)
        busy0 = system_busy_ticks()
        started = time.monotonic()
        out = in_ns(client, "iperf3", "-c", address, "-t", str(seconds), "-J",
                    timeout=seconds + 30)
        elapsed = time.monotonic() - started
        busy = (system_busy_ticks() - busy0) / CLK_TCK
        ping_out = pinger.communicate(timeout=seconds + 30)[0]
        srv.wait(10)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(5)
    try:
        received = json.loads(out)["end"]["sum_received"]
    except (ValueError, KeyError):
        return {"error": out[-300:]}
    gbytes = received["bytes"] / 1e9
    return {"gbits": round(received["bits_per_second"] / 1e9, 3),
            "cpu_s_per_gb": round(busy / gbytes, 2), "elapsed": round(elapsed, 1),
            "ping": rtt_percentiles(ping_out)}


class Topology:
    def __init__(self) -> None:
        self.ns = Netns("lty", ("hub", "a", "b", "r1", "r2"))

    def __enter__(self) -> Topology:
        ns = self.ns
        try:
            ns.create()
            tag = ns.tag
            ns.veth("hub", f"ltl1{tag}", "10.203.1.1/24", "a", f"ltr1{tag}", "10.203.1.2/24")
            ns.veth("hub", f"ltl2{tag}", "10.203.2.1/24", "b", f"ltr2{tag}", "10.203.2.2/24")
            ns.veth("r1", f"ltx1{tag}", "10.204.0.1/24", "r2", f"ltx2{tag}", "10.204.0.2/24")
        except BaseException:
            ns.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.ns.remove()


class Vpn:
    """hub + two TAP endpoints, run from `tree`."""

    def __init__(self, topo: Topology, tree: Path, workdir: Path, gateway: bool = False) -> None:
        self.names = topo.ns.names
        self.gateway = gateway  # the hub answers at GATEWAY
        # TREE@PYTHON: that tree's code run by another interpreter (this one's packages).
        tree_text, _, interpreter = str(tree).partition("@")
        self.tree = Path(tree_text).resolve()
        self.python = interpreter or sys.executable
        self.env = {"PYTHONPATH": f"{self.tree}:{sysconfig.get_path('purelib')}",
                    "PATH": os.environ.get("PATH", "")}
        self.w = workdir
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Vpn:
        w = self.w
        if not (w / "hub-id").exists():
            keygen(w / "hub-id")
            (w / "peers").write_text("".join(f"{n} {keygen(w / f'{n}-id')}\n" for n in "ab"))
        hub_fp = identity_fingerprint(w / "hub-id")
        python = [self.python, "-m", "tunnel.cli"]
        self._start("hub", [*python, "hub", "--listen", f"0.0.0.0:{HUB_PORT}", "--identity",
                            str(w / "hub-id"), "--peers", str(w / "peers"),
                            "--control", str(w / "hub.ctl"),
                            *(["--subnet", SUBNET, "--gateway", GATEWAY] if self.gateway
                              else [])])
        for n, (side, address) in enumerate((("a", A), ("b", B)), 1):
            self._start(side, [*python, "host", "--tap", "vv0", "--address", f"{address}/24",
                               "--hub", f"10.203.{n}.1:{HUB_PORT}", "--identity",
                               str(w / f"{side}-id"), "--hub-fingerprint", hub_fp,
                               "--name", side, "--control", str(w / f"{side}.ctl")])
        deadline = time.monotonic() + START_TIMEOUT
        for side in "ab":
            while True:
                state = json.loads(subprocess.run(
                    [*python, "status", "--control", str(w / f"{side}.ctl"), "--json"],
                    capture_output=True, text=True, cwd=self.tree, env=self.env).stdout or "{}")
                if state.get("session", {}).get("state") == "up":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"endpoint {side} did not come up: {state}")
                time.sleep(0.2)
        # Both MACs learned and ARP resolved before anything is timed.
        in_ns(self.names["a"], "ping", "-c", "3", "-i", "0.2", B, timeout=20)
        if self.gateway:
            in_ns(self.names["a"], "ping", "-c", "3", "-i", "0.2", GATEWAY, timeout=20)
        return self

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.w / f"{name}.log", "ab")  # noqa: SIM115 (kept for the process)
        self.processes[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.names[name], *argv], stdout=log,
            stderr=subprocess.STDOUT, cwd=self.tree,
            env=self.env)
        time.sleep(0.3)

    def __exit__(self, *exc: object) -> None:
        for p in self.processes.values():
            p.terminate()
        for p in self.processes.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def cpu_ns(pids: list[int]) -> int:
    """Time the processes ran, in ns (/proc/PID/schedstat; their main threads)."""
    return sum(int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) for pid in pids)


def measure(vpn: Vpn, seconds: float, idle_count: int, target: str = B) -> dict[str, object]:
    """Idle and fast pings to `target`, then (unless `seconds` is 0) the stream A -> B with
    pings."""
    a, b = vpn.names["a"], vpn.names["b"]
    pids = [p.pid for p in vpn.processes.values()]
    idle = ping(a, target, 0.2, idle_count)
    before = cpu_ns(pids)
    fast = ping(a, target, 0.01, FAST_COUNT)
    cpu_per_ping = (cpu_ns(pids) - before) / FAST_COUNT / 1e3
    return {"idle": idle, "fast": fast, "vpn_cpu_us_per_ping": round(cpu_per_ping),
            "load": stream(a, b, B, seconds) if seconds else {}}


def floor(topo: Topology, seconds: float) -> dict[str, float]:
    veth = stream(topo.ns.names["r1"], topo.ns.names["r2"], "10.204.0.2", seconds)
    out = subprocess.run(["openssl", "speed", "-evp", "aes-256-gcm", "-bytes", "16384",
                          "-seconds", "2"], capture_output=True, text=True).stdout
    rate = float(re.findall(r"(?i)aes-256-gcm\s+([\d.]+)k", out)[-1]) * 1e3 / 1e9  # GB/s
    return {"veth_cpu_s_per_gb": veth["cpu_s_per_gb"], "aes_gb_per_s": round(rate, 2),
            "floor_s_per_gb": round(3 * veth["cpu_s_per_gb"] + 4 / rate, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="of the stream under load; 0: pings only")
    parser.add_argument("--idle-count", type=int, default=20)
    parser.add_argument("--target", choices=("host", "gateway"), default="host",
                        help="what A pings idle and fast: B, or the hub's gateway address")
    args = parser.parse_args()
    results: dict[str, list] = {str(t): [] for t in args.tree}
    with tempfile.TemporaryDirectory(prefix="lty-") as tmp, Topology() as topo:
        for round_ in range(args.rounds):
            trees = args.tree if round_ % 2 == 0 else list(reversed(args.tree))
            for tree in trees:
                gateway = args.target == "gateway"
                with Vpn(topo, tree, Path(tmp), gateway) as vpn:
                    row = measure(vpn, args.seconds, args.idle_count,
                                  GATEWAY if gateway else B)
                row["load_avg"] = Path("/proc/loadavg").read_text().split()[0]
                results[str(tree)].append(row)
                print(round_, tree, json.dumps(row), flush=True)
        base = floor(topo, args.seconds or 4.0)
    print(json.dumps(base))
    for tree, rows in results.items():
        def med(path: str, rows: list = rows) -> float:
            values = []
            for r in rows:
                v: object = r
                for k in path.split("."):
                    v = v.get(k) if isinstance(v, dict) else None
                if v is not None:
                    values.append(v)
            return round(statistics.median(values), 3) if values else float("nan")
        print(f"{tree}: idle p50 {med('idle.p50')} p99 {med('idle.p99')} | fast p50 "
              f"{med('fast.p50')} p99 {med('fast.p99')} | "
              f"{med('vpn_cpu_us_per_ping')} us VPN CPU/ping | load p50 {med('load.ping.p50')} "
              f"p99 {med('load.ping.p99')} | {med('load.gbits')} Gbit/s | "
              f"{med('load.cpu_s_per_gb')} s/GB = "
              f"{med('load.cpu_s_per_gb') / base['floor_s_per_gb']:.2f}x floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
