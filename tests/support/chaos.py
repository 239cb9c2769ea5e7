"""The kill loop: a hub, two TAP hosts and a QEMU guest under traffic, and one of the hub, an
endpoint or QEMU killed with SIGKILL and restarted, round after round.  Used by the slow test
(a few rounds) and by bench/kill_loop.py (a hundred of each).

Topology (network namespaces from tests.support.netns):
    h1: `vhostvpn host --tap` 10.77.0.11 ─┐
    h2: `vhostvpn host --tap` 10.77.0.12 ─┼─ TLS ─ hub namespace: `vhostvpn hub` (DHCP, gateway)
                                          └─────── guest "g" on the hub's vhost-user socket (DHCP)

A round: kill -9 the victim, start it again (a new QEMU boots the same guest: same MAC, same
lease), then ping from h1 until h2 and the guest both answer; the round's time is from the
kill (for QEMU: from the new guest's boot) to the first round trip that worked.  All along, h1
streams pseudo-random bytes to h2 over one TCP connection at a fixed rate; at the end both ends'
sha256 and byte counts must agree: a transfer that spans every kill arrives intact.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.support.guest import Guest
from tests.support.hub import VhostvpnProcess
from tests.support.netns import answers_ping
from tunnel.keys import keygen

HUB_PORT = 7777
STREAM_PORT = 5003
STREAM_RATE = 1 << 20  # bytes per second through the whole loop
ROUND_DEADLINE = 60.0  # a round that is not back by then fails the loop

# Runs in h2: one connection, hashed until EOF; digest and length to a JSON file.
_RECEIVER = """
import hashlib, json, socket, sys
out = sys.argv[1]
server = socket.create_server(("10.77.0.12", {port}))
conn, _ = server.accept()
digest, length = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    digest.update(chunk)
    length += len(chunk)
json.dump({{"sha256": digest.hexdigest(), "bytes": length}}, open(out, "w"))
"""

# Runs in h1: sends at `rate` until the stop file exists, then says what it sent.
_SENDER = """
import hashlib, json, os, random, socket, sys, time
out, stop, rate = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng, digest, length = random.Random(1), hashlib.sha256(), 0
conn = socket.create_connection(("10.77.0.12", {port}))
started = time.monotonic()
while not os.path.exists(stop):
    chunk = rng.randbytes(1 << 14)
    conn.sendall(chunk)
    digest.update(chunk)
    length += len(chunk)
    ahead = length / rate - (time.monotonic() - started)
    if ahead > 0:
        time.sleep(ahead)
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
json.dump({{"sha256": digest.hexdigest(), "bytes": length}}, open(out, "w"))
"""


@dataclass
class Round:
    victim: str
    seconds: float  # kill (QEMU: new boot) -> traffic back


@dataclass
class LoopResult:
    rounds: list[Round] = field(default_factory=list)
    stream_bytes: int = 0
    stream_intact: bool = False

    def worst(self, victim: str) -> float:
        return max((r.seconds for r in self.rounds if r.victim == victim), default=0.0)


class KillLoop:
    """The topology above; `run` is the kill loop, `start`/`stop` let bench/soak.py use the
    same processes for other work."""

    def __init__(self, workdir: Path, namespaces: dict[str, str],
                 extra_hub_sockets: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.ns = namespaces
        hub_fp = keygen(workdir / "hub-id")
        (workdir / "peers").write_text(
            "".join(f"{n} {keygen(workdir / f'{n}-id')}\n" for n in ("h1", "h2")))
        self.hub = VhostvpnProcess(workdir, "hub", ["g.sock", *extra_hub_sockets], [
            "--listen", f"0.0.0.0:{HUB_PORT}", "--identity", str(workdir / "hub-id"),
            "--peers", str(workdir / "peers"), "--subnet", "10.77.0.0/24",
            "--state-dir", str(workdir / "state")], "hub",
            prefix=["ip", "netns", "exec", namespaces["hub"]])
        self.hosts = {
            name: VhostvpnProcess(workdir, "host", [], [
                "--tap", "vv0", "--address", f"10.77.0.1{n}/24",
                "--hub", f"10.201.{n}.1:{HUB_PORT}", "--identity", str(workdir / f"{name}-id"),
                "--hub-fingerprint", hub_fp, "--name", name, "--log-level", "info"], name,
                prefix=["ip", "netns", "exec", namespaces[name]])
            for n, name in ((1, "h1"), (2, "h2"))}
        self.guest: Guest | None = None
        self.guest_ip = ""
        self.guest_boots = 0

    async def reboot_guest(self, nursery: trio.Nursery) -> None:
        """QEMU stopped and started again: a new vhost-user connection, the same lease."""
        assert self.guest is not None
        await self.guest.stop()
        await self._boot_guest(nursery)

    async def _boot_guest(self, nursery: trio.Nursery) -> None:
        self.guest_boots += 1
        guest = Guest("g", socket=Path(self.hub.socket("g.sock")), dhcp=True, stay=True,
                      log_dir=self.workdir / f"guest-{self.guest_boots}")
        await guest.start(nursery)
        self.guest = guest
        boot = await guest.wait_booted()
        assert boot.ip is not None, "the guest got no DHCP lease"
        self.guest_ip = boot.ip.split("/")[0]

    async def _traffic_back(self, started: float) -> float:
        """Ping h2 and the guest from h1 until both answer; seconds since `started`."""
        with trio.fail_after(ROUND_DEADLINE):
            for target in ("10.77.0.12", self.guest_ip):
                while not await answers_ping(self.ns["h1"], target, wait=0.5):
                    await trio.sleep(0.05)
        return trio.current_time() - started

    async def start(self, nursery: trio.Nursery) -> None:
        """The hub, both hosts and the guest, up and answering pings from h1."""
        await self.hub.start()
        for host in self.hosts.values():
            await host.start()
        await self._boot_guest(nursery)
        await self._traffic_back(trio.current_time())

    async def stop(self) -> None:
        if self.guest is not None:
            await self.guest.stop()
        for host in self.hosts.values():
            await host.stop()
        await self.hub.stop()

    async def run(self, rounds: int, victims: tuple[str, ...] = ("hub", "h1", "h2", "qemu"),
                  on_round=None) -> LoopResult:
        result = LoopResult()
        stop_file = self.workdir / "stop-stream"
        sent_file, received_file = self.workdir / "sent.json", self.workdir / "received.json"
        async with trio.open_nursery() as nursery:
            try:
                await self.start(nursery)
                receiver = await trio.lowlevel.open_process(
                    ["ip", "netns", "exec", self.ns["h2"], sys.executable, "-c",
                     _RECEIVER.format(port=STREAM_PORT), str(received_file)])
                await trio.sleep(0.5)
                sender = await trio.lowlevel.open_process(
                    ["ip", "netns", "exec", self.ns["h1"], sys.executable, "-c",
                     _SENDER.format(port=STREAM_PORT), str(sent_file), str(stop_file),
                     str(STREAM_RATE)])
                for index in range(rounds):
                    victim = victims[index % len(victims)]
                    seconds = await self._round(victim, nursery)
                    result.rounds.append(Round(victim, seconds))
                    if on_round is not None:
                        on_round(index, victim, seconds)
                stop_file.write_text("")
                with trio.fail_after(ROUND_DEADLINE):
                    await sender.wait()
                    await receiver.wait()
                sent = json.loads(sent_file.read_text())
                received = json.loads(received_file.read_text())
                result.stream_bytes = received["bytes"]
                result.stream_intact = sent == received
            finally:
                await self.stop()
                nursery.cancel_scope.cancel()
        return result

    async def _round(self, victim: str, nursery: trio.Nursery) -> float:
        if victim == "qemu":
            assert self.guest is not None and self.guest.process is not None
            self.guest.process.send_signal(signal.SIGKILL)
            await self.reboot_guest(nursery)
            return await self._traffic_back(trio.current_time())
        process = self.hub if victim == "hub" else self.hosts[victim]
        started = trio.current_time()
        await process.kill()
        await process.start()
        return await self._traffic_back(started)
