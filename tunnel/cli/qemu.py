"""`vhostvpn qemu-args`: the QEMU options (or, with --libvirt, the libvirt domain XML) that
attach a guest's virtio-net NIC to a vhost-user socket served by the hub or `vhostvpn vm`.

Pure: the output is text built from the flags; nothing is started or touched.
"""

from __future__ import annotations

import argparse
import os
import re

from netstack.frame import QEMU_OUI, format_mac, parse_mac, stable_mac
from tunnel.cli.flags import add_common, check_queue_pairs, check_socket_path_syntax
from virtio.protocol import DEFAULT_QUEUE_PAIRS

# QEMU's -m: a number (MiB unless suffixed), optionally with a K, M, G or T suffix.
MEMORY_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[KMGTkmgt])?")
# The namespace of libvirt's QEMU-specific elements (<qemu:override>).
LIBVIRT_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# QEMU's -m suffixes (none: MiB) and libvirt's names for the same units.
LIBVIRT_MEMORY_UNITS = {"": "MiB", "K": "KiB", "M": "MiB", "G": "GiB", "T": "TiB"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The qemu-args subcommand."""
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
    add_common(qa)


def cmd_qemu_args(args: argparse.Namespace) -> int:
    mac = args.mac or default_mac(args.socket)
    try:
        nic_mac(mac)
    except ValueError as exc:
        raise SystemExit(f"vhostvpn qemu-args: --mac: {exc}") from None
    check_queue_pairs("qemu-args", args.queues)
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
