"""The hub with --nat, driven by model guests: DHCP and router advertisements name the
gateway as router and DNS server with the NAT, no router without it; a guest's UDP to the
gateway's address reaches the hub host's loopback (--map-host-loopback) and the answer comes
back through the NAT and the switch; status shows the guest's flow under "nat"."""

import ipaddress
import socket

import trio
from scapy.layers.dhcp import DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6ND_RS, ICMPv6NDOptRDNSS, IPv6
from scapy.layers.l2 import Ether

from tests.test_hub import GUEST_MAC, dhcp_discover, exchange, hub_with_guests
from tunnel.hub import Hub, HubConfig

SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
PREFIX = ipaddress.IPv6Network("fd77::/64")


def config(tmp_path, **kw) -> HubConfig:
    return HubConfig(sockets=[str(tmp_path / "vm.sock")], state_dir=tmp_path, subnet=SUBNET,
                     ipv6_prefix=PREFIX, dns_upstreams=[ipaddress.ip_address("127.0.0.1")]
                     if kw.get("nat") else [], **kw)


def router_solicitation() -> Ether:
    return (Ether(src=GUEST_MAC, dst="33:33:00:00:00:02")
            / IPv6(src="fe80::5054:ff:fe00:1", dst="ff02::2", hlim=255) / ICMPv6ND_RS())


async def offer_and_advertisement(hub_config: HubConfig) -> tuple[dict, Ether]:
    async with hub_with_guests(hub_config, 1) as (_, [fe]):
        offer = await exchange(fe, dhcp_discover(GUEST_MAC, 7), "DHCP")
        advert = await exchange(fe, router_solicitation(), "ICMPv6ND_RA")
    return dict(o for o in offer[DHCP].options if isinstance(o, tuple)), advert


async def test_with_nat_the_gateway_is_router_and_dns_server(tmp_path):
    options, advert = await offer_and_advertisement(config(tmp_path, nat=True))
    assert options["router"] == "10.77.0.1" and options["name_server"] == "10.77.0.1"
    assert advert[ICMPv6ND_RA].routerlifetime > 0
    assert advert[ICMPv6NDOptRDNSS].dns == ["fd77::1"]


async def test_with_nat_and_dns_the_named_servers_are_handed_out(tmp_path):
    hub_config = config(tmp_path, nat=True, dns=[ipaddress.ip_address("10.77.0.53"),
                                                 ipaddress.ip_address("fd77::53")])
    options, advert = await offer_and_advertisement(hub_config)
    assert options["router"] == "10.77.0.1" and options["name_server"] == "10.77.0.53"
    assert advert[ICMPv6NDOptRDNSS].dns == ["fd77::53"]


async def test_without_nat_no_default_route_is_advertised(tmp_path):
    options, advert = await offer_and_advertisement(config(tmp_path))
    assert "router" not in options and "name_server" not in options
    assert advert[ICMPv6ND_RA].routerlifetime == 0
    assert advert["ICMPv6NDOptPrefixInfo"].prefix == "fd77::"  # SLAAC still works
    assert not advert.haslayer(ICMPv6NDOptRDNSS)


def test_the_nat_serves_the_gateways_addresses_and_is_off_without_the_flag(tmp_path):
    hub = Hub(config(tmp_path, nat=True))
    assert hub.gateway.nat is hub.nat
    assert hub.nat.config.gateway_ips == frozenset(hub.gateway.addresses)
    assert hub.nat.config.gateway_mac == hub.gateway.mac
    assert Hub(config(tmp_path)).nat is None


async def test_a_guests_udp_reaches_the_host_loopback_and_its_answer_comes_back(tmp_path):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    hub_config = config(tmp_path, nat=True, map_host_loopback=True)
    request = (Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="10.77.0.5",
               dst="10.77.0.1") / UDP(sport=40000, dport=port) / b"hello")
    with server:
        async with hub_with_guests(hub_config, 1) as (hub, [fe]):
            request[Ether].dst = ":".join(f"{b:02x}" for b in hub.gateway.mac)

            async def echo() -> None:
                await trio.lowlevel.wait_readable(server)
                data, peer = server.recvfrom(2048)
                server.sendto(b"echo " + data, peer)

            async with trio.open_nursery() as nursery:
                server.setblocking(False)
                nursery.start_soon(echo)
                with trio.fail_after(5):
                    while True:
                        answer = await exchange(fe, request, "UDP")
                        if answer[IP].src == "10.77.0.1" and answer[UDP].sport == port:
                            break
            status = hub.status()
    assert bytes(answer[UDP].payload) == b"echo hello"
    assert answer[UDP].dport == 40000 and answer[IP].dst == "10.77.0.5"
    assert status["nat"]["ports"]["vm.sock"]["flows"] == {"udp": 1}
    assert status["nat"]["ports"]["vm.sock"]["macs"] == {GUEST_MAC: 1}
    assert status["nat"]["udp"]["flows"] == 1
    assert hub.gateway.resolve(ipaddress.ip_address("10.77.0.5").packed) == bytes.fromhex(
        GUEST_MAC.replace(":", ""))


def test_the_segments_own_networks_are_never_reached_through_the_nat(tmp_path):
    # Members are reached on the segment; a guest with a stale route through the gateway
    # must not reach them (or anything of those networks) from the hub host's sockets.
    deny = Hub(config(tmp_path, nat=True)).nat.config.deny
    assert deny.denies(ipaddress.ip_address("10.77.0.20").packed)
    assert deny.denies(ipaddress.ip_address("fd77::20").packed)
    assert not deny.denies(ipaddress.ip_address("10.78.0.20").packed)
