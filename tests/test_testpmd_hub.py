"""A real vhost-user front-end and virtio driver at native speed, DPDK testpmd's virtio-user,
on both sides of a `vhostvpn hub` process: txonly on one socket, rxonly on the other, frames
counted on both ends and by the hub."""

from __future__ import annotations

import shutil

import pytest
import trio

from tests.support.hub import hub_process
from tests.support.testpmd import TestpmdConfig, VirtioUserPort, local_mac, run_testpmd

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd missing"),
]


@pytest.mark.parametrize("size", [64, 1500])
async def test_testpmd_frames_cross_the_hub_and_are_counted(tmp_path, size):
    tx_mac, rx_mac = local_mac(), local_mac()
    async with hub_process(tmp_path, ["tx.sock", "rx.sock"]) as hub:
        receiver = TestpmdConfig(
            ports=[VirtioUserPort(hub.socket("rx.sock"), mac=rx_mac)], forward_mode="rxonly",
            lcores="(0,1)@1", eth_peers={0: tx_mac}, tx_first=True,
            # its first burst (so the switch learns it) from its own IP address: the hub's
            # port policy binds a source address to the first port that uses it
            extra_app_args=["--tx-ip=198.18.0.2,198.18.0.1"],
        )
        sender = TestpmdConfig(
            ports=[VirtioUserPort(hub.socket("tx.sock"), mac=tx_mac)], forward_mode="txonly",
            lcores="(0,1)@1", txpkts=size, eth_peers={0: rx_mac},
        )
        async with run_testpmd(receiver, log_path=tmp_path / "rx.log") as rx:
            async with run_testpmd(sender, log_path=tmp_path / "tx.log") as tx:
                await rx.wait_for_rx(10_000, timeout=30)
            sent = tx.final_stats(0) or tx.stats(0)
            await trio.sleep(1)
            port_rx = await hub.port("rx.sock")
            port_tx = await hub.port("tx.sock")
        got = rx.final_stats(0) or rx.stats(0)
    assert sent is not None and got is not None
    received = got.rx_packets
    assert received >= 10_000
    # every frame the receiver counted came through the hub, and the hub saw no more than
    # the sender sent
    assert port_rx["out_frames"] >= received - 32  # testpmd's first burst (tx_first) aside
    assert port_tx["in_frames"] <= sent.tx_packets
    assert port_rx["out_frames"] + sum(port_rx["drops"].values()) <= port_tx["in_frames"] + 64
    assert not port_rx["broken"] and not port_tx["broken"]
