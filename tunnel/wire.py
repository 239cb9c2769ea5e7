"""The vhostvpn wire protocol: records inside one TLS 1.3 stream, as a sans-I/O codec.

Called by tunnel/endpoint.py and tunnel/hub.py (bytes from and to the TLS stream); it must
never do I/O, read a clock, verify a signature or interpret a frame's contents.  The spec,
with byte layouts, is docs/protocol.md.

Rules of this file:
* Bytes in (`receive_data`), events out (`next_events`); `send_*` return the bytes to write.
  Everything that decides what may come next lives in the state table `_ACCEPTS` (with
  `_INTRO_ACCEPTS`, what an open version-2 hub link adds) and the transitions in `_on_hello`,
  `_on_auth`, `accept_auth` and `_on_close`.
* Every length a peer sends is checked where it is read, against a named limit, before
  anything is buffered for it: a record header is judged (type, flags, state, length) as soon
  as its 8 bytes are here, so before authentication a peer can make us hold at most a few KiB.
* A violation by the peer raises `WireError`; from then on the connection is dead (every call
  raises it again) except `send_close`, so the application can say why.  Misuse by the
  application (sending out of order) raises `WireUsageError`, a bug in our code, not the peer's.
* Frame metadata is carried, never judged: the tunnel's switch port polices and adapts frames
  exactly as it does a guest's.

Theory of operation.  Both sides send HELLO first; each learns the other's version range and
picks the highest common version (both compute the same answer).  The client then signs the
server's challenge (tunnel/keys.py) and sends AUTH; the server's codec hands the `Auth` event
up and *pauses*: it decodes nothing more until the application verified the proof and called
`accept_auth()` (or sent CLOSE).  Pausing lets the client send FRAMES right behind AUTH
without a round trip, while FRAMES sent *before* AUTH are refused ('unauthenticated') as soon
as their header arrives.  Then FRAMES, PING and PONG flow both ways until one side sends
CLOSE; after CLOSE nothing more is sent or accepted.  The record header, HELLO and CLOSE are
frozen for every version: they are what two different releases must understand of each other.

Version 2 adds the direct-path records, on a hub link only (a connection made with
`introductions=True` on both sides, and version 2 negotiated): the endpoint (client) may send
ADVERTISE (where it accepts direct sessions) once authenticated -- right behind AUTH, where the
server's codec holds it like FRAMES -- and the hub (server) sends INTRO (the peers the endpoint
may reach directly: `IntroEntry`, read lazily).  Anywhere else they are `unexpected`,
so a direct session (endpoint to endpoint, `introductions=False`) refuses both, and a
version-1 peer never gets one (`send_advertise`/`send_intro` refuse to make it).

Path of a frame out (`send_frames`):
1. length check: frames outside 14..MAX_FRAME are dropped and counted (`sent.dropped`),
   since the peer would refuse the whole connection for one;
2. per-frame header: a PLAIN frame's 14 bytes come from a cache keyed by length, any other
   frame's are packed from its offload 6-tuple;
3. the record's 8-byte header goes in the slot kept for it at the front; a batch past
   MAX_FRAMES_PER_RECORD frames or MAX_RECORD_PAYLOAD bytes (rare) is regrouped into as many
   records as it takes (`_send_records`);
4. one `b"".join` of headers and frame bytes: the frame bytes are copied once, into the
   result (TLS copies them again when it encrypts).
Path of a frame in (`receive_data`, `next_events`):
1. `receive_data` keeps the bytes object it is given (no copy) or queues it behind the
   unparsed rest;
2. the record header is read with `unpack_from` and judged at once;
3. only when a header or a record spans chunks are the queued chunks joined: once when its
   header is complete, once when all of it is (so a byte is copied at most twice here);
4. each frame header is read with one `unpack_from` (a fast path tells PLAIN metadata by two
   zero integers, and then the frame gets the shared PLAIN object, so `offload is PLAIN`
   holds downstream);
5. the frame bytes are sliced out of the buffer: `bytes[a:b]`, the one copy.
`receive_events` (a view, nothing buffered) takes a view holding exactly one FRAMES record
the state accepts in one step: steps 2, 4 and 5 with `_decode`'s checks, no trip through it.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import struct
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from netstack.frame import ALL_OFFLOADS, ETH_HEADER_LEN, MAX_FRAME_LEN, PLAIN, Frame, Offload
from tunnel.introductions import (
    MAX_INTRO_ADDRESSES,
    MAX_INTRO_IPS,
    MAX_INTRO_MACS,
    MAX_INTRO_PEERS,
    DirectPeer,
)
from tunnel.keys import FINGERPRINT_BYTES, format_fingerprint, parse_fingerprint

# --- Limits and numbers (docs/protocol.md, "Records") ---------------------------------------

MIN_SUPPORTED_VERSION = 1
MAX_SUPPORTED_VERSION = 2
INTRO_VERSION = 2  # the first version with ADVERTISE and INTRO

RECORD_HEADER = struct.Struct("!BBHI")  # type, flags (0), reserved (0), payload length
RECORD_HEADER_LEN = RECORD_HEADER.size  # 8
MAX_RECORD_PAYLOAD = 4 * 1024 * 1024
# The most a connection buffers once `next_events` has run: one incomplete record.
MAX_BUFFERED = RECORD_HEADER_LEN + MAX_RECORD_PAYLOAD

# Record types (version 1).
HELLO = 1
AUTH = 2
FRAMES = 3
PING = 4
PONG = 5
CLOSE = 6
# Version 2: direct paths.
ADVERTISE = 7
INTRO = 8
RECORD_NAMES = {HELLO: "HELLO", AUTH: "AUTH", FRAMES: "FRAMES", PING: "PING", PONG: "PONG",
                CLOSE: "CLOSE", ADVERTISE: "ADVERTISE", INTRO: "INTRO"}

# HELLO: min version, max version, offloads accepted, MTU, challenge, name length; then the
# name, then (from later versions) extensions a version-1 reader skips.
HELLO_FIXED = struct.Struct("!HHIH32sB")
CHALLENGE_LEN = 32
MAX_NAME_BYTES = 64
MAX_HELLO_PAYLOAD = 1024
MIN_MTU = 68  # the IPv4 minimum (RFC 791)

# AUTH: u16 length + certificate (DER), u16 length + signature.
AUTH_LEN = struct.Struct("!H")
MAX_CERTIFICATE_BYTES = 4096
MAX_SIGNATURE_BYTES = 512
MAX_AUTH_PAYLOAD = 2 + MAX_CERTIFICATE_BYTES + 2 + MAX_SIGNATURE_BYTES

# FRAMES: per frame, length then the six virtio_net_hdr offload fields, then the frame.
FRAME_HEADER = struct.Struct("!IBBHHHH")
FRAME_HEADER_LEN = FRAME_HEADER.size  # 14
# The same 14 bytes as length + two integers spanning the 10 metadata bytes: both zero is PLAIN.
_FRAME_HEADER_FAST = struct.Struct("!IHQ")
_OFFLOAD = struct.Struct("!BBHHHH")
MIN_FRAME = ETH_HEADER_LEN
# Largest frame: an IP datagram at its 16-bit limit (a full 64 KiB GSO super-frame; Linux
# keeps a GSO skb under 64 KiB) + Ethernet header + two VLAN tags (802.1ad QinQ).
MAX_FRAME = MAX_FRAME_LEN  # 65557, the switch's limit too
MAX_FRAMES_PER_RECORD = 8192

# PING / PONG: nonce, sender's monotonic clock in ns.
PING_PAYLOAD = struct.Struct("!QQ")

# CLOSE: u16 code, then the reason in UTF-8.
CLOSE_CODE = struct.Struct("!H")
MAX_REASON_BYTES = 256
MAX_CLOSE_PAYLOAD = CLOSE_CODE.size + MAX_REASON_BYTES

# ADVERTISE: u8 count, then per address u8 family (4 | 6), 4 | 16 address bytes, u16 port.
# INTRO: u16 count, then per peer u8 name length + name (UTF-8), the 32-byte fingerprint
# digest, u8 address count + addresses as in ADVERTISE, u16 MAC count + 6 bytes each, u16
# IPv4 count + 4 bytes each, u16 IPv6 count + 16 bytes each.  Limits: tunnel/introductions.py.
U8 = struct.Struct("!B")
U16 = struct.Struct("!H")
ADDRESS_PORT = struct.Struct("!H")
FAMILY_BYTES = {4: 4, 6: 16}
MAX_ADDRESS_LEN = 1 + 16 + ADDRESS_PORT.size
MAX_ADVERTISE_PAYLOAD = 1 + MAX_INTRO_ADDRESSES * MAX_ADDRESS_LEN
# ADVERTISEs one connection may send: an endpoint sends one, right after AUTH (and another
# only if where it listens changes).  A flood is cut here, in the codec, before a read's worth
# of them (a 256 KiB read holds 23,000) is decoded and handed to the hub.
MAX_ADVERTISES = 16
MAX_INTRO_PAYLOAD = MAX_RECORD_PAYLOAD


class CloseCode(enum.IntEnum):
    """Why a side closes.  A receiver takes any u16; these are the ones version 1 sends."""

    NORMAL = 0  # orderly shutdown
    PROTOCOL_ERROR = 1  # the peer broke this spec; the reason is WireError.reason
    VERSION = 2  # no common protocol version
    AUTH_FAILED = 3  # the client's certificate or signature was refused


# --- Events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The peer's HELLO.  `version` is the negotiated one; the peer's range comes with it."""

    version: int
    offloads: Offload
    mtu: int
    challenge: bytes
    name: str
    min_version: int
    max_version: int


@dataclass(frozen=True, slots=True)
class Auth:
    """The client's proof, for the server to verify (tunnel/keys.py), then `accept_auth()`."""

    certificate: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Frames:
    frames: list[Frame]


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int
    timestamp_ns: int


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int
    timestamp_ns: int


@dataclass(frozen=True, slots=True)
class Closed:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Eof:
    """The stream ended (receive_data(b"")) on a record boundary."""


@dataclass(frozen=True, slots=True)
class Advertise:
    """The endpoint's ADVERTISE (hub side): where it accepts direct sessions, (host, port)
    with host an IPv4/IPv6 literal; 0.0.0.0 or :: means "the address you see me from".
    Empty: it does not listen, but wants introductions."""

    addresses: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class IntroEntry:
    """One peer of an INTRO as the codec hands it up: its name, key and addresses decoded,
    its bindings (up to 256 MACs and 2 x 1,024 addresses) checked (counts, lengths, unicast
    MACs) but left as the record's bytes.  Reading them is the endpoint's work, spread over
    its loop turns (tunnel/direct.py DirectPeers.apply): a whole INTRO at the limits took
    ~2 s to decode into address objects at once.  Equal `data`, equal peer."""

    name: str
    fingerprint: str  # "SHA256:..."
    addresses: tuple[tuple[str, int], ...]
    data: bytes  # the whole entry, as encode_intro_entry made it
    at: int  # where its MAC count starts in `data`
    size: int  # MACs and addresses: the work of reading them

    def bindings(self) -> tuple[frozenset[bytes], frozenset[bytes], frozenset[bytes]]:
        """Its MACs, IPv4 and IPv6 addresses, packed (6, 4 and 16 bytes each)."""
        data, at, sets = self.data, self.at, []
        for item in (6, 4, 16):
            (count,) = U16.unpack_from(data, at)
            at += U16.size
            sets.append(frozenset([data[i:i + item] for i in range(at, at + item * count, item)]))
            at += item * count
        return sets[0], sets[1], sets[2]

    def decoded(self) -> DirectPeer:
        """The entry as a DirectPeer, addresses as ipaddress objects (status, tests)."""
        macs, ipv4, ipv6 = self.bindings()
        return DirectPeer(self.name, self.fingerprint, self.addresses, macs,
                          frozenset(map(ipaddress.IPv4Address, ipv4)),
                          frozenset(map(ipaddress.IPv6Address, ipv6)))


@dataclass(frozen=True, slots=True)
class Intro:
    """The hub's INTRO (endpoint side): the whole current set of peers it may reach
    directly; it replaces the previous one."""

    peers: tuple[IntroEntry, ...]


Event = Hello | Auth | Frames | Ping | Pong | Closed | Eof | Advertise | Intro


def negotiate_version(our_min: int, our_max: int, peer_min: int, peer_max: int) -> int | None:
    """The highest version both ranges hold, or None.  Both sides compute the same answer."""
    version = min(our_max, peer_max)
    return version if version >= max(our_min, peer_min) else None


# --- Errors ---------------------------------------------------------------------------------


class WireError(Exception):
    """The peer broke the protocol.  `reason` is a short machine word (docs/protocol.md)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def close_code(self) -> CloseCode:
        """The code to put in the CLOSE that tells the peer about this error."""
        return CloseCode.VERSION if self.reason == "version" else CloseCode.PROTOCOL_ERROR


class WireUsageError(RuntimeError):
    """The application called the codec out of order: a bug on our side, not the peer's."""


@dataclass(slots=True)
class Counters:
    """One direction's traffic: records, frames in FRAMES records, bytes on the wire."""

    records: int = 0
    frames: int = 0
    bytes: int = 0
    dropped: int = 0  # frames send_frames refused to put on the wire (length out of range)


# --- The receive state table ----------------------------------------------------------------
# What the peer may send next, and the most payload each record type may announce there.
# Every receive-side transition goes between these states; nothing else decides acceptance.


class _Receive(enum.Enum):
    HELLO = "awaiting HELLO"
    AUTH = "awaiting AUTH"  # server only: HELLO came, the client has not proven itself yet
    AUTH_PENDING = "AUTH received, awaiting accept_auth()"  # decoding paused
    OPEN = "open"
    CLOSED = "closed"


_ACCEPTS: dict[_Receive, dict[int, int]] = {
    _Receive.HELLO: {HELLO: MAX_HELLO_PAYLOAD, CLOSE: MAX_CLOSE_PAYLOAD},
    _Receive.AUTH: {AUTH: MAX_AUTH_PAYLOAD, PING: PING_PAYLOAD.size,
                    PONG: PING_PAYLOAD.size, CLOSE: MAX_CLOSE_PAYLOAD},
    _Receive.AUTH_PENDING: {},
    _Receive.OPEN: {FRAMES: MAX_RECORD_PAYLOAD, PING: PING_PAYLOAD.size,
                    PONG: PING_PAYLOAD.size, CLOSE: MAX_CLOSE_PAYLOAD},
    _Receive.CLOSED: {},
}
# What OPEN adds on a hub link of version >= INTRO_VERSION made with introductions=True, by
# the receiving side's role: the hub hears ADVERTISE, the endpoint hears INTRO.
_INTRO_ACCEPTS: dict[str, dict[int, int]] = {
    "server": {ADVERTISE: MAX_ADVERTISE_PAYLOAD},
    "client": {INTRO: MAX_INTRO_PAYLOAD},
}

# A PLAIN frame's header depends only on its length: cached (at most MAX_FRAME entries).
_plain_headers: dict[int, bytes] = {}


def _plain_header(length: int) -> bytes:
    header = _plain_headers[length] = FRAME_HEADER.pack(length, 0, 0, 0, 0, 0, 0)
    return header


class WireConnection:
    """One side of one tunnel connection.  No I/O: feed it bytes, take events and bytes out."""

    def __init__(
        self,
        role: Literal["client", "server"],
        *,
        name: str,
        offloads: int,
        mtu: int,
        min_version: int = MIN_SUPPORTED_VERSION,
        max_version: int = MAX_SUPPORTED_VERSION,
        challenge: bytes | None = None,
        introductions: bool = False,
    ) -> None:
        """`introductions`: this is a hub link, where the endpoint may ADVERTISE and the hub
        INTRO (from version 2); False (a direct session between endpoints) refuses both."""
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        if not MIN_SUPPORTED_VERSION <= min_version <= max_version <= MAX_SUPPORTED_VERSION:
            raise ValueError(
                f"versions {min_version}..{max_version}: this code speaks "
                f"{MIN_SUPPORTED_VERSION}..{MAX_SUPPORTED_VERSION}")
        self.name_bytes = name.encode()
        if len(self.name_bytes) > MAX_NAME_BYTES:
            raise ValueError(f"name is {len(self.name_bytes)} bytes of UTF-8, "
                             f"at most {MAX_NAME_BYTES}: {name!r}")
        if not MIN_MTU <= mtu <= 65535:
            raise ValueError(f"mtu {mtu}: want {MIN_MTU}..65535")
        if offloads & ~ALL_OFFLOADS:
            raise ValueError(f"offloads {offloads:#x}: unknown bits outside {ALL_OFFLOADS:#x}")
        if challenge is None:
            challenge = os.urandom(CHALLENGE_LEN)
        if len(challenge) != CHALLENGE_LEN:
            raise ValueError(f"challenge is {len(challenge)} bytes, want {CHALLENGE_LEN}")
        self.role = role
        self.name = name
        self.offloads = Offload(offloads)
        self.mtu = mtu
        self.min_version = min_version
        self.max_version = max_version
        self.challenge = bytes(challenge)
        self.introductions = introductions

        self.peer_hello: Hello | None = None
        self.version: int | None = None  # negotiated, once the peer's HELLO arrived
        # Server: the application accepted the client's AUTH.  Client: it sent AUTH.
        self.authenticated = False
        self.closed = False  # a CLOSE was sent or received
        self.sent = Counters()
        self.received = Counters()

        self._state = _Receive.HELLO
        self._accepts = _ACCEPTS[self._state]
        self._open_accepts = _ACCEPTS[_Receive.OPEN]  # set once the version is known
        self._advertises = 0  # ADVERTISE records received
        self._error: WireError | None = None
        self._eof = False
        self._eof_reported = False
        self._sent_hello = False
        self._sent_auth = False
        self._sent_close = False
        # Receive buffer: `_buf[_pos:]` is contiguous and unparsed; `_chunks` came after it,
        # the first from `_chunk_at` on (the rest of a chunk a gathered record began in);
        # `_chunks_len` counts their unparsed bytes.
        self._buf: bytes | memoryview = b""
        self._pos = 0
        self._chunks: deque[bytes] = deque()
        self._chunk_at = 0
        self._chunks_len = 0

    # --- sending: the path of a frame out ---------------------------------------------------

    def send_frames(self, frames: Sequence[Frame]) -> bytes:
        """All `frames` as FRAMES records: one, unless they pass a record's limits."""
        if not self._may_send_data():
            self._refuse_send("FRAMES")
        parts: list[bytes | memoryview] = [b""]  # slot for the record header
        append = parts.append
        cache = _plain_headers
        pack = FRAME_HEADER.pack
        plain = PLAIN
        lowest, highest = MIN_FRAME, MAX_FRAME
        size = 0
        for frame in frames:
            data = frame.data
            length = len(data)
            if lowest <= length <= highest:
                offload = frame.offload
                if offload is plain:
                    append(cache.get(length) or _plain_header(length))
                else:
                    append(pack(length, *offload))
                append(data)
                size += length
        count = len(parts) >> 1
        self.sent.dropped += len(frames) - count
        if not count:
            return b""
        size += count * FRAME_HEADER_LEN
        if count > MAX_FRAMES_PER_RECORD or size > MAX_RECORD_PAYLOAD:
            return self._send_records(parts)
        parts[0] = RECORD_HEADER.pack(FRAMES, 0, 0, size)
        sent = self.sent
        sent.records += 1
        sent.frames += count
        sent.bytes += RECORD_HEADER_LEN + size
        return b"".join(parts)

    def _send_records(self, parts: list[bytes | memoryview]) -> bytes:
        """The rare batch past a record's limits: `parts` (slot, then header, data pairs)
        regrouped into as many records as it takes."""
        out: list[bytes | memoryview] = []
        record_at = count = size = 0
        for index in range(1, len(parts), 2):
            entry = FRAME_HEADER_LEN + len(parts[index + 1])
            if count == 0 or count == MAX_FRAMES_PER_RECORD or size + entry > MAX_RECORD_PAYLOAD:
                if count:
                    out[record_at] = RECORD_HEADER.pack(FRAMES, 0, 0, size)
                    self._count_sent_record(count, size)
                record_at = len(out)
                out.append(b"")
                count = size = 0
            out.append(parts[index])
            out.append(parts[index + 1])
            count += 1
            size += entry
        out[record_at] = RECORD_HEADER.pack(FRAMES, 0, 0, size)
        self._count_sent_record(count, size)
        return b"".join(out)

    def _count_sent_record(self, frames: int, size: int) -> None:
        self.sent.records += 1
        self.sent.frames += frames
        self.sent.bytes += RECORD_HEADER_LEN + size

    def send_hello(self) -> bytes:
        """Our HELLO: the first record we send."""
        if self._sent_hello or self._sent_close or self._error:
            self._refuse_send("HELLO")
        self._sent_hello = True
        payload = HELLO_FIXED.pack(self.min_version, self.max_version, int(self.offloads),
                                   self.mtu, self.challenge, len(self.name_bytes))
        return self._record(HELLO, payload + self.name_bytes)

    def send_auth(self, certificate: bytes, signature: bytes) -> bytes:
        """Client: the certificate (DER) and the signature over the server's challenge."""
        if (self.role != "client" or not self._sent_hello or self.version is None
                or self._sent_auth or self._sent_close or self._error):
            self._refuse_send("AUTH")
        if not 0 < len(certificate) <= MAX_CERTIFICATE_BYTES:
            raise ValueError(f"certificate is {len(certificate)} bytes, "
                             f"want 1..{MAX_CERTIFICATE_BYTES}")
        if not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
            raise ValueError(f"signature is {len(signature)} bytes, "
                             f"want 1..{MAX_SIGNATURE_BYTES}")
        self._sent_auth = True
        self.authenticated = True
        payload = b"".join((AUTH_LEN.pack(len(certificate)), certificate,
                            AUTH_LEN.pack(len(signature)), signature))
        return self._record(AUTH, payload)

    @property
    def introducing(self) -> bool:
        """ADVERTISE and INTRO may flow on this connection: a hub link (`introductions`)
        where both sides speak version 2 or later."""
        return self.introductions and self.version is not None and self.version >= INTRO_VERSION

    def send_advertise(self, addresses: Sequence[tuple[str, int]]) -> bytes:
        """Client (endpoint), after AUTH: where it accepts direct sessions (empty: nowhere,
        but it wants introductions).  At most MAX_INTRO_ADDRESSES; 0.0.0.0 / :: stand for
        the address the hub sees this connection come from."""
        if self.role != "client" or not self.introducing or not self._may_send_data():
            self._refuse_send("ADVERTISE")
        if len(addresses) > MAX_INTRO_ADDRESSES:
            raise ValueError(f"{len(addresses)} addresses, at most {MAX_INTRO_ADDRESSES}")
        payload = U8.pack(len(addresses)) + b"".join(
            _encode_address(host, port, wildcard=True) for host, port in addresses)
        return self._record(ADVERTISE, payload)

    def send_intro(self, peers: Sequence[DirectPeer]) -> bytes:
        """Server (hub), after accept_auth(): the whole set of peers the endpoint may reach
        directly (ValueError if a peer or the set passes the limits)."""
        return self.send_intro_encoded([encode_intro_peer(peer) for peer in peers])

    def send_intro_encoded(self, entries: Sequence[bytes]) -> bytes:
        """`send_intro` with each peer already made by `encode_intro_peer` (the hub encodes
        a peer once for all the endpoints it is introduced to)."""
        if self.role != "server" or not self.introducing or not self._may_send_data():
            self._refuse_send("INTRO")
        if len(entries) > MAX_INTRO_PEERS:
            raise ValueError(f"{len(entries)} peers, at most {MAX_INTRO_PEERS}")
        payload = b"".join([U16.pack(len(entries)), *entries])
        if len(payload) > MAX_INTRO_PAYLOAD:
            raise ValueError(f"INTRO of {len(payload)} bytes, at most {MAX_INTRO_PAYLOAD}")
        return self._record(INTRO, payload)

    def send_ping(self, nonce: int, timestamp_ns: int) -> bytes:
        """A PING the peer echoes; `timestamp_ns` is our monotonic clock (the PONG returns it)."""
        if not self._may_send_control():
            self._refuse_send("PING")
        return self._record(PING, PING_PAYLOAD.pack(nonce, timestamp_ns))

    def send_pong(self, nonce: int, timestamp_ns: int) -> bytes:
        """The answer to a Ping event: both fields echoed unchanged."""
        if not self._may_send_control():
            self._refuse_send("PONG")
        return self._record(PONG, PING_PAYLOAD.pack(nonce, timestamp_ns))

    def send_close(self, code: int, reason: str = "") -> bytes:
        """CLOSE: the last record we send.  Allowed at any time, also after a WireError."""
        if self._sent_close:
            self._refuse_send("CLOSE")
        reason_bytes = reason.encode()
        if len(reason_bytes) > MAX_REASON_BYTES:
            # Cut on a character boundary: the reason is for people, the code for programs.
            reason_bytes = reason_bytes[:MAX_REASON_BYTES].decode(errors="ignore").encode()
        self._sent_close = True
        self.closed = True
        return self._record(CLOSE, CLOSE_CODE.pack(code) + reason_bytes)

    def _record(self, rtype: int, payload: bytes) -> bytes:
        self.sent.records += 1
        self.sent.bytes += RECORD_HEADER_LEN + len(payload)
        return RECORD_HEADER.pack(rtype, 0, 0, len(payload)) + payload

    def _may_send_control(self) -> bool:
        return (self._sent_hello and self.version is not None and not self._sent_close
                and self._error is None)

    def _may_send_data(self) -> bool:
        if not self._may_send_control():
            return False
        if self.role == "client":
            return self._sent_auth
        return self.authenticated

    def _refuse_send(self, what: str) -> None:
        if self._sent_close:
            why = "after CLOSE"
        elif self._error is not None:
            why = f"after a protocol error ({self._error.reason})"
        elif what == "HELLO":
            why = "twice"
        elif not self._sent_hello:
            why = "before our HELLO"
        elif what in ("AUTH", "ADVERTISE") and self.role != "client":
            why = "as a server"
        elif what == "INTRO" and self.role != "server":
            why = "as a client"
        elif what in ("ADVERTISE", "INTRO") and self.version is not None and not self.introducing:
            why = (f"on a version-{self.version} connection" if self.introductions
                   else "on a connection made without introductions")
        elif self.version is None:
            why = "before the peer's HELLO"
        elif what == "AUTH":
            why = "twice"
        elif self.role == "client":
            why = "before AUTH"
        else:
            why = "before accept_auth()"
        raise WireUsageError(f"{self.role}: cannot send {what} {why}")

    # --- receiving: the path of a frame in --------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the stream, in order; b"" means the peer closed it (EOF)."""
        if self._error is not None:
            raise self._error
        if self._eof:
            raise WireUsageError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        data = bytes(data)  # no copy when it is bytes already
        if self._pos == len(self._buf) and not self._chunks:
            self._buf = data
            self._pos = 0
        else:
            self._chunks.append(data)
            self._chunks_len += len(data)
            if self.buffered > MAX_BUFFERED + len(data):
                # next_events() was not called in between: keep the bound anyway.
                self._fail("too_large", f"{self.buffered} bytes buffered unparsed, "
                           f"more than {MAX_BUFFERED} + one read")

    def receive_events(self, data: bytes | memoryview) -> list[Event]:
        """`receive_data(data)` then `next_events()`, for `data` valid only during this call
        (a view of a buffer its caller reuses, tunnel/tls.py's plaintext): with nothing
        buffered, the records are decoded where they lie, and only the bytes of an
        incomplete one at the end are kept (copied); frames are copied out as always.  The
        incomplete record the last call kept is completed from the head of `data` (its
        bytes copied once more), and the rest decoded where it lies."""
        if self._error is not None or self._eof or not data or self._chunks_len:
            self.receive_data(bytes(data))
            return self.next_events()
        events: list[Event] = []
        if self._pos != len(self._buf):  # the incomplete record the last call kept
            used = self._complete_record(data)
            if used is None:  # `data` does not hold its rest: buffered whole, as before
                self.receive_data(bytes(data))
                return self.next_events()
            events = self.next_events()  # that record alone, through `_decode`'s checks
            if self._error is not None or used == len(data):
                return events
            data = memoryview(data)[used:]
            if self._pos != len(self._buf):  # decoding paused: the rest waits behind it
                self.receive_data(bytes(data))
                return events
        # The idle link's visit: `data` is one whole FRAMES record the state takes.  The
        # same checks as `_decode`'s, in one call; anything else takes `_decode`, whole.
        size = len(data)
        if size >= RECORD_HEADER_LEN:
            rtype, flags, reserved, length = RECORD_HEADER.unpack_from(data)
            if (rtype == FRAMES and size == RECORD_HEADER_LEN + length and not flags
                    and not reserved and length <= self._accepts.get(FRAMES, -1)):
                received = self.received
                received.records += 1
                received.bytes += size
                try:
                    frames = _decode_frames(data, RECORD_HEADER_LEN, size)
                except WireError as error:  # as next_events: the connection is dead
                    self._error = error
                    if events:  # the completed record's stand; the next call raises
                        return events
                    raise
                received.frames += len(frames)
                events.append(Frames(frames))
                return events
        self._buf = data
        self._pos = 0
        try:
            if not events:
                return self.next_events()
            try:
                return events + self.next_events()
            except WireError:  # as next_events: the events before it stand; the next raises
                return events
        finally:
            if self._buf is data:  # an incomplete record, or decoding paused: keep the rest
                self._buf = bytes(data[self._pos:])
                self._pos = 0

    def _complete_record(self, data: bytes | memoryview) -> int | None:
        """The incomplete record at `_buf[_pos:]` completed from the head of `data`: `_buf`
        becomes that record alone (copied, with at most its own bytes of `data`), and the
        count of `data`'s bytes it took; None (nothing changed) if `data` holds less than
        its rest, or if `_buf[_pos:]` is not one incomplete record (decoding paused with
        more kept).  Its header is checked when `_decode` meets it."""
        if self._state is _Receive.AUTH_PENDING:
            return None
        buf, pos = self._buf, self._pos
        have = len(buf) - pos
        if have < RECORD_HEADER_LEN:
            take = RECORD_HEADER_LEN - have
            if len(data) < take:
                return None
            header = bytes(buf[pos:]) + bytes(data[:take])
            length = RECORD_HEADER.unpack(header)[3]
        else:
            length = RECORD_HEADER.unpack_from(buf, pos)[3]
        used = RECORD_HEADER_LEN + length - have
        if not 0 < used <= len(data):
            return None
        self._buf = b"".join((memoryview(buf)[pos:], memoryview(data)[:used]))
        self._pos = 0
        return used

    @property
    def failed(self) -> bool:
        """The peer broke the protocol: only `send_close` is allowed now (events decoded
        before the violation may still be in hand; answer none of them)."""
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded."""
        return len(self._buf) - self._pos + self._chunks_len

    def next_events(self) -> list[Event]:
        """Every event the buffered bytes complete.  Empty: feed more bytes (or accept_auth).

        On a violation, the events decoded before it are returned and the next call raises.
        """
        if self._error is not None:
            raise self._error
        events: list[Event] = []
        try:
            self._decode(events)
        except WireError as error:
            self._error = error
            self._buf = b""
            self._chunks.clear()
            self._chunks_len = self._pos = self._chunk_at = 0
            if not events:
                raise
        return events

    def accept_auth(self) -> None:
        """Server: the client's AUTH was verified; FRAMES flow and decoding resumes."""
        if self.role != "server" or self._state is not _Receive.AUTH_PENDING:
            raise WireUsageError(f"{self.role}: accept_auth() with no AUTH pending "
                                 f"(state: {self._state.value})")
        self.authenticated = True
        self._enter(_Receive.OPEN)

    def _enter(self, state: _Receive) -> None:
        self._state = state
        self._accepts = self._open_accepts if state is _Receive.OPEN else _ACCEPTS[state]

    def _decode(self, events: list[Event]) -> None:
        header = RECORD_HEADER.unpack_from
        received = self.received
        # (an Enum class's member lookup is several times a local's: once per call)
        paused, closed = _Receive.AUTH_PENDING, _Receive.CLOSED
        while True:
            if self._state is paused:
                return
            buf = self._buf
            pos = self._pos
            available = len(buf) - pos
            if self._state is closed and self.buffered:
                self._fail("after_close", f"{self.buffered} bytes after the peer's CLOSE")
            if available < RECORD_HEADER_LEN:
                if not self._chunks_len or not self._gather(RECORD_HEADER_LEN):
                    break
                buf, pos = self._buf, self._pos
            rtype, flags, reserved, length = header(buf, pos)
            limit = self._accepts.get(rtype)
            if limit is None:
                self._refuse_type(rtype)
            if flags or reserved:
                self._fail("bad_header", f"{RECORD_NAMES[rtype]} record with flags {flags:#x}"
                           f" reserved {reserved:#x}, want 0 and 0")
            if length > limit:
                self._fail("too_large", f"{RECORD_NAMES[rtype]} record of {length} bytes, "
                           f"at most {limit}")
            end = pos + RECORD_HEADER_LEN + length
            if end > len(buf):
                if not self._gather(RECORD_HEADER_LEN + length):
                    break
                buf, pos = self._buf, self._pos
                end = pos + RECORD_HEADER_LEN + length
            start = pos + RECORD_HEADER_LEN
            self._pos = end
            received.records += 1
            received.bytes += RECORD_HEADER_LEN + length
            if rtype == FRAMES:
                frames = _decode_frames(buf, start, end)
                received.frames += len(frames)
                events.append(Frames(frames))
            elif rtype == PING:
                events.append(Ping(*self._fixed(PING_PAYLOAD, buf, start, length, "PING")))
            elif rtype == PONG:
                events.append(Pong(*self._fixed(PING_PAYLOAD, buf, start, length, "PONG")))
            elif rtype == HELLO:
                events.append(self._on_hello(bytes(buf[start:end])))
            elif rtype == AUTH:
                events.append(self._on_auth(bytes(buf[start:end])))
            elif rtype == ADVERTISE:
                self._advertises += 1
                if self._advertises > MAX_ADVERTISES:
                    self._fail("advertise_flood", f"more than {MAX_ADVERTISES} ADVERTISE "
                               f"records on one connection")
                events.append(Advertise(_decode_advertise(bytes(buf[start:end]))))
            elif rtype == INTRO:
                events.append(Intro(_decode_intro(bytes(buf[start:end]))))
            else:  # CLOSE
                events.append(self._on_close(bytes(buf[start:end])))
        if self._pos == len(self._buf) and not self._chunks:
            self._buf = b""  # let go of the last chunk
            self._pos = 0
            if self._eof and not self._eof_reported:
                self._eof_reported = True
                events.append(Eof())
        elif self._eof:
            self._fail("truncated", f"EOF with {self.buffered} bytes of an incomplete record")

    def _gather(self, need: int) -> bool:
        """Make `need` bytes contiguous at `_buf[_pos:]`, if that many have arrived.  Copies
        at most the `need` bytes (a record that spans reads), never the chunks after them:
        a chunk whose turn comes with nothing before it becomes `_buf` as it is."""
        available = len(self._buf) - self._pos
        if available + self._chunks_len < need:
            return False
        chunks = self._chunks
        if not available:
            chunk = self._buf = chunks.popleft()
            self._pos, self._chunk_at = self._chunk_at, 0
            available = len(chunk) - self._pos
            self._chunks_len -= available
            if available >= need:
                return True
        parts: list[bytes | memoryview] = [memoryview(self._buf)[self._pos:]]
        missing = need - available
        while missing:
            chunk, at = chunks[0], self._chunk_at
            left = len(chunk) - at
            if left <= missing:
                parts.append(memoryview(chunk)[at:])
                chunks.popleft()
                self._chunk_at = 0
            else:
                left = missing
                parts.append(memoryview(chunk)[at:at + left])
                self._chunk_at = at + left
            missing -= left
            self._chunks_len -= left
        self._buf = b"".join(parts)
        self._pos = 0
        return True

    def _refuse_type(self, rtype: int) -> None:
        state = self._state
        if rtype not in RECORD_NAMES:
            self._fail("bad_type", f"record type {rtype}, want 1..{max(RECORD_NAMES)}")
        name = RECORD_NAMES[rtype]
        if state is _Receive.AUTH and (rtype == FRAMES or (rtype == ADVERTISE
                                                           and ADVERTISE in self._open_accepts)):
            self._fail("unauthenticated", f"{name} before AUTH")
        allowed = ", ".join(RECORD_NAMES[t] for t in self._accepts)
        self._fail("unexpected", f"{name} while {state.value} (allowed: {allowed})")

    def _fixed(self, layout: struct.Struct, buf: bytes, start: int, length: int,
               name: str) -> tuple:
        if length != layout.size:
            self._fail("bad_length", f"{name} payload of {length} bytes, want {layout.size}")
        return layout.unpack_from(buf, start)

    def _on_hello(self, payload: bytes) -> Hello:
        if len(payload) < HELLO_FIXED.size:
            self._fail("bad_length", f"HELLO payload of {len(payload)} bytes, "
                       f"want at least {HELLO_FIXED.size}")
        min_version, max_version, offloads, mtu, challenge, name_len = \
            HELLO_FIXED.unpack_from(payload)
        if not 1 <= min_version <= max_version:
            self._fail("version", f"peer's version range {min_version}..{max_version} is empty")
        version = negotiate_version(self.min_version, self.max_version, min_version, max_version)
        if version is None:
            self._fail("version", f"peer speaks {min_version}..{max_version}, "
                       f"we speak {self.min_version}..{self.max_version}")
        if mtu < MIN_MTU:
            self._fail("bad_hello", f"mtu {mtu}, want at least {MIN_MTU}")
        name_end = HELLO_FIXED.size + name_len
        if name_len > MAX_NAME_BYTES or name_end > len(payload):
            self._fail("bad_name", f"name of {name_len} bytes in a HELLO of {len(payload)}, "
                       f"want at most {MAX_NAME_BYTES} and inside the record")
        try:
            name = payload[HELLO_FIXED.size:name_end].decode()
        except UnicodeDecodeError as error:
            self._fail("bad_name", f"name is not UTF-8: {error}")
        # Bytes after the name are extensions of later versions: version 1 skips them.
        hello = Hello(version, Offload(offloads & ALL_OFFLOADS), mtu, challenge, name,
                      min_version, max_version)
        self.peer_hello = hello
        self.version = version
        if self.introducing:
            self._open_accepts = {**_ACCEPTS[_Receive.OPEN], **_INTRO_ACCEPTS[self.role]}
        self._enter(_Receive.AUTH if self.role == "server" else _Receive.OPEN)
        return hello

    def _on_auth(self, payload: bytes) -> Auth:
        cert_end = AUTH_LEN.size + (AUTH_LEN.unpack_from(payload)[0]
                                    if len(payload) >= AUTH_LEN.size else 0)
        sig_at = cert_end + AUTH_LEN.size
        if sig_at > len(payload):
            self._fail("bad_auth", f"AUTH payload of {len(payload)} bytes ends inside "
                       f"the certificate or its length")
        cert_len = cert_end - AUTH_LEN.size
        sig_len = AUTH_LEN.unpack_from(payload, cert_end)[0]
        if sig_at + sig_len != len(payload):
            self._fail("bad_auth", f"AUTH payload of {len(payload)} bytes, the lengths in it "
                       f"add up to {sig_at + sig_len}")
        if not 0 < cert_len <= MAX_CERTIFICATE_BYTES or not 0 < sig_len <= MAX_SIGNATURE_BYTES:
            self._fail("bad_auth", f"certificate of {cert_len} and signature of {sig_len} "
                       f"bytes, want 1..{MAX_CERTIFICATE_BYTES} and 1..{MAX_SIGNATURE_BYTES}")
        self._enter(_Receive.AUTH_PENDING)
        return Auth(payload[AUTH_LEN.size:cert_end], payload[sig_at:])

    def _on_close(self, payload: bytes) -> Closed:
        if len(payload) < CLOSE_CODE.size:
            self._fail("bad_close", f"CLOSE payload of {len(payload)} bytes, "
                       f"want at least {CLOSE_CODE.size}")
        (code,) = CLOSE_CODE.unpack_from(payload)
        try:
            reason = payload[CLOSE_CODE.size:].decode()
        except UnicodeDecodeError as error:
            self._fail("bad_close", f"reason is not UTF-8: {error}")
        self.closed = True
        self._enter(_Receive.CLOSED)
        return Closed(code, reason)

    def _fail(self, reason: str, detail: str) -> None:
        raise WireError(reason, f"{self.role} receiving: {detail}")


def _decode_frames(buf: bytes | memoryview, start: int, end: int) -> list[Frame]:
    """The frames of one FRAMES record, `buf[start:end]`: each checked, each copied once
    (bytes() of a slice of bytes is that slice)."""
    frames: list[Frame] = []
    append = frames.append
    fast = _FRAME_HEADER_FAST.unpack_from
    offload_at = _OFFLOAD.unpack_from
    plain = PLAIN
    make = Frame
    lowest, highest = MIN_FRAME, MAX_FRAME
    header_len = FRAME_HEADER_LEN
    last_header_at = end - header_len
    at = start
    for _ in range(MAX_FRAMES_PER_RECORD):
        if at > last_header_at:
            break
        length, meta_high, meta_low = fast(buf, at)
        data_at = at + header_len
        at = data_at + length
        if not lowest <= length <= highest or at > end:
            raise WireError("bad_frame", f"frame {len(frames)} of {length} bytes at offset "
                            f"{data_at - FRAME_HEADER_LEN - start} of a {end - start}-byte "
                            f"record, want {MIN_FRAME}..{MAX_FRAME} inside the record")
        if meta_high or meta_low:
            append(make(bytes(buf[data_at:at]), offload_at(buf, data_at - 10)))
        else:
            append(make(bytes(buf[data_at:at]), plain))
    if at != end:
        if len(frames) == MAX_FRAMES_PER_RECORD:
            raise WireError("bad_frame", f"more than {MAX_FRAMES_PER_RECORD} frames in a record")
        raise WireError("bad_frame", f"{end - at} bytes after frame {len(frames)}, "
                        f"less than a frame header")
    if not frames:
        raise WireError("bad_frame", "FRAMES record without frames")
    return frames


# --- ADVERTISE and INTRO (version 2) --------------------------------------------------------


def _encode_address(host: str, port: int, *, wildcard: bool) -> bytes:
    """One (host, port) as u8 family, address bytes, u16 port; ValueError if it cannot be
    one (not a literal, a scoped or multicast address, a port outside 1..65535)."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise ValueError(f"{host}: a scoped address means nothing to another machine")
    if ip.is_multicast or (ip.is_unspecified and not wildcard):
        raise ValueError(f"{host}: not an address a peer can dial")
    if not 0 < port <= 65535:
        raise ValueError(f"port {port}: want 1..65535")
    return U8.pack(ip.version) + ip.packed + ADDRESS_PORT.pack(port)


def _decode_addresses(payload: bytes, at: int, count: int, *, wildcard: bool,
                      reason: str) -> tuple[tuple[tuple[str, int], ...], int]:
    """`count` addresses from `payload[at:]`: the addresses and the offset after them."""
    addresses = []
    for index in range(count):
        if at >= len(payload):
            raise WireError(reason, f"address {index} of {count} past the end of the record")
        family = payload[at]
        size = FAMILY_BYTES.get(family)
        if size is None:
            raise WireError(reason, f"address {index}: family {family}, want 4 or 6")
        end = at + 1 + size + ADDRESS_PORT.size
        if end > len(payload):
            raise WireError(reason, f"address {index} runs past the end of the record")
        ip = ipaddress.ip_address(payload[at + 1:at + 1 + size])
        (port,) = ADDRESS_PORT.unpack_from(payload, at + 1 + size)
        if ip.is_multicast or (ip.is_unspecified and not wildcard) or port == 0:
            raise WireError(reason, f"address {index}: {ip} port {port} is not dialable")
        addresses.append((str(ip), port))
        at = end
    return tuple(addresses), at


def _decode_advertise(payload: bytes) -> tuple[tuple[str, int], ...]:
    if not payload:
        raise WireError("bad_advertise", "empty ADVERTISE (want at least its count)")
    count = payload[0]
    if count > MAX_INTRO_ADDRESSES:
        raise WireError("bad_advertise", f"{count} addresses, at most {MAX_INTRO_ADDRESSES}")
    addresses, end = _decode_addresses(payload, 1, count, wildcard=True, reason="bad_advertise")
    if end != len(payload):
        raise WireError("bad_advertise", f"{len(payload) - end} bytes after the addresses")
    return addresses


def encode_intro_peer(peer: DirectPeer) -> bytes:
    """One peer's entry in an INTRO record; ValueError if it passes a limit."""
    return encode_intro_entry(peer.name, parse_fingerprint(peer.fingerprint), peer.addresses,
                              peer.macs, [ip.packed for ip in peer.ipv4],
                              [ip.packed for ip in peer.ipv6])


def encode_intro_entry(name: str, digest: bytes, addresses: Sequence[tuple[str, int]],
                       macs: Collection[bytes], ipv4: Collection[bytes],
                       ipv6: Collection[bytes]) -> bytes:
    """`encode_intro_peer` from the packed forms the hub's tables hold (no address objects:
    the hub encodes up to 256 MACs and 2048 addresses per peer); items sorted, so equal sets
    encode equal.  ValueError if a field passes a limit."""
    name_bytes = name.encode()
    if not 0 < len(name_bytes) <= MAX_NAME_BYTES:
        raise ValueError(f"peer name of {len(name_bytes)} bytes, want 1..{MAX_NAME_BYTES}")
    if len(digest) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint of {len(digest)} bytes, want {FINGERPRINT_BYTES}")
    for what, items, limit in (("addresses", addresses, MAX_INTRO_ADDRESSES),
                               ("MACs", macs, MAX_INTRO_MACS),
                               ("IPv4 addresses", ipv4, MAX_INTRO_IPS),
                               ("IPv6 addresses", ipv6, MAX_INTRO_IPS)):
        if len(items) > limit:
            raise ValueError(f"peer {name}: {len(items)} {what}, at most {limit}")
    if any(len(mac) != 6 or mac[0] & 1 for mac in macs):
        raise ValueError(f"peer {name}: a MAC that is not 6 bytes of unicast")
    if any(len(ip) != 4 for ip in ipv4) or any(len(ip) != 16 for ip in ipv6):
        raise ValueError(f"peer {name}: an address of the wrong length")
    return b"".join([
        U8.pack(len(name_bytes)), name_bytes, digest,
        U8.pack(len(addresses)),
        *(_encode_address(host, port, wildcard=False) for host, port in addresses),
        U16.pack(len(macs)), *sorted(macs),
        U16.pack(len(ipv4)), *sorted(ipv4),
        U16.pack(len(ipv6)), *sorted(ipv6),
    ])


def _take_count(payload: bytes, at: int, layout: struct.Struct, what: str, limit: int,
                item: int) -> tuple[int, int]:
    """A count of `item`-byte things at `at`, checked against `limit` and the record's end:
    the count and where its items start."""
    if at + layout.size > len(payload):
        raise WireError("bad_intro", f"the {what} count runs past the end of the record")
    (count,) = layout.unpack_from(payload, at)
    if count > limit:
        raise WireError("bad_intro", f"{count} {what}, at most {limit}")
    at += layout.size
    if at + count * item > len(payload):
        raise WireError("bad_intro", f"{count} {what} run past the end of the record")
    return count, at


def _decode_intro(payload: bytes) -> tuple[IntroEntry, ...]:
    """The peers of an INTRO, their bindings checked but not read (IntroEntry): O(peers)."""
    count, at = _take_count(payload, 0, U16, "peers", MAX_INTRO_PEERS, 0)
    peers = []
    names: set[str] = set()
    fingerprints: set[str] = set()
    for index in range(count):
        begin = at
        name_len, at = _take_count(payload, at, U8, "name bytes", MAX_NAME_BYTES, 1)
        if not name_len:
            raise WireError("bad_intro", f"peer {index} has an empty name")
        try:
            name = payload[at:at + name_len].decode()
        except UnicodeDecodeError as error:
            raise WireError("bad_intro", f"peer {index}: name is not UTF-8: {error}") from None
        at += name_len
        if at + FINGERPRINT_BYTES > len(payload):
            raise WireError("bad_intro", f"peer {name}: fingerprint past the end of the record")
        fingerprint = format_fingerprint(payload[at:at + FINGERPRINT_BYTES])
        at += FINGERPRINT_BYTES
        if name in names or fingerprint in fingerprints:
            raise WireError("bad_intro", f"peer {name} ({fingerprint}) introduced twice")
        names.add(name)
        fingerprints.add(fingerprint)
        n, at = _take_count(payload, at, U8, "addresses", MAX_INTRO_ADDRESSES, 0)
        addresses, at = _decode_addresses(payload, at, n, wildcard=False, reason="bad_intro")
        bindings = at
        macs, at = _take_count(payload, at, U16, "MACs", MAX_INTRO_MACS, 6)
        if any(first & 1 for first in payload[at:at + 6 * macs:6]):  # each MAC's first byte
            raise WireError("bad_intro", f"peer {name}: a multicast MAC in its bindings")
        end, items = _intro_entry_end(payload, bindings)
        peers.append(IntroEntry(name, fingerprint, addresses, payload[begin:end],
                                bindings - begin, items))
        at = end
    if at != len(payload):
        raise WireError("bad_intro", f"{len(payload) - at} bytes after the last peer")
    return tuple(peers)


def _intro_entry_end(payload: bytes, at: int) -> tuple[int, int]:
    """Where the entry whose MAC count is at `at` ends (its counts checked), and how many
    MACs and addresses it holds."""
    items = 0
    for layout, what, limit, item in ((U16, "MACs", MAX_INTRO_MACS, 6),
                                      (U16, "IPv4 addresses", MAX_INTRO_IPS, 4),
                                      (U16, "IPv6 addresses", MAX_INTRO_IPS, 16)):
        n, at = _take_count(payload, at, layout, what, limit, item)
        at += n * item
        items += n
    return at, items
