"""The hub's introductions in real processes, in network namespaces: a `vhostvpn hub` and two
`vhostvpn host --tap` endpoints (h1 with --listen on a wildcard, h2 without), plus a probe
endpoint in the hub's namespace (tests/support/intro_probe.py) that writes down every INTRO
the hub process sends it.  Each endpoint is introduced to the other with its key, the address
the hub sees it from and, after traffic, the MAC and address the hub bound to its session;
a peer taken out of the peers file (SIGHUP) is gone from the next INTRO and from the other
endpoint's introductions; `hub --no-direct` sends no INTRO at all.  What the endpoints do
with an INTRO (direct sessions, fallback, policing): tests/test_direct_netns.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import trio

from tests.support.hub import TunnelKeys, VhostvpnProcess
from tests.support.netns import hub_and_hosts, run_in
from tunnel.keys import identity_fingerprint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun")
                       or shutil.which("ip") is None,
                       reason="needs root, /dev/net/tun and iproute2"),
]

HUB_PORT = 7777
DIRECT_PORT = 7100
TAP_IP = {1: "10.77.0.11", 2: "10.77.0.12"}
# The probe listens (so that it is told about h2, which only dials) at an address where
# nobody answers: the hub's end of h1's veth, a closed port.
PROBE_ADVERTISES = "10.201.1.1:9"


class Lab:
    """The hub, h1 (listens on 0.0.0.0:DIRECT_PORT), h2 (dials only) and the probe."""

    def __init__(self, tmp: Path, names: dict[str, str], *hub_extra: str,
                 probe: tuple[str, ...] = (PROBE_ADVERTISES,)) -> None:
        self.tmp = tmp
        self.names = names
        self.keys = TunnelKeys(tmp, ("h1", "h2", "probe"), port=HUB_PORT)
        self.hub = VhostvpnProcess(tmp, "hub", [], self.keys.hub_args(
            "--subnet", "10.77.0.0/24", *hub_extra, listen="0.0.0.0"), "hub",
            prefix=["ip", "netns", "exec", names["hub"]])
        listen = {1: ["--listen", f"0.0.0.0:{DIRECT_PORT}"], 2: []}
        self.hosts = {n: VhostvpnProcess(
            tmp, "host", [], self.keys.vm_args(
                f"h{n}", "--name", f"h{n}", "--tap", "vv0", "--address", f"{TAP_IP[n]}/24",
                *listen[n], hub=f"10.201.{n}.1"),
            f"h{n}", prefix=["ip", "netns", "exec", names[f"h{n}"]]) for n in (1, 2)}
        self.intros = tmp / "probe.intros"
        self.probe_args = probe
        self.probe: trio.Process | None = None

    async def start(self) -> None:
        await self.hub.start()
        for host in self.hosts.values():
            await host.start()
        for host in self.hosts.values():
            await host.session_up()
        self.probe = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", self.names["hub"], sys.executable, "-m",
             "tests.support.intro_probe", "127.0.0.1", str(HUB_PORT),
             str(self.tmp / "probe-id"), self.keys.hub_fingerprint, "probe", str(self.intros),
             *self.probe_args],
            cwd=Path(__file__).resolve().parent.parent)

    async def stop(self) -> None:
        if self.probe is not None and self.probe.returncode is None:
            self.probe.kill()
            await self.probe.wait()
        for host in self.hosts.values():
            await host.stop()
        await self.hub.stop()

    def last_intro(self) -> dict[str, dict] | None:
        """The probe's latest INTRO, by peer name (None before the first)."""
        if not self.intros.exists():
            return None
        lines = self.intros.read_text().splitlines()
        return {p["name"]: p for p in json.loads(lines[-1])} if lines else None

    async def intro_where(self, test, seconds: float = 10.0) -> dict[str, dict]:
        """Until the probe's latest INTRO passes `test`; that INTRO."""
        with trio.fail_after(seconds):
            while True:
                intro = self.last_intro()
                if intro is not None and test(intro):
                    return intro
                await trio.sleep(0.1)

    async def introduced(self, n: int) -> dict[str, dict]:
        """Host n's introduced peers (its `status`), by name."""
        return {p["name"]: p for p in (await self.hosts[n].status())["direct"]["peers"]}

    async def mac(self, n: int) -> str:
        return (await run_in(self.names[f"h{n}"], "cat", "/sys/class/net/vv0/address")).strip()


@pytest.fixture
def names():
    with hub_and_hosts(2) as names:
        yield names


async def test_real_endpoints_are_introduced_with_key_address_and_bindings_and_removed_on_sighup(
        tmp_path, names):
    lab = Lab(tmp_path, names)
    await lab.start()
    try:
        await run_in(names["h1"], "ping", "-c", "2", "-W", "2", TAP_IP[2])  # binds both
        macs = {n: await lab.mac(n) for n in (1, 2)}

        def bound(intro: dict[str, dict]) -> bool:
            return all(f"h{n}" in intro and TAP_IP[n] in intro[f"h{n}"]["ipv4"]
                       for n in (1, 2))
        intro = await lab.intro_where(bound)
        assert set(intro) == {"h1", "h2"}  # not the probe itself
        h1, h2 = intro["h1"], intro["h2"]
        assert h1["fingerprint"] == identity_fingerprint(tmp_path / "h1-id")
        assert h2["fingerprint"] == identity_fingerprint(tmp_path / "h2-id")
        assert h1["addresses"] == [f"10.201.1.2:{DIRECT_PORT}"]  # the wildcard, as seen
        assert h2["addresses"] == []  # h2 only dials
        assert h1["macs"] == [macs[1]] and h2["macs"] == [macs[2]]
        assert h1["ipv4"] == [TAP_IP[1]] and h2["ipv4"] == [TAP_IP[2]]

        # The real endpoints' own INTROs: each names the other (and the probe).
        with trio.fail_after(10):
            while set(await lab.introduced(2)) != {"h1", "probe"}:
                await trio.sleep(0.1)
        assert (await lab.introduced(2))["h1"]["fingerprint"] == h1["fingerprint"]
        assert (await lab.introduced(2))["h1"]["advertised"] == [f"10.201.1.2:{DIRECT_PORT}"]
        assert (await lab.introduced(1))["h2"]["fingerprint"] == h2["fingerprint"]
        assert (await lab.introduced(1))["probe"]["advertised"] == [PROBE_ADVERTISES]

        hub = await lab.hub.status()
        sessions = {p["name"]: p for p in hub["ports"] if p.get("kind") == "session"}
        assert sessions["h1"]["direct"]["advertised"] == [f"10.201.1.2:{DIRECT_PORT}"]
        assert sessions["h1"]["direct"]["introduced"] == 2  # h2 and the probe
        assert sessions["h2"]["direct"]["listens"] is False
        assert sessions["h2"]["direct"]["introduced_to"] == 2  # h1 and the probe
        assert hub["tunnel"]["direct"]["enabled"] is True

        lines = lab.keys.peers.read_text().splitlines()
        lab.keys.peers.write_text("".join(f"{line}\n" for line in lines
                                          if not line.startswith("h2 ")))
        assert lab.hub.process is not None
        lab.hub.process.send_signal(signal.SIGHUP)
        assert set(await lab.intro_where(lambda intro: "h2" not in intro)) == {"h1"}
        with trio.fail_after(10):
            while "h2" in await lab.introduced(1):
                await trio.sleep(0.1)
    finally:
        await lab.stop()


async def test_hub_no_direct_introduces_nobody(tmp_path, names):
    lab = Lab(tmp_path, names, "--no-direct")
    await lab.start()
    try:
        await run_in(names["h1"], "ping", "-c", "2", "-W", "2", TAP_IP[2])
        await trio.sleep(2.0)  # eight introduction ticks of an introducing hub
        assert lab.last_intro() == {}  # one empty INTRO: nobody
        for n in (1, 2):
            assert await lab.introduced(n) == {}
        hub = await lab.hub.status()
        assert hub["tunnel"]["direct"]["enabled"] is False
        sessions = {p["name"]: p for p in hub["ports"] if p.get("kind") == "session"}
        assert sessions["h1"]["direct"]["introduced"] == 0  # advertised, never introduced
    finally:
        await lab.stop()


async def test_an_advertise_flood_closes_that_link_and_costs_nobody_their_traffic(
        tmp_path, names):
    """The probe sends ADVERTISEs with a new port each as fast as the hub reads them while h1
    pings h2 through the hub: the hub closes the probe's link after MAX_ADVERTISES of them
    (`advertise_flood`), every ping is answered, and h1 is no longer told about the probe."""
    lab = Lab(tmp_path, names, probe=("flood", "3", "10.201.1.1"))
    await lab.start()
    try:
        result = await trio.run_process(
            ["ip", "netns", "exec", names["h1"], "ping", "-n", "-i", "0.1", "-c", "30", "-W",
             "1", TAP_IP[2]], capture_stdout=True, check=False)
        assert b" 0% packet loss" in result.stdout, result.stdout
        hub = await lab.hub.status()
        assert hub["tunnel"]["links_ended"].get("protocol_error") == 1
        assert "advertise_flood" in lab.hub.log_path.read_text()
        assert "probe" not in await lab.introduced(1)
        assert lab.hosts[1].process.poll() is None and lab.hub.process.poll() is None
    finally:
        await lab.stop()
