"""Host to host through the VPN: one iperf3 TCP stream between two network namespaces, each
joined to a hub by `vhostvpn host --tap` (hub in a third namespace), the same between two more
namespaces joined by `vhostvpn host --tun`, and the TAP pair again over a direct path (issue 13:
both endpoints `--listen` on a veth of their own between them; "vhostvpn tap" is measured with
that veth down, so its frames fall back to the hub, "vhostvpn direct" with it up, the hub's
switch counters recorded around each direct run to show the stream did not cross it), next
to a raw veth pair and SoftEther, OpenVPN over TCP and wireguard-go (bench/baselines.py)
measured in the same run, interleaved, median of N rounds.
Also ping p50/p99 idle and under load (iputils ping for every row), and CPU per VPN process.

Run (root): .venv/bin/python bench/hosts.py [--rounds 3] [--seconds 5] [--no-softether]
            [--no-openvpn] [--no-wireguard] [--nice N]
--nice N starts every vhostvpn daemon with `--nice N`: SoftEther runs its server and clients at
nice -20 (it raises its own priority at start), the others at the nice value they started with.
Everything lives in namespaces it creates and removes; results in bench/results/hosts-*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import baselines  # noqa: E402
from bench.baselines import idle_ping, ip, measure_direction  # noqa: E402
from tunnel.keys import keygen  # noqa: E402

HUB_PORT = 7777
START_TIMEOUT = 20.0


# The VPN members: namespace -> (device mode, address on the VPN, veth subnet index).
MEMBERS = {"a": ("tap", "10.77.0.1"), "b": ("tap", "10.77.0.2"),
           "c": ("tun", "10.77.0.3"), "d": ("tun", "10.77.0.4")}


# The TAP pair's own veth for direct sessions (a, b: --listen on these addresses).
DIRECT_ADDRESSES = {"a": "10.203.0.1", "b": "10.203.0.2"}
DIRECT_PORT = 7100
DIRECT_SWITCH_TIMEOUT = 15.0


class Namespaces:
    """hub <-veth-> a, b, c, d (10.201.N.0/24, N = 1..4); a <-> b directly (10.203.0.1/2,
    for direct sessions); plus a raw veth pair r1 <-> r2 (10.202.0.1/2) for the reference."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.names = {k: f"vvb{k}{tag}" for k in ("hub", *MEMBERS, "r1", "r2")}
        self.tag = tag

    def __enter__(self) -> Namespaces:
        try:
            for name in self.names.values():
                ip("netns", "add", name)
                ip("-n", name, "link", "set", "lo", "up")
            for n, side in enumerate(MEMBERS, 1):
                left, right = f"vvl{n}{self.tag}", f"vvr{n}{self.tag}"
                ip("link", "add", left, "netns", self.names["hub"], "type", "veth", "peer",
                   "name", right, "netns", self.names[side])
                ip("-n", self.names["hub"], "addr", "add", f"10.201.{n}.1/24", "dev", left)
                ip("-n", self.names[side], "addr", "add", f"10.201.{n}.2/24", "dev", right)
                ip("-n", self.names["hub"], "link", "set", left, "up")
                ip("-n", self.names[side], "link", "set", right, "up")
            self.direct_link = f"vvd1{self.tag}"
            ip("link", "add", self.direct_link, "netns", self.names["a"], "type", "veth",
               "peer", "name", f"vvd2{self.tag}", "netns", self.names["b"])
            for side, dev in (("a", self.direct_link), ("b", f"vvd2{self.tag}")):
                ip("-n", self.names[side], "addr", "add", f"{DIRECT_ADDRESSES[side]}/24",
                   "dev", dev)
                ip("-n", self.names[side], "link", "set", dev, "up")
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
    """A hub, two `vhostvpn host --tap` endpoints (a, b) and two `vhostvpn host --tun`
    endpoints (c, d) in the namespaces, all on one VPN segment."""

    def __init__(self, ns: Namespaces, workdir: Path, nice: int | None = None) -> None:
        self.ns = ns
        self.workdir = workdir
        self.nice = [] if nice is None else ["--nice", str(nice)]
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Vhostvpn:
        w = self.workdir
        hub_fp = keygen(w / "hub-id")
        (w / "peers").write_text("".join(f"{n} {keygen(w / f'{n}-id')}\n" for n in MEMBERS))
        python = [sys.executable, "-m", "tunnel.cli"]
        self._start("hub", [*python, "hub", "--listen", f"0.0.0.0:{HUB_PORT}", "--identity",
                            str(w / "hub-id"), "--peers", str(w / "peers"),
                            "--control", str(w / "hub.ctl"), *self.nice])
        for n, (side, (mode, address)) in enumerate(MEMBERS.items(), 1):
            listen = (["--listen", f"{DIRECT_ADDRESSES[side]}:{DIRECT_PORT}"]
                      if side in DIRECT_ADDRESSES else [])
            self._start(side, [*python, "host", f"--{mode}", "vv0", "--address",
                               f"{address}/24", "--hub", f"10.201.{n}.1:{HUB_PORT}",
                               "--identity", str(w / f"{side}-id"), "--hub-fingerprint",
                               hub_fp, "--name", side, "--control", str(w / f"{side}.ctl"),
                               *listen, *self.nice])
        deadline = time.monotonic() + START_TIMEOUT
        for side in MEMBERS:
            while True:
                state = self.status(side)
                if state.get("session", {}).get("state") == "up":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"endpoint {side} did not come up: {state}")
                time.sleep(0.2)
        return self

    def status(self, name: str) -> dict:
        """`vhostvpn status --json` of the hub or a member ({} if it does not answer)."""
        return json.loads(subprocess.run(
            [sys.executable, "-m", "tunnel.cli", "status", "--control",
             str(self.workdir / f"{name}.ctl"), "--json"],
            capture_output=True, text=True, cwd=ROOT).stdout or "{}")

    def direct(self, up: bool) -> float:
        """Bring a <-> b's own veth up (their frames go direct) or down (they fall back to
        the hub); return once both see the other on that path: after how many seconds."""
        ip("-n", self.ns.names["a"], "link", "set", self.ns.direct_link, "up" if up else "down")
        want = "direct" if up else "relayed"
        started = time.monotonic()
        while True:
            paths = [[p["path"] for p in self.status(side).get("direct", {}).get("peers", [])
                      if p["name"] in DIRECT_ADDRESSES] for side in DIRECT_ADDRESSES]
            if all(path == [want] for path in paths) and (not up or self._settled_direct()):
                return round(time.monotonic() - started, 2)
            if time.monotonic() - started > DIRECT_SWITCH_TIMEOUT:
                raise RuntimeError(f"a <-> b did not go {want}: {paths}")
            time.sleep(0.05)

    def _settled_direct(self) -> bool:
        """Do a few pings a -> b all take the direct session now?  A session is up before
        frames take it: each source goes direct VOUCH_DELAY_SECONDS after it crossed the
        hub, and an expired ARP entry sends a broadcast through the hub, so timing right
        after the status said "direct" measured a mix of both paths."""
        def sent_direct() -> int:
            peers = self.status("a").get("direct", {}).get("peers", [])
            return sum(p["out_frames"] for p in peers if p["name"] == "b")

        before = sent_direct()
        count = 5
        subprocess.run(["ip", "netns", "exec", self.ns.names["a"], "ping", "-q", "-c",
                        str(count), "-i", "0.05", MEMBERS["b"][1]], capture_output=True,
                       timeout=20)
        return sent_direct() - before >= count

    def hub_frames(self, *members: str) -> dict[str, int]:
        """The hub's switch counters for `members`' sessions, both ways, summed."""
        ports = [p for p in self.status("hub").get("ports", []) if p["name"] in members]
        return {key: sum(p[key] for p in ports)
                for key in ("in_frames", "in_bytes", "out_frames", "out_bytes")}

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (kept for the process)
        ns = self.ns.names["hub" if name == "hub" else name]
        self.processes[name] = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        time.sleep(0.5)

    def pids(self, *members: str) -> dict[str, int]:
        """The hub's and `members`' Python processes (`ip netns exec` execs: same PID)."""
        return {name: p.pid for name, p in self.processes.items()
                if name == "hub" or name in members}

    def __exit__(self, *exc: object) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-softether", action="store_true")
    parser.add_argument("--no-openvpn", action="store_true")
    parser.add_argument("--no-wireguard", action="store_true")
    parser.add_argument("--nice", type=int, help="start the vhostvpn daemons with --nice N")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    kinds = [k for k, off in ((baselines.SoftEther, args.no_softether),
                              (baselines.OpenVPN, args.no_openvpn),
                              (baselines.WireGuardGo, args.no_wireguard)) if not off]
    if kinds:
        baselines.apt_install(baselines.PACKAGES)
    rows: dict[str, list[dict]] = {"veth": [], "vhostvpn tap": [], "vhostvpn direct": [],
                                   "vhostvpn tun": [], **{k.name: [] for k in kinds}}
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
        with Vhostvpn(ns, Path(tmp), args.nice) as vpn:
            pairs = {"vhostvpn tap": ("a", "b"), "vhostvpn direct": ("a", "b"),
                     "vhostvpn tun": ("c", "d")}
            switched: list[float] = []  # seconds each path change took
            for row, (x, y) in pairs.items():
                if row != "vhostvpn tun":
                    switched.append(vpn.direct(row == "vhostvpn direct"))
                idle[row] = idle_ping(n[x], MEMBERS[y][1])
            idle["veth"] = idle_ping(n["r1"], "10.202.0.2")
            for round_ in range(args.rounds):
                for direction in ("forward", "reverse"):
                    for row, (x, y) in pairs.items():
                        src, dst = (x, y) if direction == "forward" else (y, x)
                        if row != "vhostvpn tun":
                            switched.append(vpn.direct(row == "vhostvpn direct"))
                        hub_before = vpn.hub_frames(src, dst)
                        result = measure_direction(n[src], n[dst], MEMBERS[dst][1],
                                                   args.seconds, vpn.pids(src, dst))
                        hub_after = vpn.hub_frames(src, dst)
                        rows[row].append(
                            {"round": round_, "direction": f"{src}->{dst}", **result,
                             "hub_counters": {k: hub_after[k] - hub_before[k]
                                              for k in hub_after}})
                    rows["veth"].append({"round": round_, "direction": direction,
                                         **measure_direction(n["r1"], n["r2"], "10.202.0.2",
                                                            args.seconds, {})})
                for other in others:
                    rows[other.name] += baselines.measure_round(other, round_, args.seconds)
    summary = {name: baselines.summarize(runs) for name, runs in rows.items() if runs}
    report = {"rows": rows, "summary": summary, "idle_ping_ms": idle, "errors": errors,
              "direct_switch_seconds": switched, "vhostvpn_nice": args.nice}
    out = ROOT / "bench" / "results" / f"hosts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(baselines.table(summary, idle))
    for row in ("vhostvpn tap", "vhostvpn direct"):
        crossed = [r["hub_counters"]["in_bytes"] for r in rows[row]]
        print(f"{row}: bytes the hub's switch took from a/b during each stream: {crossed}")
    if errors:
        print(json.dumps({"errors": errors}, indent=1))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
