"""Restarts under traffic, against the real processes: the hub, each TAP host's endpoint and
the guest's QEMU are killed with SIGKILL and started again while h1 streams to h2; traffic
comes back every round and the stream that spans all of it arrives intact (sha256).  A round
of each here; bench/kill_loop.py runs a hundred of each and reports how fast traffic is back."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.chaos import KillLoop
from tests.support.guest import ensure_image, qemu_available
from tests.support.netns import hub_and_hosts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun")
                       or shutil.which("ip") is None or not qemu_available(),
                       reason="needs root, /dev/net/tun, iproute2 and QEMU"),
]


async def test_traffic_survives_kill_9_of_hub_endpoints_and_qemu(tmp_path):
    ensure_image()
    with hub_and_hosts(2) as namespaces:
        result = await KillLoop(tmp_path, namespaces).run(rounds=4)
    assert [r.victim for r in result.rounds] == ["hub", "h1", "h2", "qemu"]
    assert result.stream_bytes > 0
    assert result.stream_intact
