"""`vhostvpn hub`, `vhostvpn vm` and `vhostvpn host`: the long-running roles' flags, the
checks that need several of them at once, and the config each role is started with
(tunnel/hub.py's HubConfig, tunnel/endpoint.py's EndpointConfig).

A value argparse can check alone is refused by its type (exit status 2); a combination is
refused here before anything starts, one line naming the flags (exit status 1).  Running the
role is launch.py's.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
from pathlib import Path

from netstack.frame import format_mac, parse_mac
from netstack.gateway.dhcp_config import MAX_LEASE_SECONDS, MIN_LEASE_SECONDS
from netstack.nat.forward import ForwardSpec, parse_forward
from tunnel.cli.flags import (
    add_common,
    add_config,
    add_nice,
    check_queue_pairs,
    check_socket_path_syntax,
)
from tunnel.cli.launch import claim_socket_paths, open_metrics, run_role, setup_failure
from tunnel.introductions import MAX_INTRO_ADDRESSES as MAX_ADVERTISED
from tunnel.settings import HUB_MIN_MTU, MAX_MTU, address_range, is_host_address
from virtio.unixsock import (
    GROUP_DEFAULT_MODE,
    OWNER_ONLY_MODE,
    SocketAccess,
    SocketAccessError,
    group_id,
    may_give_group,
    parse_mode,
)


def ipv4_subnet(text: str) -> ipaddress.IPv4Network:
    """An IPv4 network in CIDR notation, host bits clear (argparse type)."""
    try:
        return ipaddress.IPv4Network(text)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            network = ipaddress.IPv4Network(text, strict=False)
            raise argparse.ArgumentTypeError(
                f"{text} has host bits set: the subnet is {network} (the hub's own address "
                f"in it is --gateway)") from None
        raise argparse.ArgumentTypeError(f"{text!r}: want a subnet such as 10.77.0.0/24 "
                                         f"({exc})") from None


def interface_address(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """ADDRESS/PREFIXLEN, IPv4 or IPv6 (argparse type): without the prefix length a device
    would get a /32 (or /128) and reach nobody, so it is required."""
    address, sep, prefix = text.partition("/")
    kind = ipaddress.IPv6Interface if ":" in address else ipaddress.IPv4Interface
    try:
        interface = kind(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if not sep or not prefix:
        raise argparse.ArgumentTypeError(
            f"{text}: give the prefix length too, e.g. {address}/"
            f"{24 if kind is ipaddress.IPv4Interface else 64} (without it the device would "
            f"reach no neighbour)")
    return interface


def reservation(text: str) -> tuple[bytes, ipaddress.IPv4Address]:
    """MAC=ADDRESS (argparse type)."""
    mac, sep, address = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return parse_mac(mac.strip().lower()), ipaddress.IPv4Address(address.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want MAC=ADDRESS, e.g. 52:54:00:12:34:56=10.77.0.10") from None


def host_port(text: str) -> tuple[str | None, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"want HOST:PORT with a port 1-65535, got {text!r}")
    host = host.strip("[]")
    return (host or None), int(port)


def advertised_address(text: str) -> tuple[str, int]:
    """'ADDRESS:PORT' or '[v6]:PORT' with an IP literal (argparse type): what peers dial."""
    host, port = host_port(text)
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"want an IP address and port, such as "
                                         f"192.0.2.7:7000 or [2001:db8::7]:7000, got {text!r}"
                                         ) from None
    return str(address), port


def network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4 or IPv6 network in CIDR notation (argparse type; host bits must be clear)."""
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: want a network such as 10.0.0.0/8 or "
                                         f"fd00::/8 ({exc})") from None


def forward(text: str) -> ForwardSpec:
    """PROTO:[BIND_ADDR:]HOSTPORT:GUEST_ADDR:GUEST_PORT (argparse type)."""
    try:
        return parse_forward(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fingerprint_arg(text: str) -> bytes:
    from tunnel.keys import FingerprintError, parse_fingerprint

    try:
        return parse_fingerprint(text)
    except FingerprintError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_metrics(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", type=host_port, metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics "
                             "(unauthenticated: keep it on loopback or a management network)")


def _add_endpoint(parser: argparse.ArgumentParser) -> None:
    """The flags `vhostvpn vm` and `vhostvpn host` share: how to reach and trust the hub."""
    parser.add_argument("--hub", type=host_port, metavar="HOST:PORT", help="the hub's tunnel")
    parser.add_argument("--identity", type=Path, metavar="DIR",
                        help="this endpoint's key (vhostvpn keygen DIR)")
    parser.add_argument("--hub-fingerprint", type=fingerprint_arg, metavar="FP",
                        help="the hub's key fingerprint (vhostvpn fingerprint DIR on the hub)")
    parser.add_argument("--name", default="",
                        help="check that the hub's peers file gives this endpoint's key this "
                             "name (default: no check; the key alone says who it is)")
    parser.add_argument("--control", metavar="PATH",
                        help="control socket for `vhostvpn status`")
    parser.add_argument("--rekey-seconds", type=float, default=3600.0, metavar="S",
                        help="make a fresh connection (new keys) this often (default 3600)")
    direct = parser.add_argument_group("direct paths: peers the hub introduces exchange "
                                       "frames over their own TLS session")
    direct.add_argument("--listen", type=host_port, metavar="HOST:PORT",
                        help="accept direct sessions here (':PORT': every address, "
                             "0.0.0.0 or [::]: every one of that family; the hub tells "
                             "peers the address it sees us from)")
    direct.add_argument("--advertise", type=advertised_address, action="append", default=[],
                        metavar="ADDRESS:PORT",
                        help="where peers reach --listen, when that differs (NAT, port "
                             f"forward); repeatable, at most {MAX_ADVERTISED}")
    _add_metrics(parser)
    add_nice(parser)
    add_config(parser)
    add_common(parser)


def _add_socket_access(parser: argparse.ArgumentParser) -> None:
    """Who may connect to the --socket files (hub and vm): libvirt runs QEMU as its own user."""
    parser.add_argument("--socket-group", metavar="GROUP",
                        help="give the --socket files to this group (name or number), e.g. "
                             "kvm for libvirt's QEMU; mode 0660 unless --socket-mode says")
    parser.add_argument("--socket-mode", metavar="MODE",
                        help="octal mode of the --socket files (default 0600: only this "
                             "user may connect)")


def socket_access_of(args: argparse.Namespace, command: str) -> SocketAccess:
    """--socket-mode and --socket-group checked: a one-line error (exit status 1) if not."""
    if (args.socket_mode is not None or args.socket_group is not None) and not args.socket:
        raise SystemExit(f"vhostvpn {command}: --socket-mode and --socket-group apply to "
                         f"--socket files; none given")
    try:
        gid = None if args.socket_group is None else group_id(args.socket_group)
    except SocketAccessError as exc:
        raise SystemExit(f"vhostvpn {command}: --socket-group {exc}") from None
    if gid is not None and not may_give_group(gid):
        raise SystemExit(f"vhostvpn {command}: --socket-group {args.socket_group}: this user "
                         f"may not give files to that group (run as root, with CAP_CHOWN, or "
                         f"as a member of the group)")
    if args.socket_mode is None:
        mode = OWNER_ONLY_MODE if gid is None else GROUP_DEFAULT_MODE
    else:
        try:
            mode = parse_mode(args.socket_mode)
        except SocketAccessError as exc:
            raise SystemExit(f"vhostvpn {command}: --socket-mode {exc}") from None
    return SocketAccess(mode, gid)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The hub, vm and host subcommands."""
    hub = sub.add_parser("hub", help="run a hub: a switch joining vhost-user sockets")
    hub.add_argument("--socket", action="append", default=[], metavar="PATH",
                     help="serve a vhost-user socket (QEMU connects); repeatable")
    hub.add_argument("--client-socket", action="append", default=[], metavar="PATH",
                     help="connect to a vhost-user socket QEMU listens on (server=on); "
                          "repeatable")
    _add_socket_access(hub)
    hub.add_argument("--control", metavar="PATH", help="control socket for `vhostvpn status`")
    hub.add_argument("--queues", type=int, default=4, metavar="N",
                     help="queue pairs offered per socket (default 4)")
    net = hub.add_argument_group("the segment's gateway services")
    net.add_argument("--subnet", type=ipv4_subnet, metavar="CIDR",
                     help="IPv4 subnet of the segment, e.g. 10.77.0.0/24: the hub answers "
                          "ARP and ping at the gateway address and serves DHCP")
    net.add_argument("--gateway", type=ipaddress.IPv4Address, metavar="ADDRESS",
                     help="the gateway's address (default: the subnet's first address)")
    net.add_argument("--no-dhcp", action="store_true", help="no DHCP server")
    net.add_argument("--dhcp-range", type=address_range, metavar="FIRST-LAST",
                     help="addresses DHCP leases, e.g. 10.77.0.100-10.77.0.199 (default: "
                          "every host address but the gateway); keep static ones outside it")
    net.add_argument("--lease-time", type=int, default=3600, metavar="SECONDS",
                     help="DHCP lease time (default 3600, at least 60)")
    net.add_argument("--domain", metavar="NAME", help="DNS domain handed out by DHCP")
    net.add_argument("--dhcp-reserve", type=reservation, action="append", default=[],
                     metavar="MAC=ADDRESS",
                     help="always lease ADDRESS to MAC (it may lie outside --dhcp-range); "
                          "repeatable")
    net.add_argument("--ipv6-prefix", type=ipaddress.IPv6Network, metavar="PREFIX/64",
                     help="IPv6 /64 announced by router advertisements (SLAAC)")
    net.add_argument("--mtu", type=int, default=1500,
                     help="MTU announced by DHCP and router advertisements (default 1500)")
    net.add_argument("--dns", type=ipaddress.ip_address, action="append", default=[],
                     metavar="ADDRESS", help="DNS server handed out (DHCP, RDNSS); repeatable")
    net.add_argument("--state-dir", type=Path, metavar="DIR",
                     help="where leases are kept (default /var/lib/vhostvpn as root)")
    nat = hub.add_argument_group("the NAT: guests reach what the hub's host reaches "
                                 "(docs/nat.md)")
    nat.add_argument("--nat", action="store_true",
                     help="route guests' TCP, UDP and ping through the hub host's sockets; "
                          "DHCP and router advertisements then name the gateway as default "
                          "router and DNS server (needs --subnet or --ipv6-prefix)")
    nat.add_argument("--map-host-loopback", action="store_true",
                     help="connections to the gateway's address reach the hub host's "
                          "127.0.0.1 / ::1 (off: the host's loopback is unreachable)")
    nat.add_argument("--nat-deny", type=network, action="append", default=[],
                     metavar="CIDR", help="keep guests away from this network (besides "
                                          "loopback, link-local, multicast); repeatable")
    nat.add_argument("--dns-upstream", type=ipaddress.ip_address, action="append",
                     default=[], metavar="ADDRESS",
                     help="resolver the gateway's DNS forwards to (default: those of "
                          "/etc/resolv.conf); repeatable")
    nat.add_argument("--forward", type=forward, action="append", default=[],
                     metavar="PROTO:[BIND_ADDR:]HOSTPORT:GUEST_ADDR:GUEST_PORT",
                     help="listen on the hub's host and relay into a guest, e.g. "
                          "tcp:8022:10.77.0.10:22 (IPv6 in brackets); repeatable")
    tun = hub.add_argument_group("the tunnel: endpoints join over TLS")
    tun.add_argument("--listen", type=host_port, metavar="HOST:PORT",
                     help="accept endpoints on this TCP address (e.g. :7777)")
    tun.add_argument("--identity", type=Path, metavar="DIR",
                     help="the hub's key and certificate (vhostvpn keygen DIR)")
    tun.add_argument("--peers", type=Path, metavar="FILE",
                     help="'name fingerprint' lines: the endpoints allowed in (reread on "
                          "SIGHUP)")
    tun.add_argument("--name", default="hub", help="the hub's name in HELLO and logs")
    tun.add_argument("--no-direct", action="store_true",
                     help="introduce no endpoints to each other: every frame between them "
                          "goes through the hub (direct paths off)")
    hub.add_argument("--no-port-policy", action="store_true",
                     help="trust every guest: no MAC/IP anti-spoofing, limits or guards "
                          "(benchmarks, labs where every guest is yours)")
    _add_metrics(hub)
    hub.add_argument("--pcap", type=Path, metavar="DIR",
                     help="write what every port sends and receives to DIR/<port>.pcapng")
    add_nice(hub)
    add_common(hub)

    add_config(hub)

    vm = sub.add_parser("vm", help="serve vhost-user sockets and join their guests to a hub")
    vm.add_argument("--socket", action="append", default=[], metavar="PATH",
                    help="serve a vhost-user socket (QEMU connects); repeatable")
    vm.add_argument("--client-socket", action="append", default=[], metavar="PATH",
                    help="connect to a vhost-user socket QEMU listens on; repeatable")
    _add_socket_access(vm)
    vm.add_argument("--queues", type=int, default=4, metavar="N",
                    help="queue pairs offered per socket (default 4)")
    vm.add_argument("--no-port-policy", action="store_true",
                    help="trust these guests: no MAC/IP anti-spoofing, limits or guards on "
                         "their ports here (the hub still polices the session)")
    _add_endpoint(vm)

    host = sub.add_parser("host", help="join this host to a hub through a TAP or TUN device")
    device = host.add_mutually_exclusive_group(required=True)
    device.add_argument("--tap", metavar="NAME",
                        help="create a TAP device (L2: the host sees an Ethernet NIC)")
    device.add_argument("--tun", metavar="NAME",
                        help="create a TUN device (L3: vhostvpn does ARP/NDP for the host)")
    host.add_argument("--dhcp", action="store_true",
                      help="TUN: lease the IPv4 address from the hub's DHCP server")
    host.add_argument("--address", type=interface_address, action="append", default=[],
                      metavar="CIDR", help="an address for the device, e.g. 10.77.0.9/24; "
                                           "repeatable")
    host.add_argument("--mtu", type=int, default=1500, help="the device's MTU (default 1500)")
    _add_endpoint(host)


def cmd_hub(args: argparse.Namespace) -> int:
    """`vhostvpn hub`: the flags checked together, then the hub run until it is stopped."""
    from tunnel.hub import Hub, HubConfig

    if not args.socket and not args.client_socket and not args.listen:
        raise SystemExit("vhostvpn hub: give --listen, or at least one --socket or "
                         "--client-socket")
    if args.listen and (args.identity is None or args.peers is None):
        raise SystemExit("vhostvpn hub: --listen needs --identity DIR and --peers FILE")
    check_queue_pairs("hub", args.queues)
    paths = args.socket + args.client_socket
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise SystemExit("vhostvpn hub: the same socket path was given twice")
    if args.subnet is not None:
        if args.subnet.num_addresses < 4:
            raise SystemExit(f"vhostvpn hub: --subnet {args.subnet}: too small for a gateway "
                             "and guests")
        if args.gateway is not None and not is_host_address(args.gateway, args.subnet):
            raise SystemExit(f"vhostvpn hub: --gateway {args.gateway} is not a host address "
                             f"of {args.subnet}")
    elif args.gateway is not None:
        raise SystemExit("vhostvpn hub: --gateway needs --subnet")
    for flag, value, default in (("--dhcp-range", args.dhcp_range, None),
                                 ("--lease-time", args.lease_time, 3600),
                                 ("--domain", args.domain, None),
                                 ("--dhcp-reserve", args.dhcp_reserve, [])):
        if value != default and (args.subnet is None or args.no_dhcp):
            raise SystemExit(f"vhostvpn hub: {flag} needs --subnet and DHCP (no --no-dhcp)")
    reservations = dict(args.dhcp_reserve)
    if len(reservations) != len(args.dhcp_reserve):
        raise SystemExit("vhostvpn hub: --dhcp-reserve: a MAC is reserved twice")
    if not MIN_LEASE_SECONDS <= args.lease_time <= MAX_LEASE_SECONDS:
        raise SystemExit(f"vhostvpn hub: --lease-time {args.lease_time}: want "
                         f"{MIN_LEASE_SECONDS} to {MAX_LEASE_SECONDS} seconds")
    if args.ipv6_prefix is not None and args.ipv6_prefix.prefixlen != 64:
        raise SystemExit(f"vhostvpn hub: --ipv6-prefix {args.ipv6_prefix}: SLAAC needs a /64")
    if not HUB_MIN_MTU <= args.mtu <= MAX_MTU:
        raise SystemExit(f"vhostvpn hub: --mtu {args.mtu}: want {HUB_MIN_MTU} to {MAX_MTU}")
    _check_dhcp_addresses(args)
    _check_dns(args)
    _check_nat(args)
    check_socket_path_syntax("hub", args)
    config = HubConfig(sockets=args.socket, client_sockets=args.client_socket,
                       control=args.control, queue_pairs=args.queues, subnet=args.subnet,
                       gateway=args.gateway, dhcp=not args.no_dhcp,
                       dhcp_range=args.dhcp_range, lease_seconds=args.lease_time,
                       domain=args.domain, dhcp_reservations=reservations,
                       ipv6_prefix=args.ipv6_prefix, mtu=args.mtu, dns=args.dns,
                       state_dir=args.state_dir, pcap_dir=args.pcap,
                       port_policy=not args.no_port_policy, listen=args.listen,
                       identity_dir=args.identity, peers_file=args.peers, name=args.name,
                       socket_access=socket_access_of(args, "hub"), nat=args.nat,
                       map_host_loopback=args.map_host_loopback, nat_deny=args.nat_deny,
                       dns_upstreams=args.dns_upstream, forwards=args.forward,
                       direct=not args.no_direct)
    config.control = claim_socket_paths("hub", args.socket, args.control)
    metrics = open_metrics("hub", args.metrics)
    try:
        hub = Hub(config)
    except Exception as exc:  # keys, peers file, state directory
        raise SystemExit(f"vhostvpn hub: {setup_failure(exc)}") from None
    from tunnel.daemon import run_daemon

    return run_role("hub", functools.partial(run_daemon, hub.run, hub.status, metrics),
                    hub.tunnel.reload if hub.tunnel is not None else None, nice=args.nice)


def _check_dhcp_addresses(args: argparse.Namespace) -> None:
    """--dhcp-range and --dhcp-reserve lie in --subnet (checked again by the DHCP server;
    here the message can name the flag)."""
    subnet = args.subnet
    if subnet is None:
        return
    if args.dhcp_range is not None and not all(is_host_address(a, subnet) for a in args.dhcp_range):
        first, last = args.dhcp_range
        raise SystemExit(f"vhostvpn hub: --dhcp-range {first}-{last} is not a range of hosts "
                         f"of {subnet} (--subnet): both ends must be host addresses in it")
    for mac, address in args.dhcp_reserve:
        if not is_host_address(address, subnet):
            raise SystemExit(f"vhostvpn hub: --dhcp-reserve {format_mac(mac)}={address}: "
                             f"{address} is not a client address of {subnet} (--subnet)")
        if mac[0] & 1:
            raise SystemExit(f"vhostvpn hub: --dhcp-reserve {format_mac(mac)}={address}: "
                             f"a multicast MAC is no NIC's address")


def _check_dns(args: argparse.Namespace) -> None:
    """A DNS server the hub would never hand out is refused: IPv4 ones go out in DHCP
    replies, IPv6 ones in router advertisements (RDNSS)."""
    for server in args.dns:
        if server.version == 6 and args.ipv6_prefix is None:
            raise SystemExit(f"vhostvpn hub: --dns {server}: IPv6 DNS servers are announced "
                             f"in router advertisements, which need --ipv6-prefix")
        if server.version == 4 and (args.subnet is None or args.no_dhcp):
            raise SystemExit(f"vhostvpn hub: --dns {server}: IPv4 DNS servers are handed out "
                             f"by DHCP, which needs --subnet (and no --no-dhcp)")


def _check_nat(args: argparse.Namespace) -> None:
    """--nat needs a gateway; the NAT's other flags need --nat; a forward's guest lies on
    the segment."""
    if args.nat and args.subnet is None and args.ipv6_prefix is None:
        raise SystemExit("vhostvpn hub: --nat needs --subnet or --ipv6-prefix (the gateway "
                         "guests route through)")
    for flag, value in (("--map-host-loopback", args.map_host_loopback),
                        ("--nat-deny", args.nat_deny), ("--dns-upstream", args.dns_upstream),
                        ("--forward", args.forward)):
        if value and not args.nat:
            raise SystemExit(f"vhostvpn hub: {flag} needs --nat")
    for spec in args.forward:
        segment = args.subnet if spec.guest.version == 4 else args.ipv6_prefix
        if segment is None or spec.guest not in segment:
            flag = "--subnet" if spec.guest.version == 4 else "--ipv6-prefix"
            raise SystemExit(f"vhostvpn hub: --forward {spec}: {spec.guest} is not in "
                             f"{flag} {segment or '(none given)'}")
    bound = [(spec.protocol, spec.bind, spec.host_port) for spec in args.forward]
    if len(set(bound)) != len(bound):
        raise SystemExit("vhostvpn hub: --forward: the same protocol, address and host port "
                         "is forwarded twice")


def _endpoint_config(args: argparse.Namespace, command: str, **local: object):
    from tunnel.endpoint import EndpointConfig

    for flag in ("hub", "identity", "hub_fingerprint"):
        if getattr(args, flag) is None:
            raise SystemExit(f"vhostvpn {command}: --{flag.replace('_', '-')} is required")
    if args.rekey_seconds < 10:
        raise SystemExit(f"vhostvpn {command}: --rekey-seconds: at least 10")
    from tunnel.keys import MAX_NAME_BYTES, NAME_PATTERN

    if args.name and not NAME_PATTERN.fullmatch(args.name):
        raise SystemExit(f"vhostvpn {command}: --name {args.name!r}: want 1-{MAX_NAME_BYTES} "
                         f"characters of A-Z a-z 0-9 . _ @ + - starting with a letter or digit")
    if args.advertise and args.listen is None:
        raise SystemExit(f"vhostvpn {command}: --advertise needs --listen (where the direct "
                         f"sessions are accepted)")
    if len(args.advertise) > MAX_ADVERTISED:
        raise SystemExit(f"vhostvpn {command}: --advertise: at most {MAX_ADVERTISED} addresses")
    host, port = args.hub
    return EndpointConfig(
        hub_host=host or "localhost", hub_port=port, identity_dir=args.identity,
        hub_fingerprint=args.hub_fingerprint, control=args.control, name=args.name,
        rekey_seconds=args.rekey_seconds, listen=args.listen, advertise=args.advertise,
        **local)


def _run_endpoint(config, command: str, metrics_address: tuple[str | None, int] | None,
                  nice: int | None) -> int:
    from tunnel.endpoint import Endpoint

    metrics = open_metrics(command, metrics_address)
    try:
        endpoint = Endpoint(config)
    except Exception as exc:  # keys
        raise SystemExit(f"vhostvpn {command}: {setup_failure(exc)}") from None
    from tunnel.daemon import run_daemon

    return run_role(command, functools.partial(run_daemon, endpoint.run, endpoint.status,
                                               metrics), nice=nice)


def cmd_vm(args: argparse.Namespace) -> int:
    """`vhostvpn vm`: an endpoint serving vhost-user sockets."""
    if not args.socket and not args.client_socket:
        raise SystemExit("vhostvpn vm: give at least one --socket or --client-socket")
    check_queue_pairs("vm", args.queues)
    check_socket_path_syntax("vm", args)
    config = _endpoint_config(args, "vm", sockets=args.socket,
                              client_sockets=args.client_socket, queue_pairs=args.queues,
                              port_policy=not args.no_port_policy,
                              socket_access=socket_access_of(args, "vm"))
    config.control = claim_socket_paths("vm", args.socket, args.control)
    return _run_endpoint(config, "vm", args.metrics, args.nice)


def cmd_host(args: argparse.Namespace) -> int:
    """`vhostvpn host`: an endpoint with a TAP or TUN device."""
    if not 68 <= args.mtu <= MAX_MTU:
        raise SystemExit(f"vhostvpn host: --mtu {args.mtu}: want 68 to {MAX_MTU}")
    device = args.tap or args.tun
    if len(device.encode()) > 15 or "/" in device or not device.strip():
        raise SystemExit(f"vhostvpn host: {device!r}: not a valid interface name")
    if args.dhcp and args.tap:
        raise SystemExit("vhostvpn host: --dhcp goes with --tun (with --tap, run the host's "
                         "own DHCP client on the device)")
    if args.tun and sum(1 for a in args.address if a.version == 4) > 1:
        raise SystemExit("vhostvpn host: --tun takes one IPv4 --address (and one IPv6)")
    config = _endpoint_config(args, "host", tap=args.tap, tun=args.tun, dhcp=args.dhcp,
                              addresses=args.address, mtu=args.mtu)
    config.control = claim_socket_paths("host", [], args.control)
    return _run_endpoint(config, "host", args.metrics, args.nice)
