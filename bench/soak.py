"""The soak: an hour (by default) of mixed traffic and churn against real processes, with the
hub's and an endpoint's resident memory and open files sampled all along.  They must stay
flat: within ±5 % between the first quarter hour after warm-up and the last.

Topology: tests/support/chaos.py's (a hub in its namespace with DHCP and a guest on its socket,
TAP hosts h1 and h2 in theirs), plus a socket on the hub for a hostile guest.  A cycle
(CYCLE_SECONDS) runs, one after the other: iperf3 h1 -> h2 (TCP, bounded), a 4 MiB file
h2 -> h1 checked by sha256, a burst of strangers' connections (resets, silence, half TLS,
garbage), a hostile guest sending hostile frames on the hub's socket, then it sits quiet; every
4th cycle h2's endpoint restarts (SIGTERM, new session), every 6th the guest's QEMU restarts
(a new vhost-user connection, DHCP again).  h1 pings the guest all along.  Each process is
sampled every SAMPLE_SECONDS, and once per cycle at its quiet end: the flatness is judged on
those quiet samples, so whatever a burst holds for a moment does not count as growth.

Run (root, QEMU, iperf3, the guest image):
    .venv/bin/python bench/soak.py [--seconds 3600] [--out bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from tests.support.attacks import hostile_guest, open_files, rss
from tests.support.chaos import HUB_PORT, KillLoop
from tests.support.guest import ensure_image
from tests.support.netns import answers_ping, hub_and_hosts, run_in

CYCLE_SECONDS = 60.0
SAMPLE_SECONDS = 10.0
WARMUP_SECONDS = 300.0
WINDOW_SECONDS = 900.0  # compared: the first window after warm-up and the last
FLAT = 0.05
FILE_BYTES = 4 << 20


class Soak:
    def __init__(self, loop: KillLoop, namespaces: dict[str, str], workdir: Path) -> None:
        self.loop = loop
        self.ns = namespaces
        self.workdir = workdir
        self.samples: list[dict] = []
        self.quiet: list[dict] = []
        self.events: dict[str, int] = {"cycles": 0, "iperf_runs": 0, "files_intact": 0,
                                       "files_broken": 0, "stranger_connections": 0,
                                       "hostile_frames": 0, "endpoint_restarts": 0,
                                       "guest_restarts": 0, "pings": 0, "pings_answered": 0}
        self.started = 0.0

    def sample(self) -> dict:
        hub = self.loop.hub.process
        h1 = self.loop.hosts["h1"].process
        assert hub is not None and h1 is not None and hub.poll() is None, "the hub died"
        return {"t": round(trio.current_time() - self.started, 1),
                "hub_rss": rss(hub.pid), "hub_fds": open_files(hub.pid),
                "h1_rss": rss(h1.pid), "h1_fds": open_files(h1.pid)}

    async def sampler(self) -> None:
        while True:
            self.samples.append(self.sample())
            await trio.sleep(SAMPLE_SECONDS)

    async def pinger(self) -> None:
        while True:
            self.events["pings"] += 1
            if await answers_ping(self.ns["h1"], self.loop.guest_ip, wait=1.0):
                self.events["pings_answered"] += 1
            await trio.sleep(0.5)

    async def iperf(self) -> None:
        server = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", self.ns["h2"], "iperf3", "-s", "-1", "-B", "10.77.0.12"])
        await trio.sleep(0.5)
        await run_in(self.ns["h1"], "iperf3", "-c", "10.77.0.12", "-t", "10")
        with trio.fail_after(10):
            await server.wait()
        self.events["iperf_runs"] += 1

    async def file_h2_to_h1(self, cycle: int) -> None:
        data = os.urandom(FILE_BYTES)
        source = self.workdir / "soak-file"
        source.write_bytes(data)
        digest_file = self.workdir / f"soak-received-{cycle}"
        receiver = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", self.ns["h1"], sys.executable, "-c",
             "import socket,hashlib;s=socket.create_server(('10.77.0.11',5004));"
             "c,_=s.accept();h=hashlib.sha256()\n"
             "while (b:=c.recv(1<<16)): h.update(b)\n"
             f"open({str(digest_file)!r},'w').write(h.hexdigest())"])
        await trio.sleep(0.5)
        await run_in(self.ns["h2"], sys.executable, "-c",
                     "import socket;c=socket.create_connection(('10.77.0.11',5004));"
                     f"c.sendall(open({str(source)!r},'rb').read());c.close()")
        with trio.fail_after(30):
            await receiver.wait()
        intact = digest_file.read_text() == hashlib.sha256(data).hexdigest()
        self.events["files_intact" if intact else "files_broken"] += 1
        digest_file.unlink()

    async def cycle(self, number: int, nursery: trio.Nursery) -> None:
        cycle_end = trio.current_time() + CYCLE_SECONDS
        await self.iperf()
        await self.file_h2_to_h1(number)
        done = await run_stranger_burst(self.ns["hub"])
        self.events["stranger_connections"] += sum(done.values())
        self.events["hostile_frames"] += await hostile_guest(
            self.loop.hub.socket("evil.sock"), 5.0, number)
        if number % 4 == 3:
            await self.loop.hosts["h2"].stop()
            await self.loop.hosts["h2"].start()
            self.events["endpoint_restarts"] += 1
        if number % 6 == 5:
            await self.loop.reboot_guest(nursery)
            self.events["guest_restarts"] += 1
        await trio.sleep_until(max(cycle_end, trio.current_time() + 5))
        self.quiet.append(self.sample())
        self.events["cycles"] += 1

    async def run(self, seconds: float) -> None:
        async with trio.open_nursery() as nursery:
            try:
                await self.loop.start(nursery)
                self.started = trio.current_time()
                nursery.start_soon(self.sampler)
                nursery.start_soon(self.pinger)
                number = 0
                while trio.current_time() - self.started < seconds:
                    await self.cycle(number, nursery)
                    print(f"cycle {number}: {self.quiet[-1]} {self.events}", flush=True)
                    number += 1
            finally:  # whatever happened, nothing this run started outlives it
                with trio.CancelScope(shield=True):
                    await self.loop.stop()
                nursery.cancel_scope.cancel()


async def run_stranger_burst(hub_netns: str) -> dict[str, int]:
    """Strangers' connections for 3 s, from inside the hub's namespace (its loopback), in a
    child process so this process's own sockets and fds stay out of the samples."""
    script = ("import sys, json, trio; sys.path.insert(0, %r); "
              "from tests.support.attacks import strangers; "
              "print(json.dumps(trio.run(strangers, %d, 3.0)))")
    result = await trio.run_process(
        ["ip", "netns", "exec", hub_netns, sys.executable, "-c",
         script % (str(Path(__file__).resolve().parent.parent), HUB_PORT)],
        capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode())
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def flatness(quiet: list[dict], key: str) -> dict[str, float] | None:
    """Mean of `key` in the first window after warm-up and in the last window, and the
    change between them."""
    first = [s[key] for s in quiet if WARMUP_SECONDS <= s["t"] < WARMUP_SECONDS + WINDOW_SECONDS]
    end = quiet[-1]["t"] if quiet else 0.0
    last = [s[key] for s in quiet if s["t"] > end - WINDOW_SECONDS]
    if not first or not last or end < WARMUP_SECONDS + 2 * WINDOW_SECONDS:
        return None
    a, b = statistics.mean(first), statistics.mean(last)
    return {"first": round(a), "last": round(b), "change": round(b / a - 1, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()
    ensure_image()
    wall = time.time()
    with tempfile.TemporaryDirectory(prefix="vv-soak-") as workdir, \
            hub_and_hosts(2) as namespaces:
        loop = KillLoop(Path(workdir), namespaces, extra_hub_sockets=("evil.sock",))
        soak = Soak(loop, namespaces, Path(workdir))
        trio.run(soak.run, args.seconds)
    report = {"seconds": args.seconds, "wall_seconds": round(time.time() - wall),
              "events": soak.events,
              "flat": {key: flatness(soak.quiet, key)
                       for key in ("hub_rss", "hub_fds", "h1_rss", "h1_fds")},
              "quiet_samples": soak.quiet, "samples": soak.samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("seconds", "events", "flat")}, indent=1))
    verdicts = [v for v in report["flat"].values() if v is not None]
    if verdicts:
        worst = max(abs(v["change"]) for v in verdicts)
        print(f"worst change {worst:+.1%}: {'flat' if worst <= FLAT else 'NOT flat'} "
              f"(target ±{FLAT:.0%})")


if __name__ == "__main__":
    main()
