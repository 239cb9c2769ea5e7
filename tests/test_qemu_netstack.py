"""Real QEMU guests on a hub with gateway services: DHCP lease with router (--nat) and MTU,
SLAAC from router advertisements, the same address after a hub restart; without --nat no
default route at all; forged MACs, forged IPs and a rogue DHCP server reach no one; a guest
without offloads talks to one with all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from tests.support.guest import Guest, iperf3_mbits, qemu_available, send_file, wait_all_booted
from tests.support.hub import hub_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
    pytest.mark.usefixtures("guest_image"),
]

NO_OFFLOADS = "csum=off,guest_csum=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off"


def hub_args(tmp_path: Path) -> list[str]:
    return ["--subnet", "10.77.0.0/24", "--ipv6-prefix", "fd77::/64", "--mtu", "1400",
            "--dns", "10.77.0.53", "--state-dir", str(tmp_path / "state")]


def guest(name: str, hub, tmp_path: Path, **kw) -> Guest:
    kw.setdefault("dhcp", True)
    return Guest(name, socket=Path(hub.socket(f"{name}.sock")), stay=True, log_dir=tmp_path,
                 **kw)


async def wait_for(g: Guest, cmd: str, pattern: str, timeout: float = 20) -> str:
    """Run `cmd` until its output matches `pattern` (addresses appear asynchronously)."""
    with trio.fail_after(timeout):
        while True:
            _rc, out = await g.run(cmd)
            if re.search(pattern, out):
                return out
            await trio.sleep(0.5)


async def test_dhcp_lease_route_mtu_slaac_and_the_same_address_after_a_hub_restart(tmp_path):
    async with hub_process(tmp_path, ["ga.sock"], [*hub_args(tmp_path), "--nat"]) as hub:
        async with guest("ga", hub, tmp_path) as ga:
            boot = await ga.wait_booted()
            assert boot.ip is not None and boot.ip.startswith("10.77.0.")
            leased = boot.ip.split("/")[0]
            assert boot.fields["mtu"] == "1400"
            routes = await ga.check("ip route")
            assert "default via 10.77.0.1" in routes
            assert "10.77.0.53" in await ga.check("cat /etc/resolv.conf")
            await ga.check("ping -c 2 -W 2 10.77.0.1")
            await wait_for(ga, "ip -6 addr show dev eth0 scope global", r"inet6 fd77::")
            await wait_for(ga, "ip -6 route show default", r"default via fe80::")
            await ga.check("ping -6 -c 2 -W 2 fd77::1")
            gateway = next(p for p in (await hub.status())["ports"] if p["name"] == "gateway")
            assert gateway["dhcp"]["ack"] >= 1
            assert gateway["services"]["icmp_echo"] >= 2
            # The hub restarts; the guest's lease renews to the same address.
            await hub.kill()
            await hub.start()
            with trio.fail_after(20):
                while not (await hub.port("ga.sock"))["link_up"]:
                    await trio.sleep(0.2)
            await ga.check("kill -USR1 $(pidof udhcpc)")  # renew now, not at T1
            with trio.fail_after(20):
                while True:
                    gateway = next(p for p in (await hub.status())["ports"]
                                   if p["name"] == "gateway")
                    if gateway.get("dhcp", {}).get("ack", 0) >= 1:
                        break
                    await trio.sleep(0.3)
            out = await ga.check("ip -4 addr show dev eth0")
            assert f"inet {leased}/" in out
            await ga.check("ping -c 2 -W 2 10.77.0.1")


async def test_forged_macs_forged_ips_and_rogue_dhcp_reach_no_one(tmp_path):
    async with hub_process(tmp_path, ["ga.sock", "gb.sock", "gm.sock"], hub_args(tmp_path)) as hub:
        async with guest("ga", hub, tmp_path) as ga, guest("gb", hub, tmp_path) as gb, \
                guest("gm", hub, tmp_path) as gm:
            boots = await wait_all_booted([ga, gb, gm])
            ip_a, ip_b = (b.ip.split("/")[0] for b in boots[:2])
            mac_a = boots[0].fields["mac"]
            await ga.check(f"ping -c 1 -W 2 {ip_b}")
            await gm.check(f"ping -c 1 -W 2 {ip_a}")  # the mallory guest is on the network
            # Without --nat: SLAAC from the advertisements, but router lifetime 0 (no route)
            await wait_for(ga, "ip -6 addr show dev eth0 scope global", r"inet6 fd77::")
            assert "default" not in await ga.check("ip -6 route show default")
            # 1. mallory takes ga's IP address
            await gm.check(f"ip addr add {ip_a}/32 dev eth0")
            rc, _ = await gm.run(f"ping -c 2 -W 1 -I {ip_a} {ip_b}")
            assert rc != 0
            await gm.check(f"ip addr del {ip_a}/32 dev eth0")
            # 2. mallory takes ga's MAC address
            await gm.check(f"ip link set eth0 down; ip link set eth0 address {mac_a};"
                           " ip link set eth0 up")
            rc, _ = await gm.run(f"ping -c 2 -W 1 {ip_b}")
            assert rc != 0
            # 3. mallory runs a DHCP server; gb asks for a new lease and gets the hub's
            await gm.check("ip link set eth0 down; ip link set eth0 address 52:54:00:66:66:66;"
                           " ip link set eth0 up; ip addr add 10.77.0.250/24 dev eth0 || true")
            await gm.check("printf 'start 10.77.0.100\\nend 10.77.0.110\\ninterface eth0\\n"
                           "opt router 10.77.0.250\\n' > /tmp/udhcpd.conf;"
                           " touch /var/lib/udhcpd.leases 2>/dev/null || mkdir -p /var/lib;"
                           " udhcpd /tmp/udhcpd.conf")
            await gb.check("kill -USR2 $(pidof udhcpc); sleep 1; kill -USR1 $(pidof udhcpc)")
            # The release flushed gb's address: it is back once gb has bound its new lease,
            # and mallory's answer to gb's request has reached the hub once it counts it.
            await wait_for(gb, "ip -4 addr show dev eth0", r"inet \d")
            with trio.fail_after(10):
                while not (await hub.port("gm.sock"))["drops"].get("dhcp_guard"):
                    await trio.sleep(0.2)
            # Without --nat the hub names no router: no default route, and not mallory's.
            routes = await gb.check("ip route")
            assert "10.77.0.250" not in routes and "default" not in routes, routes
            await ga.check(f"ping -c 1 -W 2 {ip_b}")  # the honest guests still talk
            drops = (await hub.port("gm.sock"))["drops"]
            assert drops.get("ip_spoof", 0) >= 1, drops
            assert drops.get("mac_spoof", 0) >= 1, drops
            assert drops.get("dhcp_guard", 0) >= 1, drops


async def test_guest_without_offloads_exchanges_a_stream_and_a_file_with_one_with_all(tmp_path):
    async with hub_process(tmp_path, ["ga.sock", "gb.sock"], hub_args(tmp_path)) as hub:
        async with guest("ga", hub, tmp_path) as ga, \
                guest("gb", hub, tmp_path, device_opts=NO_OFFLOADS) as gb:
            boots = await wait_all_booted([ga, gb])
            ip_a, ip_b = (b.ip.split("/")[0] for b in boots)
            # The harness's device options reach the guest's driver: feature bit 0 is
            # VIRTIO_NET_F_CSUM, bit 1 GUEST_CSUM, bit 11 HOST_TSO4 (QEMU's defaults: all on).
            features_a = await ga.check("cat /sys/class/net/eth0/device/features")
            features_b = await gb.check("cat /sys/class/net/eth0/device/features")
            assert features_b[0] == features_b[1] == features_b[11] == "0", features_b
            assert features_a[0] == "1", features_a
            for server, client, address in ((gb, ga, ip_b), (ga, gb, ip_a)):
                assert await iperf3_mbits(client, server, address) > 0
            sent, received = await send_file(ga, gb, ip_b, 4096)
            assert received == sent
            port_b = await hub.port("gb.sock")
            assert port_b["software_offloads"] > 0  # ga's TSO frames were cut for gb
            assert not any(reason.startswith("offload") for reason in port_b["drops"])


async def test_a_guest_behind_nat_fetches_from_the_hub_hosts_loopback_and_sends_back(tmp_path):
    """--nat --map-host-loopback: the guest's TCP to the gateway's address reaches a server on
    the hub host's 127.0.0.1 (4 MiB each way, sha256), through the NAT's TCP with the guest's
    offloads on."""
    import hashlib
    import os
    import socket

    data = os.urandom(4 << 20)
    received = bytearray()
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def serve_twice() -> None:
        conn, _ = await listener.accept()  # first: send the data
        with conn:
            view = memoryview(data)
            while view:
                view = view[await conn.send(view):]
        conn, _ = await listener.accept()  # then: take what the guest sends
        with conn:
            while chunk := await conn.recv(65536):
                received.extend(chunk)

    args = [*hub_args(tmp_path), "--nat", "--map-host-loopback"]
    with listener:
        async with hub_process(tmp_path, ["ga.sock"], args) as hub, \
                guest("ga", hub, tmp_path) as ga, trio.open_nursery() as nursery:
            await ga.wait_booted()
            nursery.start_soon(serve_twice)
            got = await ga.check(f"nc 10.77.0.1 {port} > /tmp/in; sha256sum /tmp/in | "
                                 "cut -c1-64", timeout=120)
            assert got.strip() == hashlib.sha256(data).hexdigest()
            await ga.check(f"nc 10.77.0.1 {port} < /tmp/in", timeout=120)
            with trio.fail_after(30):
                while len(received) < len(data):
                    await trio.sleep(0.2)
            nat = (await hub.status())["nat"]
    assert bytes(received) == data
    assert sum(held["flows"].get("tcp", 0) for held in nat["ports"].values()) <= 1
    assert nat["tcp"]["drops"].get("bad_checksum", 0) == 0
