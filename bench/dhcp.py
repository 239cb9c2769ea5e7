"""What a DISCOVER costs the hub's DHCP server (netstack/gateway/dhcp_server.py) when the pool
is full.

A /16 pool leased out from a state file (65 533 running leases), then:
  exhausted   handle(DISCOVER) from a new MAC each time: nothing to offer (pool_exhausted);
  last free   the allocation alone (`LeaseTable.choose`) with one address free, the last of
              the pool;
  fresh pool  handle(DISCOVER) on an empty /16, for reference (parsing and the reply).
Numbers are microseconds per call, median of the runs, each bounded by --seconds.  Run it on
two trees to compare (the state file format is the same; a tree from before the DHCP server
was split into netstack/gateway/ needs its own copy of this script):
  PYTHONPATH=/path/to/tree .venv/bin/python bench/dhcp.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import dpkt

from netstack.gateway.dhcp_config import DhcpConfig
from netstack.gateway.dhcp_server import DhcpServer, parse_request
from netstack.gateway.dhcp_store import read_state

SUBNET = IPv4Network("10.80.0.0/16")
GATEWAY = IPv4Address("10.80.0.1")
SERVER_MAC = bytes.fromhex("02000000aa01")
NOW = 1_700_000_000.0


def discover(mac: bytes) -> bytes:
    options = [(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([dpkt.dhcp.DHCPDISCOVER]))]
    message = dpkt.dhcp.DHCP(op=dpkt.dhcp.DHCP_OP_REQUEST, chaddr=mac, xid=7, opts=options)
    udp = dpkt.udp.UDP(sport=68, dport=67, data=bytes(message))
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=bytes(4), dst=b"\xff" * 4, p=17, data=udp)
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=mac, type=0x0800, data=ip))


def client_mac(n: int) -> bytes:
    return (0x520000000000 + n).to_bytes(6, "big")


def leased_server(directory: Path, *, leave_last_free: bool) -> DhcpServer:
    hosts = list(SUBNET.hosts())[1:]
    if leave_last_free:
        hosts = hosts[:-1]
    state = directory / f"leases-{leave_last_free}.json"
    state.write_text(json.dumps({"version": 1, "leases": [
        {"mac": (0x020000000000 + n).to_bytes(6, "big").hex(":"), "ip": str(address),
         "expires": NOW + 3600, "hostname": None, "client_id": None}
        for n, address in enumerate(hosts)]}))
    config = DhcpConfig(subnet=SUBNET, gateway=GATEWAY, server_mac=SERVER_MAC, state_path=state)
    return DhcpServer(config, clock=lambda: NOW, stored=read_state(state))


def per_call(call, seconds: float, limit: int = 100_000) -> tuple[float, int]:
    """Median microseconds of `call(n)` over runs taking at most `seconds` in all."""
    times = []
    stop = time.perf_counter() + seconds
    while len(times) < limit and time.perf_counter() < stop:
        start = time.perf_counter()
        call(len(times))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    frames = [discover(client_mac(n)) for n in range(20_000)]
    with tempfile.TemporaryDirectory(prefix="bench-dhcp-") as directory:
        full = leased_server(Path(directory), leave_last_free=False)
        last_free = leased_server(Path(directory), leave_last_free=True)
    fresh = DhcpServer(DhcpConfig(subnet=SUBNET, gateway=GATEWAY, server_mac=SERVER_MAC),
                       clock=lambda: NOW)

    def exhausted(n: int) -> None:
        assert full.handle(frames[n % len(frames)]) == []

    requests = [parse_request(frame) for frame in frames[:1000]]

    def allocate(n: int) -> None:
        request = requests[n % len(requests)]
        assert last_free.table.choose(request.chaddr, request.client_id, request.requested_ip,
                                      NOW) is not None

    def offer(n: int) -> None:
        assert fresh.handle(frames[n % len(frames)])

    print(f"python {sys.version.split()[0]}, pool {SUBNET} ({len(full.leases)} leases)")
    for name, call in (("exhausted", exhausted), ("last free", allocate),
                       ("fresh pool", offer)):
        micros, runs = per_call(call, args.seconds)
        print(f"{name:12s} {micros:12.1f} us/call  ({runs} runs)")


if __name__ == "__main__":
    main()
