"""Real QEMU guests (TCG, unmodified Linux virtio-net driver) on a real `vhostvpn hub`
process: a guest reboot, a hub crash and restart with QEMU reconnecting, then ping, iperf3
and a file between them; and a multiqueue guest.  (Guests with and without offloads:
tests/test_qemu_netstack.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.support.guest import Guest, iperf3_mbits, qemu_available, send_file, wait_all_booted
from tests.support.hub import VhostvpnProcess, hub_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
    pytest.mark.usefixtures("guest_image"),
]

def guest(name: str, hub, ip: str, tmp_path: Path, **kw) -> Guest:
    return Guest(name, socket=Path(hub.socket(f"{name}.sock")), ip=ip, stay=True,
                 log_dir=tmp_path, **kw)


async def ping(g: Guest, address: str, count: int = 3) -> None:
    rc, out = await g.run(f"ping -c {count} -W 2 {address}", timeout=30)
    assert rc == 0, out


@asynccontextmanager
async def hub_with_two_guests(tmp_path: Path, **ga_options: object
                              ) -> AsyncIterator[tuple[VhostvpnProcess, Guest, Guest]]:
    """A hub with guests ga (10.77.0.1) and gb (10.77.0.2) on it, both booted, and ga's ping
    to gb answered."""
    async with hub_process(tmp_path, ["ga.sock", "gb.sock"]) as hub:
        async with guest("ga", hub, "10.77.0.1/24", tmp_path, **ga_options) as ga, \
                guest("gb", hub, "10.77.0.2/24", tmp_path) as gb:
            await wait_all_booted([ga, gb])
            await ping(ga, "10.77.0.2")
            yield hub, ga, gb


async def test_two_guests_stream_through_the_hub_after_a_guest_reboot_and_a_hub_crash(tmp_path):
    async with hub_with_two_guests(tmp_path) as (hub, ga, gb):
        # the guest reboots: QEMU stops the rings and replays the start block; it is a new
        # boot (the root fs lives in RAM) with its address again, and talks both ways
        await gb.check("echo before > /tmp/marker")
        boot = await gb.reboot()
        assert boot.number == 2 and boot.ip == "10.77.0.2/24"
        assert await gb.run("cat /tmp/marker") == (1, "cat: can't open '/tmp/marker': "
                                                      "No such file or directory")
        await ping(ga, "10.77.0.2")
        await ping(gb, "10.77.0.1", count=1)
        # the hub dies (kill -9) and comes back: QEMU reconnects (reconnect=1), no reboot
        await hub.kill()
        await hub.start()
        with trio.fail_after(20):
            while not all(p["link_up"] for p in (await hub.status())["ports"]):
                await trio.sleep(0.2)
        await ping(ga, "10.77.0.2", count=2)
        await ping(gb, "10.77.0.1", count=2)
        rc, out = await gb.run("cat /proc/uptime")
        assert rc == 0 and float(out.split()[0]) < 120
        assert "VV-BOOTED" not in gb.log_tail(5)  # still the same boot, no reboot
        # a stream and a file cross, through the hub's port with nothing dropped
        assert await iperf3_mbits(gb, ga, "10.77.0.1") > 0
        sent, received = await send_file(ga, gb, "10.77.0.2", 2048)
        assert received == sent
        port = await hub.port("ga.sock")  # the stream's receiver
        assert port["link_up"] and not port["broken"]
        assert port["out_frames"] > 1000 and port["drops"].get("offload", 0) == 0


async def test_multiqueue_guest_with_two_vcpus(tmp_path):
    async with hub_with_two_guests(tmp_path, smp=2, queues=2) as (hub, ga, gb):
        _rc, out = await ga.run("ls /sys/class/net/eth0/queues/")
        assert "tx-1" in out, out
        # both CPUs send: pin a ping to each so frames leave on both TX queues
        await ga.check("taskset 1 ping -c 2 10.77.0.2 && taskset 2 ping -c 2 10.77.0.2")
        assert await iperf3_mbits(gb, ga, "10.77.0.1") > 0
        port = await hub.port("ga.sock")
        assert len(port["live_queues"]) >= 2 and not port["broken"]
