"""The serial-console protocol of the test guest's /init (qemu/guest-init), in one place.

The guest prints `VV-BOOTED key=value...` once eth0 is configured (`VV-BOOT-FAILED reason=...`
just before it if something went wrong). The host runs a script by sending
`VVDATA <id> <base64 chunk>`... `VVRUN <id> <last chunk>`; the guest answers with
`VVOUT-BEGIN <id>`, the script's output (stdout+stderr), `VVOUT-END <id> rc=N`.

Used by tests/support/guest.py (QEMU's console on a pipe, under Trio) and by `vhostvpn lab`
(`UnixConsole`: QEMU's console on a unix socket, `--console unix:PATH` of qemu/run-vm.sh,
blocking I/O).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import socket
import time

BOOTED = "VV-BOOTED "
BOOT_FAILED = "VV-BOOT-FAILED "
# A console line is one tty line; the guest tty buffer holds 4095 bytes per line and the
# kernel's serial flip buffers ~64 KiB in flight, so scripts are sent in chunks and capped.
CHUNK_CHARS = 1024
MAX_SCRIPT_BYTES = 16 * 1024


class ConsoleError(RuntimeError):
    """The console closed, or what was waited for did not come in time."""


def script_lines(cmd_id: str, script: str) -> list[str]:
    """The lines that make the guest run `script` with sh (VVDATA... VVRUN)."""
    data = script.encode()
    if len(data) > MAX_SCRIPT_BYTES:
        raise ValueError(f"command is {len(data)} bytes; the console protocol carries at most "
                         f"{MAX_SCRIPT_BYTES}")
    encoded = base64.b64encode(data).decode()
    chunks = [encoded[i:i + CHUNK_CHARS] for i in range(0, len(encoded), CHUNK_CHARS)]
    lines = [f"VVDATA {cmd_id} {chunk}" for chunk in chunks[:-1]]
    lines.append(f"VVRUN {cmd_id} {chunks[-1] if chunks else ''}")
    return lines


def begin_marker(cmd_id: str) -> str:
    return f"VVOUT-BEGIN {cmd_id}"


def end_pattern(cmd_id: str) -> re.Pattern[str]:
    """Matches the end marker; group 1 is the exit code. The marker may follow the command's
    last output line if that had no newline."""
    return re.compile(rf"VVOUT-END {re.escape(cmd_id)} rc=(\d+)$")


def parse_booted(line: str) -> dict[str, str] | None:
    """The key=value fields of a `VV-BOOTED` line, or None for any other line."""
    if not line.startswith(BOOTED):
        return None
    return dict(word.split("=", 1) for word in line.split()[1:] if "=" in word)


def collect_output(lines: list[str], cmd_id: str, since: int = 0) -> tuple[int, str] | None:
    """(exit code, output) of command `cmd_id` if its end marker is in lines[since:]."""
    begin, end = begin_marker(cmd_id), end_pattern(cmd_id)
    first = None
    for index in range(since, len(lines)):
        if first is None:
            if lines[index] == begin:
                first = index
        elif match := end.search(lines[index]):
            output = lines[first + 1:index]
            if tail := lines[index][:match.start()]:
                output = [*output, tail]  # the command's last line had no newline
            return int(match.group(1)), "\n".join(output)
    return None


class UnixConsole:
    """A guest console on a unix socket (QEMU is the server), blocking, one client at a time.

    QEMU drops console output while no client is connected, so connect before the guest
    prints what you wait for. Every line read is also appended to `log` if given.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0,
                 log: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path)
        self.lines: list[str] = []
        self._pending = b""
        self._log = open(log, "ab", buffering=0) if log is not None else None  # noqa: SIM115
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise ConsoleError(f"cannot connect to console {self.path}: {exc}") from None
                time.sleep(0.05)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> UnixConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_some(self, timeout: float) -> None:
        """Read what arrives within `timeout` seconds (at most one recv) into `lines`."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return
        if not chunk:
            raise ConsoleError(f"console {self.path} closed (QEMU exited?)")
        if self._log is not None:
            self._log.write(chunk)
        self._pending += chunk
        *complete, self._pending = self._pending.split(b"\n")
        self.lines.extend(raw.rstrip(b"\r").decode("utf-8", "replace") for raw in complete)

    def booted(self) -> tuple[dict[str, str], str | None] | None:
        """The first VV-BOOTED line's fields and the VV-BOOT-FAILED reason before it, if any."""
        failed = None
        for line in self.lines:
            if line.startswith(BOOT_FAILED):
                failed = line[len(BOOT_FAILED):].removeprefix("reason=")
            elif (fields := parse_booted(line)) is not None:
                return fields, failed
        return None

    def send_lines(self, lines: list[str]) -> None:
        self.sock.settimeout(10.0)
        self.sock.sendall("".join(line + "\n" for line in lines).encode())

    def run(self, script: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run `script` with sh in the (booted) guest; (exit code, stdout+stderr)."""
        cmd_id = secrets.token_hex(4)
        since = len(self.lines)
        self.send_lines(script_lines(cmd_id, script))
        deadline = time.monotonic() + timeout
        while (result := collect_output(self.lines, cmd_id, since)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConsoleError(f"command {script!r} did not finish within {timeout} s")
            self.read_some(min(left, 1.0))
        return result

