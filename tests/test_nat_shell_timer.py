"""The NAT shell's timer against a real host TCP socket (the hub's loopback, reached through
the gateway's address with map_host_loopback), on the data loop and under plain Trio: a
deadline the TCP core sets while handling what a host socket gave (the server's bytes, the
host's connect) is kept even when the guest then says nothing, so what the guest lost is
sent again within its RTO, not when some later deadline happens to wake the timer."""

from __future__ import annotations

import socket

import pytest
import trio
from scapy.layers.inet import IP, TCP

from netstack.nat.tcp import CONNECT_TIMEOUT, IDLE_TIMEOUT, RTO_INITIAL
from tests.support.deadline import deadline
from tests.support.nat import GUEST4, GW4, guest_frame, nat_config
from tests.support.nat_shell import Guest
from tunnel.nat import NatShell
from virtio.dataloop import DataLoop

LOOPS = {"dataloop": lambda main: DataLoop().run(main), "trio": trio.run}
# How long the guest waits for a segment sent again: far past the first RTO (RTO_INITIAL at
# most), far short of the deadlines that would otherwise wake the timer (the connect's, the
# idle one).
RETRANSMIT_WAIT = 10 * RTO_INITIAL
assert RETRANSMIT_WAIT < CONNECT_TIMEOUT / 2 < IDLE_TIMEOUT
GUEST_PORT = 41000


def segment(flags: str, seq: int, port: int, ack: int = 0, window: int = 65535):
    return guest_frame(IP(src=GUEST4, dst=GW4) / TCP(sport=GUEST_PORT, dport=port,
                                                     flags=flags, seq=seq, ack=ack,
                                                     window=window))


def run_shell(loop: str, test) -> None:
    """`test(shell, guest, listener)` with a NatShell whose gateway address reaches this
    host's loopback, where `listener` (a trio socket) listens; bounded in wall-clock time."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    async def main() -> None:
        guest = Guest()
        shell = NatShell(nat_config(map_host_loopback=True), guest.deliver, upstreams=[])
        async with trio.open_nursery() as nursery:
            await nursery.start(shell.run)
            await test(shell, guest, trio.socket.from_stdlib_socket(listener))
            nursery.cancel_scope.cancel()

    try:
        with deadline(3 * RETRANSMIT_WAIT):
            LOOPS[loop](main)
    finally:
        listener.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_read_from_the_host_that_the_silent_guest_lost_are_sent_again_within_the_rto(loop):
    async def test(shell, guest, listener):
        port = listener.getsockname()[1]
        shell.from_guest(segment("S", 1000, port))
        synack = await guest.next()
        assert synack[TCP].flags == "SA"
        ours = synack[TCP].seq + 1
        shell.from_guest(segment("A", 1001, port, ours))  # the timer now sleeps long
        conn, _ = await listener.accept()
        with conn:
            await conn.send(b"x" * 1000)
            first = await guest.next()
            assert first[TCP].seq == ours and len(first[TCP].payload) == 1000
            # The guest lost it (a full queue, say) and waits: only our timer can help.
            again = await guest.next(RETRANSMIT_WAIT)
        assert again[TCP].seq == ours and bytes(again[TCP].payload) == b"x" * 1000
        assert shell.tcp.flows  # the connection lives on

    run_shell(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_syn_ack_the_guest_lost_is_sent_again_within_the_rto(loop):
    async def test(shell, guest, listener):
        port = listener.getsockname()[1]
        shell.from_guest(segment("S", 1000, port))  # the timer sleeps until the connect's end
        first = await guest.next()  # sent once the host connect()ed, from the flow's task
        assert first[TCP].flags == "SA"
        again = await guest.next(RETRANSMIT_WAIT)
        assert again[TCP].flags == "SA" and again[TCP].seq == first[TCP].seq
        conn, _ = await listener.accept()
        conn.close()

    run_shell(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_guest_with_a_closed_window_is_probed_within_the_rto_once_the_host_sends(loop):
    async def test(shell, guest, listener):
        port = listener.getsockname()[1]
        shell.from_guest(segment("S", 1000, port))
        synack = await guest.next()
        ours = synack[TCP].seq + 1
        shell.from_guest(segment("A", 1001, port, ours, window=0))  # no room, for now
        conn, _ = await listener.accept()
        with conn:
            await conn.send(b"x" * 1000)  # read, held for the guest: nothing may go yet
            # The guest's window update got lost: only our probe asks for it again.
            probe = await guest.next(RETRANSMIT_WAIT)
        assert probe[TCP].flags == "A" and not probe[TCP].payload
        assert probe[TCP].seq == ours - 1  # below SND.UNA: no byte past the closed window

    run_shell(loop, test)
