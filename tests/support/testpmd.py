"""DPDK testpmd as a real vhost-user peer: virtio-user front-ends (guest driver) or vhost back-ends.

Used by the slow tests and by bench/ to drive frames through a vhost-user back-end.
It only starts, watches and stops testpmd processes it started itself; it never touches others.

Theory of operation:
1. `TestpmdConfig` describes one testpmd process (ports, forward mode, lcores) and renders its
   argv. Ports are `VirtioUserPort` (testpmd is the guest side: it connects to, or with
   `server=True` listens on, a vhost-user socket) or `VhostPort` (testpmd's own vhost PMD is
   the back-end).
2. `run_testpmd()` starts the process with stdout+stderr on a pipe and a reader task that
   parses the periodic "NIC statistics" blocks (`--stats-period`) into `PortStats` and the
   final "Forward statistics" blocks into `ForwardStats`.
3. Leaving the context sends SIGINT, waits (bounded), then SIGKILLs that one PID if needed,
   and removes the EAL runtime directory of its unique `--file-prefix`.

Rules learned on DPDK 22.11 with `--no-huge`:
* testpmd needs two lcores (main + one forwarding lcore); with one CPU, map both onto it:
  `--lcores=(0,1)@CPU`. The main lcore only sleeps between stats prints.
* The default mbuf pool (~155k mbufs) does not fit a small `-m`; always pass
  `--total-num-mbufs`.
* The EAL runtime dir (/var/run/dpdk/PREFIX for root) is left behind at exit; we delete it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

TESTPMD_BINARY = "dpdk-testpmd"

# Bounds on every wait (seconds).
STOP_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
READY_TIMEOUT = 30.0

# How many output lines to keep for error messages.
OUTPUT_TAIL_LINES = 200

FORWARD_MODES = ("io", "mac", "macswap", "flowgen", "rxonly", "txonly", "5tswap", "icmpecho")

_NIC_STATS_START = re.compile(r"#+ NIC statistics for port (\d+)\s+#+")
_NIC_STATS_END = re.compile(r"^\s*#{20,}\s*$")
_FWD_STATS_START = re.compile(r"-+ Forward statistics for port (\d+)\s+-+")
_FWD_STATS_END = re.compile(r"^\s*-{20,}\s*$")
_COUNTER = re.compile(r"([A-Za-z][A-Za-z-]*):\s+(\d+)")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_FORWARDING_STARTED = ("start packet forwarding", "Start automatic packet forwarding")
# testpmd keeps running (forwarding nothing) when a vdev fails to probe: treat these as fatal.
_FATAL_MARKERS = ("No probed ethernet devices", "failed to initialize", "EAL: Error - exiting",
                  "Fail to start port", "Fail to configure port")


class TestpmdError(RuntimeError):
    """testpmd exited early, printed an error, or did not reach a state in time."""

    __test__ = False  # not a pytest class


# --------------------------------------------------------------------------- ports


@dataclass(frozen=True)
class VirtioUserPort:
    """A virtio-user port: testpmd plays guest driver + vhost-user front-end on `path`."""

    path: str | os.PathLike[str]
    mac: str | None = None
    server: bool = False
    queues: int = 1
    queue_size: int = 256

    def vdev(self, index: int) -> str:
        args = [f"net_virtio_user{index}", f"path={os.fspath(self.path)}",
                f"queues={self.queues}", f"queue_size={self.queue_size}"]
        if self.mac is not None:
            args.append(f"mac={_checked_mac(self.mac)}")
        if self.server:
            args.append("server=1")
        return ",".join(args)


@dataclass(frozen=True)
class VhostPort:
    """A vhost PMD port: testpmd is the vhost-user back-end, listening on `iface` by default."""

    iface: str | os.PathLike[str]
    client: bool = False
    queues: int = 1

    def vdev(self, index: int) -> str:
        args = [f"net_vhost{index}", f"iface={os.fspath(self.iface)}", f"queues={self.queues}"]
        if self.client:
            args.append("client=1")
        return ",".join(args)


Port = VirtioUserPort | VhostPort


def _checked_mac(mac: str) -> str:
    if not _MAC.match(mac):
        raise ValueError(f"MAC address must look like 02:00:00:00:00:01, got {mac!r}")
    return mac.lower()


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TestpmdConfig:
    """One testpmd process. `argv()` renders the exact command line."""

    __test__ = False  # not a pytest class

    ports: Sequence[Port]
    forward_mode: str = "io"
    # EAL --lcores map: lcore 0 is main (sleeps), lcore 1 forwards. "(0,1)@0" puts both on CPU 0;
    # "0@0,1@1" gives the forwarding lcore CPU 1 to itself.
    lcores: str = "(0,1)@0"
    nb_cores: int = 1
    txpkts: int | None = None
    eth_peers: Mapping[int, str] = field(default_factory=dict)
    burst: int | None = None
    stats_period: int = 1
    memory_mb: int = 256
    total_num_mbufs: int = 8192
    no_lsc_interrupt: bool = False
    flowgen_flows: int | None = None
    # Send one burst (txonly engine, to eth_peers) before the forward mode starts; with
    # rxonly this lets a learning switch see the receiver's MAC.
    tx_first: bool = False
    extra_eal_args: Sequence[str] = ()
    extra_app_args: Sequence[str] = ()
    file_prefix: str = field(default_factory=lambda: f"vhostvpn-{uuid.uuid4().hex[:12]}")
    binary: str = TESTPMD_BINARY

    def __post_init__(self) -> None:
        if not self.ports:
            raise ValueError("testpmd needs at least one port")
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(
                f"forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")
        if self.stats_period < 1:
            raise ValueError(f"stats_period must be >= 1 s, got {self.stats_period}")

    def argv(self) -> list[str]:
        eal = [self.binary, f"--lcores={self.lcores}", "--no-huge", "--no-pci",
               "--single-file-segments", "-m", str(self.memory_mb),
               f"--file-prefix={self.file_prefix}", "--no-telemetry"]
        for index, port in enumerate(self.ports):
            eal += ["--vdev", port.vdev(index)]
        eal += list(self.extra_eal_args)
        app = [f"--forward-mode={self.forward_mode}", f"--nb-cores={self.nb_cores}",
               f"--stats-period={self.stats_period}", f"--total-num-mbufs={self.total_num_mbufs}",
               "--no-mlockall"]
        if self.txpkts is not None:
            app.append(f"--txpkts={self.txpkts}")
        for port_id, mac in sorted(self.eth_peers.items()):
            app.append(f"--eth-peer={port_id},{_checked_mac(mac)}")
        if self.burst is not None:
            app.append(f"--burst={self.burst}")
        if self.no_lsc_interrupt:
            app.append("--no-lsc-interrupt")
        if self.flowgen_flows is not None:
            app.append(f"--flowgen-flows={self.flowgen_flows}")
        if self.tx_first:
            app.append("--tx-first")
        app += list(self.extra_app_args)
        return [*eal, "--", *app]

    def runtime_dirs(self) -> list[Path]:
        """Where EAL may have put this prefix's runtime files (root, XDG, fallback)."""
        bases = [Path("/var/run/dpdk"), Path("/run/dpdk"), Path("/tmp/dpdk")]
        if xdg := os.environ.get("XDG_RUNTIME_DIR"):
            bases.append(Path(xdg) / "dpdk")
        return [base / self.file_prefix for base in bases]


# --------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class PortStats:
    """One periodic "NIC statistics" block for one port (cumulative counters + rates)."""

    port: int
    time: float  # trio.current_time() when the block was complete
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0
    rx_pps: int = 0
    rx_bps: int = 0
    tx_pps: int = 0
    tx_bps: int = 0


@dataclass(frozen=True)
class ForwardStats:
    """The final "Forward statistics" block for one port, printed when testpmd stops."""

    port: int
    rx_packets: int = 0
    rx_dropped: int = 0
    rx_total: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0
    tx_total: int = 0


def _counter_name(label: str) -> str:
    return label.strip().lower().replace("-", "_")


class StatsParser:
    """Bytes of testpmd output in, stats out. No I/O; feed it lines."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.latest: dict[int, PortStats] = {}
        self.final: dict[int, ForwardStats] = {}
        self.samples = 0  # number of complete NIC statistics blocks seen
        self._block: tuple[str, int] | None = None
        self._counters: dict[str, int] = {}

    def feed_line(self, line: str) -> None:
        line = _ANSI_ESCAPE.sub("", line)
        if match := _NIC_STATS_START.search(line):
            self._block, self._counters = ("nic", int(match.group(1))), {}
        elif match := _FWD_STATS_START.search(line):
            self._block, self._counters = ("fwd", int(match.group(1))), {}
        elif self._block is not None:
            kind, port = self._block
            if (kind == "nic" and _NIC_STATS_END.match(line)) or (
                kind == "fwd" and _FWD_STATS_END.match(line)
            ):
                self._finish(kind, port)
            else:
                for label, value in _COUNTER.findall(line):
                    self._counters[_counter_name(label)] = int(value)

    def _finish(self, kind: str, port: int) -> None:
        if kind == "nic":
            known = PortStats.__dataclass_fields__
            values = {k: v for k, v in self._counters.items() if k in known}
            self.latest[port] = PortStats(port=port, time=self._clock(), **values)
            self.samples += 1
        else:
            known = ForwardStats.__dataclass_fields__
            values = {k: v for k, v in self._counters.items() if k in known}
            self.final[port] = ForwardStats(port=port, **values)
        self._block, self._counters = None, {}


# --------------------------------------------------------------------------- process


class Testpmd:
    """A running testpmd; create with `run_testpmd()`."""

    def __init__(self, config: TestpmdConfig, process: trio.Process,
                 log_path: Path | None) -> None:
        self.config = config
        self.process = process
        self.log_path = log_path
        self.output: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        self.parser = StatsParser(trio.current_time)
        self.forwarding = False
        self.fatal_line: str | None = None
        self._changed = trio.Event()
        self._eof = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self, port: int = 0) -> PortStats | None:
        """The latest periodic counters for `port`, or None before the first stats print."""
        return self.parser.latest.get(port)

    def final_stats(self, port: int = 0) -> ForwardStats | None:
        """The end-of-run forward statistics for `port` (available after `stop()`)."""
        return self.parser.final.get(port)

    def output_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.output)[-lines:])

    async def _read_output(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        log = self.log_path.open("ab") if self.log_path else None
        try:
            while chunk := await self.process.stdout.receive_some(65536):
                if log:
                    log.write(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._feed(raw.decode("utf-8", "replace"))
            if pending:
                self._feed(pending.decode("utf-8", "replace"))
        finally:
            self._eof = True
            self._wake()
            if log:
                log.close()

    def _feed(self, line: str) -> None:
        self.output.append(line)
        self.parser.feed_line(line)
        if any(marker in line for marker in _FORWARDING_STARTED):
            self.forwarding = True
        if self.fatal_line is None and any(marker in line for marker in _FATAL_MARKERS):
            self.fatal_line = line.strip()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[Testpmd], bool], timeout: float,
                         what: str) -> None:
        """Wait until `predicate(self)` holds; TestpmdError on timeout or early exit."""
        with trio.move_on_after(timeout):
            while not predicate(self):
                if self.fatal_line is not None:
                    raise TestpmdError(
                        f"testpmd (pid {self.pid}) failed ({self.fatal_line!r}) while waiting "
                        f"for {what}; output tail:\n{self.output_tail()}")
                if self._eof:
                    raise TestpmdError(
                        f"testpmd (pid {self.pid}) exited while waiting for {what}; "
                        f"output tail:\n{self.output_tail()}")
                await self._changed.wait()
            return
        raise TestpmdError(f"testpmd (pid {self.pid}) did not reach {what} within {timeout} s; "
                           f"output tail:\n{self.output_tail()}")

    async def wait_forwarding(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ports are up and forwarding started (and the first stats block printed)."""
        await self.wait_until(lambda p: p.forwarding and p.parser.samples > 0, timeout,
                              "packet forwarding with a first stats print")

    async def next_sample(self, timeout: float | None = None) -> None:
        """Wait for the next complete round of periodic stats (one block per port)."""
        target = self.parser.samples + len(self.config.ports)
        limit = timeout if timeout is not None else 3 * self.config.stats_period + 2
        await self.wait_until(lambda p: p.parser.samples >= target, limit, "the next stats print")

    async def wait_for_rx(self, count: int, port: int = 0, timeout: float = 10.0) -> PortStats:
        """Wait until `port` has counted at least `count` received frames."""
        def arrived(p: Testpmd) -> bool:
            stats = p.stats(port)
            return stats is not None and stats.rx_packets >= count
        await self.wait_until(arrived, timeout, f"{count} RX packets on port {port}")
        stats = self.stats(port)
        assert stats is not None
        return stats

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGINT, wait for the final stats and exit; SIGKILL this PID as a last resort."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            with trio.move_on_after(timeout):
                await self.process.wait()
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                with trio.move_on_after(KILL_TIMEOUT):
                    await self.process.wait()
        # Let the reader drain what is left in the pipe (final forward statistics).
        with trio.move_on_after(KILL_TIMEOUT):
            while not self._eof:
                await self._changed.wait()
        return self.process.returncode if self.process.returncode is not None else -9

    def remove_runtime_files(self) -> None:
        for path in self.config.runtime_dirs():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def run_testpmd(config: TestpmdConfig, *, log_path: Path | None = None,
                      wait_forwarding: bool = True,
                      ready_timeout: float = READY_TIMEOUT) -> AsyncIterator[Testpmd]:
    """Run testpmd for the duration of the block; stop it and clean its files on exit."""
    if shutil.which(config.binary) is None:
        raise TestpmdError(f"{config.binary} not found on PATH (apt-get install dpdk)")
    process = await trio.lowlevel.open_process(
        config.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    pmd = Testpmd(config, process, log_path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pmd._read_output)
            try:
                if wait_forwarding:
                    await pmd.wait_forwarding(ready_timeout)
                yield pmd
            finally:
                with trio.CancelScope(shield=True):
                    await pmd.stop()
    except BaseExceptionGroup as group:
        # The reader task never fails on its own; surface the caller's single error unwrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        if process.returncode is None:  # only if the nursery itself blew up
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        pmd.remove_runtime_files()


# --------------------------------------------------------------------------- helpers


_mac_counter = itertools.count(1)


def local_mac(index: int | None = None) -> str:
    """A locally administered unicast MAC, 02:00:00:00:xx:yy, unique per call if no index."""
    n = next(_mac_counter) if index is None else index
    if not 0 <= n <= 0xFFFF:
        raise ValueError(f"MAC index must be 0..65535, got {n}")
    return f"02:00:00:00:{n >> 8:02x}:{n & 0xFF:02x}"


async def wait_for_path(path: str | os.PathLike[str], timeout: float = READY_TIMEOUT,
                        poll: float = 0.02) -> None:
    """Wait until `path` exists (a vhost-user socket a back-end creates); TimeoutError if not."""
    with trio.move_on_after(timeout):
        while not os.path.exists(path):
            await trio.sleep(poll)
        return
    raise TimeoutError(f"{os.fspath(path)} did not appear within {timeout} s")


def vhost_switch_config(sock_a: str | os.PathLike[str], sock_b: str | os.PathLike[str], *,
                        lcores: str = "0@0,1@1", **kwargs: object) -> TestpmdConfig:
    """The C reference back-end: testpmd vhost PMD on two sockets, io-forwarding port0<->port1."""
    return TestpmdConfig(ports=[VhostPort(sock_a), VhostPort(sock_b)], forward_mode="io",
                         lcores=lcores, total_num_mbufs=16384, **kwargs)  # type: ignore[arg-type]
