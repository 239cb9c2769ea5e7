"""Flags and checks that several `vhostvpn` commands share: --log-level, --config and --nice
(every daemon), the queue-pair count and the vhost-user socket paths (hub, vm and qemu-args).

A failed check is one line naming the command and the flag, exit status 1.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tunnel.settings import LOG_LEVELS
from virtio.protocol import MAX_QUEUE_PAIRS

NICE_MIN, NICE_MAX = -20, 19  # Linux's nice values


def add_common(parser: argparse.ArgumentParser) -> None:
    """The flag every command has: --log-level."""
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="how much to log (default: info)",
    )


def add_config(parser: argparse.ArgumentParser) -> None:
    """--config FILE (tunnel/cli/configfile.py)."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML file holding any of these flags (names without the "
                             "dashes; flags on the command line win)")


def add_nice(parser: argparse.ArgumentParser) -> None:
    """--nice N: the daemon's scheduling priority (applied by tunnel/cli/launch.py)."""
    parser.add_argument("--nice", type=nice_value, metavar="N",
                        help="run at this nice value, -20 (first) to 19 (last): below 0 the "
                             "daemon gets a CPU ahead of ordinary processes when they are "
                             "busy, and frames wait less (SoftEther runs itself at -20); "
                             "below the current value needs root or CAP_SYS_NICE "
                             "(default: as started)")


def nice_value(text: str) -> int:
    """--nice's value: an integer from NICE_MIN to NICE_MAX."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not NICE_MIN <= value <= NICE_MAX:
        raise argparse.ArgumentTypeError(f"{value}: want {NICE_MIN} to {NICE_MAX}")
    return value


def check_queue_pairs(command: str, queues: int) -> None:
    """--queues: 1 to MAX_QUEUE_PAIRS, what a vhost-user device here may offer."""
    if not 1 <= queues <= MAX_QUEUE_PAIRS:
        raise SystemExit(f"vhostvpn {command}: --queues {queues}: want 1 to {MAX_QUEUE_PAIRS}")


def check_socket_path_syntax(command: str, args: argparse.Namespace) -> None:
    """A comma in a vhost-user socket path would break QEMU's `-chardev socket,path=...`
    (commas separate its options), so such a path is refused before anything starts."""
    for flag in ("socket", "client_socket"):
        paths = getattr(args, flag, [])
        for path in [paths] if isinstance(paths, str) else paths:
            if "," in os.path.abspath(path):
                raise SystemExit(f"vhostvpn {command}: --{flag.replace('_', '-')} {path}: "
                                 f"a comma in the path breaks QEMU's -chardev option "
                                 f"(commas separate its options): choose a path without one")
