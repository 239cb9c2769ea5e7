"""Who may say what on the switch: the per-port policy of `vhostvpn hub` (netstack.switch).

What it refuses, per frame from a policed port (guests and remote sessions; the hub's own
services are trusted and not policed), each drop counted on the port by reason:
  mac_spoof     source MAC learned, and still alive, on another port
  mac_limit     a new source MAC beyond the port's limit
  flood_rate    broadcast/multicast beyond the port's token bucket
  ip_spoof      IPv4/IPv6 source (or ARP sender) bound to another port: leased there by the
                hub's DHCP, or first claimed there and still alive
  bad_source    a multicast/broadcast/loopback source address, or 0.0.0.0 / :: where only
                address acquisition (DHCP, DAD, MLD) may use it
  arp_spoof     ARP sender hardware address differs from the Ethernet source
  dhcp_guard    DHCPv4/DHCPv6 server traffic (UDP source port 67 / 547)
  ra_guard      IPv6 router advertisements and redirects (also behind extension headers)
  malformed     an IP/ARP header too short to police
How: fixed-offset reads of the Ethernet, VLAN, ARP, IPv4 and IPv6 headers -- no dpkt, no
parsing beyond what a rule needs.  `AddressBook` keeps who owns which IP; `PortPolicy` keeps a
port's limits and its token bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netstack.frame import ETH_HEADER_LEN

ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_ARP = b"\x08\x06"
ETHERTYPE_IPV6 = b"\x86\xdd"
ETHERTYPE_VLAN = b"\x81\x00"
VLAN_TAG_LEN = 4

IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPV6_EXTENSION_HEADERS = {0, 43, 60}  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
# How many IPv6 extension headers we walk before calling the chain malformed (RFC 7112 asks
# the whole header chain to be in the first fragment).
MAX_IPV6_EXTENSIONS = 8
ICMPV6_ROUTER_ADVERTISEMENT = 134
ICMPV6_REDIRECT = 137
ROUTER_ONLY_ICMPV6 = {ICMPV6_ROUTER_ADVERTISEMENT, ICMPV6_REDIRECT}
DHCPV4_SERVER_PORT = b"\x00\x43"  # 67
DHCPV6_SERVER_PORT = b"\x02\x23"  # 547
ARP_LEN = 28

IPV4_ANY = b"\x00\x00\x00\x00"
IPV6_ANY = bytes(16)

DEFAULT_MAC_LIMIT = 16
DEFAULT_FLOOD_RATE = 1000.0  # broadcast/multicast frames per second, sustained
DEFAULT_FLOOD_BURST = 2000.0


@dataclass
class PortPolicy:
    """A port's limits (one instance per port: it carries the port's token bucket)."""

    mac_limit: int = DEFAULT_MAC_LIMIT
    flood_rate: float = DEFAULT_FLOOD_RATE
    flood_burst: float = DEFAULT_FLOOD_BURST
    tokens: float = field(default=DEFAULT_FLOOD_BURST, repr=False)
    refilled: float = field(default=0.0, repr=False)

    def take_flood_token(self, now: float) -> bool:
        tokens = min(self.flood_burst, self.tokens + (now - self.refilled) * self.flood_rate)
        self.refilled = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class AddressBook:
    """IP address -> (owning port, last seen, leased).  Leased entries (from the hub's DHCP
    server) do not age; claimed ones do, like learned MACs."""

    def __init__(self, aging: float) -> None:
        self.aging = aging
        self.owners: dict[bytes, tuple[object, float, bool]] = {}

    def claim(self, ip: bytes, port: object, now: float) -> bool:
        """May `port` use `ip` as a source?  Claims it if nobody (alive) owns it."""
        entry = self.owners.get(ip)
        if entry is not None:
            owner, seen, leased = entry
            if owner is port:
                if not leased and now - seen > 1.0:
                    self.owners[bytes(ip)] = (port, now, False)
                return True
            if leased or now - seen <= self.aging:
                return False
        self.owners[bytes(ip)] = (port, now, False)
        return True

    def bind(self, ip: bytes, port: object, now: float) -> None:
        """The hub leased `ip` to a client behind `port`."""
        self.owners[ip] = (port, now, True)

    def unbind(self, ip: bytes) -> None:
        self.owners.pop(ip, None)

    def forget(self, port: object) -> None:
        for ip in [ip for ip, (owner, _, _) in self.owners.items() if owner is port]:
            del self.owners[ip]

    def expire(self, now: float) -> None:
        for ip in [ip for ip, (_, seen, leased) in self.owners.items()
                   if not leased and now - seen > self.aging]:
            del self.owners[ip]


def _bad_ipv4_source(ip: bytes) -> bool:
    first = ip[0]
    return first >= 224 or first == 127 or first == 0


def _bad_ipv6_source(ip: bytes) -> bool:
    return ip[0] == 0xFF or ip == b"\x00" * 15 + b"\x01"


def check_l3(data: bytes | memoryview, port: object, book: AddressBook, now: float) -> str | None:
    """Police the network-layer part of one frame from a policed port.

    Returns the drop reason, or None to admit.  Reads fixed offsets only.
    """
    ethertype = data[12:14]
    offset = ETH_HEADER_LEN
    if ethertype == ETHERTYPE_VLAN:
        ethertype = data[16:18]
        offset += VLAN_TAG_LEN
    if ethertype == ETHERTYPE_IPV4:
        return _check_ipv4(data, offset, port, book, now)
    if ethertype == ETHERTYPE_IPV6:
        return _check_ipv6(data, offset, port, book, now)
    if ethertype == ETHERTYPE_ARP:
        return _check_arp(data, offset, port, book, now)
    return None


def _check_ipv4(data, offset: int, port: object, book: AddressBook, now: float) -> str | None:
    if len(data) < offset + 20:
        return "malformed"
    ihl = (data[offset] & 0x0F) * 4
    if ihl < 20 or len(data) < offset + ihl:
        return "malformed"
    proto = data[offset + 9]
    l4 = offset + ihl
    fragment_offset = int.from_bytes(data[offset + 6 : offset + 8], "big") & 0x1FFF
    if proto == IPPROTO_UDP and fragment_offset == 0:
        if len(data) < l4 + 4:
            return "malformed"
        if data[l4 : l4 + 2] == DHCPV4_SERVER_PORT:
            return "dhcp_guard"
    src = data[offset + 12 : offset + 16]
    if src == IPV4_ANY:
        # Only a DHCP client (to port 67) may speak before it has an address.
        if proto == IPPROTO_UDP and data[l4 + 2 : l4 + 4] == DHCPV4_SERVER_PORT:
            return None
        return "bad_source"
    if _bad_ipv4_source(src) or src == b"\xff\xff\xff\xff":
        return "bad_source"
    return None if book.claim(src, port, now) else "ip_spoof"


def _check_ipv6(data, offset: int, port: object, book: AddressBook, now: float) -> str | None:
    if len(data) < offset + 40:
        return "malformed"
    src = data[offset + 8 : offset + 24]
    next_header = data[offset + 6]
    position = offset + 40
    first_fragment = True
    for _ in range(MAX_IPV6_EXTENSIONS):
        if next_header in IPV6_EXTENSION_HEADERS:
            if len(data) < position + 8:
                return "malformed"
            next_header = data[position]
            position += (data[position + 1] + 1) * 8
        elif next_header == IPV6_FRAGMENT:
            if len(data) < position + 8:
                return "malformed"
            first_fragment = int.from_bytes(data[position + 2 : position + 4], "big") >> 3 == 0
            next_header = data[position]
            position += 8
            if not first_fragment:
                break  # later fragments carry no upper-layer header to police
        else:
            break
    else:
        return "malformed"
    if first_fragment:
        if next_header == IPPROTO_ICMPV6:
            if len(data) < position + 1:
                return "malformed"
            if data[position] in ROUTER_ONLY_ICMPV6:
                return "ra_guard"
        elif next_header == IPPROTO_UDP:
            if len(data) < position + 4:
                return "malformed"
            if data[position : position + 2] == DHCPV6_SERVER_PORT:
                return "dhcp_guard"
    if src == IPV6_ANY:
        # Duplicate address detection and MLD reports use the unspecified source.
        return None if next_header == IPPROTO_ICMPV6 else "bad_source"
    if _bad_ipv6_source(src):
        return "bad_source"
    return None if book.claim(src, port, now) else "ip_spoof"


def _check_arp(data, offset: int, port: object, book: AddressBook, now: float) -> str | None:
    if len(data) < offset + ARP_LEN:
        return "malformed"
    if data[offset + 8 : offset + 14] != data[6:12]:
        return "arp_spoof"
    sender_ip = data[offset + 14 : offset + 18]
    if sender_ip == IPV4_ANY:
        return None  # an ARP probe (RFC 5227): allowed before the address is taken
    if _bad_ipv4_source(sender_ip):
        return "bad_source"
    return None if book.claim(sender_ip, port, now) else "ip_spoof"
