"""The hub with --nat, driven by model guests: DHCP and router advertisements name the
gateway as router and DNS server with the NAT, no router without it; a guest's UDP to the
gateway's address reaches the hub host's loopback (--map-host-loopback) and the answer comes
back through the NAT and the switch; status shows the guest's flow under "nat", by port.  A
guest's caps are its port's: a vhost-user port with 16 MACs, a tunnel session with 256, is
held to one guest's flows while another port gets its own."""

import dataclasses
import ipaddress
import socket

import trio
from scapy.layers.dhcp import DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6ND_RS, ICMPv6NDOptRDNSS, IPv6
from scapy.layers.l2 import Ether

from tests.test_hub import GUEST_MAC, dhcp_discover, exchange, hub_with_guests
from tests.test_tunnel import Net, guest
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


PORT_MACS = [f"52:54:00:00:01:{n:02x}" for n in range(16)]  # a vhost-user port's MAC limit


async def send_all(fe, frames: list[bytes]) -> None:
    """Send `frames` from the guest, a ring's worth at a time, each batch taken before the
    next goes."""
    for start in range(0, len(frames), 32):
        batch = frames[start:start + 32]
        fe.net.send(batch)
        fe.kick(1)
        taken = 0
        with trio.fail_after(5):
            while taken < len(batch):
                await trio.sleep(0.01)
                taken += len(fe.net.reclaim_tx())


def routed(hub: Hub, src_mac: str, src: str, sport: int, dport: int, payload=b"x") -> bytes:
    gateway = ":".join(f"{b:02x}" for b in hub.gateway.mac)
    return bytes(Ether(src=src_mac, dst=gateway) / IP(src=src, dst="10.77.0.1")
                 / UDP(sport=sport, dport=dport) / payload)


async def test_one_port_with_sixteen_macs_is_held_to_one_guests_flows_another_gets_its_own(
        tmp_path):
    # 17 UDP flows from each of 16 MACs on one vhost-user port: 272, past one guest's 256
    # (each MAC far within it).  The port is the guest: 256 go through, 16 are refused, and
    # the guest on the other port still gets its flow.
    hub_config = config(tmp_path, nat=True, map_host_loopback=True)
    hub_config.sockets.append(str(tmp_path / "vm2.sock"))
    async with hub_with_guests(hub_config, 2) as (hub, [crowd, alone]):
        await send_all(crowd, [routed(hub, src_mac, f"10.77.0.{10 + n}", 40000 + flow, 9)
                               for n, src_mac in enumerate(PORT_MACS) for flow in range(17)])
        await send_all(alone, [routed(hub, GUEST_MAC, "10.77.0.100", 40000, 9)])
        alone_ip = ipaddress.ip_address("10.77.0.100").packed
        with trio.fail_after(5):
            while not any(key.guest_ip == alone_ip for key in hub.nat.udp.flows):
                await trio.sleep(0.01)
        status = hub.status()["nat"]
    ports = status["ports"]
    assert ports["vm.sock"]["flows"] == {"udp": 256}
    assert len(ports["vm.sock"]["macs"]) == 16
    assert sum(ports["vm.sock"]["macs"].values()) == 256
    assert ports["vm2.sock"]["flows"] == {"udp": 1}
    assert ports["vm2.sock"]["macs"] == {GUEST_MAC: 1}
    assert status["refusals"] == {"flow_limit": 272 - 256}


async def test_a_tunnel_session_with_256_macs_is_held_to_one_guests_flows(tmp_path):
    # An endpoint whose guest speaks for 256 MACs (a bridged LAN; `vm --no-port-policy`):
    # the hub sees one session port.  Two UDP flows from each MAC, 512 in all, each MAC far
    # within a guest's 256: the session is held to 256, the hub's own guest gets its flow.
    net = Net(tmp_path)
    hub_config = dataclasses.replace(
        net.hub_config(), state_dir=tmp_path, subnet=SUBNET, nat=True, map_host_loopback=True,
        dns_upstreams=[ipaddress.ip_address("127.0.0.1")])
    lan = [f"02:00:00:01:{n >> 8:02x}:{n & 0xFF:02x}" for n in range(256)]
    async with trio.open_nursery() as nursery:
        await net.start(nursery, hub_config, port_policy=False)
        hub = net.hub
        async with guest(tmp_path / "h.sock") as local, guest(tmp_path / "e.sock") as remote:
            await send_all(remote, [routed(hub, src_mac, "10.77.0.10", 40000 + 2 * n + flow, 9)
                                    for n, src_mac in enumerate(lan) for flow in range(2)])
            with trio.fail_after(10):
                while hub.nat.limits.refusals["flow_limit"] < 512 - 256:
                    await trio.sleep(0.01)
            await send_all(local, [routed(hub, GUEST_MAC, "10.77.0.100", 40000, 9)])
            with trio.fail_after(5):
                while len(hub.nat.udp.flows) < 257:
                    await trio.sleep(0.01)
            ports = hub.status()["nat"]["ports"]
        nursery.cancel_scope.cancel()
    assert ports["alice"]["flows"] == {"udp": 256}
    assert sum(ports["alice"]["macs"].values()) == 256
    assert ports["h.sock"]["flows"] == {"udp": 1}
    assert hub.nat.limits.refusals == {"flow_limit": 512 - 256}
