"""The lab's network plumbing, through iproute2: a namespace per member and one for the hub,
each member's joined to the hub's by a veth pair on its own /24 (10.199.N.0/24: the hub's
end .1, the member's .2), over which the member's endpoint reaches the hub's tunnel.

Deleting a namespace deletes its veth ends, so `delete` is all `down` needs.
"""

from __future__ import annotations

import subprocess

from tunnel.lab import LabError


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS`, its output captured; LabError with its stderr if it fails and `check`."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_list() -> set[str]:
    """The names of the network namespaces that exist (`ip netns list`)."""
    out = ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def hub_side(index: int) -> str:
    """The hub's address on the veth of member number `index` (from 1)."""
    return f"10.199.{index}.1"


def add(netns: str) -> None:
    """Create the namespace `netns` with its loopback up."""
    ip("netns", "add", netns)
    ip("-n", netns, "link", "set", "lo", "up")


def join(hub_netns: str, hub_end: str, netns: str, member_end: str, index: int) -> None:
    """A veth pair from `hub_netns` (end `hub_end`, hub_side(index)/24) to `netns` (end
    `member_end`, 10.199.index.2/24), both ends up."""
    ip("link", "add", hub_end, "netns", hub_netns, "type", "veth",
       "peer", "name", member_end, "netns", netns)
    ip("-n", hub_netns, "addr", "add", f"{hub_side(index)}/24", "dev", hub_end)
    ip("-n", netns, "addr", "add", f"10.199.{index}.2/24", "dev", member_end)
    ip("-n", hub_netns, "link", "set", hub_end, "up")
    ip("-n", netns, "link", "set", member_end, "up")


def delete(namespaces: list[str]) -> None:
    """Delete those of `namespaces` that exist (with their veth ends); never raises for one
    that is gone."""
    existing = netns_list()
    for netns in namespaces:
        if netns in existing:
            ip("netns", "del", netns, check=False)
