"""Host to host through the VPN: one iperf3 TCP stream between two network namespaces, each
joined to a hub by `vhostvpn host --tap` (hub in a third namespace), next to a raw veth pair
and SoftEther (bench/softether.py), OpenVPN over TCP and wireguard-go (bench/baselines.py)
measured in the same run, interleaved, median of N rounds.
Also ping p50/p99 idle and under load, and CPU per VPN process.

Run (root): .venv/bin/python bench/hosts.py [--rounds 3] [--seconds 5] [--no-softether]
            [--no-openvpn] [--no-wireguard]
Everything lives in namespaces it creates and removes; results in bench/results/hosts-*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunnel.keys import keygen  # noqa: E402

HUB_PORT = 7777
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def in_ns(ns: str, *argv: str, timeout: float = 60.0) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True,
                          text=True, timeout=timeout).stdout


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Namespaces:
    """hub <-veth-> a, hub <-veth-> b (10.201.1.0/24, 10.201.2.0/24); plus a raw veth pair
    r1 <-> r2 (10.202.0.1/2) for the reference."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.names = {k: f"vvb{k}{tag}" for k in ("hub", "a", "b", "r1", "r2")}
        self.tag = tag

    def __enter__(self) -> Namespaces:
        try:
            for name in self.names.values():
                ip("netns", "add", name)
                ip("-n", name, "link", "set", "lo", "up")
            for n, side in ((1, "a"), (2, "b")):
                left, right = f"vvl{n}{self.tag}", f"vvr{n}{self.tag}"
                ip("link", "add", left, "netns", self.names["hub"], "type", "veth", "peer",
                   "name", right, "netns", self.names[side])
                ip("-n", self.names["hub"], "addr", "add", f"10.201.{n}.1/24", "dev", left)
                ip("-n", self.names[side], "addr", "add", f"10.201.{n}.2/24", "dev", right)
                ip("-n", self.names["hub"], "link", "set", left, "up")
                ip("-n", self.names[side], "link", "set", right, "up")
            left, right = f"vvx1{self.tag}", f"vvx2{self.tag}"
            ip("link", "add", left, "netns", self.names["r1"], "type", "veth", "peer", "name",
               right, "netns", self.names["r2"])
            ip("-n", self.names["r1"], "addr", "add", "10.202.0.1/24", "dev", left)
            ip("-n", self.names["r2"], "addr", "add", "10.202.0.2/24", "dev", right)
            ip("-n", self.names["r1"], "link", "set", left, "up")
            ip("-n", self.names["r2"], "link", "set", right, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.names.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


class Vhostvpn:
    """A hub and two `vhostvpn host --tap` endpoints in the namespaces."""

    def __init__(self, ns: Namespaces, workdir: Path) -> None:
        self.ns = ns
        self.workdir = workdir
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Vhostvpn:
        w = self.workdir
        hub_fp = keygen(w / "hub-id")
        (w / "peers").write_text("".join(f"{n} {keygen(w / f'{n}-id')}\n" for n in "ab"))
        python = [sys.executable, "-m", "tunnel.cli"]
        self._start("hub", [*python, "hub", "--listen", f"0.0.0.0:{HUB_PORT}", "--identity",
                            str(w / "hub-id"), "--peers", str(w / "peers"),
                            "--control", str(w / "hub.ctl")])
        for n, side in ((1, "a"), (2, "b")):
            self._start(side, [*python, "host", "--tap", "vv0", "--address",
                               f"10.77.0.{n}/24", "--hub", f"10.201.{n}.1:{HUB_PORT}",
                               "--identity", str(w / f"{side}-id"), "--hub-fingerprint",
                               hub_fp, "--name", side, "--control", str(w / f"{side}.ctl")])
        deadline = time.monotonic() + START_TIMEOUT
        for side in "ab":
            while True:
                state = json.loads(subprocess.run(
                    [*python, "status", "--control", str(w / f"{side}.ctl"), "--json"],
                    capture_output=True, text=True, cwd=ROOT).stdout or "{}")
                if state.get("session", {}).get("state") == "up":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"endpoint {side} did not come up: {state}")
                time.sleep(0.2)
        return self

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (kept for the process)
        ns = self.ns.names["hub" if name == "hub" else name]
        self.processes[name] = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        time.sleep(0.5)

    def pids(self) -> dict[str, int]:
        """The Python processes (children of `ip netns exec`, which execs: same PID)."""
        return {name: p.pid for name, p in self.processes.items()}

    def __exit__(self, *exc: object) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def iperf(client_ns: str, server_ns: str, address: str, seconds: float,
          pids: dict[str, int] | None = None) -> dict[str, object]:
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    before = {n: cpu_seconds(p) for n, p in (pids or {}).items()}
    ping = subprocess.Popen(["ip", "netns", "exec", client_ns, "ping", "-i", "0.2", "-c",
                             str(int(seconds * 5)), address], stdout=subprocess.PIPE, text=True)
    started = time.monotonic()
    out = in_ns(client_ns, "iperf3", "-c", address, "-t", str(seconds), "-J",
                timeout=seconds + 30)
    elapsed = time.monotonic() - started
    after = {n: cpu_seconds(p) for n, p in (pids or {}).items()}
    ping_out = ping.communicate(timeout=seconds + 30)[0]
    server.wait(10)
    result = json.loads(out)
    gbits = result["end"]["sum_received"]["bits_per_second"] / 1e9
    return {"gbits": round(gbits, 3), "ping_loaded_ms": rtt_percentiles(ping_out),
            "cpu_percent": {n: round(100 * (after[n] - before[n]) / elapsed)
                            for n in before}}


def rtt_percentiles(ping_output: str) -> dict[str, float] | None:
    rtts = sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", ping_output))
    if not rtts:
        return None
    return {"p50": round(rtts[len(rtts) // 2], 3),
            "p99": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], 3)}


def idle_ping(client_ns: str, address: str) -> dict[str, float] | None:
    out = subprocess.run(["ip", "netns", "exec", client_ns, "ping", "-i", "0.2", "-c", "20",
                          address], capture_output=True, text=True, timeout=30).stdout
    return rtt_percentiles(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-softether", action="store_true")
    parser.add_argument("--no-openvpn", action="store_true")
    parser.add_argument("--no-wireguard", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    from bench import baselines

    kinds = [k for k, off in ((baselines.OpenVPN, args.no_openvpn),
                              (baselines.WireGuardGo, args.no_wireguard)) if not off]
    if kinds:
        baselines.ensure_installed()
    rows: dict[str, list[dict]] = {"veth": [], "vhostvpn tap": [], "softether": [],
                                   **{k.name: [] for k in kinds}}
    idle: dict[str, object] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="vhostvpn-hosts-") as tmp, Namespaces() as ns, \
            contextlib.ExitStack() as stack:
        n = ns.names
        others = []
        for kind in kinds:
            try:
                other = stack.enter_context(kind(Path(tmp)))
            except Exception as error:  # reported; the rest still runs
                errors[kind.name] = str(error)[-2000:]
                continue
            others.append(other)
            idle[other.name] = baselines.idle_ping(other.endpoints()[0], other.addr_b)
        with Vhostvpn(ns, Path(tmp)) as vpn:
            idle["vhostvpn tap"] = idle_ping(n["a"], "10.77.0.2")
            idle["veth"] = idle_ping(n["r1"], "10.202.0.2")
            for round_ in range(args.rounds):
                for direction in ("a->b", "b->a"):
                    src, dst, addr = ((n["a"], n["b"], "10.77.0.2") if direction == "a->b"
                                      else (n["b"], n["a"], "10.77.0.1"))
                    rows["vhostvpn tap"].append(
                        {"round": round_, "direction": direction,
                         **iperf(src, dst, addr, args.seconds, vpn.pids())})
                    rows["veth"].append({"round": round_, "direction": direction,
                                         **iperf(n["r1"], n["r2"], "10.202.0.2", args.seconds)})
                if not args.no_softether:
                    from bench import softether

                    result = softether.measure(args.seconds)
                    data = softether.asdict(result) if hasattr(softether, "asdict") else {}
                    rows["softether"].append({"round": round_, **data})
                for other in others:
                    rows[other.name] += baselines.measure_round(other, round_, args.seconds)
    summary = {}
    for name, runs in rows.items():
        gbits = [r["gbits"] for r in runs if "gbits" in r]
        gbits += [run["gbps_receiver"] for r in runs for run in r.get("runs", [])
                  if run.get("gbps_receiver")]  # softether.measure() reports per direction
        if gbits:
            summary[name] = {"median_gbits": round(statistics.median(gbits), 3),
                             "runs": len(gbits)}
    for name in ("openvpn", "wireguard-go"):
        if name in summary:
            summary[name] = baselines.summarize(rows[name])
    report = {"rows": rows, "summary": summary, "idle_ping_ms": idle, "errors": errors}
    out = ROOT / "bench" / "results" / f"hosts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({"summary": summary, "idle_ping_ms": idle}, indent=1))
    print(baselines.table({k: v for k, v in summary.items() if k in ("openvpn", "wireguard-go")},
                          idle))
    if errors:
        print(json.dumps({"errors": errors}, indent=1))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
