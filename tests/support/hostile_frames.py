"""A frame fuzzer for the hub's data path: hostile frames from a policed guest port into the
switch, its policy, the gateway (with the real DHCP server), software offloads toward a
port that accepts none, and an L3 host (netstack.host.l3host, what a TUN host runs).

`HostileFrames(rng).frame()` builds one frame: every ethertype the code looks at, VLAN and
QinQ tags, IPv6 extension-header chains, ND/ARP/DHCP option soups, random offload metadata,
then maybe truncated, bit-flipped or made giant.  `fuzz(count, seed, state_dir)` runs
them through a `Segment` and checks, after every frame: nothing raised out of forward() or
deliver() and no unexpected-error traceback was logged by a containment guard; the replies
of the gateway and the L3 host are well-formed; tables and queues stay within their bounds.
Used by tests/test_hostile_frames.py (seconds) and bench/fuzz_frames.py (as long as asked).
`garbled` is the hypothesis strategy of the parsers' own fuzz tests: random bytes, or a good
frame truncated or with bytes overwritten.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from netstack.frame import MAX_FRAME_LEN, PLAIN, Frame, Offload, OffloadInfo
from netstack.gateway.dhcp_config import DhcpConfig
from netstack.gateway.dhcp_server import DhcpServer
from netstack.gateway.port import GatewayConfig, GatewayPort
from netstack.host import neighbour_cache
from netstack.host.l3host import L3Host
from netstack.neighbour import link_local_from_mac
from netstack.policy import PortPolicy
from netstack.port import QueuedPort, SpeakingPort
from netstack.switch import Switch
from netstack.wire.icmpv6 import icmpv6_checksum_ok
from tests.support.clock import Clock
from tests.support.fuzzing import Budget, examples

SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
PREFIX = ipaddress.IPv6Network("fd77::/64")
GATEWAY_MAC = bytes.fromhex("027676000001")
GUEST_MACS = [bytes.fromhex(f"5254000000{i:02x}") for i in (0x0A, 0x0B, 0x0C)]
OTHER_MAC = bytes.fromhex("525400000020")  # guest B's
HOST_MAC = bytes.fromhex("0200000000aa")  # the L3 host's
POOL_FIRST, POOL_LAST = ipaddress.IPv4Address("10.77.0.100"), ipaddress.IPv4Address("10.77.0.131")

IPV4_ADDRESSES = [ipaddress.IPv4Address(a).packed for a in (
    "10.77.0.1", "10.77.0.10", "10.77.0.11", "10.77.0.50", "10.77.0.100", "0.0.0.0",
    "255.255.255.255", "10.77.0.255", "224.0.0.1", "127.0.0.1")]
IPV6_ADDRESSES = [ipaddress.IPv6Address(a).packed for a in (
    "fd77::1", str(link_local_from_mac(GATEWAY_MAC)), "fd77::10", "fe80::a", "::", "ff02::1",
    "ff02::2", "ff02::1:ff00:1", "::1", str(link_local_from_mac(HOST_MAC)), "fd77::50")]
EXTENSION_HEADERS = [0, 43, 44, 60, 51, 50, 59, 135, 139]
ICMPV6_TYPES = [128, 129, 133, 134, 135, 136, 137, 130, 131, 143, 1, 2, 3, 4]
ND_OPTIONS = [1, 2, 3, 5, 14, 25, 31]
DHCP_OPTIONS = [53, 50, 54, 61, 12, 55, 51, 57, 81, 82, 52, 0, 60, 116, 255]
TAGS = [()] * 40 + [(0x8100,)] * 5 + [(0x8100, 0x8100), (0x88A8, 0x8100), (0x9100, 0x8100),
                                      (0x8100, 0x88A8), (0x88A8,)]
GIANT_SIZES = [1515, 9000, 65000, MAX_FRAME_LEN, MAX_FRAME_LEN + 1, 70000]

# The clock moves this much per frame: a guest sending 500 frames a second, within its
# flood token bucket's rate.
FRAME_INTERVAL = 0.002
# What the segment may hold (bounds checked after every frame).
GUEST_POLICY_MACS = 16
TRUSTED_MACS = 2  # the gateway's and the L3 host's


def _ones_sum(data: bytes) -> int:
    """The ones' complement sum of `data`'s 16-bit words, modulo 0xFFFF (0: it checks)."""
    if len(data) & 1:
        data += b"\x00"
    return int.from_bytes(data, "big") % 0xFFFF


def _checksum(data: bytes) -> int:
    return 0xFFFF - _ones_sum(data)


def fuzz_settings(count: int) -> settings:
    """Hypothesis settings for a parser fuzz test: `count` examples in the default run, and
    VHOSTVPN_FUZZ_EXAMPLES of them in `make fuzz`'s long run (with `bounded_given`)."""
    return settings(max_examples=examples(count), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def garbled(draw: st.DrawFn, seeds: st.SearchStrategy[bytes], max_size: int,
            max_mutations: int) -> bytes:
    """Random bytes (up to `max_size`), or a frame drawn from `seeds` truncated anywhere or
    with 1 to `max_mutations` of its bytes overwritten."""
    choice = draw(st.sampled_from(["random", "mutate", "truncate"]))
    seed = draw(seeds)
    if choice == "random":
        return draw(st.binary(max_size=max_size))
    if choice == "truncate":
        return seed[: draw(st.integers(0, len(seed)))]
    buf = bytearray(seed)
    for _ in range(draw(st.integers(1, max_mutations))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    return bytes(buf)


class HostileFrames:
    """Frames a hostile guest behind port `a` might send (seeded: the same rng, the same
    frames)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def frame(self) -> Frame:
        rng = self.rng
        dst = rng.choice([GATEWAY_MAC] * 4 + [b"\xff" * 6] * 4 + [
            b"\x33\x33\x00\x00\x00\x01", b"\x33\x33\x00\x00\x00\x02", b"\x33\x33\xff\x00\x00\x01",
            b"\x01\x00\x5e\x00\x00\x01", OTHER_MAC, HOST_MAC, HOST_MAC, self._bytes(6)])
        src = rng.choice(GUEST_MACS * 6 + [OTHER_MAC, GATEWAY_MAC, HOST_MAC, self._bytes(6)])
        ethertype, payload = rng.choice([
            self._arp, self._arp, self._ipv4, self._ipv4, self._ipv4, self._ipv6, self._ipv6,
            self._ipv6, self._other])(src)
        header = dst + src
        for tag in rng.choice(TAGS):
            header += tag.to_bytes(2, "big") + self._bytes(2)
        data = header + ethertype.to_bytes(2, "big") + payload
        return Frame(self._mutate(data), self._offload(len(data)))

    # -- pieces ---------------------------------------------------------------------------

    def _bytes(self, count: int) -> bytes:
        return self.rng.randbytes(count)

    def _ipv4_address(self, aim: bytes | None = None) -> bytes:
        """Any of the interesting addresses, a random one, or (more often) `aim`."""
        if aim is not None and self.rng.random() < 0.6:
            return aim
        return self.rng.choice([*IPV4_ADDRESSES, self._bytes(4)])

    def _ipv6_address(self, aim: bytes | None = None) -> bytes:
        if aim is not None and self.rng.random() < 0.6:
            return aim
        return self.rng.choice([*IPV6_ADDRESSES, self._bytes(16)])

    def _mutate(self, data: bytes) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.1:
            return data[: rng.randrange(len(data) + 1)]
        if roll < 0.2:
            buffer = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                buffer[rng.randrange(len(buffer))] = rng.randrange(256)
            return bytes(buffer)
        if roll < 0.25:
            return data + self._bytes(rng.randint(1, 64))
        if roll < 0.27:
            size = rng.choice(GIANT_SIZES)
            return data + bytes(max(size - len(data), 0))
        return data

    def _offload(self, size: int) -> tuple:
        rng = self.rng
        if rng.random() < 0.9:
            return PLAIN
        return OffloadInfo(
            rng.choice([0, 1, 2, 3, rng.randrange(256)]),
            rng.choice([0, 1, 3, 4, 5, 0x81, 0x84, rng.randrange(256)]),
            rng.choice([0, 14, 34, 54, 66, rng.randrange(65536)]),
            rng.choice([0, 1, 8, 100, 536, 1448, rng.randrange(65536)]),
            rng.choice([0, 14, 34, 54, size - 2, size, rng.randrange(65536)]),
            rng.choice([6, 16, 0, rng.randrange(65536)]))

    def _arp(self, src: bytes) -> tuple[int, bytes]:
        rng = self.rng
        hardware = rng.choice([1, 1, 1, 6, rng.randrange(65536)])
        protocol = rng.choice([0x0800, 0x0800, 0x86DD])
        lengths = rng.choice([(6, 4), (6, 4), (6, 4), (8, 4), (6, 16), (0, 0)])
        sender = rng.choice([src, src, self._bytes(6), GATEWAY_MAC])
        body = (hardware.to_bytes(2, "big") + protocol.to_bytes(2, "big") + bytes(lengths)
                + rng.choice([1, 1, 2, 3, 8]).to_bytes(2, "big") + sender
                + self._ipv4_address(IPV4_ADDRESSES[1]) + self._bytes(6)
                + self._ipv4_address(rng.choice(IPV4_ADDRESSES[0:4:3])))
        return 0x0806, body

    def _ipv4(self, src: bytes) -> tuple[int, bytes]:
        rng = self.rng
        kind = rng.choice(["icmp", "icmp", "dhcp", "dhcp", "dhcp", "udp", "tcp", "other"])
        if kind == "icmp":
            proto = 1
            message = bytes([rng.choice([8, 8, 0, 3, 13])]) + b"\x00\x00\x00" + self._bytes(
                rng.choice([4, 8, 60, 1400]))
            checksum = _checksum(message)
            l4 = message[:2] + checksum.to_bytes(2, "big") + message[4:]
        elif kind == "dhcp":
            proto = 17
            l4 = self._udp(rng.choice([68, 68, 67]), 67, self._dhcp(src))
        elif kind == "udp":
            proto = 17
            l4 = self._udp(rng.randrange(65536), rng.choice([53, 67, 68, 547]), self._bytes(20))
        elif kind == "tcp":
            proto = 6
            l4 = self._bytes(20) + self._bytes(rng.choice([0, 100]))
        else:
            proto = rng.randrange(256)
            l4 = self._bytes(rng.randrange(40))
        options = self._bytes(4 * rng.choice([0] * 8 + [1, 10]))
        ihl = 5 + len(options) // 4
        total = 4 * ihl + len(l4)
        if rng.random() < 0.1:
            total = rng.randrange(65536)
        flags_offset = rng.choice([0x4000] * 6 + [0, 0x2000, 0x0005, rng.randrange(65536)])
        source = self._ipv4_address(IPV4_ADDRESSES[5] if kind == "dhcp" else IPV4_ADDRESSES[1])
        destination = self._ipv4_address(IPV4_ADDRESSES[6] if kind == "dhcp" else rng.choice(
            IPV4_ADDRESSES[0:4:3]))
        header = (bytes([0x40 | ihl, 0]) + total.to_bytes(2, "big") + self._bytes(2)
                  + flags_offset.to_bytes(2, "big") + bytes([64, proto]) + b"\x00\x00"
                  + source + destination + options)
        checksum = _checksum(header)
        header = header[:10] + checksum.to_bytes(2, "big") + header[12:]
        return 0x0800, header + l4

    def _udp(self, sport: int, dport: int, payload: bytes) -> bytes:
        return (sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
                + (8 + len(payload)).to_bytes(2, "big") + b"\x00\x00" + payload)

    def _dhcp(self, src: bytes) -> bytes:
        rng = self.rng
        chaddr = rng.choice([src, src, self._bytes(6)])
        fixed = (bytes([rng.choice([1] * 9 + [2, 7]), rng.choice([1] * 9 + [6]),
                        rng.choice([6] * 9 + [0, 16, 200]), 0])
                 + self._bytes(4) + bytes(4) + rng.choice([bytes(4), self._ipv4_address()])
                 + bytes(12) + chaddr + bytes(10) + bytes(192))
        cookie = rng.choice([b"\x63\x82\x53\x63"] * 5 + [self._bytes(4)])
        options = b""
        if rng.random() < 0.8:
            options += bytes([53, 1, rng.choice([1, 1, 3, 3, 3, 4, 7, 8])])
        for _ in range(rng.randrange(8)):
            code = rng.choice([*DHCP_OPTIONS, rng.randrange(256)])
            if code in (0, 255):
                options += bytes([code])
                continue
            if code == 53:
                value = bytes([rng.choice([1, 3, 3, 4, 7, 8, 2, 5, 0, 18])])
            elif code in (50, 54):
                value = rng.choice([self._ipv4_address(), b"\x0a\x4d\x00\x01"])
            elif code == 52:
                value = bytes([rng.randrange(4)])
            else:
                value = self._bytes(rng.choice([0, 1, 4, 16, 255]))
            length = len(value) if rng.random() < 0.9 else rng.randrange(256)
            options += bytes([code, length]) + value
        if rng.random() < 0.8:
            options += b"\xff"
        return fixed + cookie + options

    def _ipv6(self, src: bytes) -> tuple[int, bytes]:
        rng = self.rng
        headers = [rng.choice(EXTENSION_HEADERS) for _ in range(rng.choice(
            [0] * 6 + [1, 1, 2, 3, 9]))]
        upper = rng.choice([58, 58, 58, 17, 6, 59])
        kinds = [*headers, upper]
        pieces = []
        for position, header in enumerate(headers):
            following = kinds[position + 1]
            if header == 44:
                offset = rng.choice([0, 0, 1, rng.randrange(8192)])
                pieces.append(bytes([following, 0]) + ((offset << 3) | rng.choice([0, 1])
                                                       ).to_bytes(2, "big") + self._bytes(4))
            elif header == 51:
                units = rng.choice([1, 1, 0, 4])
                pieces.append(bytes([following, units, 0, 0]) + self._bytes(4 * units + 4))
            elif header == 50:
                pieces.append(self._bytes(rng.choice([8, 16])))
            else:
                units = rng.choice([0, 0, 1, 30])
                pieces.append(bytes([following, units]) + bytes(6 + 8 * units))
        chain = b"".join(pieces)
        source = self._ipv6_address(rng.choice(IPV6_ADDRESSES[2:5]))
        destination = self._ipv6_address(rng.choice(IPV6_ADDRESSES[0:2] + IPV6_ADDRESSES[5:8]))
        if upper == 58:
            body = self._icmpv6(src)
        elif upper == 17:
            body = self._udp(rng.choice([546, 547, 5353]), rng.choice([547, 546, 53]),
                             self._bytes(16))
        else:
            body = self._bytes(rng.choice([0, 20, 40]))
        if upper == 58 and body:
            message = body[:2] + b"\x00\x00" + body[4:]
            pseudo = (source + destination + len(message).to_bytes(4, "big") + bytes(3)
                      + b"\x3a")
            checksum = _checksum(pseudo + message) if rng.random() < 0.9 else rng.randrange(
                65536)
            body = message[:2] + checksum.to_bytes(2, "big") + message[4:]
        payload = chain + body
        length = len(payload) if rng.random() < 0.9 else rng.choice([0, rng.randrange(65536)])
        first = kinds[0]
        hop_limit = rng.choice([255, 255, 255, 64, 1])
        header = (b"\x60\x00\x00\x00" + length.to_bytes(2, "big") + bytes([first, hop_limit])
                  + source + destination)
        return 0x86DD, header + payload

    def _icmpv6(self, src: bytes) -> bytes:
        rng = self.rng
        kind = rng.choice([*ICMPV6_TYPES, rng.randrange(256)])
        code = 0 if rng.random() < 0.9 else rng.randrange(256)
        if kind in (135, 136, 137):
            body = bytes([rng.choice([0, 0x20, 0x60, 0xE0]), 0, 0, 0]) + self._ipv6_address(
                rng.choice([IPV6_ADDRESSES[0], IPV6_ADDRESSES[9], IPV6_ADDRESSES[2]]))
            if kind == 137:
                body += self._ipv6_address()
        elif kind == 134:
            body = bytes([64, rng.choice([0, 0xC0])]) + self._bytes(10)
        elif kind == 133:
            body = bytes(4)
        elif kind in (128, 129):
            body = self._bytes(rng.choice([4, 8, 56, 1400]))
        else:
            body = self._bytes(rng.choice([0, 4, 20]))
        if kind in (133, 134, 135, 136, 137):
            body += self._nd_options(src)
        return bytes([kind, code, 0, 0]) + body

    def _nd_options(self, src: bytes) -> bytes:
        rng = self.rng
        options = b""
        for _ in range(rng.choice([0, 1, 1, 1, 2, 4, 20])):
            code = rng.choice([*ND_OPTIONS, rng.randrange(256)])
            if code in (1, 2):
                value = rng.choice([src, src, self._bytes(6), b"\x01\x00\x5e\x00\x00\x01",
                                    bytes(6)])
            elif code == 3:
                value = (bytes([rng.choice([64, 64, 48, 200]), rng.choice([0xC0, 0x80, 0x40, 0])])
                         + self._bytes(8) + bytes(4) + rng.choice([
                             PREFIX.network_address.packed, self._bytes(16),
                             b"\xfe\x80" + bytes(14)]))
            elif code == 5:
                value = bytes(2) + self._bytes(4)
            elif code == 25:
                value = bytes(2) + self._bytes(4) + self._ipv6_address() * rng.choice([1, 2])
            else:
                value = self._bytes(rng.choice([6, 14, 0]))
            units = (len(value) + 2 + 7) // 8
            value = value.ljust(units * 8 - 2, b"\x00")
            if rng.random() < 0.1:
                units = rng.choice([0, units + 1, 255])
            options += bytes([code, units]) + value
        return options

    def _other(self, src: bytes) -> tuple[int, bytes]:
        rng = self.rng
        ethertype = rng.choice([0x8100, 0x88A8, 0x9100, 0x8035, 0x88CC, 0x8847, 0x0842, 0x05DC,
                                rng.randrange(65536)])
        return ethertype, self._bytes(rng.choice([0, 10, 46, 200]))


class HostPort(SpeakingPort):
    """netstack.host.l3host.L3Host on the switch, as the TUN port runs it (minus the device)."""

    def __init__(self, host: L3Host) -> None:
        super().__init__("l3host", Offload.NONE)
        self.host = host

    def deliver(self, frames: list[Frame]) -> None:
        for frame in frames:
            _, replies = self.host.from_segment(frame)
            self._send(replies)


class Segment:
    """A hub's segment as tunnel/hub.py assembles it: two policed guest ports, a port that
    accepts no offloads, the gateway with the DHCP server, and an L3 host."""

    def __init__(self, state_dir: Path) -> None:
        self.clock = clock = Clock(1000.0)
        self.switch = switch = Switch(clock=clock)
        self.a = QueuedPort("a", policy=PortPolicy(), limit=256, limit_bytes=1 << 20)
        self.b = QueuedPort("b", policy=PortPolicy(), limit=256, limit_bytes=1 << 20)
        self.plain = QueuedPort("plain", Offload.NONE, limit=256, limit_bytes=1 << 20)
        self.dhcp = DhcpServer(DhcpConfig(
            subnet=SUBNET, gateway=ipaddress.IPv4Address("10.77.0.1"), server_mac=GATEWAY_MAC,
            pool=(POOL_FIRST, POOL_LAST), state_path=state_dir / "leases.json"),
            clock=lambda: clock.now + 1.7e9)
        self.gateway = GatewayPort(GatewayConfig(
            mac=GATEWAY_MAC, ipv4=ipaddress.IPv4Interface("10.77.0.1/24"), ipv6_prefix=PREFIX),
            dhcp=self.dhcp, clock=clock)
        self.dhcp.on_lease = lambda lease: switch.bind_lease(lease.ip.packed, lease.mac)
        self.dhcp.on_release = lambda lease: switch.unbind_lease(lease.ip.packed)
        self.dhcp.in_use = lambda ip, mac: switch.used_by_another_port(ip.packed, mac)
        self.host = L3Host(HOST_MAC, ipv4=ipaddress.IPv4Interface("10.77.0.50/24"),
                                  gateway4=ipaddress.IPv4Address("10.77.0.1"), clock=clock)
        self.host_port = HostPort(self.host)
        for port in (self.a, self.b, self.plain, self.gateway, self.host_port):
            switch.attach(port)
        switch.reserve(self.gateway, GATEWAY_MAC, self.gateway.addresses)
        self.queued = [self.a, self.b, self.plain]

    def speakers(self) -> list[tuple[SpeakingPort, bytes]]:
        return [(self.gateway, GATEWAY_MAC), (self.host_port, HOST_MAC)]


@dataclass
class Report:
    cases: int = 0
    findings: dict[str, str] = field(default_factory=dict)  # what -> the first frame (hex)
    drops: dict[str, int] = field(default_factory=dict)  # every drop reason seen, summed

    def add(self, what: str, frame: Frame | None) -> None:
        self.findings.setdefault(what, frame.data.hex() if frame is not None else "")


class _Errors(logging.Handler):
    """Collects what the containment guards log (unexpected exceptions) while fuzzing."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _where(exc_info) -> str:
    """An exception as 'Type: message at file:line' (its innermost frame)."""
    kind, value, tb = exc_info
    last = traceback.extract_tb(tb)[-1]
    return f"{kind.__name__}: {value} at {Path(last.filename).name}:{last.lineno}"


def fuzz(count: int, seed: int, state_dir: Path, budget: Budget | None = None) -> Report:
    """Send `count` hostile frames from guest port `a` (fewer if `budget` is spent first);
    what went wrong is in `findings`."""
    rng = random.Random(seed)
    frames = HostileFrames(rng)
    segment = Segment(state_dir)
    report = Report()
    errors = _Errors()
    logger = logging.getLogger("netstack")  # what the guards log comes here, and only here
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    logger.addHandler(errors)
    try:
        for case in range(count):
            if budget is not None and budget.spent():
                break
            frame = frames.frame()
            segment.clock.now += FRAME_INTERVAL
            _one(segment, frame, rng, report, errors)
            report.cases = case + 1
            if case % 50 == 49:
                _check_tables(segment, report, frame)
    finally:
        logger.removeHandler(errors)
        logger.setLevel(level)
        logger.propagate = propagate
    totals: dict[str, int] = {}
    for port in segment.switch.ports:
        for reason, count in port.counters.drops.items():
            totals[reason] = totals.get(reason, 0) + count
    report.drops = totals
    return report


def _one(segment: Segment, frame: Frame, rng: random.Random, report: Report,
         errors: _Errors) -> None:
    switch = segment.switch
    try:
        switch.forward(segment.a, [frame])
        for speaker, mac in segment.speakers():
            replies = speaker.take_outbox()
            for reply in replies:
                problem = _malformed_reply(reply, mac)
                if problem:
                    report.add(f"{speaker.name} reply: {problem}", frame)
            if replies:
                switch.forward(speaker, replies)
        if rng.random() < 0.02:
            segment.clock.now += rng.choice([1.0, 30.0, 400.0])
            switch.expire(switch.clock())
            segment.gateway.tick(segment.clock.now)
            segment.host_port._send(segment.host.tick(segment.host.clock()))
        for port in segment.queued:  # the shells drain their queues now and then
            if rng.random() < 0.3:
                for _ in range(rng.randrange(len(port.queue) + 1)):
                    port.queue.popleft()
    except Exception:  # that is what the fuzzer looks for
        report.add(f"raised {_where(sys.exc_info())}", frame)
    for record in errors.records:
        if record.exc_info:
            report.add(f"logged {_where(record.exc_info)}", frame)
        else:
            report.add(f"logged {record.getMessage()}", frame)
    errors.records.clear()
    for port in switch.ports:  # every unexpected exception gets its traceback
        port.tracebacks.next_at = 0.0
    segment.host.tracebacks.next_at = 0.0


def _check_tables(segment: Segment, report: Report, frame: Frame) -> None:
    switch = segment.switch
    policed = [segment.a, segment.b]
    if len(switch.mac_table) > GUEST_POLICY_MACS * len(policed) + TRUSTED_MACS:
        report.add(f"mac table holds {len(switch.mac_table)}", frame)
    book = switch.addresses
    for port in policed:
        held = sum(1 for owner, _, _ in book.owners.values() if owner is port)
        if held != book.counts.get(port, 0) or held > port.policy.claim_limit:
            report.add(f"port {port.name} holds {held} addresses, counted "
                       f"{book.counts.get(port, 0)}", frame)
    if sum(book.counts.values()) != len(book.owners):
        report.add("address counts do not add up", frame)
    for port in segment.queued:
        exact = sum(len(f.data) for f in port.queue)
        if port.queued_bytes != exact or exact > port.limit_bytes or len(port.queue) > port.limit:
            report.add(f"port {port.name} queue: {len(port.queue)} frames, {exact} bytes, "
                       f"counted {port.queued_bytes}", frame)
    host = segment.host
    cache = host.neighbours
    if len(cache.entries) > neighbour_cache.MAX_NEIGHBOURS \
            or cache.queued > neighbour_cache.MAX_QUEUED \
            or len(cache.pending) > neighbour_cache.MAX_PENDING:
        report.add("L3 host tables beyond their bounds", frame)
    pool = int(POOL_LAST) - int(POOL_FIRST) + 1
    if len(segment.dhcp.leases) > pool:
        report.add(f"DHCP holds {len(segment.dhcp.leases)} leases for {pool} addresses", frame)


def _malformed_reply(frame: Frame, mac: bytes) -> str | None:
    """What is wrong with a reply the hub's own services built, if anything."""
    data = bytes(frame.data)
    if not 14 <= len(data) <= MAX_FRAME_LEN:
        return f"{len(data)} bytes"
    if data[6:12] != mac:
        return f"source MAC {data[6:12].hex()}"
    ethertype = data[12:14]
    if ethertype == b"\x08\x06":
        if len(data) < 42 or data[14:20] != b"\x00\x01\x08\x00\x06\x04":
            return "ARP header"
    elif ethertype == b"\x08\x00":
        ihl = (data[14] & 0x0F) * 4
        total = int.from_bytes(data[16:18], "big")
        if data[14] >> 4 != 4 or ihl < 20 or not ihl <= total <= len(data) - 14:
            return "IPv4 header"
        if _ones_sum(data[14 : 14 + ihl]) != 0:
            return "IPv4 header checksum"
        if data[23] == 1 and _ones_sum(data[14 + ihl : 14 + total]) != 0:
            return "ICMP checksum"
    elif ethertype == b"\x86\xdd":
        length = int.from_bytes(data[18:20], "big")
        if data[14] >> 4 != 6 or 54 + length != len(data):
            return "IPv6 header"
        if data[20] == 58 and not icmpv6_checksum_ok(data[22:38], data[38:54], data[54:]):
            return "ICMPv6 checksum"
    else:
        return f"ethertype {ethertype.hex()}"
    return None
