"""Front-ends that go away while the hub is delivering to them: DPDK testpmd's virtio-user on
both sockets of a hub, frames circulating (mac forwarding, as in bench/loop.py), stopped again
and again mid-stream.  testpmd's exit disables and stops its rings while frames and kicks are
waking the hub's ring tasks; the hub must come out clean every time: no traceback, no device
latched broken, and the next testpmd on the same sockets gets frames again."""

from __future__ import annotations

import os
import shutil

import pytest
import trio

from tests.support.hub import hub_process
from tests.support.testpmd import TestpmdConfig, VirtioUserPort, local_mac, run_testpmd

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd missing"),
]

# testpmd runs started and stopped mid-stream on the same sockets (the race hit about one
# exit in five before the fix, with the hub busy on its own CPU; the unit test
# test_a_retired_ring_is_released_only_once_its_task_has_stopped proves the fix itself).
ROUNDS = 6
FRAMES_PER_ROUND = 20_000


async def test_front_ends_leaving_mid_delivery_leave_the_hub_clean_and_its_sockets_usable(
        tmp_path):
    mac_a, mac_b = local_mac(), local_mac()
    two_cpus = (os.cpu_count() or 1) >= 2
    config = TestpmdConfig(
        ports=[VirtioUserPort(tmp_path / "a.sock", mac=mac_a, queue_size=1024),
               VirtioUserPort(tmp_path / "b.sock", mac=mac_b, queue_size=1024)],
        forward_mode="mac", eth_peers={0: mac_b, 1: mac_a}, tx_first=True, burst=512,
        txpkts=64, lcores="(0,1)@0", total_num_mbufs=16384)
    async with hub_process(tmp_path, ["a.sock", "b.sock"], ["--no-port-policy"]) as hub:
        assert hub.process is not None
        if two_cpus:  # the hub busy on its own CPU, as in the loop harness
            os.sched_setaffinity(hub.process.pid, {1})
        for round_ in range(ROUNDS):
            async with run_testpmd(config, log_path=tmp_path / f"testpmd{round_}.log") as pmd:
                # frames reach both ports through the hub: the new front-ends work
                await pmd.wait_for_rx(FRAMES_PER_ROUND, port=0, timeout=30)
                await pmd.wait_for_rx(FRAMES_PER_ROUND, port=1, timeout=30)
                # leaving the block stops testpmd (SIGINT) with frames in flight
            await trio.sleep(0.1)
            for name in ("a.sock", "b.sock"):
                port = await hub.port(name)
                assert port["connections"] == round_ + 1
                assert port["broken"] in (None, False), port
        log = hub.log_path.read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 1000:][:5000]
    assert "device broken" not in log
    assert "internal error" not in log
