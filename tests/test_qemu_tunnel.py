"""The VPN with real processes and real guests: a hub, two `vhostvpn vm` endpoints on
loopback, a QEMU guest behind each.  DHCP from the hub, ping, iperf3 and a file checked by
sha256 across the tunnel; kill -9 of the hub mid-transfer, then of an endpoint: traffic comes
back by itself, no guest reboots."""

from __future__ import annotations

import pytest
import trio

from tests.support.guest import Guest, dhcp_guests, iperf3_mbits, qemu_available, send_file
from tests.support.hub import TunnelKeys, endpoint_process, hub_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
    pytest.mark.usefixtures("guest_image"),
]


async def ping_until(g: Guest, address: str, seconds: float) -> float:
    """Ping until one answer comes back; how long it took."""
    start = trio.current_time()
    with trio.fail_after(seconds):
        while True:
            rc, _ = await g.run(f"ping -c 1 -W 1 {address}", timeout=10)
            if rc == 0:
                return trio.current_time() - start


async def test_two_endpoints_through_a_hub_survive_kill_9(tmp_path):
    keys = TunnelKeys(tmp_path, ("ep1", "ep2"))
    hub_args = keys.hub_args("--subnet", "10.77.0.0/24", "--state-dir", str(tmp_path / "state"))
    async with hub_process(tmp_path, [], hub_args) as hub, \
            endpoint_process(tmp_path, "ep1", ["a.sock"], keys.vm_args("ep1")) as ep1, \
            endpoint_process(tmp_path, "ep2", ["b.sock"], keys.vm_args("ep2")) as ep2:
        async with dhcp_guests(tmp_path, ga=ep1.socket("a.sock"),
                               gb=ep2.socket("b.sock")) as ((ga, gb), (ip_a, ip_b)):
            assert ip_a.startswith("10.77.0.") and ip_b.startswith("10.77.0.")
            await ga.check(f"ping -c 3 -W 2 {ip_b}")
            # iperf3 and a file, across both tunnels
            assert await iperf3_mbits(ga, gb, ip_b, once=False) > 0
            sent, received = await send_file(ga, gb, ip_b, 8192, listen_seconds=60, timeout=60)
            assert received == sent
            session = next(p for p in (await hub.status())["ports"] if p["name"] == "ep1")
            assert session["state"] == "up" and session["in_frames"] > 1000
            # kill -9 the hub in the middle of a transfer, start it again
            await ga.check(f"iperf3 -c {ip_b} -t 30 >/dev/null 2>&1 &")
            await trio.sleep(2)
            await hub.kill()
            await trio.sleep(1)
            await hub.start()
            took = await ping_until(ga, ip_b, 20)
            assert took < 5, f"traffic came back {took:.1f} s after the hub did"
            # kill -9 an endpoint: QEMU reconnects to the new process, no reboot
            await ep2.kill()
            await ep2.start()
            took = await ping_until(ga, ip_b, 20)
            assert took < 5, f"traffic came back {took:.1f} s after the endpoint did"
            assert len(ga.boots) == 1 and len(gb.boots) == 1
            await ga.check("killall iperf3 || true")
