"""The DHCP server's lease file: its format, reading it at start-up and replacing it
atomically.  The only module of the DHCP server that touches files.

The hub's shell (tunnel/hub.py) calls `read_state` once, before the event loop serves anyone,
and hands what it read to `DhcpServer`; after that the server decides what to write and hands
the shell a `LeaseWrite`, which the shell runs through `write_state` in a worker thread
(`trio.to_thread`), at most every `PERSIST_INTERVAL_SECONDS`, and reports back to the server
(`persisted` or `persist_failed`).  Nothing here knows the server's rules.

Format: JSON, `{"version": 1, "leases": [...], "declined": [...]}`; a lease is
`{mac, ip, expires, hostname, client_id}` (bound and remembered records alike: whether one
runs is its `expires` against the clock at load), a declined address `{ip, until}`.  A
file that cannot be read or parsed is logged and renamed `*.corrupt` (or `.corrupt.N`: never
overwritten); a single bad entry is skipped with a warning and the rest kept.  A write goes
to a temporary file in the same directory, which is fsynced, renamed over the file, and the
directory fsynced: the file is the old table or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from netstack.frame import format_mac, parse_mac
from netstack.gateway.dhcp_leases import Lease, plausible_hostname
from netstack.wire.dhcp import CLIENT_ID_MIN_LEN, OPTION_MAX_LEN

log = logging.getLogger(__name__)

STATE_VERSION = 1
# The shell writes the state file at most this often, a batch of changes a write, in a worker
# thread; a crash loses at most the changes of this long, and none of them was acknowledged.
PERSIST_INTERVAL_SECONDS = 0.25


@dataclass(frozen=True)
class StoredState:
    """What `read_state` found: the records and resting addresses in file order."""

    leases: tuple[Lease, ...] = ()
    declined: tuple[tuple[IPv4Address, float], ...] = ()
    skipped: int = 0  # lease entries that could not be read (each logged)
    corrupt: bool = False  # the file could not be used and was set aside (logged)


@dataclass(frozen=True)
class LeaseWrite:
    """A write of the lease file the server asks its shell for: the table at one moment
    (copies of dicts of immutable records), so `write_state` may run in a worker thread."""

    path: Path
    generation: int  # the server's count of changes this write contains
    records: Mapping[bytes, Lease]
    encoded: Mapping[bytes, bytes]  # MAC -> its record as `encode_lease` made it
    declined: Mapping[IPv4Address, float]


def write_state(job: LeaseWrite) -> dict[bytes, float]:
    """Replace the lease file by `job`'s table (blocking: run it in a worker thread).
    Returns the expiries now on disk, MAC -> expires; raises OSError."""
    write_atomically(job.path, encode_state(job.encoded.values(), job.declined))
    return {mac: lease.expires for mac, lease in job.records.items()}


def read_state(path: Path) -> StoredState:
    """The lease file's records (blocking: at start-up); an absent file is an empty table,
    an unusable one is set aside."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return StoredState()
    except OSError as error:
        return _set_aside(path, f"unreadable: {error}")
    try:
        document = json.loads(raw)
        if not isinstance(document, dict):
            raise ValueError(f"top level is {type(document).__name__}, want an object")
        if document.get("version") != STATE_VERSION:
            raise ValueError(f"version {document.get('version')!r}, want {STATE_VERSION}")
        entries, declined = document["leases"], document.get("declined", [])
        if not isinstance(entries, list) or not isinstance(declined, list):
            raise ValueError("'leases' and 'declined' must be lists")
    except (ValueError, KeyError) as error:  # JSONDecodeError and UnicodeError are ValueErrors
        return _set_aside(path, str(error))
    leases, skipped = [], 0
    for entry in entries:
        try:
            leases.append(decode_lease(entry))
        except (ValueError, TypeError, KeyError) as error:
            skipped += 1
            log.warning("%s: skipping lease entry %.200r: %s", path, entry, error)
    rested = []
    for entry in declined:
        try:
            rested.append((IPv4Address(entry["ip"]), _time(entry["until"])))
        except (ValueError, TypeError, KeyError) as error:
            log.warning("%s: skipping declined entry %.200r: %s", path, entry, error)
    return StoredState(tuple(leases), tuple(rested), skipped)


def encode_lease(lease: Lease) -> bytes:
    """One entry of the file's "leases" list."""
    return json.dumps({
        "mac": format_mac(lease.mac),
        "ip": str(lease.ip),
        "expires": lease.expires,
        "hostname": lease.hostname,
        "client_id": None if lease.client_id is None else lease.client_id.hex(),
    }, sort_keys=True, separators=(",", ":")).encode()


def decode_lease(entry: object) -> Lease:
    """An entry of the "leases" list (raises ValueError, TypeError or KeyError).  Whether its
    address belongs to the server's subnet is the server's question."""
    if not isinstance(entry, dict):
        raise TypeError(f"entry is {type(entry).__name__}, want an object")
    ip = IPv4Address(entry["ip"])
    hostname, client_id = entry.get("hostname"), entry.get("client_id")
    if hostname is not None and not (isinstance(hostname, str) and plausible_hostname(hostname)):
        raise ValueError(f"bad hostname {hostname!r}")
    if client_id is not None:
        client_id = bytes.fromhex(client_id)
        if not CLIENT_ID_MIN_LEN <= len(client_id) <= OPTION_MAX_LEN:
            raise ValueError(f"client_id of {len(client_id)} bytes")
    if not isinstance(entry["mac"], str):
        raise TypeError(f"mac {entry['mac']!r} is not a string")
    return Lease(parse_mac(entry["mac"]), ip, _time(entry["expires"]), hostname, client_id)


def _time(value: object) -> float:
    """A time from the file: a finite number (JSON allows integers no float holds, and
    Python's reader takes Infinity and NaN)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not a number")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{str(value)[:20]}... is too large") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite time")
    return seconds


def encode_state(leases: Iterable[bytes], declined: Mapping[IPv4Address, float]) -> bytes:
    """The file's bytes from encoded leases (`encode_lease`) and the resting addresses."""
    rested = json.dumps([{"ip": str(ip), "until": until} for ip, until in declined.items()],
                        separators=(",", ":")).encode()
    return (b'{"declined":' + rested + b',"leases":[' + b",".join(leases)
            + b'],"version":%d}' % STATE_VERSION)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data`: temp file in the same directory, fsync, rename, fsync dir."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _set_aside(path: Path, why: str) -> StoredState:
    """Move an unusable file out of the way (never over an earlier one) and start empty."""
    target = path.with_name(path.name + ".corrupt")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt.{n}")
    try:
        os.replace(path, target)
    except OSError as error:
        log.error("DHCP state file %s is %s, and could not be moved aside: %s; "
                  "starting with no leases", path, why, error)
    else:
        log.error("DHCP state file %s is %s; moved to %s, starting with no leases",
                  path, why, target)
    return StoredState(corrupt=True)
