"""The tunnel's processes without guests: SIGHUP rereads the peers file and disconnects a
removed peer; the endpoint's status shows its session; a hub with a bad peers file or
identity refuses to start with a clear message."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import trio

from tests.support.hub import TunnelKeys, endpoint_process, free_tcp_port, hub_process
from tunnel.keys import keygen

pytestmark = pytest.mark.slow


async def test_sighup_disconnects_a_removed_peer(tmp_path):
    keys = TunnelKeys(tmp_path, ("ep1",))
    async with hub_process(tmp_path, [], keys.hub_args()) as hub, \
            endpoint_process(tmp_path, "ep1", ["a.sock"], keys.vm_args("ep1")) as ep1:
        await ep1.session_up()
        session = next(p for p in (await hub.status())["ports"] if p["name"] == "ep1")
        assert session["state"] == "up"
        keys.peers.write_text("# ep1 is gone\n")
        hub.process.send_signal(signal.SIGHUP)
        with trio.fail_after(15):
            while True:
                state = await hub.status()
                session = next(p for p in state["ports"] if p["name"] == "ep1")
                if session["state"] == "down" and state["tunnel"]["refused"].get(
                        "auth_unknown_key"):
                    break
                await trio.sleep(0.1)
        endpoint_state = await ep1.status()
        assert endpoint_state["session"]["state"] == "down"
        assert "unknown_key" in (endpoint_state["session"]["last_error"] or "")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_identity", "key"),
        ("bad_peers", "peers"),
    ],
)
def test_hub_refuses_to_start_on_bad_keys_or_peers(tmp_path, setup, message):
    keygen(tmp_path / "hub-id")
    peers = tmp_path / "peers"
    peers.write_text("alice not-a-fingerprint\n" if setup == "bad_peers" else "")
    identity = tmp_path / ("nowhere" if setup == "missing_identity" else "hub-id")
    result = subprocess.run(
        [sys.executable, "-m", "tunnel.cli", "hub", "--listen", f"127.0.0.1:{free_tcp_port()}",
         "--identity", str(identity), "--peers", str(peers)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert message in result.stderr.lower() and "Traceback" not in result.stderr
