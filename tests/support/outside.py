"""The world outside the hub, for the NAT's QEMU proof (tests/test_qemu_nat.py) and its
benchmark against libslirp (bench/nat_slirp.py): network namespaces and the servers a guest
reaches through `vhostvpn hub --nat`.  Run as a script (`python -m tests.support.outside serve`)
in the outside namespace, it is those servers; it never touches any namespace it did not create.

Topology (`world()`), names prefixed by the caller's tag, all removed on exit:

    hub namespace  10.205.0.1 / fdcd:5::1  <-veth->  10.205.0.2 / fdcd:5::2  outside namespace
    hub namespace  10.206.0.1              <-veth->  10.206.0.2              host namespace

The hub runs in the hub namespace (its NAT's sockets leave from there); the outside namespace
holds the servers; the host namespace is where a TAP host and a `vhostvpn vm` endpoint run
(they reach the hub's TLS listener at 10.206.0.1).  The hub namespace allows unprivileged
ping sockets for every group (net.ipv4.ping_group_range), which the NAT's echo needs.

The servers (`serve`), each on both families:
  HTTP   :80    files from a folder (ThreadingHTTPServer, a 256-connection backlog), and
                /hold, answered after HOLD_SECONDS
  DNS    :53    UDP; NAME -> OUT4 (A) and OUT6 (AAAA), NXDOMAIN otherwise
  SINK   :9000  reads a connection to its end, answers the sha256 hex of what it read, closes
  CLOSED :9     nothing listens (a SYN gets the kernel's RST)
  iperf3 :5201  (`servers()` starts it beside `serve`)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import logging
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import trio

log = logging.getLogger(__name__)

HUB4, OUT4, PREFIX4 = "10.205.0.1", "10.205.0.2", "10.205.0.0/24"
HUB6, OUT6, PREFIX6 = "fdcd:5::1", "fdcd:5::2", "fdcd:5::/64"
HUB_LINK4, HOST_LINK4 = "10.206.0.1", "10.206.0.2"
NAME = "outside.vv.test"
HTTP_PORT = 80
DNS_PORT = 53
SINK_PORT = 9000
CLOSED_PORT = 9
IPERF3_PORT = 5201
START_TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parents[2]
ALL_GROUPS = "0 2147483647"  # net.ipv4.ping_group_range: every group may open ping sockets
HOLD_SECONDS = 3.0  # /hold answers this late: a guest's parallel fetches are open together
HTTP_BACKLOG = 256  # the parallel-connection test opens 100 at once; http.server's default is 5
DNS_TTL = 60
MAX_DNS_QUERY = 512


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def netns_exec(netns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


@contextlib.contextmanager
def world(tag: str, with_host: bool = True) -> Iterator[dict[str, str]]:
    """{"hub": NS, "outside": NS[, "host": NS]} joined as the module docstring draws;
    `tag` (letters and digits, <= 8) makes every name unique to its caller."""
    names = {"hub": f"{tag}h", "outside": f"{tag}o", **({"host": f"{tag}t"} if with_host else {})}
    try:
        for name in names.values():
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("link", "add", f"{tag}ha", "netns", names["hub"], "type", "veth", "peer",
           "name", f"{tag}oa", "netns", names["outside"])
        for name, dev, v4, v6 in ((names["hub"], f"{tag}ha", HUB4, HUB6),
                                  (names["outside"], f"{tag}oa", OUT4, OUT6)):
            ip("-n", name, "addr", "add", f"{v4}/24", "dev", dev)
            ip("-n", name, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            ip("-n", name, "link", "set", dev, "up")
        if with_host:
            ip("link", "add", f"{tag}hb", "netns", names["hub"], "type", "veth", "peer",
               "name", f"{tag}tb", "netns", names["host"])
            for name, dev, v4 in ((names["hub"], f"{tag}hb", HUB_LINK4),
                                  (names["host"], f"{tag}tb", HOST_LINK4)):
                ip("-n", name, "addr", "add", f"{v4}/24", "dev", dev)
                ip("-n", name, "link", "set", dev, "up")
        subprocess.run(netns_exec(names["hub"], "sysctl", "-qw",
                                  f"net.ipv4.ping_group_range={ALL_GROUPS}"),
                       check=True, capture_output=True, timeout=30)
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


# --------------------------------------------------------------------------- files


def write_random_file(path: Path, size: int) -> str:
    """`size` random bytes at `path`; their sha256 hex."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- DNS


def dns_answer(query: bytes, name: str, v4: str, v6: str) -> bytes | None:
    """The answer to one DNS query: A/AAAA records for `name`, an empty NOERROR for its other
    types, NXDOMAIN for any other name, FORMERR for what is not one plain question; None
    for what is not a query at all (too short, or a response)."""
    if len(query) < 12 or len(query) > MAX_DNS_QUERY:
        return None
    ident, flags, qdcount = struct.unpack_from("!HHH", query)
    if flags & 0x8000:  # QR: a response, never answered
        return None
    rd = flags & 0x0100
    labels, offset = [], 12
    try:
        while (length := query[offset]) != 0:
            if length > 63:
                raise IndexError("compressed or bad label")
            labels.append(query[offset + 1:offset + 1 + length].decode("ascii"))
            offset += 1 + length
        qtype, qclass = struct.unpack_from("!HH", query, offset + 1)
    except (IndexError, struct.error, UnicodeDecodeError):
        qdcount = 0
    if qdcount != 1:
        return struct.pack("!HHHHHH", ident, 0x8000 | rd | 1, 0, 0, 0, 0)
    question = query[12:offset + 5]
    asked = ".".join(labels).lower()
    records = b""
    if asked != name.lower():
        rcode, count = 3, 0
    else:
        rcode, count = 0, 0
        if qclass == 1 and qtype in (1, 28):
            family, address = (socket.AF_INET, v4) if qtype == 1 else (socket.AF_INET6, v6)
            data = socket.inet_pton(family, address)
            records = struct.pack("!HHHIH", 0xC00C, qtype, 1, DNS_TTL, len(data)) + data
            count = 1
    header = struct.pack("!HHHHHH", ident, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, count,
                         0, 0)
    return header + question + records


def serve_dns(sock: socket.socket, name: str, v4: str, v6: str) -> None:
    while True:
        query, address = sock.recvfrom(65535)
        answer = dns_answer(query, name, v4, v6)
        if answer is not None:
            sock.sendto(answer, address)


# --------------------------------------------------------------------------- TCP servers


class _DualStack:
    address_family = socket.AF_INET6
    request_queue_size = HTTP_BACKLOG
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()  # type: ignore[misc]


class HttpServer(_DualStack, http.server.ThreadingHTTPServer):
    """Files over HTTP/1.0 on both families."""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """The folder's files, and /hold: "held" after HOLD_SECONDS (connections that overlap)."""

    def do_GET(self) -> None:
        if self.path != "/hold":
            super().do_GET()
            return
        time.sleep(HOLD_SECONDS)
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"held\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


class SinkHandler(socketserver.BaseRequestHandler):
    """Read to the end, answer the sha256 hex of what was read, close."""

    def handle(self) -> None:
        digest = hashlib.sha256()
        while data := self.request.recv(1 << 16):
            digest.update(data)
        self.request.sendall(digest.hexdigest().encode() + b"\n")


class SinkServer(_DualStack, socketserver.ThreadingTCPServer):
    pass


def serve(folder: Path) -> None:
    """The outside's servers (module docstring) until killed; "ready" on stdout once they all
    listen."""
    dns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    dns.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dns.bind(("::", DNS_PORT))
    http_server = HttpServer(("::", HTTP_PORT),
                             functools.partial(QuietHandler, directory=str(folder)))
    sink = SinkServer(("::", SINK_PORT), SinkHandler)
    threads = [threading.Thread(target=serve_dns, args=(dns, NAME, OUT4, OUT6), daemon=True),
               threading.Thread(target=http_server.serve_forever, daemon=True),
               threading.Thread(target=sink.serve_forever, daemon=True)]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    threads[0].join()


@contextlib.asynccontextmanager
async def servers(netns: str, folder: Path, log_dir: Path) -> AsyncIterator[None]:
    """`serve` and an iperf3 server (port IPERF3_PORT) running in `netns`, stopped on exit
    (only these two processes, by PID)."""
    argv = netns_exec(netns, sys.executable, "-m", "tests.support.outside", "serve", "--dir",
                      str(folder))
    started: list[trio.Process] = []
    try:
        with open(log_dir / "outside.log", "wb") as errors:
            serving = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE,
                                                       stderr=errors, cwd=ROOT)
            started.append(serving)
            started.append(await trio.lowlevel.open_process(
                netns_exec(netns, "iperf3", "-s", "-p", str(IPERF3_PORT)),
                stdout=errors, stderr=errors))
        assert serving.stdout is not None
        with trio.fail_after(START_TIMEOUT):
            said = await serving.stdout.receive_some(64)
            while not await _listening(netns, IPERF3_PORT):
                await trio.sleep(0.1)
        if said.strip() != b"ready":
            raise RuntimeError(f"the outside's servers did not start: {said!r}, see "
                               f"{log_dir / 'outside.log'}")
        yield
    finally:
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with trio.move_on_after(5), trio.CancelScope(shield=True):
                await process.wait()


async def _listening(netns: str, port: int) -> bool:
    result = await trio.run_process(netns_exec(netns, "ss", "-Htln", f"sport = :{port}"),
                                    capture_stdout=True, check=False)
    return bool(result.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="run the outside's servers")
    serve_parser.add_argument("--dir", type=Path, required=True, help="the folder HTTP serves")
    args = parser.parse_args()
    serve(args.dir)


if __name__ == "__main__":
    main()
