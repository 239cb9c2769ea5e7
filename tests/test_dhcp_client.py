"""The DHCPv4 client against the hub's own server (netstack.gateway.dhcp_server), wired in
memory with a fake clock: DORA, renewal at T1, rebinding at T2, NAK after a server reset,
expiry, retransmission backoff; every frame the client sends is re-parsed by scapy with its
checksums verified, and garbage never raises."""

from __future__ import annotations

import itertools
import random
from ipaddress import IPv4Address, IPv4Interface

import pytest
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from netstack.frame import HDR_F_NEEDS_CSUM, Frame, OffloadInfo
from netstack.gateway.dhcp_config import DhcpConfig
from netstack.gateway.dhcp_server import DhcpServer
from netstack.gateway.port import GatewayConfig, GatewayPort
from netstack.host.dhcp_client import (
    BOUND,
    INIT,
    REBINDING,
    RENEWING,
    REQUEST_ATTEMPTS,
    REQUESTING,
    SELECTING,
    STOPPED,
    DhcpClient,
    DhcpLease,
    is_dhcp_reply,
)
from netstack.host.l3host import L3Host
from tests.support.clock import Clock
from tests.support.fuzzing import bounded_given
from tests.support.hostile_frames import fuzz_settings, garbled

CLIENT_MAC = bytes.fromhex("02686f737401")
SERVER_MAC = bytes.fromhex("027676000001")
OTHER_SERVER_MAC = bytes.fromhex("027676000002")
LEASE = 3600
START = 1000.0


def make_server(clock: Clock, subnet: str = "10.77.0.0/24", gateway: str = "10.77.0.1",
                mac: bytes = SERVER_MAC) -> DhcpServer:
    config = DhcpConfig(subnet=subnet, gateway=gateway, server_mac=mac,
                        dns=("10.77.0.53", "9.9.9.9"), mtu=1400, domain="vpn.example",
                        lease_seconds=LEASE)
    return DhcpServer(config, clock=clock)


class Wire:
    """A client and a server in memory; `up` False makes the server deaf."""

    def __init__(self) -> None:
        self.clock = Clock(START)
        self.server = make_server(self.clock)
        self.up = True
        self.bound: list[DhcpLease] = []
        self.lost = 0
        self.sent: list[Frame] = []
        self.client = DhcpClient(CLIENT_MAC, hostname="laptop", rng=random.Random(7),
                                 on_bound=self.bound.append, on_lost=self._on_lost)

    def _on_lost(self) -> None:
        self.lost += 1

    def exchange(self, frames: list[Frame]) -> None:
        """Deliver the client's frames to the server and its answers back, until quiet."""
        while frames:
            self.sent += frames
            for frame in frames:
                assert_valid(frame)
            if not self.up:
                return
            replies = [Frame(r) for f in frames for r in self.server.handle(bytes(f.data))]
            assert all(is_dhcp_reply(r) for r in replies)
            frames = [out for r in replies for out in self.client.handle(r, self.clock.now)]

    def advance(self, to: float) -> None:
        """Move the clock to `to`, ticking at every deadline on the way."""
        while (deadline := self.client.next_deadline()) is not None and deadline <= to:
            self.clock.now = max(self.clock.now, deadline)
            self.exchange(self.client.tick(self.clock.now))
        self.clock.now = to
        self.exchange(self.client.tick(to))

    def start(self) -> DhcpLease:
        self.exchange(self.client.start(self.clock.now))
        assert self.client.state == BOUND
        return self.client.lease


def assert_valid(frame: Frame) -> Ether:
    """A client frame as scapy sees it: checksums verified by letting scapy recompute them."""
    packet = Ether(bytes(frame.data))
    assert packet.src == CLIENT_MAC.hex(":")
    rebuilt = packet.copy()
    del rebuilt[IP].chksum
    del rebuilt[UDP].chksum
    rebuilt = Ether(bytes(rebuilt))
    assert rebuilt[IP].chksum == packet[IP].chksum
    assert rebuilt[UDP].chksum == packet[UDP].chksum
    assert packet[UDP].sport == 68 and packet[UDP].dport == 67
    assert packet[BOOTP].op == 1 and packet[BOOTP].chaddr[:6] == CLIENT_MAC
    return packet


def options(packet: Ether) -> dict:
    return {o[0]: o[1] for o in packet[DHCP].options if isinstance(o, tuple)}


def message_type(frame: Frame) -> int:
    return options(Ether(bytes(frame.data)))["message-type"]


# --- the path through the states -------------------------------------------------------------


def test_dora_binds_with_the_servers_options():
    wire = Wire()
    lease = wire.start()
    assert wire.bound == [lease]
    assert lease.address == IPv4Interface("10.77.0.2/24")
    assert lease.router == IPv4Address("10.77.0.1")
    assert lease.server == IPv4Address("10.77.0.1") and lease.server_mac == SERVER_MAC
    assert lease.dns == (IPv4Address("10.77.0.53"), IPv4Address("9.9.9.9"))
    assert lease.mtu == 1400 and lease.domain == "vpn.example"
    assert lease.lease_seconds == LEASE
    assert (lease.renew_at, lease.rebind_at, lease.expires) == \
        (START + LEASE / 2, START + LEASE * 7 / 8, START + LEASE)
    assert wire.client.next_deadline() == lease.renew_at
    assert wire.server.lease_for_ip("10.77.0.2").mac == CLIENT_MAC
    discover, request = (Ether(bytes(f.data)) for f in wire.sent)
    assert options(discover)["message-type"] == 1 and options(request)["message-type"] == 3
    assert discover.dst == "ff:ff:ff:ff:ff:ff" and discover[IP].dst == "255.255.255.255"
    assert discover[IP].src == "0.0.0.0"
    assert options(request)["requested_addr"] == "10.77.0.2"
    assert options(request)["server_id"] == "10.77.0.1"
    assert options(request)["hostname"] == b"laptop"
    assert discover[BOOTP].xid == request[BOOTP].xid


def test_renews_at_t1_by_unicast_to_the_server():
    wire = Wire()
    lease = wire.start()
    wire.sent.clear()
    wire.advance(lease.renew_at - 1)
    assert wire.sent == [] and wire.client.state == BOUND
    wire.advance(lease.renew_at)
    (renewal,) = (Ether(bytes(f.data)) for f in wire.sent)
    assert renewal.dst == SERVER_MAC.hex(":") and renewal[IP].dst == "10.77.0.1"
    assert renewal[IP].src == "10.77.0.2" and renewal[BOOTP].ciaddr == "10.77.0.2"
    assert "server_id" not in options(renewal) and "requested_addr" not in options(renewal)
    assert wire.client.state == BOUND
    renewed = wire.client.lease
    assert renewed.address == lease.address and renewed.expires == lease.renew_at + LEASE
    assert wire.bound == [lease, renewed] and wire.lost == 0


def test_rebinds_at_t2_by_broadcast_when_the_server_does_not_answer_renewals():
    wire = Wire()
    lease = wire.start()
    wire.up = False
    wire.sent.clear()
    wire.advance(lease.rebind_at - 1)
    assert wire.client.state == RENEWING
    renewals = [Ether(bytes(f.data)) for f in wire.sent]
    # T1 = 2800, T2 = 4150: sent at 2800, 3475, 3812.5, 3981.25, 4065.6, 4125.6.
    assert len(renewals) == 6
    assert all(r.dst == SERVER_MAC.hex(":") and r[IP].dst == "10.77.0.1" for r in renewals)
    wire.up = True
    wire.sent.clear()
    wire.advance(lease.rebind_at)
    (rebind,) = (Ether(bytes(f.data)) for f in wire.sent)
    assert rebind.dst == "ff:ff:ff:ff:ff:ff" and rebind[IP].dst == "255.255.255.255"
    assert rebind[BOOTP].ciaddr == "10.77.0.2"
    assert wire.client.state == BOUND
    assert wire.client.lease.expires == lease.rebind_at + LEASE
    assert wire.lost == 0


def test_renewal_retransmissions_halve_the_time_left_down_to_a_minute():
    wire = Wire()
    lease = wire.start()
    wire.up = False
    wire.advance(lease.renew_at)
    deadlines = []
    while wire.client.state == RENEWING:
        deadlines.append(wire.client.next_deadline())
        wire.advance(deadlines[-1])
    t1, t2 = lease.renew_at, lease.rebind_at
    expected, now = [], t1
    while now < t2:
        now = min(now + max((t2 - now) / 2, 60), t2)
        expected.append(now)
    assert deadlines == expected
    assert wire.client.state == REBINDING


def test_nak_after_a_server_reset_with_another_subnet_starts_over():
    wire = Wire()
    lease = wire.start()
    wire.server = make_server(wire.clock, "10.88.0.0/24", "10.88.0.1", OTHER_SERVER_MAC)
    wire.advance(lease.rebind_at - 1)  # renewals go to the old server: nobody answers
    assert wire.client.state == RENEWING and wire.lost == 0
    assert wire.server.counters["not_for_us"] > 0
    wire.advance(lease.rebind_at)  # the broadcast reaches the new server: NAK, then DORA
    assert wire.lost == 1
    assert wire.server.counters["nak_wrong_subnet"] == 1
    assert wire.client.state == BOUND
    new = wire.client.lease
    assert new.address == IPv4Interface("10.88.0.2/24") and new.server_mac == OTHER_SERVER_MAC
    assert wire.bound[-1] == new


def test_lease_expiry_drops_the_address_and_discovers_again():
    wire = Wire()
    lease = wire.start()
    wire.up = False
    wire.advance(lease.expires - 0.5)
    assert wire.client.state == REBINDING and wire.lost == 0
    wire.sent.clear()
    wire.advance(lease.expires)
    assert wire.lost == 1 and wire.client.lease is None
    assert wire.client.state == SELECTING
    assert [message_type(f) for f in wire.sent] == [1]
    wire.up = True
    wire.advance(wire.client.next_deadline())
    assert wire.client.state == BOUND


def test_discover_retransmits_with_backoff_4_8_16_capped_at_64_randomized():
    wire = Wire()
    wire.up = False
    wire.exchange(wire.client.start(START))
    sent_at = [START]
    for _ in range(8):
        deadline = wire.client.next_deadline()
        wire.advance(deadline)
        sent_at.append(deadline)
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    for gap, base in zip(gaps, [4, 8, 16, 32, 64, 64, 64, 64], strict=True):
        assert base - 1 <= gap <= base + 1
    assert len({round(g - b, 6) for g, b in zip(gaps, [4, 8, 16, 32, 64, 64, 64, 64],
                                                  strict=True)}) > 1  # randomized
    assert all(message_type(f) == 1 for f in wire.sent)
    xids = {Ether(bytes(f.data))[BOOTP].xid for f in wire.sent}
    assert len(xids) == 1  # retransmissions keep the transaction


def test_requesting_without_an_answer_starts_over():
    wire = Wire()
    frames = wire.client.start(START)
    offers = [Frame(r) for r in wire.server.handle(bytes(frames[0].data))]
    requests = wire.client.handle(offers[0], START)
    assert wire.client.state == REQUESTING and message_type(requests[0]) == 3
    wire.up = False
    while wire.client.state == REQUESTING:
        wire.advance(wire.client.next_deadline())
    assert wire.client.state == SELECTING
    assert wire.client.counters["request"] == REQUEST_ATTEMPTS
    assert message_type(wire.sent[-1]) == 1


def test_consecutive_naks_back_off():
    wire = Wire()
    wire.start()
    nak = make_nak(wire.client.xid)
    wire.client.state = RENEWING  # as at T1
    out = wire.client.handle(nak, wire.clock.now)
    assert wire.lost == 1 and [message_type(f) for f in out] == [1]  # first NAK: at once
    wire.client.state = REQUESTING
    out = wire.client.handle(make_nak(wire.client.xid), wire.clock.now)
    assert out == [] and wire.client.state == INIT
    assert wire.client.next_deadline() == wire.clock.now + 4
    assert [message_type(f) for f in wire.client.tick(wire.clock.now + 4)] == [1]


def test_release_hands_the_address_back():
    wire = Wire()
    wire.start()
    frames = wire.client.release(wire.clock.now)
    packet = assert_valid(frames[0])
    assert options(packet)["message-type"] == 7 and packet.dst == SERVER_MAC.hex(":")
    wire.server.handle(bytes(frames[0].data))
    assert wire.server.leases == {}
    assert wire.client.state == STOPPED and wire.lost == 1
    assert wire.client.next_deadline() is None and wire.client.tick(1e9) == []


# --- what it refuses --------------------------------------------------------------------------


def offer_for(wire: Wire) -> Frame:
    frames = wire.client.start(START)
    return Frame(wire.server.handle(bytes(frames[0].data))[0])


def test_replies_with_another_xid_or_for_another_mac_are_ignored():
    wire = Wire()
    offer = Ether(bytes(offer_for(wire).data))
    wrong_xid = offer.copy()
    wrong_xid[BOOTP].xid ^= 1
    wrong_mac = offer.copy()
    wrong_mac[BOOTP].chaddr = bytes.fromhex("02000000beef") + bytes(10)
    other_dst = offer.copy()
    other_dst.dst = "02:00:00:00:be:ef"
    for packet in (wrong_xid, wrong_mac, other_dst):
        del packet[IP].chksum
        del packet[UDP].chksum
        assert wire.client.handle(Frame(bytes(packet)), START) == []
    assert wire.client.state == SELECTING
    assert wire.client.counters["unexpected"] == 1
    assert wire.client.counters["not_for_us"] == 2


def test_a_bad_udp_checksum_is_dropped_unless_left_partial_by_offload():
    wire = Wire()
    data = bytearray(offer_for(wire).data)
    data[-1] ^= 0xFF  # in the padding, covered by the UDP checksum
    assert wire.client.handle(Frame(bytes(data)), START) == []
    assert wire.client.counters["bad_checksum"] == 1
    partial = OffloadInfo(HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    assert len(wire.client.handle(Frame(bytes(data), partial), START)) == 1
    assert wire.client.state == REQUESTING


def test_an_ack_without_a_lease_time_is_refused():
    wire = Wire()
    offer = Ether(bytes(offer_for(wire).data))
    wire.client.handle(Frame(bytes(offer)), START)
    ack = offer.copy()
    ack[DHCP].options = [("message-type", 5), ("server_id", "10.77.0.1"), "end"]
    del ack[IP].chksum, ack[UDP].chksum, ack[IP].len, ack[UDP].len
    assert wire.client.handle(Frame(bytes(ack)), START) == []
    assert wire.client.counters["bad_ack"] == 1 and wire.client.state == REQUESTING


def make_nak(xid: int) -> Frame:
    packet = (Ether(src=SERVER_MAC.hex(":"), dst="ff:ff:ff:ff:ff:ff")
              / IP(src="10.77.0.1", dst="255.255.255.255") / UDP(sport=67, dport=68)
              / BOOTP(op=2, xid=xid, chaddr=CLIENT_MAC)
              / DHCP(options=[("message-type", 6), ("server_id", "10.77.0.1"), "end"]))
    return Frame(bytes(packet))


@pytest.mark.parametrize("state", [SELECTING, BOUND, STOPPED])
def test_a_nak_outside_requesting_renewing_rebinding_is_ignored(state):
    wire = Wire()
    wire.client.start(START)
    wire.client.state = state
    assert wire.client.handle(make_nak(wire.client.xid), START) == []
    assert wire.client.state == state


@bounded_given(fuzz_settings(300), st.data())
def test_garbage_and_mutated_replies_never_raise(data):
    wire = Wire()
    offer = bytes(offer_for(wire).data)
    frame = data.draw(garbled(st.just(offer), max_size=400, max_mutations=8))
    flags = data.draw(st.sampled_from([0, HDR_F_NEEDS_CSUM]))
    out = wire.client.handle(Frame(frame, OffloadInfo(flags, 0, 0, 0, 0, 0)), START)
    for sent in out:
        assert_valid(sent)
    assert wire.client.state in (SELECTING, REQUESTING)
    is_dhcp_reply(Frame(frame))


def test_is_dhcp_reply_picks_udp_67_to_68_only():
    wire = Wire()
    offer = offer_for(wire)
    assert is_dhcp_reply(offer)
    assert not is_dhcp_reply(wire.client.start(START)[0])  # 68 -> 67
    assert not is_dhcp_reply(Frame(b"\xff" * 20))


def test_a_lease_configures_l3host_and_a_ping_reaches_the_hubs_gateway():
    """The shell's wiring: replies `is_dhcp_reply` picks go to the client, the rest to L3Host."""
    clock = Clock(START)
    gateway = GatewayPort(GatewayConfig(mac=SERVER_MAC, ipv4=IPv4Interface("10.77.0.1/24")),
                          dhcp=make_server(clock), clock=clock)
    host = L3Host(CLIENT_MAC, clock=clock)
    to_tun: list[bytes] = []
    outgoing: list[Frame] = []
    client = DhcpClient(CLIENT_MAC, rng=random.Random(1),
                        on_bound=lambda lease: outgoing.extend(
                            host.configure_ipv4(lease.address, lease.router)))

    def run(frames: list[Frame]) -> None:
        while frames:
            gateway.deliver(frames)
            frames = []
            for frame in gateway.take_outbox():
                if is_dhcp_reply(frame):
                    frames += client.handle(frame, clock.now)
                else:
                    packets, replies = host.from_segment(frame)
                    to_tun.extend(packet for packet, _ in packets)
                    frames += replies
            frames += outgoing
            outgoing.clear()

    run(client.start(clock.now))
    assert host.ipv4 == IPv4Interface("10.77.0.2/24") and host.gateway4 == IPv4Address(
        "10.77.0.1")
    ping = bytes(IP(src="10.77.0.2", dst="10.77.0.1") / ICMP(id=7, seq=1) / b"ping")
    run(host.from_host(ping))
    (reply,) = (IP(p) for p in to_tun)
    assert reply[ICMP].type == 0 and reply[ICMP].id == 7 and reply.dst == "10.77.0.2"
