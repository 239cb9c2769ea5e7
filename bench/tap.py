"""Throughput of TAP devices with virtio-net headers through the Python switch.

Two network namespaces, each with one TAP whose fd this process holds:

    iperf3 -c (ns A, 10.98.0.1) ─ tapA ═ TunTapDevice ─ Switch ─ TunTapDevice ═ tapB ─ iperf3 -s
                                                                            (ns B, 10.98.0.2)

Every frame is read from one TAP (tunnel.host.tuntap.read_batch), switched (netstack.switch) and
written to the other (write_batch): the path a host endpoint's frames take.  Scenarios:
  tcp        one TCP stream, offloads on: the kernel hands us 64 KiB TSO frames
  tcp-mtu    the same with offloads off: 1514-byte frames, checksummed by the kernel
  udp64      UDP with 18-byte payloads: 60-byte frames (64 on a wire with FCS), as fast as
             iperf3 sends; the relay's rate is frames per second, the rest is lost
  write64    no iperf3: this process writes 64-byte frames into tapA as fast as it can
Run (root): .venv/bin/python bench/tap.py [--seconds 5] [--scenario tcp ...]
Prints one JSON line per scenario and saves them in bench/results/tap-<time>.json.  This
machine has 2 CPUs: iperf3's client, its server and the relay share them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netstack.frame import Frame, Offload  # noqa: E402
from netstack.switch import Switch  # noqa: E402
from tunnel.cli.launch import tune_gc  # noqa: E402
from tunnel.host.hostnet import HostNetwork  # noqa: E402
from tunnel.host.tuntap import (  # noqa: E402
    WANTED_OFFLOADS,
    TapPort,
    TunTapDevice,
    describe,
    run_device,
)

NS_A, NS_B = f"vvbenchA{os.getpid()}", f"vvbenchB{os.getpid()}"
IP_A, IP_B = "10.98.0.1", "10.98.0.2"
MTU = 1500
SCENARIOS = ("tcp", "tcp-mtu", "udp64", "write64")
UDP_PAYLOAD = 18  # 14 Ethernet + 20 IP + 8 UDP + 18 = 60 bytes (64 with the FCS)
WRITE_FRAME = 64


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _open(netns: str, address: str, offloads: Offload) -> tuple[TunTapDevice, HostNetwork]:
    device = TunTapDevice.open("vvbench%d", "tap", offloads)
    _ip("link", "set", device.name, "netns", netns)
    net = HostNetwork(netns)
    net.set_up(device.name, MTU)
    net.add_address(device.name, ipaddress.ip_interface(f"{address}/24"))
    return device, net


async def _iperf(scenario: str, seconds: float) -> dict:
    server = await trio.lowlevel.open_process(
        ["ip", "netns", "exec", NS_B, "iperf3", "-s", "-1", "-B", IP_B],
        stdout=subprocess.DEVNULL,
    )
    try:
        await trio.sleep(0.3)
        command = ["ip", "netns", "exec", NS_A, "iperf3", "-c", IP_B, "-t", str(seconds), "-J"]
        if scenario == "udp64":
            command += ["-u", "-b", "0", "-l", str(UDP_PAYLOAD)]
        result = await trio.run_process(command, capture_stdout=True, check=False)
        report = json.loads(result.stdout)
    finally:
        server.kill()
        await server.wait()
    end = report.get("end", {})
    if scenario == "udp64":
        total = end.get("sum", {})
        return {
            "iperf_sent_packets": total.get("packets"),
            "iperf_lost_percent": round(total.get("lost_percent", 0.0), 1),
            "iperf_received_mbps": round(
                total.get("bits_per_second", 0) * (1 - total.get("lost_percent", 0) / 100) / 1e6, 1
            ),
        }
    return {"iperf_received_gbps": round(end["sum_received"]["bits_per_second"] / 1e9, 3)}


def _counts(devices: list[TunTapDevice]) -> tuple[int, int, int, int]:
    return (
        sum(d.counters.read_frames for d in devices),
        sum(d.counters.read_bytes for d in devices),
        sum(d.counters.written_frames for d in devices),
        sum(d.counters.written_bytes for d in devices),
    )


async def _relay(scenario: str, seconds: float) -> dict:
    offloads = Offload.NONE if scenario == "tcp-mtu" else WANTED_OFFLOADS
    opened: list[tuple[TunTapDevice, HostNetwork]] = []
    try:
        opened.append(_open(NS_A, IP_A, offloads))
        opened.append(_open(NS_B, IP_B, offloads))
        devices = [device for device, _ in opened]
        result: dict = {"scenario": scenario, "offloads": describe(devices[0].offloads)}
        if scenario == "write64":
            result.update(_write_only(devices[0], seconds))
            return result
        switch = Switch()
        async with trio.open_nursery() as nursery:
            for device in devices:
                port = TapPort(device.name, device)
                switch.attach(port)
                nursery.start_soon(run_device, device, port, switch.forward)
            before, started = _counts(devices), time.perf_counter()
            result.update(await _iperf(scenario, seconds))
            after, elapsed = _counts(devices), time.perf_counter() - started
            nursery.cancel_scope.cancel()
        read_frames, _read_bytes, written_frames, written_bytes = (
            a - b for a, b in zip(after, before, strict=True)
        )
        result.update(
            seconds=round(elapsed, 2),
            read_frames_per_s=round(read_frames / elapsed),
            written_frames_per_s=round(written_frames / elapsed),
            written_gbps=round(written_bytes * 8 / elapsed / 1e9, 3),
            mean_frame_bytes=round(written_bytes / max(written_frames, 1)),
            errors=[dict(d.counters.errors) for d in devices],
        )
        return result
    finally:
        for device, net in opened:
            net.undo()
            device.close()


def _write_only(device: TunTapDevice, seconds: float) -> dict:
    """64-byte frames to a MAC nobody has: the kernel drops them right after the write."""
    frame = Frame(bytes.fromhex("02000000000902000000000888b5") + bytes(WRITE_FRAME - 14))
    batch = [frame] * 64
    written = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            written += device.write_batch(batch)
    elapsed = time.perf_counter() - started
    return {
        "seconds": round(elapsed, 2),
        "written_frames_per_s": round(written / elapsed),
        "written_gbps": round(written * WRITE_FRAME * 8 / elapsed / 1e9, 3),
        "ns_per_frame": round(elapsed / written * 1e9),
        "errors": dict(device.counters.errors),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    args = parser.parse_args()
    tune_gc()
    results = []
    for name in (NS_A, NS_B):
        _ip("netns", "add", name)
    try:
        for scenario in args.scenario or SCENARIOS:
            result = trio.run(_relay, scenario, args.seconds)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        for name in (NS_A, NS_B):
            subprocess.run(["ip", "netns", "del", name], check=False)
    out = ROOT / "bench" / "results" / time.strftime("tap-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"saved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
