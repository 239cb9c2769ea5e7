"""OpenVPN (TCP, TLS, AES-256-GCM, dev tun, userspace), wireguard-go (UDP, userspace) and
SoftEther (bench/softether.py's set-up) as host-to-host baselines: namespace A talks to
namespace B through the VPN, one iperf3 TCP stream per direction, ping p50/p99 idle and every
0.2 s under load, CPU % of the VPN processes and "other CPU %" (machine busy ticks minus our
processes: includes the kernel's softirq work for this traffic and anything else running).

Topologies:
  OpenVPN:     client A  <-veth->  server (middle namespace, client-to-client)  <-veth->  client B
  wireguard-go: peer A <-veth-> peer B, directly (WireGuard has no hub; a relay would be a third
               peer routing between two tunnels, not measured here).
  SoftEther:   vpnclient's NIC in A  <-TLS->  vpnserver's virtual hub  <-TLS->  its NIC in B
               (one vpnclient process, two accounts; bench/softether.py).

Run (root): .venv/bin/python bench/baselines.py [--rounds 3] [--seconds 5] [--only openvpn]
bench/hosts.py runs both in its interleaved rounds.  Everything lives in namespaces created
and removed here, configs and keys in a temp dir; only PIDs started here are signalled.
"""

from __future__ import annotations

import argparse
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
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import softether
from bench.softether import apt_install, cpu_ticks, system_busy_ticks

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0
PACKAGES = ["openvpn", "wireguard-go", "wireguard-tools", "iperf3"]
OVPN_PORT = 1194
WG_PORT = 51820


# --------------------------------------------------------------------------- helpers


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def in_ns(ns: str, *argv: str, timeout: float = 30.0) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True,
                          text=True, timeout=timeout).stdout


def rtt_percentiles(ping_output: str) -> dict[str, float] | None:
    rtts = sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", ping_output))
    if not rtts:
        return None
    return {"p50": round(rtts[len(rtts) // 2], 3),
            "p99": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], 3)}


def idle_ping(ns: str, address: str, count: int = 20) -> dict[str, float] | None:
    out = subprocess.run(["ip", "netns", "exec", ns, "ping", "-i", "0.2", "-c", str(count),
                          address], capture_output=True, text=True, timeout=count + 20).stdout
    return rtt_percentiles(out)


def stop(processes: dict[str, subprocess.Popen]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def measure_direction(client_ns: str, server_ns: str, address: str, seconds: float,
                      pids: dict[str, int]) -> dict[str, object]:
    """iperf3 -c address from client_ns (data client -> server), ping every 0.2 s alongside;
    CPU % over the stream's wall time for each PID and for everything else ("other").  Every
    process started here is gone when it returns or raises (a stalled path: TimeoutExpired
    `seconds` + 30 s after the start)."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL)
    started_here = [server]
    try:
        time.sleep(0.5)
        ping = subprocess.Popen(["ip", "netns", "exec", client_ns, "ping", "-i", "0.2", "-c",
                                 str(int(seconds * 5)), address], stdout=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL)
        client = subprocess.Popen(["ip", "netns", "exec", client_ns, "iperf3", "-c", address,
                                   "-t", str(seconds), "-J"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        started_here += [ping, client]
        own = [*pids.values(), server.pid, client.pid, ping.pid, os.getpid()]
        before = {n: cpu_ticks(p) for n, p in pids.items()}
        machine0 = system_busy_ticks()
        busy0 = machine0 - sum(cpu_ticks(p) for p in own)
        started = time.monotonic()
        out, err = client.communicate(timeout=seconds + 30)
        elapsed = time.monotonic() - started
        after = {n: cpu_ticks(p) for n, p in pids.items()}
        machine1 = system_busy_ticks()
        busy1 = machine1 - sum(cpu_ticks(p) for p in own)
        ping_out = ping.communicate(timeout=seconds + 30)[0]
        server.wait(10)
    finally:
        for p in started_here:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    row: dict[str, object] = {
        "ping_loaded_ms": rtt_percentiles(ping_out),
        "cpu_percent": {n: round(100 * (after[n] - before[n]) / CLK_TCK / elapsed)
                        for n in pids},
        "other_cpu_percent": round(100 * (busy1 - busy0) / CLK_TCK / elapsed),
        "machine_cpu_percent": round(100 * (machine1 - machine0) / CLK_TCK / elapsed)}
    try:
        end = json.loads(out)["end"]
        row["gbits"] = round(end["sum_received"]["bits_per_second"] / 1e9, 3)
        row["retransmits"] = int(end["sum_sent"].get("retransmits", 0))
    except (ValueError, KeyError) as error:
        row["error"] = f"iperf3: {error}: {out[-300:]} {err[-300:]}"
    return row


class Netns:
    """Namespaces named prefix+key+tag, removed on exit (also on failure)."""

    def __init__(self, prefix: str, keys: tuple[str, ...]) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.names = {k: f"{prefix}{k}{self.tag}" for k in keys}
        self.created: list[str] = []

    def create(self) -> None:
        for name in self.names.values():
            ip("netns", "add", name)
            self.created.append(name)
            ip("-n", name, "link", "set", "lo", "up")

    def veth(self, left_ns: str, left: str, left_addr: str, right_ns: str, right: str,
             right_addr: str) -> None:
        ip("link", "add", left, "netns", self.names[left_ns], "type", "veth", "peer", "name",
           right, "netns", self.names[right_ns])
        for ns, dev, addr in ((left_ns, left, left_addr), (right_ns, right, right_addr)):
            ip("-n", self.names[ns], "addr", "add", addr, "dev", dev)
            ip("-n", self.names[ns], "link", "set", dev, "up")

    def remove(self) -> None:
        for name in self.created:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        self.created.clear()


# --------------------------------------------------------------------------- OpenVPN


def make_pki(d: Path) -> None:
    """A throwaway CA (EC P-256), a server cert (serverAuth) and clients a, b (clientAuth)."""
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=30)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=bench-ca")
    for name, usage in (("server", "serverAuth"), ("a", "clientAuth"), ("b", "clientAuth")):
        ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(
            f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\n"
            f"extendedKeyUsage={usage}\n")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


class Baseline:
    """A VPN under test in namespaces of its own: `_start` builds it (on failure, what was
    started is stopped again), `endpoints` names the namespaces of its two hosts A and B."""

    name = ""
    addr_a = addr_b = ""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.processes: dict[str, subprocess.Popen] = {}
        self.version = ""

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.processes.items()}  # `ip netns exec` execs

    def endpoints(self) -> tuple[str, str]:
        return self.ns.names["a"], self.ns.names["b"]

    def __exit__(self, *exc: object) -> None:
        stop(self.processes)  # on SIGTERM wireguard-go removes its socket and TUN itself
        self.ns.remove()


class OpenVPN(Baseline):
    """Server in namespace "s" (10.203.1.1 / 10.203.2.1), clients in "a" and "b"; tunnel
    10.8.0.0/24, A = 10.8.0.11, B = 10.8.0.12 (client-config-dir), client-to-client."""

    name = "openvpn"
    addr_a, addr_b = "10.8.0.11", "10.8.0.12"

    def __init__(self, workdir: Path) -> None:
        super().__init__(Netns("vvo", ("s", "a", "b")))
        self.dir = workdir / "openvpn"

    def _start(self) -> None:
        d = self.dir
        (d / "ccd").mkdir(parents=True)
        make_pki(d)
        self.version = subprocess.run(["openvpn", "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[0]
        common = ("dev tun\nca ca.crt\ndata-ciphers AES-256-GCM\ncipher AES-256-GCM\n"
                  "disable-dco\ntcp-nodelay\npersist-key\nverb 3\n")
        (d / "server.conf").write_text(
            common + f"proto tcp-server\nport {OVPN_PORT}\ncert server.crt\nkey server.key\n"
            "dh none\ntopology subnet\nserver 10.8.0.0 255.255.255.0\nclient-to-client\n"
            "client-config-dir ccd\nkeepalive 10 60\n")
        for side, addr in (("a", self.addr_a), ("b", self.addr_b)):
            (d / "ccd" / side).write_text(f"ifconfig-push {addr} 255.255.255.0\n")
        for n, side in ((1, "a"), (2, "b")):
            (d / f"{side}.conf").write_text(
                common + f"client\nproto tcp-client\nremote 10.203.{n}.1 {OVPN_PORT}\n"
                f"cert {side}.crt\nkey {side}.key\nremote-cert-tls server\nnobind\n"
                "connect-retry 1\n")
        self.ns.create()
        for n, side in ((1, "a"), (2, "b")):
            self.ns.veth("s", f"vos{n}{self.ns.tag}", f"10.203.{n}.1/24", side,
                         f"voc{n}{self.ns.tag}", f"10.203.{n}.2/24")
        self._spawn("server", "s")
        time.sleep(0.5)
        self._spawn("client a", "a")
        self._spawn("client b", "b")
        deadline = time.monotonic() + START_TIMEOUT
        for name in ("client a", "client b"):
            log = d / f"{name.replace(' ', '-')}.log"
            while "Initialization Sequence Completed" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline or self.processes[name].poll() is not None:
                    raise RuntimeError(f"openvpn {name} did not come up:\n"
                                       + log.read_text(errors="replace")[-1500:])
                time.sleep(0.2)
        # client-to-client path up end to end
        while subprocess.run(["ip", "netns", "exec", self.ns.names["a"], "ping", "-c", "1",
                              "-W", "1", self.addr_b], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("openvpn: A cannot ping B through the server")

    def _spawn(self, name: str, ns_key: str) -> None:
        conf = "server.conf" if name == "server" else f"{ns_key}.conf"
        log = open(self.dir / f"{name.replace(' ', '-')}.log", "wb")  # noqa: SIM115
        self.processes[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.names[ns_key], "openvpn", "--config", conf],
            cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

# --------------------------------------------------------------------------- wireguard-go


class WireGuardGo(Baseline):
    """wireguard-go in namespaces "a" and "b" joined by a veth (10.204.0.1/2); tunnel
    10.9.0.1 <-> 10.9.0.2.  Interface names carry the run's tag: the UAPI sockets live in
    /var/run/wireguard/<ifname>.sock, shared by all network namespaces."""

    name = "wireguard-go"
    addr_a, addr_b = "10.9.0.1", "10.9.0.2"

    def __init__(self, workdir: Path) -> None:
        super().__init__(Netns("vvw", ("a", "b")))
        self.dir = workdir / "wireguard"
        self.ifname = {side: f"vwg{side}{self.ns.tag}" for side in "ab"}

    def _start(self) -> None:
        d = self.dir
        d.mkdir(parents=True)
        self.version = subprocess.run(["wireguard-go", "--version"], capture_output=True,
                                      text=True).stdout.strip()
        pub = {}
        for side in "ab":
            key = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                 check=True).stdout
            (d / f"{side}.key").write_text(key)
            os.chmod(d / f"{side}.key", 0o600)
            pub[side] = subprocess.run(["wg", "pubkey"], input=key, capture_output=True,
                                       text=True, check=True).stdout.strip()
        self.ns.create()
        self.ns.veth("a", f"vwv1{self.ns.tag}", "10.204.0.1/24", "b", f"vwv2{self.ns.tag}",
                     "10.204.0.2/24")
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1",
                   LOG_LEVEL="error")
        for side in "ab":
            log = open(d / f"{side}.log", "wb")  # noqa: SIM115
            self.processes[f"peer {side}"] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns.names[side], "wireguard-go", "-f",
                 self.ifname[side]], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        for side in "ab":
            sock = Path(f"/var/run/wireguard/{self.ifname[side]}.sock")
            while not sock.exists():
                if time.monotonic() > deadline or self.processes[f"peer {side}"].poll():
                    raise RuntimeError(f"wireguard-go {side} did not start: "
                                       + (d / f"{side}.log").read_text(errors="replace"))
                time.sleep(0.1)
        for side, other, addr, n_other in (("a", "b", self.addr_a, 2),
                                           ("b", "a", self.addr_b, 1)):
            ns, dev = self.ns.names[side], self.ifname[side]
            other_addr = self.addr_b if side == "a" else self.addr_a
            in_ns(ns, "wg", "set", dev, "private-key", str(d / f"{side}.key"), "listen-port",
                  str(WG_PORT), "peer", pub[other], "allowed-ips", f"{other_addr}/32",
                  "endpoint", f"10.204.0.{n_other}:{WG_PORT}")
            in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            in_ns(ns, "ip", "link", "set", dev, "up")
        while subprocess.run(["ip", "netns", "exec", self.ns.names["a"], "ping", "-c", "1",
                              "-W", "1", self.addr_b], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("wireguard-go: A cannot ping B")


# --------------------------------------------------------------------------- SoftEther


class SoftEther(Baseline):
    """bench/softether.py's server and client, kept up across rounds like the others and
    measured the same way (iputils ping: p50/p99, where bench/softether.py's own run reports
    busybox ping's average)."""

    name = "softether"
    addr_a, addr_b = softether.ADDR_A, softether.ADDR_B

    def __init__(self, workdir: Path) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.version = ""
        (workdir / "softether").mkdir(parents=True, exist_ok=True)
        self.se = softether.SoftEther(workdir / "softether")

    def _start(self) -> None:
        apt_install(softether.PACKAGES)
        self.version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "softether-vpnserver"], capture_output=True,
            text=True, check=False).stdout.strip()
        self.se.start()

    def pids(self) -> dict[str, int]:
        """The worker processes (each watchdog, their parent, only waits for it)."""
        return {"vpnserver": self.se.worker_pid("server"),
                "vpnclient": self.se.worker_pid("client")}

    def endpoints(self) -> tuple[str, str]:
        return self.se.nsa, self.se.nsb

    def __exit__(self, *exc: object) -> None:
        self.se.stop()



# --------------------------------------------------------------------------- running


def measure_round(vpn: Baseline, round_: int, seconds: float) -> list[dict]:
    a, b = vpn.endpoints()
    rows = []
    for direction, src, dst, addr in (("a->b", a, b, vpn.addr_b), ("b->a", b, a, vpn.addr_a)):
        rows.append({"round": round_, "direction": direction,
                     **measure_direction(src, dst, addr, seconds, vpn.pids())})
    return rows


def summarize(rows: list[dict]) -> dict[str, object]:
    gbits = [r["gbits"] for r in rows if "gbits" in r]
    if not gbits:
        return {"runs": 0}
    loaded = [r["ping_loaded_ms"] for r in rows if r.get("ping_loaded_ms")]
    cpu: dict[str, list[int]] = {}
    for r in rows:
        for n, v in r["cpu_percent"].items():
            cpu.setdefault(n, []).append(v)
    # CPU time the whole machine spent per gigabyte moved (VPN, iperf3, kernel, softirq):
    # the cost that decides how fast a path can go once the CPUs are full.
    per_gb = [r["machine_cpu_percent"] / 100 / (r["gbits"] / 8) for r in rows
              if r.get("machine_cpu_percent") and r.get("gbits")]
    return {"median_gbits": round(statistics.median(gbits), 3),
            "cpu_seconds_per_gb": round(statistics.median(per_gb), 2) if per_gb else None,
            "min_gbits": min(gbits), "max_gbits": max(gbits), "runs": len(gbits),
            "ping_loaded_p50_ms": [min(p["p50"] for p in loaded), max(p["p50"] for p in loaded)]
            if loaded else None,
            "ping_loaded_p99_ms": [min(p["p99"] for p in loaded), max(p["p99"] for p in loaded)]
            if loaded else None,
            "cpu_percent_range": {n: [min(v), max(v)] for n, v in cpu.items()},
            "other_cpu_percent_range": [min(r["other_cpu_percent"] for r in rows),
                                        max(r["other_cpu_percent"] for r in rows)]}


def table(summary: dict[str, dict], idle: dict[str, object]) -> str:
    lines = ["| path | Gbit/s median (range) | machine CPU s per GB | idle p50/p99 ms | "
             "loaded p50 / p99 ms | VPN CPU % | other CPU % |", "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        if not s.get("runs"):
            lines.append(f"| {name} | failed | | | | | |")
            continue
        i = idle.get(name) or {}
        idle_text = f"{i.get('p50')} / {i.get('p99')}"
        lp50, lp99 = s.get("ping_loaded_p50_ms"), s.get("ping_loaded_p99_ms")
        loaded = f"{lp50[0]}-{lp50[1]} / {lp99[0]}-{lp99[1]}" if lp50 else "-"
        cpu = ", ".join(f"{n} {lo}-{hi}" for n, (lo, hi) in s.get("cpu_percent_range",
                                                                  {}).items())
        other = s.get("other_cpu_percent_range")
        lines.append(
            f"| {name} | {s['median_gbits']} ({s['min_gbits']}-{s['max_gbits']}) | "
            f"{s.get('cpu_seconds_per_gb') or '-'} | {idle_text} | {loaded} | {cpu or '-'} | "
            f"{f'{other[0]}-{other[1]}' if other else '-'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", choices=("openvpn", "wireguard-go"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    apt_install(PACKAGES)
    kinds = [k for k in (OpenVPN, WireGuardGo) if args.only in (None, k.name)]
    rows: dict[str, list[dict]] = {k.name: [] for k in kinds}
    idle: dict[str, object] = {}
    versions: dict[str, str] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="vhostvpn-baselines-") as tmp:
        vpns = []
        try:
            for kind in kinds:
                try:
                    vpn = kind(Path(tmp)).__enter__()
                except Exception as error:  # reported; the others still run
                    errors[kind.name] = str(error)[-2000:]
                    continue
                vpns.append(vpn)
                versions[vpn.name] = vpn.version
                idle[vpn.name] = idle_ping(vpn.endpoints()[0], vpn.addr_b)
            for round_ in range(args.rounds):
                for vpn in vpns:
                    rows[vpn.name] += measure_round(vpn, round_, args.seconds)
        finally:
            for vpn in vpns:
                vpn.__exit__()
    summary = {name: summarize(r) for name, r in rows.items()}
    report = {"rows": rows, "summary": summary, "idle_ping_ms": idle, "versions": versions,
              "errors": errors}
    out = ROOT / "bench" / "results" / f"baselines-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(table(summary, idle))
    if errors:
        print(json.dumps(errors, indent=1))
    print(f"JSON: {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
