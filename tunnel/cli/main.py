"""The `vhostvpn` command line: the parser (one subcommand per role or tool), the --config
file's values put before the command line's own, logging (`--log-level` everywhere), and the
dispatch to the subcommand's `cmd_*` function.

Each command family keeps its flags and checks in its own module (roles, keys, status, qemu,
capture, and tunnel/lab/command.py for `vhostvpn lab`); this module only puts them together.
Bad flags get a one-line error and exit status 2; nothing here does I/O beyond that.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import tomllib
from pathlib import Path
from typing import NoReturn

from tunnel.cli import capture, keys, qemu, roles, status
from tunnel.cli.completion import bash_script
from tunnel.cli.configfile import ConfigError, config_tokens, find_config
from tunnel.cli.flags import add_common
from tunnel.lab.command import add_lab_parser
from tunnel.lab.command import command as cmd_lab

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The source tree's pyproject.toml, when this runs from a checkout.
CHECKOUT_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `vhostvpn hub: argument --subnet: why (see --help)`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def version() -> str:
    """This vhostvpn's version: the source tree's pyproject.toml when run from a checkout
    (an installed copy may be older), else the installed package's metadata."""
    try:
        with open(CHECKOUT_PYPROJECT, "rb") as file:
            project = tomllib.load(file)["project"]
        if project["name"] == "vhostvpn":
            return project["version"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        pass
    try:
        return importlib.metadata.version("vhostvpn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's parser, in the order `vhostvpn --help` lists them."""
    parser = Parser(
        prog="vhostvpn",
        description="Put QEMU virtual machines and hosts on one encrypted network.",
    )
    parser.add_argument("--version", action="version", version=f"vhostvpn {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    roles.add_parsers(sub)
    keys.add_parsers(sub)
    status.add_parser(sub)
    qemu.add_parser(sub)
    capture.add_parser(sub)
    completion = sub.add_parser("completion", help="print a shell completion script",
                                description="Print the completion script for SHELL: "
                                            "`vhostvpn completion bash > "
                                            "/etc/bash_completion.d/vhostvpn`, or "
                                            "`source <(vhostvpn completion bash)`.")
    completion.add_argument("shell", choices=["bash"], metavar="SHELL", help="bash")
    add_common(completion)
    add_lab_parser(sub, add_common)
    return parser


def cmd_completion(args: argparse.Namespace) -> int:
    """`vhostvpn completion bash`: the script, generated from this parser."""
    sys.stdout.write(bash_script(build_parser()))
    return 0


COMMANDS = {"hub": roles.cmd_hub, "vm": roles.cmd_vm, "host": roles.cmd_host,
            "status": status.cmd_status, "qemu-args": qemu.cmd_qemu_args,
            "keygen": keys.cmd_keygen, "fingerprint": keys.cmd_fingerprint, "lab": cmd_lab,
            "capture": capture.cmd_capture, "completion": cmd_completion}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a --config TOML file's values before it (configfile.py)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    config_path = find_config(argv[1:])
    subparser = _subparsers(parser).get(argv[0]) if argv else None
    if config_path is None or subparser is None or "config" not in _dests(subparser):
        return parser.parse_args(argv)
    try:
        tokens = config_tokens(config_path, subparser, argv[1:])
    except ConfigError as exc:
        subparser.error(str(exc))
    # The file first, the command line after it: later flags win, lists add up.
    return parser.parse_args([argv[0], *tokens, *argv[1:]])


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return parser._subparsers._group_actions[0].choices


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions}


def main(argv: list[str] | None = None) -> int:
    """The `vhostvpn` console script: parse, set up logging, run the subcommand."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
