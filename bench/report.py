"""The seed's metrics for every path measured, each next to its reference from the same run:
packets/s, Mbit/s, latency p50/p99, CPU % per process, syscalls per packet (perf counting
raw_syscalls:sys_enter on each PID) and allocations per packet (CPython allocator calls,
bench/_count_alloc.c loaded through sitecustomize), as a markdown table, JSON and a plot.

A path is one entry of PATHS: a function (Settings) -> list[Metrics] that measures its
subjects and their reference interleaved, round by round, reusing the path's own bench
(bench/vhost_switch.py, bench/hosts.py, bench/wire.py).  Throughput, latency and CPU come
from timed windows with no counter attached; syscalls from a perf window of their own right
after; allocations from a separate start of the process with the allocation hooks loaded
(they cost a call per allocation), so counters never slow the timed numbers.

Run (root): .venv/bin/python bench/report.py [--paths vhost,hosts,wire] [--rounds 2]
            [--seconds 3] [--docs] [--plot docs/img/report.png]
Namespaces, sockets and temp dirs carry a tag unique to the run; every load is bounded in
time; only processes started here are signalled, by PID.  JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/tunnel.py would shadow the tunnel package if this directory came first on sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from bench import _count, baselines, hosts, vhost_switch  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
DOCS_BEGIN = "<!-- bench/report.py: begin -->"
DOCS_END = "<!-- bench/report.py: end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WINDOW_MARGIN = 90.0  # seconds on top of a window's own length before it is abandoned
SIZES = (64, 1500)


@dataclass
class Metrics:
    """One subject on one path in one round, as the roadmap asked to track it.
    Per-process figures are keyed by the process's role ("hub", "endpoint a", ...)."""

    path: str
    subject: str
    reference: bool
    round: int
    pps: float | None = None
    mbits: float | None = None
    bytes_per_packet: float | None = None
    latency_ms: dict[str, float] | None = None  # idle p50/p99
    loaded_latency_ms: dict[str, float] | None = None  # p50/p99 while the path is loaded
    cpu_percent: dict[str, float] = field(default_factory=dict)
    syscalls_per_packet: dict[str, float] = field(default_factory=dict)
    allocations_per_packet: dict[str, float] = field(default_factory=dict)
    other_cpu_percent: float | None = None  # CPU used by processes outside this window
    load: float = 0.0  # 1-minute load average when the window started
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Settings:
    seconds: float
    rounds: int
    workdir: Path  # unique to the run
    counter_site: Path | None  # sitecustomize + _count_alloc; None: allocations not counted
    counter_missing: str  # why counter_site is None
    syscalls_missing: str | None  # why perf cannot count, or None
    tag: str


@contextlib.contextmanager
def environ(extra: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `extra` while processes under test are started (they inherit it)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def alloc_env(settings: Settings, prefix: Path) -> dict[str, str]:
    """The variables that make a process started now count its allocations."""
    if settings.counter_site is None:
        return {}
    env = _count.counting_env(settings.counter_site, prefix)
    return {k: env[k] for k in ("PYTHONPATH", "LD_PRELOAD", _count.ALLOC_PREFIX_ENV,
                                _count.MALLOC_PREFIX_ENV)}


def read_allocations(prefix: Path, pids: Mapping[str, int]) -> dict[str, object]:
    """Both counters of each process: "<role>: py" (CPython allocator calls, Python only)
    and "<role>: libc" (malloc-family calls, any dynamically linked process)."""
    counts: dict[str, object] = {}
    for role, pid in pids.items():
        counts[f"{role}: py"] = _count.read_alloc_counts(prefix, pid)
        counts[f"{role}: libc"] = _count.read_malloc_counts(prefix, pid)
    return counts


def per_packet(before: Mapping[str, object], after: Mapping[str, object], packets: int
               ) -> dict[str, float]:
    """Allocations per packet between two read_allocations, for the counters present."""
    out = {}
    for key, old in before.items():
        new = after.get(key)
        if old is not None and new is not None and packets > 0:
            out[key] = round((new - old).allocations / packets, 2)  # type: ignore[operator]
    return out


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- vhost-user switch


@dataclass
class VhostSubject:
    """A back-end of the two-port vhost-user switch: "vhostvpn" (with extra environment,
    e.g. VHOSTVPN_RING) or "dpdk" (testpmd's vhost PMD, the reference)."""

    backend: str
    env: dict[str, str] = field(default_factory=dict)


VHOST_SUBJECTS = {"DPDK vhost PMD (reference)": VhostSubject("dpdk"),
                  "vhostvpn hub": VhostSubject("vhostvpn")}


def vhost_path(settings: Settings, subjects: Mapping[str, VhostSubject] = VHOST_SUBJECTS
               ) -> list[Metrics]:
    """bench/vhost_switch.py's combined topology (one flowgen testpmd, two virtio-user ports,
    the back-end on its own CPU), per frame size, subjects alternating within each round."""
    if not vhost_switch.VHOSTVPN_BINARY.exists():  # a worktree without its own venv
        vhost_switch.VHOSTVPN_BINARY = Path(sys.executable).with_name("vhostvpn")
    rows = []
    for round_ in range(settings.rounds):
        for size in SIZES:
            for name, subject in subjects.items():
                print(f"-- vhost {name} {size} B round {round_ + 1}", file=sys.stderr,
                      flush=True)
                rows.append(trio.run(functools.partial(
                    _vhost_measure, settings, name, subject, size, round_)))
    return rows


async def _vhost_measure(settings: Settings, name: str, subject: VhostSubject, size: int,
                         round_: int) -> Metrics:
    row = Metrics(path=f"vhost-user switch, {size} B frames", subject=name,
                  reference=subject.backend == "dpdk", round=round_, load=load_average(),
                  bytes_per_packet=size)
    try:
        with trio.fail_after(3 * settings.seconds + 3 * WINDOW_MARGIN):
            await _vhost_window(settings, subject, size, row, count_allocs=False)
            if settings.counter_site is not None:
                await _vhost_window(settings, subject, size, row, count_allocs=True)
    except Exception as error:  # one failed window must not hide the others
        row.error = f"{type(error).__name__}: {error}"
    return row


async def _vhost_window(settings: Settings, subject: VhostSubject, size: int, row: Metrics,
                        *, count_allocs: bool) -> None:
    """Timed window (pps, Mbit/s, CPU) then a perf window (syscalls); or, with count_allocs,
    a separate back-end started with the allocation hooks and one counting window."""
    workdir = Path(tempfile.mkdtemp(prefix=f"metrics-{settings.tag}-vhost-",
                                    dir=settings.workdir))
    sock_a, sock_b = workdir / "a.sock", workdir / "b.sock"
    prefix = workdir / "alloc"
    # The subject's environment first: a PYTHONPATH of its own (another checkout, for an A/B)
    # stays behind the counters' site directory.
    with environ(subject.env), environ(alloc_env(settings, prefix) if count_allocs else {}):
        if subject.backend == "dpdk":
            backend = vhost_switch.dpdk_backend(sock_a, sock_b, 1, 0, workdir)
        else:
            backend = vhost_switch.vhostvpn_backend(sock_a, sock_b, 1, workdir)
        async with backend as pid, vhost_switch.combined_generator(
                sock_a, sock_b, size, 0, workdir) as gen:
            await trio.sleep(1.0)  # warm-up
            if count_allocs:
                start, before = await gen.sample(), read_allocations(prefix, {"back-end": pid})
                await trio.sleep(settings.seconds)
                end, after = await gen.sample(), read_allocations(prefix, {"back-end": pid})
                row.allocations_per_packet = per_packet(before, after, end.rx - start.rx)
                if not row.allocations_per_packet:
                    row.notes.append("the allocation counters did not load in the back-end")
                return
            own = [pid, os.getpid(), *gen.pids]
            start = await gen.sample()
            ticks0, foreign0 = vhost_switch.cpu_ticks(pid), vhost_switch.foreign_ticks(own)
            wall0 = time.monotonic()
            await trio.sleep(settings.seconds)
            end = await gen.sample()
            ticks1, foreign1 = vhost_switch.cpu_ticks(pid), vhost_switch.foreign_ticks(own)
            wall = time.monotonic() - wall0
            elapsed = end.time - start.time
            row.pps = (end.rx - start.rx) / elapsed
            row.mbits = row.pps * size * 8 / 1e6
            row.cpu_percent["back-end"] = round(100 * (ticks1 - ticks0) / CLK_TCK / wall, 1)
            row.other_cpu_percent = round(100 * (foreign1 - foreign0) / CLK_TCK / wall)
            if settings.syscalls_missing is None:
                counter = _count.SyscallCounter(pid)
                counter.start()
                await trio.sleep(_count.PERF_ATTACH_SECONDS)
                start = await gen.sample()
                await trio.sleep(settings.seconds)
                end = await gen.sample()
                syscalls, counted = counter.stop()
                pps = (end.rx - start.rx) / (end.time - start.time)
                if pps > 0 and counted > 0:
                    # Rates: perf counts from its own attach to stop, a little wider than
                    # the packet window; the traffic is steady across both.
                    row.syscalls_per_packet["back-end"] = round(syscalls / counted / pps, 4)


# --------------------------------------------------------------------------- host <-> host


def device_packets(namespace: str, device: str) -> tuple[int, int]:
    """(packets, bytes) the device counted, both directions."""
    out = subprocess.run(["ip", "-n", namespace, "-j", "-s", "link", "show", "dev", device],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    stats = json.loads(out)[0]["stats64"]
    return (stats["rx"]["packets"] + stats["tx"]["packets"],
            stats["rx"]["bytes"] + stats["tx"]["bytes"])


@dataclass
class HostPair:
    """Two hosts joined by a path: client/server namespaces, the server's address, the
    client's device whose counters are the path's packets, the processes that carry it."""

    client: str
    server: str
    address: str
    device: str
    pids: dict[str, int]


HOSTS_PATH = "host -> host, one TCP stream"
WIREGUARD = "wireguard-go, direct (reference)"
# name -> (client, server, whether a <-> b's own veth is up: bench/hosts.py starts the TAP pair
# with --listen, so with it up their stream goes direct, with it down through the hub).
VPN_PAIRS = {"vhostvpn host --tap via hub": ("a", "b", False),
             "vhostvpn host --tap direct": ("a", "b", True),
             "vhostvpn host --tun via hub": ("c", "d", False)}


def hosts_path(settings: Settings) -> list[Metrics]:
    """bench/hosts.py's namespaces: host a -> host b through the hub (`vhostvpn host --tap`)
    and host c -> host d (`--tun`), next to the raw veth pair (the kernel alone: no process,
    no syscalls of its own) and, when installed, wireguard-go (bench/baselines.py: a
    user-space VPN, peer to peer, the reference for syscalls per packet); one iperf3 TCP
    stream per window, ping every 0.2 s alongside, idle ping apart."""
    rows: list[Metrics] = []
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(hosts.Namespaces())
        n = ns.names
        subjects = {"raw veth (reference)": HostPair(n["r1"], n["r2"], "10.202.0.2",
                                                     f"vvx1{ns.tag}", {})}
        if shutil.which("wireguard-go") and shutil.which("wg"):
            try:
                wg = stack.enter_context(baselines.WireGuardGo(settings.workdir))
            except Exception as error:  # reported; the other subjects still run
                rows.append(Metrics(path=HOSTS_PATH, subject=WIREGUARD, reference=True,
                                    round=0, error=f"{type(error).__name__}: {error}"))
            else:
                a, b = wg.endpoints()
                subjects[WIREGUARD] = HostPair(a, b, wg.addr_b, wg.ifname["a"], wg.pids())
        vpn_workdir = Path(tempfile.mkdtemp(prefix=f"metrics-{settings.tag}-hosts-",
                                            dir=settings.workdir))
        with hosts.Vhostvpn(ns, vpn_workdir) as vpn:
            for name, (x, y, _) in VPN_PAIRS.items():
                subjects[name] = _vpn_pair(vpn, x, y)
            idle = {}
            for name, p in subjects.items():
                _direct_for(vpn, name)
                idle[name] = baselines.idle_ping(p.client, p.address)
            for round_ in range(settings.rounds):
                for name, p in subjects.items():
                    print(f"-- hosts {name} round {round_ + 1}", file=sys.stderr, flush=True)
                    row = Metrics(path=HOSTS_PATH, subject=name,
                                  reference="reference" in name, round=round_,
                                  load=load_average(), latency_ms=idle[name])
                    try:
                        _direct_for(vpn, name)
                        _hosts_timed(settings, p, row)
                        if p.pids and settings.syscalls_missing is None:
                            _hosts_syscalls(settings, p, row)
                    except Exception as error:  # reported; the other rows still run
                        row.error = f"{type(error).__name__}: {error}"
                    rows.append(row)
        if settings.counter_site is not None:
            _hosts_allocations(settings, ns, rows)
    return rows


def _direct_for(vpn: hosts.Vhostvpn, name: str) -> None:
    """Before a window of a vhostvpn subject: a <-> b's own veth up for the direct subject,
    down for the others (their frames through the hub), waiting until the endpoints agree."""
    if name in VPN_PAIRS:
        vpn.direct(VPN_PAIRS[name][2])


def _vpn_pair(vpn: hosts.Vhostvpn, x: str, y: str) -> HostPair:
    """Host x -> host y through the hub; packets counted on x's TAP/TUN (both are vv0)."""
    n = vpn.ns.names
    pids = vpn.pids(x, y)
    return HostPair(n[x], n[y], hosts.MEMBERS[y][1], "vv0",
                    {"hub": pids["hub"], f"endpoint {x}": pids[x], f"endpoint {y}": pids[y]})


def _hosts_allocations(settings: Settings, ns: hosts.Namespaces, rows: list[Metrics]) -> None:
    """The hub and the endpoints started again with the allocation hooks, one iperf3 run per
    pair of hosts."""
    workdir = Path(tempfile.mkdtemp(prefix=f"metrics-{settings.tag}-hosts-alloc-",
                                    dir=settings.workdir))
    prefix = workdir / "alloc"
    counts = {}
    with environ(alloc_env(settings, prefix)), hosts.Vhostvpn(ns, workdir) as vpn:
        for name, (x, y, _) in VPN_PAIRS.items():
            pair = _vpn_pair(vpn, x, y)
            _direct_for(vpn, name)
            before = read_allocations(prefix, pair.pids)
            packets0, _ = device_packets(pair.client, pair.device)
            baselines.measure_direction(pair.client, pair.server, pair.address,
                                        settings.seconds, {})
            packets1, _ = device_packets(pair.client, pair.device)
            after = read_allocations(prefix, pair.pids)
            counts[name] = per_packet(before, after, packets1 - packets0)
    for row in rows:
        if row.subject in counts:
            row.allocations_per_packet = dict(counts[row.subject])


def _hosts_timed(settings: Settings, pair: HostPair, row: Metrics) -> None:
    packets0, bytes0 = device_packets(pair.client, pair.device)
    result = baselines.measure_direction(pair.client, pair.server, pair.address,
                                         settings.seconds, pair.pids)
    packets1, bytes1 = device_packets(pair.client, pair.device)
    if "error" in result:
        raise RuntimeError(str(result["error"]))
    row.mbits = float(result["gbits"]) * 1000  # iperf3's receiver rate
    row.pps = (packets1 - packets0) / settings.seconds
    row.bytes_per_packet = round((bytes1 - bytes0) / max(1, packets1 - packets0))
    row.loaded_latency_ms = result["ping_loaded_ms"]
    row.cpu_percent = dict(result["cpu_percent"])
    row.other_cpu_percent = float(result["other_cpu_percent"])
    row.notes.append(f"iperf3 retransmits {result.get('retransmits')}")


def _hosts_syscalls(settings: Settings, pair: HostPair, row: Metrics) -> None:
    """A second iperf3 run with perf on each process; syscalls over the device's packets.
    perf's window is the run plus its attach and iperf3's start (idle: a few wake-ups)."""
    counters = {k: _count.SyscallCounter(pid) for k, pid in pair.pids.items()}
    for counter in counters.values():
        counter.start()
    try:
        time.sleep(_count.PERF_ATTACH_SECONDS)
        packets0, _ = device_packets(pair.client, pair.device)
        baselines.measure_direction(pair.client, pair.server, pair.address, settings.seconds,
                                    {})
        packets1, _ = device_packets(pair.client, pair.device)
    finally:
        counts = {k: c.stop() for k, c in counters.items()}
    if packets1 > packets0:
        row.syscalls_per_packet = {k: round(s / (packets1 - packets0), 3)
                                   for k, (s, _) in counts.items()}


# --------------------------------------------------------------------------- NAT


NAT_PATH = "guest TCP -> NAT -> outside, one stream"
NAT_OUTSIDE = "10.203.9.2"  # bench/nat.py's OUT4, in the outside namespace
NAT_START_TIMEOUT = 20.0
NAT_WORKER_LIFETIME = 900.0  # a NAT worker the report forgot still ends by itself


def nat_path(settings: Settings) -> list[Metrics]:
    """A namespace's Linux TCP (the guest) through a user-space NAT to an iperf3 server in
    an outside namespace: vhostvpn's NatShell behind a TUN (bench/nat.py's pump, TSO on, in
    a worker process of its own) next to libslirp behind a TAP (slirp4netns, MTU 65520).
    Both NATs open their sockets in a "hub" namespace joined to the outside by a veth."""
    rows = []
    subjects = {"libslirp via slirp4netns (reference)": _slirp_nat,
                "vhostvpn NatShell (bench/nat.py)": _natshell_nat}
    for round_ in range(settings.rounds):
        for name, start in subjects.items():
            print(f"-- nat {name} round {round_ + 1}", file=sys.stderr, flush=True)
            row = Metrics(path=NAT_PATH, subject=name, reference="reference" in name,
                          round=round_, load=load_average())
            try:
                with start(settings, count_allocs=False) as pair:
                    row.latency_ms = baselines.idle_ping(pair.client, pair.address)
                    _hosts_timed(settings, pair, row)
                    if settings.syscalls_missing is None:
                        _hosts_syscalls(settings, pair, row)
                if settings.counter_site is not None:
                    prefix = settings.workdir / f"nat-alloc-{uuid.uuid4().hex[:6]}"
                    with start(settings, count_allocs=True, prefix=prefix) as pair:
                        before = read_allocations(prefix, pair.pids)
                        packets0, _ = device_packets(pair.client, pair.device)
                        baselines.measure_direction(pair.client, pair.server, pair.address,
                                                    settings.seconds, {})
                        packets1, _ = device_packets(pair.client, pair.device)
                        row.allocations_per_packet = per_packet(
                            before, read_allocations(prefix, pair.pids), packets1 - packets0)
            except Exception as error:  # reported; the other rows still run
                row.error = f"{type(error).__name__}: {error}"
            rows.append(row)
    return rows


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextlib.contextmanager
def _slirp_nat(settings: Settings, *, count_allocs: bool, prefix: Path | None = None
               ) -> Iterator[HostPair]:
    """hub, outside and guest namespaces; slirp4netns in the hub's, its tap0 in the guest's."""
    if shutil.which("slirp4netns") is None:
        raise RuntimeError("slirp4netns is not installed (apt-get install slirp4netns)")
    from tests.support.nat_netns import hub_and_outside

    guest = f"metrics{settings.tag}{uuid.uuid4().hex[:4]}g"
    with hub_and_outside(n=9) as names:
        subprocess.run(["ip", "netns", "add", guest], check=True, timeout=10)
        slirp = None
        try:
            subprocess.run(["ip", "-n", guest, "link", "set", "lo", "up"], check=True, timeout=10)
            env = alloc_env(settings, prefix) if count_allocs and prefix else {}
            with environ(env), (settings.workdir / f"{guest}.log").open("wb") as log:
                slirp = subprocess.Popen(
                    ["ip", "netns", "exec", names["hub"], "slirp4netns", "--configure",
                     "--mtu=65520", "--disable-host-loopback", "--netns-type=path",
                     f"/run/netns/{guest}", "tap0"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + NAT_START_TIMEOUT
            while subprocess.run(["ip", "-n", guest, "route", "get", NAT_OUTSIDE],
                                 capture_output=True, timeout=10).returncode != 0:
                if time.monotonic() > deadline or slirp.poll() is not None:
                    raise RuntimeError("slirp4netns did not configure tap0")
                time.sleep(0.1)
            yield HostPair(guest, names["outside"], NAT_OUTSIDE, "tap0",
                           {"slirp4netns": slirp.pid})
        finally:
            if slirp is not None:
                _stop(slirp)
            subprocess.run(["ip", "netns", "del", guest], check=False, capture_output=True)


@contextlib.contextmanager
def _natshell_nat(settings: Settings, *, count_allocs: bool, prefix: Path | None = None
                  ) -> Iterator[HostPair]:
    """A worker process (this script, --worker nat) holding the guest's TUN and NatShell."""
    env = dict(os.environ, **(alloc_env(settings, prefix) if count_allocs and prefix else {}))
    with (settings.workdir / f"nat-worker-{uuid.uuid4().hex[:6]}.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "nat"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        where = json.loads(_read_line(worker, NAT_START_TIMEOUT) or "{}")
        if "guest" not in where:
            raise RuntimeError("the NAT worker did not start")
        yield HostPair(where["guest"], where["outside"], NAT_OUTSIDE, where["device"],
                       {"NatShell process": worker.pid})
    finally:
        if worker.stdin is not None:
            worker.stdin.close()  # the worker's signal to stop and remove its namespaces
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(10)
        _stop(worker)


def nat_worker() -> None:
    """The worker's side: bench/nat.py's namespaces and TUN, NatShell with TSO and batches,
    serving until stdin closes or SIGTERM (or NAT_WORKER_LIFETIME)."""
    import ipaddress

    from bench import nat
    from netstack.frame import Frame
    from netstack.nat.packet import NatConfig
    from netstack.offload import adapt
    from tests.support.nat_netns import hub_and_outside, inside
    from tests.support.tun_kernel import kernel_behind_tun
    from tunnel.nat import NatShell

    accepts = nat.OFFLOADS["tso"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with hub_and_outside(n=9) as names, kernel_behind_tun(accepts) as (dev, ns):
        subprocess.run(["ip", "-n", ns, "route", "add", "default", "dev", dev.name],
                       check=True, timeout=10)
        config = NatConfig(nat.GW_MAC, frozenset({ipaddress.ip_address(nat.GATEWAY4).packed}),
                           mtu=1500, tso=True)

        async def serve() -> None:
            queue: list[Frame] = []
            ready = trio.Event()

            def deliver(frames: list[Frame]) -> None:
                for frame in frames:
                    queue.extend(adapt(frame, accepts))
                ready.set()

            shell = NatShell(config, deliver, upstreams=[ipaddress.ip_address("127.0.0.1")])

            async def from_kernel() -> None:
                while True:
                    await dev.wait_readable()
                    shell.from_guests([piece for f in dev.read_batch() for piece in adapt(
                        Frame(nat.ETHER[f.data[0] >> 4] + bytes(f.data),
                              nat._behind_ethernet(f.offload)), accepts)])

            async def to_kernel() -> None:
                nonlocal ready
                while True:
                    await ready.wait()
                    ready = trio.Event()
                    while queue:
                        batch = [Frame(memoryview(f.data)[14:], f.offload) for f in queue]
                        queue.clear()
                        while batch:
                            del batch[:dev.write_batch(batch)]
                            if batch:
                                await dev.wait_writable()

            with trio.move_on_after(NAT_WORKER_LIFETIME):
                async with trio.open_nursery() as nursery:
                    await nursery.start(shell.run)
                    nursery.start_soon(from_kernel)
                    nursery.start_soon(to_kernel)
                    print(json.dumps({"guest": ns, "device": dev.name,
                                      "outside": names["outside"]}), flush=True)
                    await trio.lowlevel.wait_readable(sys.stdin.fileno())
                    nursery.cancel_scope.cancel()

        with inside(names["hub"]):
            trio.run(serve)


# --------------------------------------------------------------------------- wire core


WIRE_BATCH = 64  # frames per FRAMES record, as bench/wire.py
WIRE_SUBJECTS = {"minimal length-prefix codec (reference)": "minimal",
                 "tunnel/wire.py encode + decode": "vhostvpn"}


def wire_path(settings: Settings) -> list[Metrics]:
    """bench/wire.py's codec in a worker process, no TLS: a batch of PLAIN frames encoded
    into one FRAMES record and decoded again, next to a minimal Python codec doing the least
    per frame (pack a 2-byte length, join; unpack, slice).  Worker processes so that the
    allocation counters load as in the other paths; syscalls should be none at all."""
    rows = []
    for round_ in range(settings.rounds):
        for size in SIZES:
            for name, kind in WIRE_SUBJECTS.items():
                print(f"-- wire {name} {size} B round {round_ + 1}", file=sys.stderr,
                      flush=True)
                row = Metrics(path=f"wire codec, {size} B frames, in process", subject=name,
                              reference=kind == "minimal", round=round_, load=load_average(),
                              bytes_per_packet=size)
                try:
                    timed = _wire_run(settings, kind, size, count_allocs=False)
                    row.pps = timed["frames"] / timed["seconds"]
                    row.mbits = row.pps * size * 8 / 1e6
                    row.cpu_percent["worker"] = round(100 * timed["cpu"] / timed["seconds"], 1)
                    if "syscalls" in timed:
                        row.syscalls_per_packet["worker"] = round(
                            timed["syscalls"] / timed["frames"], 5)
                    if settings.counter_site is not None:
                        counted = _wire_run(settings, kind, size, count_allocs=True)
                        row.allocations_per_packet = {
                            f"worker: {k}": round(counted[k] / counted["frames"], 2)
                            for k in ("py", "libc") if k in counted}
                except Exception as error:  # reported; the other rows still run
                    row.error = f"{type(error).__name__}: {error}"
                rows.append(row)
    return rows


def _wire_run(settings: Settings, kind: str, size: int, *, count_allocs: bool
              ) -> dict[str, float]:
    """Start a worker, let it set up, count its syscalls (perf) while it runs; its result."""
    prefix = settings.workdir / f"wire-alloc-{kind}-{size}"
    env = dict(os.environ, **(alloc_env(settings, prefix) if count_allocs else {}))
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", f"wire:{kind}:{size}",
         "--seconds", str(settings.seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    counter = None
    try:
        assert worker.stdin is not None and worker.stdout is not None
        if _read_line(worker, WINDOW_MARGIN) != "ready":
            raise RuntimeError(f"wire worker {kind} did not start")
        if not count_allocs and settings.syscalls_missing is None:
            counter = _count.SyscallCounter(worker.pid)
            counter.start()
            time.sleep(_count.PERF_ATTACH_SECONDS)
        worker.stdin.write("go\n")
        worker.stdin.flush()
        result = json.loads(_read_line(worker, settings.seconds + WINDOW_MARGIN))
        if counter is not None:
            result["syscalls"], _ = counter.stop()
            counter = None
        return result
    finally:
        if counter is not None:
            counter.stop()
        worker.kill()
        worker.wait(10)


def _read_line(worker: subprocess.Popen[str], timeout: float) -> str:
    """The worker's next line, or RuntimeError after `timeout` seconds (a hung worker must
    not hang the report)."""
    assert worker.stdout is not None
    readable, _, _ = select.select([worker.stdout], [], [], timeout)
    if not readable:
        raise RuntimeError(f"worker {worker.pid} printed nothing for {timeout:.0f} s")
    return worker.stdout.readline().strip()


def wire_worker(kind: str, size: int, seconds: float) -> None:
    """The worker's side: build the codec, print "ready", wait for "go", run `seconds`,
    print one JSON line (frames, seconds, CPU seconds, own allocation counts if loaded)."""
    import struct

    from bench.wire import open_pair
    from netstack.frame import Frame
    from tunnel.wire import Frames

    batch = [Frame(os.urandom(size)) for _ in range(WIRE_BATCH)]
    if kind == "vhostvpn":
        client, server = open_pair()

        def once() -> None:
            server.receive_data(client.send_frames(batch))
            events = server.next_events()
            if not isinstance(events[0], Frames):
                raise RuntimeError(f"decoded {events!r}")
    else:
        header = struct.Struct("!H")
        pack, unpack_from = header.pack, header.unpack_from
        datas = [f.data for f in batch]

        def once() -> None:
            parts = []
            for data in datas:
                parts.append(pack(len(data)))
                parts.append(data)
            record = b"".join(parts)
            frames, at, end = [], 0, len(record)
            while at < end:
                (length,) = unpack_from(record, at)
                at += header.size
                frames.append(record[at:at + length])
                at += length

    once()
    prefix = os.environ.get(_count.ALLOC_PREFIX_ENV)
    print("ready", flush=True)
    sys.stdin.readline()

    def counts() -> dict[str, int]:
        if not prefix:
            return {}
        py = _count.read_alloc_counts(Path(prefix), os.getpid())
        libc = _count.read_malloc_counts(Path(prefix), os.getpid())
        return {**({"py": py.allocations} if py else {}),
                **({"libc": libc.allocations} if libc else {})}

    before, cpu0, start = counts(), time.process_time(), time.perf_counter()
    deadline, calls = start + seconds, 0
    while time.perf_counter() < deadline:
        for _ in range(20):
            once()
        calls += 20
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    after = counts()
    print(json.dumps({"frames": calls * WIRE_BATCH, "seconds": elapsed, "cpu": cpu,
                      **{k: after[k] - before[k] for k in after}}), flush=True)


# --------------------------------------------------------------------------- report


PATHS: dict[str, Callable[[Settings], list[Metrics]]] = {
    "vhost": vhost_path,
    "hosts": hosts_path,
    "wire": wire_path,
    "nat": nat_path,
}


def summarize(rows: Sequence[Metrics]) -> list[Metrics]:
    """One row per (path, subject): medians over rounds of every number, notes of all."""
    groups: dict[tuple[str, str], list[Metrics]] = {}
    for row in rows:
        groups.setdefault((row.path, row.subject), []).append(row)
    out = []
    for (path, subject), group in groups.items():
        ok = [r for r in group if r.error is None] or group[:1]
        first = ok[0]
        out.append(Metrics(
            path=path, subject=subject, reference=first.reference, round=len(ok),
            pps=_median(r.pps for r in ok), mbits=_median(r.mbits for r in ok),
            bytes_per_packet=_median(r.bytes_per_packet for r in ok),
            latency_ms=_median_dict(r.latency_ms for r in ok),
            loaded_latency_ms=_median_dict(r.loaded_latency_ms for r in ok),
            cpu_percent=_median_dict(r.cpu_percent for r in ok) or {},
            syscalls_per_packet=_median_dict(r.syscalls_per_packet for r in ok) or {},
            allocations_per_packet=_median_dict(r.allocations_per_packet for r in ok) or {},
            other_cpu_percent=_median(r.other_cpu_percent for r in ok),
            load=max(r.load for r in group),
            notes=sorted({n for r in group for n in r.notes}),
            error="; ".join(r.error for r in group if r.error) or None))
    return out


def _median(values: Iterator[float | None] | Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _median_dict(dicts: Iterator[Mapping[str, float] | None]) -> dict[str, float] | None:
    present = [d for d in dicts if d]
    if not present:
        return None
    keys = sorted({k for d in present for k in d})
    return {k: _median(d.get(k) for d in present) for k in keys}  # type: ignore[misc]


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _fmt_dict(values: Mapping[str, float], digits: int) -> str:
    return "; ".join(f"{k} {v:,.{digits}f}" for k, v in values.items()) or "-"


def per_cpu_second(row: Metrics) -> float | None:
    """Packets per CPU-second of the subject's processes: the rate a whole CPU would give,
    less sensitive to a shared machine than packets/s (None without processes)."""
    cpu = sum(row.cpu_percent.values()) / 100
    return row.pps / cpu if row.pps and cpu > 0 else None


def markdown(summary: Sequence[Metrics]) -> str:
    references: dict[str, Metrics] = {}
    for r in summary:  # the first reference of a path is the one ratios are taken to
        if r.reference and r.mbits:
            references.setdefault(r.path, r)
    lines = ["| path | subject | kpps | kpps per CPU-s | Mbit/s | Mbit/s vs ref. | B/packet | "
             "ping idle p50 / p99 ms | ping loaded p50 / p99 ms | CPU % | syscalls / packet | "
             "allocations / packet | other CPU % | load |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---|---|---|---:|---:|"]
    for r in summary:
        ref = references.get(r.path)
        ratio = f"{r.mbits / ref.mbits:.3f}" if ref and r.mbits and ref is not r else "-"
        idle = (f"{r.latency_ms['p50']:.3g} / {r.latency_ms['p99']:.3g}" if r.latency_ms
                else "- (no ping)")
        loaded = (f"{r.loaded_latency_ms['p50']:.3g} / {r.loaded_latency_ms['p99']:.3g}"
                  if r.loaded_latency_ms else "-")
        subject = f"**{r.subject}**" if not r.reference else r.subject
        if r.error and r.pps is None:
            error = r.error.splitlines()[0][:100].replace("|", "/")
            lines.append(f"| {r.path} | {subject} | error: {error} "
                         "| | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r.path} | {subject} | {_fmt(r.pps and r.pps / 1e3, 1)} | "
            f"{_fmt(per_cpu_second(r) and per_cpu_second(r) / 1e3, 1)} | {_fmt(r.mbits)} | "
            f"{ratio} | {_fmt(r.bytes_per_packet)} | {idle} | {loaded} | "
            f"{_fmt_dict(r.cpu_percent, 0)} | {_fmt_dict(r.syscalls_per_packet, 3)} | "
            f"{_fmt_dict(r.allocations_per_packet, 1)} | {_fmt(r.other_cpu_percent)} | "
            f"{r.load} |")
    return "\n".join(lines)


def plot(summary: Sequence[Metrics], output: Path) -> None:
    """A grid: one row per metric, one column per path, one bar per subject (grey for the
    references), each bar labelled with its value; absent values are left out."""
    try:
        import matplotlib  # the `bench` extra
    except ImportError as error:
        raise SystemExit(f"--plot needs matplotlib: pip install -e '.[bench]' ({error})"
                         ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics: list[tuple[str, Callable[[Metrics], float | None]]] = [
        ("packets/s", lambda r: r.pps),
        ("Mbit/s", lambda r: r.mbits),
        ("ping p50 idle, ms", lambda r: r.latency_ms and r.latency_ms["p50"]),
        ("CPU %, all its processes", lambda r: sum(r.cpu_percent.values()) or None),
        ("syscalls / packet, all", lambda r: sum(r.syscalls_per_packet.values())
         if r.syscalls_per_packet else None),
        ("allocations / packet, all",
         lambda r: sum(r.allocations_per_packet.values()) if r.allocations_per_packet
         else None),
    ]
    paths = list(dict.fromkeys(r.path for r in summary))
    fig, axes = plt.subplots(len(metrics), len(paths), squeeze=False,
                             figsize=(4.2 * len(paths), 1.9 * len(metrics) + 1.6))
    for column, path in enumerate(paths):
        rows = [r for r in summary if r.path == path]
        axes[0][column].set_title(path, fontsize=9)
        for (title, get), ax in zip(metrics, (a[column] for a in axes), strict=True):
            values = [get(r) for r in rows]
            ax.bar(range(len(rows)), [v or 0 for v in values],
                   color=["#999999" if r.reference else "#1f77b4" for r in rows])
            for x, v in enumerate(values):
                ax.annotate("n/a" if v is None else f"{v:,.3g}", (x, v or 0), ha="center",
                            va="bottom", fontsize=7)
            ax.set_ylabel(title, fontsize=7)
            ax.tick_params(labelsize=7)
            ax.set_xticks(range(len(rows)), [textwrap.fill(r.subject, 16) for r in rows],
                          fontsize=6)
    fig.suptitle("bench/report.py: subjects (blue), references (grey), one run", fontsize=9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=80)
    plt.close(fig)


def write_docs(table: str, header: str) -> None:
    """Replace the text between DOCS_BEGIN and DOCS_END in docs/benchmarks.md."""
    text = DOCS.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise RuntimeError(f"{DOCS} has no {DOCS_BEGIN} ... {DOCS_END} section")
    head, rest = text.split(DOCS_BEGIN, 1)
    tail = rest.split(DOCS_END, 1)[1]
    DOCS.write_text(f"{head}{DOCS_BEGIN}\n{header}\n\n{table}\n{DOCS_END}{tail}")


def measure(args: argparse.Namespace, paths: Sequence[str]) -> tuple[list[Metrics], str]:
    """Run the paths in a temp dir of the run's own (the counters built there); the rows and
    the header line that says how they were measured."""
    tag = uuid.uuid4().hex[:6]
    rows: list[Metrics] = []
    with tempfile.TemporaryDirectory(prefix=f"metrics-{tag}-") as tmp, \
            environ({"PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}):
        workdir = Path(tmp)
        try:
            site, missing = _count.build_alloc_counter(workdir / "site"), ""
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
            site, missing = None, str(error)
        settings = Settings(seconds=args.seconds, rounds=args.rounds, workdir=workdir,
                            counter_site=site, counter_missing=missing,
                            syscalls_missing=_count.perf_unavailable_reason(), tag=tag)
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for path in paths:
            rows += PATHS[path](settings)
    missing_notes = [f"syscalls not counted: {settings.syscalls_missing}"
                     if settings.syscalls_missing else "",
                     f"allocations not counted: {settings.counter_missing}"
                     if settings.counter_missing else ""]
    header = (f"Run {started}, `bench/report.py --paths {','.join(paths)} --rounds "
              f"{args.rounds} --seconds {args.seconds}`; medians over rounds; load = highest "
              f"1-minute load average seen at a window's start. "
              + " ".join(n for n in missing_notes if n)).strip()
    return rows, header


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated, of: {', '.join(PATHS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="per window")
    parser.add_argument("--plot", type=Path, default=None, help="PNG to write")
    parser.add_argument("--docs", action="store_true",
                        help="write the table into docs/benchmarks.md between its markers")
    parser.add_argument("--vhost-subject", action="append", default=[],
                        metavar="LABEL:VAR=VALUE[,VAR=VALUE]",
                        help="one more vhostvpn back-end on the vhost path, started with this "
                             "environment, e.g. 'native ring:VHOSTVPN_RING=native' (repeat)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: table, --docs and --plot from a saved run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # wire:KIND:SIZE, wire_path's
    args = parser.parse_args(argv)
    if args.worker == "nat":
        nat_worker()
        return 0
    if args.worker:
        _, kind, size = args.worker.split(":")
        wire_worker(kind, int(size), args.seconds)
        return 0
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows, header = [Metrics(**r) for r in saved["rows"]], saved["header"]
    else:
        paths = [p for p in args.paths.split(",") if p]
        unknown = [p for p in paths if p not in PATHS]
        if unknown:
            parser.error(f"unknown paths {unknown}; known: {', '.join(PATHS)}")
        if os.geteuid() != 0:
            parser.error("needs root (network namespaces, perf on other processes)")
        subjects = dict(VHOST_SUBJECTS)
        for spec in args.vhost_subject:
            label, _, assignments = spec.partition(":")
            env = dict(a.split("=", 1) for a in assignments.split(",") if "=" in a)
            if not label or not env:
                parser.error(f"--vhost-subject {spec!r}: expected LABEL:VAR=VALUE[,...]")
            subjects[f"vhostvpn hub, {label}"] = VhostSubject("vhostvpn", env)
        if args.vhost_subject:
            PATHS["vhost"] = functools.partial(vhost_path, subjects=subjects)
        rows, header = measure(args, paths)
    summary = summarize(rows)
    table = markdown(summary)
    print(header + "\n\n" + table)
    if not args.from_json:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        output = RESULTS_DIR / f"report-{time.strftime('%Y%m%d-%H%M%S')}.json"
        output.write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows],
                                      "summary": [asdict(r) for r in summary],
                                      "machine": vhost_switch.machine_info()}, indent=1))
        print(f"JSON: {output}", file=sys.stderr)
    if args.docs:
        write_docs(table, header)
    if args.plot:
        plot(summary, args.plot)
    return 0 if all(r.error is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
