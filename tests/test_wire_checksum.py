"""The one Internet checksum against RFC 1071's word-by-word definition."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from netstack.wire.checksum import (
    checksum,
    internet_checksum,
    pseudo_header_sum,
    sum16,
    udp_checksum,
    verifies,
)


def rfc1071(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(max_size=3000))
def test_checksum_matches_rfc1071_for_any_length(data):
    # 0x0000 and 0xFFFF are the same number in ones' complement; both checksums are valid.
    assert checksum(sum16(data)) % 0xFFFF == rfc1071(data) % 0xFFFF
    assert internet_checksum(data) == checksum(sum16(data))


@given(st.binary(min_size=1, max_size=1500), st.data())
def test_a_buffer_carrying_its_checksum_verifies_and_a_flipped_bit_does_not(data, draw):
    sealed = struct.pack("!H", internet_checksum(b"\0\0" + data)) + data
    assert verifies(sum16(sealed))
    # A flipped bit moves the sum by a power of two, never by a multiple of 0xFFFF.
    bit = draw.draw(st.integers(0, len(sealed) * 8 - 1))
    damaged = bytearray(sealed)
    damaged[bit // 8] ^= 0x80 >> (bit % 8)
    assert not verifies(sum16(bytes(damaged)))


def test_pseudo_header_sum_is_the_sum_of_the_pseudo_header_bytes():
    src, dst = bytes(range(1, 17)), bytes(range(17, 33))
    pseudo = src + dst + struct.pack("!I3xB", 70000, 17)
    assert pseudo_header_sum(src, dst, 17, 70000) % 0xFFFF == sum16(pseudo) % 0xFFFF


def test_udp_checksum_never_sends_zero():
    # A datagram whose complemented sum is 0 must carry 0xFFFF: 0 means "no checksum".
    assert udp_checksum(0xFFFF) == 0xFFFF
