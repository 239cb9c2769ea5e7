"""The wire codec (tunnel/wire.py): round trips, state rules, limits, and hostile byte streams."""

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netstack.frame import GSO_TCPV4, HDR_F_NEEDS_CSUM, PLAIN, Frame, Offload
from tests.support.deadline import deadline
from tunnel.wire import (
    AUTH,
    CLOSE,
    FRAMES,
    HELLO,
    HELLO_FIXED,
    MAX_BUFFERED,
    MAX_FRAME,
    MAX_FRAMES_PER_RECORD,
    MAX_RECORD_PAYLOAD,
    PING,
    RECORD_HEADER,
    Auth,
    CloseCode,
    Closed,
    Eof,
    Frames,
    Hello,
    Ping,
    Pong,
    WireConnection,
    WireError,
    WireUsageError,
    negotiate_version,
)

TSO = (HDR_F_NEEDS_CSUM, GSO_TCPV4, 66, 1448, 34, 16)


def frame(size: int, fill: int = 0xAB, offload: tuple = PLAIN) -> Frame:
    return Frame(bytes([fill]) * size, offload)


def record(rtype: int, payload: bytes, flags: int = 0, reserved: int = 0) -> bytes:
    return RECORD_HEADER.pack(rtype, flags, reserved, len(payload)) + payload


def hello_payload(min_version=1, max_version=1, offloads=0, mtu=1500, name=b"peer",
                  extra=b"") -> bytes:
    return HELLO_FIXED.pack(min_version, max_version, offloads, mtu, bytes(32),
                            len(name)) + name + extra


def frames_payload(*entries: tuple[int, tuple, bytes]) -> bytes:
    return b"".join(struct.pack("!IBBHHHH", length, *offload) + data
                    for length, offload, data in entries)


def new(role: str, **kwargs) -> WireConnection:
    kwargs.setdefault("name", role)
    kwargs.setdefault("offloads", 0)
    kwargs.setdefault("mtu", 1500)
    return WireConnection(role, **kwargs)


def handshake() -> tuple[WireConnection, WireConnection]:
    """A client and a server past HELLO, AUTH and accept_auth()."""
    client = new("client", offloads=Offload.CSUM | Offload.TSO4)
    server = new("server")
    server.receive_data(client.send_hello())
    client.receive_data(server.send_hello())
    [server_hello] = client.next_events()
    [_] = server.next_events()
    server.receive_data(client.send_auth(b"cert", b"sig over " + server_hello.challenge))
    [auth] = server.next_events()
    assert isinstance(auth, Auth)
    server.accept_auth()
    return client, server


def server_after_hello() -> WireConnection:
    server = new("server")
    server.send_hello()
    server.receive_data(record(HELLO, hello_payload()))
    [hello] = server.next_events()
    assert isinstance(hello, Hello)
    return server


def open_client() -> WireConnection:
    """A client that got the server's HELLO and sent its own and AUTH."""
    client = new("client")
    client.send_hello()
    client.receive_data(record(HELLO, hello_payload()))
    client.next_events()
    client.send_auth(b"c", b"s")
    return client


def feed(conn: WireConnection, data: bytes) -> list:
    conn.receive_data(data)
    return conn.next_events()


def same_frames(got: list[Frame], sent: list[Frame]) -> None:
    assert [bytes(f.data) for f in got] == [bytes(f.data) for f in sent]
    assert [tuple(f.offload) for f in got] == [tuple(f.offload) for f in sent]
    assert all(type(f.data) is bytes for f in got)
    for g, s in zip(got, sent, strict=True):
        if s.offload is PLAIN or tuple(s.offload) == PLAIN:
            assert g.offload is PLAIN


# --- round trips -----------------------------------------------------------------------------


def test_hello_carries_version_offloads_mtu_challenge_and_name():
    client = new("client", name="vm-ü1", offloads=Offload.CSUM | Offload.TSO6, mtu=9000)
    server = new("server", challenge=b"\x07" * 32)
    [hello] = feed(server, client.send_hello())
    assert hello == Hello(2, Offload.CSUM | Offload.TSO6, 9000, client.challenge, "vm-ü1", 1, 2)
    [hello] = feed(client, server.send_hello())
    assert hello.challenge == b"\x07" * 32 and hello.name == "server"
    assert client.peer_hello == hello and client.version == 2 and server.version == 2


def test_auth_reaches_the_server_unchanged():
    client = new("client")
    server = new("server")
    feed(server, client.send_hello())
    feed(client, server.send_hello())
    cert, sig = bytes(range(256)) * 16, b"\x01" * 512
    assert feed(server, client.send_auth(cert, sig)) == [Auth(cert, sig)]
    assert not server.authenticated
    server.accept_auth()
    assert server.authenticated


def test_ping_pong_round_trip_echoes_nonce_and_timestamp():
    client, server = handshake()
    [ping] = feed(server, client.send_ping(7, 1_000))
    assert ping == Ping(7, 1_000)
    [pong] = feed(client, server.send_pong(ping.nonce, ping.timestamp_ns))
    assert pong == Pong(7, 1_000)


def test_close_round_trip_and_closed_state():
    client, server = handshake()
    assert feed(server, client.send_close(CloseCode.NORMAL, "bye ☃")) == [Closed(0, "bye ☃")]
    assert client.closed and server.closed
    assert feed(server, b"") == [Eof()]


def test_frames_round_trip_with_and_without_offload_metadata():
    client, server = handshake()
    sent = [frame(60), frame(1514, 1, TSO), frame(14, 2), frame(MAX_FRAME, 3, TSO), frame(64)]
    [event] = feed(server, client.send_frames(sent))
    assert isinstance(event, Frames)
    same_frames(event.frames, sent)
    [event] = feed(client, server.send_frames(sent))
    same_frames(event.frames, sent)


def test_plain_frames_decode_to_the_shared_plain_object():
    client, server = handshake()
    [event] = feed(server, client.send_frames([frame(60), frame(60, 1, (0,) * 6)]))
    assert [f.offload for f in event.frames] == [PLAIN, PLAIN]
    assert all(f.offload is PLAIN for f in event.frames)


def test_frames_from_memoryviews_are_sent_as_their_bytes():
    client, server = handshake()
    [event] = feed(server, client.send_frames([Frame(memoryview(b"m" * 100)[10:70])]))
    assert event.frames[0].data == b"m" * 60


def test_one_batch_is_one_record_and_counted():
    client, server = handshake()
    before = client.sent.records
    data = client.send_frames([frame(100)] * 10)
    assert client.sent.records == before + 1 and client.sent.frames == 10
    assert len(data) == 8 + 10 * (14 + 100)
    feed(server, data)
    assert server.received.frames == 10
    assert server.received.bytes == client.sent.bytes


def test_batch_past_the_frame_limit_splits_into_records():
    client, server = handshake()
    sent = [frame(14, i % 256) for i in range(MAX_FRAMES_PER_RECORD + 5)]
    events = feed(server, client.send_frames(sent))
    assert [len(e.frames) for e in events] == [MAX_FRAMES_PER_RECORD, 5]
    same_frames([f for e in events for f in e.frames], sent)


def test_batch_past_the_size_limit_splits_into_records():
    client, server = handshake()
    sent = [frame(MAX_FRAME, i) for i in range(70)]  # 70 * 65571 > 4 MiB
    events = feed(server, client.send_frames(sent))
    assert len(events) == 2
    assert all(len(e.frames) * (14 + MAX_FRAME) <= MAX_RECORD_PAYLOAD for e in events)
    same_frames([f for e in events for f in e.frames], sent)


def test_frames_outside_the_length_limits_are_dropped_on_send_and_counted():
    client, server = handshake()
    [event] = feed(server, client.send_frames([frame(13), frame(60), frame(MAX_FRAME + 1)]))
    assert len(event.frames) == 1 and client.sent.dropped == 2
    assert client.send_frames([frame(2)]) == b""


# --- chunking --------------------------------------------------------------------------------


def test_a_small_batch_fed_one_byte_at_a_time():
    client, server = handshake()
    sent = [frame(60, 1), frame(70, 2, TSO), frame(14, 3)]
    data = client.send_frames(sent) + client.send_ping(1, 2) + client.send_close(0, "x")
    events = []
    for i in range(len(data)):
        server.receive_data(data[i:i + 1])
        events += server.next_events()
        assert server.buffered <= MAX_BUFFERED
    assert [type(e) for e in events] == [Frames, Ping, Closed]
    same_frames(events[0].frames, sent)


def test_a_batch_split_at_every_byte_boundary():
    client, _ = handshake()
    sent = [frame(60, 1), frame(300, 2, TSO), frame(14, 3)]
    data = client.send_frames(sent) * 2
    for cut in range(1, len(data)):
        _, server = handshake()
        events = feed(server, data[:cut]) + feed(server, data[cut:])
        assert len(events) == 2
        for event in events:
            same_frames(event.frames, sent)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(14, 3000), min_size=1, max_size=200),
    offloaded=st.lists(st.booleans(), min_size=200, max_size=200),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=40),
)
def test_random_chunking_decodes_the_same_frames(sizes, offloaded, cuts):
    client, server = handshake()
    sent = [frame(size, i % 256, TSO if offloaded[i] else PLAIN) for i, size in enumerate(sizes)]
    data = client.send_frames(sent[: len(sent) // 2]) + client.send_frames(sent[len(sent) // 2:])
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    got = []
    for a, b in itertools.pairwise(points):
        got += feed(server, data[a:b])
    same_frames([f for e in got for f in e.frames], sent)
    assert server.buffered == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(14, 3000), min_size=1, max_size=200),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=40),
    decode_after=st.lists(st.booleans(), min_size=41, max_size=41),
)
def test_several_chunks_fed_before_decoding_give_the_same_frames(sizes, cuts, decode_after):
    # Records spanning chunks are gathered alone; the chunks' other records stay where
    # they arrived, so decoding resumes inside a chunk, past a gathered record.
    client, server = handshake()
    sent = [frame(size, i % 256, TSO if i % 3 else PLAIN) for i, size in enumerate(sizes)]
    data = b"".join(client.send_frames(sent[i:i + 7]) for i in range(0, len(sent), 7))
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    got = []
    for index, (a, b) in enumerate(itertools.pairwise(points)):
        if a < b:
            server.receive_data(data[a:b])
        if decode_after[index]:
            got += server.next_events()
    got += server.next_events()
    same_frames([f for e in got for f in e.frames], sent)
    assert server.buffered == 0


def test_records_decoded_from_a_reused_buffer_keep_their_frames_and_the_incomplete_rest():
    client, _ = handshake()
    sent = [frame(60, 1), frame(3000, 2, TSO), frame(14, 3)]
    data = client.send_frames(sent) * 3 + client.send_ping(7, 8)
    for cut in range(1, len(data), 7):
        _, server = handshake()
        reused = bytearray(len(data))
        got = []
        for a, b in ((0, cut), (cut, len(data))):
            reused[: b - a] = data[a:b]
            with memoryview(reused) as view:
                got += server.receive_events(view[: b - a])
            reused[:] = bytes(len(reused))  # the caller's next read overwrites it
        assert [type(e) for e in got] == [Frames, Frames, Frames, Ping]
        for event in got[:3]:
            same_frames(event.frames, sent)
        assert server.buffered == 0


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(14, 3000), min_size=1, max_size=60),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=30),
    tail=st.sampled_from([b"", record(PING, bytes(16)), record(FRAMES, b""),
                          record(FRAMES, frames_payload((60, PLAIN, bytes(60))), flags=1)]),
)
def test_views_cut_anywhere_decode_as_the_bytes_fed_whole_would(sizes, cuts, tail):
    # Each view is a reused buffer's (tunnel/tls.py's plaintext): a record the last view
    # left incomplete is completed from the next one (or buffered whole when that one does
    # not complete it), the rest decoded where it lies; a violation after good records
    # gives those records' events first, then raises at the next call, as receive_data.
    client, whole = handshake()
    sent = [frame(size, i % 256, TSO if i % 3 else PLAIN) for i, size in enumerate(sizes)]
    data = b"".join(client.send_frames(sent[i:i + 5]) for i in range(0, len(sent), 5)) + tail

    def run(feed) -> tuple:
        got, error = [], None
        try:
            feed(got)
            got += server.next_events()
        except WireError as exc:
            error = exc.reason
        events = [(type(e), [(f.data, f.offload) for f in getattr(e, "frames", [])])
                  for e in got]
        return (events, error, server.failed, server.buffered, server.received.records,
                server.received.frames, server.received.bytes)

    def fed_whole(got: list) -> None:
        server.receive_data(data)
        got += server.next_events()

    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    reused = bytearray(len(data))

    def fed_as_views(got: list) -> None:
        for a, b in itertools.pairwise(points):
            if a < b:
                reused[: b - a] = data[a:b]
                with memoryview(reused) as view:
                    got += server.receive_events(view[: b - a])
                reused[:] = bytes(len(reused))  # the caller's next read overwrites it

    server = whole
    expected = run(fed_whole)
    _, server = handshake()
    assert run(fed_as_views) == expected


def test_views_that_arrive_while_auth_is_pending_wait_whole_until_it_is_accepted():
    # The AUTH pauses decoding with records after it kept: views cut anywhere in them are
    # buffered behind those (never completed over them), and accept_auth gives every frame.
    def fresh() -> tuple[WireConnection, WireConnection, bytes]:
        client, server = new("client"), new("server")
        server.receive_data(client.send_hello())
        client.receive_data(server.send_hello())
        server.next_events()
        [hello] = client.next_events()
        return client, server, client.send_auth(b"cert", b"sig" + hello.challenge)

    sent = [frame(60, 1), frame(3000, 2, TSO), frame(14, 3)]
    client, server, auth = fresh()
    data = auth + client.send_frames(sent) + client.send_frames(sent[:2]) + client.send_ping(7, 8)
    server.receive_data(data)
    expected = [type(e) for e in server.next_events()]
    server.accept_auth()
    expected += [type(e) for e in server.next_events()]
    assert expected == [Auth, Frames, Frames, Ping]
    for first in range(1, len(data), 97):
        for second in range(first, len(data), 89):
            _, server, _ = fresh()
            reused = bytearray(len(data))
            got = []
            for a, b in ((0, first), (first, second), (second, len(data))):
                if a < b:
                    reused[: b - a] = data[a:b]
                    with memoryview(reused) as view:
                        got += server.receive_events(view[: b - a])
                    reused[:] = bytes(len(reused))
            assert [type(e) for e in got] == [Auth]
            server.accept_auth()
            got += server.next_events()
            assert [type(e) for e in got] == expected
            same_frames(got[1].frames, sent)
            same_frames(got[2].frames, sent[:2])
            assert server.buffered == 0


def _one_record_inputs() -> list[tuple[str, bytes]]:
    ok = frames_payload((60, PLAIN, bytes(60)), (80, TSO, bytes(80)))
    return [
        ("frames", record(FRAMES, ok)),
        ("one frame", record(FRAMES, frames_payload((98, PLAIN, bytes(range(98)))))),
        ("flags", record(FRAMES, ok, flags=1)),
        ("reserved", record(FRAMES, ok, reserved=2)),
        ("frame too short", record(FRAMES, frames_payload((13, PLAIN, bytes(13))))),
        ("frame past the record", record(FRAMES, frames_payload((60, PLAIN, bytes(60))))[:-1]),
        ("bytes after the frame", record(FRAMES, ok + bytes(3))),
        ("no frames", record(FRAMES, b"")),
        ("header only", RECORD_HEADER.pack(FRAMES, 0, 0, 0)[:7]),
        ("record and more", record(FRAMES, ok) + record(PING, bytes(16))),
        ("past the largest record, whole", record(FRAMES, bytes(MAX_RECORD_PAYLOAD + 1))),
        ("unknown type, FRAMES-sized", record(0xEE, ok)),
        ("a PING, alone", record(PING, bytes(16))),
    ]


@pytest.mark.parametrize("state", ["open", "awaiting auth", "auth pending", "closed"])
@pytest.mark.parametrize(("name", "data"), _one_record_inputs())
def test_a_view_of_one_record_decodes_as_the_bytes_fed_whole_would(state, name, data):
    # receive_events takes a view holding one whole FRAMES record in one step: its verdict,
    # events, counters and state after are those of receive_data + next_events.
    def connection() -> WireConnection:
        client, server = handshake()
        if state == "awaiting auth":
            server = new("server")
            server.receive_data(new("client").send_hello())
            server.next_events()
        elif state == "auth pending":
            server = new("server")
            fresh = new("client")
            server.receive_data(fresh.send_hello())
            fresh.receive_data(server.send_hello())
            server.next_events()
            [hello] = fresh.next_events()
            server.receive_data(fresh.send_auth(b"cert", b"sig" + hello.challenge))
            server.next_events()
        elif state == "closed":
            server.receive_data(client.send_close(CloseCode.NORMAL))
            server.next_events()
        return server

    def outcome(decode) -> tuple:
        server = connection()
        try:
            events = decode(server)
            got = [(type(e), [(f.data, f.offload) for f in getattr(e, "frames", [])])
                   for e in events]
        except WireError as error:
            got = error.reason
        return (got, server.failed, server.buffered, server.received.records,
                server.received.frames, server.received.bytes)

    def whole(server: WireConnection) -> list:
        server.receive_data(data)
        return server.next_events()

    def view(server: WireConnection) -> list:
        reused = bytearray(data)
        with memoryview(reused) as data_view:
            events = server.receive_events(data_view)
        reused[:] = bytes(len(reused))  # the caller's next read overwrites it
        return events

    expected = outcome(whole)
    assert outcome(view) == expected
    if expected[1]:  # failed: every later call raises the same error
        server = connection()
        with pytest.raises(WireError):
            view(server)
        with pytest.raises(WireError):
            server.receive_events(memoryview(record(FRAMES, frames_payload(
                (60, PLAIN, bytes(60))))))


def test_receive_events_of_nothing_is_the_end_of_the_stream():
    _, server = handshake()
    assert [type(e) for e in server.receive_events(memoryview(b""))] == [Eof]


# --- version negotiation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs", "agreed"),
    [((1, 1), (1, 1), 1), ((1, 3), (2, 5), 3), ((2, 5), (1, 3), 3), ((1, 1), (1, 9), 1),
     ((1, 2), (3, 4), None), ((3, 4), (1, 2), None)],
)
def test_negotiate_version_picks_the_highest_common(ours, theirs, agreed):
    assert negotiate_version(*ours, *theirs) == agreed


def test_newer_peer_with_overlap_gets_our_highest_version_and_its_extensions_are_skipped():
    server = new("server")
    [hello] = feed(server, record(HELLO, hello_payload(1, 4, extra=b"\x00future stuff")))
    assert hello.version == 2 and (hello.min_version, hello.max_version) == (1, 4)


def test_no_common_version_is_a_version_error_and_close_says_so():
    server = new("server")
    server.receive_data(record(HELLO, hello_payload(3, 4)))
    with pytest.raises(WireError) as caught:
        server.next_events()
    assert caught.value.reason == "version" and caught.value.close_code == CloseCode.VERSION
    close = server.send_close(caught.value.close_code, caught.value.reason)
    assert close == record(CLOSE, b"\x00\x02version")
    with pytest.raises(WireError):
        server.next_events()
    with pytest.raises(WireUsageError):
        server.send_ping(1, 1)


def test_unsupported_local_versions_are_refused():
    with pytest.raises(ValueError, match=r"versions 1\.\.3: this code speaks"):
        new("client", min_version=1, max_version=3)


# --- state rules -----------------------------------------------------------------------------


def error_of(conn: WireConnection, data: bytes) -> str:
    conn.receive_data(data)
    with pytest.raises(WireError) as caught:
        conn.next_events()
    return caught.value.reason


def test_frames_before_auth_are_refused_as_unauthenticated():
    server = server_after_hello()
    payload = frames_payload((60, PLAIN, bytes(60)))
    assert error_of(server, record(FRAMES, payload)) == "unauthenticated"


def test_unauthenticated_frames_are_refused_from_the_header_alone():
    server = server_after_hello()
    assert error_of(server, RECORD_HEADER.pack(FRAMES, 0, 0, 1000)) == "unauthenticated"


def test_frames_right_behind_auth_wait_for_accept_auth():
    client = new("client")
    server = new("server")
    feed(server, client.send_hello())
    feed(client, server.send_hello())
    data = client.send_auth(b"c", b"s") + client.send_frames([frame(60)]) + client.send_ping(1, 2)
    assert feed(server, data) == [Auth(b"c", b"s")]
    assert server.next_events() == []
    with pytest.raises(WireUsageError):
        server.send_frames([frame(60)])
    server.accept_auth()
    assert [type(e) for e in server.next_events()] == [Frames, Ping]


def test_ping_is_allowed_before_auth():
    server = server_after_hello()
    assert feed(server, record(PING, bytes(16))) == [Ping(0, 0)]


def test_auth_to_a_client_and_a_second_hello_are_unexpected():
    client = new("client")
    feed(client, record(HELLO, hello_payload()))
    assert error_of(client, record(AUTH, b"\x00\x01c\x00\x01s")) == "unexpected"
    assert error_of(server_after_hello(), record(HELLO, hello_payload())) == "unexpected"


def test_frames_before_hello_are_unexpected():
    assert error_of(new("client"), record(FRAMES, b"")) == "unexpected"


def test_unknown_record_type_is_bad_type():
    assert error_of(new("server"), record(99, b"")) == "bad_type"
    assert error_of(open_client(), record(0, b"")) == "bad_type"


def test_nonzero_flags_or_reserved_are_bad_header():
    assert error_of(new("server"), record(HELLO, hello_payload(), flags=1)) == "bad_header"
    assert error_of(new("server"), record(HELLO, hello_payload(), reserved=1)) == "bad_header"


def test_close_then_anything_is_after_close():
    client, server = handshake()
    data = client.send_close(0, "done") + record(PING, bytes(16))
    assert feed(server, data) == [Closed(0, "done")]
    with pytest.raises(WireError, match="after_close"):
        server.next_events()
    client2, server2 = handshake()
    feed(server2, client2.send_close(0, ""))
    assert error_of(server2, b"\x00") == "after_close"


def test_nothing_can_be_sent_after_close():
    client, _ = handshake()
    client.send_close(CloseCode.NORMAL)
    for send in (lambda: client.send_frames([frame(60)]), lambda: client.send_ping(1, 2),
                 lambda: client.send_close(0)):
        with pytest.raises(WireUsageError, match="after CLOSE"):
            send()


def test_sending_out_of_order_is_a_usage_error():
    client = new("client")
    with pytest.raises(WireUsageError, match="before our HELLO"):
        client.send_ping(1, 2)
    client.send_hello()
    with pytest.raises(WireUsageError, match="twice"):
        client.send_hello()
    with pytest.raises(WireUsageError, match="before the peer's HELLO"):
        client.send_auth(b"c", b"s")
    feed(client, record(HELLO, hello_payload()))
    with pytest.raises(WireUsageError, match="before AUTH"):
        client.send_frames([frame(60)])
    with pytest.raises(WireUsageError, match="as a server"):
        server_after_hello().send_auth(b"c", b"s")


def test_an_error_is_sticky():
    server = new("server")
    error_of(server, record(77, b""))
    with pytest.raises(WireError, match="bad_type"):
        server.receive_data(b"more")
    with pytest.raises(WireError, match="bad_type"):
        server.next_events()


def test_events_before_an_error_are_returned_first():
    client, server = handshake()
    data = client.send_frames([frame(60)]) + record(42, b"")
    assert [type(e) for e in feed(server, data)] == [Frames]
    with pytest.raises(WireError, match="bad_type"):
        server.next_events()


# --- limits ----------------------------------------------------------------------------------


def test_oversized_record_is_refused_as_soon_as_its_header_is_seen():
    client, server = handshake()
    server.receive_data(RECORD_HEADER.pack(FRAMES, 0, 0, MAX_RECORD_PAYLOAD + 1))
    with pytest.raises(WireError) as caught:
        server.next_events()
    assert caught.value.reason == "too_large"


def test_control_records_have_small_limits_checked_at_the_header():
    assert error_of(new("server"), RECORD_HEADER.pack(HELLO, 0, 0, 5000)) == "too_large"
    assert error_of(server_after_hello(), RECORD_HEADER.pack(AUTH, 0, 0, 10_000)) == "too_large"
    assert error_of(open_client(), RECORD_HEADER.pack(PING, 0, 0, 17)) == "too_large"


@pytest.mark.parametrize(
    "payload",
    [
        frames_payload((13, PLAIN, bytes(13))),
        frames_payload((MAX_FRAME + 1, PLAIN, bytes(MAX_FRAME + 1))),
        frames_payload((60, PLAIN, bytes(59))),  # runs past the record
        frames_payload((60, PLAIN, bytes(60))) + b"\x00" * 5,  # a partial frame header
        b"",  # no frames at all
    ],
    ids=["short", "long", "past-record", "trailing-bytes", "empty"],
)
def test_bad_frame_lengths_are_bad_frame(payload):
    assert error_of(open_client(), record(FRAMES, payload)) == "bad_frame"


def test_more_than_max_frames_in_a_record_is_bad_frame():
    payload = frames_payload(*[(14, PLAIN, bytes(14))] * (MAX_FRAMES_PER_RECORD + 1))
    assert error_of(open_client(), record(FRAMES, payload)) == "bad_frame"


def test_a_bad_frame_rejects_the_whole_record():
    payload = frames_payload((60, PLAIN, bytes(60)), (5, PLAIN, bytes(5)))
    assert error_of(open_client(), record(FRAMES, payload)) == "bad_frame"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (hello_payload(name=b"x" * 65), "bad_name"),
        (hello_payload(name=b"\xff\xfe"), "bad_name"),
        (hello_payload()[:-2], "bad_name"),  # name length runs past the record
        (hello_payload()[:20], "bad_length"),
        (hello_payload(mtu=10), "bad_hello"),
        (hello_payload(3, 2), "version"),
    ],
)
def test_malformed_hello(payload, reason):
    assert error_of(new("server"), record(HELLO, payload)) == reason


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\x05abc", b"\x00\x00\x00\x01s", b"\x00\x01c\x00\x00", b"\x00\x01c\x00\x01sX"],
)
def test_malformed_auth_is_bad_auth(payload):
    assert error_of(server_after_hello(), record(AUTH, payload)) == "bad_auth"


def test_malformed_close_and_ping():
    assert error_of(open_client(), record(CLOSE, b"\x00")) == "bad_close"
    assert error_of(open_client(), record(CLOSE, b"\x00\x00\xff")) == "bad_close"
    assert error_of(open_client(), record(PING, bytes(15))) == "bad_length"


def test_long_close_reason_is_cut_to_the_limit_on_a_character_boundary():
    client, server = handshake()
    [closed] = feed(server, client.send_close(1, "é" * 200))
    assert closed.reason == "é" * 128


def test_local_limits_are_checked():
    with pytest.raises(ValueError, match="name is 65 bytes"):
        new("client", name="n" * 65)
    with pytest.raises(ValueError, match="challenge is 5 bytes"):
        new("client", challenge=b"short")
    client = new("client")
    client.send_hello()
    feed(client, record(HELLO, hello_payload()))
    with pytest.raises(ValueError, match="certificate is 4097 bytes"):
        client.send_auth(b"c" * 4097, b"s")


# --- end of stream ---------------------------------------------------------------------------


def test_eof_on_a_record_boundary_is_an_event():
    client, server = handshake()
    events = feed(server, client.send_ping(1, 1))
    assert feed(server, b"") == [Eof()]
    assert events == [Ping(1, 1)]
    with pytest.raises(WireUsageError):
        server.receive_data(b"x")


def test_eof_inside_a_record_is_truncated():
    client, server = handshake()
    server.receive_data(client.send_ping(1, 1)[:-1])
    assert server.next_events() == []
    assert error_of(server, b"") == "truncated"


# --- hostile input ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(role=st.sampled_from(["client", "server"]), data=st.binary(max_size=2000),
       chunk=st.integers(1, 64))
def test_garbage_from_the_start_ends_in_events_or_an_error_never_a_hang(role, data, chunk):
    conn = new(role)
    conn.send_hello()
    try:
        with deadline(2.0):
            for i in range(0, len(data), chunk):
                conn.receive_data(data[i:i + chunk])
                conn.next_events()
                assert conn.buffered <= MAX_BUFFERED
            conn.receive_data(b"")
            conn.next_events()
    except WireError as error:
        assert error.reason.isidentifier()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), chunk=st.integers(1, 500))
def test_garbage_after_the_handshake_ends_in_events_or_an_error(data, chunk):
    client, server = handshake()
    for conn in (client, server):
        try:
            with deadline(2.0):
                for i in range(0, len(data), chunk):
                    conn.receive_data(data[i:i + chunk])
                    for event in conn.next_events():
                        if isinstance(event, Frames):
                            assert all(14 <= len(f) <= MAX_FRAME for f in event.frames)
                    assert conn.buffered <= MAX_BUFFERED
        except WireError as error:
            assert error.reason.isidentifier()


@settings(max_examples=200, deadline=None)
@given(prefix_frames=st.lists(st.integers(14, 200), min_size=1, max_size=5),
       flip_at=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_a_flipped_byte_in_a_valid_stream_never_hangs(prefix_frames, flip_at, flip):
    client, server = handshake()
    data = bytearray(client.send_frames([frame(s) for s in prefix_frames]) + client.send_ping(3, 4))
    data[flip_at % len(data)] ^= flip
    try:
        with deadline(2.0):
            feed(server, bytes(data))
            feed(server, b"")
    except WireError:
        pass
    assert server.buffered == 0
