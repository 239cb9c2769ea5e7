"""Throughput of the wire codec (tunnel/wire.py) on one CPU, in process, without TLS.

Measures, for 64-byte and 1500-byte PLAIN frames in batches of 64:
  encode   send_frames(batch) -> bytes (one FRAMES record);
  decode   receive_data(record) + next_events(), the record in one chunk;
  decode/16K  the same, the bytes fed in 16 KiB chunks (the size of a TLS record);
then, with --strategies, three ways to build the per-frame headers when encoding.
Numbers are frames/s and Gbit/s of frame bytes (headers not counted), best of three.
Run: .venv/bin/python bench/wire.py [--seconds 1.0] [--strategies]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.segmentation import rate
from netstack.frame import PLAIN, Frame
from tunnel.wire import FRAME_HEADER, Frames, WireConnection, _plain_header, _plain_headers

BATCH = 64
TLS_RECORD = 16 * 1024


def open_pair() -> tuple[WireConnection, WireConnection]:
    """A client and a server past HELLO and AUTH."""
    client = WireConnection("client", name="bench-client", offloads=0, mtu=1500)
    server = WireConnection("server", name="bench-server", offloads=0, mtu=1500)
    server.receive_data(client.send_hello())
    client.receive_data(server.send_hello())
    client.next_events()
    server.receive_data(client.send_auth(b"certificate", b"signature"))
    server.next_events()
    server.accept_auth()
    return client, server




def report(name: str, size: int, calls_per_s: float) -> None:
    fps = calls_per_s * BATCH
    print(f"{name:<14} {size:>5} B  {fps / 1e6:6.2f} Mframes/s  {fps * size * 8 / 1e9:6.2f} Gbit/s"
          f"  {1e9 / fps:6.0f} ns/frame")


def bench_codec(size: int, seconds: float) -> None:
    client, server = open_pair()
    batch = [Frame(os.urandom(size)) for _ in range(BATCH)]
    record = client.send_frames(batch)
    chunks = [record[i:i + TLS_RECORD] for i in range(0, len(record), TLS_RECORD)]

    def encode() -> None:
        client.send_frames(batch)

    def decode() -> None:
        server.receive_data(record)
        events = server.next_events()
        assert isinstance(events[0], Frames)

    def decode_chunked() -> None:
        events = []
        for chunk in chunks:
            server.receive_data(chunk)
            events += server.next_events()
        assert len(events) == 1

    report("encode", size, rate(encode, seconds))
    report("decode", size, rate(decode, seconds))
    report("decode/16K", size, rate(decode_chunked, seconds))


def bench_strategies(size: int, seconds: float) -> None:
    """Per-frame header building: pack each, a cache for PLAIN, or pack_into one bytearray."""
    frames = [Frame(os.urandom(size)) for _ in range(BATCH)]
    pack = FRAME_HEADER.pack
    pack_into = FRAME_HEADER.pack_into

    def pack_each() -> bytes:
        parts: list[bytes] = [b""]
        append = parts.append
        for frame in frames:
            data = frame.data
            append(pack(len(data), *frame.offload))
            append(data)
        return b"".join(parts)

    def plain_cache() -> bytes:
        parts: list[bytes] = [b""]
        append = parts.append
        cache = _plain_headers
        for frame in frames:
            data = frame.data
            length = len(data)
            offload = frame.offload
            if offload is PLAIN:
                append(cache.get(length) or _plain_header(length))
            else:
                append(pack(length, *offload))
            append(data)
        return b"".join(parts)

    def one_bytearray() -> bytes:
        headers = bytearray(FRAME_HEADER.size * len(frames))
        view = memoryview(headers)
        parts: list[bytes | memoryview] = [b""]
        append = parts.append
        at = 0
        for frame in frames:
            data = frame.data
            pack_into(headers, at, len(data), *frame.offload)
            append(view[at:at + FRAME_HEADER.size])
            append(data)
            at += FRAME_HEADER.size
        return b"".join(parts)

    for name, work in (("pack each", pack_each), ("PLAIN cache", plain_cache),
                       ("pack_into", one_bytearray)):
        report(name, size, rate(work, seconds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per case")
    parser.add_argument("--strategies", action="store_true",
                        help="also compare ways of building frame headers")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, batches of {BATCH} PLAIN frames")
    for size in (64, 1500):
        bench_codec(size, args.seconds)
    if args.strategies:
        for size in (64, 1500):
            bench_strategies(size, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
