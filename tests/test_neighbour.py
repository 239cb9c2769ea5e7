"""netstack.neighbour, the one ARP and the one NDP: the hub's gateway and a TUN host's L3
host answer the same requests, refuse the same hostile ones, and their answers differ only
where their roles do (the gateway's NA carries the router flag)."""

from ipaddress import IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from netstack.frame import Frame
from netstack.gateway.port import GatewayConfig, GatewayPort
from netstack.host.l3host import L3Host
from netstack.neighbour import link_local_from_mac, multicast_mac6, solicited_node
from tests.support.clock import Clock

ASKER = "52:54:00:00:00:09"
ASKER_MAC = bytes.fromhex(ASKER.replace(":", ""))
GATEWAY_MAC = bytes.fromhex("027676000001")
HOST_MAC = bytes.fromhex("02686f737401")


def gateway() -> GatewayPort:
    return GatewayPort(GatewayConfig(mac=GATEWAY_MAC, ipv4=IPv4Interface("10.77.0.1/24"),
                                     ipv6_prefix=IPv6Network("fd77::/64")), clock=Clock(100.0))


def host() -> L3Host:
    return L3Host(HOST_MAC, ipv4=IPv4Interface("10.77.0.2/24"),
                  ipv6=IPv6Interface("fd77::2/64"), clock=Clock(100.0))


# (who answers, its MAC, its IPv4 address, its IPv6 address, is it a router)
SPEAKERS = [(gateway, GATEWAY_MAC, "10.77.0.1", "fd77::1", True),
            (host, HOST_MAC, "10.77.0.2", "fd77::2", False)]


def answers(speaker, packet) -> list[Ether]:
    """What the gateway or the L3 host sends back for `packet`."""
    frame = Frame(bytes(packet))
    if isinstance(speaker, GatewayPort):
        speaker.deliver([frame])
        return [Ether(bytes(f.data)) for f in speaker.take_outbox()]
    packets, frames = speaker.from_segment(frame)
    assert packets == []  # ARP and ND never reach the host's TUN
    return [Ether(bytes(f.data)) for f in frames]


def solicitation(target: str, src: str = "fd77::9", options=None, hop_limit: int = 255,
                 **fields) -> Ether:
    """An NS for `target` to its solicited-node group (scapy fills lengths and the checksum,
    over raw `options` too)."""
    group = solicited_node(IPv6Address(target).packed)
    return (Ether(src=ASKER, dst=multicast_mac6(group).hex(":"))
            / IPv6(src=src, dst=str(IPv6Address(group)), hlim=hop_limit)
            / ICMPv6ND_NS(tgt=target, **fields)
            / (Raw(options) if options is not None else ICMPv6NDOptSrcLLAddr(lladdr=ASKER)))


@pytest.mark.parametrize(("make", "mac", "ipv4", "ipv6", "router"), SPEAKERS,
                         ids=["gateway", "l3host"])
def test_both_answer_a_request_for_their_address_alike(make, mac, ipv4, ipv6, router):
    speaker = make()
    (arp,) = answers(speaker, Ether(src=ASKER, dst="ff:ff:ff:ff:ff:ff")
                     / ARP(op=1, hwsrc=ASKER, psrc="10.77.0.9", pdst=ipv4))
    assert (arp.dst, arp[ARP].op, arp[ARP].hwsrc, arp[ARP].psrc, arp[ARP].pdst) \
        == (ASKER, 2, mac.hex(":"), ipv4, "10.77.0.9")
    for target in (ipv6, str(link_local_from_mac(mac))):
        (na,) = answers(speaker, solicitation(target))
        advert = na[ICMPv6ND_NA]
        assert (na.dst, na[IPv6].dst, na[IPv6].src, na[IPv6].hlim) \
            == (ASKER, "fd77::9", target, 255)
        assert (advert.tgt, advert.R, advert.S, advert.O) == (target, int(router), 1, 1)
        assert bytes(advert.payload)[2:8] == mac  # target link-layer address option
    (dad,) = answers(speaker, solicitation(ipv6, src="::", options=b""))
    assert (dad.dst, dad[IPv6].dst, dad[ICMPv6ND_NA].S) == ("33:33:00:00:00:01", "ff02::1", 0)


def hostile_requests(ipv4: str, ipv6: str) -> list[Ether]:
    lla = ASKER_MAC.hex()
    return [
        solicitation(ipv6, cksum=0x1234),  # a wrong ICMPv6 checksum
        solicitation(ipv6, code=1),
        solicitation(ipv6, hop_limit=64),  # forwarded
        solicitation(ipv6, options=bytes.fromhex("0101" + lla + "0e00" + "00" * 6)),
        solicitation(ipv6, options=bytes.fromhex("0101" + lla + "0e02" + "00" * 6)),
        solicitation(ipv6, options=bytes.fromhex("0101333300000001")),  # multicast lla
        solicitation(ipv6, options=bytes.fromhex("0101000000000000")),  # zero lla
        solicitation(ipv6, src="::"),  # DAD with a source link-layer address
        solicitation(ipv6, src="ff02::1"),  # from a multicast source
        Ether(src=ASKER, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=1, hwtype=6, hwsrc=ASKER, psrc="10.77.0.9", pdst=ipv4),
        Ether(src=ASKER, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=1, hwsrc="01:00:5e:00:00:01", psrc="10.77.0.9", pdst=ipv4),
        Ether(src=ASKER, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=1, hwsrc=ASKER, psrc=ipv4, pdst=ipv4),  # a claim to its own address
    ]


@pytest.mark.parametrize(("make", "mac", "ipv4", "ipv6", "router"), SPEAKERS,
                         ids=["gateway", "l3host"])
def test_both_refuse_the_same_hostile_requests(make, mac, ipv4, ipv6, router):
    speaker = make()
    refused = [answers(speaker, packet) for packet in hostile_requests(ipv4, ipv6)]
    assert refused == [[]] * len(refused)
    if isinstance(speaker, GatewayPort):
        counted = sum(speaker.counters.drops.values())
    else:
        counted = sum(n for name, n in speaker.counters.items() if name.startswith("malformed"))
    assert counted == len(refused) - 1  # each counted, but the claim (silently not answered)
    # ... and still answer a good one afterwards
    assert len(answers(speaker, solicitation(ipv6))) == 1
