"""Network namespaces for the host-mode tests and benchmarks: a hub namespace joined by one
veth pair to each host namespace (10.201.N.1 on the hub's side, 10.201.N.2 on host N's), all
removed on exit.  Names carry a random tag, so parallel runs never meet."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import trio


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@contextmanager
def hub_and_hosts(count: int) -> Iterator[dict[str, str]]:
    """{"hub": NS, "h1": NS, ..., "hN": NS}; host N reaches the hub at 10.201.N.1."""
    tag = uuid.uuid4().hex[:6]
    names = {"hub": f"vvhub{tag}", **{f"h{n}": f"vvh{n}{tag}" for n in range(1, count + 1)}}
    try:
        for name in names.values():
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        for n in range(1, count + 1):
            a, b = f"vva{n}{tag}", f"vvb{n}{tag}"
            ip("link", "add", a, "netns", names["hub"], "type", "veth", "peer", "name", b,
               "netns", names[f"h{n}"])
            ip("-n", names["hub"], "addr", "add", f"10.201.{n}.1/24", "dev", a)
            ip("-n", names[f"h{n}"], "addr", "add", f"10.201.{n}.2/24", "dev", b)
            ip("-n", names["hub"], "link", "set", a, "up")
            ip("-n", names[f"h{n}"], "link", "set", b, "up")
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


async def run_in(netns: str, *argv: str) -> str:
    """Run a command in a namespace; its stdout, or an AssertionError with what it said."""
    result = await trio.run_process(["ip", "netns", "exec", netns, *argv], capture_stdout=True,
                                    capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    return result.stdout.decode()


async def answers_ping(netns: str, address: str, wait: float = 1.0) -> bool:
    """One ICMP echo from `netns` to `address`: did it come back within `wait` seconds?"""
    result = await trio.run_process(
        ["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", str(wait), address],
        capture_stdout=True, capture_stderr=True, check=False)
    return result.returncode == 0
