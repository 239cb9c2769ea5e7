"""Flags and checks that several `vhostvpn` commands share: --log-level and --config (every
daemon), the queue-pair count and the vhost-user socket paths (hub, vm and qemu-args).

A failed check is one line naming the command and the flag, exit status 1.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tunnel.settings import LOG_LEVELS
from virtio.protocol import MAX_QUEUE_PAIRS


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
