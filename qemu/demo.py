"""The demo behind `make demo`: a `vhostvpn hub` with its gateway (DHCP, router
advertisements) and a TLS listener; two `vhostvpn vm` endpoints join it with their own keys,
each serving one QEMU guest.  The guests get addresses from the hub, ping each other and run
iperf3 across both tunnels; then the status of the hub and of one endpoint is shown and
everything is torn down.  Uses the test harness (tests/support) to drive the guests over their
serial consoles; logs land in a temporary folder that is printed at the end.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.guest import Guest, ensure_image, wait_all_booted  # noqa: E402
from tests.support.hub import endpoint_process, free_tcp_port, hub_process  # noqa: E402
from tunnel.cli import format_status  # noqa: E402
from tunnel.keys import keygen  # noqa: E402


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


async def demo(workdir: Path) -> None:
    say("keys: vhostvpn keygen for the hub and two endpoints")
    hub_fp = keygen(workdir / "hub-id")
    lines = []
    for name in ("alice", "bob"):
        fingerprint = keygen(workdir / f"{name}-id")
        lines.append(f"{name} {fingerprint}")
        print(f"{name}: {fingerprint}")
    (workdir / "peers").write_text("\n".join(lines) + "\n")
    port = free_tcp_port()
    hub_args = ["--listen", f"127.0.0.1:{port}", "--identity", str(workdir / "hub-id"),
                "--peers", str(workdir / "peers"), "--subnet", "10.77.0.0/24",
                "--ipv6-prefix", "fd77::/64", "--state-dir", str(workdir / "state")]

    def vm_args(name: str) -> list[str]:
        return ["--hub", f"127.0.0.1:{port}", "--identity", str(workdir / f"{name}-id"),
                "--hub-fingerprint", hub_fp]

    say(f"vhostvpn hub on 127.0.0.1:{port} (10.77.0.0/24, fd77::/64) and two endpoints")
    async with hub_process(workdir, [], hub_args) as hub, \
            endpoint_process(workdir, "alice", ["vm1.sock"], vm_args("alice")) as alice, \
            endpoint_process(workdir, "bob", ["vm2.sock"], vm_args("bob")) as bob:
        vm1 = Guest("vm1", socket=Path(alice.socket("vm1.sock")), dhcp=True, stay=True,
                    log_dir=workdir)
        vm2 = Guest("vm2", socket=Path(bob.socket("vm2.sock")), dhcp=True, stay=True,
                    log_dir=workdir)
        say("booting two QEMU guests (virtio-net over vhost-user), one behind each endpoint")
        async with vm1, vm2:
            boots = await wait_all_booted([vm1, vm2])
            for guest, boot in zip((vm1, vm2), boots, strict=True):
                print(f"{guest.name}: DHCP gave {boot.ip}, eth0 up after {boot.uptime:.1f} s")
            ip1, ip2 = (boot.ip.split("/")[0] for boot in boots)
            say(f"vm1$ ping -c 3 {ip2}")
            print(await vm1.check(f"ping -c 3 {ip2}"))
            say("vm2$ ping -6 -c 2 fd77::1   (the hub's IPv6 router address, SLAAC)")
            print(await vm2.check("ping -6 -c 2 -W 2 fd77::1", timeout=30))
            say(f"vm2$ iperf3 -c {ip1} -t 5   (vm1 runs iperf3 -s)")
            await vm1.check("iperf3 -s -D -1 >/dev/null 2>&1")
            await trio.sleep(0.5)
            out = await vm2.check(f"iperf3 -c {ip1} -t 5 -f m", timeout=60)
            print("\n".join(line for line in out.splitlines()
                            if re.search(r"sender|receiver", line)))
            say("vhostvpn status (hub)")
            print(format_status(await hub.status()))
            say("vhostvpn status (endpoint alice)")
            print(format_status(await alice.status()))
    say(f"done; logs in {workdir}")


def main() -> int:
    ensure_image()
    workdir = Path(tempfile.mkdtemp(prefix="vhostvpn-demo-"))
    trio.run(demo, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
