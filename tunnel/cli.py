"""The `vhostvpn` command line: one subcommand per role (hub, status, qemu-args, ...).

Parses flags, sets up logging (`--log-level` everywhere), and hands a config to the role's
Trio entry point.  Bad flags get a one-line error and exit status 2; nothing here does I/O
beyond that.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path

import trio

from netstack.frame import format_mac, parse_mac

log = logging.getLogger("vhostvpn")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log (default: info)",
    )


def default_mac(socket_path: str) -> str:
    """A stable, locally administered MAC derived from the socket path (52:54:00 is QEMU's)."""
    digest = hashlib.sha256(os.path.abspath(socket_path).encode()).digest()
    return format_mac(b"\x52\x54\x00" + digest[:3])


def qemu_args(socket_path: str, mac: str, mem: str, queues: int, vectors: int | None,
              ident: str) -> list[str]:
    """The QEMU options that attach one virtio-net NIC to a vhost-user socket."""
    device = f"virtio-net-pci,netdev={ident},mac={mac}"
    if queues > 1:
        device += ",mq=on"
    if vectors is not None:
        device += f",vectors={vectors}"
    netdev = f"vhost-user,id={ident},chardev={ident}"
    if queues > 1:
        netdev += f",queues={queues}"
    return [
        "-object", f"memory-backend-memfd,id={ident}-mem,size={mem},share=on",
        "-numa", f"node,memdev={ident}-mem",
        "-chardev", f"socket,id={ident},path={os.path.abspath(socket_path)},reconnect=1",
        "-netdev", netdev,
        "-device", device,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhostvpn",
        description="Put QEMU virtual machines and hosts on one encrypted network.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    hub = sub.add_parser("hub", help="run a hub: a switch joining vhost-user sockets")
    hub.add_argument("--socket", action="append", default=[], metavar="PATH",
                     help="serve a vhost-user socket (QEMU connects); repeatable")
    hub.add_argument("--client-socket", action="append", default=[], metavar="PATH",
                     help="connect to a vhost-user socket QEMU listens on (server=on); "
                          "repeatable")
    hub.add_argument("--control", metavar="PATH", help="control socket for `vhostvpn status`")
    hub.add_argument("--queues", type=int, default=4, metavar="N",
                     help="queue pairs offered per socket (default 4)")
    net = hub.add_argument_group("the segment's gateway services")
    net.add_argument("--subnet", type=ipaddress.IPv4Network, metavar="CIDR",
                     help="IPv4 subnet of the segment, e.g. 10.77.0.0/24: the hub answers "
                          "ARP and ping at the gateway address and serves DHCP")
    net.add_argument("--gateway", type=ipaddress.IPv4Address, metavar="ADDRESS",
                     help="the gateway's address (default: the subnet's first address)")
    net.add_argument("--no-dhcp", action="store_true", help="no DHCP server")
    net.add_argument("--ipv6-prefix", type=ipaddress.IPv6Network, metavar="PREFIX/64",
                     help="IPv6 /64 announced by router advertisements (SLAAC)")
    net.add_argument("--mtu", type=int, default=1500,
                     help="MTU announced by DHCP and router advertisements (default 1500)")
    net.add_argument("--dns", type=ipaddress.ip_address, action="append", default=[],
                     metavar="ADDRESS", help="DNS server handed out (DHCP, RDNSS); repeatable")
    net.add_argument("--state-dir", type=Path, metavar="DIR",
                     help="where leases are kept (default /var/lib/vhostvpn as root)")
    hub.add_argument("--no-port-policy", action="store_true",
                     help="trust every guest: no MAC/IP anti-spoofing, limits or guards "
                          "(benchmarks, labs where every guest is yours)")
    hub.add_argument("--pcap", type=Path, metavar="DIR",
                     help="write what every port sends and receives to DIR/<port>.pcapng")
    _add_common(hub)

    status = sub.add_parser("status", help="show a running hub's or endpoint's state")
    status.add_argument("--control", required=True, metavar="PATH")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    _add_common(status)

    qa = sub.add_parser("qemu-args", help="print the QEMU options to attach a guest")
    qa.add_argument("--socket", required=True, metavar="PATH")
    qa.add_argument("--mac", help="guest MAC (default: derived from the socket path)")
    qa.add_argument("--mem", default="1G",
                    help="guest memory size, must equal QEMU's -m (default 1G)")
    qa.add_argument("--queues", type=int, default=1, help="queue pairs (default 1)")
    qa.add_argument("--vectors", type=int,
                    help="MSI-X vectors (use 0 for QEMU 7.2 under TCG; default: QEMU's)")
    qa.add_argument("--id", default="net0", help="QEMU object id prefix (default net0)")
    _add_common(qa)
    return parser


def tune_gc() -> None:
    """The data path makes and drops short-lived, acyclic objects for every frame (frames,
    spans, tuples), and reference counting frees them.  At the default first-generation
    threshold (700) the cyclic collector runs several times per batch and walks the batch
    still in flight: about 0.5 us per frame, measured in bench/.  Move what exists at start
    out of its way and let it run every 100 000 allocations instead."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)


def _cmd_hub(args: argparse.Namespace) -> int:
    from tunnel.hub import Hub, HubConfig

    if not args.socket and not args.client_socket:
        raise SystemExit("vhostvpn hub: give at least one --socket or --client-socket")
    if not 1 <= args.queues <= 64:
        raise SystemExit(f"vhostvpn hub: --queues {args.queues}: want 1 to 64")
    paths = args.socket + args.client_socket
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise SystemExit("vhostvpn hub: the same socket path was given twice")
    for path in args.socket:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SystemExit(f"vhostvpn hub: --socket {path}: folder {folder} does not exist")
    if args.subnet is not None:
        if args.subnet.num_addresses < 4:
            raise SystemExit(f"vhostvpn hub: --subnet {args.subnet}: too small for a gateway "
                             "and guests")
        if args.gateway is not None and (args.gateway not in args.subnet
                                         or args.gateway in (args.subnet.network_address,
                                                             args.subnet.broadcast_address)):
            raise SystemExit(f"vhostvpn hub: --gateway {args.gateway} is not a host address "
                             f"of {args.subnet}")
    elif args.gateway is not None:
        raise SystemExit("vhostvpn hub: --gateway needs --subnet")
    if args.ipv6_prefix is not None and args.ipv6_prefix.prefixlen != 64:
        raise SystemExit(f"vhostvpn hub: --ipv6-prefix {args.ipv6_prefix}: SLAAC needs a /64")
    if not 576 <= args.mtu <= 65535:
        raise SystemExit(f"vhostvpn hub: --mtu {args.mtu}: want 576 to 65535")
    config = HubConfig(sockets=args.socket, client_sockets=args.client_socket,
                       control=args.control, queue_pairs=args.queues, subnet=args.subnet,
                       gateway=args.gateway, dhcp=not args.no_dhcp,
                       ipv6_prefix=args.ipv6_prefix, mtu=args.mtu, dns=args.dns,
                       state_dir=args.state_dir, pcap_dir=args.pcap,
                       port_policy=not args.no_port_policy)
    tune_gc()
    trio.run(Hub(config).run)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from tunnel.control import query

    try:
        state = query(args.control)
    except OSError as exc:
        print(f"vhostvpn status: cannot reach {args.control}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(format_status(state))
    return 0


def format_status(state: dict) -> str:
    lines = [f"{state.get('role', '?')} (pid {state.get('pid', '?')})"]
    for port in state.get("ports", []):
        drops = port.get("drops", {}) | port.get("guest_drops", {})
        traffic = (f"in {port['in_frames']} frames/{port['in_bytes']} B, "
                   f"out {port['out_frames']} frames/{port['out_bytes']} B")
        if port.get("software_offloads"):
            traffic += f", {port['software_offloads']} offloaded in software"
        if drops:
            traffic += ", drops " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items()))
        if port.get("kind") == "gateway":
            lines.append(f"  {port['name']}: {traffic}")
            services = port.get("services", {}) | {
                f"dhcp_{k}": v for k, v in port.get("dhcp", {}).items()}
            if services:
                lines.append("    answered: " + ", ".join(
                    f"{k}={v}" for k, v in sorted(services.items())))
            continue
        link = "up" if port.get("link_up") else "down"
        broken = f" BROKEN: {port['broken']}" if port.get("broken") else ""
        lines.append(f"  {port['name']}: link {link}{broken}, features "
                     f"{port.get('features', '-')}, {traffic}")
    macs = state.get("macs", [])
    if macs:
        lines.append("  MAC table:")
        lines.extend(f"    {m['mac']} -> {m['port']} (seen {m['age']} s ago)" for m in macs)
    return "\n".join(lines)


def _cmd_qemu_args(args: argparse.Namespace) -> int:
    mac = args.mac or default_mac(args.socket)
    try:
        parse_mac(mac)
    except ValueError as exc:
        raise SystemExit(f"vhostvpn qemu-args: --mac: {exc}") from None
    if not 1 <= args.queues <= 64:
        raise SystemExit(f"vhostvpn qemu-args: --queues {args.queues}: want 1 to 64")
    print(" ".join(qemu_args(args.socket, mac, args.mem, args.queues, args.vectors, args.id)))
    return 0


COMMANDS = {"hub": _cmd_hub, "status": _cmd_status, "qemu-args": _cmd_qemu_args}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
