"""The demo behind `make demo`: a `vhostvpn hub` with two QEMU guests on its vhost-user
sockets; the guests ping each other and run iperf3 through the hub, then the hub's status is
shown and everything is torn down.  Uses the test harness (tests/support) to drive the guests
over their serial consoles; logs land in a temporary folder that is printed at the end.
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
from tests.support.hub import hub_process  # noqa: E402
from tunnel.cli import format_status  # noqa: E402


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


async def demo(workdir: Path) -> None:
    say("starting vhostvpn hub with sockets vm1.sock and vm2.sock")
    async with hub_process(workdir, ["vm1.sock", "vm2.sock"]) as hub:
        vm1 = Guest("vm1", socket=Path(hub.socket("vm1.sock")), ip="10.77.0.1/24",
                    ip6="fd77::1/64", stay=True, log_dir=workdir)
        vm2 = Guest("vm2", socket=Path(hub.socket("vm2.sock")), ip="10.77.0.2/24",
                    ip6="fd77::2/64", stay=True, log_dir=workdir)
        say("booting two QEMU guests (virtio-net over vhost-user)")
        async with vm1, vm2:
            for boot in await wait_all_booted([vm1, vm2]):
                print(f"booted: ip {boot.ip}, eth0 up after {boot.uptime:.1f} s")
            say("vm1$ ping -c 3 10.77.0.2")
            print(await vm1.check("ping -c 3 10.77.0.2"))
            say("vm2$ ping6 -c 2 fd77::1")
            print(await vm2.check("ping -6 -c 2 fd77::1"))
            say("vm2$ iperf3 -c 10.77.0.1 -t 5   (vm1 runs iperf3 -s)")
            await vm1.check("iperf3 -s -D -1 >/dev/null 2>&1")
            await trio.sleep(0.5)
            out = await vm2.check("iperf3 -c 10.77.0.1 -t 5 -f m", timeout=60)
            print("\n".join(line for line in out.splitlines()
                            if re.search(r"sender|receiver", line)))
            say("vhostvpn status")
            print(format_status(await hub.status()))
    say(f"done; logs in {workdir}")


def main() -> int:
    ensure_image()
    workdir = Path(tempfile.mkdtemp(prefix="vhostvpn-demo-"))
    trio.run(demo, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
