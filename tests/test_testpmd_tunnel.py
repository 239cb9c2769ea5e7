"""DPDK testpmd (a real virtio driver and vhost-user front-end) on two `vhostvpn vm`
endpoints joined through a hub over TLS: txonly on one, rxonly on the other; frames counted
at both ends and at every process between them."""

from __future__ import annotations

import shutil

import pytest
import trio

from tests.support.hub import TunnelKeys, endpoint_process, hub_process
from tests.support.testpmd import TestpmdConfig, VirtioUserPort, local_mac, run_testpmd

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd missing"),
]


async def test_testpmd_frames_cross_two_endpoints_and_a_hub(tmp_path):
    keys = TunnelKeys(tmp_path, ("ep1", "ep2"))
    tx_mac, rx_mac = local_mac(), local_mac()
    async with hub_process(tmp_path, [], keys.hub_args()) as hub, \
            endpoint_process(tmp_path, "ep1", ["tx.sock"], keys.vm_args("ep1")) as ep1, \
            endpoint_process(tmp_path, "ep2", ["rx.sock"], keys.vm_args("ep2")) as ep2:
        with trio.fail_after(20):
            for endpoint in (ep1, ep2):
                await endpoint.session_up(20)
        receiver = TestpmdConfig(
            ports=[VirtioUserPort(ep2.socket("rx.sock"), mac=rx_mac)], forward_mode="rxonly",
            lcores="(0,1)@1", eth_peers={0: tx_mac}, tx_first=True,
            extra_app_args=["--tx-ip=198.18.0.2,198.18.0.1"])
        sender = TestpmdConfig(
            ports=[VirtioUserPort(ep1.socket("tx.sock"), mac=tx_mac)], forward_mode="txonly",
            lcores="(0,1)@1", txpkts=256, eth_peers={0: rx_mac})
        async with run_testpmd(receiver, log_path=tmp_path / "rx.log") as rx:
            await trio.sleep(1)  # the first burst teaches both switches where rx_mac is
            async with run_testpmd(sender, log_path=tmp_path / "tx.log") as tx:
                await rx.wait_for_rx(10_000, timeout=60)
            sent = tx.final_stats(0) or tx.stats(0)
            await trio.sleep(1)
            hub_state = await hub.status()
            ep1_port = await ep1.port("hub")
            ep2_port = await ep2.port("rx.sock")
        got = rx.final_stats(0) or rx.stats(0)
    assert got.rx_packets >= 10_000
    session_1 = next(p for p in hub_state["ports"] if p["name"] == "ep1")
    session_2 = next(p for p in hub_state["ports"] if p["name"] == "ep2")
    assert sent.tx_packets >= ep1_port["out_frames"] >= session_1["in_frames"] - 1
    assert session_2["out_frames"] >= got.rx_packets - 32
    assert ep2_port["out_frames"] >= got.rx_packets - 32
    assert not session_1["drops"].get("ip_spoof") and not session_1["drops"].get("mac_spoof")
