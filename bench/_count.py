"""Per-process counters for bench/report.py: syscalls (perf counting the in-kernel
raw_syscalls:sys_enter tracepoint on a PID), CPython allocator calls (bench/_count_alloc.c,
loaded in the process under test through sitecustomize on PYTHONPATH) and libc malloc calls
of any dynamically linked process (bench/_count_malloc.c, LD_PRELOAD), both built here with
gcc.  All only count; the allocation hooks cost a call per allocation, so report.py reads
them in a window of their own, never in a timed one.  Nothing here signals a process it did
not start.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALLOC_SOURCE = HERE / "_count_alloc.c"
MALLOC_SOURCE = HERE / "_count_malloc.c"
MALLOC_LIBRARY = "libcount_malloc.so"
ALLOC_PREFIX_ENV = "VHOSTVPN_BENCH_ALLOC_PREFIX"  # counters of process PID in <prefix>.<PID>
MALLOC_PREFIX_ENV = "VHOSTVPN_BENCH_MALLOC_PREFIX"  # the same for libc malloc calls
COUNTER_SLOTS = 5  # raw allocs, mem allocs, object allocs, reallocs, frees (_count_alloc.c)
MALLOC_SLOTS = 3  # allocs, reallocs, frees (_count_malloc.c)
BUILD_TIMEOUT = 60.0
PERF_ATTACH_SECONDS = 0.3  # perf prints nothing when attached; this is how long it takes here
PERF_STOP_TIMEOUT = 10.0
PERF_INTERVAL_MS = 100

SITECUSTOMIZE = f"""\
# Written by bench/_count.py: count this process's allocator calls when {ALLOC_PREFIX_ENV} is set.
import os
if os.environ.get("{ALLOC_PREFIX_ENV}"):
    import _count_alloc
    _count_alloc.install(os.environ["{ALLOC_PREFIX_ENV}"] + "." + str(os.getpid()))
"""


# --------------------------------------------------------------------------- allocations


@dataclass(frozen=True)
class AllocCounts:
    """Allocator calls since install: mallocs+callocs per domain, reallocs, frees."""

    raw: int
    mem: int
    obj: int
    reallocs: int
    frees: int

    @property
    def allocations(self) -> int:
        """Every call that hands out a block: mallocs, callocs and reallocs, all domains."""
        return self.raw + self.mem + self.obj + self.reallocs

    def __sub__(self, other: AllocCounts) -> AllocCounts:
        return AllocCounts(self.raw - other.raw, self.mem - other.mem, self.obj - other.obj,
                           self.reallocs - other.reallocs, self.frees - other.frees)


@dataclass(frozen=True)
class MallocCounts:
    """libc calls since the process started: allocations (malloc, calloc, aligned), reallocs,
    frees."""

    allocs: int
    reallocs: int
    frees: int

    @property
    def allocations(self) -> int:
        return self.allocs + self.reallocs

    def __sub__(self, other: MallocCounts) -> MallocCounts:
        return MallocCounts(self.allocs - other.allocs, self.reallocs - other.reallocs,
                            self.frees - other.frees)


def _gcc(args: list[str], source: Path) -> None:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler (gcc/cc) to build the allocation counters")
    done = subprocess.run([gcc, "-shared", "-fPIC", "-O2", *args], capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building {source.name} failed:\n{done.stderr[-2000:]}")


def build_alloc_counter(directory: Path) -> Path:
    """Compile _count_alloc.c next to a sitecustomize.py, and _count_malloc.c, into
    `directory`; return `directory` (for counting_env).  RuntimeError if gcc fails."""
    directory.mkdir(parents=True, exist_ok=True)
    _gcc([f"-I{sysconfig.get_paths()['include']}", str(ALLOC_SOURCE), "-o",
          str(directory / f"_count_alloc{sysconfig.get_config_var('EXT_SUFFIX')}")],
         ALLOC_SOURCE)
    _gcc([str(MALLOC_SOURCE), "-o", str(directory / MALLOC_LIBRARY)], MALLOC_SOURCE)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return directory


def counting_env(site_dir: Path, prefix: Path, base: dict[str, str] | None = None
                 ) -> dict[str, str]:
    """The environment for a process whose allocations are to be counted: CPython allocator
    calls under `prefix`, libc malloc calls under `prefix`-malloc."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site_dir), env.get("PYTHONPATH"))
                                        if p)
    env["LD_PRELOAD"] = " ".join(p for p in (str(site_dir / MALLOC_LIBRARY),
                                             env.get("LD_PRELOAD")) if p)
    env[ALLOC_PREFIX_ENV] = str(prefix)
    env[MALLOC_PREFIX_ENV] = f"{prefix}-malloc"
    return env


def _read_slots(path: Path, slots: int) -> list[int] | None:
    try:
        raw = path.read_bytes()[:8 * slots]
    except OSError:
        return None
    if len(raw) < 8 * slots:
        return None
    return [int.from_bytes(raw[i:i + 8], sys.byteorder) for i in range(0, 8 * slots, 8)]


def read_alloc_counts(prefix: Path, pid: int) -> AllocCounts | None:
    """The CPython counters process `pid` keeps under `prefix`; None if it has none (not
    Python, not started with counting_env, or the counter did not load)."""
    values = _read_slots(prefix.parent / f"{prefix.name}.{pid}", COUNTER_SLOTS)
    return None if values is None else AllocCounts(*values)


def read_malloc_counts(prefix: Path, pid: int) -> MallocCounts | None:
    """The libc counters process `pid` keeps (counting_env's `prefix`); None if it has none."""
    values = _read_slots(prefix.parent / f"{prefix.name}-malloc.{pid}", MALLOC_SLOTS)
    return None if values is None else MallocCounts(*values)


# --------------------------------------------------------------------------- syscalls


def perf_unavailable_reason() -> str | None:
    """Why perf cannot count syscalls here, or None if it can."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: linux-perf)"
    done = subprocess.run(["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "--",
                           "true"], capture_output=True, text=True, timeout=30, check=False)
    if "raw_syscalls:sys_enter" not in done.stderr or "<not" in done.stderr:
        return f"perf cannot count raw_syscalls:sys_enter: {done.stderr.strip()[-300:]}"
    return None


class SyscallCounter:
    """perf stat -e raw_syscalls:sys_enter -p PID (all its threads), from start() to stop().

    The kernel counts the tracepoint; the process is not stopped (unlike strace).  perf prints
    a count every PERF_INTERVAL_MS with the time since it started counting, so stop() returns
    (syscalls, seconds counted) and a rate does not depend on how long perf took to attach.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-I", str(PERF_INTERVAL_MS), "-e",
             "raw_syscalls:sys_enter", "-p", str(self.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)

    def stop(self) -> tuple[int, float]:
        """SIGINT our perf; sum its interval lines (time, count, unit, event, ...).  An
        interval in which the process never ran prints "<not counted>": no syscalls."""
        if self.process is None:
            raise RuntimeError("SyscallCounter.stop() before start()")
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=PERF_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"perf on PID {self.pid} did not stop") from None
        syscalls, seconds, counted = 0, 0.0, False
        for line in err.splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) > 3 and fields[3].startswith("raw_syscalls:sys_enter"):
                seconds = float(fields[0])
                if fields[1].isdigit():
                    syscalls += int(fields[1])
                    counted = True
        if not counted:
            raise RuntimeError(f"perf counted nothing on PID {self.pid}: {err[-500:]}")
        return syscalls, seconds
