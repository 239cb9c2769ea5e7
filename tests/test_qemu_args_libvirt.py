"""`vhostvpn qemu-args --libvirt`: the domain XML for one vhost-user NIC (what a real libvirtd
makes of it: tests/test_libvirt.py)."""

from __future__ import annotations

import subprocess
import sys
from xml.etree import ElementTree as ET

import pytest

from tunnel.cli.qemu import LIBVIRT_QEMU_NS, default_mac


def printed(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunnel.cli", "qemu-args", "--libvirt",
                           "--socket", "/run/vhostvpn/vm1.sock", *flags],
                          capture_output=True, text=True, timeout=30)


def elements(*flags: str) -> dict[str, ET.Element]:
    result = printed(*flags)
    assert result.returncode == 0, result.stderr
    fragment = ET.fromstring(f"<fragment>{result.stdout}</fragment>")
    return {element.tag: element for element in fragment}


def test_the_nic_is_a_vhostuser_interface_qemu_dials_with_shared_memfd_memory():
    parts = elements("--mem", "2G")
    assert list(parts) == ["memory", "memoryBacking", "interface"]
    assert (parts["memory"].get("unit"), parts["memory"].text) == ("GiB", "2")
    backing = parts["memoryBacking"]
    assert backing.find("source").attrib == {"type": "memfd"}
    assert backing.find("access").attrib == {"mode": "shared"}
    nic = parts["interface"]
    assert nic.get("type") == "vhostuser"
    assert nic.find("mac").get("address") == default_mac("/run/vhostvpn/vm1.sock")
    assert nic.find("source").attrib == {"type": "unix", "path": "/run/vhostvpn/vm1.sock",
                                         "mode": "client"}
    assert nic.find("source/reconnect").attrib == {"enabled": "yes", "timeout": "1"}
    assert nic.find("model").get("type") == "virtio"
    assert nic.find("driver") is None and nic.find("alias") is None


def test_queues_and_vectors_reach_the_xml():
    parts = elements("--queues", "4", "--vectors", "0", "--id", "vpn0", "--mac",
                     "52:54:00:00:00:07")
    nic = parts["interface"]
    assert nic.find("driver").attrib == {"queues": "4"}
    assert nic.find("mac").get("address") == "52:54:00:00:00:07"
    assert nic.find("alias").get("name") == "ua-vpn0"  # libvirt's user aliases start ua-
    q = f"{{{LIBVIRT_QEMU_NS}}}"
    override = parts[f"{q}override"]
    assert override.find(f"{q}device").get("alias") == "ua-vpn0"
    assert override.find(f"{q}device/{q}frontend/{q}property").attrib == {
        "name": "vectors", "type": "unsigned", "value": "0"}


@pytest.mark.parametrize(("mem", "value", "unit"), [
    ("1024", "1024", "MiB"), ("256M", "256", "MiB"), ("1g", "1", "GiB"),
    ("524288K", "524288", "KiB"),
])
def test_mem_is_read_as_qemu_reads_m(mem, value, unit):
    memory = elements("--mem", mem)["memory"]
    assert (memory.text, memory.get("unit")) == (value, unit)


def test_a_size_libvirt_cannot_take_is_one_line_and_exit_1():
    result = printed("--mem", "1.5G")
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.splitlines() == [
        "vhostvpn qemu-args: --mem '1.5G': want a whole size like 1G, 512M or 1024 (MiB)"]


@pytest.mark.parametrize("mem", ["0", "2X", ""])
def test_a_size_qemu_cannot_take_is_refused_as_a_flag_in_one_line(mem):
    result = printed("--mem", mem)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.splitlines() == [
        f"vhostvpn qemu-args: argument --mem: {mem!r}: want a size as QEMU's -m takes it: "
        f"1024 (MiB), 512M, 2G (see vhostvpn qemu-args --help)"]
