"""The learning switch: learning, flooding, aging, offload filtering, per-port counters,
reservations, containment of exceptions, bounded queues."""

import pytest

from netstack.frame import (
    ALL_OFFLOADS,
    GSO_TCPV4,
    GSO_UDP_L4,
    HDR_F_NEEDS_CSUM,
    MAX_FRAME_LEN,
    PLAIN,
    Frame,
    Offload,
    OffloadInfo,
)
from netstack.offload import MIN_GSO_SIZE
from netstack.policy import PortPolicy
from netstack.port import Port, QueuedPort
from netstack.switch import Switch
from tests.support.clock import Clock

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
C = bytes.fromhex("020000000003")
BROADCAST = b"\xff" * 6


def eth(dst: bytes, src: bytes, payload: bytes = b"x" * 46) -> Frame:
    return Frame(dst + src + b"\x08\x00" + payload)


class Recorder(Port):
    def __init__(self, name: str, accepts: Offload = Offload.NONE) -> None:
        super().__init__(name, accepts)
        self.got: list[Frame] = []
        self.calls = 0

    def deliver(self, frames: list[Frame]) -> None:
        self.calls += 1
        self.got.extend(frames)


def three_ports(clock=None):
    switch = Switch(clock=clock) if clock else Switch()
    ports = [Recorder(n) for n in "abc"]
    for p in ports:
        switch.attach(p)
    return switch, ports


def test_unknown_unicast_floods_then_learned_mac_is_switched():
    switch, (a, b, c) = three_ports()
    switch.forward(a, [eth(B, A)])
    assert len(b.got) == 1 and len(c.got) == 1 and not a.got
    switch.forward(b, [eth(A, B)])
    assert len(a.got) == 1 and len(c.got) == 1  # A was learned on port a: no flood
    switch.forward(a, [eth(B, A)])
    assert len(b.got) == 2 and len(c.got) == 1


def test_broadcast_goes_everywhere_but_ingress():
    switch, (a, b, c) = three_ports()
    switch.forward(a, [eth(BROADCAST, A)])
    assert (len(a.got), len(b.got), len(c.got)) == (0, 1, 1)


def test_a_batch_is_delivered_with_one_call_per_egress_port():
    switch, (a, b, c) = three_ports()
    switch.forward(b, [eth(A, B)])
    switch.forward(c, [eth(A, C)])
    a.calls = c.calls = 0
    c.got.clear()
    switch.forward(b, [eth(C, B), eth(C, B), eth(BROADCAST, B)])
    assert c.calls == 1 and len(c.got) == 3
    assert a.calls == 1


def test_learned_mac_ages_out_and_floods_again():
    clock = Clock(1000.0)
    switch, (a, b, c) = three_ports(clock)
    switch.forward(b, [eth(A, B)])
    clock.now += switch.aging + 1
    switch.forward(a, [eth(B, A)])
    assert len(c.got) == 2  # flooded again


def test_mac_moving_to_another_port_is_relearned():
    switch, (a, b, c) = three_ports()
    switch.forward(b, [eth(A, B)])
    switch.forward(c, [eth(A, B)])  # B moved to port c
    switch.forward(a, [eth(B, A)])
    assert len(c.got) == 2 and bytes(c.got[-1].data[6:12]) == A


def test_runts_and_multicast_sources_are_dropped_and_counted():
    switch, (a, b, c) = three_ports()
    switch.forward(a, [Frame(b"\x01\x02"), eth(B, b"\x01\x00\x5e\x00\x00\x01")])
    assert not b.got and not c.got
    assert a.counters.drops == {"runt": 1, "multicast_source": 1}
    assert a.counters.in_frames == 2


def test_frame_to_own_port_is_not_reflected():
    switch, (a, b, _c) = three_ports()
    switch.forward(a, [eth(B, A)])
    switch.forward(b, [eth(C, B)])
    b.got.clear()
    switch.forward(b, [eth(B, B)])
    assert not b.got and b.counters.drops["same_port"] == 1


def test_frames_needing_offloads_are_fitted_to_each_port():
    """A TSO frame and a partial-checksum frame: passed as they are to a port that accepts
    the offloads, segmented and checksummed for one that does not, dropped (counted) when
    their headers are garbage."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    switch = Switch()
    sender, plain, capable = Recorder("s"), Recorder("plain"), Recorder("tso", Offload.CSUM
                                                                      | Offload.TSO4)
    for p in (sender, plain, capable):
        switch.attach(p)
    packet = Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01") / IP(
        src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="PA") / (b"y" * 3000)
    raw = bytes(packet)
    tso = Frame(raw, OffloadInfo(0, GSO_TCPV4, 54, 1000, 0, 0))
    garbage = Frame(eth(BROADCAST, A, b"y" * 3000).data,
                    OffloadInfo(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16))
    switch.forward(sender, [tso, garbage, eth(BROADCAST, A)])
    assert [len(f) for f in capable.got] == [len(raw), len(garbage), 60]
    assert [len(f) for f in plain.got] == [1054, 1054, 1054, 60]
    for segment in plain.got[:3]:
        parsed = Ether(bytes(segment.data))
        checksum = parsed[TCP].chksum
        del parsed[TCP].chksum
        assert Ether(bytes(parsed))[TCP].chksum == checksum
    assert plain.counters.software_offloads == 1
    assert sum(plain.counters.drops.values()) == 1
    assert next(iter(plain.counters.drops)).startswith("offload_")


def test_unknown_gso_type_is_accepted_by_nobody():
    """Not even by a port that accepts every offload: the switch drops the frame where it
    entered, counted on the sender, and forwards the rest of the batch."""
    switch = Switch()
    sender, plain, everything = Recorder("s"), Recorder("plain"), Recorder("all", ALL_OFFLOADS)
    for p in (sender, plain, everything):
        switch.attach(p)
    unknown = Frame(eth(BROADCAST, A).data, OffloadInfo(gso_type=0x42))
    switch.forward(sender, [unknown, eth(BROADCAST, A)])
    assert [f.offload for f in plain.got] == [f.offload for f in everything.got] == [PLAIN]
    assert sender.counters.drops == {"offload_gso_type": 1}
    assert not plain.counters.drops and not everything.counters.drops


def test_detached_port_is_forgotten():
    switch, (a, b, c) = three_ports()
    switch.forward(b, [eth(A, B)])
    switch.detach(b)
    switch.forward(a, [eth(B, A)])
    assert len(c.got) == 2 and len(b.got) == 0


def test_queued_port_drops_beyond_its_limit_and_wakes_once():
    port = QueuedPort("q", limit=3)
    wakeups = []
    port.on_ready = lambda: wakeups.append(1)
    port.deliver([eth(B, A)] * 2)
    port.deliver([eth(B, A)] * 2)
    assert len(port.queue) == 3
    assert port.counters.drops["queue_full"] == 1
    assert wakeups == [1]


class Broken(Port):
    """A port whose deliver fails: a bug in one port's shell or service."""

    def deliver(self, frames: list[Frame]) -> None:
        raise RuntimeError("a bug in this port")


def test_an_egress_port_that_raises_costs_its_batch_not_the_others(caplog):
    switch, (a, b, c) = three_ports()
    broken = Broken("broken")
    switch.attach(broken)
    for _ in range(3):
        switch.forward(a, [eth(BROADCAST, A), eth(BROADCAST, A)])
    assert len(b.got) == len(c.got) == 6
    assert broken.counters.drops == {"internal_error": 6}
    assert not a.counters.drops
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "broken" in tracebacks[0].getMessage()


def test_a_frame_that_raises_while_switching_is_dropped_as_malformed(caplog):
    class FailingPolicy(PortPolicy):
        """Fails on one frame's flood token: a bug on the policy path."""

        def take_flood_token(self, now: float, cost: float = 1.0) -> bool:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:
                raise RuntimeError("a bug in the policy")
            return True

    switch = Switch()
    sender, receiver = Recorder("s"), Recorder("r")
    sender.policy = FailingPolicy()
    switch.attach(sender)
    switch.attach(receiver)
    switch.forward(sender, [eth(BROADCAST, A), eth(BROADCAST, A), eth(BROADCAST, A)])
    assert len(receiver.got) == 2
    assert sender.counters.drops == {"malformed": 1}
    assert sender.counters.in_frames == 3
    assert len([r for r in caplog.records if r.exc_info]) == 1


def test_frames_longer_than_the_largest_legal_frame_are_dropped():
    switch, (a, b, c) = three_ports()
    switch.forward(a, [eth(BROADCAST, A, bytes(MAX_FRAME_LEN - 14)),
                       eth(BROADCAST, A, bytes(MAX_FRAME_LEN - 13))])
    assert [len(f) for f in b.got] == [MAX_FRAME_LEN]
    assert a.counters.drops == {"oversize": 1}


def test_queued_port_bounds_bytes_as_well_as_frames():
    port = QueuedPort("q", limit=100, limit_bytes=8100)
    big = eth(B, A, bytes(3986))  # 4000 bytes
    port.deliver([big, big, big])
    assert len(port.queue) == 2 and port.queued_bytes == 8000
    assert port.counters.drops["queue_full"] == 1
    port.queue.popleft()  # the shell sends one
    port.deliver([eth(B, A)] * 3 + [big])  # 3 x 60 bytes fit, the big one does not
    assert len(port.queue) == 4 and port.queued_bytes == 4180
    assert port.counters.drops["queue_full"] == 2
    port.queue.clear()  # the shell sends everything
    port.deliver([big, big])
    assert port.queued_bytes == 8000 and port.counters.drops["queue_full"] == 2


def test_queued_port_byte_count_survives_frames_put_back_on_the_left():
    port = QueuedPort("q", limit=100, limit_bytes=1000)
    port.deliver([eth(B, A, bytes(186))] * 4)  # 200 bytes each
    taken = [port.queue.popleft(), port.queue.popleft()]
    port.queue.extendleft(reversed(taken[1:]))  # the device took one, the other goes back
    assert port.queued_bytes == 600
    port.deliver([eth(B, A, bytes(186))] * 3)
    assert len(port.queue) == 5 and port.counters.drops["queue_full"] == 1


def test_a_reserved_mac_never_ages_and_no_port_can_take_it():
    clock = Clock(1000.0)
    switch, (a, b, c) = three_ports(clock)
    guest = Recorder("guest")
    guest.policy = PortPolicy()
    switch.attach(guest)
    switch.reserve(a, A, [bytes([10, 0, 0, 1])])
    clock.now += 10 * switch.aging
    switch.expire(switch.clock())
    switch.forward(guest, [eth(BROADCAST, A)])
    switch.forward(b, [eth(BROADCAST, A)])  # an unpoliced port cannot move it either
    assert guest.counters.drops == {"mac_spoof": 1} and b.counters.drops == {"mac_spoof": 1}
    switch.forward(c, [eth(A, C)])
    assert len(a.got) == 1 and not b.got  # still switched to a, not flooded
    assert switch.used_by_another_port(bytes([10, 0, 0, 1]), C)
    assert switch.status()["macs"][0] == {"mac": "02:00:00:00:00:01", "port": "a", "age": None}


# --- what one sender's GSO frames may cost the switch


def tso(dst: bytes, src: bytes, payload: int, mss: int) -> Frame:
    """A TCP super-frame as a guest hands it over (no NEEDS_CSUM: the checksum is ignored)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    packet = Ether(dst=dst.hex(":"), src=src.hex(":")) / IP(src="10.0.0.1", dst="10.0.0.2") \
        / TCP(sport=1, dport=2, flags="A") / bytes(payload)
    return Frame(bytes(packet), OffloadInfo(0, GSO_TCPV4, 54, mss, 0, 0))


class Service(Recorder):
    service = True


def test_a_tso_frame_with_a_tiny_gso_size_is_dropped_where_it_enters():
    """gso_size 32 would make 2032 segments of a 64 KiB frame for every port without TSO."""
    switch, (a, b, c) = three_ports()
    switch.forward(a, [tso(BROADCAST, A, 65000, 32), tso(BROADCAST, A, 65000, MIN_GSO_SIZE)])
    assert a.counters.drops == {"offload_gso_size": 1}
    assert len(b.got) == len(c.got) == -(-65000 // MIN_GSO_SIZE)  # the second one, cut up
    assert b.counters.software_offloads == c.counters.software_offloads == 1


@pytest.mark.parametrize("policy", [None, PortPolicy()], ids=["trusted", "policed"])
def test_offload_metadata_no_sender_may_set_is_dropped_on_entry(policy):
    """Whatever the port (a session's metadata comes off the wire unchecked), a frame with
    bad offload metadata reaches no port, even one that accepts every offload."""
    switch = Switch()
    sender, taker = Recorder("s"), Recorder("all", ALL_OFFLOADS)
    sender.policy = policy
    switch.attach(sender)
    switch.attach(taker)
    switch.forward(taker, [eth(BROADCAST, B)])
    body = eth(B, A).data
    switch.forward(sender, [Frame(body, OffloadInfo(0xFF, GSO_TCPV4, 65535, 1, 65000, 65000)),
                            Frame(body, OffloadInfo(HDR_F_NEEDS_CSUM, 0, 0, 0, 50, 20)),
                            Frame(body, OffloadInfo(0, 0x42, 0, 1448, 0, 0)),
                            Frame(body, OffloadInfo(HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16))])
    assert [f.offload for f in taker.got] == [(HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16)]
    assert sender.counters.drops == {"offload_flags": 1, "offload_csum_offset": 1,
                                     "offload_gso_type": 1}


def test_unknown_unicast_is_not_flooded_to_a_service_port():
    switch, (a, b, c) = three_ports()
    gateway = Service("gw")
    switch.attach(gateway)
    switch.forward(a, [eth(bytes.fromhex("020000000099"), A), eth(BROADCAST, A),
                       eth(bytes.fromhex("3333000000fb"), A)])
    assert len(b.got) == len(c.got) == 3
    assert [f.data[0] & 1 for f in gateway.got] == [1, 1]


def test_a_service_port_gets_no_gso_frame_to_cut_up():
    """The gateway answers no GSO frame: a broadcast one is not segmented for it."""
    switch, (a, b, c) = three_ports()
    gateway = Service("gw")
    switch.attach(gateway)
    switch.forward(a, [tso(BROADCAST, A, 30000, 1448), eth(BROADCAST, A)])
    assert len(gateway.got) == 1 and gateway.counters.software_offloads == 0
    assert gateway.counters.drops == {"offload_ignored": 1}
    assert len(b.got) == 22


def test_a_service_port_that_accepts_tso_gets_a_tso_frame_whole_but_no_udp_gso():
    """The gateway takes guests' TSO frames as they are (its NAT reads each as one
    segment); a UDP GSO frame it does not accept is still not cut up for it."""
    switch, (a, b, c) = three_ports()
    gateway = Service("gw", Offload.CSUM | Offload.TSO4 | Offload.TSO6)
    switch.attach(gateway)
    udp_gso = Frame(tso(BROADCAST, A, 3000, 1448).data,
                    OffloadInfo(0, GSO_UDP_L4, 42, 1448, 0, 0))
    switch.forward(a, [tso(BROADCAST, A, 30000, 1448), udp_gso])
    assert [f.offload[1] for f in gateway.got] == [GSO_TCPV4]
    assert len(gateway.got[0].data) == len(tso(BROADCAST, A, 30000, 1448).data)
    assert gateway.counters.software_offloads == 0
    assert gateway.counters.drops == {"offload_ignored": 1}


def test_software_segments_of_one_batch_are_bounded_over_all_ports():
    """Each frame makes 10 segments for each of two ports without TSO: a budget of 100
    segments is spent on the first 10 frames for one port; the other 30 cuts are dropped,
    counted on the sender, and the next batch gets a fresh budget."""
    switch = Switch(segment_budget=100)
    a, b, c = Recorder("a"), Recorder("b"), Recorder("c")
    for p in (a, b, c):
        switch.attach(p)
    frames = [tso(BROADCAST, A, 14480, 1448)] * 20
    switch.forward(a, frames)
    assert len(b.got) + len(c.got) == 100
    assert a.counters.drops == {"offload_budget": 30}
    switch.forward(a, frames[:1])
    assert len(b.got) + len(c.got) == 120


def test_the_default_segment_budget_takes_a_full_batch_of_maximal_tso_frames():
    switch, (a, b, c) = three_ports()
    switch.forward(b, [eth(BROADCAST, B)])
    switch.forward(a, [tso(B, A, 65000, 1448)] * 256)  # a full TX batch, MSS 1448
    assert len(b.got) == 256 * 45 and not a.counters.drops
