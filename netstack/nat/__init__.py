"""The NAT: how guests on the VPN reach what the hub's host can reach (issue 12).

The gateway terminates each guest flow in userspace and relays it through an ordinary socket
of the hub's host (the passt/libslirp model: no root, no iptables, no kernel forwarding).
Sans-I/O cores here, one module per concern: frames and host events in, frames to the guest
and host-socket actions out, time passed in as `now`.  The Trio shell that owns the sockets
(connected UDP sockets, ping sockets, IP_RECVERR, resolv.conf) is tunnel/nat.py.

  limits.py  FlowKey; the per-guest caps (flows per protocol, half-open TCP, buffered bytes)
             and the accounting that admits or refuses a new flow, refusals counted by
             reason; a guest is its owner, the switch port its frames came in on
  packet.py  the guest's routed IP packet, read once through netstack.wire and checked
             (addressed to the gateway's MAC, unicast source, not a fragment)
  udp.py     the UDP flow table: guest datagram -> open a connected host socket, send;
             host datagram -> frame to the guest; idle expiry; denied destinations
  icmp.py    ICMP/ICMPv6 echo through unprivileged ping sockets (the guest's id restored on
             the reply), and ICMP errors the host learns mapped back to the guest, rate limited
  dns.py     the gateway's DNS forwarder: queries to the gateway's :53 -> upstream resolvers,
             answers back to the guest with its id; resolv.conf parsing
  tcp.py     one guest-facing TCP connection (RFC 9293 subset): guest segments in, segments
             to the guest and host-socket actions out
  tcp_flows.py  the TCP flow table: caps, deny list, resets for strays, timers, the active
             open of a port forward
  forward.py `--forward` specs (port forwards into guests), parsed and checked
  udp_forward.py  UDP port forwards: one flow per outside client into the guest
"""
