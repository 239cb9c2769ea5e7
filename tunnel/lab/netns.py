"""The lab's network plumbing, through iproute2: a namespace per member, each joined to the
hub by a veth pair on its own /24 (10.199.N.0/24: the hub's end .1, the member's .2), over
which the member's endpoint reaches the hub's tunnel.

Where the hub's ends go is the plan (`plan`): a lab without NAT has a namespace of its own for
the hub; a NAT lab's hub runs in the caller's namespace (its NAT reaches what the machine
reaches, its forwards listen on the machine), so the hub's ends and their /24s are there, and
`check_free` refuses a lab whose /24s the caller's namespace already uses.  Deleting a
member's namespace deletes its veth pair, though asynchronously; `down` deletes a NAT lab's
hub ends first (`delete_links`, synchronous), then the namespaces (`delete`).
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from dataclasses import dataclass

from tunnel.lab import LabError

# Every lab's veth networks lie in it (10.199.N.0/24, N = member number from 1); a NAT lab's
# hub gets `--nat-deny` for all of it, so guests never reach a lab's tunnel port through it.
VETH_NETWORKS = ipaddress.IPv4Network("10.199.0.0/16")
# A `direct = true` lab's LAN: member N's endpoint listens on 10.198.0.N (a veth into a bridge
# in the lab's namespace vvlab-<tag>-lan), so members reach each other without the hub.
DIRECT_NETWORK = ipaddress.IPv4Network("10.198.0.0/16")
DIRECT_PORT = 7100


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


def veth_network(index: int) -> ipaddress.IPv4Network:
    """The /24 of member number `index`'s veth pair."""
    return ipaddress.IPv4Network(f"10.199.{index}.0/24")


@dataclass(frozen=True)
class Veth:
    """Member `member`'s veth pair: `hub_end` (hub_side(index)/24) where the hub runs,
    `member_end` (10.199.index.2/24) in the member's namespace `netns`."""

    member: str
    index: int
    hub_end: str
    member_end: str
    netns: str


@dataclass(frozen=True)
class Plan:
    """The lab's plumbing: `hub_netns` is the hub's own namespace, or None for the caller's
    (a NAT lab); one Veth per member, in the lab file's member order."""

    hub_netns: str | None
    veths: tuple[Veth, ...]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace the plan creates, the hub's first."""
        return [*([self.hub_netns] if self.hub_netns else []), *(v.netns for v in self.veths)]

    @property
    def networks(self) -> list[ipaddress.IPv4Network]:
        """The veth /24s, in the hub's namespace (the caller's for a NAT lab)."""
        return [veth_network(v.index) for v in self.veths]


def plan(tag: str, members: list[str], nat: bool) -> Plan:
    """The plumbing of lab `tag` with `members` (names, in order): the hub in
    vvlab-<tag>-hub, or in the caller's namespace when `nat`; member N's namespace
    vvlab-<tag>-<name>, its veth pair vh<tag>NN (hub's end) and vm<tag>NN (member's)."""
    if len(members) > 254:
        raise LabError(f"{len(members)} members: at most 254 (one 10.199.N.0/24 each)")
    return Plan(None if nat else f"vvlab-{tag}-hub",
                tuple(Veth(name, index, f"vh{tag}{index:02d}", f"vm{tag}{index:02d}",
                           f"vvlab-{tag}-{name}")
                      for index, name in enumerate(members, start=1)))


def join_commands(plan: Plan, veth: Veth) -> list[list[str]]:
    """The `ip` argument lists that make `veth` and put its addresses up: the hub's end in
    plan.hub_netns (the caller's namespace when None), the member's in veth.netns."""
    hub = ["-n", plan.hub_netns] if plan.hub_netns else []
    to_hub = ["netns", plan.hub_netns] if plan.hub_netns else []
    return [["link", "add", veth.hub_end, *to_hub, "type", "veth",
             "peer", "name", veth.member_end, "netns", veth.netns],
            [*hub, "addr", "add", f"{hub_side(veth.index)}/24", "dev", veth.hub_end],
            ["-n", veth.netns, "addr", "add", f"10.199.{veth.index}.2/24", "dev",
             veth.member_end],
            [*hub, "link", "set", veth.hub_end, "up"],
            ["-n", veth.netns, "link", "set", veth.member_end, "up"]]


def lan_netns(tag: str) -> str:
    """The namespace of lab `tag`'s LAN bridge (a `direct = true` lab's)."""
    return f"vvlab-{tag}-lan"


def direct_address(index: int) -> str:
    """Member number `index`'s address on the lab's LAN, where its endpoint listens."""
    return str(DIRECT_NETWORK[index])


def lan_commands(tag: str, veth: Veth) -> list[list[str]]:
    """The `ip` argument lists that join `veth`'s member to the LAN bridge of lab `tag`
    (made by `make_lan`): a veth pair vd<tag>NN (the member's, direct_address(index)/16)
    and vb<tag>NN (the bridge's port)."""
    lan, member_end = lan_netns(tag), f"vd{tag}{veth.index:02d}"
    bridge_end = f"vb{tag}{veth.index:02d}"
    return [["link", "add", member_end, "netns", veth.netns, "type", "veth",
             "peer", "name", bridge_end, "netns", lan],
            ["-n", lan, "link", "set", bridge_end, "master", "br0", "up"],
            ["-n", veth.netns, "addr", "add",
             f"{direct_address(veth.index)}/{DIRECT_NETWORK.prefixlen}", "dev", member_end],
            ["-n", veth.netns, "link", "set", member_end, "up"]]


def make_lan(tag: str) -> None:
    """The LAN's namespace (exists, made by `add`) gets its bridge br0, up."""
    lan = lan_netns(tag)
    ip("-n", lan, "link", "add", "br0", "type", "bridge")
    ip("-n", lan, "link", "set", "br0", "up")


def join_lan(tag: str, veth: Veth) -> None:
    for args in lan_commands(tag, veth):
        ip(*args)


def add(netns: str) -> None:
    """Create the namespace `netns` with its loopback up."""
    ip("netns", "add", netns)
    ip("-n", netns, "link", "set", "lo", "up")


def join(plan: Plan, veth: Veth) -> None:
    """Make `veth` as `join_commands` says (both namespaces exist)."""
    for args in join_commands(plan, veth):
        ip(*args)


def networks_in_use() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of the caller's namespace: those of its addresses and those its
    routes (any table) lead to, the default routes left out."""
    found = []
    addresses = ip("-o", "-4", "addr", "show", check=False).stdout
    for words in (line.split() for line in addresses.splitlines()):
        if "inet" in words:
            found.append(ipaddress.IPv4Interface(words[words.index("inet") + 1]).network)
    routes = ip("-4", "route", "show", "table", "all", check=False).stdout
    for words in (line.split() for line in routes.splitlines()):
        if not words:
            continue
        destination = words[1] if words[0] in ("local", "broadcast", "unicast", "blackhole",
                                               "unreachable", "prohibit", "throw",
                                               "multicast", "anycast", "nat") else words[0]
        if re.fullmatch(r"[0-9.]+(/[0-9]+)?", destination):
            network = ipaddress.IPv4Network(destination, strict=False)
            if network.prefixlen > 0:
                found.append(network)
    return found


def check_free(plan: Plan, in_use: list[ipaddress.IPv4Network]) -> None:
    """LabError (one line) if a NAT lab's veth /24s overlap a network `in_use` in the
    caller's namespace (another NAT lab, the machine's own network): adding them would
    take part of it away from the machine's routing.  A lab with its own hub namespace
    has nothing to check."""
    if plan.hub_netns is not None:
        return
    for veth in plan.veths:
        network = veth_network(veth.index)
        clash = next((used for used in in_use if used.overlaps(network)), None)
        if clash is not None:
            raise LabError(f"nat = true: the hub runs in this namespace and {veth.member}'s "
                           f"veth needs {network}, but {clash} is in use here already "
                           "(another NAT lab, or this machine's own network)")


def delete(namespaces: list[str]) -> None:
    """Delete those of `namespaces` that exist (with their veth ends); never raises for one
    that is gone."""
    existing = netns_list()
    for netns in namespaces:
        if netns in existing:
            ip("netns", "del", netns, check=False)


def lab_links(tag: str) -> list[str]:
    """The hub ends of lab `tag`'s veths (vh<tag>NN) in the caller's namespace."""
    pattern = re.compile(rf"vh{re.escape(tag)}[0-9]{{2,3}}")
    names = []
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        words = line.split()
        name = words[1].rstrip(":").split("@")[0] if len(words) > 1 else ""
        if pattern.fullmatch(name):
            names.append(name)
    return names


def delete_links(tag: str) -> None:
    """Delete the hub ends of lab `tag`'s veths in the caller's namespace (a NAT lab's), and
    so their pairs, at once: a deleted namespace's veths go only when the kernel's cleanup
    gets to it.  Never raises."""
    for name in lab_links(tag):
        ip("link", "del", name, check=False)
