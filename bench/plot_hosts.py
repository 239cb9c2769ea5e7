"""The speed-race plot for docs/benchmarks.md: host-to-host throughput (median bar, min-max
whisker), ping under load (p50; busybox's average for SoftEther in result files older than
2026-12-05 18:30) and the machine's CPU seconds per gigabyte, per VPN, from one
bench/hosts.py result file.  Needs matplotlib (`pip install -e .[bench]`); nothing else does.

Run: .venv/bin/python bench/plot_hosts.py bench/results/hosts-*.json -o docs/img/hosts.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Rows in the order they are drawn, with the label under each bar.
LABELS = {
    "vhostvpn tap": "vhostvpn TAP\nvia hub",
    "vhostvpn tun": "vhostvpn TUN\nvia hub",
    "softether": "SoftEther 5\nvia server",
    "openvpn": "OpenVPN TCP\nvia server",
    "wireguard-go": "wireguard-go\n(2022) direct",
    "veth": "raw veth\n(no VPN)",
}
VPN_COLOR = "#3b6ea8"
OURS_COLOR = "#d1672a"
REFERENCE_COLOR = "#9a9a9a"


def bars(summary: dict[str, dict]) -> list[tuple[str, dict]]:
    return [(name, summary[name]) for name in LABELS
            if name in summary and summary[name].get("runs")]


def loaded_ping(row: dict) -> float | None:
    if row.get("ping_loaded_p50_ms"):
        return sum(row["ping_loaded_p50_ms"]) / 2
    if row.get("ping_loaded_avg_ms"):
        return sum(row["ping_loaded_avg_ms"]) / 2
    return None


def color_of(name: str) -> str:
    return OURS_COLOR if name.startswith("vhostvpn") else \
        REFERENCE_COLOR if name == "veth" else VPN_COLOR


def draw_bars(axis, rows: list[tuple[str, dict]], value_of, label: str, *,
              label_size: int = 7, whiskers: bool = False) -> None:
    """One bar per row that has a value, labelled with it; whiskers from min/max_gbits."""
    rows = [(n, r) for n, r in rows if value_of(r) is not None]
    values = [value_of(r) for _, r in rows]
    positions = list(range(len(rows)))
    errors = ([[r["median_gbits"] - r["min_gbits"] for _, r in rows],
               [r["max_gbits"] - r["median_gbits"] for _, r in rows]] if whiskers else None)
    axis.bar(positions, values, color=[color_of(n) for n, _ in rows], yerr=errors,
             capsize=4)
    axis.set_xticks(positions, [LABELS[n] for n, _ in rows], fontsize=label_size,
                    **({} if whiskers else {"rotation": 25, "ha": "right"}))
    for x, value in zip(positions, values, strict=True):
        axis.annotate(label.format(value), (x, value), textcoords="offset points",
                      xytext=(14, 3) if whiskers else (0, 4),
                      ha="left" if whiskers else "center", fontsize=8)


def plot(result: dict, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = bars(result["summary"])
    if not rows:
        raise SystemExit("no measured rows in the result file")
    figure, (speed, latency, cost) = pyplot.subplots(
        1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [3, 2, 2.4]})

    draw_bars(speed, rows, lambda r: r["median_gbits"], "{:.2f}", label_size=8, whiskers=True)
    speed.set_yscale("log")
    speed.set_ylabel("Gbit/s, one iperf3 TCP stream (log scale)")
    speed.set_title("Throughput: median of all runs, bar = min-max", fontsize=10)
    softether = result["summary"].get("softether", {})
    if softether.get("runs"):
        target = 4 * softether["median_gbits"]
        speed.axhline(target, color=OURS_COLOR, linestyle="--", linewidth=1)
        speed.annotate(f"target: 4x SoftEther = {target:.1f}", (-0.4, target),
                       textcoords="offset points", xytext=(0, 4), ha="left", fontsize=8,
                       color=OURS_COLOR)

    draw_bars(latency, [(n, r) for n, r in rows if n != "veth"], loaded_ping, "{:.1f}")
    latency.set_ylabel("ms")
    latency.set_title("Ping during the stream (p50)", fontsize=10)

    draw_bars(cost, rows, lambda r: r.get("cpu_seconds_per_gb"), "{:.1f}")
    cost.set_ylabel("CPU seconds per GB, whole machine")
    cost.set_title("What a gigabyte costs the machine (lower is better)", fontsize=10)

    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a bench/results/hosts-*.json file")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/img/hosts.png"))
    parser.add_argument("--title", default="Host ↔ host through each VPN, same run, "
                        "2 vCPUs (bench/hosts.py)")
    args = parser.parse_args()
    try:
        result = json.loads(args.result.read_text())
    except (OSError, ValueError) as error:
        parser.error(f"{args.result}: {error}")
    plot(result, args.title, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
