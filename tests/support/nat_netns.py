"""Network namespaces for the NAT shell's tests: the hub's host and "the outside" joined by a
veth pair (10.203.N.1 / 10.203.N.2, fdcb:N::1 / fdcb:N::2), and `inside(netns)`, which moves
the calling thread into a namespace for the sockets it opens there (setns(2)), and back."""

from __future__ import annotations

import ctypes
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
# What an unprivileged-ping test writes to net.ipv4.ping_group_range: every group.
ALL_GROUPS = "0 2147483647"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """The calling thread in `netns` (sockets opened now stay there), then back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


@contextmanager
def hub_and_outside(ping_groups: str | None = ALL_GROUPS, n: int = 7) -> Iterator[dict[str, str]]:
    """{"hub": NS, "outside": NS}; the outside is 10.203.n.2 and fdcb:n::2 from the hub.
    `ping_groups`: the hub namespace's net.ipv4.ping_group_range (None: the default)."""
    tag = uuid.uuid4().hex[:6]
    names = {"hub": f"natshell{tag}h", "outside": f"natshell{tag}o"}
    try:
        for name in names.values():
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        a, b = f"natshell{tag}a", f"natshell{tag}b"
        ip("link", "add", a, "netns", names["hub"], "type", "veth", "peer", "name", b,
           "netns", names["outside"])
        for name, dev, host in ((names["hub"], a, 1), (names["outside"], b, 2)):
            ip("-n", name, "addr", "add", f"10.203.{n}.{host}/24", "dev", dev)
            ip("-n", name, "addr", "add", f"fdcb:{n}::{host}/64", "dev", dev, "nodad")
            ip("-n", name, "link", "set", dev, "up")
        if ping_groups is not None:
            subprocess.run(["ip", "netns", "exec", names["hub"], "sysctl", "-qw",
                            f"net.ipv4.ping_group_range={ping_groups}"], check=True,
                           capture_output=True)
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
