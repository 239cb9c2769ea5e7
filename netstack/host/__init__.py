"""A TUN host's link layer: the L3 host that turns IP packets into Ethernet frames (ARP, NDP,
SLAAC, the neighbour cache) and its DHCP client."""
