"""Numbers from the specs, named once: the vhost-user protocol (QEMU docs/interop/vhost-user.rst)
and virtio 1.x (split rings, virtio-net).  Every limit the backend enforces lives here too, next
to where it comes from.
"""

from __future__ import annotations

import enum

from netstack.frame import MAX_FRAME_LEN


class Request(enum.IntEnum):
    """vhost-user front-end -> back-end requests."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# Message header: u32 request, u32 flags, u32 size (host byte order; little-endian on x86).
HEADER_SIZE = 12
FLAG_VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
REPLY_FLAGS = FLAG_VERSION | FLAG_REPLY  # QEMU rejects a reply whose flags are not exactly 0x5

# Largest payload we accept: a full memory table is 8 + 8 * 32 bytes; rust-vmm caps at 4096.
MAX_PAYLOAD = 4096
# SCM_RIGHTS fds one message may carry (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS = 8
MAX_MEM_REGIONS = 8

# Payload of SET_VRING_KICK/CALL/ERR: bits 0-7 queue index, bit 8 "no fd, poll instead".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of vhost-user protocol features (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CONFIG = 9
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class Feature(enum.IntEnum):
    """Bit numbers of virtio (and vhost) device features (GET/SET_FEATURES)."""

    NET_CSUM = 0
    NET_GUEST_CSUM = 1
    NET_CTRL_GUEST_OFFLOADS = 2
    NET_MTU = 3
    NET_MAC = 5
    NET_GSO = 6
    NET_GUEST_TSO4 = 7
    NET_GUEST_TSO6 = 8
    NET_GUEST_ECN = 9
    NET_GUEST_UFO = 10
    NET_HOST_TSO4 = 11
    NET_HOST_TSO6 = 12
    NET_HOST_ECN = 13
    NET_HOST_UFO = 14
    NET_MRG_RXBUF = 15
    NET_STATUS = 16
    NET_CTRL_VQ = 17
    NET_MQ = 22
    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26  # VHOST_F_LOG_ALL
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34


def bit(n: int) -> int:
    return 1 << n


def has(mask: int, n: int) -> bool:
    """True if feature bit number `n` is set in `mask` (bit numbers are not masks)."""
    return bool(mask >> n & 1)


# Split virtqueue layout (virtio 1.x, 2.7).
DESC_SIZE = 16
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
# Largest split ring (virtio 1.x: Queue Size <= 32768; DPDK enforces the same).
MAX_QUEUE_SIZE = 32768
# Largest indirect table we walk (libvhost-user's limit is 1024 entries).
MAX_INDIRECT_ENTRIES = 1024
# Most buffers one chain may hand us (DPDK BUF_VECTOR_MAX is 256; TSO frames from Linux use
# at most MAX_SKB_FRAGS + 2 = 19, big-packet RX chains 19 as well).
MAX_CHAIN_BUFFERS = 1024
# A chain's total length must fit in 32 bits (virtio 1.x, 2.7.13.1).
MAX_CHAIN_BYTES = 1 << 32

# The largest frame the device takes from a driver or places for it, TSO/UFO/USO frames
# included: the switch's and the wire's limit (netstack.frame.MAX_FRAME_LEN: a 64 KiB IP
# packet behind an Ethernet header and two VLAN tags; Linux builds no GSO frame over 65536
# bytes, its GSO_MAX_SIZE).  Longer from a guest: dropped; longer toward a guest: it could
# never be placed, dropped too.
MAX_FRAME = MAX_FRAME_LEN
