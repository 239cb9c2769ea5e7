"""How low can a Python VPN's ping go on this machine? The floor under issue 13's latency
targets: the smallest possible Python relay, next to vhostvpn, wireguard-go and SoftEther,
same run.

The minimal relay is what no real VPN can undercut in Python: one process per host moving
frames TAP <-> one TLS 1.3 connection with a raw epoll loop (no Trio, no switch, no policy,
no codec beyond a 2-byte length), and a minimal hub that decrypts one connection's bytes and
re-encrypts them onto the other's. Rows, idle ping p50/p99 (every 0.2 s), interleaved by round:
  python relay direct   A <-TLS-> B over their own veth
  python relay via hub  A <-TLS-> hub <-TLS-> B
  python trio relay     the same relay with each fd waited on by a Trio task
  python guest relay    the same relay on a raw epoll loop that hosts Trio in guest mode
                        (what virtio/dataloop.py does for the daemons), direct
  vhostvpn direct / vhostvpn tap (via the hub)  as in bench/hosts.py (same namespaces)
  wireguard-go, softether   as in bench/baselines.py (SoftEther: vpnserver's virtual hub
                        between one vpnclient's two NICs, the hub rows' reference)
and, for every row, CPU per ping of its processes over FAST_COUNT pings every 10 ms; for the
rows in LOADED, ping p50/p99 every 0.2 s during one iperf3 stream a -> b (--load-seconds).
So "vhostvpn / python relay" says what our layers cost above the floor, "python relay /
wireguard-go" what the language and one-process-per-visit design cost, and "python relay via
hub / softether" what issue 13's hub targets (idle p50 <= 1.5x SoftEther, under load <=
SoftEther) ask against what a Python hub can do, on this machine.

Run (root): .venv/bin/python bench/python_floor.py [--rounds 3] [--count 30]
            [--load-seconds 4] [--rows hub,direct]     (the default: about 7 minutes)
The relay roles (`relay`, `hub`) are this file's subcommands, started by the run inside the
namespaces; the TLS is unauthenticated (a throwaway self-signed certificate): a probe, not a VPN.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from bench import baselines, hosts  # noqa: E402
from bench.baselines import idle_ping  # noqa: E402
from virtio import dataloop  # noqa: E402

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
RELAY_TAP = "py0"
RELAY_ADDRESSES = {"a": "10.79.0.1", "b": "10.79.0.2"}
DIRECT_PORT, HUB_PORT = 7201, 7202
READS_PER_WAKE = 64
START_TIMEOUT = 15.0
FAST_COUNT = 300
# The rows measured under load too (each adds --load-seconds + ~1.5 s a round).
LOADED = ("softether", "python relay via hub", "python trio relay via hub",
          "vhostvpn tap (via hub)")
# Always run: the references the ratios divide by.
REFERENCES = ("wireguard-go", "softether")


# --------------------------------------------------------------------------- the roles


def open_tap(name: str, address: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    subprocess.run(["ip", "addr", "add", address, "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    return fd


def tls_contexts(cert: Path, key: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


def tls_accept(server: ssl.SSLContext, address: tuple[str, int], count: int) -> list:
    listener = socket.create_server(address, reuse_port=True)
    conns = []
    for _ in range(count):
        sock, _peer = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(server.wrap_socket(sock, server_side=True))
    listener.close()
    for conn in conns:
        conn.setblocking(False)
    return conns


def tls_connect(client: ssl.SSLContext, address: tuple[str, int]) -> ssl.SSLSocket:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            sock = socket.create_connection(address, timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = client.wrap_socket(sock)
    conn.setblocking(False)
    return conn


def send_all(conn: ssl.SSLSocket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view):]
        except ssl.SSLWantWriteError:
            select.select([], [conn], [], 1.0)


def receive(conn: ssl.SSLSocket) -> bytes | None:
    """Everything readable now (b"" if nothing), None at EOF."""
    chunks = []
    while True:
        try:
            data = conn.recv(262144)
        except ssl.SSLWantReadError:
            return b"".join(chunks)
        if not data:
            return None
        chunks.append(data)


def read_burst(tap: int) -> bytes:
    """Up to READS_PER_WAKE frames waiting in the TAP, each behind its 2-byte length."""
    out = []
    for _ in range(READS_PER_WAKE):
        try:
            frame = os.read(tap, 65536)
        except BlockingIOError:
            break
        out += (len(frame).to_bytes(2, "big"), frame)
    return b"".join(out)


def write_frames(tap: int, pending: bytearray) -> None:
    """Every whole length-prefixed frame at the head of `pending` to the TAP (a frame the
    device refuses is dropped, as a VPN would), leaving only an incomplete one."""
    at = 0
    while len(pending) - at >= 2:
        size = int.from_bytes(pending[at:at + 2], "big")
        if len(pending) - at - 2 < size:
            break
        with contextlib.suppress(BlockingIOError):
            os.write(tap, pending[at + 2:at + 2 + size])
        at += 2 + size
    del pending[:at]


def relay(tap: int, conn: ssl.SSLSocket) -> None:
    poll = select.epoll()
    poll.register(tap, select.EPOLLIN)
    poll.register(conn.fileno(), select.EPOLLIN)
    pending = bytearray()
    while True:
        for fd, _events in poll.poll():
            if fd == tap:
                burst = read_burst(tap)
                if burst:
                    send_all(conn, burst)
                continue
            data = receive(conn)
            if data is None:
                return
            pending += data
            write_frames(tap, pending)


def hub(conns: list[ssl.SSLSocket]) -> None:
    poll = select.epoll()
    by_fd = {}
    for conn, other in ((conns[0], conns[1]), (conns[1], conns[0])):
        poll.register(conn.fileno(), select.EPOLLIN)
        by_fd[conn.fileno()] = (conn, other)
    while True:
        for fd, _events in poll.poll():
            conn, other = by_fd[fd]
            data = receive(conn)
            if data is None:
                return
            if data:
                send_all(other, data)


async def _trio_pump_tap(tap: int, conn: ssl.SSLSocket) -> None:
    while True:
        await trio.lowlevel.wait_readable(tap)
        burst = read_burst(tap)
        if burst:
            await trio_send_all(conn, burst)


async def trio_send_all(conn: ssl.SSLSocket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view):]
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(conn.fileno())


async def _trio_pump_conn(tap: int, conn: ssl.SSLSocket) -> None:
    pending = bytearray()
    while True:
        await trio.lowlevel.wait_readable(conn.fileno())
        data = receive(conn)
        if data is None:
            return
        pending += data
        write_frames(tap, pending)


async def trio_relay(tap: int, conn: ssl.SSLSocket) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_trio_pump_tap, tap, conn)
        await _trio_pump_conn(tap, conn)
        nursery.cancel_scope.cancel()


async def trio_hub(conns: list[ssl.SSLSocket]) -> None:
    async def pump(conn: ssl.SSLSocket, other: ssl.SSLSocket) -> None:
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            data = receive(conn)
            if data is None:
                nursery.cancel_scope.cancel()
                return
            if data:
                await trio_send_all(other, data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, conns[0], conns[1])
        nursery.start_soon(pump, conns[1], conns[0])


async def guest_relay(tap: int, conn: ssl.SSLSocket) -> None:
    """The relay's two fds served by virtio/dataloop.py (the daemons' loop), with a Trio
    timer ticking alongside as a daemon's keepalives do."""
    pending = bytearray()

    def from_tap() -> bool:
        burst = read_burst(tap)
        if burst:
            send_all(conn, burst)
        return False

    def from_conn() -> bool:
        data = receive(conn)
        if data is None:
            return True
        pending.extend(data)
        write_frames(tap, pending)
        return False

    async def ticks() -> None:
        while True:
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticks)
        nursery.start_soon(dataloop.serve_readable, tap, from_tap)
        await dataloop.serve_readable(conn.fileno(), from_conn)
        nursery.cancel_scope.cancel()


def role_main(args: argparse.Namespace) -> int:
    server, client = tls_contexts(args.cert, args.key)
    host, _, port = args.endpoint.rpartition(":")
    address = (host, int(port))
    if args.role == "hub":
        conns = tls_accept(server, address, 2)
        if args.trio:
            trio.run(trio_hub, conns)
        else:
            hub(conns)
        return 0
    tap = open_tap(RELAY_TAP, args.address)
    conn = tls_accept(server, address, 1)[0] if args.listen else tls_connect(client, address)
    if args.guest:
        dataloop.run(guest_relay, tap, conn)
    elif args.trio:
        trio.run(trio_relay, tap, conn)
    else:
        relay(tap, conn)
    return 0


# --------------------------------------------------------------------------- the run


class PythonRelay:
    """The minimal relay between namespaces a and b, direct or through a minimal hub."""

    def __init__(self, ns: hosts.Namespaces, workdir: Path, via_hub: bool,
                 use_trio: bool, use_guest: bool = False) -> None:
        self.ns, self.workdir, self.via_hub, self.use_trio = ns, workdir, via_hub, use_trio
        self.use_guest = use_guest
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, ns: str, *argv: str) -> None:
        log = open(self.workdir / f"relay-{name}.log", "wb")  # noqa: SIM115 (the process's)
        self.processes[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.names[ns], sys.executable, __file__, *argv,
             "--cert", str(self.workdir / "relay.crt"), "--key", str(self.workdir / "relay.key"),
             *(["--trio"] if self.use_trio else []),
             *(["--guest"] if self.use_guest and name != "hub" else [])],
            stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> PythonRelay:
        w = self.workdir
        if not (w / "relay.crt").exists():
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", w / "relay.key",
                            "-out", w / "relay.crt", "-days", "1", "-subj", "/CN=relay"],
                           check=True, capture_output=True)
        if self.via_hub:
            self._start("hub", "hub", "hub", f"0.0.0.0:{HUB_PORT}")
            time.sleep(0.3)
            for n, side in enumerate("ab", 1):
                self._start(side, side, "relay", f"10.201.{n}.1:{HUB_PORT}",
                            "--address", f"{RELAY_ADDRESSES[side]}/24")
        else:
            self._start("a", "a", "relay", f"{hosts.DIRECT_ADDRESSES['a']}:{DIRECT_PORT}",
                        "--listen", "--address", f"{RELAY_ADDRESSES['a']}/24")
            time.sleep(0.3)
            self._start("b", "b", "relay", f"{hosts.DIRECT_ADDRESSES['a']}:{DIRECT_PORT}",
                        "--address", f"{RELAY_ADDRESSES['b']}/24")
        deadline = time.monotonic() + START_TIMEOUT
        while subprocess.run(["ip", "netns", "exec", self.ns.names["a"], "ping", "-c", "1",
                              "-W", "1", RELAY_ADDRESSES["b"]],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("python relay: a cannot ping b")
        return self

    def __exit__(self, *exc: object) -> None:
        baselines.stop(self.processes)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_ns(pids: list[int]) -> int:
    """Time the processes ran, in ns (/proc/PID/schedstat: their main threads; wireguard-go's
    other threads are counted through /proc/PID/task)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    return total


def measure(ns: str, peer_ns: str, address: str, count: int, pids: dict[str, int],
            load_seconds: float) -> dict[str, object]:
    """Idle ping (every 0.2 s) from `ns` to `address`, then FAST_COUNT pings every 10 ms with
    the CPU time the VPN's processes spent per ping; with `load_seconds`, the ping every
    0.2 s during one iperf3 stream to `address` in `peer_ns` (baselines.measure_direction:
    p50/p99, Gbit/s, CPU %)."""
    idle = idle_ping(ns, address, count)
    before = cpu_ns(list(pids.values()))
    subprocess.run(["ip", "netns", "exec", ns, "ping", "-q", "-i", "0.01", "-c",
                    str(FAST_COUNT), address], capture_output=True, timeout=FAST_COUNT + 20)
    row: dict[str, object] = {
        "idle": idle,
        "cpu_us_per_ping": round((cpu_ns(list(pids.values())) - before) / FAST_COUNT / 1e3)}
    if load_seconds:
        try:
            row["loaded"] = baselines.measure_direction(ns, peer_ns, address, load_seconds, pids)
        except subprocess.TimeoutExpired as error:  # a stalled stream: this row, this round
            row["loaded"] = {"error": str(error)}
    return row


def loaded_p50(row: dict) -> float | None:
    return ((row.get("loaded") or {}).get("ping_loaded_ms") or {}).get("p50")


def run_main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    rows: dict[str, list[dict]] = {name: [] for name in (
        "python relay direct", "python trio relay direct", "vhostvpn direct", "wireguard-go",
        "python relay via hub", "python trio relay via hub", "vhostvpn tap (via hub)",
        "python guest relay direct", "softether")}
    if args.rows:
        rows = {name: runs for name, runs in rows.items()
                if name in REFERENCES or any(part in name for part in args.rows.split(","))}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhostvpn-floor-") as tmp, \
            hosts.Namespaces() as ns, contextlib.ExitStack() as stack:
        w = Path(tmp)
        wg = stack.enter_context(baselines.WireGuardGo(w))
        se = stack.enter_context(baselines.SoftEther(w))
        vpn = stack.enter_context(hosts.Vhostvpn(ns, w, args.nice))
        a, b = ns.names["a"], hosts.MEMBERS["b"][1]
        for round_ in range(args.rounds):
            for name in rows:
                load = args.load_seconds if name in LOADED else 0
                if name.startswith("python"):
                    # the tap row took the pair's own veth down (vhostvpn falls back to the hub)
                    baselines.ip("-n", a, "link", "set", ns.direct_link, "up")
                    with PythonRelay(ns, w, via_hub=name.endswith("hub"),
                                     use_trio="trio" in name,
                                     use_guest="guest" in name) as relay:
                        row = measure(a, ns.names["b"], RELAY_ADDRESSES["b"], args.count,
                                      {n: p.pid for n, p in relay.processes.items()}, load)
                elif name in REFERENCES:
                    other = wg if name == "wireguard-go" else se
                    row = measure(*other.endpoints(), other.addr_b, args.count, other.pids(),
                                  load)
                else:
                    direct = name == "vhostvpn direct"
                    vpn.direct(direct)
                    pids = vpn.pids("a", "b")
                    if direct:
                        del pids["hub"]
                    row = measure(a, ns.names["b"], b, args.count, pids, load)
                row = {"round": round_, **row,
                       "load": Path("/proc/loadavg").read_text().split()[0]}
                rows[name].append(row)
                print(name, json.dumps(row), flush=True)
    minutes = (time.monotonic() - started) / 60
    print(f"\n{minutes:.1f} min; idle ping p50 ms, CPU us per fast ping, ping p50 ms under "
          "load (medians of rounds):")
    medians, cpu, loaded = {}, {}, {}
    for name, runs in rows.items():
        medians[name] = median([r["idle"]["p50"] for r in runs if r.get("idle")])
        cpu[name] = median([r["cpu_us_per_ping"] for r in runs])
        loaded[name] = median([p for p in map(loaded_p50, runs) if p is not None])
        print(f"  {name:26} {medians[name]:6.3f} ms  {cpu[name]:6.0f} us CPU  "
              f"{loaded[name]:6.2f} ms loaded   idle rounds "
              f"{sorted(r['idle']['p50'] for r in runs if r.get('idle'))}")
    for name in ("python relay direct", "python trio relay direct", "python guest relay direct",
                 "vhostvpn direct"):
        if name not in medians:
            continue
        print(f"  {name} / wireguard-go: idle p50 {medians[name] / medians['wireguard-go']:.2f}"
              f"x, CPU per ping {cpu[name] / cpu['wireguard-go']:.2f}x")
    print(f"  1.5x softether idle p50: {1.5 * medians['softether']:.3f} ms")
    for name in ("python relay via hub", "python trio relay via hub", "vhostvpn tap (via hub)"):
        if name not in medians:
            continue
        print(f"  {name} / softether: idle p50 {medians[name] / medians['softether']:.2f}x, "
              f"under load {loaded[name] / loaded['softether']:.2f}x, CPU per ping "
              f"{cpu[name] / cpu['softether']:.2f}x")
    out = ROOT / "bench" / "results" / f"python-floor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "idle_p50_medians": medians,
                               "cpu_us_per_ping_medians": cpu, "loaded_p50_medians": loaded,
                               "minutes": round(minutes, 1)}, indent=1))
    print(f"JSON: {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    run = sub.add_parser("run", help="the probe (the default)")
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--count", type=int, default=30, help="pings per row and round")
    run.add_argument("--load-seconds", type=float, default=4.0,
                     help="iperf3 stream per loaded row and round (0: no load)")
    run.add_argument("--nice", type=int,
                     help="start the vhostvpn daemons with --nice N (SoftEther runs at -20)")
    run.add_argument("--rows", help="only the rows whose names contain one of these "
                     "comma-separated words (and wireguard-go's and softether's)")
    for role in ("relay", "hub"):
        p = sub.add_parser(role)
        p.add_argument("endpoint", help="HOST:PORT to listen on or connect to")
        p.add_argument("--cert", type=Path, required=True)
        p.add_argument("--key", type=Path, required=True)
        p.add_argument("--trio", action="store_true", help="a Trio loop, not a raw epoll one")
        p.add_argument("--guest", action="store_true",
                       help="a raw epoll loop hosting Trio in guest mode")
        if role == "relay":
            p.add_argument("--address", required=True, help="the TAP's address/prefix")
            p.add_argument("--listen", action="store_true")
    args = parser.parse_args(sys.argv[1:] or ["run"])
    return run_main(args) if args.role == "run" else role_main(args)


if __name__ == "__main__":
    sys.exit(main())
