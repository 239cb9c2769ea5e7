"""The direct TAP pair, interleaved A/B between source trees: the probe behind "Direct paths:
the endpoint's cost per byte" in docs/benchmarks.md.

A hub and two `vhostvpn host --tap` endpoints (a, b) as bench/hosts.py's TAP rows, a and b
also joined by a veth of their own on which both `--listen`, so the stream between them goes
direct.  Each round starts the three processes from one tree, waits until a and b see each
other direct, runs one iperf3 stream a -> b (and, with --relayed, the same stream again with
the direct veth down, through the hub), stops them, and the next tree does the same, so
every tree sees the same machine load.  Per stream: Gbit/s, machine CPU s per GB (both vCPUs'
busy time from /proc/stat), the two endpoints' CPU s per GB and each process's CPU %
(/proc/PID/schedstat).

Run (root): .venv/bin/python bench/direct_ab.py --tree OLD --tree NEW [--rounds 4]
            [--seconds 4] [--relayed]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import CLK_TCK, Netns, ip  # noqa: E402
from bench.hub_latency import Vpn, cpu_ns, in_ns  # noqa: E402
from bench.softether import system_busy_ticks  # noqa: E402

A, B = "10.78.0.1", "10.78.0.2"
DIRECT = {"a": "10.205.0.1", "b": "10.205.0.2"}
DIRECT_PORT = 7100
SWITCH_TIMEOUT = 15.0


class Topology:
    """hub <-veth-> a, hub <-veth-> b, and a <-veth-> b for the direct sessions."""

    def __init__(self) -> None:
        self.ns = Netns("dab", ("hub", "a", "b"))

    def __enter__(self) -> Topology:
        ns = self.ns
        try:
            ns.create()
            tag = ns.tag
            ns.veth("hub", f"dal1{tag}", "10.206.1.1/24", "a", f"dar1{tag}", "10.206.1.2/24")
            ns.veth("hub", f"dal2{tag}", "10.206.2.1/24", "b", f"dar2{tag}", "10.206.2.2/24")
            self.direct_link = f"dad1{tag}"
            ns.veth("a", self.direct_link, f"{DIRECT['a']}/24", "b", f"dad2{tag}",
                    f"{DIRECT['b']}/24")
        except BaseException:
            ns.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.ns.remove()


class DirectVpn(Vpn):
    """bench/hub_latency.py's hub + two TAP endpoints, the endpoints also `--listen`ing on
    the direct veth."""

    def _start(self, name: str, argv: list[str]) -> None:
        if name in DIRECT:
            argv = [*argv, "--listen", f"{DIRECT[name]}:{DIRECT_PORT}"]
        argv = [a.replace("10.203.", "10.206.") for a in argv]  # this topology's veths
        super()._start(name, argv)

    def status(self, side: str) -> dict:
        return json.loads(subprocess.run(
            [self.python, "-m", "tunnel.cli", "status", "--control", str(self.w / f"{side}.ctl"),
             "--json"], capture_output=True, text=True, cwd=self.tree, env=self.env
        ).stdout or "{}")

    def path(self, topo: Topology, up: bool) -> None:
        """The direct veth up (a <-> b go direct) or down (through the hub); returns once
        both ends see it."""
        ip("-n", self.names["a"], "link", "set", topo.direct_link, "up" if up else "down")
        want = "direct" if up else "relayed"
        deadline = time.monotonic() + SWITCH_TIMEOUT
        while True:
            paths = [[p["path"] for p in self.status(s).get("direct", {}).get("peers", [])]
                     for s in DIRECT]
            if all(p == [want] for p in paths):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"a <-> b did not go {want}: {paths}")
            time.sleep(0.05)


def stream(vpn: DirectVpn, seconds: float) -> dict[str, object]:
    """One iperf3 stream a -> b: Gbit/s, machine CPU s/GB, each process's CPU %."""
    a, b = vpn.names["a"], vpn.names["b"]
    pids = {n: p.pid for n, p in vpn.processes.items()}
    srv = subprocess.Popen(["ip", "netns", "exec", b, "iperf3", "-s", "-1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        busy0 = system_busy_ticks()
        cpu0 = {n: cpu_ns([pid]) for n, pid in pids.items()}
        started = time.monotonic()
        out = in_ns(a, "iperf3", "-c", B, "-t", str(seconds), "-J", timeout=seconds + 30)
        elapsed = time.monotonic() - started
        busy = (system_busy_ticks() - busy0) / CLK_TCK
        cpu_s = {n: (cpu_ns([pid]) - cpu0[n]) / 1e9 for n, pid in pids.items()}
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
    # The endpoints' own CPU per GB: what this probe is about, and less moved by other
    # work on the machine than the machine's busy time.
    return {"gbits": round(received["bits_per_second"] / 1e9, 3),
            "cpu_s_per_gb": round(busy / gbytes, 2),
            "endpoints_cpu_s_per_gb": round((cpu_s["a"] + cpu_s["b"]) / gbytes, 2),
            "cpu_percent": {n: round(100 * c / elapsed) for n, c in cpu_s.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--relayed", action="store_true",
                        help="also the same stream through the hub, each round")
    args = parser.parse_args()
    results: dict[str, list] = {str(t): [] for t in args.tree}
    with tempfile.TemporaryDirectory(prefix="dab-") as tmp, Topology() as topo:
        for round_ in range(args.rounds):
            trees = args.tree if round_ % 2 == 0 else list(reversed(args.tree))
            for tree in trees:
                row: dict[str, object] = {}
                with DirectVpn(topo, tree, Path(tmp)) as vpn:  # type: ignore[arg-type]
                    vpn.path(topo, True)
                    row["direct"] = stream(vpn, args.seconds)
                    if args.relayed:
                        vpn.path(topo, False)
                        row["relayed"] = stream(vpn, args.seconds)
                ip("-n", topo.ns.names["a"], "link", "set", topo.direct_link, "up")
                row["load_avg"] = Path("/proc/loadavg").read_text().split()[0]
                results[str(tree)].append(row)
                print(round_, tree, json.dumps(row), flush=True)
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
        line = (f"{tree}: direct {med('direct.gbits')} Gbit/s, {med('direct.cpu_s_per_gb')} "
                f"s/GB, endpoints {med('direct.endpoints_cpu_s_per_gb')} s/GB, "
                f"{med('direct.cpu_percent.a')}/{med('direct.cpu_percent.b')} %")
        if args.relayed:
            line += (f" | relayed {med('relayed.gbits')} Gbit/s, hub "
                     f"{med('relayed.cpu_percent.hub')} %")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
