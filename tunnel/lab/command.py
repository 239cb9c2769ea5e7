"""The `vhostvpn lab` command line: `lab up|down|run|status FILE`, `lab examples`, `lab image`.

tunnel/cli/ registers this tree (`add_lab_parser`, given its --log-level helper) and calls
`command` with the parsed arguments; nothing in tunnel/lab/ imports the CLI.  A LabError
becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from tunnel.lab import LabError, assets
from tunnel.lab.down import down
from tunnel.lab.image import build_image
from tunnel.lab.run import run
from tunnel.lab.schema import load_lab
from tunnel.lab.state import format_lab, load_state
from tunnel.lab.up import up


def add_lab_parser(sub: argparse._SubParsersAction,
                   add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """`vhostvpn lab up|down|run|status FILE`, `lab examples`, `lab image`, added to the
    CLI's subparsers `sub`; `add_common` adds the flags every command has (--log-level).
    FILE may name an example lab instead (assets.py)."""
    lab = sub.add_parser("lab", help="test labs from a TOML file: a hub, QEMU guests and "
                                     "TAP/TUN hosts in network namespaces")
    actions = lab.add_subparsers(dest="lab_command", required=True)
    examples = actions.add_parser("examples", help="list the example labs (give a name as "
                                                   "FILE: vhostvpn lab up two-guests-one-host)")
    add_common(examples)
    image = actions.add_parser("image", help="build the guest image (lab up builds it when "
                                             "missing) and print its folder")
    image.add_argument("--force", action="store_true", help="rebuild even if up to date")
    add_common(image)
    for name, text in (("up", "start the lab in the background; return once every member "
                              "has its addresses"),
                       ("down", "stop the lab and remove all it created (idempotent)"),
                       ("status", "list the members, their addresses and processes"),
                       ("run", "run a command in a member: vhostvpn lab run FILE MEMBER -- CMD")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("file", type=assets.resolve_lab, metavar="FILE",
                            help="the lab file (TOML), or the name of an example lab")
        if name == "run":
            action.add_argument("member", metavar="MEMBER")
            action.add_argument("--timeout", type=float, default=60.0, metavar="S",
                                help="give up after S seconds (default 60)")
            action.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
        add_common(action)


def command(args: argparse.Namespace) -> int:
    """Entry point of `vhostvpn lab`."""
    try:
        if args.lab_command == "examples":
            for path in assets.example_labs():
                print(f"{path.stem:<24} {path}")
            return 0
        if args.lab_command == "image":
            print(build_image(force=args.force))
            return 0
        if args.lab_command == "up":
            spec = load_lab(args.file)
            if os.geteuid() != 0:
                raise LabError("lab up needs root (network namespaces, TAP/TUN devices)")
            up(spec, log_level=args.log_level)
            return 0
        # The others read only what `up` recorded: the file may have changed since.
        if args.lab_command == "down":
            print(f"lab {args.file.name}: {'down' if down(args.file) else 'was not up'}")
            return 0
        if args.lab_command == "status":
            state = load_state(args.file)
            print(f"lab {args.file.name} ({state.dir})")
            print(format_lab(state))
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return run(args.file, args.member, cmd, timeout=args.timeout)
    except LabError as exc:
        print(f"vhostvpn lab {args.lab_command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
