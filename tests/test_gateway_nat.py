"""The gateway port with a NAT behind it: what guests route through the gateway (or send to
its TCP/UDP services) reaches the NAT's `from_guests`, its own services (ARP, ND, RS, DHCP,
echo to its addresses) stay with it, the NAT's frames come out of the outbox; `resolve`
learns guests' MACs and asks for the ones it does not know, rate limited and bounded; the
router option and router lifetime follow `router`."""

import ipaddress

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import ARP, Ether

from netstack.frame import Frame
from netstack.gateway import port as gateway_port
from netstack.gateway.dhcp_config import DhcpConfig
from netstack.gateway.dhcp_server import DhcpServer
from netstack.gateway.port import GatewayConfig, GatewayPort
from netstack.neighbour import link_local_from_mac
from tests.support.clock import Clock

GW_MAC = "02:76:76:00:00:01"
GUEST = "52:54:00:00:00:01"
OTHER = "52:54:00:00:00:02"
GW = bytes.fromhex(GW_MAC.replace(":", ""))
CONFIG = GatewayConfig(mac=GW, ipv4=ipaddress.IPv4Interface("10.77.0.1/24"),
                       ipv6_prefix=ipaddress.IPv6Network("fd77::/64"), mtu=1400)
LINK_LOCAL = str(link_local_from_mac(GW))


class RecordingNat:
    """A NAT that keeps what it is given (the real one is tested in test_nat_shell*.py)."""

    def __init__(self, fail: bool = False) -> None:
        self.frames: list[Frame] = []
        self.fail = fail

    def from_guests(self, frames: list[Frame]) -> None:
        if self.fail:
            raise RuntimeError("a NAT bug")
        self.frames.extend(frames)


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def gateway(nat=None, config=CONFIG, dhcp=None, clock=None):
    return GatewayPort(config, dhcp=dhcp, clock=clock or Clock(100.0), nat=nat)


def send(gw, packet) -> list:
    gw.deliver([Frame(bytes(packet))])
    return [Ether(bytes(f.data)) for f in gw.take_outbox()]


def routed(payload, src="10.77.0.5", dst="93.184.216.34"):
    return Ether(src=GUEST, dst=GW_MAC) / IP(src=src, dst=dst) / payload


def test_frames_guests_route_through_the_gateway_reach_the_nat_untouched():
    nat = RecordingNat()
    gw = gateway(nat)
    packets = [routed(TCP(sport=40000, dport=80, flags="S")),
               routed(UDP(sport=5000, dport=53) / b"q", dst="10.77.0.1"),  # the gateway's DNS
               routed(TCP(sport=40001, dport=22, flags="S"), dst="10.77.0.1"),  # host loopback
               routed(UDP(sport=5000, dport=67) / b"x", dst="192.0.2.1"),  # port 67 elsewhere
               routed(ICMP(type=8), dst="192.0.2.1"),
               Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst="2001:db8::1")
               / TCP(sport=40000, dport=443, flags="S"),
               Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst="2001:db8::1")
               / ICMPv6EchoRequest(),
               Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst="fd77::1")
               / UDP(sport=5000, dport=53) / b"q"]
    for packet in packets:
        assert send(gw, packet) == []
    assert [bytes(f.data) for f in nat.frames] == [bytes(p) for p in packets]


def test_the_gateways_own_services_stay_with_it_when_a_nat_is_there():
    nat = RecordingNat()
    gw = gateway(nat)
    (arp,) = send(gw, Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff")
                  / ARP(op=1, hwsrc=GUEST, psrc="10.77.0.5", pdst="10.77.0.1"))
    (echo,) = send(gw, routed(ICMP(type=8, id=7) / b"ping", dst="10.77.0.1"))
    (na,) = send(gw, Ether(src=GUEST, dst="33:33:ff:00:00:01")
                 / IPv6(src="fd77::5", dst="ff02::1:ff00:1", hlim=255)
                 / ICMPv6ND_NS(tgt="fd77::1") / ICMPv6NDOptSrcLLAddr(lladdr=GUEST))
    (echo6,) = send(gw, Ether(src=GUEST, dst=GW_MAC) / IPv6(src="fd77::5", dst="fd77::1")
                    / ICMPv6EchoRequest(id=3))
    (ra,) = send(gw, Ether(src=GUEST, dst="33:33:00:00:00:02")
                 / IPv6(src="fe80::5", dst="ff02::2", hlim=255) / ICMPv6ND_RS())
    assert arp[ARP].op == 2 and echo[ICMP].type == 0 and ICMPv6ND_NA in na
    assert echo6[IPv6].src == "fd77::1" and ICMPv6ND_RA in ra
    send(gw, Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff")
         / IP(src="10.77.0.5", dst="10.77.0.255") / UDP(sport=1, dport=9))  # a broadcast
    assert nat.frames == []


def test_dhcp_to_the_gateway_stays_with_its_server_with_a_nat():
    class Dhcp:
        counters: dict = {}

        def __init__(self):
            self.frames = []

        def handle(self, frame):
            self.frames.append(frame)
            return []

    dhcp, nat = Dhcp(), RecordingNat()
    gw = gateway(nat, dhcp=dhcp)
    renew = routed(UDP(sport=68, dport=67) / BOOTP(op=1), dst="10.77.0.1")
    discover = Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff") \
        / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / BOOTP(op=1)
    send(gw, renew)
    send(gw, discover)
    assert dhcp.frames == [bytes(renew), bytes(discover)] and nat.frames == []


def test_without_a_nat_routed_frames_are_ignored_as_before():
    gw = gateway()
    assert send(gw, routed(TCP(sport=40000, dport=80, flags="S"))) == []
    assert gw.counters.as_dict()["drops"] == {}


def test_frames_the_nat_hands_back_wait_in_the_outbox_and_wake_the_shell():
    gw = gateway(RecordingNat())
    woken = []
    gw.on_ready = lambda: woken.append(True)
    frame = Frame(bytes(Ether(src=GW_MAC, dst=GUEST) / IP(src="93.184.216.34", dst="10.77.0.5")
                        / TCP(sport=80, dport=40000, flags="SA")))
    gw.to_guests([frame])
    assert gw.take_outbox() == [frame] and woken == [True]


def test_a_nat_that_raises_costs_its_batch_counted_never_the_port(caplog):
    gw = gateway(RecordingNat(fail=True))
    send(gw, routed(TCP(sport=40000, dport=80, flags="S")))
    (echo,) = send(gw, routed(ICMP(type=8, id=7), dst="10.77.0.1"))  # the port still serves
    assert gw.counters.as_dict()["drops"] == {"nat": 1}
    assert echo[ICMP].type == 0 and "a NAT bug" in caplog.text


# -- resolve ---------------------------------------------------------------------------------

def ip4(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_resolve_learns_the_source_of_routed_frames_and_dhcp_leases():
    gw = gateway(RecordingNat())
    send(gw, routed(UDP(sport=1, dport=2)))
    send(gw, Ether(src=OTHER, dst=GW_MAC) / IPv6(src="fd77::6", dst="2001:db8::1")
         / UDP(sport=1, dport=2))
    gw.learn(ip4("10.77.0.9"), mac("52:54:00:00:00:09"))
    assert gw.resolve(ip4("10.77.0.5")) == mac(GUEST)
    assert gw.resolve(ip4("fd77::6")) == mac(OTHER)
    assert gw.resolve(ip4("10.77.0.9")) == mac("52:54:00:00:00:09")
    assert gw.take_outbox() == []  # nothing asked


def test_resolve_asks_by_arp_once_a_second_and_learns_the_reply():
    clock = Clock(100.0)
    gw = gateway(RecordingNat(), clock=clock)
    assert gw.resolve(ip4("10.77.0.7")) is None
    (request,) = [Ether(bytes(f.data)) for f in gw.take_outbox()]
    assert request.dst == "ff:ff:ff:ff:ff:ff" and request[ARP].op == 1
    assert (request[ARP].psrc, request[ARP].pdst, request[ARP].hwsrc) == (
        "10.77.0.1", "10.77.0.7", GW_MAC)
    assert gw.resolve(ip4("10.77.0.7")) is None and gw.take_outbox() == []  # rate limited
    clock.now += gateway_port.RESOLVE_INTERVAL
    assert gw.resolve(ip4("10.77.0.7")) is None and len(gw.take_outbox()) == 1
    send(gw, Ether(src=OTHER, dst=GW_MAC)
         / ARP(op=2, hwsrc=OTHER, psrc="10.77.0.7", hwdst=GW_MAC, pdst="10.77.0.1"))
    assert gw.resolve(ip4("10.77.0.7")) == mac(OTHER)


def test_resolve_asks_by_neighbour_solicitation_and_learns_the_advertisement():
    gw = gateway(RecordingNat())
    assert gw.resolve(ip4("fd77::7")) is None
    (ns,) = [Ether(bytes(f.data)) for f in gw.take_outbox()]
    assert ns[IPv6].dst == "ff02::1:ff00:7" and ns[ICMPv6ND_NS].tgt == "fd77::7"
    assert ns[IPv6].src == "fd77::1" and ns[IPv6].hlim == 255
    send(gw, Ether(src=OTHER, dst=GW_MAC) / IPv6(src="fd77::7", dst="fd77::1", hlim=255)
         / ICMPv6ND_NA(tgt="fd77::7", S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=OTHER))
    assert gw.resolve(ip4("fd77::7")) == mac(OTHER)
    assert gw.resolve(ip4("fe80::99")) is None
    (ns,) = [Ether(bytes(f.data)) for f in gw.take_outbox()]
    assert ns[IPv6].src == LINK_LOCAL  # a link-local target is asked from link-local


def test_resolve_never_asks_for_addresses_off_the_segment():
    gw = gateway(RecordingNat())
    for address in ("192.0.2.1", "10.77.0.1", "10.77.0.255", "10.77.0.0", "2001:db8::1",
                    "fd77::1", "ff02::1"):
        assert gw.resolve(ip4(address)) is None
    assert gw.take_outbox() == []


def test_learned_neighbours_expire_and_the_table_is_bounded(monkeypatch):
    monkeypatch.setattr(gateway_port, "NEIGHBOUR_ENTRIES", 4)
    monkeypatch.setattr(gateway_port, "RESOLVING_ENTRIES", 3)
    clock = Clock(100.0)
    gw = gateway(RecordingNat(), clock=clock)
    for n in range(6):
        gw.learn(ip4(f"10.77.0.{10 + n}"), mac(f"52:54:00:00:00:{10 + n}"))
    assert len(gw.neighbours) == 4 and gw.resolve(ip4("10.77.0.15")) is not None
    assert ip4("10.77.0.10") not in gw.neighbours  # the oldest went first
    clock.now += gateway_port.NEIGHBOUR_SECONDS
    gw.tick(clock())
    assert gw.neighbours == {}
    gw.take_outbox()
    for n in range(5):
        gw.resolve(ip4(f"10.77.0.{50 + n}"))
    assert len(gw.take_outbox()) == 3 and gw.services["resolve_limited"] == 2
    clock.now += gateway_port.RESOLVE_INTERVAL
    assert gw.resolve(ip4("10.77.0.60")) is None and len(gw.take_outbox()) == 1


# -- router and DNS in DHCP and router advertisements ----------------------------------------

def advertised(router: bool, dns6=()):
    config = GatewayConfig(mac=GW, ipv6_prefix=ipaddress.IPv6Network("fd77::/64"),
                           dns6=dns6, router=router)
    gw = gateway(config=config)
    (ra,) = send(gw, Ether(src=GUEST, dst="33:33:00:00:00:02")
                 / IPv6(src="fe80::5", dst="ff02::2", hlim=255) / ICMPv6ND_RS())
    return ra


def test_router_advertisements_without_routing_say_lifetime_zero_but_keep_the_prefix():
    ra = advertised(router=False)
    assert ra[ICMPv6ND_RA].routerlifetime == 0
    assert ra["ICMPv6NDOptPrefixInfo"].prefix == "fd77::"
    assert ra["ICMPv6NDOptPrefixInfo"].L == 1 and ra["ICMPv6NDOptPrefixInfo"].A == 1


def test_router_advertisements_when_routing_name_the_gateway_and_its_dns():
    ra = advertised(router=True, dns6=(ipaddress.IPv6Address("fd77::1"),))
    assert ra[ICMPv6ND_RA].routerlifetime > 0
    assert ra[ICMPv6NDOptRDNSS].dns == ["fd77::1"]


def dhcp_offer(router: bool, dns=()) -> dict:
    config = DhcpConfig(subnet="10.77.0.0/24", gateway="10.77.0.1", server_mac=GW,
                        dns=dns, router=router)
    server = DhcpServer(config, clock=Clock(1000.0))
    discover = Ether(src=GUEST, dst="ff:ff:ff:ff:ff:ff") \
        / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) \
        / BOOTP(op=1, chaddr=mac(GUEST), xid=1) \
        / DHCP(options=[("message-type", "discover"), "end"])
    (offer,) = server.handle(bytes(discover))
    return {o[0]: o[1:] for o in Ether(offer)[DHCP].options if isinstance(o, tuple)}


def test_dhcp_names_no_router_unless_the_gateway_routes():
    assert "router" not in dhcp_offer(router=False)
    assert dhcp_offer(router=True)["router"] == ("10.77.0.1",)
    assert dhcp_offer(router=True, dns=("10.77.0.1",))["name_server"] == ("10.77.0.1",)


def test_a_guest_that_keeps_sending_stays_known():
    clock = Clock(100.0)
    gw = gateway(RecordingNat(), clock=clock)
    send(gw, routed(UDP(sport=1, dport=2)))
    clock.now += gateway_port.NEIGHBOUR_SECONDS * 0.7  # past half its life: refreshed
    send(gw, routed(UDP(sport=1, dport=2)))
    clock.now += gateway_port.NEIGHBOUR_SECONDS * 0.7
    gw.tick(clock())  # the neighbours' housekeeping (and a router advertisement)
    gw.take_outbox()
    assert gw.resolve(ip4("10.77.0.5")) == mac(GUEST) and gw.take_outbox() == []  # not asked


def test_with_a_nat_the_gateway_is_a_router_port_not_a_rate_limited_service():
    """Through the switch: a guest's burst of frames to the outside (past the service rate
    that limits frames to the gateway's own services) reaches the NAT whole, and its TSO
    frame arrives whole, one segment to the NAT's TCP, rather than dropped."""
    from netstack.frame import ALL_OFFLOADS, GSO_TCPV4, HDR_F_NEEDS_CSUM
    from netstack.policy import DEFAULT_SERVICE_BURST, PortPolicy
    from netstack.port import QueuedPort
    from netstack.switch import Switch

    nat = RecordingNat()
    gw = gateway(nat)
    assert not gw.service and gateway().service
    switch = Switch()
    guest = QueuedPort("guest", ALL_OFFLOADS, policy=PortPolicy())
    switch.attach(gw)
    switch.attach(guest)
    switch.reserve(gw, gw.mac, gw.addresses)
    frames = [Frame(bytes(routed(UDP(sport=1, dport=2) / bytes([n % 256]))))
              for n in range(int(DEFAULT_SERVICE_BURST) * 2)]
    switch.forward(guest, frames)
    assert len(nat.frames) == len(frames)
    payload = bytes(range(256)) * 16  # 4096 bytes in one TSO frame, MSS 1000
    tso = routed(TCP(sport=40000, dport=80, flags="A") / payload)
    offload = (HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1000, 34, 16)
    switch.forward(guest, [Frame(bytes(tso), offload)])
    (whole,) = nat.frames[len(frames):]
    assert whole.offload[1] == GSO_TCPV4
    assert bytes(Ether(bytes(whole.data))[TCP].payload) == payload
