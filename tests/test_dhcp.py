"""The DHCPv4 server: DORA, renew/rebind/init-reboot, release, decline, inform, reservations,
persistence across restarts, expiry, and hostile frames.

Client frames are built with scapy the way real clients build them (the option sets below
were taken from captures of each client); every reply is re-parsed with scapy and its
checksums verified.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

import netstack.gateway.dhcp_leases as leases_module
import netstack.gateway.dhcp_server as server_module
import netstack.gateway.dhcp_store as store_module
import netstack.wire.dhcp as codec_module
import tunnel.hub as hub_module
from netstack.frame import Frame
from netstack.gateway.dhcp_config import DhcpConfig
from netstack.gateway.dhcp_leases import DECLINE_HOLD_SECONDS, OFFER_HOLD_SECONDS, Lease
from netstack.gateway.dhcp_server import (
    DECLINE_BUDGET,
    DECLINE_WINDOW_SECONDS,
    PERSIST_SLACK_SECONDS,
    RATE_BURST,
    RATE_PER_SECOND,
    DhcpServer,
)
from netstack.gateway.dhcp_store import read_state, write_state
from netstack.policy import PortPolicy
from netstack.port import QueuedPort
from netstack.wire.checksum import internet_checksum
from tests.support import fuzzing
from tests.support.clock import Clock
from tests.test_hub import exchange as guest_exchange
from tests.test_hub import hub_with_guests
from tunnel.hub import Hub, HubConfig

SUBNET = IPv4Network("10.77.0.0/24")
GATEWAY = IPv4Address("10.77.0.1")
SERVER_MAC = bytes.fromhex("02000000aa01")
BROADCAST_MAC = b"\xff" * 6
BROADCAST_IP = "255.255.255.255"
DNS = (IPv4Address("10.77.0.1"), IPv4Address("9.9.9.9"))


def mac(n: int) -> bytes:
    return bytes([0x52, 0x54, 0x00, 0x12, 0x34, n])


def ip(last: int) -> IPv4Address:
    return IPv4Address(f"10.77.0.{last}")


def make_server(clock: Clock | None = None, **overrides) -> DhcpServer:
    settings_ = dict(subnet=SUBNET, gateway=GATEWAY, server_mac=SERVER_MAC, dns=DNS,
                     mtu=1400, domain="vpn.example", lease_seconds=3600)
    settings_.update(overrides)
    config = DhcpConfig(**settings_)
    stored = None if config.state_path is None else read_state(config.state_path)
    return DhcpServer(config, clock=clock or Clock(), stored=stored)


# --- Clients, as they really send ---------------------------------------------------------

# Options each client puts in DISCOVER and REQUEST besides 53/50/54 (from captures).
CLIENTS = {
    "udhcpc": lambda m: [
        ("client_id", b"\x01" + m),
        ("max_dhcp_size", 576),
        ("param_req_list", [1, 3, 6, 12, 15, 28, 42]),
        ("vendor_class_id", b"udhcp 1.36.1"),
        ("hostname", b"alpine"),
    ],
    "dhclient": lambda m: [
        ("hostname", b"debian"),
        ("param_req_list", [1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42]),
    ],
    "systemd-networkd": lambda m: [
        ("client_id", b"\xff\x4e\x6f\x2a\x11\x00\x02\x00\x00\xab\x11\x7a\x66\x18\x24\xd2\x6b"),
        ("max_dhcp_size", 1472),
        ("hostname", b"fedora"),
        ("param_req_list", [1, 3, 6, 12, 15, 26, 42, 108, 114, 119, 121]),
    ],
    "windows": lambda m: [
        ("client_id", b"\x01" + m),
        ("hostname", b"DESKTOP-7QK2"),
        ("vendor_class_id", b"MSFT 5.0"),
        ("param_req_list", [1, 3, 6, 15, 31, 33, 43, 44, 46, 47, 119, 121, 249, 252]),
    ],
}
BROADCAST_FLAG_OF = {"udhcpc": 0, "dhclient": 0, "systemd-networkd": 0, "windows": 0x8000}


def client_frame(
    m: bytes,
    msg_type: str,
    options: list | tuple = (),
    *,
    ciaddr: str = "0.0.0.0",
    flags: int = 0,
    xid: int = 0x1234ABCD,
    src_ip: str = "0.0.0.0",
    dst_ip: str = BROADCAST_IP,
    dst_mac: bytes = BROADCAST_MAC,
    chaddr: bytes | None = None,
    eth_src: bytes | None = None,
    giaddr: str = "0.0.0.0",
) -> bytes:
    packet = (
        Ether(src=eth_src or m, dst=dst_mac)
        / IP(src=src_ip, dst=dst_ip)
        / UDP(sport=68, dport=67)
        / BOOTP(op=1, chaddr=chaddr or m, ciaddr=ciaddr, giaddr=giaddr, xid=xid, flags=flags)
        / DHCP(options=[("message-type", msg_type), *options, "end"])
    )
    return bytes(packet)


def check_reply(frame: bytes) -> Ether:
    """Parse a reply with scapy and check everything a client's stack checks."""
    packet = Ether(frame)
    assert packet.src == "02:00:00:00:aa:01"
    assert packet.type == 0x0800
    assert packet[IP].src == str(GATEWAY)
    assert packet[IP].len == len(frame) - 14
    assert (packet[UDP].sport, packet[UDP].dport) == (67, 68)
    assert packet[UDP].len == packet[IP].len - 20
    # Checksums: what scapy computes from scratch must be what we sent.
    sent_ip, sent_udp = packet[IP].chksum, packet[UDP].chksum
    fresh = packet.copy()
    del fresh[IP].chksum
    del fresh[UDP].chksum
    fresh = Ether(bytes(fresh))
    assert (fresh[IP].chksum, fresh[UDP].chksum) == (sent_ip, sent_udp)
    assert sent_udp != 0
    assert packet[BOOTP].op == 2
    assert len(packet[UDP].payload) >= 300  # BOOTP minimum
    return packet


def options_of(packet: Ether) -> dict:
    return {o[0]: o[1] if len(o) == 2 else o[1:] for o in packet[DHCP].options
            if isinstance(o, tuple)}


def option_codes(packet: Ether) -> list[int]:
    """Option codes in the order they appear on the wire."""
    raw = bytes(packet[BOOTP])[240:]
    codes, i = [], 0
    while i < len(raw) and raw[i] != 255:
        if raw[i] == 0:
            i += 1
            continue
        codes.append(raw[i])
        i += 2 + raw[i + 1]
    return codes


def persist(server: DhcpServer) -> list[bytes]:
    """What the hub's shell does (the write in a worker thread): run the server's write job,
    then send the ACKs that waited for it."""
    job = server.write_job()
    return server.persisted(job, write_state(job))


def exchange(server: DhcpServer, frame: bytes) -> list[bytes]:
    """`handle`, then the shell's write if the table changed: the replies a client sees."""
    replies = server.handle(frame)
    if server.dirty:
        replies += persist(server)
    return replies


def one(replies: list[bytes]) -> Ether:
    assert len(replies) == 1, replies
    return check_reply(replies[0])


def dora(server: DhcpServer, m: bytes, extra: list | tuple = (), *, flags: int = 0,
         xid: int = 0x1234ABCD) -> Ether:
    """DISCOVER, OFFER, REQUEST (selecting), ACK; returns the ACK."""
    offer = one(server.handle(client_frame(m, "discover", extra, flags=flags, xid=xid)))
    assert options_of(offer)["message-type"] == 2
    assert offer[BOOTP].xid == xid
    offered = offer[BOOTP].yiaddr
    ack = one(exchange(server, client_frame(
        m, "request",
        [("requested_addr", offered), ("server_id", str(GATEWAY)), *extra],
        flags=flags, xid=xid,
    )))
    assert options_of(ack)["message-type"] == 5, options_of(ack)
    assert ack[BOOTP].yiaddr == offered
    return ack


# --- The exchange -------------------------------------------------------------------------


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_dora_as_each_real_client_gets_first_pool_address_and_options(client):
    server = make_server()
    m = mac(1)
    extra = CLIENTS[client](m)
    ack = dora(server, m, extra, flags=BROADCAST_FLAG_OF[client])
    opts = options_of(ack)
    assert ack[BOOTP].yiaddr == "10.77.0.2"
    assert ack[BOOTP].chaddr[:6] == m
    assert opts["server_id"] == str(GATEWAY)
    assert opts["subnet_mask"] == "255.255.255.0"
    assert opts["router"] == str(GATEWAY)
    assert opts["name_server"] == ("10.77.0.1", "9.9.9.9")
    assert opts["domain"] == b"vpn.example"
    assert opts["interface-mtu"] == 1400
    assert opts["lease_time"] == 3600
    assert opts["renewal_time"] == 1800
    assert opts["rebinding_time"] == 3150
    hostname = dict(extra)["hostname"]
    assert opts["hostname"] == hostname
    if "client_id" in dict(extra):  # RFC 6842 echo
        assert opts["client_id"] == dict(extra)["client_id"]
    lease = server.leases[m]
    assert lease == Lease(m, ip(2), server.clock() + 3600, hostname.decode(),
                          dict(extra).get("client_id"))
    assert server.counters["discover"] == server.counters["offer"] == 1
    assert server.counters["request"] == server.counters["ack"] == 1


def test_reply_without_broadcast_flag_is_unicast_to_yiaddr_at_chaddr():
    server = make_server()
    offer = one(server.handle(client_frame(mac(1), "discover")))
    assert offer.dst == "52:54:00:12:34:01"
    assert offer[IP].dst == "10.77.0.2"


def test_reply_with_broadcast_flag_is_broadcast():
    server = make_server()
    offer = one(server.handle(client_frame(mac(1), "discover", flags=0x8000)))
    assert offer.dst == "ff:ff:ff:ff:ff:ff"
    assert offer[IP].dst == BROADCAST_IP
    assert offer[BOOTP].flags == 0x8000


def test_options_follow_parameter_request_order_after_the_fixed_ones():
    server = make_server()
    offer = one(server.handle(client_frame(mac(1), "discover",
                                           [("param_req_list", [26, 15, 6, 3, 1])])))
    codes = option_codes(offer)
    assert codes[:2] == [53, 54]
    assert codes.index(26) < codes.index(15) < codes.index(6)


def test_options_are_trimmed_to_the_clients_maximum_but_never_below_576():
    server = make_server(dns=tuple(IPv4Address(f"10.0.{i}.1") for i in range(63)),
                         domain="d" * 200)
    replies = server.handle(client_frame(mac(1), "discover", [("max_dhcp_size", 300)]))
    offer = one(replies)
    assert len(offer[IP]) <= 576
    opts = options_of(offer)
    assert "subnet_mask" in opts and "router" in opts and "lease_time" in opts
    assert len(opts["name_server"]) == 63 and opts["interface-mtu"] == 1400
    assert "domain" not in opts  # 202 more bytes do not fit in 576
    assert server.counters["option_trimmed"] == 1
    big = one(server.handle(client_frame(mac(2), "discover", [("max_dhcp_size", 1500)])))
    assert options_of(big)["domain"] == b"d" * 200


def test_offer_is_held_for_its_client_then_released():
    clock = Clock()
    server = make_server(clock)
    first = one(server.handle(client_frame(mac(1), "discover")))
    second = one(server.handle(client_frame(mac(2), "discover")))
    assert first[BOOTP].yiaddr != second[BOOTP].yiaddr
    # The same client asking again gets the same offer.
    again = one(server.handle(client_frame(mac(1), "discover")))
    assert again[BOOTP].yiaddr == first[BOOTP].yiaddr
    clock.now += OFFER_HOLD_SECONDS + 1
    server.expire(clock.now)
    server.handle(client_frame(mac(1), "release", ciaddr="10.77.0.2"))  # no lease: ignored
    third = one(server.handle(client_frame(mac(3), "discover")))
    assert third[BOOTP].yiaddr == "10.77.0.2"


def test_renew_unicast_with_ciaddr_extends_lease_and_replies_to_ciaddr():
    clock = Clock()
    server = make_server(clock)
    dora(server, mac(1))
    clock.now += 1800
    ack = one(server.handle(client_frame(
        mac(1), "request", ciaddr="10.77.0.2", src_ip="10.77.0.2", dst_ip=str(GATEWAY),
        dst_mac=SERVER_MAC,
    )))
    assert options_of(ack)["message-type"] == 5
    assert (ack.dst, ack[IP].dst) == ("52:54:00:12:34:01", "10.77.0.2")
    assert ack[BOOTP].ciaddr == ack[BOOTP].yiaddr == "10.77.0.2"
    assert server.leases[mac(1)].expires == clock.now + 3600


def test_rebind_broadcast_with_ciaddr_is_acked():
    clock = Clock()
    server = make_server(clock)
    dora(server, mac(1))
    clock.now += 3200
    ack = one(server.handle(client_frame(mac(1), "request", ciaddr="10.77.0.2",
                                         src_ip="10.77.0.2")))
    assert options_of(ack)["message-type"] == 5
    assert ack[IP].dst == "10.77.0.2"
    assert server.leases[mac(1)].expires == clock.now + 3600


def test_init_reboot_with_its_own_address_is_acked():
    server = make_server()
    dora(server, mac(1))
    ack = one(server.handle(client_frame(mac(1), "request", [("requested_addr", "10.77.0.2")])))
    assert options_of(ack)["message-type"] == 5
    assert ack[BOOTP].yiaddr == "10.77.0.2"


@pytest.mark.parametrize(
    ("requested", "reason"),
    [("192.168.1.50", "wrong_subnet"), ("10.77.0.2", "taken"), ("10.77.0.1", "not_ours"),
     ("10.77.0.255", "not_ours")],
)
def test_init_reboot_with_a_wrong_address_is_naked_by_broadcast(requested, reason):
    server = make_server()
    dora(server, mac(1))  # holds .2
    nak = one(server.handle(client_frame(mac(2), "request", [("requested_addr", requested)])))
    opts = options_of(nak)
    assert opts["message-type"] == 6
    assert opts["server_id"] == str(GATEWAY)
    assert opts["error_message"] == reason.encode()
    assert "lease_time" not in opts
    assert (nak.dst, nak[IP].dst) == ("ff:ff:ff:ff:ff:ff", BROADCAST_IP)
    assert nak[BOOTP].yiaddr == "0.0.0.0"
    assert server.counters["nak"] == 1 and server.counters[f"nak_{reason}"] == 1
    assert server.leases[mac(1)].ip == ip(2)
    assert mac(2) not in server.leases


def test_init_reboot_after_the_hub_forgot_acks_a_free_address():
    server = make_server()  # no state: the client's lease is unknown to us
    ack = one(server.handle(client_frame(mac(1), "request", [("requested_addr", "10.77.0.9")])))
    assert options_of(ack)["message-type"] == 5
    assert server.lease_for_ip("10.77.0.9").mac == mac(1)


def test_request_for_another_server_is_ignored_and_frees_our_offer():
    server = make_server()
    offer = one(server.handle(client_frame(mac(1), "discover")))
    replies = server.handle(client_frame(
        mac(1), "request", [("requested_addr", "10.77.0.200"), ("server_id", "10.77.0.254")]))
    assert replies == []
    assert server.counters["other_server"] == 1
    other = one(server.handle(client_frame(mac(2), "discover")))
    assert other[BOOTP].yiaddr == offer[BOOTP].yiaddr  # the offer was withdrawn


def test_request_without_address_or_ciaddr_is_dropped():
    server = make_server()
    assert server.handle(client_frame(mac(1), "request")) == []
    assert server.counters["bad_request"] == 1


def test_release_then_discover_gets_the_same_address():
    server = make_server()
    released = []
    server.on_release = released.append
    dora(server, mac(1))
    dora(server, mac(2))
    assert server.handle(client_frame(mac(1), "release", [("server_id", str(GATEWAY))],
                                      ciaddr="10.77.0.2", src_ip="10.77.0.2")) == []
    assert mac(1) not in server.leases
    assert server.lease_for_ip("10.77.0.2") is None
    assert [lease.ip for lease in released] == [ip(2)]
    # A newcomer gets a never-used address, not the one just released.
    assert dora(server, mac(3))[BOOTP].yiaddr == "10.77.0.4"
    assert dora(server, mac(1))[BOOTP].yiaddr == "10.77.0.2"


def test_release_of_an_address_not_held_changes_nothing():
    server = make_server()
    dora(server, mac(1))
    server.handle(client_frame(mac(2), "release", ciaddr="10.77.0.2"))
    assert server.leases[mac(1)].ip == ip(2)
    assert server.counters["release_unknown"] == 1


def test_decline_rests_the_address_and_the_client_gets_another():
    clock = Clock()
    server = make_server(clock)
    released = []
    server.on_release = released.append
    dora(server, mac(1))
    assert server.handle(client_frame(mac(1), "decline", [
        ("requested_addr", "10.77.0.2"), ("server_id", str(GATEWAY))])) == []
    assert mac(1) not in server.leases and [r.ip for r in released] == [ip(2)]
    assert dora(server, mac(1))[BOOTP].yiaddr == "10.77.0.3"
    # Nobody gets it while it rests, not even by asking for it.
    nak = one(server.handle(client_frame(mac(2), "request", [("requested_addr", "10.77.0.2")])))
    assert options_of(nak)["error_message"] == b"declined"
    clock.now += DECLINE_HOLD_SECONDS + 1
    server.expire(clock.now)
    assert dora(server, mac(2))[BOOTP].yiaddr == "10.77.0.2"


def test_decline_of_an_address_the_client_does_not_hold_is_ignored():
    server = make_server()
    dora(server, mac(1))
    server.handle(client_frame(mac(2), "decline", [("requested_addr", "10.77.0.2")]))
    assert server.counters["decline_unknown"] == 1
    assert server.leases[mac(1)].ip == ip(2)
    assert dora(server, mac(2))[BOOTP].yiaddr == "10.77.0.3"


def test_inform_gets_options_but_no_lease():
    server = make_server()
    ack = one(server.handle(client_frame(
        mac(1), "inform", [("param_req_list", [1, 3, 6, 15])],
        ciaddr="10.77.0.50", src_ip="10.77.0.50")))
    opts = options_of(ack)
    assert opts["message-type"] == 5
    assert opts["router"] == str(GATEWAY) and opts["subnet_mask"] == "255.255.255.0"
    assert opts["name_server"] == ("10.77.0.1", "9.9.9.9")
    assert not {"lease_time", "renewal_time", "rebinding_time"} & opts.keys()
    assert ack[BOOTP].yiaddr == "0.0.0.0" and ack[BOOTP].ciaddr == "10.77.0.50"
    assert (ack.dst, ack[IP].dst) == ("52:54:00:12:34:01", "10.77.0.50")
    assert server.leases == {} and server.counters["inform"] == 1


def test_an_address_someone_else_uses_is_neither_offered_nor_granted():
    """A host configured by hand at .2 (the switch saw it send from there): the lease would
    collide, so the server moves on, and NAKs a client that asks for .2 by name."""
    server = make_server()
    static_host = mac(9)
    server.in_use = lambda address, m: address == ip(2) and m != static_host
    offer = one(server.handle(client_frame(mac(1), "discover")))
    assert offer[BOOTP].yiaddr == "10.77.0.3"
    nak = one(server.handle(client_frame(mac(2), "request", [("requested_addr", "10.77.0.2")])))
    assert options_of(nak)["message-type"] == 6
    assert server.counters["in_use_elsewhere"] >= 2
    # the host itself may lease the address it uses (asking for it: its DISCOVER without a
    # requested address gets another, .2 rests after being found in use)
    ack = one(exchange(server, client_frame(static_host, "request",
                                            [("requested_addr", "10.77.0.2")])))
    assert (options_of(ack)["message-type"], ack[BOOTP].yiaddr) == (5, "10.77.0.2")


def test_addresses_a_squatter_sends_from_are_probed_once_then_rest_and_come_back():
    """Another port sends from the 20 lowest free addresses: each of them costs one probe
    (then it rests out of the free set), so after a few DISCOVERs every other client gets a
    lease, and nobody is told the pool is exhausted; once the rest is over, the addresses
    are free again (and offered when nobody uses them any more)."""
    clock = Clock()
    server = make_server(clock)
    squatted = {ip(n) for n in range(2, 22)}
    probed: list[IPv4Address] = []

    def in_use(address: IPv4Address, m: bytes) -> bool:
        probed.append(address)
        return address in squatted

    server.in_use = in_use
    free_before = server.table_sizes()["free"]
    unanswered = 0
    for n in range(1, 6):
        for attempt in range(8):  # a client retransmits its DISCOVER
            if server.handle(client_frame(mac(n), "discover", xid=attempt)):
                break
            unanswered += 1
        assert dora(server, mac(n))[BOOTP].yiaddr == str(ip(21 + n))
    assert unanswered == len(squatted) // leases_module.MAX_PROBES  # 8, 8, then 4 and .22
    assert sorted(a for a in probed if a in squatted) == sorted(squatted)  # each once
    assert server.counters["pool_exhausted"] == 0
    assert server.counters["no_offer_in_use"] == unanswered
    assert server.table_sizes()["in_use_resting"] == len(squatted)
    clock.now += leases_module.IN_USE_HOLD_SECONDS
    server.expire(server.clock())
    assert server.table_sizes() | {"in_use_resting": 0, "free": free_before - 5} \
        == server.table_sizes()
    squatted.clear()  # the squatter went away
    assert dora(server, mac(9))[BOOTP].yiaddr == "10.77.0.2"


def test_a_guest_sending_from_the_lowest_pool_addresses_does_not_deny_dhcp_to_others(tmp_path):
    """Through the hub's switch: a guest sends one frame from each of the 8 lowest pool
    addresses; another guest's first DISCOVER meets them (no offer, counted as such, not as
    an exhausted pool), its retransmission gets .10."""
    hub = Hub(HubConfig(subnet=SUBNET, state_dir=tmp_path))
    attacker = QueuedPort("attacker", policy=PortPolicy())
    victim = QueuedPort("victim", policy=PortPolicy())
    hub.switch.attach(attacker)
    hub.switch.attach(victim)
    squatter = bytes.fromhex("5254000000aa")
    for n in range(2, 10):
        hub.switch.forward(attacker, [Frame(bytes(
            Ether(src=squatter, dst="ff:ff:ff:ff:ff:ff") / IP(src=str(ip(n)), dst="10.77.0.255")
            / UDP(sport=9, dport=9) / b"x"))])
    offers = []
    for xid in range(2):
        hub.switch.forward(victim, [Frame(client_frame(mac(1), "discover", xid=xid))])
        hub.gateway.tick(hub.gateway.clock())
        offers.append([Ether(f.data) for f in hub.gateway.take_outbox()])
    assert offers[0] == []
    assert [o[BOOTP].yiaddr for o in offers[1]] == ["10.77.0.10"]
    counters = hub.dhcp.counters
    assert (counters["no_offer_in_use"], counters["pool_exhausted"]) == (1, 0)
    assert counters["in_use_elsewhere"] == 8


# --- Reservations and the pool ------------------------------------------------------------


def test_reserved_mac_gets_its_address_and_nobody_else_does():
    server = make_server(reservations={mac(9): IPv4Address("10.77.0.2"),
                                       mac(8): IPv4Address("10.77.0.250")},
                         pool=(ip(2), ip(10)))
    assert dora(server, mac(1))[BOOTP].yiaddr == "10.77.0.3"
    assert dora(server, mac(9))[BOOTP].yiaddr == "10.77.0.2"
    assert dora(server, mac(8))[BOOTP].yiaddr == "10.77.0.250"  # outside the pool is fine
    nak = one(server.handle(client_frame(mac(2), "request", [("requested_addr", "10.77.0.250")])))
    assert options_of(nak)["error_message"] == b"not_ours"
    # The reserved client may not wander off its address.
    nak = one(server.handle(client_frame(mac(9), "request", [("requested_addr", "10.77.0.5")])))
    assert options_of(nak)["error_message"] == b"reserved_elsewhere"


def test_reservation_added_over_an_old_lease_waits_for_it_and_naks_its_renewal(tmp_path):
    clock = Clock()
    state = tmp_path / "leases.json"
    old = make_server(clock, state_path=state)
    dora(old, mac(1))  # .2
    server = make_server(clock, state_path=state, reservations={mac(9): ip(2)})
    assert server.handle(client_frame(mac(9), "discover")) == []
    assert server.counters["reservation_in_use"] == 1
    nak = one(exchange(server, client_frame(mac(1), "request", ciaddr="10.77.0.2")))
    assert options_of(nak)["error_message"] == b"reserved"
    assert server.lease_for_ip(ip(2)) is None
    assert dora(server, mac(9))[BOOTP].yiaddr == "10.77.0.2"
    assert dora(server, mac(1))[BOOTP].yiaddr == "10.77.0.3"


def test_pool_exhaustion_offers_nothing_and_counts_it():
    server = make_server(pool=(ip(2), ip(3)))
    dora(server, mac(1))
    dora(server, mac(2))
    assert server.handle(client_frame(mac(3), "discover")) == []
    assert server.counters["pool_exhausted"] == 1


def test_exhausted_pool_reuses_the_longest_released_address():
    clock = Clock()
    server = make_server(clock, pool=(ip(2), ip(3)))
    dora(server, mac(1))
    dora(server, mac(2))
    server.handle(client_frame(mac(2), "release", ciaddr="10.77.0.3"))
    clock.now += 10
    server.handle(client_frame(mac(1), "release", ciaddr="10.77.0.2"))
    assert dora(server, mac(3))[BOOTP].yiaddr == "10.77.0.3"
    # mac(2)'s memory of .3 is gone; it gets .2, which mac(1) no longer holds.
    assert dora(server, mac(2))[BOOTP].yiaddr == "10.77.0.2"


def test_two_macs_never_share_an_address():
    server = make_server(pool=(ip(2), ip(21)))
    got = {}
    for n in range(1, 21):
        got[n] = dora(server, mac(n))[BOOTP].yiaddr
    assert len(set(got.values())) == 20
    # Asking for someone else's address, in every way a client can, fails.
    for frame in (
        client_frame(mac(30), "discover", [("requested_addr", got[1])]),
        client_frame(mac(30), "request", [("requested_addr", got[1])]),
        client_frame(mac(30), "request", ciaddr=got[1]),
        client_frame(mac(30), "request", [("requested_addr", got[1]),
                                          ("server_id", str(GATEWAY))]),
    ):
        for reply in server.handle(frame):
            assert options_of(check_reply(reply))["message-type"] == 6
    assert server.counters["pool_exhausted"] == 1
    assert server.lease_for_ip(got[1]).mac == mac(1)


def test_client_identifier_brings_its_address_to_a_new_mac_only_once_it_is_free():
    server = make_server()
    client_id = [("client_id", b"\xff\x00\x00\x00\x01\x00\x02\xaa\xbb")]
    assert dora(server, mac(1), client_id)[BOOTP].yiaddr == "10.77.0.2"
    # Same identifier from another MAC while the lease runs: another address.
    assert dora(server, mac(2), client_id)[BOOTP].yiaddr == "10.77.0.3"
    server.handle(client_frame(mac(1), "release", client_id, ciaddr="10.77.0.2"))
    server.handle(client_frame(mac(2), "release", client_id, ciaddr="10.77.0.3"))
    # The VM comes back with a third MAC: the identifier finds an address it had.
    assert dora(server, mac(3), client_id)[BOOTP].yiaddr in ("10.77.0.2", "10.77.0.3")


def test_firmware_then_os_on_one_mac_keep_one_address():
    server = make_server()
    pxe = dora(server, mac(1), [("client_id", b"\x01" + mac(1))])
    os_ = dora(server, mac(1), [("client_id", b"\xff\x01\x02\x03\x04\x00\x04" + bytes(16))])
    assert pxe[BOOTP].yiaddr == os_[BOOTP].yiaddr
    assert len(server.leases) == 1


def test_callbacks_report_grants_renewals_and_expiry():
    clock = Clock()
    server = make_server(clock)
    granted, released = [], []
    server.on_lease, server.on_release = granted.append, released.append
    dora(server, mac(1))
    server.handle(client_frame(mac(1), "request", ciaddr="10.77.0.2"))
    assert [lease.ip for lease in granted] == [ip(2), ip(2)]
    clock.now += 3601
    server.expire(clock.now)
    assert [lease.mac for lease in released] == [mac(1)]
    server.expire(clock.now)  # once only
    assert len(released) == 1


# --- Expiry -------------------------------------------------------------------------------


def test_expiry_frees_the_address_for_others_and_remembers_it_for_its_client():
    clock = Clock()
    server = make_server(clock, pool=(ip(2), ip(2)))
    dora(server, mac(1))
    assert server.handle(client_frame(mac(2), "discover")) == []
    clock.now += 3599
    server.expire(clock.now)
    assert server.lease_for_ip(ip(2)).mac == mac(1)
    clock.now += 2
    server.expire(clock.now)
    assert server.leases == {} and server.lease_for_ip(ip(2)) is None
    assert dora(server, mac(1))[BOOTP].yiaddr == "10.77.0.2"  # remembered
    clock.now += 3601
    assert server.handle(client_frame(mac(2), "discover")) == []  # until the timed work runs
    server.expire(clock.now)
    assert dora(server, mac(2))[BOOTP].yiaddr == "10.77.0.2"
    assert server.counters["expired"] == 2


def test_renewal_after_expiry_of_a_taken_address_is_naked():
    clock = Clock()
    server = make_server(clock, pool=(ip(2), ip(2)))
    dora(server, mac(1))
    clock.now += 3601
    server.expire(clock.now)
    dora(server, mac(2))
    nak = one(server.handle(client_frame(mac(1), "request", ciaddr="10.77.0.2")))
    assert options_of(nak)["error_message"] == b"taken"


# --- Persistence --------------------------------------------------------------------------


def test_restart_with_state_file_keeps_leases(tmp_path):
    clock = Clock()
    state = tmp_path / "leases.json"
    server = make_server(clock, state_path=state)
    dora(server, mac(1), [("hostname", b"vm-one")])
    dora(server, mac(2), [("client_id", b"\x01" + mac(2))])
    dora(server, mac(3))
    exchange(server, client_frame(mac(3), "release", ciaddr="10.77.0.4"))
    document = json.loads(state.read_text())
    assert document["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leases.json"]  # no temp files

    clock.now += 100
    restarted = make_server(clock, state_path=state)
    assert set(restarted.leases) == {mac(1), mac(2)}
    first = restarted.leases[mac(1)]
    assert first.ip == ip(2) and first.hostname == "vm-one"
    assert first.expires >= server.leases[mac(1)].expires
    assert restarted.leases[mac(2)].client_id == b"\x01" + mac(2)
    # A newcomer does not get a leased address; the old clients keep theirs.
    assert dora(restarted, mac(4))[BOOTP].yiaddr == "10.77.0.5"
    renew = one(exchange(restarted, client_frame(mac(1), "request", ciaddr="10.77.0.2")))
    assert options_of(renew)["message-type"] == 5
    assert dora(restarted, mac(3))[BOOTP].yiaddr == "10.77.0.4"  # remembered across restart


def test_lease_that_ran_out_while_down_is_not_running_after_restart(tmp_path):
    clock = Clock()
    state = tmp_path / "leases.json"
    dora(make_server(clock, state_path=state), mac(1))
    clock.now += 3600 + PERSIST_SLACK_SECONDS + 1
    restarted = make_server(clock, state_path=state)
    assert restarted.leases == {}
    assert dora(restarted, mac(1))[BOOTP].yiaddr == "10.77.0.2"


def test_request_flood_does_not_write_per_frame_and_restart_still_covers_the_lease(tmp_path):
    clock = Clock()
    state = tmp_path / "leases.json"
    server = make_server(clock, state_path=state)
    writes = []
    server.on_dirty = lambda: writes.append(clock.now)
    dora(server, mac(1))
    assert len(writes) == 1
    for _ in range(100):
        clock.now += 0.5
        one(exchange(server, client_frame(mac(1), "request", ciaddr="10.77.0.2")))
    assert len(writes) == 1
    clock.now += 20
    one(exchange(server, client_frame(mac(1), "request", ciaddr="10.77.0.2")))
    assert len(writes) == 2
    clock.now += 59
    one(exchange(server, client_frame(mac(1), "request", ciaddr="10.77.0.2")))
    given_until = server.leases[mac(1)].expires
    assert make_server(clock, state_path=state).leases[mac(1)].expires >= given_until


def test_grants_and_declines_write_nothing_in_handle_and_ack_only_once_written(
    tmp_path, monkeypatch
):
    """A burst of grants and declines: handle() never touches the disk; the ACKs wait for
    the shell's one write of the batch, and what it wrote is what a restart sees."""
    clock = Clock()
    state = tmp_path / "leases.json"
    monkeypatch.setattr(store_module, "write_atomically",
                        lambda path, data: pytest.fail("handle() wrote the state file"))
    server = make_server(clock, state_path=state)
    dirty = []
    server.on_dirty = lambda: dirty.append(1)
    for n in range(1, 11):
        offer = one(server.handle(client_frame(mac(n), "discover")))
        assert server.handle(client_frame(mac(n), "request", [
            ("requested_addr", offer[BOOTP].yiaddr), ("server_id", str(GATEWAY))])) == []
    assert server.handle(client_frame(mac(1), "decline", [("requested_addr", "10.77.0.2")])) \
        == []
    assert server.dirty and len(dirty) == 11 and not state.exists()
    monkeypatch.undo()
    job = server.write_job()
    acks = [check_reply(a) for a in server.persisted(job, write_state(job))]
    assert sorted(a[BOOTP].chaddr[:6] for a in acks) == [mac(n) for n in range(2, 11)]
    assert not server.dirty
    restarted = make_server(clock, state_path=state)
    assert set(restarted.leases) == {mac(n) for n in range(2, 11)}
    nak = one(restarted.handle(client_frame(mac(11), "request", [("requested_addr", "10.77.0.2")])))
    assert options_of(nak)["error_message"] == b"declined"


def test_the_server_touches_no_file_from_restore_to_acks(tmp_path):
    """Sans-I/O: with every way to open, write, rename or sync a file refused, a server
    restores what the store read, serves a DORA, expires, and hands out a write job; only
    the store's write_state (the shell's worker thread) touches the disk."""
    clock = Clock()
    state = tmp_path / "leases.json"
    dora(make_server(clock, state_path=state), mac(1))
    stored = read_state(state)

    def refuse(*args, **kwargs):
        pytest.fail(f"the server touched a file: {args!r}")

    with pytest.MonkeyPatch.context() as files:
        for name in ("open", "replace", "rename", "fsync", "unlink", "link", "mkdir"):
            files.setattr(os, name, refuse)
        files.setattr("builtins.open", refuse)
        files.setattr(Path, "read_bytes", refuse)
        config = DhcpConfig(subnet=SUBNET, gateway=GATEWAY, server_mac=SERVER_MAC,
                            state_path=state)
        server = DhcpServer(config, clock=clock, stored=stored)
        assert set(server.leases) == {mac(1)}
        offer = one(server.handle(client_frame(mac(2), "discover")))
        assert server.handle(client_frame(mac(2), "request", [
            ("requested_addr", offer[BOOTP].yiaddr), ("server_id", str(GATEWAY))])) == []
        clock.now += 10
        server.expire(clock.now)
        job = server.write_job()
    assert options_of(one(server.persisted(job, write_state(job))))["message-type"] == 5
    assert {lease.mac for lease in read_state(state).leases} == {mac(1), mac(2)}


def test_grant_that_cannot_be_written_is_not_acked_until_a_write_succeeds(tmp_path):
    directory = tmp_path / "not-yet"
    server = make_server(state_path=directory / "leases.json")
    offer = one(server.handle(client_frame(mac(1), "discover")))
    assert server.handle(client_frame(mac(1), "request", [
        ("requested_addr", offer[BOOTP].yiaddr), ("server_id", str(GATEWAY))])) == []
    job = server.write_job()
    with pytest.raises(OSError) as error:
        write_state(job)
    server.persist_failed(job, error.value)
    assert server.counters["persist_failed"] == 1 and server.counters["ack"] == 0
    assert server.dirty  # the shell tries again
    # The address stays with the client (the safe side), and nobody else is offered it.
    assert one(server.handle(client_frame(mac(2), "discover")))[BOOTP].yiaddr != offer[BOOTP].yiaddr
    directory.mkdir()
    assert options_of(one(persist(server)))["message-type"] == 5
    assert server.counters["ack"] == 1


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00garbage", b"[]", b'{"version": 99, "leases": []}',
     b'{"version": 1}', b'{"version": 1, "leases": {}}', b""],
)
def test_corrupt_state_file_is_set_aside_and_server_starts_empty(tmp_path, content, caplog):
    state = tmp_path / "leases.json"
    state.write_bytes(content)
    server = make_server(state_path=state)
    assert server.leases == {}
    assert server.counters["state_corrupt"] == 1
    assert (tmp_path / "leases.json.corrupt").read_bytes() == content
    assert not state.exists()
    assert "leases.json" in caplog.text
    dora(server, mac(1))
    assert json.loads(state.read_text())["version"] == 1


def test_second_corruption_does_not_overwrite_the_first(tmp_path):
    state = tmp_path / "leases.json"
    state.write_bytes(b"first")
    make_server(state_path=state)
    state.write_bytes(b"second")
    make_server(state_path=state)
    assert (tmp_path / "leases.json.corrupt").read_bytes() == b"first"
    assert (tmp_path / "leases.json.corrupt.1").read_bytes() == b"second"


def test_bad_entries_are_skipped_and_the_rest_kept(tmp_path):
    clock = Clock()
    state = tmp_path / "leases.json"
    good = {"mac": "52:54:00:12:34:01", "ip": "10.77.0.2", "expires": clock.now + 100,
            "hostname": "ok", "client_id": None}
    entries = [
        good,
        {**good, "mac": "52:54:00:12:34:02", "ip": "10.99.0.2"},  # another subnet
        {**good, "mac": "nonsense"},
        {**good, "mac": "52:54:00:12:34:03", "ip": "10.77.0.2"},  # duplicate address
        {**good, "mac": "52:54:00:12:34:04", "ip": "10.77.0.4", "expires": "soon"},
        {**good, "mac": "52:54:00:12:34:05", "ip": "10.77.0.5", "hostname": "a\nb"},
        "not an object",
    ]
    state.write_text(json.dumps({"version": 1, "leases": entries}))
    server = make_server(clock, state_path=state)
    assert list(server.leases) == [mac(1)]
    assert server.counters["state_entry_skipped"] == 6
    assert not (tmp_path / "leases.json.corrupt").exists()



def test_entries_of_the_wrong_json_type_or_beyond_a_float_are_skipped_not_raised(tmp_path):
    """A lease file is read before the hub serves anyone: an entry whose MAC is not a string,
    or whose time does not fit a float or is infinite (a lease that would never end), is one
    bad entry, skipped like the others -- it may not stop the hub from starting."""
    clock = Clock()
    state = tmp_path / "leases.json"
    good = {"mac": "52:54:00:12:34:01", "ip": "10.77.0.2", "expires": clock.now + 100,
            "hostname": "ok", "client_id": None}
    huge = "1" + "0" * 400  # valid JSON; too large for a float
    entries = [
        json.dumps(good),
        json.dumps({**good, "mac": 5, "ip": "10.77.0.3"}),
        json.dumps({**good, "mac": ["52:54:00:12:34:02"], "ip": "10.77.0.3"}),
        json.dumps({**good, "mac": "52:54:00:12:34:04", "ip": "10.77.0.4"})
        .replace(str(good["expires"]), huge),
        json.dumps({**good, "mac": "52:54:00:12:34:05", "ip": "10.77.0.5", "expires": 1e999}),
    ]
    declined = f'[{{"ip": "10.77.0.9", "until": {huge}}}, {{"ip": "10.77.0.8", "until": 1e999}}]'
    state.write_text(f'{{"version": 1, "leases": [{",".join(entries)}], "declined": {declined}}}')
    stored = read_state(state)
    assert [lease.mac for lease in stored.leases] == [mac(1)]
    assert stored.skipped == 4 and stored.declined == () and not stored.corrupt
    server = make_server(clock, state_path=state)
    assert list(server.leases) == [mac(1)]
    assert server.counters["state_entry_skipped"] == 4

# --- Frames we refuse ---------------------------------------------------------------------


def refused(server: DhcpServer, frame: bytes, reason: str) -> None:
    assert server.handle(frame) == []
    assert server.counters[reason] == 1, server.counters
    assert server.leases == {}


def test_chaddr_not_matching_the_ethernet_source_is_dropped():
    server = make_server()
    refused(server, client_frame(mac(1), "discover", chaddr=mac(2)), "chaddr_mismatch")
    frame = client_frame(mac(1), "request", [("requested_addr", "10.77.0.9")], chaddr=mac(2))
    assert server.handle(frame) == [] and server.counters["chaddr_mismatch"] == 2


def test_relayed_request_is_dropped():
    refused(make_server(), client_frame(mac(1), "discover", giaddr="10.1.1.1"), "relayed")


def test_group_source_mac_is_dropped():
    m = bytes.fromhex("0300000000aa")
    refused(make_server(), client_frame(m, "discover"), "bad_mac")


def test_frame_not_addressed_to_us_is_dropped():
    server = make_server()
    refused(server, client_frame(mac(1), "discover", dst_ip="10.77.0.99"), "not_for_us")
    assert server.handle(client_frame(mac(1), "discover", dst_mac=mac(7))) == []


def with_bootp(frame: bytes, offset: int, value: bytes) -> bytes:
    """`frame` with BOOTP bytes replaced at `offset` (checksums left as they are: the UDP
    checksum is not checked, and BOOTP lies outside the IP header)."""
    at = 14 + 20 + 8 + offset
    return frame[:at] + value + frame[at + len(value):]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: with_bootp(f, 0, b"\x02"), "not_request"),
        (lambda f: with_bootp(f, 1, b"\x06"), "not_ethernet"),
        (lambda f: with_bootp(f, 2, b"\x10"), "not_ethernet"),
        (lambda f: with_bootp(f, 236, b"\x00\x00\x00\x00"), "no_cookie"),
        (lambda f: f[:14 + 20 + 8 + 200], "malformed"),  # IP/UDP lengths now lie
        (lambda f: f[:30], "malformed"),
        (lambda f: f[:24] + b"\x00\x00" + f[26:], "bad_checksum"),
        (lambda f: f[:20] + b"\x20\x00" + f[22:], "bad_checksum"),  # MF set, sum stale
        (lambda f: f[:12] + b"\x86\xdd" + f[14:], "not_for_us"),
    ],
)
def test_broken_frames_are_dropped_and_counted(mutate, reason):
    refused(make_server(), mutate(client_frame(mac(1), "discover")), reason)


def raw_frame(bootp: bytes, *, src: bytes = mac(1), frag: int = 0) -> bytes:
    """Ethernet/IPv4/UDP around `bootp`, with correct lengths and IP checksum."""
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, frag, 64, 17, 0,
                         bytes(4), b"\xff" * 4)
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return BROADCAST_MAC + src + b"\x08\x00" + header + udp


def bootp(options: bytes, *, chaddr: bytes = mac(1), sname: bytes = b"",
          file: bytes = b"") -> bytes:
    return (struct.pack("!BBBBIHHIIII", 1, 1, 6, 0, 7, 0, 0, 0, 0, 0, 0)
            + chaddr.ljust(16, b"\x00") + sname.ljust(64, b"\x00") + file.ljust(128, b"\x00")
            + b"\x63\x82\x53\x63" + options)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (b"\x35", "bad_option"),  # a code and nothing else
        (b"\x35\x01", "bad_option"),  # length runs past the end
        (b"\x35\x01\x01\x0c\x20ab\xff", "bad_option"),  # dpkt would swallow the END
        (b"\x35\x02\x01\x01\xff", "bad_option"),  # message type of 2 bytes
        (b"\x35\x01\x01\x32\x03\x0a\x00\x00\xff", "bad_option"),  # requested IP of 3 bytes
        (b"\x35\x01\x01\x3d\x01\x01\xff", "bad_option"),  # client id of 1 byte
        (b"\x35\x01\x01\x34\x01\x07\xff", "bad_option"),  # overload 7
        (b"\x0c\x03abc\xff", "bootp"),  # no message type
        (b"\x35\x01\x02\xff", "bad_message_type"),  # an OFFER from a client
        (b"\x35\x01\x09\xff", "bad_message_type"),
    ],
)
def test_broken_options_are_dropped_and_counted(options, reason):
    refused(make_server(), raw_frame(bootp(options)), reason)


def test_ip_fragment_is_dropped():
    frame = raw_frame(bootp(b"\x35\x01\x01\xff"), frag=0x2000)
    refused(make_server(), frame, "fragment")


def test_options_overloaded_into_file_and_sname_are_read():
    options = b"\x35\x01\x01\x34\x01\x03\xff"
    file = b"\x0c\x04" + b"over" + b"\xff"
    sname = b"\x37\x02\x1a\x01\xff"  # parameter request list: MTU, mask
    offer = one(make_server().handle(raw_frame(bootp(options, file=file, sname=sname))))
    assert options_of(offer)["hostname"] == b"over"
    codes = option_codes(offer)
    assert codes.index(26) < codes.index(6)  # MTU was asked for, DNS was not


def test_split_option_is_concatenated():
    options = b"\x35\x01\x01\x0c\x03abc\x0c\x03def\xff"
    offer = one(make_server().handle(raw_frame(bootp(options))))
    assert options_of(offer)["hostname"] == b"abcdef"


def test_hostname_that_is_not_a_host_name_is_not_kept():
    server = make_server()
    ack = dora(server, mac(1), [("hostname", b"evil\nlog line")])
    assert "hostname" not in options_of(ack)
    assert server.leases[mac(1)].hostname is None


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="not a host address"):
        DhcpConfig(subnet=SUBNET, gateway=IPv4Address("10.88.0.1"), server_mac=SERVER_MAC)
    with pytest.raises(ValueError, match="6 bytes"):
        DhcpConfig(subnet=SUBNET, gateway=GATEWAY, server_mac=b"\x02")
    with pytest.raises(ValueError, match="pool"):
        DhcpConfig(subnet=SUBNET, gateway=GATEWAY, server_mac=SERVER_MAC, pool=(ip(9), ip(3)))
    with pytest.raises(ValueError, match="reservation"):
        DhcpConfig(subnet=SUBNET, gateway=GATEWAY, server_mac=SERVER_MAC,
                   reservations={mac(1): IPv4Address("10.1.0.5")})
    config = DhcpConfig(subnet="10.5.0.0/24", gateway="10.5.0.254", server_mac=SERVER_MAC)
    assert config.pool == (IPv4Address("10.5.0.1"), IPv4Address("10.5.0.253"))


# --- What one client may make the server do --------------------------------------------------


def test_messages_beyond_a_clients_rate_are_ignored_and_counted_unicast_included():
    clock = Clock()
    server = make_server(clock)
    dora(server, mac(1))
    renew = client_frame(mac(1), "request", ciaddr="10.77.0.2", src_ip="10.77.0.2",
                         dst_ip=str(GATEWAY), dst_mac=SERVER_MAC)
    answered = sum(len(server.handle(renew)) for _ in range(40))
    assert answered == RATE_BURST - 2  # the DORA took two tokens
    assert server.counters["rate_limited"] == 40 - answered
    clock.now += 1.0
    assert sum(len(server.handle(renew)) for _ in range(40)) == RATE_PER_SECOND
    # Another client is not affected.
    assert dora(server, mac(2))[BOOTP].yiaddr == "10.77.0.3"


def test_macs_behind_one_port_share_its_rate_budget():
    server = make_server()
    server.port_of = lambda m: "port-a" if m != mac(99) else None
    offers = sum(len(server.handle(client_frame(mac(n % 8 + 1), "discover")))
                 for n in range(40))
    assert offers == RATE_BURST
    assert server.counters["rate_limited"] == 40 - RATE_BURST
    assert one(server.handle(client_frame(mac(99), "discover")))  # on no known port: its own


def decline_cycle(server: DhcpServer, m: bytes) -> list[bytes]:
    offer = one(server.handle(client_frame(m, "discover")))
    return server.handle(client_frame(m, "decline", [
        ("requested_addr", offer[BOOTP].yiaddr), ("server_id", str(GATEWAY))]))


def test_declines_beyond_a_ports_budget_are_ignored_and_rested_addresses_come_back():
    """The measured attack: DISCOVER/DECLINE pairs from one MAC, within the rate limit.  The
    port rests DECLINE_BUDGET addresses per window, not the pool."""
    clock = Clock()
    server = make_server(clock)
    for _ in range(100):
        clock.now += 1.0
        decline_cycle(server, mac(1))
    assert server.counters["decline_over_budget"] == 100 - DECLINE_BUDGET
    # Rested: the budget's addresses; offered to mac(1), whose DECLINE was ignored: one more.
    offer = one(server.handle(client_frame(mac(2), "discover")))
    assert offer[BOOTP].yiaddr == str(ip(2 + DECLINE_BUDGET + 1))
    clock.now += max(DECLINE_WINDOW_SECONDS, DECLINE_HOLD_SECONDS)
    server.expire(clock.now)
    assert one(server.handle(client_frame(mac(3), "discover")))[BOOTP].yiaddr == "10.77.0.2"
    decline_cycle(server, mac(1))  # a new window: one more DECLINE counts
    assert server.counters["decline_over_budget"] == 100 - DECLINE_BUDGET


def test_discover_on_an_exhausted_pool_does_not_walk_the_pool(tmp_path, monkeypatch):
    """A /20 pool fully leased (from the state file): a DISCOVER looks at a handful of
    addresses, not at every address of the pool, and expires nothing by itself."""
    clock = Clock()
    subnet = IPv4Network("10.80.0.0/20")
    hosts = list(subnet.hosts())[1:]
    state = tmp_path / "leases.json"
    state.write_text(json.dumps({"version": 1, "leases": [
        {"mac": (0x020000000000 + n).to_bytes(6, "big").hex(":"), "ip": str(address),
         "expires": clock.now + 3600, "hostname": None, "client_id": None}
        for n, address in enumerate(hosts)]}))
    server = make_server(clock, subnet=subnet, gateway=next(subnet.hosts()), state_path=state,
                         dns=())
    assert len(server.leases) == len(hosts)
    built = []
    real = IPv4Address
    for module in (codec_module, leases_module, server_module):  # where handle() makes them
        monkeypatch.setattr(module, "IPv4Address", lambda *a: built.append(1) or real(*a))
    monkeypatch.setattr(server, "expire", lambda now=None: pytest.fail("expire() per frame"))
    assert server.handle(client_frame(mac(1), "discover", dst_ip=BROADCAST_IP)) == []
    assert server.counters["pool_exhausted"] == 1
    assert len(built) < 20


def test_every_table_a_client_can_grow_is_bounded(monkeypatch):
    """Offers, rested addresses and budgets have named limits: a flood from many MACs on
    many ports leaves each table at its limit, and the server still serves."""
    for module, name, limit in ((leases_module, "MAX_OFFERS", 16),
                                (leases_module, "MAX_DECLINED", 8),
                                (server_module, "MAX_CLIENTS_TRACKED", 32)):
        monkeypatch.setattr(module, name, limit)
    clock = Clock()
    server = make_server(clock, subnet=IPv4Network("10.77.0.0/22"), pool=None)
    server.port_of = lambda m: m[5] % 50  # 50 ports
    macs = [bytes([0x52, 0x54, 0, 0, n >> 8, n & 0xFF]) for n in range(500)]
    for m in macs:
        clock.now += 0.01
        decline_cycle(server, m)
        server.handle(client_frame(m, "discover"))
    sizes = server.table_sizes()
    assert sizes["offers"] == 16 and sizes["declined"] == 8 and sizes["budgets"] == 32
    assert server.counters["offer_evicted"] > 0 and server.counters["decline_table_full"] > 0
    clock.now += 10
    assert dora(server, mac(1))[BOOTP].yiaddr  # still serving


# The reasons a frame may be ignored for: anything else is a bug.
IGNORE_REASONS = {"rate_limited", "malformed", "not_for_us", "bad_checksum", "fragment",
                  "not_request", "not_ethernet", "no_cookie", "bootp", "bad_message_type",
                  "bad_option", "bad_mac", "chaddr_mismatch", "relayed"}
# Two seconds in the default run; VHOSTVPN_FUZZ_SECONDS in `make fuzz`'s long run.
FUZZ_SECONDS = fuzzing.SECONDS or 2.0
OPTION_CODES = [0, 1, 3, 12, 50, 51, 52, 53, 54, 55, 57, 61, 255]


def option_soup(rng: random.Random) -> bytes:
    """Options as a hostile client writes them: known codes with any length and contents,
    overload, split options, PAD and END anywhere, and sometimes a dangling length."""
    soup = bytearray()
    for _ in range(rng.randrange(12)):
        code = rng.choice(OPTION_CODES) if rng.random() < 0.8 else rng.randrange(256)
        if code in (0, 255):
            soup.append(code)
            continue
        size = rng.choice([0, 1, 2, 4, 6, rng.randrange(256)])
        value = bytes(rng.randrange(256) for _ in range(min(size, 40)))
        if code == 53 and rng.random() < 0.7:
            value, size = bytes([rng.randrange(1, 9)]), 1
        soup += bytes([code, size]) + value
    return bytes(soup)


def test_option_soups_and_truncated_bootp_are_only_ever_ignored_and_counted():
    """A bounded fuzzer (FUZZ_SECONDS, seeded): option soups in the main area, `file` and
    `sname`; truncations anywhere in BOOTP; every frame gets a well-formed reply or an
    ignore counted under a known reason, never an exception."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    clock = Clock()
    server = make_server(clock, pool=(ip(2), ip(40)))
    stop, runs = time.monotonic() + FUZZ_SECONDS, 0
    while time.monotonic() < stop:
        runs += 1
        clock.now += rng.choice([0.0, 0.3, 5.0])
        options = option_soup(rng)
        if rng.random() < 0.8:
            options = b"\x35\x01" + bytes([rng.randrange(1, 9)]) + options
        message = bootp(options, chaddr=mac(rng.randrange(1, 20)),
                        sname=option_soup(rng)[:64], file=option_soup(rng)[:128])
        if rng.random() < 0.3:
            message = message[: rng.randrange(len(message) + 1)]
        frame = raw_frame(message, src=mac(rng.randrange(1, 20)))
        before = server.counters.copy()
        try:
            replies = server.handle(frame)
        except Exception as error:
            raise AssertionError(f"seed {seed}, run {runs}: {frame.hex()}") from error
        assert_well_formed(server, replies)
        if not replies:
            changed = {k for k in server.counters if server.counters[k] != before[k]}
            assert changed & (IGNORE_REASONS | set(server_module.CLIENT_MESSAGE_NAMES.values())), (
                f"seed {seed}: ignored without a count: {frame.hex()}")
        if runs % 100 == 0:
            server.expire(clock.now)
    assert runs > 100


# --- Hostile input, at random -------------------------------------------------------------

VALID_FRAMES = [
    client_frame(mac(1), "discover", CLIENTS["udhcpc"](mac(1))),
    client_frame(mac(1), "request", [("requested_addr", "10.77.0.2"),
                                     ("server_id", str(GATEWAY)), *CLIENTS["windows"](mac(1))]),
    client_frame(mac(1), "request", ciaddr="10.77.0.2"),
    client_frame(mac(1), "inform", ciaddr="10.77.0.2"),
    client_frame(mac(1), "decline", [("requested_addr", "10.77.0.2")]),
    client_frame(mac(1), "release", ciaddr="10.77.0.2"),
]


def assert_well_formed(server: DhcpServer, replies: list[bytes]) -> None:
    assert isinstance(replies, list) and len(replies) <= 1
    for reply in replies:
        assert isinstance(reply, bytes)
        check_reply(reply)
    ips = [lease.ip for lease in server.leases.values()]
    assert len(ips) == len(set(ips))


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=700))
def test_random_bytes_never_raise(data):
    server = make_server()
    assert_well_formed(server, server.handle(data))


@FUZZ
@given(st.sampled_from(VALID_FRAMES), st.lists(st.tuples(st.integers(0, 699),
                                                         st.integers(0, 255)), max_size=8),
       st.integers(0, 700))
def test_mutated_frames_never_raise_nor_reply_malformed(frame, flips, cut):
    """Byte flips anywhere, then a cut; IP checksum fixed up so the flips reach BOOTP."""
    data = bytearray(frame)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    data = bytes(data[: max(cut, 34)])
    if len(data) >= 34 and data[14] & 0xF0 == 0x40:
        header = bytearray(data[14:34])
        header[10:12] = b"\x00\x00"
        header[10:12] = struct.pack("!H", internet_checksum(bytes(header)))
        data = data[:14] + bytes(header) + data[34:]
    server = make_server()
    server.handle(VALID_FRAMES[0])
    assert_well_formed(server, server.handle(data))


option_bytes = st.lists(
    st.tuples(st.integers(1, 254), st.binary(max_size=40)).map(
        lambda t: bytes([t[0], len(t[1])]) + t[1]),
    max_size=12,
).map(b"".join)


@FUZZ
@given(st.integers(1, 8), option_bytes, st.binary(max_size=6), st.booleans())
def test_random_options_in_valid_frames_never_raise(msg_type, options, tail, end):
    data = b"\x35\x01" + bytes([msg_type]) + options + (b"\xff" if end else b"") + tail
    server = make_server()
    assert_well_formed(server, server.handle(raw_frame(bootp(data))))


# A small pool and a few clients doing anything, in any order, with restarts: no address is
# ever held by two MACs, and what the table says agrees with itself.
ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["discover", "select", "init-reboot", "renew", "release", "decline",
                         "expire", "restart", "tick"]),
        st.integers(1, 5),  # client
        st.integers(2, 6),  # an address to ask for
        st.booleans(),  # with a client identifier shared by clients 1 and 2
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ACTIONS)
def test_no_address_is_ever_held_by_two_macs(tmp_path_factory, actions):
    clock = Clock()
    state: Path = tmp_path_factory.mktemp("dhcp") / "leases.json"
    server = make_server(clock, state_path=state, pool=(ip(2), ip(5)),
                         reservations={mac(5): ip(6)})
    bound: dict[IPv4Address, bytes] = {}

    def on_lease(lease: Lease) -> None:
        assert bound.get(lease.ip, lease.mac) == lease.mac, "address bound to two MACs"
        for other_ip in [a for a, m in bound.items() if m == lease.mac]:
            del bound[other_ip]
        bound[lease.ip] = lease.mac

    def on_release(lease: Lease) -> None:
        assert bound.pop(lease.ip) == lease.mac

    def hook(s: DhcpServer) -> None:
        s.on_lease, s.on_release = on_lease, on_release

    hook(server)
    for action, n, last, shared_id in actions:
        clock.now += 1  # within every client's rate budget
        m, wanted = mac(n), str(ip(last))
        extra = [("client_id", b"\x01shared")] if shared_id and n <= 2 else []
        if action == "discover":
            frames = [client_frame(m, "discover", extra)]
        elif action == "select":
            frames = [client_frame(m, "request", [("requested_addr", wanted),
                                                  ("server_id", str(GATEWAY)), *extra])]
        elif action == "init-reboot":
            frames = [client_frame(m, "request", [("requested_addr", wanted), *extra])]
        elif action == "renew":
            frames = [client_frame(m, "request", extra, ciaddr=wanted)]
        elif action == "release":
            frames = [client_frame(m, "release", extra, ciaddr=wanted)]
        elif action == "decline":
            frames = [client_frame(m, "decline", [("requested_addr", wanted), *extra])]
        elif action == "expire":
            clock.now += 4000
            server.expire(clock.now)
            frames = []
        elif action == "tick":
            clock.now += 700
            frames = []
        else:  # restart: the switch forgets nothing, the server reloads
            server = make_server(clock, state_path=state, pool=(ip(2), ip(5)),
                                 reservations={mac(5): ip(6)})
            hook(server)
            bound = {lease.ip: lease.mac for lease in server.leases.values()}
            frames = []
        for frame in frames:
            assert_well_formed(server, exchange(server, frame))
        leases = server.leases
        assert {lease.ip: mac_ for mac_, lease in leases.items()} == bound or action == "tick"
        reloaded = make_server(clock, state_path=state, pool=(ip(2), ip(5)),
                               reservations={mac(5): ip(6)})
        for mac_, lease in reloaded.leases.items():  # the file never lets an address go early
            running = server.lease_for_ip(lease.ip)
            assert running is None or running.mac == mac_
        for lease in leases.values():  # every running lease is in the file (one that ran out
            if lease.expires > clock.now:  # waits for the next expire(), as in the hub's tick)
                assert reloaded.lease_for_ip(lease.ip).mac == lease.mac


# --- In the hub: the lease writer and per-port budgets -------------------------------------


async def test_hub_acks_once_the_lease_is_written_and_writes_again_at_shutdown(
    tmp_path, monkeypatch
):
    """The shell writes the lease before the guest sees its ACK; a release the periodic
    writer has not got to yet (its period is an hour here) is written at shutdown."""
    monkeypatch.setattr(hub_module, "PERSIST_INTERVAL_SECONDS", 3600.0)
    config = HubConfig(sockets=[str(tmp_path / "dhcp-vm.sock")], state_dir=tmp_path,
                       subnet=SUBNET)
    state = tmp_path / "leases-10.77.0.0_24.json"
    m = mac(1)
    async with hub_with_guests(config, 1) as (hub, [fe]):
        offer = await guest_exchange(fe, Ether(client_frame(m, "discover")), "DHCP")
        ack = await guest_exchange(fe, Ether(client_frame(m, "request", [
            ("requested_addr", offer[BOOTP].yiaddr), ("server_id", str(GATEWAY))])), "DHCP")
        assert options_of(ack)["message-type"] == 5
        on_disk = json.loads(state.read_text())["leases"]
        assert [(e["mac"], e["ip"]) for e in on_disk] == [("52:54:00:12:34:01", "10.77.0.2")]
        assert hub.dhcp.leases[m].ip == ip(2)
        fe.net.send([client_frame(m, "release", ciaddr="10.77.0.2")])
        fe.kick(1)
        with trio.fail_after(5):
            while hub.dhcp.counters["release"] == 0:
                await trio.sleep(0.01)
        assert hub.dhcp.dirty
    restarted = Hub(config)
    assert restarted.dhcp is not None and restarted.dhcp.leases == {}  # released
    assert restarted.dhcp.lease_for_ip(ip(2)) is None


async def test_hub_rate_limits_dhcp_per_port_whatever_the_source_mac(tmp_path):
    """48 DISCOVERs from 8 MACs behind one port: one bucket (per MAC, each would pass)."""
    config = HubConfig(sockets=[str(tmp_path / "dhcp-vm.sock")], state_dir=tmp_path,
                       subnet=SUBNET)
    async with hub_with_guests(config, 1) as (hub, [fe]):
        for burst in range(3):
            fe.net.send([client_frame(mac(n % 8 + 1), "discover", xid=burst * 16 + n)
                         for n in range(16)])
            fe.kick(1)
            with trio.fail_after(5):
                while sum(hub.dhcp.counters[k] for k in ("discover", "rate_limited")) \
                        < 16 * (burst + 1):
                    await trio.sleep(0.01)
    assert hub.dhcp.counters["rate_limited"] >= 48 - RATE_BURST - 4
    assert hub.dhcp.counters["discover"] <= RATE_BURST + 4
