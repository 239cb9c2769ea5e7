"""The NAT's TCP speed: Linux's TCP as the guest (a namespace behind a TUN device this process
holds) through NatShell to an iperf3 server in an "outside" namespace joined to the hub's by a
veth, as `vhostvpn hub --nat` carries a guest's flow.  Guest -> outside and outside -> guest
Gbit/s, and this process's CPU seconds per GB (the NAT, its sockets and the TUN pump).

Frames toward the guest go through `netstack.offload.adapt` for what the TUN accepts, as the
switch does for a guest port: `--guest-offload none` makes the NAT's TSO frames (if it builds
them) segmented in software like for a guest without TSO; `tso` hands them to the kernel
whole and lets the kernel send us its own 64 KiB segments (TUN TSO4/TSO6 + CSUM).

Run (root): .venv/bin/python bench/nat.py [--seconds 5] [--rounds 3]
            [--guest-offload none,tso] [--direction up,down] [--variants all]
            [--gateway-accepts none,tso] [--loss 0.01] [--profile FILE]
            [--loops dataloop,trio]
`--variants` switches the shell's speed-ups off for A/B runs: `batch` hands the TUN's batch
to `from_guests` (one write per socket, one ACK per connection per batch; without it each
frame goes to `from_guest` alone), `tso` lets the NAT build TSO frames toward the guest
(NatConfig.tso); `plain` is neither, `all` both.  `--gateway-accepts none` cuts the guest's
frames in software before the NAT sees them, as the switch did while the gateway port took
no TSO (`plain` with it is the NAT before this work).  `--loss P` drops that share of the frames
each way (seeded; tests/support/tun_kernel.Impairment), to see what SACK could earn.
Rounds interleave the configurations; medians are printed, all samples in JSON on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ipaddress
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netstack.frame import ETH_HEADER_LEN, HDR_F_NEEDS_CSUM, Frame, Offload  # noqa: E402
from netstack.nat.packet import NatConfig  # noqa: E402
from netstack.offload import adapt  # noqa: E402
from tests.support.nat_netns import hub_and_outside, inside  # noqa: E402
from tests.support.tun_kernel import Impairment, kernel_behind_tun, run  # noqa: E402
from tunnel.nat import NatShell  # noqa: E402
from virtio import dataloop  # noqa: E402

GW_MAC = bytes.fromhex("02000000aa01")
GUEST_MAC = bytes.fromhex("02000000bb01")
OUT4 = "10.203.9.2"
GATEWAY4 = "10.203.0.2"
IPERF_PORT = 5301
OFFLOADS = {"none": Offload.NONE, "tso": Offload.CSUM | Offload.TSO4 | Offload.TSO6}
# An Ethernet header from the guest to the gateway, by IP version nibble.
ETHER = {4: GW_MAC + GUEST_MAC + b"\x08\x00",
         6: GW_MAC + GUEST_MAC + b"\x86\xdd"}


def _behind_ethernet(offload: tuple) -> tuple:
    """A TUN frame's offload metadata once an Ethernet header is put in front of it."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = offload
    if not flags & HDR_F_NEEDS_CSUM:
        return offload
    return (flags, gso_type, hdr_len + ETH_HEADER_LEN if hdr_len else 0, gso_size,
            csum_start + ETH_HEADER_LEN, csum_offset)


VARIANTS = {"plain": (False, False), "batch": (True, False), "tso": (False, True),
            "all": (True, True)}


def one_run(direction: str, offload: str, variant: str, seconds: float,
            profile: cProfile.Profile | None, loss: float = 0.0,
            gateway: str = "tso", loop: str = "dataloop") -> dict[str, object]:
    """One iperf3 stream through a fresh NatShell; its Gbit/s and our CPU per GB."""
    accepts = OFFLOADS[offload]
    with hub_and_outside(n=9) as names, kernel_behind_tun(accepts) as (dev, ns):
        run("ip", "-n", ns, "route", "add", "default", "dev", dev.name)
        server = subprocess.Popen(["ip", "netns", "exec", names["outside"], "iperf3", "-s",
                                   "-1", "-B", OUT4, "-p", str(IPERF_PORT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result: dict[str, object] = {}
        try:
            time.sleep(0.3)
            with inside(names["hub"]):
                (dataloop.run if loop == "dataloop" else trio.run)(
                    _pump, dev, ns, accepts, VARIANTS[variant], direction, seconds, profile,
                    result, loss, OFFLOADS[gateway])
                result["variant"] = variant
                result["loop"] = loop
                result["gateway_accepts"] = gateway
        finally:
            server.kill()
            server.wait()
    return result


async def _pump(dev, ns: str, accepts: Offload, variant: tuple[bool, bool], direction: str,
                seconds: float, profile: cProfile.Profile | None, result: dict,
                loss: float, gateway: Offload) -> None:
    batched, tso = variant
    config = NatConfig(GW_MAC, frozenset({ipaddress.ip_address(GATEWAY4).packed}),
                       mtu=1500, tso=tso)
    queue: list[Frame] = []
    unwritten: list[Frame] = []  # what the TUN did not take at once, in order
    ready = trio.Event()
    rng = random.Random(1)
    to_guest, from_guest = Impairment(rng, loss, 0, 0), Impairment(rng, loss, 0, 0)

    def deliver(frames: list[Frame]) -> None:
        """To the guest's TUN at once, as a TAP port's `on_ready` does; what the device
        does not take waits for to_kernel."""
        was_empty = not queue
        for frame in frames:
            queue.extend(f for f in adapt(frame, accepts) if not loss or to_guest(b""))
        if was_empty and queue and not unwritten:
            batch = [Frame(memoryview(f.data)[14:], f.offload) for f in queue]
            queue.clear()
            del batch[:dev.write_batch(batch)]
            if batch:
                unwritten.extend(batch)
                ready.set()

    shell = NatShell(config, deliver, upstreams=[ipaddress.ip_address("127.0.0.1")])

    def from_kernel() -> bool:
        frames = [piece for f in dev.read_batch() if not loss or from_guest(b"")
                  for piece in adapt(Frame(ETHER[f.data[0] >> 4] + bytes(f.data),
                                           _behind_ethernet(f.offload)), gateway)]
        if batched:
            shell.from_guests(frames)
        else:
            for frame in frames:
                shell.from_guest(frame)
        return False

    async def to_kernel() -> None:
        nonlocal ready
        while True:
            await ready.wait()
            ready = trio.Event()
            while queue or unwritten:
                batch = [*unwritten, *(Frame(memoryview(f.data)[14:], f.offload)
                                       for f in queue)]
                queue.clear()
                unwritten.clear()
                while batch:
                    del batch[:dev.write_batch(batch)]
                    if batch:
                        await dev.wait_writable()

    async with trio.open_nursery() as nursery:
        await nursery.start(shell.run)
        nursery.start_soon(dataloop.serve_readable, dev.fd, from_kernel)
        nursery.start_soon(to_kernel)
        args = ["ip", "netns", "exec", ns, "iperf3", "-c", OUT4, "-p", str(IPERF_PORT),
                "-t", str(seconds), "-J", *(["-R"] if direction == "down" else [])]
        cpu0, wall0 = time.process_time(), time.monotonic()
        if profile is not None:
            profile.enable()
        with trio.fail_after(seconds + 20):
            done = await trio.run_process(args, capture_stdout=True, check=False)
        if profile is not None:
            profile.disable()
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        report = json.loads(done.stdout or b"{}")
        end = report.get("end", {})
        received = end.get("sum_received", {})
        nbytes = received.get("bytes", 0)
        result.update(direction=direction, guest_offload=str(accepts), seconds=wall, loss=loss,
                      gbit=received.get("bits_per_second", 0) / 1e9, bytes=nbytes,
                      cpu_seconds=cpu, cpu_s_per_gb=cpu / (nbytes / 1e9) if nbytes else None,
                      error=report.get("error"), tcp=shell.status()["tcp"],
                      recovery=_recovery(shell))
        nursery.cancel_scope.cancel()


def _recovery(shell: NatShell) -> dict[str, int]:
    """The data connection's loss-recovery counters (the largest flow: iperf3's data)."""
    flows = sorted(shell.tcp.flows.values(), key=lambda f: f.conn.counters.segments_in +
                   f.conn.counters.segments_out)
    if not flows:
        return {}
    counters = flows[-1].conn.counters.as_dict()
    return {name: counters[name] for name in ("segments_in", "segments_out", "retransmits",
                                              "fast_retransmits", "timeouts", "dup_acks",
                                              "ooo_queued", "ooo_dropped", "dup_segments")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guest-offload", default="none,tso")
    parser.add_argument("--direction", default="up,down")
    parser.add_argument("--variants", default="all")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--gateway-accepts", default="tso")
    parser.add_argument("--loops", default="dataloop",
                        help="dataloop (the daemons' loop, virtio/dataloop.py), trio (every "
                        "fd waited on by a Trio task), or both for an A/B")
    parser.add_argument("--profile", help="write cProfile stats of the transfers here")
    args = parser.parse_args()
    profile = cProfile.Profile() if args.profile else None
    configs = [(d, o, v, g, lp) for lp in args.loops.split(",")
               for v in args.variants.split(",")
               for g in args.gateway_accepts.split(",") for o in args.guest_offload.split(",")
               for d in args.direction.split(",")]
    samples: dict[tuple[str, str, str, str, str], list[dict]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for direction, offload, variant, gateway, loop in configs:
            sample = one_run(direction, offload, variant, args.seconds, profile, args.loss,
                             gateway, loop)
            samples[(direction, offload, variant, gateway, loop)].append(sample)
            print(f"{direction:4} guest-offload={offload:4} {variant:5} gw={gateway:4} {loop:8} "
                  f"{sample['gbit']:.3f} "
                  f"Gbit/s cpu {sample['cpu_s_per_gb'] or 0:.2f} s/GB "
                  f"{sample.get('error') or ''}", file=sys.stderr, flush=True)
    summary = []
    for (direction, offload, variant, gateway, loop), runs in samples.items():
        summary.append({"direction": direction, "guest_offload": offload, "variant": variant,
                        "gateway_accepts": gateway, "loop": loop,
                        "gbit_median": statistics.median(r["gbit"] for r in runs),
                        "cpu_s_per_gb_median": statistics.median(
                            r["cpu_s_per_gb"] or 0 for r in runs),
                        "runs": runs})
        print(f"median {direction:4} guest-offload={offload:4} {variant:5} gw={gateway:4} "
              f"{loop:8} "
              f"{summary[-1]['gbit_median']:.3f} Gbit/s "
              f"{summary[-1]['cpu_s_per_gb_median']:.2f} CPU s/GB", file=sys.stderr)
    if profile is not None:
        profile.dump_stats(args.profile)
    json.dump(summary, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
