"""The NAT: how guests reach whatever the hub's host can reach (issue 12), in sans-I/O cores.

The gateway terminates each guest flow in userspace and relays it through an ordinary socket
of the hub's host (the passt/slirp model: no root, no kernel forwarding); the Trio shell that
owns those sockets lives in tunnel/.  One module per concern:
  tcp     one guest TCP connection: guest segments <-> host socket actions and events
"""
