"""The Internet checksum (RFC 1071), the one implementation: sums as big integers.

`sum16` gives an integer congruent, modulo 0xFFFF, to the ones' complement sum of a buffer's
16-bit words; sums of pieces add up (pseudo-header + header + payload), and `checksum`,
`folded` and `udp_checksum` turn a total into the field a header carries.  A received
packet whose total, checksum field included, is 0 modulo 0xFFFF is intact (`verifies`).
"""

from __future__ import annotations

_FOLD_BELOW_BITS = 1024  # below this, one `% 0xFFFF` is cheaper than another fold
_FOLD_SCHEDULES_CACHED = 64  # buffer lengths whose fold masks are kept (segment sizes recur)
_fold_schedules: dict[int, tuple[tuple[int, int], ...]] = {}


def _fold_schedule(length: int) -> tuple[tuple[int, int], ...]:
    """The (shift, mask) steps that bring a `length`-byte number under _FOLD_BELOW_BITS.

    2**s == 1 (mod 0xFFFF) whenever 16 divides s, so x -> (x >> s) + (x & (2**s - 1)) keeps
    x's class modulo 0xFFFF; shift/and/add run at memory speed where `%` divides once per
    30-bit digit, and building the masks costs as much as using them, hence the cache."""
    steps = _fold_schedules.get(length)
    if steps is None:
        bits, folds = length * 8, []
        while bits > _FOLD_BELOW_BITS:
            shift = ((bits + 31) >> 5) << 4  # half, rounded up to a multiple of 16
            folds.append((shift, (1 << shift) - 1))
            bits = shift + 1
        steps = tuple(folds)
        if len(_fold_schedules) >= _FOLD_SCHEDULES_CACHED:
            _fold_schedules.clear()
        _fold_schedules[length] = steps
    return steps


def sum16(buf: bytes | memoryview) -> int:
    """A non-negative integer congruent, modulo 0xFFFF, to the ones' complement sum of buf's
    16-bit big-endian words (an odd last byte padded with zero)."""
    x = int.from_bytes(buf, "big")
    length = len(buf)
    if length & 1:
        x <<= 8
        length += 1
    if length * 8 > _FOLD_BELOW_BITS:
        for shift, mask in _fold_schedule(length):
            x = (x >> shift) + (x & mask)
    return x


def checksum(total: int) -> int:
    """The Internet checksum (complemented fold) for a sum from sum16 and friends."""
    return -total % 0xFFFF


def folded(total: int) -> int:
    """The folded, uncomplemented sum, as a partial checksum field holds it."""
    return total % 0xFFFF or 0xFFFF


def udp_checksum(total: int) -> int:
    """A UDP checksum: 0 means "none" on the wire, so a computed 0 is sent as 0xFFFF."""
    return -total % 0xFFFF or 0xFFFF


def verifies(total: int) -> bool:
    """Does a received packet's sum (its checksum field included) show it intact?"""
    return total % 0xFFFF == 0


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """The sum of the IPv4 or IPv6 pseudo-header (RFC 768, RFC 8200 8.1) for an upper-layer
    packet of `length` bytes: addresses, protocol and length."""
    return sum16(src) + sum16(dst) + protocol + (length >> 16) + (length & 0xFFFF)


def internet_checksum(data: bytes | memoryview) -> int:
    """The checksum field for `data` alone (an IPv4 header, an ICMPv4 message)."""
    return checksum(sum16(data))
