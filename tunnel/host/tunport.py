"""`vhostvpn host --tun`: a host joins the segment through a TUN device (IP packets, no
Ethernet), with netstack.host.l3host.L3Host doing ARP and neighbour discovery on its behalf and,
with --dhcp, netstack.host.dhcp_client.DhcpClient leasing its address from the hub.

The port's two directions:
  segment -> host (`deliver`, called by the switch): DHCP replies go to the client; every
    other frame goes through L3Host, which answers ARP/NDP (frames into `outbox`) and hands
    back IP packets, queued for the TUN writer;
  host -> segment (the reader task): packets read from the TUN in batches become frames
    through L3Host (or wait for their neighbour) and enter the switch.
Frames the port itself originates (ARP, NDP, DHCP, released packets) go through its `outbox`
into `Switch.send`, as the hub's gateway's do: an answer leaves from the handler that
delivered what it answers (after that batch: the switch is never re-entered from inside
`deliver`), a timer's frames from the shell's task, which also forwards what `send` left.
Addresses (static, leased, SLAAC) are put on the device
through netlink (tunnel/host/hostnet.py) and removed on exit.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable

import trio

from netstack.frame import Frame, stable_mac
from netstack.host.dhcp_client import DhcpClient, DhcpLease, is_dhcp_reply
from netstack.host.l3host import L3Host
from netstack.port import SpeakingPort
from netstack.switch import Switch
from tunnel.host.hostnet import HostNetwork, HostNetworkError
from tunnel.host.tuntap import BATCH, TunTapDevice, TunTapError, describe, write_queued
from virtio.dataloop import serve_readable

log = logging.getLogger(__name__)

# Packets waiting for the TUN writer before they are dropped (counted `queue_full`).
TUN_QUEUE_PACKETS = 1024


class TunPort(SpeakingPort):
    def __init__(
        self,
        device: TunTapDevice,
        network: HostNetwork,
        *,
        ipv4: ipaddress.IPv4Interface | None = None,
        ipv6: ipaddress.IPv6Interface | None = None,
        dhcp: bool = False,
        mac_seed: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`mac_seed` (the endpoint's identity fingerprint) makes the MAC this port speaks
        with unique on the segment and the same on every run: hosts with equally named TUN
        devices must not share one."""
        super().__init__(device.name, device.offloads, policy=None)
        self.device = device
        self.network = network
        self.clock = clock
        self.mac = stable_mac(f"vhostvpn tun {mac_seed} {device.name}")
        self.l3 = L3Host(self.mac, ipv4=ipv4, ipv6=ipv6, clock=clock)
        self.l3.on_slaac = self._add_address
        self.l3.on_slaac_lost = self._remove_address
        self.dhcp = DhcpClient(self.mac, on_bound=self._bound, on_lost=self._lost) if dhcp \
            else None
        self.lease: DhcpLease | None = None
        self.to_host: deque[Frame] = deque()
        self._host_ready: trio.Event | None = None  # wakes the TUN writer
        self._added: set[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = set()

    # -- the switch's side --------------------------------------------------------------------

    def deliver(self, frames: list[Frame]) -> None:
        now = self.clock()
        packets = self.to_host
        was_empty = not packets
        replies: list[Frame] = []
        for frame in frames:
            if self.dhcp is not None and is_dhcp_reply(frame):
                replies += self.dhcp.handle(frame, now)
                continue
            for_host, for_segment = self.l3.from_segment(frame)
            replies += for_segment
            room = TUN_QUEUE_PACKETS - len(packets)
            if len(for_host) > room:
                self.counters.drop("queue_full", len(for_host) - room)
                for_host = for_host[:room]
            packets.extend(Frame(packet, offload) for packet, offload in for_host)
        self._send(replies)
        if was_empty and packets and self._host_ready is not None:
            self._write_now()

    def _write_now(self) -> None:
        """Packets arrived for the idle TUN writer (from the task that switched them): write
        them from here, without a trip through Trio's scheduler; what the device does not
        take, and any error, is left to the writer task."""
        try:
            if write_queued(self.device, self.to_host, self.counters) and not self.to_host:
                return
        except TunTapError:
            pass  # the writer meets it again, in its own task
        if self._host_ready is not None:
            self._host_ready.set()


    # -- addresses ------------------------------------------------------------------------------

    def _bound(self, lease: DhcpLease) -> None:
        if self.lease is not None and self.lease.address == lease.address:
            self.lease = lease
            return  # a renewal
        if self.lease is not None:
            self._remove_address(self.lease.address)
        self.lease = lease
        log.info("%s: leased %s (router %s)", self.name, lease.address, lease.router)
        self._send(self.l3.configure_ipv4(lease.address, lease.router))
        self._add_address(lease.address)

    def _lost(self) -> None:
        if self.lease is not None:
            log.warning("%s: lease of %s lost", self.name, self.lease.address)
            self._remove_address(self.lease.address)
            self.lease = None
        self._send(self.l3.configure_ipv4(None))

    def _add_address(self, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
        if address in self._added:
            return
        try:
            self.network.add_address(self.device.name, address)
        except (OSError, HostNetworkError) as exc:
            log.error("%s: cannot add %s: %s", self.name, address, exc)
            return
        self._added.add(address)

    def _remove_address(self, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
        if address not in self._added:
            return
        self._added.discard(address)
        try:
            self.network.remove_address(self.device.name, address)
        except (OSError, HostNetworkError) as exc:
            log.warning("%s: cannot remove %s: %s", self.name, address, exc)

    def status(self) -> dict[str, object]:
        status = super().status()
        status.update(kind="tun", device=self.device.name, offloads=describe(self.device.offloads),
                      mac=self.mac.hex(":"), host=self.l3.status(),
                      device_counters=self.device.counters.as_dict())
        if self.dhcp is not None:
            status["dhcp"] = {"state": self.dhcp.state,
                              "address": str(self.lease.address) if self.lease else None,
                              **dict(self.dhcp.counters)}
        return status

    # -- the shell ------------------------------------------------------------------------------

    async def run(self, switch: Switch) -> None:
        """Move packets between the TUN and `switch`, and the port's own frames, until
        cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop, switch)
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._outbox_loop, switch)

    async def _read_loop(self, switch: Switch) -> None:
        """TUN -> L3Host -> switch: a data-loop handler (virtio/dataloop.py)."""
        device = self.device
        forward = switch.forward

        def on_readable() -> bool:
            packets = device.read_batch(BATCH)
            frames: list[Frame] = []
            for packet in packets:
                frames += self.l3.from_host(bytes(packet.data), packet.offload)
            if frames:
                forward(self, frames)
            return False

        await serve_readable(device.fd, on_readable)

    async def _write_loop(self) -> None:
        """L3Host's packets -> TUN."""
        packets = self.to_host
        while True:
            if not packets:
                self._host_ready = trio.Event()
                await self._host_ready.wait()
                continue
            if not write_queued(self.device, self.to_host, self.counters):
                await self.device.wait_writable()
            elif packets:  # more to write: let the other tasks run first
                await trio.lowlevel.checkpoint()

    async def _outbox_loop(self, switch: Switch) -> None:
        """The timers (neighbour discovery, DHCP) and what `Switch.send` left of the port's
        own frames (ARP, NDP, DHCP, released packets), which leave from the call that made
        them (`on_ready`)."""
        left = trio.Event()

        def on_ready() -> None:
            if not switch.send(self):
                left.set()

        self.on_ready = on_ready
        if self.dhcp is not None:
            self._send(self.dhcp.start(self.clock()))
        while True:
            now = self.clock()
            self._send(self.l3.tick(now))
            if self.dhcp is not None:
                self._send(self.dhcp.tick(now))
            frames = self.take_outbox()
            if frames:
                switch.forward(self, frames)
                await trio.lowlevel.checkpoint()
                continue
            deadlines = [d for d in (self.l3.next_deadline(),
                                     self.dhcp.next_deadline() if self.dhcp else None)
                         if d is not None]
            left = trio.Event()
            with trio.move_on_after(max(0.0, min(deadlines, default=now + 1.0) - now)):
                await left.wait()
