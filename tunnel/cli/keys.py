"""`vhostvpn keygen DIR` and `vhostvpn fingerprint DIR`: make an identity, and say which key
one holds (tunnel/keys.py does the work; here are the flags and the one-line errors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunnel.cli.flags import add_common


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The keygen and fingerprint subcommands."""
    keygen = sub.add_parser("keygen", help="create a key and certificate in DIR")
    keygen.add_argument("directory", type=Path, metavar="DIR")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    add_common(keygen)

    fingerprint = sub.add_parser("fingerprint", help="print the key fingerprint of DIR")
    fingerprint.add_argument("directory", type=Path, metavar="DIR",
                             help="an identity folder (vhostvpn keygen DIR), or its key.pem")
    add_common(fingerprint)


def cmd_keygen(args: argparse.Namespace) -> int:
    from tunnel.keys import IdentityError, keygen

    try:
        print(keygen(args.directory, force=args.force))
    except IdentityError as exc:
        raise SystemExit(f"vhostvpn keygen: {exc}") from None
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from tunnel.keys import CERT_FILE, KEY_FILE, IdentityError, identity_fingerprint

    directory = args.directory
    if directory.is_file():
        if directory.name not in (KEY_FILE, CERT_FILE):
            raise SystemExit(f"vhostvpn fingerprint: {directory} is a file: give the identity "
                             f"folder `vhostvpn keygen DIR` made (it holds {KEY_FILE} and "
                             f"{CERT_FILE})")
        directory = directory.parent  # its key.pem or cert.pem: the folder holds the pair
    try:
        print(identity_fingerprint(directory))
    except IdentityError as exc:
        raise SystemExit(f"vhostvpn fingerprint: {exc}") from None
    return 0
