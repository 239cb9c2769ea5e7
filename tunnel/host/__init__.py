"""TUN/TAP host mode (`vhostvpn host`): a plain host joins the segment through a kernel device.

`tuntap` opens the device and moves frames in batches with their virtio-net headers (a TAP is
an Ethernet port as it is); `tunport` puts a TUN device behind netstack's L3 host (ARP, NDP,
DHCP on the host's behalf); `hostnet` sets the device's link, MTU and addresses over netlink
and undoes exactly what it did.  The endpoint (tunnel/endpoint.py) owns the port.
"""
