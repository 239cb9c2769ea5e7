"""TUN/TAP devices with virtio-net headers (tunnel.host.tuntap) and host network configuration
(tunnel.host.hostnet), against the real kernel inside network namespaces the tests create.

The TAP device is opened by the test process and moved into a fresh namespace (its fd stays
valid across the move); inside, the kernel gets 10.99.0.1/24 on it and the test plays the
host at 10.99.0.2 through the fd, building frames with scapy.  Every namespace is deleted
(taking its links along) and every device closed, even when a test fails.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from netstack.frame import (
    GSO_NONE,
    GSO_TCPV4,
    HDR_F_NEEDS_CSUM,
    Frame,
    Offload,
    OffloadInfo,
)
from netstack.port import QueuedPort
from netstack.switch import Switch
from tunnel.host.hostnet import HostNetwork, HostNetworkError
from tunnel.host.tunport import TunPort
from tunnel.host.tuntap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_USO4,
    TUN_F_USO6,
    WANTED_OFFLOADS,
    TapPort,
    TunTapDevice,
    run_device,
    tun_offload_flags,
)

scapy_all = pytest.importorskip("scapy.all")
ARP, ICMP, IP, TCP, Ether, Raw = (
    scapy_all.ARP,
    scapy_all.ICMP,
    scapy_all.IP,
    scapy_all.TCP,
    scapy_all.Ether,
    scapy_all.Raw,
)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root, /dev/net/tun and network namespaces",
)

KERNEL_IP = "10.99.0.1"
PEER_IP = "10.99.0.2"  # the test, answering through the TAP fd
PEER_MAC = "02:00:00:99:00:02"
MTU = 1500
TIMEOUT = 10.0

_names = itertools.count()


# -- sans-I/O pieces ------------------------------------------------------------------------


def test_offload_flags_follow_if_tun_h() -> None:
    assert tun_offload_flags(WANTED_OFFLOADS) == (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6
    )
    assert tun_offload_flags(Offload.NONE) == 0


# -- fixtures -------------------------------------------------------------------------------


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vvtest{os.getpid()}-{next(_names)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _tap_in(netns: str, offloads: Offload) -> tuple[TunTapDevice, HostNetwork]:
    device = TunTapDevice.open("vvtap%d", "tap", offloads)
    try:
        _ip("link", "set", device.name, "netns", netns)
        net = HostNetwork(netns)
        net.set_up(device.name, MTU)
        net.add_address(device.name, ipaddress.ip_interface(f"{KERNEL_IP}/24"))
    except BaseException:
        device.close()
        raise
    return device, net


@pytest.fixture
def tap(netns: str) -> Iterator[TunTapDevice]:
    """A TAP with every offload the kernel takes, inside `netns` as 10.99.0.1/24."""
    device, net = _tap_in(netns, WANTED_OFFLOADS)
    try:
        yield device
    finally:
        net.undo()
        device.close()


@pytest.fixture
def plain_tap(netns: str) -> Iterator[TunTapDevice]:
    """The same TAP with offloads off: the kernel sends only MTU-sized, checksummed frames."""
    device, net = _tap_in(netns, Offload.NONE)
    try:
        yield device
    finally:
        net.undo()
        device.close()


async def _in_netns(netns: str, script: str, *args: str) -> str:
    """Run a Python script inside the namespace; its stdout."""
    result = await trio.run_process(
        ["ip", "netns", "exec", netns, sys.executable, "-c", script, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


# -- the peer the test plays ----------------------------------------------------------------


def _answer(frame: Frame) -> list[Frame]:
    """What 10.99.0.2 says to a frame from the kernel: ARP replies and ICMP echo replies."""
    packet = Ether(bytes(frame.data))
    if ARP in packet and packet[ARP].op == 1 and packet[ARP].pdst == PEER_IP:
        reply = Ether(dst=packet.src, src=PEER_MAC) / ARP(
            op=2, hwsrc=PEER_MAC, psrc=PEER_IP, hwdst=packet.src, pdst=packet[ARP].psrc
        )
        return [Frame(bytes(reply))]
    if ICMP in packet and packet[ICMP].type == 8 and packet[IP].dst == PEER_IP:
        reply = (
            Ether(dst=packet.src, src=PEER_MAC)
            / IP(src=PEER_IP, dst=packet[IP].src)
            / ICMP(type=0, id=packet[ICMP].id, seq=packet[ICMP].seq)
            / Raw(bytes(packet[ICMP].payload))
        )
        return [Frame(bytes(reply))]
    return []


PING = """
import socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
body = struct.pack("!HH", 0x4242, 1) + b"vhostvpn ping"
packet = struct.pack("!BBH", 8, 0, 0) + body
packet = packet[:2] + struct.pack("!H", csum(packet + b"\\0")) + packet[4:]
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(1.0)
deadline = time.monotonic() + 8
while time.monotonic() < deadline:
    sock.sendto(packet, (sys.argv[1], 0))
    try:
        while True:
            reply, (src, _) = sock.recvfrom(2048)
            if src == sys.argv[1] and reply[20] == 0 and reply[24:26] == b"\\x42\\x42":
                print("reply from", src)
                sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
"""


# -- the device -----------------------------------------------------------------------------


@needs_root
def test_kernel_accepts_checksum_and_segmentation_offloads(netns: str, tap: TunTapDevice) -> None:
    # Linux >= 6.2 takes USO too; older kernels step down without it.
    assert tap.offloads & (Offload.CSUM | Offload.TSO4 | Offload.TSO6 | Offload.ECN) == (
        Offload.CSUM | Offload.TSO4 | Offload.TSO6 | Offload.ECN
    )
    features = subprocess.run(
        ["ip", "netns", "exec", netns, "ethtool", "-k", tap.name],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if features:
        assert "tcp-segmentation-offload: on" in features


@needs_root
async def test_ping_from_the_namespace_is_answered_through_the_moved_tap_fd(
    netns: str, tap: TunTapDevice
) -> None:
    """The fd keeps working after its netdev moved to another namespace, and run_device
    carries ARP and ICMP both ways through a TapPort."""
    port = TapPort("tap", tap)
    seen: list[Frame] = []

    def forward(ingress: QueuedPort, frames: list[Frame]) -> None:
        seen.extend(frames)
        replies = [reply for frame in frames for reply in _answer(frame)]
        if replies:
            ingress.deliver(replies)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_device, tap, port, forward)
            output = await _in_netns(netns, PING, PEER_IP)
            nursery.cancel_scope.cancel()
    assert output.startswith(f"reply from {PEER_IP}")
    assert port.counters.out_frames >= 2  # an ARP reply and an echo reply (written at once)
    assert port.write_at_once is None  # the writer gone: what comes is only queued
    assert tap.counters.read_frames == len(seen) >= 2
    assert not tap.counters.errors


TCP_CLIENT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], 5000), timeout=5)
sock.sendall(b"s" * int(sys.argv[2]))
print("sent")
"""


async def _receive_tcp_stream(device: TunTapDevice, netns: str, total: int) -> list[Frame]:
    """Play a TCP server at 10.99.0.2:5000 through the TAP (handshake and ACKs with scapy)
    while a client in the namespace sends `total` bytes; the data frames the kernel sent."""
    data_frames: list[Frame] = []
    got = 0

    async def serve() -> None:
        nonlocal got
        while got < total:
            await device.wait_readable()
            replies: list[Frame] = []
            for frame in device.read_batch():
                replies += _answer(frame)
                packet = Ether(bytes(frame.data))
                if TCP not in packet or packet[IP].dst != PEER_IP:
                    continue
                segment = packet[TCP]
                reply_ip = Ether(dst=packet.src, src=PEER_MAC) / IP(src=PEER_IP, dst=KERNEL_IP)
                ports = {"sport": 5000, "dport": segment.sport}
                if segment.flags.S:
                    synack = TCP(
                        **ports,
                        flags="SA",
                        seq=1000,
                        ack=segment.seq + 1,
                        window=65535,
                        options=[("MSS", 1460), ("WScale", 7)],
                    )
                    replies.append(Frame(bytes(reply_ip / synack)))
                    continue
                payload = len(packet[IP]) - packet[IP].ihl * 4 - segment.dataofs * 4
                if payload:
                    data_frames.append(frame)
                    got += payload
                    ack = TCP(**ports, flags="A", seq=1001, ack=segment.seq + payload, window=4096)
                    replies.append(Frame(bytes(reply_ip / ack)))
            device.write_batch(replies)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await _in_netns(netns, TCP_CLIENT, PEER_IP, str(total))
    return data_frames


@needs_root
async def test_kernel_sends_tso_super_frames_when_offloads_are_on(
    netns: str, tap: TunTapDevice
) -> None:
    frames = await _receive_tcp_stream(tap, netns, 256 * 1024)
    big = [frame for frame in frames if len(frame) > MTU + 14]
    assert big, f"no frame above the MTU among {len(frames)}: {frames[:5]}"
    for frame in big:
        offload = OffloadInfo(*frame.offload)
        assert offload.gso_type == GSO_TCPV4
        assert offload.flags & HDR_F_NEEDS_CSUM
        assert offload.gso_size == 1460
        assert (offload.csum_start, offload.csum_offset) == (34, 16)


@needs_root
async def test_kernel_sends_mtu_frames_with_full_checksums_when_offloads_are_off(
    netns: str, plain_tap: TunTapDevice
) -> None:
    assert plain_tap.offloads == Offload.NONE
    frames = await _receive_tcp_stream(plain_tap, netns, 64 * 1024)
    assert frames
    assert all(len(frame) <= MTU + 14 for frame in frames)
    assert all(frame.offload[1] == GSO_NONE for frame in frames)
    for frame in frames[:20]:
        packet = Ether(bytes(frame.data))
        checksum = packet[TCP].chksum
        del packet[TCP].chksum
        assert Ether(bytes(packet))[TCP].chksum == checksum


TCP_SERVER = """
import hashlib, socket, sys
server = socket.socket()
server.bind(("0.0.0.0", 5001))
server.listen(1)
print("listening", flush=True)
server.settimeout(8)
conn, _ = server.accept()
conn.settimeout(8)
want, data = int(sys.argv[1]), b""
while len(data) < want:
    chunk = conn.recv(65536)
    if not chunk:
        break
    data += chunk
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def _pseudo_header_sum(src: str, dst: str, proto: int, length: int) -> int:
    """The folded (not complemented) pseudo-header sum a partial checksum field holds."""
    words = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    total = sum(int.from_bytes(words[i : i + 2], "big") for i in range(0, 8, 2))
    total += proto + length
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@needs_root
async def test_written_tso_super_frame_with_partial_checksum_reaches_a_socket(
    netns: str, tap: TunTapDevice
) -> None:
    """One 20000-byte TCP segment written with NEEDS_CSUM and TSO4 metadata: the kernel
    takes it in one write and the server in the namespace receives every byte."""
    import hashlib

    payload = bytes(range(256)) * 78 + b"end!"  # 19972 bytes
    client_seq = 5000

    async with trio.open_nursery() as nursery:
        server = await nursery.start(_run_server, netns, len(payload))
        with trio.fail_after(TIMEOUT):
            # TCP drops segments not addressed to the host's own MAC.
            eth = Ether(dst=_link(netns, tap.name)["address"], src=PEER_MAC)
            syn = IP(src=PEER_IP, dst=KERNEL_IP) / TCP(
                sport=40000, dport=5001, flags="S", seq=client_seq - 1, window=65535
            )
            tap.write_batch([Frame(bytes(eth / syn))])
            server_seq = None
            while server_seq is None:
                await tap.wait_readable()
                for frame in tap.read_batch():
                    tap.write_batch(_answer(frame))
                    packet = Ether(bytes(frame.data))
                    if TCP in packet and packet[TCP].flags.S and packet[TCP].flags.A:
                        server_seq = packet[TCP].seq + 1
            ack = IP(src=PEER_IP, dst=KERNEL_IP) / TCP(
                sport=40000, dport=5001, flags="A", seq=client_seq, ack=server_seq, window=65535
            )
            tap.write_batch([Frame(bytes(eth / ack))])

            segment = IP(src=PEER_IP, dst=KERNEL_IP, id=1) / TCP(
                sport=40000, dport=5001, flags="PA", seq=client_seq, ack=server_seq, window=65535
            )
            wire = bytearray(bytes(eth / segment / Raw(payload)))  # IP checksum complete
            tcp_length = len(wire) - 34
            wire[50:52] = _pseudo_header_sum(PEER_IP, KERNEL_IP, 6, tcp_length).to_bytes(2, "big")
            offload = OffloadInfo(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)
            assert tap.write_batch([Frame(bytes(wire), offload)]) == 1
            assert not tap.counters.errors
            while True:  # keep answering ARP until the server has everything
                line = await server.receive_line()
                if line is not None:
                    break
                with trio.move_on_after(0.05):
                    await tap.wait_readable()
                for frame in tap.read_batch():
                    tap.write_batch(_answer(frame))
        nursery.cancel_scope.cancel()
    size, digest = line.split()
    assert int(size) == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()


class _Server:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""

    async def receive_line(self) -> str | None:
        """The next line of output, or None if none arrived within a moment."""
        assert self.process.stdout is not None
        while b"\n" not in self.buffer:
            with trio.move_on_after(0.05):
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise AssertionError("the server in the namespace exited early")
                self.buffer += chunk
                continue
            return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


async def _run_server(netns: str, size: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
    command = ["ip", "netns", "exec", netns, sys.executable, "-c", TCP_SERVER, str(size)]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        server = _Server(process)
        with trio.fail_after(TIMEOUT):
            while await server.receive_line() != "listening":
                pass
        task_status.started(server)
        await trio.sleep_forever()
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


@needs_root
def test_malformed_writes_are_counted_and_dropped_not_raised(tap: TunTapDevice) -> None:
    good = Ether(dst="ff:ff:ff:ff:ff:ff", src=PEER_MAC) / ARP(psrc=PEER_IP, pdst=KERNEL_IP)
    frames = [
        Frame(b"\x01\x02\x03"),  # shorter than an Ethernet header
        Frame(bytes(good), OffloadInfo(0, 2, 0, 0, 0, 0)),  # no such GSO type
        Frame(bytes(good), OffloadInfo(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 200, 16)),  # past the end
        Frame(bytes(good)),
    ]
    assert tap.write_batch(frames) == 4
    assert tap.counters.errors["EINVAL"] == 3
    assert tap.counters.written_frames == 1


@needs_root
def test_read_batch_returns_nothing_when_the_device_is_idle(tap: TunTapDevice) -> None:
    while tap.read_batch():  # whatever the kernel said when the link came up
        pass
    assert tap.read_batch() == []


@needs_root
def test_read_batch_takes_a_burst_whole_and_a_lone_packet_alone(netns: str,
                                                                 tap: TunTapDevice) -> None:
    """After the first packet, read_batch asks the device (poll) whether more wait instead
    of reading until EAGAIN: a burst still comes in one batch, a lone packet alone."""
    _ip("-n", netns, "neigh", "replace", PEER_IP, "lladdr", PEER_MAC, "dev", tap.name,
        "nud", "permanent")
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw",  # no IPv6 chatter
                    f"net.ipv6.conf.{tap.name}.disable_ipv6=1"], check=True)
    while tap.read_batch():  # whatever the kernel said when the link came up
        pass
    send = ("import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(int(sys.argv[1])): s.sendto(bytes([i]) * 20, (sys.argv[2], 9))\n")
    for count in (5, 1):
        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", send, str(count),
                        PEER_IP], check=True)
        batch = tap.read_batch()
        # IPv4 (no options), UDP, to port 9
        assert [(f.data[23], bytes(f.data[36:38])) for f in batch] == [(17, b"\0\x09")] * count
        assert tap.read_batch() == []


# -- host network configuration -------------------------------------------------------------


@pytest.fixture
def dummy(netns: str) -> str:
    """A link to configure (one end of a veth pair: this kernel may lack the dummy driver)."""
    _ip("-n", netns, "link", "add", "vvdummy0", "type", "veth", "peer", "name", "vvpeer0")
    return "vvdummy0"


def _addresses(netns: str, ifname: str) -> set[str]:
    links = json.loads(_ip("-n", netns, "-j", "addr", "show", "dev", ifname))
    return {f"{a['local']}/{a['prefixlen']}" for link in links for a in link["addr_info"]}


def _routes(netns: str, version: int) -> set[str]:
    routes = json.loads(_ip(f"-{version}", "-n", netns, "-j", "route", "show"))
    return {f"{r['dst']} {r.get('gateway', '-')} {r.get('dev')}" for r in routes}


def _link(netns: str, ifname: str) -> dict:
    return json.loads(_ip("-n", netns, "-j", "link", "show", "dev", ifname))[0]


@needs_root
def test_host_network_undo_removes_exactly_what_it_added(netns: str, dummy: str) -> None:
    _ip("-n", netns, "addr", "add", "10.50.0.9/24", "dev", dummy)  # not ours: must stay
    before_v4, before_v6 = _routes(netns, 4), _routes(netns, 6)
    with HostNetwork(netns) as net:
        net.set_up(dummy, mtu=1400)
        assert net.add_address(dummy, ipaddress.ip_interface("10.60.0.1/24"))
        assert not net.add_address(dummy, ipaddress.ip_interface("10.50.0.9/24"))
        net.add_address(dummy, ipaddress.ip_interface("fd60::1/64"))
        link = _link(netns, dummy)
        assert link["mtu"] == 1400 and "UP" in link["flags"]
        assert {"10.60.0.1/24", "10.50.0.9/24", "fd60::1/64"} <= _addresses(netns, dummy)
        assert len(net.changes) == 4

    assert _addresses(netns, dummy) == {"10.50.0.9/24"}
    assert _routes(netns, 4) == before_v4  # the link is down again: no prefix route either
    assert _routes(netns, 6) == before_v6
    link = _link(netns, dummy)
    assert link["mtu"] == 1500 and "UP" not in link["flags"]
    assert net.changes == []
    net.undo()  # idempotent


@needs_root
def test_host_network_undo_after_the_device_is_gone_is_quiet(netns: str) -> None:
    net = HostNetwork(netns)
    device = TunTapDevice.open("vvgone%d")
    try:
        _ip("link", "set", device.name, "netns", netns)
        net.set_up(device.name)
        net.add_address(device.name, ipaddress.ip_interface("10.61.0.1/24"))
    finally:
        device.close()  # the netdev and its addresses disappear with the fd
    net.undo()
    assert net.changes == []
    assert device.name not in _ip("-n", netns, "link")


@needs_root
def test_host_network_refuses_an_unknown_link_by_name(netns: str) -> None:
    with HostNetwork(netns) as net, pytest.raises(HostNetworkError, match="no-such-link"):
        net.set_up("no-such-link")


# -- the TUN host's own frames --------------------------------------------------------------


@needs_root
async def test_a_tun_hosts_arp_reply_leaves_within_the_switch_call_that_delivered_the_request(
        netns: str) -> None:
    """The L3 host's answer goes through `Switch.send` from the handler that delivered the
    request (its own task woke for it: a cross-thread wake-up on the data loop)."""
    device = TunTapDevice.open("vvtun%d", "tun", Offload.NONE)
    net = HostNetwork(netns)
    try:
        _ip("link", "set", device.name, "netns", netns)
        net.set_up(device.name, MTU)
        port = TunPort(device, net, ipv4=ipaddress.IPv4Interface(f"{KERNEL_IP}/24"))
        asker = QueuedPort("asker")
        switch = Switch()
        switch.attach(port)
        switch.attach(asker)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(port.run, switch)
            await trio.testing.wait_all_tasks_blocked()
            asker.queue.clear()  # what the host said on its own
            request = Ether(src=PEER_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
                op=1, hwsrc=PEER_MAC, psrc=PEER_IP, pdst=KERNEL_IP)
            switch.forward(asker, [Frame(bytes(request))])
            (reply,) = [Ether(bytes(f.data)) for f in asker.queue]
            assert reply[ARP].op == 2 and reply[ARP].psrc == KERNEL_IP
            assert reply[ARP].hwsrc == port.mac.hex(":") and port.outbox == []
            nursery.cancel_scope.cancel()
    finally:
        net.undo()
        device.close()
