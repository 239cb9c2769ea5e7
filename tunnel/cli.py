"""The `vhostvpn` command line: one subcommand per role (hub, status, qemu-args, ...).

Parses flags, sets up logging (`--log-level` everywhere), and hands a config to the role's
Trio entry point.  Bad flags get a one-line error and exit status 2; nothing here does I/O
beyond that.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import tomllib
from pathlib import Path
from typing import NoReturn

import trio

from netstack.dhcp import MAX_LEASE_SECONDS, MIN_LEASE_SECONDS
from netstack.frame import QEMU_OUI, format_mac, parse_mac, stable_mac
from virtio.protocol import DEFAULT_QUEUE_PAIRS
from virtio.unixsock import (
    GROUP_DEFAULT_MODE,
    OWNER_ONLY_MODE,
    SocketAccess,
    SocketAccessError,
    group_id,
    may_give_group,
    parse_mode,
)

log = logging.getLogger("vhostvpn")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")
HUB_MIN_MTU = 576  # the IPv4 minimum datagram every host must accept (RFC 791)
MAX_MTU = 65535


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `vhostvpn hub: argument --subnet: why (see --help)`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="how much to log (default: info)",
    )


# QEMU's -m: a number (MiB unless suffixed), optionally with a K, M, G or T suffix.
MEMORY_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[KMGTkmgt])?")


def version() -> str:
    """This vhostvpn's version: the source tree's pyproject.toml when run from a checkout
    (an installed copy may be older), else the installed package's metadata."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        with open(pyproject, "rb") as file:
            project = tomllib.load(file)["project"]
        if project["name"] == "vhostvpn":
            return project["version"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        pass
    try:
        return importlib.metadata.version("vhostvpn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_mac(socket_path: str) -> str:
    """A stable, locally administered MAC derived from the socket path (52:54:00 is QEMU's)."""
    return format_mac(stable_mac(os.path.abspath(socket_path), QEMU_OUI))


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


LIBVIRT_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# QEMU's -m suffixes (none: MiB) and libvirt's names for the same units.
LIBVIRT_MEMORY_UNITS = {"": "MiB", "K": "KiB", "M": "MiB", "G": "GiB", "T": "TiB"}


def libvirt_memory(mem: str) -> tuple[int, str]:
    """QEMU's -m size ('1G', '256M', '1024' = MiB) as libvirt's <memory> value and unit."""
    match = re.fullmatch(r"([0-9]+)([KMGT]?)", mem.strip(), re.IGNORECASE)
    if match is None or int(match[1]) == 0:
        raise ValueError(f"{mem!r}: want a whole size like 1G, 512M or 1024 (MiB)")
    return int(match[1]), LIBVIRT_MEMORY_UNITS[match[2].upper()]


def libvirt_xml(socket_path: str, mac: str, mem: str, queues: int, vectors: int | None,
                ident: str) -> str:
    """The domain XML that attaches one vhost-user NIC (libvirt's view of `qemu_args`):
    shared guest RAM (<memory>, <memoryBacking>), the <interface>, and for --vectors a
    <qemu:override> (libvirt has no element for virtio-net-pci's `vectors`)."""
    from xml.etree import ElementTree as ET

    size, unit = libvirt_memory(mem)
    memory = ET.Element("memory", unit=unit)
    memory.text = str(size)
    backing = ET.Element("memoryBacking")
    ET.SubElement(backing, "source", type="memfd")
    ET.SubElement(backing, "access", mode="shared")
    nic = ET.Element("interface", type="vhostuser")
    if vectors is not None:
        ET.SubElement(nic, "alias", name=f"ua-{ident}")  # user aliases start with ua-
    ET.SubElement(nic, "mac", address=mac)
    source = ET.SubElement(nic, "source", type="unix", path=os.path.abspath(socket_path),
                           mode="client")
    ET.SubElement(source, "reconnect", enabled="yes", timeout="1")
    ET.SubElement(nic, "model", type="virtio")
    if queues > 1:
        ET.SubElement(nic, "driver", queues=str(queues))
    parts = [("<domain>: guest RAM, all of it shared with vhostvpn (must equal the "
              "domain's memory)", [memory, backing]),
             ("<devices>", [nic])]
    if vectors is not None:
        ET.register_namespace("qemu", LIBVIRT_QEMU_NS)
        override = ET.Element(f"{{{LIBVIRT_QEMU_NS}}}override")
        device = ET.SubElement(override, f"{{{LIBVIRT_QEMU_NS}}}device", alias=f"ua-{ident}")
        frontend = ET.SubElement(device, f"{{{LIBVIRT_QEMU_NS}}}frontend")
        ET.SubElement(frontend, f"{{{LIBVIRT_QEMU_NS}}}property", name="vectors",
                      type="unsigned", value=str(vectors))
        parts.append((f"<domain>, after <devices>: vectors={vectors} for the NIC "
                      "(libvirt has no element for it)", [override]))
    lines = []
    for where, elements in parts:
        lines.append(f"<!-- in {where} -->")
        for element in elements:
            ET.indent(element)
            lines.append(ET.tostring(element, encoding="unicode"))
    return "\n".join(lines)


def address_range(text: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """FIRST-LAST, two IPv4 addresses, FIRST <= LAST (argparse type)."""
    first, sep, last = text.partition("-")
    try:
        if not sep:
            raise ValueError
        start, end = ipaddress.IPv4Address(first.strip()), ipaddress.IPv4Address(last.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want FIRST-LAST, e.g. 10.77.0.100-10.77.0.199") from None
    if start > end:
        raise argparse.ArgumentTypeError(f"{text!r}: {start} comes after {end}")
    return start, end


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


def open_metrics(command: str,
                 address: tuple[str | None, int] | None) -> socket.socket | None:
    """The --metrics socket, bound and listening before the daemon starts; a port in use (or
    an address this machine lacks, a privileged port) is one line and exit status 1."""
    if address is None:
        return None
    from tunnel.metrics import bind_metrics

    host, port = address
    try:
        return bind_metrics(host, port)
    except OSError as exc:
        from tunnel.startup import explain_bind

        shown = f"[{host}]" if host and ":" in host else (host or "")
        raise SystemExit(f"vhostvpn {command}: --metrics {shown}:{port}: "
                         f"{explain_bind(exc, host, port)}") from None


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
    _add_metrics(parser)
    _add_config(parser)
    _add_common(parser)


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


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML file holding any of these flags (names without the "
                             "dashes; flags on the command line win)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vhostvpn",
        description="Put QEMU virtual machines and hosts on one encrypted network.",
    )
    parser.add_argument("--version", action="version", version=f"vhostvpn {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

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
    tun = hub.add_argument_group("the tunnel: endpoints join over TLS")
    tun.add_argument("--listen", type=host_port, metavar="HOST:PORT",
                     help="accept endpoints on this TCP address (e.g. :7777)")
    tun.add_argument("--identity", type=Path, metavar="DIR",
                     help="the hub's key and certificate (vhostvpn keygen DIR)")
    tun.add_argument("--peers", type=Path, metavar="FILE",
                     help="'name fingerprint' lines: the endpoints allowed in (reread on "
                          "SIGHUP)")
    tun.add_argument("--name", default="hub", help="the hub's name in HELLO and logs")
    hub.add_argument("--no-port-policy", action="store_true",
                     help="trust every guest: no MAC/IP anti-spoofing, limits or guards "
                          "(benchmarks, labs where every guest is yours)")
    _add_metrics(hub)
    hub.add_argument("--pcap", type=Path, metavar="DIR",
                     help="write what every port sends and receives to DIR/<port>.pcapng")
    _add_common(hub)

    _add_config(hub)

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

    keygen = sub.add_parser("keygen", help="create a key and certificate in DIR")
    keygen.add_argument("directory", type=Path, metavar="DIR")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    _add_common(keygen)

    fingerprint = sub.add_parser("fingerprint", help="print the key fingerprint of DIR")
    fingerprint.add_argument("directory", type=Path, metavar="DIR",
                             help="an identity folder (vhostvpn keygen DIR), or its key.pem")
    _add_common(fingerprint)

    status = sub.add_parser("status", help="show a running hub's or endpoint's state")
    status.add_argument("--control", metavar="PATH",
                        help="the process's control socket (default: every one answering in "
                             "/run/vhostvpn as root, else $XDG_RUNTIME_DIR/vhostvpn)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    _add_common(status)

    qa = sub.add_parser("qemu-args", help="print the QEMU options to attach a guest")
    qa.add_argument("--socket", required=True, metavar="PATH")
    qa.add_argument("--mac", help="guest MAC (default: derived from the socket path)")
    qa.add_argument("--mem", type=memory_size, default="1G",
                    help="guest memory size, the same as QEMU's -m: a number is MiB, or give "
                         "a suffix: 512M, 2G (default 1G)")
    qa.add_argument("--queues", type=int, default=1, help="queue pairs (default 1)")
    qa.add_argument("--backend-queues", type=int, default=DEFAULT_QUEUE_PAIRS, metavar="N",
                    help="queue pairs the hub or `vhostvpn vm` serving --socket offers (its "
                         f"--queues; default {DEFAULT_QUEUE_PAIRS})")
    qa.add_argument("--vectors", type=int,
                    help="MSI-X vectors (use 0 for QEMU 7.2 under TCG; default: QEMU's)")
    qa.add_argument("--id", default="net0", help="QEMU object id prefix (default net0)")
    qa.add_argument("--libvirt", action="store_true",
                    help="print libvirt domain XML (<memory>, <memoryBacking>, <interface>) "
                         "instead of QEMU options")
    _add_common(qa)

    _add_capture_parser(sub)
    completion = sub.add_parser("completion", help="print a shell completion script",
                                description="Print the completion script for SHELL: "
                                            "`vhostvpn completion bash > "
                                            "/etc/bash_completion.d/vhostvpn`, or "
                                            "`source <(vhostvpn completion bash)`.")
    completion.add_argument("shell", choices=["bash"], metavar="SHELL", help="bash")
    _add_common(completion)

    from tunnel.lab import add_lab_parser

    add_lab_parser(sub, _add_common)
    return parser


def _add_capture_parser(sub: argparse._SubParsersAction) -> None:
    from netstack.pcap import DEFAULT_SNAPLEN, MAX_SNAPLEN

    capture = sub.add_parser(
        "capture", help="stream pcapng of one port of a running hub or endpoint to stdout",
        description="Stream what PORT sends and receives as pcapng to stdout, e.g. "
                    "`vhostvpn capture --control /run/hub.ctl vm1 | wireshark -k -i -`. "
                    "PORT is a name `vhostvpn status` shows (a peer, gateway, a socket's "
                    "file name with or without .sock).")
    capture.add_argument("port", metavar="PORT")
    capture.add_argument("--control", metavar="PATH",
                         help="the hub's or endpoint's control socket (default: the one "
                              "process answering on a default control socket, as for status)")
    capture.add_argument("--snaplen", type=int, default=DEFAULT_SNAPLEN, metavar="BYTES",
                         help=f"keep at most BYTES of each frame (1-{MAX_SNAPLEN}, default "
                              f"{DEFAULT_SNAPLEN}: whole frames)")
    capture.add_argument("--count", type=int, metavar="N", help="stop after N frames")
    capture.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    _add_common(capture)


async def serve(run, on_sighup=None) -> None:
    """Run a daemon's main task until SIGTERM or SIGINT; SIGHUP calls `on_sighup`.

    Signals belong to the process, so they are handled here, once, and not by the Hub or
    Endpoint objects (several of which may run in one process, in the tests).
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if on_sighup is not None:
                        on_sighup()
                    continue
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                return


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

    if not args.socket and not args.client_socket and not args.listen:
        raise SystemExit("vhostvpn hub: give --listen, or at least one --socket or "
                         "--client-socket")
    if args.listen and (args.identity is None or args.peers is None):
        raise SystemExit("vhostvpn hub: --listen needs --identity DIR and --peers FILE")
    if not 1 <= args.queues <= 64:
        raise SystemExit(f"vhostvpn hub: --queues {args.queues}: want 1 to 64")
    paths = args.socket + args.client_socket
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise SystemExit("vhostvpn hub: the same socket path was given twice")
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
                       socket_access=socket_access_of(args, "hub"))
    config.control = claim_socket_paths("hub", args.socket, args.control)
    metrics = open_metrics("hub", args.metrics)
    try:
        hub = Hub(config)
    except Exception as exc:  # keys, peers file, state directory
        raise SystemExit(f"vhostvpn hub: {setup_failure(exc)}") from None
    from tunnel.daemon import run_daemon

    return run_role("hub", functools.partial(run_daemon, hub.run, hub.status, metrics),
                    hub.tunnel.reload if hub.tunnel is not None else None)


def setup_failure(exc: Exception) -> str:
    """A daemon's set-up error (before it runs) in one line naming the flag; anything that
    is not a set-up error is re-raised (a bug: its traceback is the useful part)."""
    from tunnel.keys import IdentityError, PeersFileError

    if isinstance(exc, IdentityError):
        return f"--identity: {exc}"
    if isinstance(exc, PeersFileError):
        return f"--peers: {exc}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"  # e.g. the state or capture folder
    if isinstance(exc, OSError | ValueError):
        return str(exc)
    raise exc


def run_role(command: str, run, on_sighup=None) -> int:
    """Run a hub or endpoint (`run`: tunnel/daemon.py's wrapper around it) until it is told
    to stop; a failure to start (a port in use, a device that cannot be had:
    tunnel/startup.py) is one line naming the flag, exit status 1."""
    from tunnel.host.hostnet import HostNetworkError
    from tunnel.startup import find_failure

    tune_gc()
    try:
        trio.run(serve, run, on_sighup)
    except Exception as exc:
        failure = find_failure(exc, (OSError, HostNetworkError))
        if failure is None:
            raise
        log.debug("%s: stopped by %r", command, failure, exc_info=exc)
        raise SystemExit(f"vhostvpn {command}: {failure}") from None
    return 0


def _host_of(subnet: ipaddress.IPv4Network, address: ipaddress.IPv4Address) -> bool:
    return address in subnet and address not in (subnet.network_address,
                                                 subnet.broadcast_address)


def _check_dhcp_addresses(args: argparse.Namespace) -> None:
    """--dhcp-range and --dhcp-reserve lie in --subnet (checked again by the DHCP server;
    here the message can name the flag)."""
    subnet = args.subnet
    if subnet is None:
        return
    if args.dhcp_range is not None and not all(_host_of(subnet, a) for a in args.dhcp_range):
        first, last = args.dhcp_range
        raise SystemExit(f"vhostvpn hub: --dhcp-range {first}-{last} is not a range of hosts "
                         f"of {subnet} (--subnet): both ends must be host addresses in it")
    for mac, address in args.dhcp_reserve:
        if not _host_of(subnet, address):
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


def check_socket_path_syntax(command: str, args: argparse.Namespace) -> None:
    """A comma in a vhost-user socket path would break QEMU's `-chardev socket,path=...`
    (commas separate its options), so such a path is refused before anything starts."""
    for flag in ("socket", "client_socket"):
        paths = getattr(args, flag, [])
        for path in [paths] if isinstance(paths, str) else paths:
            if "," in os.path.abspath(path):
                raise SystemExit(f"vhostvpn {command}: --{flag.replace('_', '-')} {path}: "
                                 f"a comma in the path breaks QEMU's -chardev option "
                                 f"(commas separate its options): choose a path without one")


def claim_socket_paths(command: str, sockets: list[str], control: str | None) -> str:
    """Before a daemon starts: refuse (one line, exit status 1) when a process answers on
    one of its --socket or --control paths, or their folder cannot take a socket; remove
    stale socket files (virtio/unixsock.py).  Returns the control socket's path: --control,
    or the default for `command` (tunnel/control.py)."""
    from virtio.unixsock import SocketPathBusy, claim

    paths = [("--socket", path) for path in sockets]
    if control:
        paths.append(("--control", control))
    else:
        control = default_control_path(command)
        paths.append(("--control (not given; the default)", control))
    for flag, path in paths:
        check_socket_folder(command, flag, path)
        try:
            claim(path)
        except SocketPathBusy as exc:
            raise SystemExit(f"vhostvpn {command}: {flag} {exc}") from None
    return control


def default_control_path(command: str) -> str:
    """The default control socket of `command`, its folder made if missing."""
    from tunnel.control import default_control, make_runtime_dir

    try:
        make_runtime_dir()
    except OSError as exc:
        raise SystemExit(f"vhostvpn {command}: --control not given and the default folder "
                         f"cannot be used: {exc.strerror or exc} (give --control PATH)") from None
    return str(default_control(command))


def check_socket_folder(command: str, flag: str, path: str) -> None:
    """The folder of a socket path exists and this user may create a socket in it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"vhostvpn {command}: {flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"vhostvpn {command}: {flag} {path}: this user may not create files "
                         f"in {folder} (run as a user who may, or choose another folder)")


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
    host, port = args.hub
    return EndpointConfig(
        hub_host=host or "localhost", hub_port=port, identity_dir=args.identity,
        hub_fingerprint=args.hub_fingerprint, control=args.control, name=args.name,
        rekey_seconds=args.rekey_seconds, **local)


def _run_endpoint(config, command: str, metrics_address: tuple[str | None, int] | None) -> int:
    from tunnel.endpoint import Endpoint

    metrics = open_metrics(command, metrics_address)
    try:
        endpoint = Endpoint(config)
    except Exception as exc:  # keys
        raise SystemExit(f"vhostvpn {command}: {setup_failure(exc)}") from None
    from tunnel.daemon import run_daemon

    return run_role(command, functools.partial(run_daemon, endpoint.run, endpoint.status,
                                               metrics))


def _cmd_vm(args: argparse.Namespace) -> int:
    if not args.socket and not args.client_socket:
        raise SystemExit("vhostvpn vm: give at least one --socket or --client-socket")
    if not 1 <= args.queues <= 64:
        raise SystemExit(f"vhostvpn vm: --queues {args.queues}: want 1 to 64")
    check_socket_path_syntax("vm", args)
    config = _endpoint_config(args, "vm", sockets=args.socket,
                              client_sockets=args.client_socket, queue_pairs=args.queues,
                              port_policy=not args.no_port_policy,
                              socket_access=socket_access_of(args, "vm"))
    config.control = claim_socket_paths("vm", args.socket, args.control)
    return _run_endpoint(config, "vm", args.metrics)


def _cmd_host(args: argparse.Namespace) -> int:
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
    return _run_endpoint(config, "host", args.metrics)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from tunnel.keys import IdentityError, keygen

    try:
        print(keygen(args.directory, force=args.force))
    except IdentityError as exc:
        raise SystemExit(f"vhostvpn keygen: {exc}") from None
    return 0


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    from tunnel.keys import CERT_FILE, KEY_FILE, IdentityError, identity_fingerprint

    directory = args.directory
    if directory.is_file():
        if directory.name not in (KEY_FILE, CERT_FILE):
            raise SystemExit(f"vhostvpn fingerprint: {directory} is a file: give the identity "
                             f"folder `vhostvpn keygen DIR` made (it holds {KEY_FILE} and "
                             f"{CERT_FILE})")
        directory = directory.parent  # its key.pem or cert.pem: the folder holds the pair
    try:
        print(identity_fingerprint(directory))
    except IdentityError as exc:
        raise SystemExit(f"vhostvpn fingerprint: {exc}") from None
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from tunnel.control import query

    if args.control:
        try:
            answers = {args.control: query(args.control)}
        except (OSError, ValueError) as exc:
            print(f"vhostvpn status: cannot reach {args.control}: {exc}", file=sys.stderr)
            return 1
    else:
        answers = query_default_controls()
    if args.json:
        if len(answers) > 1:
            raise SystemExit(f"vhostvpn status: {len(answers)} processes answer "
                             f"({', '.join(answers)}): give --control PATH")
        print(json.dumps(next(iter(answers.values())), indent=2))
        return 0
    print("\n\n".join(f"{path}:\n{format_status(state)}" if len(answers) > 1
                      else format_status(state) for path, state in answers.items()))
    return 0


def query_default_controls(command: str = "status") -> dict[str, dict]:
    """The status of every process answering on a default control socket (tunnel/control.py;
    sockets nobody answers on are left by killed processes and skipped); exit status 1 with
    what to do when there is none."""
    from tunnel.control import control_sockets, query, runtime_dir

    answers = {}
    for path in control_sockets():
        try:
            answers[str(path)] = query(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            continue
        except (OSError, ValueError) as exc:
            raise SystemExit(f"vhostvpn {command}: cannot reach {path}: {exc}") from None
    if not answers:
        raise SystemExit(f"vhostvpn {command}: no vhostvpn process answers in {runtime_dir()} "
                         f"(give --control PATH if it was started with one)")
    return answers


def the_default_control(command: str) -> str:
    """The control socket when --control is not given and one process answers on a default
    one; exit status 1 naming them when there are several."""
    answers = query_default_controls(command)
    if len(answers) > 1:
        raise SystemExit(f"vhostvpn {command}: {len(answers)} processes answer "
                         f"({', '.join(answers)}): give --control PATH")
    return next(iter(answers))


def format_status(state: dict) -> str:
    lines = [f"{state.get('role', '?')} (pid {state.get('pid', '?')})"
             + (f", key {state['fingerprint']}" if state.get("fingerprint") else "")]
    session = state.get("session")
    if session is not None:
        rtt = session.get("rtt_ms")
        lines.append(
            f"  session to {state.get('hub')}: {session['state']}"
            + (f", rtt {rtt:.2f} ms" if rtt is not None else "")
            + f", {session.get('reconnects', 0)} reconnects"
            + (f", last error: {session['last_error']}" if session.get("last_error") else ""))
    tunnel = state.get("tunnel")
    if tunnel is not None:
        refused = ", ".join(f"{k}={v}" for k, v in sorted(tunnel.get("refused", {}).items()))
        lines.append(f"  tunnel on {', '.join(tunnel['listen'])}: {tunnel['peers']} peers, "
                     f"key {tunnel['fingerprint']}" + (f", refused {refused}" if refused else ""))
        lines += _format_offline_peers(tunnel.get("peer_list", []))
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
        if port.get("kind") == "session":
            rtt = port.get("rtt_ms")
            lines.append(f"  {port['name']}: session {port.get('state')}"
                         + (f" from {port['peer']}" if port.get("peer") else "")
                         + (f", rtt {rtt:.2f} ms" if rtt is not None else "")
                         + f", {traffic}")
            continue
        if port.get("kind") in ("tap", "tun"):
            lines += _format_device(port, traffic)
            continue
        link = "up" if port.get("link_up") else "down"
        broken = f" BROKEN: {port['broken']}" if port.get("broken") else ""
        lines.append(f"  {port['name']}: link {link}{broken}, features "
                     f"{port.get('features', '-')}, {traffic}")
    macs = state.get("macs", [])
    if macs:
        lines.append("  MAC table:")
        lines.extend(f"    {m['mac']} -> {m['port']} "
                     + ("(pinned)" if m["age"] is None else f"(seen {m['age']} s ago)")
                     for m in macs)
    return "\n".join(lines)


def _format_device(port: dict, traffic: str) -> list[str]:
    """A host's TAP or TUN port: the kernel's view of the device, its addresses (a leased
    one named), then the traffic."""
    kernel = port.get("kernel", {})
    if "error" in kernel:
        link = f"link unknown ({kernel['error']})"
    elif kernel:
        link = (f"link {'up' if kernel.get('admin_up') else 'down'}, carrier "
                f"{'on' if kernel.get('carrier') else 'off'}, operstate "
                f"{kernel.get('operstate')}, mtu {kernel.get('mtu')}")
    else:
        link = "link unknown"
    lines = [f"  {port['name']} ({port['kind']}): {link}"]
    dhcp = port.get("dhcp")
    if dhcp is not None:
        lines.append(f"    DHCP {dhcp.get('state')}"
                     + (f", leased {dhcp['address']}" if dhcp.get("address") else ""))
    addresses = kernel.get("addresses")
    if addresses is not None:
        lines.append(f"    addresses: {', '.join(addresses) or 'none'}")
    lines.append(f"    {traffic}")
    return lines


def _format_offline_peers(peers: list[dict]) -> list[str]:
    """The peers file's peers that are not connected: when each was last seen, from where,
    with which addresses on the segment."""
    offline = [peer for peer in peers if not peer.get("online")]
    if not offline:
        return []
    lines = ["  offline peers:"]
    for peer in offline:
        if peer.get("last_seen") is None:
            lines.append(f"    {peer['name']}: not seen since the hub started")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(peer["last_seen"]))
        ago = _ago(time.time() - peer["last_seen"])
        lines.append(f"    {peer['name']}: last seen {when} ({ago} ago) from {peer.get('from')}"
                     + (f", addresses {', '.join(peer['addresses'])}"
                        if peer.get("addresses") else ""))
    return lines


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _cmd_qemu_args(args: argparse.Namespace) -> int:
    mac = args.mac or default_mac(args.socket)
    try:
        nic_mac(mac)
    except ValueError as exc:
        raise SystemExit(f"vhostvpn qemu-args: --mac: {exc}") from None
    if not 1 <= args.queues <= 64:
        raise SystemExit(f"vhostvpn qemu-args: --queues {args.queues}: want 1 to 64")
    if args.queues > args.backend_queues:
        raise SystemExit(
            f"vhostvpn qemu-args: --queues {args.queues}: the hub or `vhostvpn vm` serving "
            f"the socket offers {args.backend_queues} queue pairs (its --queues, default "
            f"{DEFAULT_QUEUE_PAIRS}) and QEMU refuses more; start it with --queues "
            f"{args.queues} and give --backend-queues {args.queues} here")
    check_socket_path_syntax("qemu-args", args)
    if args.libvirt:
        try:
            print(libvirt_xml(args.socket, mac, args.mem, args.queues, args.vectors, args.id))
        except ValueError as exc:
            raise SystemExit(f"vhostvpn qemu-args: --mem {exc}") from None
        return 0
    print(" ".join(qemu_args(args.socket, mac, args.mem, args.queues, args.vectors, args.id)))
    return 0


def nic_mac(text: str) -> bytes:
    """A MAC a NIC may have: unicast (a multicast one is silently useless: the guest's
    frames would come from a group address, which switches flood and never learn)."""
    mac = parse_mac(text.lower())
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address (the first byte is odd); a NIC "
                         f"needs a unicast one, e.g. 52:54:00:12:34:56")
    if not any(mac):
        raise ValueError(f"{text} is the zero address; a NIC needs a unicast one, e.g. "
                         f"52:54:00:12:34:56")
    return mac


def memory_size(text: str) -> str:
    """QEMU's -m syntax (a number is MiB; K, M, G, T suffixes) as the memory backend's size=
    (where a plain number would be bytes): 1024 -> 1024M, 2G -> 2G (argparse type)."""
    match = MEMORY_SIZE.fullmatch(text.strip())
    if match is None or float(match["number"]) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want a size as QEMU's -m takes it: 1024 (MiB), 512M, 2G")
    return match["number"] + (match["unit"] or "M").upper()


def _cmd_capture(args: argparse.Namespace) -> int:
    from netstack.pcap import MAX_SNAPLEN
    from tunnel.capture import CaptureError, stream_capture

    if not 1 <= args.snaplen <= MAX_SNAPLEN:
        raise SystemExit(f"vhostvpn capture: --snaplen {args.snaplen}: want 1 to {MAX_SNAPLEN}")
    if args.count is not None and args.count < 1:
        raise SystemExit(f"vhostvpn capture: --count {args.count}: want at least 1")
    if sys.stdout.isatty():
        raise SystemExit("vhostvpn capture: stdout is a terminal: pipe it (| wireshark -k -i -"
                         ", | tshark -r -) or redirect it (> FILE.pcapng)")
    if args.control is None:
        args.control = the_default_control("capture")
    try:
        port, frames = stream_capture(args.control, args.port, sys.stdout.buffer,
                                      snaplen=args.snaplen, count=args.count,
                                      seconds=args.seconds)
    except CaptureError as exc:
        raise SystemExit(f"vhostvpn capture: {exc}") from None
    except BrokenPipeError:  # the reader (wireshark, head) went away: a normal end
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        raise SystemExit(f"vhostvpn capture: cannot reach {args.control}: {exc}") from None
    except KeyboardInterrupt:
        return 0
    log.info("capture of %s: %d frames", port, frames)
    return 0


def _cmd_completion(args: argparse.Namespace) -> int:
    from tunnel.completion import bash_script

    sys.stdout.write(bash_script(build_parser()))
    return 0


def _cmd_lab(args: argparse.Namespace) -> int:
    from tunnel.lab import command

    return command(args)


COMMANDS = {"hub": _cmd_hub, "vm": _cmd_vm, "host": _cmd_host, "status": _cmd_status,
            "qemu-args": _cmd_qemu_args, "keygen": _cmd_keygen, "fingerprint": _cmd_fingerprint,
            "lab": _cmd_lab, "capture": _cmd_capture, "completion": _cmd_completion}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a --config TOML file's values before it (tunnel/configfile.py)."""
    from tunnel.configfile import ConfigError, config_tokens, find_config

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    config_path = find_config(argv[1:])
    subparser = _subparsers(parser).get(argv[0]) if argv else None
    if config_path is None or subparser is None or "config" not in _dests(subparser):
        return parser.parse_args(argv)
    try:
        tokens = config_tokens(config_path, subparser, argv[1:])
    except ConfigError as exc:
        subparser.error(str(exc))
    # The file first, the command line after it: later flags win, lists add up.
    return parser.parse_args([argv[0], *tokens, *argv[1:]])


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return parser._subparsers._group_actions[0].choices


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
