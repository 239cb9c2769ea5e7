"""The lab's processes: each spawned in its own session (it outlives `lab up`), recorded with
its start time (a PID reused by someone else is never signalled), and stopped by its group:
SIGTERM, then SIGKILL after STOP_TIMEOUT.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tunnel.lab import LabError

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


@dataclass
class Proc:
    pid: int
    start: int  # /proc/PID/stat starttime: a PID reused by someone else is never signalled
    argv: list[str]


def _starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(proc: Proc) -> bool:
    """True while the recorded process (same PID and start time) exists and is not a zombie."""
    if _starttime(proc.pid) != proc.start:
        return False
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(proc: Proc, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process's group (it leads its own session), SIGKILL after `timeout`."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if not alive(proc):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signum)
        deadline = time.monotonic() + timeout
        while alive(proc) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(proc.pid, os.WNOHANG)  # our child if `up` is tearing down
            time.sleep(0.05)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Start `argv` in its own session, stdin from /dev/null, its output appended to `log`
    after a line naming the command."""
    with open(log, "ab") as out:
        out.write(f"# {shlex.join(argv)}\n".encode())
        out.flush()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
    start = _starttime(popen.pid)
    # The Popen object is dropped on purpose: the process outlives this one. Keep Python from
    # warning about it.
    popen.returncode = 0
    return Proc(popen.pid, start or 0, argv)


def wait_paths(proc: Proc, paths: list[str], log: str, timeout: float = START_TIMEOUT) -> None:
    """Wait until every one of `paths` exists (the sockets `proc` makes once it is ready);
    LabError with the tail of its log if it exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if not alive(proc):
            raise LabError(f"exited early (pid {proc.pid}):\n{tail(log)}")
        if time.monotonic() > deadline:
            raise LabError(f"no {', '.join(paths)} within {timeout} s:\n{tail(log)}")
        time.sleep(0.05)


def tail(path: str, lines: int = 20) -> str:
    """The last `lines` lines of a member's log, for an error message."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

