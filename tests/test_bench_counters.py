"""The counters behind bench/report.py's syscalls and allocations per packet count what
they claim: a known number of os.write calls, of object allocations and of libc mallocs,
read from outside the process as the report reads them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import _count

WRITES = 2000
OBJECTS = 5000
MALLOCS = 3000
# Reading stdin, writing the "done" line, Python's own bookkeeping between the two markers.
SYSCALL_SLACK = 50
# The list holding the objects and the interpreter's own blocks between the two markers.
ALLOC_SLACK = 50

CHILD = """\
import ctypes, itertools, os, sys
count = int(sys.argv[1])
fd = os.open(os.devnull, os.O_WRONLY)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
malloc, free = libc.malloc, libc.free
free(malloc(16))
sys.stdin.readline()
if sys.argv[2] == "write":
    for _ in itertools.repeat(None, count):
        os.write(fd, b"x")
elif sys.argv[2] == "malloc":
    for _ in itertools.repeat(None, count):
        free(malloc(16))
else:
    keep = [object() for _ in itertools.repeat(None, count)]
print("done", flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return _count.build_alloc_counter(tmp_path_factory.mktemp("metrics-count"))
    except RuntimeError as error:
        pytest.skip(f"cannot build the allocation counter: {error}")


def start_child(work: str, count: int, env: dict[str, str] | None = None
                ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(count), work],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def step(child: subprocess.Popen[str]) -> str:
    """Let the child run its next part; return the line it printed (if any)."""
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("\n")
    child.stdin.flush()
    return child.stdout.readline().strip() if child.poll() is None else ""


def test_allocation_counter_counts_each_object_allocation_in_process(site_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c",
         "import itertools, _count_alloc\n"
         "_count_alloc.install()\n"
         "before = _count_alloc.counts()\n"
         f"keep = [object() for _ in itertools.repeat(None, {OBJECTS})]\n"
         "after = _count_alloc.counts()\n"
         "print(after[2] - before[2])\n"],
        capture_output=True, text=True, timeout=30, check=True,
        env=_count.counting_env(site_dir, site_dir / "unused", {"PYTHONPATH": ""})
        | {_count.ALLOC_PREFIX_ENV: ""})
    assert OBJECTS <= int(done.stdout) <= OBJECTS + ALLOC_SLACK


def test_allocation_counter_is_read_from_outside_the_process(site_dir: Path,
                                                             tmp_path: Path) -> None:
    prefix = tmp_path / "metrics-alloc"
    child = start_child("alloc", OBJECTS, _count.counting_env(site_dir, prefix))
    try:
        time.sleep(0.2)  # the child is past its imports, blocked on stdin
        before = _count.read_alloc_counts(prefix, child.pid)
        assert before is not None, "the child did not load the counter via sitecustomize"
        assert step(child) == "done"
        after = _count.read_alloc_counts(prefix, child.pid)
        assert after is not None
        delta = after - before
        assert OBJECTS <= delta.obj <= OBJECTS + ALLOC_SLACK
        assert delta.allocations >= delta.obj
    finally:
        step(child)
        child.wait(10)


def test_malloc_counter_counts_each_libc_malloc_from_outside_the_process(
        site_dir: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "metrics-alloc"
    child = start_child("malloc", MALLOCS, _count.counting_env(site_dir, prefix))
    try:
        time.sleep(0.3)
        before = _count.read_malloc_counts(prefix, child.pid)
        assert before is not None, "the child did not load the LD_PRELOAD counter"
        assert step(child) == "done"
        after = _count.read_malloc_counts(prefix, child.pid)
        assert after is not None
        delta = after - before
        assert MALLOCS <= delta.allocations <= MALLOCS + ALLOC_SLACK
        assert MALLOCS <= delta.frees <= MALLOCS + ALLOC_SLACK
    finally:
        step(child)
        child.wait(10)


def test_allocation_counts_are_absent_for_a_process_started_without_the_counter(
        tmp_path: Path) -> None:
    assert _count.read_alloc_counts(tmp_path / "metrics-alloc", 1) is None
    assert _count.read_malloc_counts(tmp_path / "metrics-alloc", 1) is None


def test_syscall_counter_counts_each_os_write_of_another_process() -> None:
    reason = _count.perf_unavailable_reason()
    if reason:
        pytest.skip(reason)
    child = start_child("write", WRITES)
    try:
        time.sleep(0.2)
        counter = _count.SyscallCounter(child.pid)
        counter.start()
        time.sleep(_count.PERF_ATTACH_SECONDS)
        assert step(child) == "done"
        syscalls, seconds = counter.stop()
    finally:
        step(child)
        child.wait(10)
    assert WRITES <= syscalls <= WRITES + SYSCALL_SLACK
    assert seconds > 0


def test_report_takes_medians_over_rounds_and_ratios_to_the_paths_first_reference() -> None:
    from bench import report

    rows = [report.Metrics(path="p", subject="ref", reference=True, round=r, pps=p, mbits=p,
                           syscalls_per_packet={"x": p}) for r, p in enumerate((1.0, 3.0, 2.0))]
    rows += [report.Metrics(path="p", subject="us", reference=False, round=r, mbits=m,
                            allocations_per_packet={"hub: py": m})
             for r, m in enumerate((0.5, 1.5, 1.0))]
    summary = report.summarize(rows)
    assert [(s.subject, s.mbits, s.syscalls_per_packet, s.allocations_per_packet)
            for s in summary] == [("ref", 2.0, {"x": 2.0}, {}), ("us", 1.0, {}, {"hub: py": 1.0})]
    line = report.markdown(summary).splitlines()[-1]
    assert line.split("|")[6].strip() == "0.500"  # Mbit/s vs ref.: 1.0 / 2.0
