"""`vhostvpn hub --nat` as a process, for real: a host joins the hub through the tunnel with a
TUN (its address by DHCP, which names the gateway as router) or a TAP device (static address,
its default route via the gateway), each in a namespace of its own; its kernel's UDP and TCP
reach servers in a second namespace, "the outside", through the hub's NAT, and `vhostvpn
status --json` shows that guest's flows under "nat"."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from tests.support.hub import TunnelKeys, VhostvpnProcess
from tests.support.nat_netns import hub_and_outside, inside, ip
from tests.support.nat_shell import needs_netns
from tests.support.netns import run_in
from tunnel.nat import NatShell

pytestmark = [pytest.mark.slow, needs_netns,
              pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs a TUN")]

N = 9  # the outside is 10.203.9.2 (tests/support/nat_netns.py)
OUTSIDE = f"10.203.{N}.2"
HUB_SIDE, MEMBER_SIDE = "10.204.9.1", "10.204.9.2"
TCP_PORT, UDP_PORT = 8080, 7


@contextmanager
def member_namespace(hub_netns: str) -> Iterator[str]:
    """A namespace for the host, joined to the hub's by a veth (HUB_SIDE / MEMBER_SIDE)."""
    tag = uuid.uuid4().hex[:6]
    name, a, b = f"natwire{tag}m", f"natwire{tag}a", f"natwire{tag}b"
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        ip("link", "add", a, "netns", hub_netns, "type", "veth", "peer", "name", b, "netns", name)
        ip("-n", hub_netns, "addr", "add", f"{HUB_SIDE}/24", "dev", a)
        ip("-n", name, "addr", "add", f"{MEMBER_SIDE}/24", "dev", b)
        ip("-n", hub_netns, "link", "set", a, "up")
        ip("-n", name, "link", "set", b, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


async def serve_tcp(listener: trio.socket.SocketType, held: trio.Event) -> None:
    """Answer one connection's line with "echo " + it, then keep it open until `held`."""
    conn, _ = await listener.accept()
    with conn:
        data = await conn.recv(100)
        await conn.send(b"echo " + data)
        await held.wait()


async def serve_udp(sock: trio.socket.SocketType) -> None:
    while True:
        data, address = await sock.recvfrom(2048)
        await sock.sendto(b"echo " + data, address)


async def hub_status_json(control: str) -> dict:
    result = await trio.run_process([sys.executable, "-m", "tunnel.cli", "status", "--control",
                                     control, "--json"], capture_stdout=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("mode", ["tun", "tap"])
async def test_a_host_behind_the_hubs_nat_reaches_udp_and_tcp_servers_outside(tmp_path, mode):
    with hub_and_outside(n=N) as names, member_namespace(names["hub"]) as member:
        keys = TunnelKeys(tmp_path, ["h1"])
        hub = VhostvpnProcess(tmp_path, "hub", [], keys.hub_args(
            "--subnet", "10.77.0.0/24", "--nat", "--dns-upstream", OUTSIDE,
            "--state-dir", str(tmp_path / "state"), listen=HUB_SIDE), "hub",
            prefix=["ip", "netns", "exec", names["hub"]])
        device = ["--tun", "vv0", "--dhcp"] if mode == "tun" else [
            "--tap", "vv0", "--address", "10.77.0.20/24"]
        host = VhostvpnProcess(tmp_path, "host", [], keys.vm_args(
            "h1", *device, "--name", "h1", hub=HUB_SIDE), "h1",
            prefix=["ip", "netns", "exec", member])
        with inside(names["outside"]):
            listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await listener.bind((OUTSIDE, TCP_PORT))
        listener.listen()
        await udp.bind((OUTSIDE, UDP_PORT))
        await hub.start()
        try:
            await host.start()
            await host.session_up()
            with trio.fail_after(30):
                while "inet 10.77.0." not in await run_in(member, "ip", "-4", "addr", "show",
                                                          "vv0"):
                    await trio.sleep(0.2)
            if mode == "tun":  # the TUN host routes what the kernel gives it to the router
                await run_in(member, "ip", "route", "add", f"10.203.{N}.0/24", "dev", "vv0")
            else:
                await run_in(member, "ip", "route", "add", "default", "via", "10.77.0.1")
            held = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_tcp, listener, held)
                nursery.start_soon(serve_udp, udp)
                with inside(member):
                    client_udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    client_tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                with client_udp, client_tcp, trio.fail_after(20):
                    await client_udp.connect((OUTSIDE, UDP_PORT))
                    while True:  # the first datagram may wait for ARP on the way
                        await client_udp.send(b"ping")
                        with trio.move_on_after(1):
                            assert await client_udp.recv(100) == b"echo ping"
                            break
                    await client_tcp.connect((OUTSIDE, TCP_PORT))
                    await client_tcp.send(b"hello")
                    assert await client_tcp.recv(100) == b"echo hello"
                    state = await hub_status_json(hub.control)
                    held.set()
                nursery.cancel_scope.cancel()
        finally:
            await host.stop()
            await hub.stop()
            listener.close()
            udp.close()
    nat = state["nat"]
    assert list(nat["ports"]) == ["h1"]  # the host's session: a guest is its port
    assert nat["ports"]["h1"]["flows"] == {"tcp": 1, "udp": 1}
    assert nat["tcp"]["states"] == {"ESTABLISHED": 1} and nat["udp"]["flows"] == 1
    session = next(p for p in state["ports"] if p.get("kind") == "session")
    assert session["in_frames"] > 0 and session["out_frames"] > 0


@pytest.mark.parametrize("nat", [False, True])
async def test_a_tap_host_keeps_its_own_default_route_unless_the_hub_routes(tmp_path, nat):
    """The host's kernel takes the hub's router advertisements (SLAAC on vv0 either way); only
    with --nat do they make the gateway a default router, next to the host's own."""
    with hub_and_outside(n=N) as names, member_namespace(names["hub"]) as member:
        veth = next(line.split(":")[1].strip().split("@")[0] for line in (await run_in(
            member, "ip", "-o", "link")).splitlines() if "natwire" in line)
        await run_in(member, "ip", "-6", "addr", "add", "fdcc:9::2/64", "dev", veth, "nodad")
        await run_in(member, "ip", "-6", "route", "add", "default", "via", "fdcc:9::1",
                     "dev", veth)
        keys = TunnelKeys(tmp_path, ["h1"])
        hub = VhostvpnProcess(tmp_path, "hub", [], keys.hub_args(
            "--subnet", "10.77.0.0/24", "--ipv6-prefix", "fd77::/64", *(["--nat"] if nat else []),
            "--state-dir", str(tmp_path / "state"), listen=HUB_SIDE), "hub",
            prefix=["ip", "netns", "exec", names["hub"]])
        host = VhostvpnProcess(tmp_path, "host", [], keys.vm_args(
            "h1", "--tap", "vv0", "--address", "10.77.0.20/24", "--name", "h1", hub=HUB_SIDE),
            "h1", prefix=["ip", "netns", "exec", member])
        await hub.start()
        try:
            await host.start()
            await host.session_up()
            with trio.fail_after(30):
                while "inet6 fd77::" not in await run_in(member, "ip", "-6", "addr", "show",
                                                         "vv0", "scope", "global"):
                    await trio.sleep(0.3)
                routes = await run_in(member, "ip", "-6", "route", "show", "default")
                while nat and "dev vv0" not in routes:
                    await trio.sleep(0.3)
                    routes = await run_in(member, "ip", "-6", "route", "show", "default")
        finally:
            await host.stop()
            await hub.stop()
    assert f"default via fdcc:9::1 dev {veth}" in routes
    assert ("dev vv0" in routes) is nat, routes


needs_forwards = pytest.mark.skipif(
    "forwards" not in inspect.signature(NatShell).parameters,
    reason="needs the NAT shell's port forwards (branch wip-fwd)")


@needs_forwards
async def test_a_forward_on_the_hub_reaches_a_tap_hosts_server_through_resolve(tmp_path):
    """`--forward tcp:2222:10.77.0.20:8080`: a client in the hub's namespace connects to
    127.0.0.1:2222 and talks to the TAP host's server; the gateway found the host's MAC by
    asking (ARP), and the host saw the connection come from the gateway."""
    with hub_and_outside(n=N) as names, member_namespace(names["hub"]) as member:
        keys = TunnelKeys(tmp_path, ["h1"])
        hub = VhostvpnProcess(tmp_path, "hub", [], keys.hub_args(
            "--subnet", "10.77.0.0/24", "--nat", "--dns-upstream", OUTSIDE,
            "--forward", "tcp:127.0.0.1:2222:10.77.0.20:8080",
            "--state-dir", str(tmp_path / "state"), listen=HUB_SIDE), "hub",
            prefix=["ip", "netns", "exec", names["hub"]])
        host = VhostvpnProcess(tmp_path, "host", [], keys.vm_args(
            "h1", "--tap", "vv0", "--address", "10.77.0.20/24", "--name", "h1", hub=HUB_SIDE),
            "h1", prefix=["ip", "netns", "exec", member])
        with inside(member):
            listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await hub.start()
        try:
            await host.start()
            await host.session_up()
            await listener.bind(("10.77.0.20", 8080))  # the address is on vv0 by now
            listener.listen()
            async with trio.open_nursery() as nursery:
                peers = []

                async def serve() -> None:
                    conn, peer = await listener.accept()
                    peers.append(peer[0])
                    with conn:
                        await conn.send(b"echo " + await conn.recv(100))

                nursery.start_soon(serve)
                with inside(names["hub"]):
                    client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                with client, trio.fail_after(20):
                    await client.connect(("127.0.0.1", 2222))
                    await client.send(b"through")
                    assert await client.recv(100) == b"echo through"
            state = await hub_status_json(hub.control)
        finally:
            await host.stop()
            await hub.stop()
            listener.close()
    assert peers == ["10.77.0.1"]  # the gateway's address
    (forward,) = state["nat"]["forwards"]
    assert forward["forward"] == "tcp:127.0.0.1:2222:10.77.0.20:8080" and forward["listening"]
    gateway = next(p for p in state["ports"] if p["name"] == "gateway")
    assert gateway["neighbours"] >= 1
