"""The learning switch: learning, flooding, aging, offload filtering, per-port counters."""

from netstack.frame import GSO_TCPV4, HDR_F_NEEDS_CSUM, Frame, Offload, OffloadInfo
from netstack.port import Port, QueuedPort
from netstack.switch import Switch

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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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
    clock = Clock()
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
    assert len(c.got) == 2 and c.got[-1].src_mac == A


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
    frame = Frame(eth(BROADCAST, A).data, OffloadInfo(gso_type=0x42))
    assert frame.required_offloads & ~(Offload.CSUM | Offload.TSO4 | Offload.TSO6)


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
