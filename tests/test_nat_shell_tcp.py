"""The NAT shell's TCP relay against real sockets in network namespaces (as
tests/test_nat_shell.py): a scapy-driven guest connects through the shell to a real TCP
server in the outside namespace; a closed port resets the guest."""

from __future__ import annotations

import socket

import trio
from scapy.layers.inet import IP, TCP

from tests.support.nat import GUEST4, guest_frame
from tests.support.nat_netns import hub_and_outside, inside
from tests.support.nat_shell import CLOSED_PORT, OUT4, needs_netns, run_in_hub

pytestmark = needs_netns
TCP_ECHO_PORT = 7007


def seg(flags: str, seq: int, ack: int = 0, payload: bytes = b"", dport: int = TCP_ECHO_PORT):
    return guest_frame(IP(src=GUEST4, dst=OUT4) / TCP(sport=41000, dport=dport, flags=flags,
                                                      seq=seq, ack=ack, window=65535)
                       / payload)


def test_a_connection_to_a_closed_port_resets_the_guest():
    async def test(shell, guest):
        shell.from_guest(seg("S", 1000, dport=CLOSED_PORT))
        reply = await guest.next()
        assert "R" in reply[TCP].flags and reply[TCP].ack == 1001
        assert not shell.tcp.flows and not shell.tcp_sockets

    with hub_and_outside() as names:
        run_in_hub(names, test)


def test_a_guest_connection_carries_bytes_both_ways_through_a_real_tcp_server():
    with hub_and_outside() as names:
        with inside(names["outside"]):
            listener = socket.socket()
            listener.bind((OUT4, TCP_ECHO_PORT))
            listener.listen()

        async def echo_once():
            server = trio.socket.from_stdlib_socket(listener)
            conn, _ = await server.accept()
            data = await conn.recv(65536)
            await conn.send(data.upper())
            conn.close()

        async def test(shell, guest):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo_once)
                shell.from_guest(seg("S", 1000))
                synack = await guest.next()
                assert synack[TCP].flags == "SA"
                ours = synack[TCP].seq + 1
                shell.from_guest(seg("A", 1001, ours))
                shell.from_guest(seg("PA", 1001, ours, b"hello nat"))
                got = b""
                fin = False
                while not fin:
                    frame = await guest.next()
                    got += bytes(frame[TCP].payload)
                    fin = "F" in frame[TCP].flags
                assert got.endswith(b"HELLO NAT")
                shell.from_guest(seg("FA", 1010, ours + len(b"HELLO NAT") + 1))
        try:
            run_in_hub(names, test)
        finally:
            listener.close()
