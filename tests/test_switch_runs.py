"""Switch.forward's runs (frames repeating the addresses of the frame just switched skip the
MAC steps): a batch gives the same deliveries, drops, counters, tables and token buckets as
the same frames forwarded one by one, which never take the run."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netstack.frame import Frame
from netstack.policy import PortPolicy
from netstack.port import Port
from netstack.switch import Switch
from tests.support.clock import Clock

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
C = bytes.fromhex("020000000003")
D = bytes.fromhex("020000000004")
G = bytes.fromhex("020000000099")  # the service port's reserved MAC
BROADCAST = b"\xff" * 6
MULTICAST = bytes.fromhex("01005e000001")
T0 = 1000.0


class Recorder(Port):
    def __init__(self, name: str, policy: PortPolicy | None = None) -> None:
        super().__init__(name, policy=policy)
        self.got: list[Frame] = []

    def deliver(self, frames: list[Frame]) -> None:
        self.got.extend(frames)


class Service(Recorder):
    service = True


def ipv4(src_ip: int, sport: int = 4000, proto: int = 17, size: int = 64) -> bytes:
    header = bytes([0x45, 0]) + (size - 14).to_bytes(2, "big") + bytes(
        [0, 0, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, src_ip, 10, 0, 0, 2])
    udp = sport.to_bytes(2, "big") + (5000).to_bytes(2, "big") + (size - 34).to_bytes(
        2, "big") + b"\0\0"
    return b"\x08\x00" + header + udp + bytes(size - 42)


def arp(sender_ip: int, sender_mac: bytes) -> bytes:
    return (b"\x08\x06" + bytes.fromhex("0001080006040002") + sender_mac
            + bytes([10, 0, 0, sender_ip]) + bytes(6) + bytes([10, 0, 0, 2]) + bytes(18))


PAYLOADS = [
    lambda src: ipv4(1),
    lambda src: ipv4(2),
    lambda src: ipv4(3, size=1500),
    lambda src: ipv4(1, sport=67),  # from a DHCP server's port: never the L3 fast path
    lambda src: arp(1, src),
    lambda src: arp(3, src),
    lambda src: b"\x88\xb5" + bytes(46),
    lambda src: b"\x00\x40" + bytes(46),  # 802.3 length: llc
]


def world(clock: Clock) -> tuple[Switch, dict[str, Recorder]]:
    switch = Switch(clock=clock)
    ports = {
        "a": Recorder("a", PortPolicy(mac_limit=2, flood_rate=1.0, flood_burst=3.0,
                                      service_rate=1.0, service_burst=2.0, claim_limit=2)),
        "b": Recorder("b", PortPolicy()),
        "c": Recorder("c"),
        "g": Service("g"),
    }
    for port in ports.values():
        switch.attach(port)
    switch.reserve(ports["g"], G, [bytes([10, 0, 0, 254])])
    return switch, ports


def state(switch: Switch, ports: dict[str, Recorder], index: dict[int, int]) -> dict:
    return {
        "got": {name: sorted(index[id(frame)] for frame in port.got)
                for name, port in ports.items()},
        "counters": {name: port.counters.as_dict() for name, port in ports.items()},
        "macs": {mac: (port.name, seen) for mac, (port, seen) in switch.mac_table.items()},
        "mac_counts": {port.name: n for port, n in switch.mac_counts.items()},
        "owners": {ip: (port.name, seen, leased)
                   for ip, (port, seen, leased) in switch.addresses.owners.items()},
        "claims": {port.name: n for port, n in switch.addresses.counts.items()},
        "buckets": {name: (port.policy.flood.tokens, port.policy.service.tokens)
                    for name, port in ports.items() if port.policy is not None},
    }


# Few addresses, so that sources move and runs break; a run of frames with the same
# addresses carries different payloads (each its own network-layer checks).
frame_specs = st.lists(
    st.tuples(
        st.sampled_from([A, B, C, G, BROADCAST, MULTICAST]),  # destination
        st.sampled_from([A, B, C, G, MULTICAST]),  # source
        st.lists(st.integers(0, len(PAYLOADS) - 1), min_size=1, max_size=5),
    ),
    min_size=1, max_size=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([A, B, C, D]),
                              st.integers(0, len(PAYLOADS) - 1)), max_size=5),
    later=st.sampled_from([0.0, 0.5, 2.0, 400.0]),
    ingress=st.sampled_from("abcg"),
    specs=frame_specs,
    runt_at=st.none() | st.integers(0, 40),
)
def test_a_batch_gives_the_same_deliveries_drops_and_tables_as_its_frames_one_by_one(
        before, later, ingress, specs, runt_at):
    frames = []
    for dst, src, payloads in specs:
        frames += [Frame(dst + src + PAYLOADS[payload](src)) for payload in payloads]
    if runt_at is not None and runt_at < len(frames):
        frames.insert(runt_at, Frame(frames[runt_at].data[:12]))
    index = {id(frame): at for at, frame in enumerate(frames)}
    results = []
    for one_by_one in (False, True):
        clock = Clock(T0)
        switch, ports = world(clock)
        for name, src, payload in before:  # learn and claim something first
            switch.forward(ports[name], [Frame(BROADCAST + src + PAYLOADS[payload](src))])
        for port in ports.values():
            port.got.clear()
        clock.now = T0 + later
        if one_by_one:
            for frame in frames:
                switch.forward(ports[ingress], [frame])
        else:
            switch.forward(ports[ingress], frames)
        results.append(state(switch, ports, index))
    assert results[0] == results[1]


def test_a_run_ends_when_a_frame_between_moves_its_destination():
    switch, ports = world(Clock(T0))
    a, c = ports["a"], ports["c"]
    switch.forward(ports["b"], [Frame(A + B + ipv4(2))])  # B is on port b
    switch.forward(c, [Frame(B + C + ipv4(3)), Frame(B + C + ipv4(3)),
                       Frame(BROADCAST + B + ipv4(2)),  # B now sends from port c
                       Frame(B + C + ipv4(3))])
    assert len(ports["b"].got) == 2 + 1  # the first frame to A flooded there too
    assert c.counters.drops["same_port"] == 1
    assert not a.counters.drops


def test_frames_of_a_run_each_pass_the_network_layer_checks():
    switch, ports = world(Clock(T0))
    a = ports["a"]
    switch.forward(ports["b"], [Frame(A + B + ipv4(2))])
    # Port a holds at most 2 addresses: the third source IP in a run of equal MACs is refused.
    switch.forward(a, [Frame(B + A + ipv4(1)), Frame(B + A + ipv4(3)),
                       Frame(B + A + ipv4(4)), Frame(B + A + ipv4(1))])
    assert len(ports["b"].got) == 3
    assert a.counters.drops["claim_limit"] == 1
