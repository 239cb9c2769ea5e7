"""Direct paths with real guests: a hub and two `vhostvpn vm` endpoints on loopback, one
listening for direct sessions, a QEMU guest behind each leasing its address from the hub.
The guests' ping and iperf3 go direct (the hub's counters barely move), and when the
listening endpoint is killed and restarted the traffic comes back, direct again."""

from __future__ import annotations

import pytest
import trio

from tests.support.guest import dhcp_guests, iperf3_mbits, qemu_available
from tests.support.hub import TunnelKeys, endpoint_process, free_tcp_port, hub_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
    pytest.mark.usefixtures("guest_image"),
]


async def direct_up(endpoint, seconds: float = 15.0) -> None:
    with trio.fail_after(seconds):
        while True:
            peers = (await endpoint.status())["direct"]["peers"]
            if peers and peers[0]["path"] == "direct":
                return
            await trio.sleep(0.1)


async def hub_bytes(hub) -> int:
    ports = (await hub.status())["ports"]
    return sum(p["in_bytes"] for p in ports if p["name"] in ("ep1", "ep2"))


async def test_two_guests_talk_over_a_direct_path_and_it_comes_back_after_a_restart(tmp_path):
    keys = TunnelKeys(tmp_path, ("ep1", "ep2"))
    listen = ["--listen", f"127.0.0.1:{free_tcp_port()}"]
    hub_args = keys.hub_args("--subnet", "10.77.0.0/24", "--state-dir", str(tmp_path / "state"))
    async with hub_process(tmp_path, [], hub_args) as hub, \
            endpoint_process(tmp_path, "ep1", ["a.sock"], keys.vm_args("ep1")) as ep1, \
            endpoint_process(tmp_path, "ep2", ["b.sock"], keys.vm_args("ep2", *listen)) as ep2:
        async with dhcp_guests(tmp_path, ga=ep1.socket("a.sock"),
                               gb=ep2.socket("b.sock")) as ((ga, gb), (_, ip_b)):
            await ga.check(f"ping -c 3 -W 2 {ip_b}")
            await direct_up(ep1)
            await ga.check(f"ping -c 3 -W 2 {ip_b}")
            before = await hub_bytes(hub)
            assert await iperf3_mbits(ga, gb, ip_b, 3, once=False) > 0
            view = (await ep1.status())["direct"]["peers"][0]
            assert view["out_bytes"] > 10 << 20
            assert await hub_bytes(hub) - before < view["out_bytes"] // 100
            await ep2.kill()
            await ep2.start()
            await direct_up(ep1, 20.0)
            await ga.check(f"ping -c 3 -W 2 {ip_b}")
            assert len(ga.boots) == 1 and len(gb.boots) == 1
