"""The hub assembled: vhost-user ports, the gateway port and captures, in one process, driven
by the model front-end; what status shows."""

import contextlib
import ipaddress
import shutil
import subprocess
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from netstack.frame import Frame
from netstack.policy import PortPolicy
from netstack.port import QueuedPort
from tests.support.pcapng import read_pcapng
from tests.support.virtio_driver import GuestRam, VhostUserFrontend
from tunnel.control import query
from tunnel.hub import Hub, HubConfig

GUEST_MAC = "52:54:00:00:00:01"


def dhcp_discover(mac: str, xid: int) -> Ether:
    return (Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
            / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")), xid=xid)
            / DHCP(options=[("message-type", "discover"), "end"]))


@asynccontextmanager
async def hub_with_guests(config: HubConfig, count: int):
    """The hub running with `count` model guests on its first sockets, RX buffers posted."""
    async with trio.open_nursery() as nursery:
        hub = Hub(config)
        await nursery.start(hub.run)
        with contextlib.ExitStack() as rams:
            async with contextlib.AsyncExitStack() as guests:
                fronts = []
                for path in config.sockets[:count]:
                    ram = rams.enter_context(GuestRam(1 << 22))
                    fronts.append(await guests.enter_async_context(
                        VhostUserFrontend.connect(path, ram)))
                for fe in fronts:
                    fe.net.post_rx(16)
                    fe.kick(0)
                await trio.testing.wait_all_tasks_blocked()
                yield hub, fronts
        nursery.cancel_scope.cancel()


async def exchange(fe, frame: Ether, want: str) -> Ether:
    """Send `frame` from the guest; the first frame with layer `want` that comes back (the
    guest also sees others' broadcasts, so every arrival is looked at)."""
    fe.net.send([bytes(frame)])
    fe.kick(1)
    rx = fe.queues[0]
    with trio.fail_after(5):
        while True:
            rx.set_used_event(rx.used_idx())  # EVENT_IDX: a call at the next frame
            for _, data in fe.net.receive():
                if Ether(data).haslayer(want):
                    return Ether(data)
            await fe.wait_call(0)


async def test_dhcp_range_lease_time_and_domain_reach_the_guest(tmp_path):
    config = HubConfig(sockets=[str(tmp_path / "vm.sock")], state_dir=tmp_path,
                       subnet=ipaddress.IPv4Network("10.77.0.0/24"),
                       dhcp_range=(ipaddress.IPv4Address("10.77.0.200"),
                                   ipaddress.IPv4Address("10.77.0.209")),
                       lease_seconds=120, domain="lab.example")
    async with hub_with_guests(config, 1) as (_, [fe]):
        offer = await exchange(fe, dhcp_discover(GUEST_MAC, 7), "DHCP")
    options = dict(o for o in offer[DHCP].options if isinstance(o, tuple))
    assert offer[BOOTP].yiaddr == "10.77.0.200"
    assert options["message-type"] == 2 and options["lease_time"] == 120
    assert options["domain"] == b"lab.example"


async def test_a_dhcp_reservation_outside_the_range_is_what_the_guest_gets(tmp_path):
    config = HubConfig(sockets=[str(tmp_path / "vm.sock")], state_dir=tmp_path,
                       subnet=ipaddress.IPv4Network("10.77.0.0/24"),
                       dhcp_range=(ipaddress.IPv4Address("10.77.0.200"),
                                   ipaddress.IPv4Address("10.77.0.209")),
                       dhcp_reservations={bytes.fromhex(GUEST_MAC.replace(":", "")):
                                          ipaddress.IPv4Address("10.77.0.10")})
    async with hub_with_guests(config, 1) as (_, [fe]):
        offer = await exchange(fe, dhcp_discover(GUEST_MAC, 8), "DHCP")
    assert offer[BOOTP].yiaddr == "10.77.0.10"


async def test_dhcp_skips_an_address_a_static_guest_uses(tmp_path):
    """Guest A was configured by hand at 10.77.0.2 and has spoken (an ARP): guest B's DHCP
    offer skips that address instead of colliding with it."""
    config = HubConfig(sockets=[str(tmp_path / "a.sock"), str(tmp_path / "b.sock")],
                       state_dir=tmp_path, subnet=ipaddress.IPv4Network("10.77.0.0/24"))
    static_mac = "52:54:00:00:00:0a"
    async with hub_with_guests(config, 2) as (hub, [a, b]):
        await exchange(a, Ether(src=static_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=static_mac, psrc="10.77.0.2", pdst="10.77.0.1"), "ARP")
        offer = await exchange(b, dhcp_discover("52:54:00:00:00:0b", 9), "DHCP")
    assert offer[BOOTP].yiaddr == "10.77.0.3"
    assert hub.gateway.dhcp.counters["in_use_elsewhere"] >= 1


async def test_gateway_answers_a_guest_and_captures_record_both_ports(tmp_path):
    config = HubConfig(sockets=[str(tmp_path / "vm.sock")], control=str(tmp_path / "ctl"),
                       subnet=ipaddress.IPv4Network("10.77.0.0/24"), state_dir=tmp_path,
                       pcap_dir=tmp_path / "pcap")
    request = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=GUEST_MAC, psrc="10.77.0.5", pdst="10.77.0.1")
    async with hub_with_guests(config, 1) as (_, [fe]):
        reply = await exchange(fe, request, "ARP")
        assert reply[ARP].op == 2 and reply[ARP].psrc == "10.77.0.1"
        state = await trio.to_thread.run_sync(query, str(tmp_path / "ctl"))
    gateway = next(p for p in state["ports"] if p["name"] == "gateway")
    assert gateway["services"]["arp_reply"] == 1
    assert "dhcp" in gateway
    guest_capture = read_pcapng(tmp_path / "pcap" / "vm.sock.pcapng")
    assert [c.direction for c in guest_capture] == ["in", "out"]
    assert guest_capture[0].data == bytes(request)
    gateway_capture = read_pcapng(tmp_path / "pcap" / "gateway.pcapng")
    assert [c.direction for c in gateway_capture] == ["out", "in"]
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", str(tmp_path / "pcap" / "vm.sock.pcapng"),
                              "-T", "fields", "-e", "arp.opcode"],
                             capture_output=True, text=True, timeout=60).stdout.split()
        assert out == ["1", "2"]


def test_the_gateways_mac_and_addresses_are_reserved_on_the_switch(tmp_path):
    hub = Hub(HubConfig(sockets=[str(tmp_path / "a.sock")], state_dir=tmp_path,
                        subnet=ipaddress.IPv4Network("10.77.0.0/24"),
                        ipv6_prefix=ipaddress.IPv6Network("fd77::/64")))
    gateway, addresses = hub.gateway, hub.switch.addresses
    assert hub.switch.mac_table[gateway.mac] == (gateway, float("inf"))
    assert len(gateway.addresses) == 3
    assert all(addresses.reserved(ip) and addresses.owners[ip][0] is gateway
               for ip in gateway.addresses)


def test_hub_without_a_subnet_has_no_gateway(tmp_path):
    hub = Hub(HubConfig(sockets=[str(tmp_path / "a.sock")]))
    assert hub.gateway is None and [p.name for p in hub.ports] == ["a.sock"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subnet", "10.0.0.0/31"], "too small"),
        (["--subnet", "10.0.0.0/24", "--gateway", "10.0.1.1"], "not a host address"),
        (["--gateway", "10.0.0.1"], "needs --subnet"),
        (["--ipv6-prefix", "fd00::/48"], "/64"),
        (["--mtu", "100"], "576 to 65535"),
        (["--subnet", "not-a-net"], "want a subnet such as 10.77.0.0/24"),
    ],
)
def test_bad_network_flags_are_refused(tmp_path, args, message):
    import sys

    result = subprocess.run([sys.executable, "-m", "tunnel.cli", "hub", "--socket",
                             str(tmp_path / "a.sock"), *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0 and message in result.stderr


class Recorder(QueuedPort):
    """A guest's port that notes, in a log shared with others, each batch it is given."""

    def __init__(self, name: str, log: list) -> None:
        super().__init__(name, policy=PortPolicy())
        self.log = log

    def deliver(self, frames: list[Frame]) -> None:
        self.log.append((self.name, [Ether(bytes(f.data)) for f in frames]))
        super().deliver(frames)


async def test_the_gateways_replies_leave_within_the_switch_call_that_delivered_the_requests(
        tmp_path):
    """No task runs between the request's forward and its reply's (on the data loop the
    handler that read the request sends the reply), and the reply follows the whole batch."""
    config = HubConfig(subnet=ipaddress.IPv4Network("10.77.0.0/24"), state_dir=tmp_path)
    log: list = []
    async with trio.open_nursery() as nursery:
        hub = Hub(config)
        await nursery.start(hub.run)
        await trio.testing.wait_all_tasks_blocked()
        guest, other = Recorder("guest", log), Recorder("other", log)
        hub.switch.attach(guest)
        hub.switch.attach(other)
        arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=GUEST_MAC, psrc="10.77.0.5", pdst="10.77.0.1")
        echo = Ether(src=GUEST_MAC, dst=hub.gateway.mac) / IP(src="10.77.0.5",
                                                                dst="10.77.0.1") / ICMP()
        hub.switch.forward(guest, [Frame(bytes(arp)), Frame(bytes(echo))])
        assert [name for name, _ in log] == ["other", "guest"]
        (arp_reply,) = [f for f in log[1][1] if ARP in f]
        (echo_reply,) = [f for f in log[1][1] if ICMP in f]
        assert arp_reply[ARP].op == 2 and arp_reply[ARP].psrc == "10.77.0.1"
        assert echo_reply[ICMP].type == 0 and echo_reply[IP].src == "10.77.0.1"
        # Frames the gateway makes outside any delivery (the NAT's, from its sockets'
        # handlers) leave at once too.
        log.clear()
        hub.gateway.to_guests([Frame(bytes(Ether(src=hub.gateway.mac, dst=GUEST_MAC)
                                           / IP(src="192.0.2.1", dst="10.77.0.5") / ICMP()))])
        assert [name for name, _ in log] == ["guest"] and hub.gateway.outbox == []
        nursery.cancel_scope.cancel()
