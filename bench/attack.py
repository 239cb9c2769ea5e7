"""Every attacker at once against a real hub, for longer than the test does, while two real
guests ping each other (tests/support/attacks.py: strangers' connection floods, hostile guests
on the hub's socket and behind an endpoint, a peer flooding PINGs without reading).

Reports what each attacker did, how many of the guests' pings were answered, the longest stall
(target: never more than 2 s), the hub's memory growth and what the hub counted.
Run (QEMU and the guest image): .venv/bin/python bench/attack.py [--seconds 120]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from tests.support.attacks import attack_while_guests_ping, longest_stall
from tests.support.guest import ensure_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/attack.json"))
    args = parser.parse_args()
    ensure_image()
    with tempfile.TemporaryDirectory(prefix="vv-attack-") as workdir:
        results = trio.run(attack_while_guests_ping, Path(workdir), args.seconds)
    hub_ports = {p["name"]: p for p in results["hub"]["ports"]}
    report = {
        "seconds": args.seconds,
        "strangers": results["strangers"],
        "hostile_frames": {"on_the_hub": results["hostile_hub_guest"],
                           "behind_the_endpoint": results["hostile_remote_guest"]},
        "ping_sent": results["sent"],
        "ping_answered": len(results["answered"]),
        "longest_stall_seconds": longest_stall(results["answered"], results["sent"]),
        "hub_rss_growth_mib": round(results["rss_growth"] / (1 << 20), 1),
        "refused": results["hub"]["tunnel"]["refused"],
        "drops": {name: port["drops"] for name, port in hub_ports.items()},
        "mallory_control_dropped": hub_ports["mallory"].get("control_dropped"),
        "mallory_cut_after_seconds": results["pings"],
        "links_ended": results["hub"]["tunnel"]["links_ended"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
