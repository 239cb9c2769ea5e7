"""`--config FILE`: a TOML file holding a daemon's flags, turned into command-line tokens.

Who calls it: tunnel/cli/main.py's `parse_args`, which puts the tokens before the command line's
own (later flags win, lists add up, a flag of a mutually exclusive group on the command line
replaces the file's choice).  Every flag of the subcommand may be set, by its long name
without the dashes (`no-port-policy = true`, `socket = ["a.sock", "b.sock"]`, `tap =
"vv0"`); a value that names a file or folder (the flags whose metavar is PATH, FILE or DIR)
is taken relative to the config file's folder.  Each value is checked here with the flag's
own parser, so a bad one is reported with the file and the key, never as a flag the user did
not type.  Nothing here touches any file but the config file.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

# Flags whose values are paths (resolved from the config file's folder).
PATH_METAVARS = frozenset({"PATH", "FILE", "DIR"})


class ConfigError(ValueError):
    """The config file cannot be used: the message names the file and the key."""


def find_config(argv: list[str]) -> Path | None:
    """The `--config FILE` on a command line (the last one wins), or None."""
    found = None
    for position, token in enumerate(argv):
        if token == "--config" and position + 1 < len(argv):
            found = argv[position + 1]
        elif token.startswith("--config="):
            found = token.partition("=")[2]
    return None if found is None else Path(found)


def config_tokens(path: Path, parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The settings of the TOML file at `path` as tokens for `parser` (a subcommand's);
    ConfigError names the file and the key of anything wrong."""
    try:
        with open(path, "rb") as file:
            values = tomllib.load(file)
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a directory, want a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML is UTF-8
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None
    actions = {action.dest: action for action in parser._actions
               if action.option_strings and action.dest not in ("help", "config")}
    given = _given_on_command_line(parser, argv)
    tokens: list[str] = []
    for key, value in values.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            raise ConfigError(f"--config {path}: unknown setting {key!r} (the settings are "
                              f"the flags of --help without the dashes)")
        if _excluded_by_command_line(parser, action, given):
            continue
        for item in value if isinstance(value, list) else [value]:
            tokens += _tokens(path, key, action, item)
    return tokens


def _tokens(path: Path, key: str, action: argparse.Action, item: object) -> list[str]:
    """One value of `key` as tokens, checked with the flag's own type and choices."""
    where = f"--config {path}: {key} = {item!r}"
    option = action.option_strings[-1]
    if action.nargs == 0:  # store_true and the like
        if not isinstance(item, bool):
            raise ConfigError(f"{where}: want true or false")
        return [option] if item else []
    if isinstance(item, bool) or not isinstance(item, str | int | float):
        raise ConfigError(f"{where}: want a string or a number"
                          + (" (or a list of them)" if action.nargs is None else ""))
    text = str(item)
    if action.metavar in PATH_METAVARS:
        text = str(path.absolute().parent / Path(text).expanduser())
    if action.type is not None:
        try:
            action.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if action.choices is not None and text not in action.choices:
        raise ConfigError(f"{where}: want one of {', '.join(map(str, action.choices))}")
    return [option, text]


def _given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options `argv` names (spelled in full, or as FLAG=VALUE)."""
    by_option = {option: action.dest for action in parser._actions
                 for option in action.option_strings}
    return {by_option[token.partition("=")[0]] for token in argv
            if token.partition("=")[0] in by_option}


def _excluded_by_command_line(parser: argparse.ArgumentParser, action: argparse.Action,
                              given: set[str]) -> bool:
    """Does the command line choose another member of `action`'s mutually exclusive group
    (`--tun` on the command line, `tap` in the file)?"""
    for group in parser._mutually_exclusive_groups:
        members = {member.dest for member in group._group_actions}
        if action.dest in members and (members - {action.dest}) & given:
            return True
    return False
