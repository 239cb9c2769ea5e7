"""`lab run`: a command in one member of a running lab: on a guest through its serial console
(console.py: output and exit code come back over it), on a host in its network namespace.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from tunnel.lab import LabError
from tunnel.lab.console import ConsoleError, UnixConsole
from tunnel.lab.state import load_state


def run(path: Path, name: str, argv: list[str], timeout: float = 60.0) -> int:
    """Run argv in a member of the lab of `path` (guest: its console; host: its namespace);
    print its output and return its exit code."""
    if not argv:
        raise LabError("give a command after --")
    state = load_state(path)
    member = state.member(name)
    if member.kind != "guest":
        try:
            return subprocess.run(["ip", "netns", "exec", member.netns, *argv],
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise LabError(f"{name}: {shlex.join(argv)} did not finish within {timeout} s") \
                from None
    script = argv[0] if len(argv) == 1 else shlex.join(argv)
    try:
        with UnixConsole(member.console, timeout=10,
                         log=Path(member.log).with_suffix(".console.log")) as console:
            rc, output = console.run(script, timeout=timeout)
    except ConsoleError as exc:
        raise LabError(f"{name}: {exc}") from None
    if output:
        print(output, flush=True)
    return rc

