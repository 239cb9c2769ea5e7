"""What the NAT core tests share: the gateway they talk to, guests' frames built by scapy,
and frames to the guest read back by scapy with every checksum recomputed and compared."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from netstack.frame import Frame
from netstack.nat.packet import DenyList, NatConfig

GW_MAC = "02:76:76:00:00:01"
GUEST_MAC = "52:54:00:00:00:0a"
OTHER_MAC = "52:54:00:00:00:0b"
GW4 = "10.77.0.1"
GW6 = "fd77::1"
GUEST4 = "10.77.0.10"
GUEST6 = "fd77::10"
OTHER4 = "10.77.0.11"
REMOTE4 = "198.51.100.7"
REMOTE6 = "2001:db8::7"


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def nat_config(**changes) -> NatConfig:
    settings = {"gateway_mac": mac(GW_MAC), "gateway_ips": frozenset({packed(GW4),
                                                                       packed(GW6)}),
                "deny": DenyList.with_defaults(["192.0.2.0/24"]), "mtu": 1500} | changes
    return NatConfig(**settings)


def guest_frame(packet, src_mac: str = GUEST_MAC, offload: tuple | None = None) -> Frame:
    """`packet` (IP and up) from a guest, in a frame to the gateway's MAC."""
    data = bytes(Ether(src=src_mac, dst=GW_MAC) / packet)
    return Frame(data) if offload is None else Frame(data, offload)


def checksums_valid(frame: Frame, quoted: bool = True) -> bool:
    """Rebuild `frame` with scapy's own checksums and compare.  `quoted`: the IP and UDP
    headers an ICMP error quotes too (not when the quote is cut short: a UDP checksum covers
    bytes it no longer holds)."""
    packet = Ether(bytes(frame.data))
    rebuilt = packet.copy()
    for layer in (IP, UDP, ICMP, *((IPerror, UDPerror) if quoted else ())):
        if layer in rebuilt:
            del rebuilt[layer].chksum
    for layer in rebuilt.layers():
        if layer.__name__.startswith("ICMPv6") and hasattr(rebuilt[layer], "cksum"):
            del rebuilt[layer].cksum
    if IPv6 in rebuilt and UDP in rebuilt:
        del rebuilt[UDP].chksum
    return bytes(Ether(bytes(rebuilt))) == bytes(packet)
