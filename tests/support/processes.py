"""Small helpers for tests that run `vhostvpn` (or a daemon it needs) as a plain subprocess:
stop one the test started, ask whether something answers on a unix socket path."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

STOP_SECONDS = 10.0


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after STOP_SECONDS: only this process, which the test started;
    its stderr pipe, if it has one, is closed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


def answers(path: str | Path) -> bool:
    """Does a process accept connections on the unix socket at `path`?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
