"""QEMU test guests for the slow tests: boot through qemu/run-vm.sh, drive the serial console.

Used by tests under trio (`async with Guest(...) as g`). It kills only what it started: the
process group of each run-vm.sh/QEMU it launched (its own session), never anything else.

Theory of operation:
1. `Guest.argv()` renders the qemu/run-vm.sh command line; that script is the one place the
   QEMU command line lives. run-vm.sh execs QEMU, so the PID started here is QEMU's.
2. QEMU's serial console is on the process's stdin/stdout. A reader task appends every byte
   to `<log_dir>/<name>.console.log`, splits lines (dropping the tty's \\r) and wakes waiters.
   QEMU's own stderr goes to `<log_dir>/<name>.qemu.log`.
3. The guest's /init (qemu/guest-init) prints `VV-BOOTED key=value...` once eth0 is set up,
   on every boot. `wait_booted()` waits for the next boot not yet consumed; `reboot()` moves
   the target one boot further before sending `reboot -f`.
4. `run()` sends `VVDATA <id> <chunk>`... `VVRUN <id> <chunk>` (base64 of the script, so no
   line the host sends can resemble a marker; echo is off anyway) and collects the lines
   between `VVOUT-BEGIN <id>` and `VVOUT-END <id> rc=N`. Ids carry a per-guest random token
   so output of a command that timed out earlier can never be mistaken for a later one.
5. Every wait is bounded; a timeout or an early QEMU exit raises GuestError with the tail of
   the console and QEMU logs.
6. `dhcp_guests` boots several guests that lease their addresses from the hub. What the
   tests measure between two guests: `iperf3_mbits` (a TCP stream), `send_file`
   (random bytes over busybox nc, sha256 on both ends).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import trio

from tunnel.lab.console import (
    BOOT_FAILED,
    BOOTED,
    begin_marker,
    collect_output,
    end_pattern,
    parse_booted,
    script_lines,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
QEMU_DIR = ROOT / "qemu"
RUN_VM = QEMU_DIR / "run-vm.sh"
BUILD_IMAGE = QEMU_DIR / "build_image.py"
BUILD_DIR = Path(os.environ.get("VV_BUILD_DIR", QEMU_DIR / "build"))
QEMU_BINARY = "qemu-system-x86_64"

BOOT_TIMEOUT = 90.0  # TCG, two guests and a busy-polling backend on two cores
RUN_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0  # SIGTERM -> SIGKILL
BUILD_TIMEOUT = 600.0
# The console protocol (markers, chunking: CHUNK_CHARS, MAX_SCRIPT_BYTES) is tunnel/lab/console.py,
# shared with `vhostvpn lab`.
LOG_TAIL_LINES = 40
KERNEL_ARGS_LIMIT = 1700  # x86 COMMAND_LINE_SIZE is 2048; run-vm.sh adds ~200 bytes

_BOOTED = BOOTED
_BOOT_FAILED = BOOT_FAILED
_CMD_END = re.compile(r"VV-CMD-END rc=(\d+)")


class GuestError(RuntimeError):
    """A guest did not boot, a command did not finish in time, or QEMU exited early."""


def image_paths() -> tuple[Path, Path]:
    return BUILD_DIR / "vmlinuz", BUILD_DIR / "initramfs.gz"


def image_available() -> bool:
    """True if a built guest image exists (it may be older than its inputs: see ensure_image)."""
    return all(p.exists() for p in image_paths())


def qemu_available() -> bool:
    return shutil.which(QEMU_BINARY) is not None


def ensure_image(force: bool = False, timeout: float = BUILD_TIMEOUT) -> Path:
    """Build (or confirm up to date) the guest image with qemu/build_image.py; return BUILD_DIR.

    Synchronous: call it from a session fixture or wrap it in trio.to_thread.run_sync.
    The builder's progress goes to this process's stderr.
    """
    argv = [sys.executable, str(BUILD_IMAGE), *(["--force"] if force else [])]
    seen: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # progress, passed through as it comes
                sys.stderr.write(line)
                seen.append(line)
            rc = proc.wait()
        finally:
            timer.cancel()
    if rc != 0:
        raise GuestError(f"guest image build failed (rc={rc}, killed after {timeout} s if "
                         f"negative):\n{''.join(seen[-30:])}")
    return BUILD_DIR


def default_mac(name: str) -> str:
    """A stable locally administered MAC per guest name: 52:54:00 + 3 bytes of sha256(name)."""
    digest = hashlib.sha256(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


@dataclass(frozen=True)
class BootInfo:
    """One `VV-BOOTED` line: what the guest reported once eth0 was configured."""

    number: int  # 1 for the first boot, 2 after the first reboot, ...
    fields: dict[str, str]
    failed: str | None  # the VV-BOOT-FAILED reason printed just before, if any
    host_time: float  # trio.current_time() when the line arrived

    @property
    def ip(self) -> str | None:
        value = self.fields.get("ip", "none")
        return None if value == "none" else value

    @property
    def ip6(self) -> str | None:
        value = self.fields.get("ip6", "none")
        return None if value == "none" else value

    @property
    def uptime(self) -> float:
        return float(self.fields.get("uptime", "nan"))


@dataclass
class Guest:
    """One QEMU guest on a vhost-user socket (or slirp with user_net=True).

    Networking comes from the kernel command line: ip="10.0.0.1/24", ip6="fd00::1/64",
    dhcp=True, mtu=1400; cmd= runs once after boot (then the guest powers off unless stay).
    """

    name: str
    socket: str | os.PathLike[str] | None = None
    user_net: bool = False
    mac: str | None = None
    mem: str = "256M"
    smp: int = 1
    queues: int = 1
    device_opts: str = ""  # extra virtio-net-pci properties, e.g. "csum=off,guest_csum=off"
    ip: str | None = None
    gw: str | None = None
    ip6: str | None = None
    dhcp: bool = False
    mtu: int | None = None
    cmd: str | None = None
    stay: bool = False
    append: str = ""  # further kernel arguments
    accel: str | None = None  # None: run-vm.sh decides (VV_ACCEL or its KVM probe)
    log_dir: Path | None = None
    extra_qemu_args: Sequence[str] = ()

    process: trio.Process | None = field(default=None, init=False, repr=False)
    lines: list[str] = field(default_factory=list, init=False, repr=False)
    boots: list[BootInfo] = field(default_factory=list, init=False, repr=False)
    started_at: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.socket is None) == (not self.user_net):
            raise ValueError(f"guest {self.name}: give exactly one of socket= or user_net=True")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", self.name):
            raise ValueError(f"guest name must be a hostname label, got {self.name!r}")
        if self.mac is None:
            self.mac = default_mac(self.name)
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix=f"vv-guest-{self.name}-"))
        self.log_dir = Path(self.log_dir)
        self._token = secrets.token_hex(3)
        self._counter = 0
        self._boot_target = 1
        self._pending_failure: str | None = None
        self._eof = False
        self._changed = trio.Event()
        self._run_lock = trio.Lock()

    # --- command line ------------------------------------------------------------------

    @property
    def console_log(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{self.name}.console.log"

    @property
    def qemu_log(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{self.name}.qemu.log"

    def kernel_args(self) -> str:
        args = []
        if self.ip:
            args.append(f"vv.ip={self.ip}")
        if self.gw:
            args.append(f"vv.gw={self.gw}")
        if self.ip6:
            args.append(f"vv.ip6={self.ip6}")
        if self.dhcp:
            args.append("vv.dhcp=1")
        if self.mtu is not None:
            args.append(f"vv.mtu={self.mtu}")
        if self.cmd is not None:
            args.append("vv.cmd=" + base64.b64encode(self.cmd.encode()).decode())
        if self.stay:
            args.append("vv.stay=1")
        if self.append:
            args.append(self.append)
        line = " ".join(args)
        if len(line) > KERNEL_ARGS_LIMIT:
            raise ValueError(f"guest {self.name}: kernel arguments are {len(line)} bytes, the "
                             f"limit here is {KERNEL_ARGS_LIMIT} (x86 COMMAND_LINE_SIZE 2048 "
                             "minus run-vm.sh's own); use run() for long commands")
        return line

    def argv(self) -> list[str]:
        """The qemu/run-vm.sh invocation for this guest."""
        argv = [str(RUN_VM)]
        if self.socket is not None:
            argv += ["--socket", os.fspath(self.socket)]
        else:
            argv.append("--user-net")
        assert self.mac is not None
        argv += ["--mac", self.mac, "--mem", self.mem, "--smp", str(self.smp),
                 "--queues", str(self.queues), "--name", self.name,
                 "--append", self.kernel_args(), "--console", "stdio"]
        if self.device_opts:
            argv += ["--device-opts", self.device_opts]
        if self.accel:
            argv += ["--accel", self.accel]
        if self.extra_qemu_args:
            argv += ["--", *self.extra_qemu_args]
        return argv

    # --- lifetime ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        try:
            await self.start(nursery)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool:
        try:
            await self.stop()
        finally:
            try:
                handled = await self._nursery_manager.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                # The console reader never fails on its own: surface the caller's single
                # error as itself, so pytest.raises(GuestError) and friends work.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        return bool(handled)

    async def start(self, nursery: trio.Nursery) -> None:
        """Launch run-vm.sh (QEMU) and the console reader in `nursery`. Use `async with`."""
        if self.process is not None:
            raise GuestError(f"guest {self.name} already started")
        if not image_available():
            raise GuestError(f"no guest image in {BUILD_DIR}: call ensure_image() first")
        argv = self.argv()
        log.info("guest %s: %s", self.name, shlex.join(argv))
        assert self.log_dir is not None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.console_log.write_bytes(b"")
        with open(self.qemu_log, "wb") as qemu_log:
            qemu_log.write(f"# {shlex.join(argv)}\n".encode())
            qemu_log.flush()
            # Own session: the process group is exactly what this guest started.
            self.process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=qemu_log,
                start_new_session=True)
        self.started_at = trio.current_time()
        nursery.start_soon(self._read_console)

    async def stop(self) -> int | None:
        """SIGTERM the guest's process group, SIGKILL it after STOP_TIMEOUT; return exit code."""
        proc = self.process
        if proc is None:
            return None
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                self._signal_group(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    await proc.wait()
            if proc.returncode is None:
                self._signal_group(signal.SIGKILL)
                with trio.move_on_after(STOP_TIMEOUT):
                    await proc.wait()
            # Whatever QEMU left in its group (nothing, normally) goes too.
            self._signal_group(signal.SIGKILL)
            if proc.stdin is not None:
                with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    await proc.stdin.aclose()
        return proc.returncode

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)  # pgid == pid: start_new_session=True

    # --- console -----------------------------------------------------------------------

    async def _read_console(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        pending = b""
        with open(self.console_log, "ab", buffering=0) as console:
            try:
                while chunk := await self.process.stdout.receive_some(65536):
                    console.write(chunk)
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for raw in complete:
                        self._feed(raw.rstrip(b"\r").decode("utf-8", "replace"))
                    self._wake()
            finally:
                if pending:
                    self._feed(pending.rstrip(b"\r").decode("utf-8", "replace"))
                self._eof = True
                self._wake()

    def _feed(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith(_BOOT_FAILED):
            self._pending_failure = line[len(_BOOT_FAILED):].removeprefix("reason=")
        elif (fields := parse_booted(line)) is not None:
            self.boots.append(BootInfo(len(self.boots) + 1, fields, self._pending_failure,
                                       trio.current_time()))
            self._pending_failure = None

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last console lines and QEMU's stderr, for error messages."""
        console = "\n".join(self.lines[-lines:])
        try:
            qemu = self.qemu_log.read_text(errors="replace").strip()
        except OSError:
            qemu = ""
        qemu_tail = "\n".join(qemu.splitlines()[-10:])
        return (f"--- console tail ({self.console_log}) ---\n{console}\n"
                f"--- qemu log ({self.qemu_log}) ---\n{qemu_tail}")

    async def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ready() is true; GuestError on timeout or if QEMU's output ends."""
        with trio.move_on_after(timeout):
            while not ready():
                if self._eof:
                    rc = self.process.returncode if self.process else None
                    if self.process is not None and rc is None:
                        with trio.move_on_after(1):
                            rc = await self.process.wait()
                    raise GuestError(f"guest {self.name}: QEMU exited (rc={rc}) while waiting "
                                     f"for {what}\n{self.log_tail()}")
                await self._changed.wait()
            return
        raise GuestError(f"guest {self.name}: no {what} within {timeout} s\n{self.log_tail()}")

    async def expect(self, pattern: str, timeout: float = RUN_TIMEOUT,
                     since: int = 0) -> re.Match[str]:
        """Wait for a console line (index >= since) matching regex `pattern`; return the match."""
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []
        cursor = since

        def ready() -> bool:
            nonlocal cursor
            while cursor < len(self.lines):
                match = regex.search(self.lines[cursor])
                cursor += 1
                if match:
                    found.append(match)
                    return True
            return False

        await self._wait(ready, timeout, f"console line matching {pattern!r}")
        return found[0]

    async def send_line(self, line: str) -> None:
        """Write one raw line to the guest console (the command loop ignores non-VV lines)."""
        if self.process is None or self.process.stdin is None:
            raise GuestError(f"guest {self.name} is not running")
        try:
            await self.process.stdin.send_all(line.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise GuestError(f"guest {self.name}: console closed\n{self.log_tail()}") from exc

    # --- boots -------------------------------------------------------------------------

    async def wait_booted(self, timeout: float = BOOT_TIMEOUT,
                          allow_failure: bool = False) -> BootInfo:
        """Wait for the next expected VV-BOOTED (the first boot, or the boot after reboot())."""
        target = self._boot_target
        await self._wait(lambda: len(self.boots) >= target, timeout, f"VV-BOOTED #{target}")
        info = self.boots[target - 1]
        log.info("guest %s: boot #%d after %.2f s: %s", self.name, target,
                 info.host_time - self.started_at, info.fields)
        if info.failed and not allow_failure:
            raise GuestError(f"guest {self.name}: boot #{target} reported VV-BOOT-FAILED "
                             f"reason={info.failed}\n{self.log_tail()}")
        return info

    async def reboot(self, timeout: float = BOOT_TIMEOUT) -> BootInfo:
        """`reboot -f` in the guest; wait until it has booted again and return that boot."""
        if len(self.boots) < self._boot_target:
            raise GuestError(f"guest {self.name}: reboot() before wait_booted()")
        self._boot_target = len(self.boots) + 1
        await self._send_script(self._next_id(), "reboot -f")
        return await self.wait_booted(timeout)

    # --- commands ----------------------------------------------------------------------

    def _next_id(self) -> str:
        self._counter += 1
        return f"{self._counter}{self._token}"

    async def _send_script(self, cmd_id: str, script: str) -> None:
        for line in script_lines(cmd_id, script):
            await self.send_line(line)

    async def run(self, cmd: str, timeout: float = RUN_TIMEOUT,
                  check: bool = False) -> tuple[int, str]:
        """Run `cmd` with sh in the guest; return (exit code, stdout+stderr as \\n-joined lines).

        Commands run one at a time, with stdin from /dev/null. Background jobs must redirect
        their output (`iperf3 -s -D`, `cmd >/tmp/log 2>&1 &`): the console is shared.
        check=True raises GuestError on a non-zero exit code.
        """
        if len(self.boots) < self._boot_target:
            raise GuestError(f"guest {self.name}: run() before wait_booted()")
        async with self._run_lock:
            cmd_id = self._next_id()
            since = len(self.lines)
            await self._send_script(cmd_id, cmd)
            result: list[tuple[int, str]] = []
            begin, end = begin_marker(cmd_id), end_pattern(cmd_id)
            cursor = since

            def finished() -> bool:
                # Scan only what arrived since the last wake-up, then collect once.
                nonlocal cursor
                while cursor < len(self.lines):
                    if end.search(self.lines[cursor]) and (
                            found := collect_output(self.lines, cmd_id, since)) is not None:
                        result.append(found)
                        return True
                    cursor += 1
                return False

            await self._wait(finished, timeout, f"end of command {cmd!r} (id {cmd_id}, "
                                                f"{begin!r})")
        rc, text = result[0]
        if check and rc != 0:
            raise GuestError(f"guest {self.name}: {cmd!r} exited with rc={rc}:\n{text}")
        return rc, text

    async def check(self, cmd: str, timeout: float = RUN_TIMEOUT) -> str:
        """run(cmd, check=True) and return only the output."""
        return (await self.run(cmd, timeout, check=True))[1]

    async def start_iperf3_server(self, *, once: bool = True, timeout: float = 30) -> None:
        """`iperf3 -s -D` in the guest, returning once it listens on port 5201: -D forks
        before the listener binds, so a client started right away can be refused."""
        await self.check(f"iperf3 -s -D {'-1 ' if once else ''}>/dev/null 2>&1; "
                         "for i in $(seq 100); do"
                         " grep -qE ':1451 [0-9A-F]+:[0-9A-F]+ 0A' /proc/net/tcp /proc/net/tcp6"
                         " && exit 0; sleep 0.1; done; echo 'iperf3 is not listening'; exit 1",
                         timeout=timeout)

    async def wait_cmd(self, timeout: float = BOOT_TIMEOUT) -> tuple[int, str]:
        """For a guest started with cmd=: wait for VV-CMD-END; return (exit code, output)."""
        await self._wait(lambda: any(_CMD_END.match(line) for line in self.lines), timeout,
                         "VV-CMD-END")
        begin = self.lines.index("VV-CMD-BEGIN")
        end = next(i for i, line in enumerate(self.lines) if _CMD_END.match(line))
        match = _CMD_END.match(self.lines[end])
        assert match is not None
        return int(match.group(1)), "\n".join(self.lines[begin + 1:end])

    async def wait_exit(self, timeout: float = BOOT_TIMEOUT) -> int:
        """Wait for QEMU to exit on its own (guest powered off); return its exit code."""
        if self.process is None:
            raise GuestError(f"guest {self.name} was never started")
        with trio.move_on_after(timeout):
            return await self.process.wait()
        raise GuestError(f"guest {self.name}: QEMU still running after {timeout} s\n"
                         f"{self.log_tail()}")


async def wait_all_booted(guests: Sequence[Guest],
                          timeout: float = BOOT_TIMEOUT) -> list[BootInfo]:
    """wait_booted() on several guests at once; boot infos in the order of `guests`."""
    infos: list[BootInfo | None] = [None] * len(guests)

    async def one(index: int) -> None:
        infos[index] = await guests[index].wait_booted(timeout)

    async with trio.open_nursery() as nursery:
        for index in range(len(guests)):
            nursery.start_soon(one, index)
    return [info for info in infos if info is not None]


@contextlib.asynccontextmanager
async def dhcp_guests(log_dir: Path, **sockets: str) -> AsyncIterator[tuple[list[Guest],
                                                                           list[str]]]:
    """Guests named by the keywords, each on its vhost-user socket path, leasing its address
    by DHCP and staying up; yielded booted, with the IPv4 address each leased."""
    guests = [Guest(name, socket=Path(path), dhcp=True, stay=True, log_dir=log_dir)
              for name, path in sockets.items()]
    async with contextlib.AsyncExitStack() as stack:
        for guest in guests:
            await stack.enter_async_context(guest)
        addresses = []
        for guest, boot in zip(guests, await wait_all_booted(guests), strict=True):
            if boot.ip is None:
                raise GuestError(f"guest {guest.name} booted without a DHCP lease")
            addresses.append(boot.ip.split("/")[0])
        yield guests, addresses


async def iperf3_mbits(client: Guest, server: Guest, address: str, seconds: int = 1, *,
                       once: bool = True) -> float:
    """Mbit/s the receiver counted in a `seconds`-long iperf3 TCP stream from `client` to
    `server` (listening at `address`); TCP also proves the bytes crossed intact."""
    await server.start_iperf3_server(once=once)
    await trio.sleep(0.5)
    out = await client.check(f"iperf3 -c {address} -t {seconds} -f m", timeout=60)
    match = re.search(r"([\d.]+) Mbits/sec\s+receiver", out)
    if match is None:
        raise GuestError(f"no receiver summary in iperf3's output:\n{out}")
    return float(match.group(1))


async def send_file(sender: Guest, receiver: Guest, address: str, kib: int, *,
                    listen_seconds: int = 30, timeout: float = RUN_TIMEOUT) -> tuple[str, str]:
    """`kib` KiB of random bytes from `sender` to `receiver` (listening at `address`) over TCP
    with busybox nc; the sha256 of what was sent and of what arrived, for the test to compare.
    The listener keeps its stdin open for `listen_seconds` (it quits at stdin EOF)."""
    await receiver.check(f"sleep {listen_seconds} | nc -l -p 5000 > /tmp/got 2>/dev/null &")
    sent = await sender.check(f"dd if=/dev/urandom of=/tmp/f bs=1k count={kib} 2>/dev/null;"
                              " sha256sum /tmp/f | cut -c1-64")
    # Until the listener is up (a refused connect sends nothing), then until all has landed
    # (at most 10 s; a short file then fails the comparison).
    await sender.check(f"for i in $(seq 40); do nc {address} 5000 < /tmp/f && exit 0;"
                       " sleep 0.25; done; exit 1", timeout=timeout)
    received = await receiver.check(f"for i in $(seq 100); do [ $(wc -c < /tmp/got) = "
                                    f"{kib * 1024} ] && break; sleep 0.1; done;"
                                    " sha256sum /tmp/got | cut -c1-64", timeout=30)
    return sent.strip(), received.strip()
