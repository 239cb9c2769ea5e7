"""Direct paths between real processes in network namespaces: a hub and two `vhostvpn host
--tap` endpoints with --listen, each host also on a veth of its own to the other (the "LAN"
the direct sessions use).  Pings and an iperf3 stream go direct and the hub's counters show
the stream did not cross it; killing the session (`ss -K`) or taking the listen address away
sends the pings through the hub within about a second, and the direct path comes back;
`hub --no-direct` keeps everything relayed; strangers on --listen (an unknown key, a reset
handshake, silence, a giant record) are refused and the session stays up; an introduced
peer spoofing over its direct session is dropped and counted; a peer removed from the hub's
peers file (SIGHUP) loses its direct sessions; when the side that dials first cannot reach
the other (a firewall in its namespace), the other dials and the pair still goes direct."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.hub import TunnelKeys, VhostvpnProcess
from tests.support.netns import hub_and_hosts, ip, run_in

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun")
                       or shutil.which("ip") is None or shutil.which("iperf3") is None,
                       reason="needs root, /dev/net/tun, iproute2 and iperf3"),
]

HUB_PORT = 7777
DIRECT_PORT = 7100
TAP_IP = {1: "10.77.0.11", 2: "10.77.0.12"}
LAN_IP = {1: "10.202.0.1", 2: "10.202.0.2"}


class Lab:
    def __init__(self, tmp_path: Path, names: dict[str, str], lan: dict[int, str],
                 hub_extra: tuple[str, ...] = ()) -> None:
        self.tmp = tmp_path
        self.names = names
        self.lan = lan  # the direct veth's name in each host
        self.keys = TunnelKeys(tmp_path, ("h1", "h2"), port=HUB_PORT)
        self.hub = VhostvpnProcess(tmp_path, "hub", [], self.keys.hub_args(
            "--subnet", "10.77.0.0/24", *hub_extra, listen="0.0.0.0"), "hub",
            prefix=["ip", "netns", "exec", names["hub"]])
        self.hosts = {n: VhostvpnProcess(
            tmp_path, "host", [], self.keys.vm_args(
                f"h{n}", "--name", f"h{n}", "--tap", "vv0", "--address", f"{TAP_IP[n]}/24",
                "--address", f"fd77::1{n}/64",
                "--listen", f"{LAN_IP[n]}:{DIRECT_PORT}", hub=f"10.201.{n}.1"),
            f"h{n}", prefix=["ip", "netns", "exec", names[f"h{n}"]]) for n in (1, 2)}

    def ns(self, n: int) -> str:
        return self.names[f"h{n}"]

    async def start(self) -> None:
        await self.hub.start()
        for host in self.hosts.values():
            await host.start()
        for host in self.hosts.values():
            await host.session_up()

    async def stop(self) -> None:
        for host in self.hosts.values():
            await host.stop()
        await self.hub.stop()

    async def peer(self, n: int) -> dict | None:
        """Host n's view of its one introduced peer (None before an introduction)."""
        peers = (await self.hosts[n].status())["direct"]["peers"]
        return peers[0] if peers else None

    async def wait_path(self, path: str, seconds: float = 10.0) -> float:
        """Until both hosts see the other on `path` (direct/relayed); how long it took."""
        started = trio.current_time()
        with trio.fail_after(seconds):
            while True:
                views = [await self.peer(n) for n in (1, 2)]
                if all(v is not None and v["path"] == path for v in views):
                    return trio.current_time() - started
                await trio.sleep(0.05)

    async def hub_bytes(self) -> int:
        """Bytes the hub's switch moved for the two sessions, both ways."""
        ports = (await self.hub.status())["ports"]
        return sum(p["in_bytes"] + p["out_bytes"] for p in ports if p["name"] in ("h1", "h2"))

    async def pings_during(self, action, count: int = 40, interval: float = 0.1) -> int:
        """Run `action` one second into `count` pings h1 -> h2; how many were answered."""
        with open(self.tmp / "ping.out", "wb") as out:
            ping = await trio.lowlevel.open_process(
                ["ip", "netns", "exec", self.ns(1), "ping", "-n", "-i", str(interval), "-c",
                 str(count), "-W", "1", TAP_IP[2]], stdout=out)
        await trio.sleep(1.0)
        await action()
        with trio.fail_after(count * interval + 10):
            await ping.wait()
        out = (self.tmp / "ping.out").read_text()
        return int(out.split(" received")[0].rsplit(" ", 1)[1])


@pytest.fixture
def names() -> Iterator[tuple[dict[str, str], dict[int, str]]]:
    """The hub's and two hosts' namespaces, plus a veth between the hosts (10.202.0.0/24)."""
    with hub_and_hosts(2) as names:
        tag = names["hub"][-6:]
        lan = {1: f"dira{tag}", 2: f"dirb{tag}"}
        ip("link", "add", lan[1], "netns", names["h1"], "type", "veth", "peer", "name",
           lan[2], "netns", names["h2"])
        for n in (1, 2):
            ip("-n", names[f"h{n}"], "addr", "add", f"{LAN_IP[n]}/24", "dev", lan[n])
            ip("-n", names[f"h{n}"], "link", "set", lan[n], "up")
        yield names, lan


@pytest.fixture
async def lab(tmp_path, names) -> Lab:
    lab = Lab(tmp_path, *names)
    await lab.start()
    try:
        yield lab
    finally:
        await lab.stop()


async def iperf3(lab: Lab, seconds: int = 2) -> int:
    """An iperf3 stream h1 -> h2 over the VPN for `seconds`; the bytes it moved."""
    with open(lab.tmp / "iperf-server.out", "wb") as out:
        server = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", lab.ns(2), "iperf3", "-s", "-1", "-B", TAP_IP[2]],
            stdout=out)
    try:
        await trio.sleep(0.5)
        out = await run_in(lab.ns(1), "timeout", str(seconds + 20), "iperf3", "-c", TAP_IP[2],
                           "-t", str(seconds), "-J")
    finally:
        with trio.move_on_after(5):
            await server.wait()
        if server.returncode is None:
            server.kill()
    return int(json.loads(out)["end"]["sum_received"]["bytes"])


async def test_pings_and_a_stream_go_direct_fall_back_within_a_second_and_come_back(lab):
    """(A killed session falling back and coming back: the next test, where the side that
    dials is the other one.)"""
    await lab.wait_path("direct")
    await run_in(lab.ns(1), "ping", "-c", "3", "-W", "2", TAP_IP[2])
    with trio.fail_after(10):  # IPv6 too, once the kernel's DAD is over
        while "tentative" in await run_in(lab.ns(1), "ip", "-6", "addr", "show", "dev", "vv0"):
            await trio.sleep(0.2)
    await run_in(lab.ns(1), "ping", "-6", "-c", "3", "-i", "0.5", "-W", "2", "fd77::12")
    sent_direct = (await lab.peer(1))["out_frames"]
    await run_in(lab.ns(1), "ping", "-6", "-c", "3", "-i", "0.5", "-W", "2", "fd77::12")
    assert (await lab.peer(1))["out_frames"] >= sent_direct + 3
    assert not (await lab.peer(2))["drops"]
    before = await lab.hub_bytes()
    moved = await iperf3(lab)
    crossed = await lab.hub_bytes() - before
    assert moved > 10 << 20
    assert crossed < moved // 100, (moved, crossed)  # the stream did not cross the hub
    view = await lab.peer(1)
    assert view["out_bytes"] + view["in_bytes"] >= moved // 2 and view["rtt_ms"] is not None

    # (the session killed under both hosts' feet: in the test after this one)
    # the listen address taken away: silence, noticed within about a second
    async def take_address() -> None:
        for n in (1, 2):
            await run_in(lab.ns(n), "ip", "addr", "del", f"{LAN_IP[n]}/24", "dev", lab.lan[n])
    before = await lab.hub_bytes()
    answered = await lab.pings_during(take_address)
    assert answered >= 40 - 15  # at most ~1.5 s of pings lost while the session dies
    assert await lab.hub_bytes() > before  # they went through the hub
    assert (await lab.peer(1))["path"] == "relayed"
    for n in (1, 2):
        await run_in(lab.ns(n), "ip", "addr", "add", f"{LAN_IP[n]}/24", "dev", lab.lan[n])
    assert await lab.wait_path("direct", 10.0) < 5.0


async def test_when_the_side_that_dials_first_cannot_reach_the_other_the_other_dials(
        tmp_path, names):
    """Both hosts listen, so the one whose key sorts lower dials first; a firewall in its
    namespace drops its connection attempts to the other's --listen (as a NAT would), while
    the other reaches it.  The pair still goes direct (the other side dialled), falls back to
    the hub when that session is killed, and is direct again."""
    from tunnel.keys import parse_fingerprint

    lab = Lab(tmp_path, *names)
    digests = dict(line.split() for line in lab.keys.peers.read_text().splitlines())
    low, high = sorted((1, 2), key=lambda n: parse_fingerprint(digests[f"h{n}"]))
    await run_in(lab.ns(low), "iptables", "-A", "OUTPUT", "-p", "tcp", "--syn", "-d",
                 LAN_IP[high], "--dport", str(DIRECT_PORT), "-j", "DROP")
    await lab.start()
    try:
        await lab.wait_path("direct", 15.0)
        high_view, low_view = await lab.peer(high), await lab.peer(low)
        assert high_view["dialled_by"] == "us" and low_view["dialled_by"] == "peer"
        assert low_view["failures"] >= 1  # its own dials go nowhere
        await run_in(lab.ns(1), "ping", "-c", "2", "-W", "2", TAP_IP[2])

        # the session killed under both hosts' feet: pings go through the hub at once
        async def kill_session() -> None:
            await run_in(lab.ns(high), "ss", "-K", "dst", LAN_IP[low])
        assert await lab.pings_during(kill_session) >= 38
        assert await lab.wait_path("direct", 10.0) < 5.0  # and the direct path is back
        assert (await lab.peer(high))["sessions"] >= 2
        assert (await lab.peer(high))["dialled_by"] == "us"
    finally:
        await lab.stop()


async def test_hub_no_direct_keeps_everything_relayed(tmp_path, names):
    lab = Lab(tmp_path, *names, hub_extra=("--no-direct",))
    await lab.start()
    try:
        await run_in(lab.ns(1), "ping", "-c", "3", "-W", "2", TAP_IP[2])
        before = await lab.hub_bytes()
        moved = await iperf3(lab, seconds=1)
        assert await lab.hub_bytes() - before >= moved
        for n in (1, 2):
            assert await lab.peer(n) is None
    finally:
        await lab.stop()


async def attack(lab: Lab, n: int, kind: str, *args: str) -> dict:
    out = await run_in(lab.ns(n), sys.executable, "-m", "tests.support.direct_attacks", kind,
                       LAN_IP[2], str(DIRECT_PORT), *args)
    return json.loads(out)


async def test_strangers_on_listen_are_refused_and_the_session_stays_up(lab, tmp_path):
    from tunnel.keys import keygen

    await lab.wait_path("direct")
    stranger_fp = keygen(tmp_path / "stranger-id")
    h2_fp = (await lab.hosts[2].status())["fingerprint"]
    async with trio.open_nursery() as nursery:
        results: dict[str, dict] = {}

        async def run(kind: str, *args: str) -> None:
            results[kind] = await attack(lab, 1, kind, *args)
        nursery.start_soon(run, "stranger", str(tmp_path / "stranger-id"), h2_fp)
        nursery.start_soon(run, "reset")
        nursery.start_soon(run, "silent")
        nursery.start_soon(run, "giant")
    assert results["stranger"]["closed"] and results["stranger"]["reason"] == "unknown_key"
    assert results["silent"]["closed"] and results["giant"]["closed"]
    refused = (await lab.hosts[2].status())["direct"]["refused"]
    assert refused.get("auth_unknown_key") == 1 and refused.get("silent") == 1
    assert any(k.startswith("protocol_") for k in refused), refused
    view = await lab.peer(2)
    assert view["path"] == "direct" and view["sessions"] == 1
    assert stranger_fp not in json.dumps(view)
    await run_in(lab.ns(1), "ping", "-c", "2", "-W", "2", TAP_IP[2])


async def test_an_introduced_peer_spoofing_over_its_direct_session_is_dropped_and_counted(lab):
    """h1's host sends from the hub gateway's MAC, and from the gateway's address: the hub
    drops the first of each (its policy), and once h1's endpoint sends them direct (its
    vouching is by time: it cannot know the hub refused them), h2 drops them too."""
    await lab.wait_path("direct")
    await run_in(lab.ns(1), "ping", "-c", "2", "-W", "2", "10.77.0.1")  # the gateway's MAC
    gateway_mac = next(m["mac"] for m in (await lab.hub.status())["macs"]
                       if m["port"] == "gateway")
    h1_mac = (await run_in(lab.ns(1), "cat", "/sys/class/net/vv0/address")).strip()
    h2_mac = (await run_in(lab.ns(2), "cat", "/sys/class/net/vv0/address")).strip()
    await run_in(lab.ns(1), sys.executable, "-c",
                 "from scapy.all import Ether, IP, ICMP, sendp;"
                 f"sendp([Ether(src={gateway_mac!r}, dst={h2_mac!r})"
                 f"/IP(src={TAP_IP[1]!r}, dst={TAP_IP[2]!r})/ICMP(),"
                 f"Ether(src={h1_mac!r}, dst={h2_mac!r})"
                 f"/IP(src='10.77.0.1', dst={TAP_IP[2]!r})/ICMP()], iface='vv0', verbose=0,"
                 "inter=0.1, count=15)")
    drops = (await lab.peer(2))["drops"]
    assert drops.get("mac_spoof", 0) >= 1 and drops.get("ip_spoof", 0) >= 1, drops
    hub_view = next(p for p in (await lab.hub.status())["ports"] if p["name"] == "h1")
    assert hub_view["drops"].get("mac_spoof") and hub_view["drops"].get("ip_spoof")
    await run_in(lab.ns(1), "ping", "-c", "2", "-W", "2", TAP_IP[2])  # h1 itself still fine


async def test_a_peer_removed_from_the_peers_file_loses_its_direct_sessions(lab):
    await lab.wait_path("direct")
    lines = lab.keys.peers.read_text().splitlines()
    lab.keys.peers.write_text("".join(f"{line}\n" for line in lines if
                                      not line.startswith("h1 ")))
    assert lab.hub.process is not None
    lab.hub.process.send_signal(signal.SIGHUP)
    with trio.fail_after(5):
        while await lab.peer(2) is not None:
            await trio.sleep(0.05)
    await trio.sleep(1.5)  # h1 still knows h2 and may dial it: refused
    assert (await lab.peer(1) or {}).get("path") != "direct"
    result = await trio.run_process(
        ["ip", "netns", "exec", lab.ns(1), "ping", "-c", "2", "-W", "1", TAP_IP[2]],
        check=False, capture_stdout=True)
    assert result.returncode != 0
