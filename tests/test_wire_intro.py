"""The direct-path records of the wire codec (tunnel/wire.py, version 2): ADVERTISE and INTRO
round trips, where each may flow (a hub link only, after authentication, in its direction),
version 1 <-> 2 negotiation, every malformed case, and hostile bytes on an introducing link."""

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netstack.frame import Frame
from tests.support.deadline import deadline
from tunnel.introductions import (
    MAX_INTRO_ADDRESSES,
    MAX_INTRO_IPS,
    MAX_INTRO_MACS,
    MAX_INTRO_PEERS,
    DirectPeer,
)
from tunnel.keys import format_fingerprint
from tunnel.wire import (
    ADVERTISE,
    HELLO,
    HELLO_FIXED,
    INTRO,
    MAX_ADVERTISE_PAYLOAD,
    MAX_ADVERTISES,
    MAX_BUFFERED,
    MAX_INTRO_PAYLOAD,
    RECORD_HEADER,
    Advertise,
    Auth,
    Frames,
    Intro,
    WireConnection,
    WireError,
    WireUsageError,
    encode_intro_peer,
)


def record(rtype: int, payload: bytes) -> bytes:
    return RECORD_HEADER.pack(rtype, 0, 0, len(payload)) + payload


def new(role: str, **kwargs) -> WireConnection:
    kwargs.setdefault("name", role)
    kwargs.setdefault("offloads", 0)
    kwargs.setdefault("mtu", 1500)
    return WireConnection(role, **kwargs)


def pair(*, client_intro=True, server_intro=True, client_max=2, server_max=2,
         accept=True) -> tuple[WireConnection, WireConnection]:
    """An endpoint (client) and a hub (server) past HELLO and AUTH (and accept_auth())."""
    client = new("client", introductions=client_intro, max_version=client_max)
    server = new("server", introductions=server_intro, max_version=server_max)
    server.receive_data(client.send_hello())
    client.receive_data(server.send_hello())
    client.next_events()
    server.next_events()
    server.receive_data(client.send_auth(b"cert", b"sig"))
    [auth] = server.next_events()
    assert isinstance(auth, Auth)
    if accept:
        server.accept_auth()
    return client, server


def feed(conn: WireConnection, data: bytes) -> list:
    conn.receive_data(data)
    return conn.next_events()


def error_of(conn: WireConnection, data: bytes) -> str:
    conn.receive_data(data)
    with pytest.raises(WireError) as caught:
        conn.next_events()
    return caught.value.reason


def fingerprint(n: int) -> str:
    return format_fingerprint(bytes([n]) * 32)


def peer(n: int = 1, *, addresses=(("192.0.2.1", 4000),), macs=None, ipv4=None,
         ipv6=None) -> DirectPeer:
    return DirectPeer(
        f"peer-{n}", fingerprint(n), tuple(addresses),
        frozenset(macs if macs is not None else {bytes([2, 0, 0, 0, 0, n])}),
        frozenset(ipv4 if ipv4 is not None else {ipaddress.IPv4Address(f"10.0.0.{n}")}),
        frozenset(ipv6 if ipv6 is not None else {ipaddress.IPv6Address(f"fd00::{n}")}))


def address(family: int, raw: bytes, port: int) -> bytes:
    return bytes([family]) + raw + struct.pack("!H", port)


def entry(name: bytes = b"p", digest: bytes = b"\x01" * 32, addresses: bytes = b"\x00",
          macs: bytes = b"\x00\x00", ipv4: bytes = b"\x00\x00", ipv6: bytes = b"\x00\x00"):
    """One INTRO peer entry, field by field (each already with its count)."""
    return bytes([len(name)]) + name + digest + addresses + macs + ipv4 + ipv6


def intro(*entries: bytes, count: int | None = None) -> bytes:
    return record(INTRO, struct.pack("!H", len(entries) if count is None else count)
                  + b"".join(entries))


# --- round trips -----------------------------------------------------------------------------


def test_advertise_round_trips_ipv4_ipv6_and_the_wildcard():
    client, server = pair()
    addresses = (("192.0.2.7", 4443), ("2001:db8::7", 4443), ("0.0.0.0", 5000), ("::", 1))
    [event] = feed(server, client.send_advertise(addresses))
    assert event == Advertise(addresses)


def test_an_empty_advertise_says_no_listener_but_wants_introductions():
    client, server = pair()
    assert feed(server, client.send_advertise([])) == [Advertise(())]


def test_advertise_right_behind_auth_waits_for_accept_auth_like_frames():
    client, server = pair(accept=False)
    server.receive_data(client.send_advertise([("192.0.2.1", 9)]))
    assert server.next_events() == []  # decoding is paused until the AUTH is verified
    server.accept_auth()
    assert server.next_events() == [Advertise((("192.0.2.1", 9),))]


def test_intro_round_trips_every_field_of_every_peer():
    client, server = pair()
    peers = (peer(1), peer(2, addresses=(("2001:db8::2", 1), ("192.0.2.2", 65535))),
             peer(3, addresses=(), macs=set(), ipv4=set(), ipv6=set()))
    [event] = feed(client, server.send_intro(peers))
    assert tuple(entry.decoded() for entry in event.peers) == peers


def test_an_empty_intro_round_trips():
    client, server = pair()
    assert feed(client, server.send_intro([])) == [Intro(())]


def test_intro_at_every_limit_round_trips():
    client, server = pair()
    big = DirectPeer(
        "x" * 64, fingerprint(9), tuple((f"192.0.2.{i}", i + 1)
                                        for i in range(MAX_INTRO_ADDRESSES)),
        frozenset(bytes([2, 0, 0, 0, i >> 8, i & 255]) for i in range(MAX_INTRO_MACS)),
        frozenset(ipaddress.IPv4Address(0x0A000000 + i) for i in range(MAX_INTRO_IPS)),
        frozenset(ipaddress.IPv6Address((0xFD << 120) + i) for i in range(MAX_INTRO_IPS)))
    [event] = feed(client, server.send_intro([big]))
    assert [entry.decoded() for entry in event.peers] == [big]


def test_encoded_entries_are_what_send_intro_sends():
    _, server = pair()
    _, other = pair()
    peers = [peer(1), peer(2)]
    assert server.send_intro(peers) == other.send_intro_encoded(
        [encode_intro_peer(p) for p in peers])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(
    st.lists(st.tuples(st.ip_addresses(), st.integers(1, 65535)), max_size=MAX_INTRO_ADDRESSES),
    st.sets(st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] & 0xFE]) + b[1:]),
            max_size=8),
    st.sets(st.ip_addresses(v=4), max_size=8), st.sets(st.ip_addresses(v=6), max_size=8)),
    max_size=6))
def test_any_valid_intro_round_trips(specs):
    client, server = pair()
    peers = []
    for n, (addresses, macs, ipv4, ipv6) in enumerate(specs):
        dialable = tuple((str(ip), port) for ip, port in addresses
                         if not ip.is_multicast and not ip.is_unspecified)
        peers.append(DirectPeer(f"p{n}", fingerprint(n), dialable, frozenset(macs),
                                frozenset(ipv4), frozenset(ipv6)))
    [event] = feed(client, server.send_intro(peers))
    assert [entry.decoded() for entry in event.peers] == peers


# --- where they may flow ---------------------------------------------------------------------


def test_advertise_before_auth_is_unauthenticated():
    server = new("server", introductions=True)
    server.send_hello()
    client = new("client", introductions=True)
    feed(server, client.send_hello())
    assert error_of(server, record(ADVERTISE, b"\x00")) == "unauthenticated"


def test_intro_sent_to_the_hub_is_unexpected():
    client, server = pair()
    assert error_of(server, intro()) == "unexpected"


def test_advertise_sent_to_an_endpoint_is_unexpected():
    client, server = pair()
    assert error_of(client, record(ADVERTISE, b"\x00")) == "unexpected"


@pytest.mark.parametrize("rtype", [ADVERTISE, INTRO])
def test_a_direct_session_refuses_both_records_both_ways(rtype):
    client, server = pair(client_intro=False, server_intro=False)
    assert not client.introducing and not server.introducing
    payload = b"\x00" if rtype == ADVERTISE else b"\x00\x00"
    for conn in pair(client_intro=False, server_intro=False):
        assert error_of(conn, record(rtype, payload)) == "unexpected"
    with pytest.raises(WireUsageError, match="without introductions"):
        client.send_advertise([])
    with pytest.raises(WireUsageError, match="without introductions"):
        server.send_intro([])


def test_an_endpoint_without_introductions_refuses_a_hubs_intro():
    client, server = pair(client_intro=False)
    assert server.introducing and not client.introducing
    assert error_of(client, server.send_intro([peer()])) == "unexpected"


def test_only_the_endpoint_advertises_and_only_the_hub_introduces():
    client, server = pair()
    with pytest.raises(WireUsageError, match="as a server"):
        server.send_advertise([])
    with pytest.raises(WireUsageError, match="as a client"):
        client.send_intro([])


def test_the_hub_cannot_introduce_before_accepting_auth():
    _, server = pair(accept=False)
    with pytest.raises(WireUsageError, match="before accept_auth"):
        server.send_intro([])


def test_the_endpoint_cannot_advertise_before_its_auth():
    client = new("client", introductions=True)
    client.send_hello()
    feed(client, new("server", introductions=True).send_hello())
    with pytest.raises(WireUsageError, match="before AUTH"):
        client.send_advertise([])


# --- version 1 <-> 2 -------------------------------------------------------------------------


@pytest.mark.parametrize(("client_max", "server_max"), [(1, 2), (2, 1), (1, 1)])
def test_a_version_1_side_never_gets_the_new_records(client_max, server_max):
    client, server = pair(client_max=client_max, server_max=server_max)
    assert client.version == server.version == 1
    assert not client.introducing and not server.introducing
    with pytest.raises(WireUsageError, match="version-1 connection"):
        client.send_advertise([])
    with pytest.raises(WireUsageError, match="version-1 connection"):
        server.send_intro([])
    assert error_of(server, record(ADVERTISE, b"\x00")) == "unexpected"


def test_a_version_1_hello_range_gets_version_1_from_a_version_2_hub():
    server = new("server", introductions=True)
    payload = HELLO_FIXED.pack(1, 1, 0, 1500, bytes(32), 2) + b"v1"
    [hello] = feed(server, record(HELLO, payload))
    assert hello.version == 1 and server.version == 1 and not server.introducing


def test_two_version_2_hub_link_sides_introduce():
    client, server = pair()
    assert client.version == server.version == 2
    assert client.introducing and server.introducing


def test_frames_still_flow_on_an_introducing_link():
    client, server = pair()
    data = client.send_advertise([]) + client.send_frames([Frame(bytes(60))])
    events = feed(server, data)
    assert isinstance(events[0], Advertise) and isinstance(events[1], Frames)


# --- malformed ADVERTISE ---------------------------------------------------------------------

V4 = address(4, bytes([192, 0, 2, 1]), 80)


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "bad_advertise"),
    (bytes([MAX_INTRO_ADDRESSES + 1]) + V4 * (MAX_INTRO_ADDRESSES + 1), "bad_advertise"),
    (bytes([MAX_INTRO_ADDRESSES + 1]) + V4, "bad_advertise"),
    (b"\x01" + address(5, bytes(4), 80), "bad_advertise"),
    (b"\x01" + address(6, bytes(4), 80), "bad_advertise"),
    (b"\x01" + V4[:-1], "bad_advertise"),
    (b"\x02" + V4, "bad_advertise"),
    (b"\x01" + V4 + b"\x00", "bad_advertise"),
    (b"\x00\x00", "bad_advertise"),
    (b"\x01" + address(4, bytes([192, 0, 2, 1]), 0), "bad_advertise"),
    (b"\x01" + address(4, bytes([224, 0, 0, 1]), 80), "bad_advertise"),
    (b"\x01" + address(6, bytes([0xFF]) + bytes(15), 80), "bad_advertise"),
    (b"\x00" * (MAX_ADVERTISE_PAYLOAD + 1), "too_large"),
])
def test_malformed_advertise(payload, reason):
    _, server = pair()
    assert error_of(server, record(ADVERTISE, payload)) == reason


def test_more_than_max_advertises_on_one_connection_is_a_flood():
    client, server = pair()
    data = b"".join(client.send_advertise([("192.0.2.1", n + 1)])
                    for n in range(MAX_ADVERTISES + 1))
    server.receive_data(data)
    events = server.next_events()  # the ones before the violation
    assert len(events) == MAX_ADVERTISES
    assert events[-1] == Advertise((("192.0.2.1", MAX_ADVERTISES),))
    with pytest.raises(WireError) as caught:
        server.next_events()
    assert caught.value.reason == "advertise_flood"


def test_an_oversized_advertise_is_refused_from_its_header_alone():
    _, server = pair()
    header = RECORD_HEADER.pack(ADVERTISE, 0, 0, 1 << 20)
    assert error_of(server, header) == "too_large"


# --- malformed INTRO -------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "reason"), [
    (record(INTRO, b""), "bad_intro"),
    (record(INTRO, b"\x00"), "bad_intro"),
    (intro(count=MAX_INTRO_PEERS + 1), "bad_intro"),
    (intro(count=1), "bad_intro"),
    (intro(entry(name=b"")), "bad_intro"),
    (intro(entry(name=b"x" * 65)), "bad_intro"),
    (intro(entry(name=b"\xff\xfe")), "bad_intro"),
    (intro(entry()[:20]), "bad_intro"),
    (intro(entry(addresses=bytes([MAX_INTRO_ADDRESSES + 1]) + V4 * 5)), "bad_intro"),
    (intro(entry(addresses=b"\x01" + address(4, bytes(4), 80))), "bad_intro"),
    (intro(entry(addresses=b"\x01" + address(7, bytes(4), 80))), "bad_intro"),
    (intro(entry(addresses=b"\x01" + address(4, bytes([10, 0, 0, 1]), 0))), "bad_intro"),
    (intro(entry(macs=struct.pack("!H", MAX_INTRO_MACS + 1) + bytes(6 * 257))), "bad_intro"),
    (intro(entry(macs=b"\x00\x01" + b"\x01\x00\x5e\x00\x00\x01")), "bad_intro"),
    (intro(entry(macs=b"\x00\x02" + b"\x02" * 6)), "bad_intro"),
    (intro(entry(ipv4=struct.pack("!H", MAX_INTRO_IPS + 1) + bytes(4 * 1025))), "bad_intro"),
    (intro(entry(ipv6=struct.pack("!H", MAX_INTRO_IPS + 1) + bytes(16 * 1025))), "bad_intro"),
    (intro(entry(ipv6=b"\x00\x01" + bytes(15))), "bad_intro"),
    (record(INTRO, struct.pack("!H", 1) + entry() + b"\x00"), "bad_intro"),
    (intro(entry(), entry(name=b"q")), "bad_intro"),
    (intro(entry(), entry(digest=b"\x02" * 32)), "bad_intro"),
    (RECORD_HEADER.pack(INTRO, 0, 0, MAX_INTRO_PAYLOAD + 1), "too_large"),
])
def test_malformed_intro(data, reason):
    client, _ = pair()
    assert error_of(client, data) == reason


# --- send-side limits (our bugs, not the peer's) ---------------------------------------------


@pytest.mark.parametrize("bad", [
    peer(addresses=[("192.0.2.1", 1)] * (MAX_INTRO_ADDRESSES + 1)),
    peer(macs={bytes([2, 0, 0, i >> 8, i & 255, 0]) for i in range(MAX_INTRO_MACS + 1)}),
    peer(ipv4={ipaddress.IPv4Address(i) for i in range(MAX_INTRO_IPS + 1)}),
    peer(ipv6={ipaddress.IPv6Address(i) for i in range(MAX_INTRO_IPS + 1)}),
    peer(macs={b"\x01\x00\x5e\x00\x00\x01"}),
    peer(macs={b"\x02\x00"}),
    peer(addresses=[("0.0.0.0", 1)]),
    peer(addresses=[("fe80::1%eth0", 1)]),
    peer(addresses=[("192.0.2.1", 0)]),
    peer(addresses=[("not-an-address", 1)]),
    DirectPeer("", fingerprint(1), (), frozenset(), frozenset(), frozenset()),
    DirectPeer("p", "SHA256:nope", (), frozenset(), frozenset(), frozenset()),
])
def test_a_peer_past_the_limits_is_not_encoded(bad):
    with pytest.raises(ValueError):
        encode_intro_peer(bad)


def test_too_many_peers_or_bytes_are_not_sent():
    _, server = pair()
    with pytest.raises(ValueError, match="peers"):
        server.send_intro_encoded([encode_intro_peer(peer())] * (MAX_INTRO_PEERS + 1))
    with pytest.raises(ValueError, match="bytes"):
        server.send_intro_encoded([b"\x00" * (MAX_INTRO_PAYLOAD // 2)] * 2)


def test_too_many_advertised_addresses_are_not_sent():
    client, _ = pair()
    with pytest.raises(ValueError):
        client.send_advertise([("192.0.2.1", 1)] * (MAX_INTRO_ADDRESSES + 1))
    with pytest.raises(ValueError):
        client.send_advertise([("224.0.0.1", 1)])


# --- hostile bytes on an introducing link ----------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), chunk=st.integers(1, 500),
       rtype=st.sampled_from([ADVERTISE, INTRO]))
def test_garbage_in_the_new_records_ends_in_events_or_an_error(data, chunk, rtype):
    for conn in pair():
        stream = record(rtype, data) + data
        try:
            with deadline(2.0):
                for i in range(0, len(stream), chunk):
                    conn.receive_data(stream[i:i + chunk])
                    conn.next_events()
                    assert conn.buffered <= MAX_BUFFERED
        except WireError as error:
            assert error.reason.isidentifier()


@settings(max_examples=200, deadline=None)
@given(flip_at=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_a_flipped_byte_in_an_intro_never_hangs(flip_at, flip):
    client, server = pair()
    data = bytearray(server.send_intro([peer(1), peer(2)]))
    data[flip_at % len(data)] ^= flip
    try:
        with deadline(2.0):
            feed(client, bytes(data))
    except WireError as error:
        assert error.reason.isidentifier()
    assert client.buffered <= len(data)
