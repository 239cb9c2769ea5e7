"""The demo behind `make demo`: `vhostvpn lab up` of qemu/labs/two-guests-one-host.toml -- a
hub (DHCP, router advertisements, TLS listener) in a network namespace, two QEMU guests each
behind an endpoint of its own, and a plain host in a namespace joined through a TAP device --
then pings and iperf3 between all of them with `vhostvpn lab run`, the hub's status, and
`vhostvpn lab down`, which leaves nothing behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "qemu" / "labs" / "two-guests-one-host.toml"
VHOSTVPN = [sys.executable, "-m", "tunnel.cli"]
HOST_ADDRESS = "10.77.0.50"


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def lab(*args: str, check: bool = True) -> str:
    result = subprocess.run([*VHOSTVPN, "lab", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=sys.stderr)
    if check and result.returncode != 0:
        raise SystemExit(f"vhostvpn lab {args[0]} failed (exit {result.returncode}):\n"
                         f"{result.stdout}")
    return result.stdout


def run(member: str, command: str) -> str:
    out = lab("run", str(LAB), member, "--", "sh", "-c", command)
    print(f"{member}$ {command}\n{out.rstrip()}")
    return out


def address_of(status: str, member: str) -> str:
    for line in status.splitlines():
        words = line.split()
        if words and words[0] == member:
            for word in words:
                if word.startswith("10.77."):
                    return word.split("/")[0]
    raise SystemExit(f"no address for {member} in:\n{status}")


def main() -> int:
    say(f"vhostvpn lab up {LAB.relative_to(ROOT)}  (hub, vm1, vm2, host h1)")
    lab("up", str(LAB))
    try:
        status = lab("status", str(LAB))
        print(status.rstrip())
        vm1, vm2 = address_of(status, "vm1"), address_of(status, "vm2")
        say("pings between every pair (guests and the TAP host), and the gateway")
        run("vm1", f"ping -c 2 -W 2 {vm2}")
        run("vm2", f"ping -c 2 -W 2 {HOST_ADDRESS}")
        run("h1", f"ping -c 2 -W 2 {vm1}")
        run("h1", "ping -c 2 -W 2 10.77.0.1")
        say("iperf3 (vm1 and vm2 run iperf3 -s)")
        run("vm2", f"iperf3 -c {vm1} -t 3 -f m | grep -E 'sender|receiver'")
        run("h1", f"iperf3 -c {vm2} -t 3 -f m | grep -E 'sender|receiver'")
    finally:
        say(f"vhostvpn lab down {LAB.relative_to(ROOT)}")
        lab("down", str(LAB), check=False)
        print(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
              or "(no network namespaces left)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
