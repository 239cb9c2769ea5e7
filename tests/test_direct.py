"""Direct paths without sockets (tunnel/direct.py): who dials whom, each peer's life and
backoff, steering unicast to a peer's direct port or the hub (never flooding to direct
ports, falling back the moment a session is down), the receive policy on what a direct
peer sends, and introductions replacing the whole set."""

from ipaddress import ip_address

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from netstack.frame import Frame
from netstack.port import Port
from netstack.switch import Switch
from tests.support.clock import Clock
from tunnel.direct import (
    DIAL_BACKOFF,
    DIAL_STABLE_SECONDS,
    DIRECT_IDLE_SECONDS,
    EAGER_DIAL_PEERS,
    FALLBACK_BACKOFF_MAX,
    FALLBACK_DIAL_SECONDS,
    VOUCH_DELAY_SECONDS,
    VOUCH_REFRESH_SECONDS,
    DirectPeers,
    DirectPort,
    PeerLife,
    SteeringUplink,
    dials,
    supersedes,
)
from tunnel.introductions import DirectPeer
from tunnel.keys import format_fingerprint

LOCAL_MAC, PEER_MAC, OTHER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
BCAST = "ff:ff:ff:ff:ff:ff"
LOW, HIGH, THIRD = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def peer(name: str = "b", digest: bytes = HIGH, *, listens: bool = True,
         macs: tuple[str, ...] = (PEER_MAC,),
         ips: tuple[str, ...] = ("10.0.0.2", "fd00::2")) -> DirectPeer:
    parsed = [ip_address(ip) for ip in ips]
    return DirectPeer(name=name, fingerprint=format_fingerprint(digest),
                      addresses=(("10.9.0.2", 7000),) if listens else (),
                      macs=frozenset(mac(m) for m in macs),
                      ipv4=frozenset(ip for ip in parsed if ip.version == 4),
                      ipv6=frozenset(ip for ip in parsed if ip.version == 6))


class Recorder(Port):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.got: list[Frame] = []

    def deliver(self, frames: list[Frame]) -> None:
        self.got.extend(frames)


class UpLink:
    """Stands for a live Link in `port.active`: steering only asks whether there is one,
    status who dialled it (the codec's role: "client" dialled); it never sends at once, so
    what a port delivers waits in its queue, where these tests read it."""

    wire = type("Wire", (), {"role": "client"})

    def send_at_once(self, frames: list[Frame]) -> bool:
        return False


def bring_up(port: DirectPort | SteeringUplink) -> None:
    port.active = UpLink()  # type: ignore[assignment]


def frame(packet) -> Frame:
    return Frame(bytes(packet))


# -- who dials ---------------------------------------------------------------------------------

def test_only_the_side_that_does_not_listen_dials_a_listener():
    assert dials(LOW, False, HIGH, True) is True
    assert dials(LOW, True, HIGH, False) is False


def test_when_both_listen_the_lower_fingerprint_dials_and_the_other_waits():
    assert dials(LOW, True, HIGH, True) is True
    assert dials(HIGH, True, LOW, True) is False


def test_when_neither_listens_there_is_no_direct_path():
    assert dials(LOW, False, HIGH, False) is None


# -- a peer's life -------------------------------------------------------------------------------

def test_a_dialer_backs_off_doubling_to_a_one_second_cap_and_resets_once_up():
    life = PeerLife(True, now=0.0)
    assert life.due(0.0)
    waits = []
    now = 0.0
    for _ in range(6):
        life.dialing()
        life.failed(now, "refused")
        waits.append(life.next_dial - now)
        assert not life.due(now)
        now = life.next_dial
        assert life.due(now)
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert max(waits) == DIAL_BACKOFF[1]
    life.dialing()
    life.up(now, ours=True)
    assert life.state == "up" and not life.due(now + 10)
    now += DIAL_STABLE_SECONDS
    life.down(now, "connection lost")
    assert life.next_dial == now + DIAL_BACKOFF[0]


def test_a_peer_that_accepts_and_closes_at_once_is_redialled_at_the_backoff_cap():
    life = PeerLife(True, now=0.0)
    now, waits = 0.0, []
    for _ in range(6):
        life.dialing()
        life.up(now, ours=True)
        life.down(now + 0.01, "closed by the peer")
        waits.append(life.next_dial - (now + 0.01))
        now = life.next_dial
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_the_accepting_side_and_a_peer_nobody_can_dial_never_dial():
    for role in (False, None):
        life = PeerLife(role, now=0.0)
        life.down(0.0, "lost")
        assert not life.due(100.0)
    assert PeerLife(None, 0.0).state == "relayed"
    assert PeerLife(False, 0.0).state == "waiting"


def test_when_both_listen_the_higher_side_dials_too_once_no_session_came_up_for_a_while():
    peers, _ = manager()
    life = peers.introduce([peer("a", bytes(32))], now=0.0).added[0].life  # it sorts lower
    assert life.role is False and life.fallback and life.state == "backoff"
    assert not life.due(FALLBACK_DIAL_SECONDS - 0.01) and life.due(FALLBACK_DIAL_SECONDS)
    now, waits = FALLBACK_DIAL_SECONDS, []
    for _ in range(5):  # neither direction works: bounded, doubling to the cap
        life.dialing()
        life.failed(now, "unreachable")
        waits.append(life.next_dial - now)
        now = life.next_dial
    assert waits == pytest.approx([2.0, 4.0, 8.0, 8.0, 8.0])
    assert max(waits) == FALLBACK_BACKOFF_MAX
    # the lower side dials first: nothing extra when the peer does not listen, or we do not
    assert not peers.introduce([peer("a", bytes(32), listens=False)], 1.0).added[0].life.dials
    peers, _ = manager(listens=False)
    life = peers.introduce([peer("a", bytes(32))], now=0.0).added[0].life
    assert life.role is True and not life.fallback and life.due(0.0)


def test_the_fallback_side_redials_at_once_after_its_own_session_and_waits_after_the_peers():
    life = PeerLife(False, 0.0, fallback=True)
    life.dialing()
    life.up(0.0, ours=True)
    life.down(10.0, "connection lost")  # its direction is the one that works
    assert life.next_dial == 10.0 + DIAL_BACKOFF[0]
    life.dialing()
    life.up(11.0, ours=False)
    life.down(20.0, "connection lost")  # the peer dialled that one: the peer redials first
    assert life.next_dial == 20.0 + FALLBACK_DIAL_SECONDS and life.delay == FALLBACK_DIAL_SECONDS


def test_a_dial_that_fails_while_the_peers_session_is_up_is_only_counted():
    life = PeerLife(False, 0.0, fallback=True)
    life.dialing()
    life.up(0.5, ours=False)  # the peer's dial came first
    life.failed(1.0, "refused: duplicate")
    assert life.state == "up" and life.failures == 1 and not life.due(100.0)


@pytest.mark.parametrize("low_first", ["mine", "theirs"])
@pytest.mark.parametrize("high_first", ["mine", "theirs"])
def test_when_both_sides_dial_at_once_both_keep_the_session_the_lower_side_dialled(
        low_first, high_first):
    """Each side sees the two sessions come up in either order; both end on the same one."""
    def kept(own: bytes, other: bytes, first: str) -> str:
        order = ["mine", "theirs"] if first == "mine" else ["theirs", "mine"]
        active = order[0]
        if supersedes(own, other, order[1] == "mine", active == "mine"):
            active = order[1]
        return active
    assert kept(LOW, HIGH, low_first) == "mine"  # the lower side keeps the one it dialled
    assert kept(HIGH, LOW, high_first) == "theirs"  # ... and so does the higher side


def test_a_newer_session_of_the_same_direction_always_takes_over():
    for own, other in ((LOW, HIGH), (HIGH, LOW)):
        for ours in (True, False):
            assert supersedes(own, other, ours, ours)


def numbered(n: int) -> DirectPeer:
    return peer(f"p{n}", bytes([9, n]) + bytes(30), macs=(f"02:00:00:00:01:{n:02x}",),
                ips=(f"10.0.1.{n}",))


def test_a_small_set_is_dialled_at_once_a_larger_one_only_where_frames_go():
    peers, uplink = manager(listens=False)
    bring_up(uplink)
    peers.introduce([numbered(n) for n in range(EAGER_DIAL_PEERS)], now=0.0)
    assert len(peers.due(0.0)) == EAGER_DIAL_PEERS and not uplink.demand
    peers.introduce([numbered(n) for n in range(EAGER_DIAL_PEERS + 1)], now=1.0)
    assert not peers.due(1.0) and peers.next_due(1.0) is None  # nothing wanted: no wake-ups
    uplink.deliver([frame(Ether(src=LOCAL_MAC, dst="02:00:00:00:01:05") / IP() / ICMP())])
    assert len(uplink.queue) == 1  # it takes the hub, and marks its peer wanted
    peers.sample_demand(2.0)
    assert [port.peer.name for port in peers.due(2.0)] == ["p5"]
    assert not peers.due(2.0 + DIRECT_IDLE_SECONDS)  # wanted no more
    peers.introduce([numbered(n) for n in range(3)], now=3.0)  # small again: all at once
    assert len(peers.due(3.0)) == 3 and not uplink.demand


def test_an_on_demand_session_that_carried_nothing_for_a_while_is_closed_a_busy_one_kept():
    peers, uplink = manager(listens=False)
    ports = peers.introduce([numbered(n) for n in range(EAGER_DIAL_PEERS + 1)], 0.0).added
    quiet, busy = ports[0], ports[1]
    for port in (quiet, busy):
        bring_up(port)
        port.life.dialing()
        port.life.up(0.0, ours=True)
    now = 0.0
    while now < DIRECT_IDLE_SECONDS:
        assert not peers.idle(now)
        busy.counters.out_frames += 1
        now += 1.0
    assert peers.idle(now + 1.0) == [quiet]
    quiet.life.idle(now)
    quiet.life.down(now, "aborted: idle")  # its link ends: no failure, no backoff
    assert quiet.life.failures == 0 and quiet.life.state == "backoff"
    quiet.life.wanted = now + 5.0
    assert quiet.life.due(now + 5.0)  # the next frame for it dials at once


def test_a_closed_peer_stays_closed():
    life = PeerLife(True, now=0.0)
    life.close()
    life.down(0.0, "lost")
    assert life.state == "closed" and not life.due(100.0)


# -- introductions ------------------------------------------------------------------------------

def manager(listens: bool = True) -> tuple[DirectPeers, SteeringUplink]:
    uplink = SteeringUplink()
    return DirectPeers(LOW, listens, uplink, lambda dst: dst == mac(LOCAL_MAC)), uplink


def test_an_introduction_replaces_the_whole_set_and_never_lists_ourselves():
    peers, _ = manager()
    change = peers.introduce([peer("b", HIGH), peer("self", LOW)], now=0.0)
    assert [p.peer.name for p in change.added] == ["b"] and not change.removed
    change = peers.introduce([peer("c", THIRD)], now=1.0)
    assert [p.peer.name for p in change.added] == ["c"]
    assert [p.peer.name for p in change.removed] == ["b"]
    assert change.removed[0].life.state == "closed"
    assert peers.authorised().names == frozenset({"c"})


def test_new_bindings_for_the_same_key_keep_its_port_and_session():
    peers, uplink = manager()
    port = peers.introduce([peer("b", HIGH)], now=0.0).added[0]
    bring_up(port)
    peers.update_routes()
    change = peers.introduce([peer("b", HIGH, macs=(PEER_MAC, OTHER_MAC))], now=1.0)
    assert not change.added and not change.removed
    assert peers.port_of(HIGH) is port
    assert set(uplink.routes) == {mac(PEER_MAC), mac(OTHER_MAC)}


def test_routes_are_rebuilt_only_when_the_sessions_change_and_new_bindings_rerouted_alone():
    """The shell calls update_routes every turn: with 256 peers of 256 MACs up a rebuild is
    65,536 entries, so it happens only when the routed sessions change."""
    peers, uplink = manager()
    b, c = peers.introduce([peer("b", HIGH), peer("c", THIRD, macs=(OTHER_MAC,))], 0.0).added
    bring_up(b)
    peers.update_routes()
    routes = uplink.routes
    peers.update_routes()
    assert uplink.routes is routes  # nothing changed: not rebuilt
    peers.introduce([peer("b", HIGH, macs=("02:00:00:00:00:09",)),
                     peer("c", THIRD, macs=(OTHER_MAC,))], 1.0)
    assert uplink.routes is routes and set(routes) == {mac("02:00:00:00:00:09")}
    bring_up(c)
    peers.update_routes()
    assert set(uplink.routes) == {mac("02:00:00:00:00:09"), mac(OTHER_MAC)}
    peers.introduce([peer("c", THIRD, macs=(OTHER_MAC,))], 2.0)  # b is gone: at once
    assert set(uplink.routes) == {mac(OTHER_MAC)}


def test_a_name_moving_to_another_key_while_slices_are_pending_never_names_two_keys():
    """The hub gives a key's name to another key (and the first key a new name): while the
    rest of that INTRO waits to be read, who may dial us is already the newest INTRO's
    names (two ports of one name made every direct handshake an internal error)."""
    many = [f"10.1.{i >> 8}.{i & 255}" for i in range(1024)]
    many += [f"fd00::1:{i:x}" for i in range(1024)]
    peers, _ = manager()
    peers.introduce([peer("x", HIGH)], now=0.0)
    peers.introduce([peer("x", THIRD, ips=tuple(many)), peer("y", HIGH, ips=tuple(many))],
                    now=1.0)
    assert peers.pending  # "y" (HIGH) is still read as "x"
    authorised = peers.authorised()
    assert authorised.lookup(THIRD) == "x" and authorised.lookup(HIGH) == "y"
    # status (and the metrics labelled by it) too: two series of one name fail a scrape
    assert sorted(entry["name"] for entry in peers.status()) == ["x", "y"]
    while peers.pending:
        peers.apply(1.0)
    assert peers.authorised().names == frozenset({"x", "y"})


def test_a_mac_the_hub_moves_to_another_up_peer_is_routed_to_it_whichever_is_read_first():
    peers, uplink = manager()
    x, y = peers.introduce([peer("x", HIGH, macs=(OTHER_MAC,)),
                            peer("y", THIRD, macs=(PEER_MAC,))], 0.0).added
    bring_up(x)
    bring_up(y)
    peers.update_routes()
    # y (read first) takes x's MAC; x gets another
    peers.introduce([peer("y", THIRD, macs=(PEER_MAC, OTHER_MAC)),
                     peer("x", HIGH, macs=("02:00:00:00:00:09",))], 1.0)
    peers.update_routes()
    assert uplink.routes == {mac(PEER_MAC): y, mac(OTHER_MAC): y, mac("02:00:00:00:00:09"): x}


def test_a_mac_moved_to_a_peer_read_already_stays_its_own_through_a_rebuild_of_the_routes():
    many = tuple(f"fd00::1:{i:x}" for i in range(2048))
    peers, uplink = manager()
    x, y = peers.introduce([peer("x", HIGH, macs=(OTHER_MAC,)),
                            peer("y", THIRD, macs=(PEER_MAC,))], 0.0).added
    bring_up(x)
    bring_up(y)
    peers.update_routes()
    peers.introduce([peer("y", THIRD, macs=(PEER_MAC, OTHER_MAC), ips=many),
                     peer("x", HIGH, macs=("02:00:00:00:00:09",), ips=many)], 1.0)
    assert list(peers.pending) == [HIGH]  # x still holds its old MAC
    bring_up(x)  # a new session of x: the routes are rebuilt
    peers.update_routes()
    assert uplink.routes[mac(OTHER_MAC)] is y
    peers.apply(1.0)
    peers.update_routes()
    assert uplink.routes == {mac(PEER_MAC): y, mac(OTHER_MAC): y, mac("02:00:00:00:00:09"): x}


def test_a_peer_that_stops_listening_gets_a_new_life_with_the_other_role():
    peers, _ = manager(listens=False)
    first = peers.introduce([peer("b", HIGH, listens=True)], now=0.0).added[0]
    assert first.life.role is True and peers.due(0.0) == [first]
    change = peers.introduce([peer("b", HIGH, listens=False)], now=1.0)
    assert change.removed == [first] and first.life.state == "closed"
    assert change.added[0].life.role is None and not peers.due(100.0)


# -- steering ----------------------------------------------------------------------------------

def endpoint_switch() -> tuple[Switch, Recorder, SteeringUplink, DirectPeers, DirectPort]:
    clock = Clock()
    switch = Switch(clock=clock)
    local = Recorder("tap")
    uplink = SteeringUplink(clock=clock)
    bring_up(uplink)
    switch.attach(local)
    switch.attach(uplink)
    peers = DirectPeers(LOW, True, uplink, lambda dst: dst == mac(LOCAL_MAC))
    port = peers.introduce([peer("b", HIGH)], now=0.0).added[0]
    # the peer's MAC is known on the uplink, as after any frame from it
    switch.forward(uplink, [frame(Ether(dst=LOCAL_MAC, src=PEER_MAC) / IP())])
    return switch, local, uplink, peers, port


def test_unicast_to_a_peer_goes_direct_once_the_hub_has_seen_its_source():
    switch, local, uplink, peers, port = endpoint_switch()
    bring_up(port)
    peers.update_routes()
    to_peer = frame(Ether(dst=PEER_MAC, src=LOCAL_MAC) / IP(src="10.0.0.1"))
    switch.forward(local, [to_peer])  # a source the hub never saw: through the hub first
    assert len(uplink.queue) == 1 and not port.queue
    uplink.clock.now += VOUCH_DELAY_SECONDS / 2
    switch.forward(local, [to_peer])  # the hub's new INTRO may not have reached the peer
    assert len(uplink.queue) == 2 and not port.queue
    uplink.clock.now += VOUCH_DELAY_SECONDS
    switch.forward(local, [to_peer, to_peer])
    assert len(port.queue) == 2 and len(uplink.queue) == 2
    other_source = frame(Ether(dst=PEER_MAC, src=LOCAL_MAC) / IP(src="10.0.0.9"))
    switch.forward(local, [other_source])  # another address: the hub first again
    assert len(uplink.queue) == 3


def test_every_source_refreshes_the_hubs_bindings_with_one_frame_a_minute():
    switch, local, uplink, peers, port = endpoint_switch()
    bring_up(port)
    peers.update_routes()
    to_peer = frame(Ether(dst=PEER_MAC, src=LOCAL_MAC) / IP(src="10.0.0.1"))
    switch.forward(local, [to_peer])
    uplink.clock.now += VOUCH_DELAY_SECONDS
    switch.forward(local, [to_peer])
    assert len(port.queue) == 1 and len(uplink.queue) == 1
    uplink.clock.now += VOUCH_REFRESH_SECONDS
    switch.forward(local, [to_peer, to_peer])  # the first through the hub, then direct
    assert len(port.queue) == 2 and len(uplink.queue) == 2


def test_broadcast_multicast_and_unknown_unicast_never_go_to_a_direct_port():
    switch, local, uplink, peers, port = endpoint_switch()
    bring_up(port)
    peers.update_routes()
    switch.forward(local, [frame(Ether(dst=BCAST, src=LOCAL_MAC) / ARP()),
                           frame(Ether(dst="33:33:00:00:00:01", src=LOCAL_MAC) / IPv6()),
                           frame(Ether(dst=OTHER_MAC, src=LOCAL_MAC) / IP())])
    assert not port.queue and len(uplink.queue) == 3


def test_frames_take_the_hub_while_the_direct_session_is_down_and_the_moment_it_ends():
    switch, local, uplink, peers, port = endpoint_switch()
    to_peer = frame(Ether(dst=PEER_MAC, src=LOCAL_MAC) / IP())
    switch.forward(local, [to_peer])  # never up: no route
    assert len(uplink.queue) == 1 and not port.queue
    bring_up(port)
    peers.update_routes()
    switch.forward(local, [to_peer])  # vouched for from now on
    uplink.clock.now += VOUCH_DELAY_SECONDS
    switch.forward(local, [to_peer])
    assert len(port.queue) == 1 and len(uplink.queue) == 2
    port.queue.clear()
    port.active = None  # the session ended; routes not yet rebuilt
    switch.forward(local, [to_peer])
    assert len(uplink.queue) == 3 and not port.queue and not port.counters.drops


# -- what a direct peer may send ---------------------------------------------------------------

def police(packet) -> tuple[list[Frame], dict[str, int]]:
    port = DirectPort(peer("b", HIGH), HIGH, PeerLife(False, 0.0),
                      lambda dst: dst == mac(LOCAL_MAC))
    admitted = port.filter.admit([frame(packet)], port, now=0.0)
    return admitted, dict(port.counters.drops)


@pytest.mark.parametrize("packet", [
    Ether(dst=LOCAL_MAC, src=PEER_MAC) / IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(),
    Ether(dst=LOCAL_MAC, src=PEER_MAC) / IPv6(src="fd00::2", dst="fd00::1") / ICMPv6EchoRequest(),
    Ether(dst=LOCAL_MAC, src=PEER_MAC) / ARP(op=2, hwsrc=PEER_MAC, psrc="10.0.0.2"),
    Ether(dst=LOCAL_MAC, src=PEER_MAC) / IPv6(src="fd00::2", dst="fd00::1")
    / ICMPv6ND_NA(tgt="fd00::2") / ICMPv6NDOptDstLLAddr(lladdr=PEER_MAC),
], ids=["ipv4", "ipv6", "arp_reply", "neighbour_advertisement"])
def test_a_direct_peer_may_send_from_its_introduced_bindings_to_a_local_port(packet):
    admitted, drops = police(packet)
    assert len(admitted) == 1 and not drops


@pytest.mark.parametrize(("packet", "reason"), [
    (Ether(dst=LOCAL_MAC, src=OTHER_MAC) / IP(src="10.0.0.2"), "mac_spoof"),
    (Ether(dst=LOCAL_MAC, src=PEER_MAC) / IP(src="10.0.0.3"), "ip_spoof"),
    (Ether(dst=LOCAL_MAC, src=PEER_MAC) / IPv6(src="fd00::3") / ICMPv6EchoRequest(),
     "ip_spoof"),
    (Ether(dst=LOCAL_MAC, src=PEER_MAC) / ARP(op=2, hwsrc=PEER_MAC, psrc="10.0.0.3"),
     "ip_spoof"),
    (Ether(dst=LOCAL_MAC, src=PEER_MAC) / ARP(op=2, hwsrc=OTHER_MAC, psrc="10.0.0.2"),
     "arp_spoof"),
    (Ether(dst=LOCAL_MAC, src=PEER_MAC) / IPv6(src="fd00::2")
     / ICMPv6ND_NA(tgt="fd00::1") / ICMPv6NDOptDstLLAddr(lladdr=PEER_MAC), "ip_spoof"),
    (Ether(dst=OTHER_MAC, src=PEER_MAC) / IP(src="10.0.0.2"), "not_local"),
    (Ether(dst=BCAST, src=PEER_MAC) / ARP(hwsrc=PEER_MAC, psrc="10.0.0.2"), "not_unicast"),
    (Ether(dst=LOCAL_MAC, src=PEER_MAC) / IP(src="10.0.0.2") / UDP(sport=67, dport=68),
     "dhcp_guard"),
], ids=["mac", "ipv4", "ipv6", "arp_sender", "arp_hardware", "nd_target", "relay", "broadcast",
        "dhcp_server"])
def test_a_direct_peer_cannot_send_what_the_hub_would_have_dropped(packet, reason):
    admitted, drops = police(packet)
    assert not admitted and drops == {reason: 1}


def test_the_filter_counts_what_came_in():
    port = DirectPort(peer("b", HIGH), HIGH, PeerLife(False, 0.0), lambda dst: True)
    good = frame(Ether(dst=LOCAL_MAC, src=PEER_MAC) / IP(src="10.0.0.2"))
    bad = frame(Ether(dst=LOCAL_MAC, src=OTHER_MAC) / IP(src="10.0.0.2"))
    assert port.filter.admit([good, bad, Frame(b"short")], port, now=0.0) == [good]
    assert port.counters.in_frames == 3
    assert port.counters.drops == {"mac_spoof": 1, "runt": 1}


def test_status_text_shows_each_peer_direct_or_relayed_with_address_rtt_traffic_and_drops():
    from tunnel.cli.status import format_status

    peers, _ = manager()
    up, down = (peers.introduce([peer("b", HIGH), peer("c", THIRD)], now=0.0).added)
    bring_up(up)
    up.life.up(0.0, ours=True)
    up.peer_address, up.rtt_ms = "10.9.0.2:7000", 0.25
    up.counters.drop("mac_spoof")
    down.life.dialing()
    down.life.failed(0.0, "connection refused")
    text = format_status({"role": "endpoint", "pid": 1, "direct": {
        "listen": ["0.0.0.0:7000"], "refused": {"auth_unknown_key": 2},
        "peers": peers.status()}})
    assert "direct paths: 0.0.0.0:7000, 2 peers introduced, refused auth_unknown_key=2" in text
    assert "b: direct via 10.9.0.2:7000 (up, dials, dialled by us), rtt 0.25 ms" in text
    assert "drops mac_spoof=1" in text
    assert "c: relayed (backoff, dials)" in text and "connection refused" in text


def test_status_text_says_nothing_of_direct_paths_without_listen_or_introductions():
    from tunnel.cli.status import format_status

    text = format_status({"role": "endpoint", "pid": 1, "direct": {
        "listen": [], "refused": {}, "peers": []}})
    assert "direct" not in text
