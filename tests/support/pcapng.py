"""A pcapng reader for tests: reads back what netstack/pcap.py writes (little-endian, one
section; blocks other than Enhanced Packet Blocks are skipped), with its own block layouts
from the pcapng draft (draft-ietf-opsawg-pcapng 4.1-4.3) rather than the writer's, so a
mistake in the writer's layouts does not cancel out.  Not a general pcapng parser."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

SECTION_HEADER = 0x0A0D0D0A
ENHANCED_PACKET = 6
BYTE_ORDER_MAGIC = 0x1A2B3C4D
EPB_FLAGS_OPTION = 2
END_OF_OPTIONS = 0
# epb_flags bits 0-1: 1 inbound, 2 outbound (seen from the port).
DIRECTIONS = {1: "in", 2: "out"}


class CapturedFrame(NamedTuple):
    """One frame read back from a capture file."""

    timestamp: float
    data: bytes
    orig_len: int
    direction: str  # "in", "out", or "" when the block has no direction


def read_pcapng(path: Path) -> list[CapturedFrame]:
    blob = Path(path).read_bytes()
    if len(blob) < 12 or struct.unpack_from("<I", blob)[0] != SECTION_HEADER:
        raise ValueError(f"{path}: not a pcapng file (first block {blob[:4].hex()})")
    if struct.unpack_from("<I", blob, 8)[0] != BYTE_ORDER_MAGIC:
        raise ValueError(f"{path}: not a little-endian pcapng file")
    frames: list[CapturedFrame] = []
    pos = 0
    while pos < len(blob):
        if len(blob) - pos < 12:
            raise ValueError(f"{path}: {len(blob) - pos} stray bytes at offset {pos}")
        block_type, block_len = struct.unpack_from("<II", blob, pos)
        if block_len < 12 or block_len % 4 or pos + block_len > len(blob):
            raise ValueError(f"{path}: bad block length {block_len} at offset {pos}")
        if struct.unpack_from("<I", blob, pos + block_len - 4)[0] != block_len:
            raise ValueError(f"{path}: block at offset {pos} ends with another length")
        if block_type == ENHANCED_PACKET:
            # interface id, timestamp high and low, captured length, original length
            _, ts_high, ts_low, captured, orig_len = struct.unpack_from("<IIIII", blob, pos + 8)
            data_at = pos + 28
            direction = ""
            option = data_at + (captured + 3) // 4 * 4
            while option + 4 <= pos + block_len - 4:
                code, length = struct.unpack_from("<HH", blob, option)
                if code == END_OF_OPTIONS:
                    break
                if code == EPB_FLAGS_OPTION and length == 4:
                    bits = struct.unpack_from("<I", blob, option + 4)[0] & 3
                    direction = DIRECTIONS.get(bits, "")
                option += 4 + (length + 3) // 4 * 4
            frames.append(CapturedFrame(((ts_high << 32) | ts_low) / 1_000_000,
                                        blob[data_at:data_at + captured], orig_len, direction))
        pos += block_len
    return frames
