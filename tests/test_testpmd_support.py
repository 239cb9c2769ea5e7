"""Proves tests/support/testpmd.py against a real vhost-user back-end: DPDK's own vhost PMD.

Topology (also the C reference of bench/vhost_switch.py):
    testpmd txonly (virtio-user) -> a.sock -> testpmd vhost PMD io-fwd -> b.sock -> testpmd rxonly
The parser tests are fast; the end-to-end test is slow (three busy-polling processes, 2 cores).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from tests.support.testpmd import (
    StatsParser,
    TestpmdConfig,
    TestpmdError,
    VirtioUserPort,
    run_testpmd,
    vhost_switch_config,
    wait_for_path,
)

NIC_BLOCK = """\x1b[2J\x1b[1;1H
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: 224000     RX-missed: 3          RX-bytes:  14336000
  RX-errors: 0
  RX-nombuf:  0 \x20\x20\x20\x20\x20\x20\x20\x20
  TX-packets: 12         TX-errors: 0          TX-bytes:  768

  Throughput (since last show)
  Rx-pps:        31612          Rx-bps:     16185656
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
"""

FWD_BLOCK = """
  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 224000         TX-dropped: 73577696      TX-total: 73801696
  ----------------------------------------------------------------------------
"""

needs_testpmd = pytest.mark.skipif(shutil.which("dpdk-testpmd") is None,
                                   reason="dpdk-testpmd not installed")


def test_parser_reads_periodic_nic_statistics() -> None:
    parser = StatsParser(clock=lambda: 42.0)
    for line in NIC_BLOCK.splitlines():
        parser.feed_line(line)
    stats = parser.latest[0]
    assert (stats.rx_packets, stats.rx_missed, stats.rx_bytes) == (224000, 3, 14336000)
    assert (stats.tx_packets, stats.tx_bytes) == (12, 768)
    assert (stats.rx_pps, stats.rx_bps, stats.tx_pps) == (31612, 16185656, 0)
    assert stats.time == 42.0
    assert parser.samples == 1


def test_parser_reads_final_forward_statistics() -> None:
    parser = StatsParser(clock=lambda: 0.0)
    for line in FWD_BLOCK.splitlines():
        parser.feed_line(line)
    final = parser.final[1]
    assert (final.tx_packets, final.tx_dropped, final.tx_total) == (224000, 73577696, 73801696)
    assert parser.latest == {}


def test_config_renders_virtio_user_txonly_command_line() -> None:
    config = TestpmdConfig(
        ports=[VirtioUserPort("/tmp/a.sock", mac="02:00:00:00:00:01")],
        forward_mode="txonly", txpkts=64, eth_peers={0: "02:00:00:00:00:02"},
        file_prefix="unit")
    argv = config.argv()
    assert "net_virtio_user0,path=/tmp/a.sock,queues=1,queue_size=256,mac=02:00:00:00:00:01" in argv
    assert argv[argv.index("--") + 1:][:1] == ["--forward-mode=txonly"]
    assert "--eth-peer=0,02:00:00:00:00:02" in argv
    assert "--txpkts=64" in argv
    assert "--file-prefix=unit" in argv


def test_config_rejects_malformed_mac() -> None:
    with pytest.raises(ValueError, match="MAC address"):
        VirtioUserPort("/tmp/a.sock", mac="02:00:00:00:01").vdev(0)


@pytest.mark.slow
@needs_testpmd
async def test_frames_cross_dpdk_vhost_switch_from_txonly_to_rxonly(tmp_path: Path) -> None:
    sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
    rx_mac, tx_mac = "02:00:00:00:00:02", "02:00:00:00:00:01"
    # CPU 1 for the switch's forwarding lcore, CPU 0 shared by the two virtio-user ends.
    switch = vhost_switch_config(sock_a, sock_b, lcores="0@0,1@1")
    rx = TestpmdConfig(ports=[VirtioUserPort(sock_b, mac=rx_mac)], forward_mode="rxonly",
                       lcores="(0,1)@0")
    tx = TestpmdConfig(ports=[VirtioUserPort(sock_a, mac=tx_mac)], forward_mode="txonly",
                       lcores="(0,1)@0", txpkts=64, eth_peers={0: rx_mac})
    with trio.fail_after(60):
        async with run_testpmd(switch) as switch_pmd:
            await wait_for_path(sock_a)
            await wait_for_path(sock_b)
            async with run_testpmd(rx) as rx_pmd:
                async with run_testpmd(tx) as tx_pmd:
                    received = await rx_pmd.wait_for_rx(1, timeout=15)
                    await trio.sleep(2)
                # tx stopped: let the switch and receiver drain, then read both sides.
                await rx_pmd.next_sample()
                await rx_pmd.next_sample()
                received = rx_pmd.stats(0)
            sent = tx_pmd.final_stats(0)
        switch_final = switch_pmd.final_stats(1)
    assert received is not None and sent is not None and switch_final is not None
    assert 0 < received.rx_packets <= sent.tx_packets
    assert received.rx_packets <= switch_final.tx_packets
    assert not any(d.exists() for pmd in (switch, rx, tx) for d in pmd.runtime_dirs())


@pytest.mark.slow
@needs_testpmd
async def test_virtio_user_without_backend_raises_probe_failure(tmp_path: Path) -> None:
    config = TestpmdConfig(ports=[VirtioUserPort(tmp_path / "nobody.sock")],
                           forward_mode="rxonly")
    probe_failed = r"failed \(.*(failed to initialize|No probed ethernet devices)"
    with pytest.raises(TestpmdError, match=probe_failed):
        async with run_testpmd(config, ready_timeout=20):
            pass
    assert not any(d.exists() for d in config.runtime_dirs())
