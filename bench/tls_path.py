"""The endpoint's per-byte cost between the switch and the socket, in process: batches of 64 KiB
TSO frames -> WireConnection.send_frames -> TLSStream.send_all -> TCP over loopback ->
TLSStream.receive_view -> WireConnection.receive_events -> frames (Link._reader's path),
both ends in one Trio run; CPU seconds (user + system, the process's) per GB of frame
bytes.  Interleaved A/B between source trees, each run in a child process with that tree
first on sys.path.

Why: on the shared 2-vCPU machine a whole direct TAP pair (bench/direct_ab.py) moves ±10 %
between runs with the other load; one process's CPU time per GB of the same work moves
much less, so a change to tunnel/tls.py or tunnel/wire.py's data path shows here first.

Run: .venv/bin/python bench/tls_path.py --tree OLD --tree NEW [--rounds 6] [--gbytes 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRAME_BYTES = 65_000  # a TSO frame, as a TAP hands them over
FRAMES_PER_BATCH = 4  # what the TAP reader passes per wake-up under a stream, about


async def _child_run(gbytes: float) -> dict[str, float]:
    import trio

    from bench.wire import open_pair
    from netstack.frame import Frame
    from tunnel.keys import client_ssl_context, generate_identity, server_ssl_context
    from tunnel.session import tune_tcp
    from tunnel.tls import TLSStream

    with tempfile.TemporaryDirectory(prefix="tlspath-") as tmp:
        server_context = server_ssl_context(generate_identity(Path(tmp)))
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client_stream = await trio.open_tcp_stream("127.0.0.1", port)
    server_stream = await listener.accept()
    for stream in (client_stream, server_stream):
        tune_tcp(stream.socket)
    # An endpoint's read size where the tree has one (older trees: their only one).
    import tunnel.tls
    read_size = getattr(tunnel.tls, "MAX_SOCKET_READ", None)
    sizing = {} if read_size is None else {"read_size": read_size}
    sender = TLSStream(client_stream, client_ssl_context(), server_side=False, **sizing)
    receiver = TLSStream(server_stream, server_context, server_side=True, **sizing)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.do_handshake)
        nursery.start_soon(receiver.do_handshake)
    client, server = open_pair()
    # TSO metadata as a TAP gives it: gso TCPv4, csum partial.
    offload = (1, 1, 66, 1448, 34, 16)
    batch = [Frame(os.urandom(FRAME_BYTES), offload) for _ in range(FRAMES_PER_BATCH)]
    total = int(gbytes * 1e9)
    received = 0

    async def send() -> None:
        sent = 0
        while sent < total:
            await sender.send_all(client.send_frames(batch))
            sent += FRAME_BYTES * FRAMES_PER_BATCH

    # What Link._reader does in the tree under test (older trees: receive_some and
    # receive_data + next_events).
    view = getattr(receiver, "receive_view", None)
    cpu0, wall0 = time.process_time(), time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while received < total:
            if view is not None:
                events = server.receive_events(await view())
            else:
                server.receive_data(await receiver.receive_some())
                events = server.next_events()
            for event in events:
                received += sum(len(frame.data) for frame in event.frames)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {"cpu_s_per_gb": round(cpu / (received / 1e9), 3),
            "gbits": round(received * 8 / wall / 1e9, 2)}


def child(tree: str, gbytes: float) -> None:
    sys.path.insert(0, tree)
    import trio

    # What `vhostvpn host` does before it runs (tunnel/cli/launch.run_role), as far as the
    # tree under test does it.
    from tunnel.cli import launch
    launch.tune_gc()
    getattr(launch, "tune_malloc", lambda: None)()

    print(json.dumps(trio.run(_child_run, gbytes)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--gbytes", type=float, default=1.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.gbytes)
        return 0
    if not args.tree:
        parser.error("give --tree at least once")
    results: dict[str, list[dict]] = {str(t): [] for t in args.tree}
    for round_ in range(args.rounds):
        trees = args.tree if round_ % 2 == 0 else list(reversed(args.tree))
        for tree in trees:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(tree.resolve()), "--gbytes",
                 str(args.gbytes)], capture_output=True, text=True, cwd=tree, timeout=300)
            row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 \
                else {"error": out.stderr[-500:]}
            row["load_avg"] = Path("/proc/loadavg").read_text().split()[0]
            results[str(tree)].append(row)
            print(round_, tree, json.dumps(row), flush=True)
    base = None
    for tree, rows in results.items():
        cpu = [r["cpu_s_per_gb"] for r in rows if "cpu_s_per_gb" in r]
        median = statistics.median(cpu) if cpu else float("nan")
        base = base or median
        print(f"{tree}: {median:.3f} CPU s/GB (range {min(cpu, default=0):.3f}-"
              f"{max(cpu, default=0):.3f}), {median / base:.3f}x the first tree")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
