"""The hub's gateway: the switch port that answers for the subnet's router (ARP, NDP, ICMP,
router advertisements) and serves DHCP."""
