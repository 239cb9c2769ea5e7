"""Hosts join through TAP and TUN devices, each in a network namespace of its own, with the
hub in another: they ping each other and a QEMU guest (IPv4 and IPv6), move files checked by
sha256, the TUN host leases its address by DHCP, and every endpoint leaves its namespace as it
found it when it stops (SIGTERM)."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.hub import TunnelKeys, VhostvpnProcess
from tests.support.netns import hub_and_hosts, run_in

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun")
                       or shutil.which("ip") is None,
                       reason="needs root, /dev/net/tun and iproute2"),
]

HUB_PORT = 7777


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """A hub namespace joined by veth pairs to three endpoint namespaces (10.201.N.0/24)."""
    with hub_and_hosts(3) as names:
        yield names


def hub_in_namespace(tmp_path: Path, namespaces: dict[str, str],
                     peers: tuple[str, ...]) -> tuple[VhostvpnProcess, TunnelKeys]:
    """The hub (not started) in its namespace on HUB_PORT, with gateway services, for
    `peers`; and the keys its endpoints use."""
    keys = TunnelKeys(tmp_path, peers, port=HUB_PORT)
    hub = VhostvpnProcess(tmp_path, "hub", [], keys.hub_args(
        "--subnet", "10.77.0.0/24", "--ipv6-prefix", "fd77::/64",
        "--state-dir", str(tmp_path / "state"), listen="0.0.0.0"), "hub",
        prefix=["ip", "netns", "exec", namespaces["hub"]])
    return hub, keys


def endpoint_in_namespace(tmp_path: Path, namespaces: dict[str, str], keys: TunnelKeys,
                          n: int, name: str, command: str, sockets: list[str],
                          local: list[str]) -> VhostvpnProcess:
    """`vhostvpn COMMAND` as peer `name` in namespace hN, reaching the hub at 10.201.N.1."""
    return VhostvpnProcess(tmp_path, command, sockets,
                           keys.vm_args(name, *local, "--name", name, hub=f"10.201.{n}.1"),
                           name, prefix=["ip", "netns", "exec", namespaces[f"h{n}"]])


async def sha256_receiver(netns: str, address: str, port: int, digest_file: Path
                          ) -> trio.Process:
    """A one-connection TCP server in `netns` on address:port that writes the sha256 of what
    it receives to `digest_file`, then exits."""
    family = "socket.AF_INET6" if ":" in address else "socket.AF_INET"
    return await trio.lowlevel.open_process(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         f"import socket,hashlib;s=socket.create_server(({address!r},{port}),family={family});"
         "c,_=s.accept();h=hashlib.sha256()\n"
         "while (b:=c.recv(1<<16)): h.update(b)\n"
         f"open({str(digest_file)!r},'w').write(h.hexdigest())"])


async def send_file(tmp_path, sender_ns: str, receiver_ns: str, address: str,
                    size: int = 4 << 20) -> None:
    """A file from one namespace to another over TCP, its sha256 compared on arrival."""
    data = tmp_path / f"data-{sender_ns}"
    data.write_bytes(os.urandom(size))
    digest_file = tmp_path / f"received-{receiver_ns}.sha256"
    server = await sha256_receiver(receiver_ns, address, 5001, digest_file)
    await trio.sleep(0.5)
    await run_in(sender_ns, sys.executable, "-c",
                 f"import socket;c=socket.create_connection(({address!r},5001));"
                 f"c.sendall(open({str(data)!r},'rb').read());c.close()")
    with trio.fail_after(30):
        await server.wait()
    assert digest_file.read_text() == hashlib.sha256(data.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["tap", "tun"])
async def test_two_hosts_talk_through_a_hub_and_clean_up(tmp_path, namespaces, mode):
    """Two hosts whose devices have the same name (vv0), as on two real machines."""
    hub, keys = hub_in_namespace(tmp_path, namespaces, ("h1", "h2"))
    hosts = {name: endpoint_in_namespace(
                 tmp_path, namespaces, keys, n, name, "host", [],
                 [f"--{mode}", "vv0", "--address", f"10.77.0.1{n}/24",
                  "--address", f"fd77::1{n}/64"])
             for n, name in ((1, "h1"), (2, "h2"))}
    await hub.start()
    try:
        for host in hosts.values():
            await host.start()
        with trio.fail_after(20):
            for host in hosts.values():
                while (await host.status())["session"]["state"] != "up":
                    await trio.sleep(0.1)
        h1, h2 = namespaces["h1"], namespaces["h2"]
        assert "10.77.0.11/24" in await run_in(h1, "ip", "addr", "show", "vv0")
        await run_in(h1, "ping", "-c", "2", "-W", "2", "10.77.0.12")
        await run_in(h1, "ping", "-c", "2", "-W", "2", "10.77.0.1")  # the hub's gateway
        await run_in(h2, "ping", "-6", "-c", "2", "-W", "2", "fd77::11")
        # a file across, checked by sha256 (TCP: the devices pass 64 KiB TSO frames)
        await send_file(tmp_path, h1, h2, "10.77.0.12", size=8 << 20)
        device = next(p for p in (await hosts["h2"].status())["ports"]
                      if p.get("kind") == mode)
        assert device["in_frames"] > 0 and device["out_frames"] > 0
        # SIGTERM: the endpoint removes its device and addresses
        await hosts["h1"].stop()
        links = await run_in(h1, "ip", "-o", "link")
        assert "vv0" not in links
    finally:
        for host in hosts.values():
            await host.stop()
        await hub.stop()


async def test_tap_host_tun_host_and_a_guest_on_one_hub(tmp_path, namespaces):
    from tests.support.guest import Guest, ensure_image, qemu_available

    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed")
    await trio.to_thread.run_sync(ensure_image)
    hub, keys = hub_in_namespace(tmp_path, namespaces, ("tap", "tun", "vm"))

    endpoint = functools.partial(endpoint_in_namespace, tmp_path, namespaces, keys)

    tap = endpoint(1, "tap", "host", [], ["--tap", "vv0", "--address", "10.77.0.201/24",
                                          "--address", "fd77::201/64"])
    tun = endpoint(2, "tun", "host", [], ["--tun", "vv0", "--dhcp"])
    vm = endpoint(3, "vm", "vm", ["g.sock"], [])
    await hub.start()
    try:
        for process in (tap, tun, vm):
            await process.start()
        guest = Guest("g", socket=Path(vm.socket("g.sock")), dhcp=True, stay=True,
                      log_dir=tmp_path)
        async with guest:
            boot = await guest.wait_booted()
            guest_ip = boot.ip.split("/")[0]
            h1, h2 = namespaces["h1"], namespaces["h2"]
            # the TUN host's lease, then its SLAAC address
            with trio.fail_after(30):
                while True:
                    port = next(p for p in (await tun.status())["ports"]
                                if p.get("kind") == "tun")
                    if port["dhcp"]["address"]:
                        break
                    await trio.sleep(0.2)
            tun_ip = port["dhcp"]["address"].split("/")[0]
            assert tun_ip.startswith("10.77.0.")
            assert f"inet {tun_ip}/" in await run_in(h2, "ip", "addr", "show", "vv0")
            with trio.fail_after(30):
                while "inet6 fd77::" not in (out := await run_in(
                        h2, "ip", "-6", "addr", "show", "vv0", "scope", "global")):
                    await trio.sleep(0.5)
            tun_ip6 = out.split("inet6 ")[1].split("/")[0]
            # everyone pings everyone, IPv4 and IPv6
            await run_in(h1, "ping", "-c", "2", "-W", "2", tun_ip)
            await run_in(h2, "ping", "-c", "2", "-W", "2", "10.77.0.201")
            await run_in(h2, "ping", "-c", "2", "-W", "2", guest_ip)
            await run_in(h1, "ping", "-c", "2", "-W", "2", guest_ip)
            await guest.check(f"ping -c 2 -W 2 {tun_ip} && ping -c 2 -W 2 10.77.0.201")
            await run_in(h1, "ping", "-6", "-c", "2", "-W", "2", tun_ip6)
            await run_in(h2, "ping", "-6", "-c", "2", "-W", "2", "fd77::201")
            # files both ways between the hosts, and from the guest to the TAP host
            await send_file(tmp_path, h1, h2, tun_ip)
            await send_file(tmp_path, h2, h1, "10.77.0.201")
            await send_file(tmp_path, h2, h1, "fd77::201")
            server = await sha256_receiver(h1, "10.77.0.201", 5002, tmp_path / "from-guest")
            await trio.sleep(0.5)
            sent = await guest.check("dd if=/dev/urandom of=/tmp/f bs=1k count=2048 "
                                     "2>/dev/null; sha256sum /tmp/f | cut -c1-64; "
                                     "nc 10.77.0.201 5002 < /tmp/f")
            with trio.fail_after(30):
                await server.wait()
            assert (tmp_path / "from-guest").read_text() == sent.strip()
        # SIGTERM: the TUN endpoint removes its device and the addresses it added
        await tun.stop()
        assert "vv0" not in await run_in(namespaces["h2"], "ip", "-o", "link")
    finally:
        for process in (tap, tun, vm):
            await process.stop()
        await hub.stop()


async def test_a_tap_host_keeps_its_mac_across_restarts(tmp_path, namespaces):
    """The TAP device's MAC comes from the endpoint's key and the device name, so after a
    restart (kill -9 included) its neighbours' ARP caches still point at it: without this
    traffic waited ~30 s for their caches to expire (found by the kill loop)."""
    keys = TunnelKeys(tmp_path, ("h1",), port=HUB_PORT)
    host = VhostvpnProcess(tmp_path, "host", [], keys.vm_args(
        "h1", "--tap", "vv0", "--address", "10.77.0.11/24", hub="10.201.1.1"), "h1",
        prefix=["ip", "netns", "exec", namespaces["h1"]])
    macs = []
    for _ in range(2):
        await host.start()
        try:
            link = await run_in(namespaces["h1"], "ip", "-o", "link", "show", "vv0")
            macs.append(link.split("link/ether ")[1].split()[0])
        finally:
            await host.kill()
    assert macs[0] == macs[1]
    assert int(macs[0].split(":")[0], 16) & 0x03 == 0x02  # unicast, locally administered
