"""Port forwards and DNS over TCP through the NAT shell, against the real thing (root, network
namespaces as tests/test_nat_shell_tcp.py): Linux's TCP behind a TUN is the guest (a server
for the forwards, listening in its namespace; a DNS client for DNS over TCP), an outside
namespace holds the forwards' clients and the upstream resolver."""

from __future__ import annotations

import ipaddress
import os
import resource
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from scapy.layers.dns import DNS, DNSQR, DNSRR

from netstack.frame import Frame, Offload
from netstack.nat.forward import ForwardSpec
from netstack.offload import adapt
from tests.support.nat import GUEST_MAC, GW4, GW6, GW_MAC, mac, packed
from tests.support.nat_netns import hub_and_outside, inside
from tests.support.nat_shell import ANSWER, OUT4, OUT6, needs_netns, run_in_hub
from tests.support.tun_kernel import CLIENT, KERNEL_IP, kernel_behind_tun, run

pytestmark = needs_netns

KERNEL_IP6 = "fdcb:1::1"
HUB = {4: "10.203.7.1", 6: "fdcb:7::1"}  # the hub's side of the veth, as the outside sees it
GUEST = {4: KERNEL_IP, 6: KERNEL_IP6}
HOST_PORT = 8022
GUEST_PORT = 2222
CLOSED_GUEST_PORT = 2223
ETHER_TO_GATEWAY = {4: mac(GW_MAC) + mac(GUEST_MAC) + b"\x08\x00",
                    6: mac(GW_MAC) + mac(GUEST_MAC) + b"\x86\xdd"}
EIGHT_MB = 8 * 1024 * 1024


def known_guest(address: bytes) -> bytes | None:
    """The gateway's neighbour table: the kernel guest's addresses are known."""
    return mac(GUEST_MAC) if address in (packed(KERNEL_IP), packed(KERNEL_IP6)) else None


def tcp_forward(version: int, guest_port: int = GUEST_PORT) -> ForwardSpec:
    return ForwardSpec("tcp", None, HOST_PORT, ipaddress.ip_address(GUEST[version]),
                       guest_port)


def with_kernel_guest(test, *, seconds: float = 60.0, **shell_options) -> None:
    """Run `test(shell, names, ns)` with a NatShell in the hub, Linux behind a TUN as its
    guest (frames pumped both ways), the outside's namespace next to the hub."""
    with hub_and_outside() as names, kernel_behind_tun() as (dev, ns):
        run("ip", "-n", ns, "route", "add", "default", "dev", dev.name)
        run("ip", "-n", ns, "addr", "add", f"{KERNEL_IP6}/64", "dev", dev.name, "nodad")
        run("ip", "-n", ns, "-6", "route", "add", "default", "dev", dev.name)

        async def from_kernel(shell) -> None:
            while True:
                await dev.wait_readable()
                shell.from_guests([  # one batch, as the gateway port hands it over
                    Frame(ETHER_TO_GATEWAY[bytes(frame.data)[0] >> 4] + bytes(frame.data),
                          frame.offload) for frame in dev.read_batch()])

        async def to_kernel(guest) -> None:
            async for frame in guest.receive:
                # What the switch does for a port without TSO: the shell's TSO frames cut.
                packets = [Frame(bytes(piece.data)[14:], piece.offload)
                           for piece in adapt(frame, Offload.NONE)]
                while packets:
                    del packets[:dev.write_batch(packets)]
                    if packets:
                        await trio.lowlevel.wait_writable(dev.fd)

        async def main(shell, guest) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(from_kernel, shell)
                nursery.start_soon(to_kernel, guest)
                await test(shell, names, ns)
                nursery.cancel_scope.cancel()

        run_in_hub(names, main, seconds=seconds, **shell_options)


def listening(netns: str, family: int, address: str, port: int,
              kind: int = socket.SOCK_STREAM) -> trio.socket.SocketType:
    """A socket in `netns`, bound (and listening, for TCP), for trio."""
    with inside(netns):
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen()
    return trio.socket.from_stdlib_socket(sock)


def client_socket(netns: str, family: int, kind: int = socket.SOCK_STREAM):
    with inside(netns):
        sock = socket.socket(family, kind)
    return trio.socket.from_stdlib_socket(sock)


async def echo_server(listener) -> None:
    """The guest's server: echo every connection to its end, then close it."""
    async def echo(conn) -> None:
        with conn:
            try:
                while data := await conn.recv(65536):
                    view = memoryview(data)
                    while view:
                        view = view[await conn.send(view):]
            except OSError:
                return

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(echo, conn)


@asynccontextmanager
async def serving(netns: str, family: int, address: str, port: int,
                  server: Callable[[trio.socket.SocketType], Awaitable[None]] = echo_server,
                  ) -> AsyncIterator[None]:
    """`server` on a TCP listener in `netns` for as long as the block runs."""
    with listening(netns, family, address, port) as listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server, listener)
            yield
            nursery.cancel_scope.cancel()


async def echoed(client: trio.socket.SocketType, data: bytes) -> None:
    """`client` connects to the hub's IPv4 forward and gets `data` back (within 5 s)."""
    await client.connect((HUB[4], HOST_PORT))
    await client.send(data)
    with trio.fail_after(5):
        assert await client.recv(100) == data


def family_of(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


# -- TCP forwards --------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 6])
def test_an_outside_client_moves_8_mb_each_way_through_a_tcp_forward_to_a_kernel_server(
        version):
    output: list[str] = []
    status: dict = {}

    async def test(shell, names, ns) -> None:
        async with serving(ns, family_of(version), GUEST[version], GUEST_PORT):
            done = await trio.run_process(
                ["ip", "netns", "exec", names["outside"], sys.executable, "-c", CLIENT,
                 HUB[version], str(HOST_PORT), str(EIGHT_MB), str(version), "0", "0"],
                capture_stdout=True, capture_stderr=True, check=False)
            assert done.returncode == 0, done.stderr.decode()
            output.extend(done.stdout.decode().split())
            with trio.fail_after(5):
                while shell.tcp.flows:  # the guest's FIN closes the flow
                    await trio.sleep(0.01)
            status.update(shell.status())

    with_kernel_guest(test, forwards=[tcp_forward(version)], resolve=known_guest)
    sent, echoed, count = output
    assert sent == echoed and int(count) == EIGHT_MB
    [forward] = status["forwards"]
    assert forward["counters"] == {"accepted": 1} and forward["active"] == 0
    assert not status["tcp"]["drops"] and not status["socket_errors"]


def test_a_closed_guest_port_resets_the_outside_client():
    status: dict = {}

    async def test(shell, names, ns) -> None:
        with client_socket(names["outside"], socket.AF_INET) as client:
            with trio.fail_after(5), pytest.raises(ConnectionResetError):
                await client.connect((HUB[4], HOST_PORT))  # the hub's listener accepts,
                await client.recv(100)  # then the guest's RST becomes the client's reset
        status.update(shell.status())

    with_kernel_guest(test, forwards=[tcp_forward(4, CLOSED_GUEST_PORT)],
                      resolve=known_guest)
    [forward] = status["forwards"]
    assert forward["counters"]["refused_by_guest"] == 1 and forward["active"] == 0
    assert status["tcp"]["flows"] == 0


def test_connections_past_a_forwards_cap_are_reset_and_counted_and_a_place_frees_up():
    status: dict = {}

    async def test(shell, names, ns) -> None:
        async with serving(ns, socket.AF_INET, KERNEL_IP, GUEST_PORT):
            clients = [client_socket(names["outside"], socket.AF_INET) for _ in range(3)]
            try:
                for client in clients[:2]:
                    await echoed(client, b"ping")  # relayed: it holds a place
                with trio.fail_after(5), pytest.raises(ConnectionResetError):
                    await clients[2].connect((HUB[4], HOST_PORT))  # the reset may come
                    await clients[2].recv(100)  # before connect() returns, or after
                clients[0].close()
                with trio.fail_after(5):
                    while shell.forwards[0].active > 1:
                        await trio.sleep(0.01)
                with client_socket(names["outside"], socket.AF_INET) as late:
                    await echoed(late, b"again")
            finally:
                for client in clients:
                    client.close()
            status.update(shell.status())

    with_kernel_guest(test, forwards=[tcp_forward(4)], resolve=known_guest, forward_cap=2)
    [forward] = status["forwards"]
    assert forward["counters"]["forward_limit"] == 1 and forward["counters"]["accepted"] == 3


def test_an_unresolved_guest_holds_the_client_a_bounded_time_then_resets_it():
    status: dict = {}
    asked: list[bytes] = []

    def unknown(address: bytes) -> None:
        asked.append(address)

    async def test(shell, names, ns) -> None:
        with client_socket(names["outside"], socket.AF_INET) as client:
            await client.connect((HUB[4], HOST_PORT))
            with trio.fail_after(10), pytest.raises(ConnectionResetError):
                await client.recv(100)
        status.update(shell.status())

    with_kernel_guest(test, forwards=[tcp_forward(4)], resolve=unknown)
    [forward] = status["forwards"]
    assert forward["counters"]["no_neighbour"] == 1 and forward["active"] == 0
    assert set(asked) == {packed(KERNEL_IP)} and len(asked) > 1  # asked again while it waited
    assert status["tcp"]["flows"] == 0


def test_a_guest_learnt_while_the_client_waits_is_connected():
    learnt_at: list[float] = []

    def slow(address: bytes) -> bytes | None:
        if not learnt_at:
            learnt_at.append(trio.current_time() + 0.3)
        return known_guest(address) if trio.current_time() >= learnt_at[0] else None

    async def test(shell, names, ns) -> None:
        async with serving(ns, socket.AF_INET, KERNEL_IP, GUEST_PORT):
            with client_socket(names["outside"], socket.AF_INET) as client:
                await echoed(client, b"late hello")

    with_kernel_guest(test, forwards=[tcp_forward(4)], resolve=slow)


def test_a_guest_that_never_answers_the_syn_has_the_client_reset_after_the_retries(
        monkeypatch):
    # Two retries (1 + 2 + 4 s) instead of five (about a minute); the count and the backoff
    # themselves are tested on the core (tests/test_nat_tcp_active.py).
    monkeypatch.setattr("netstack.nat.tcp.SYN_RETRIES", 2)
    status: dict = {}
    silent = "10.203.0.9"  # routed to the kernel guest, which does not answer for it

    async def test(shell, names, ns) -> None:
        with client_socket(names["outside"], socket.AF_INET) as client:
            with trio.fail_after(30), pytest.raises(ConnectionResetError):
                await client.connect((HUB[4], HOST_PORT))
                await client.recv(100)
        status.update(shell.status())

    spec = ForwardSpec("tcp", None, HOST_PORT, ipaddress.ip_address(silent), GUEST_PORT)
    with_kernel_guest(test, seconds=45.0, forwards=[spec], resolve=lambda _: mac(GUEST_MAC))
    [forward] = status["forwards"]
    assert forward["counters"]["syn_timeout"] == 1 and forward["active"] == 0
    assert status["tcp"]["flows"] == 0


def test_a_forward_that_cannot_listen_is_counted_and_the_others_serve():
    status: dict = {}

    async def test(shell, names, ns) -> None:
        async with serving(ns, socket.AF_INET, KERNEL_IP, GUEST_PORT):
            with client_socket(names["outside"], socket.AF_INET) as client:
                await echoed(client, b"x")
            status.update(shell.status())

    taken = ForwardSpec("tcp", ipaddress.ip_address("192.0.2.1"), HOST_PORT + 1,
                        ipaddress.ip_address(KERNEL_IP), GUEST_PORT)  # not the hub's address
    with_kernel_guest(test, forwards=[taken, tcp_forward(4)], resolve=known_guest)
    bad, good = status["forwards"]
    assert bad["counters"] == {"listen_eaddrnotavail": 1} and not bad["listening"]
    assert good["listening"] and good["counters"]["accepted"] == 1


def test_accept_out_of_file_descriptors_is_counted_and_the_connection_served_once_there_are():
    status: dict = {}

    async def test(shell, names, ns) -> None:
        with client_socket(names["outside"], socket.AF_INET) as client:
            async with serving(ns, socket.AF_INET, KERNEL_IP, GUEST_PORT):
                await trio.testing.wait_all_tasks_blocked()  # the server waits in accept
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                lowest_free = os.dup(0)  # a new fd takes the lowest free number
                os.close(lowest_free)
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
                try:
                    await client.connect((HUB[4], HOST_PORT))  # into the listener's backlog
                    with trio.fail_after(5):
                        while not shell.forwards[0].counters["accept_emfile"]:
                            await trio.sleep(0.01)
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                await client.send(b"patience")
                with trio.fail_after(5):
                    assert await client.recv(100) == b"patience"
                status.update(shell.status())

    with_kernel_guest(test, forwards=[tcp_forward(4)], resolve=known_guest)
    [forward] = status["forwards"]
    assert forward["counters"]["accept_emfile"] >= 1 and forward["counters"]["accepted"] == 1


# -- UDP forwards --------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 6])
def test_a_udp_forward_carries_a_round_trip_and_its_client_flow_expires_when_idle(version):
    status: dict = {}
    family = family_of(version)

    async def udp_echo(sock) -> None:
        while True:
            data, address = await sock.recvfrom(65535)
            await sock.sendto(data.upper(), address)

    async def test(shell, names, ns) -> None:
        server = listening(ns, family, GUEST[version], 5353, socket.SOCK_DGRAM)
        with server, client_socket(names["outside"], family, socket.SOCK_DGRAM) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(udp_echo, server)
                await client.connect((HUB[version], HOST_PORT))
                await client.send(b"question")
                with trio.fail_after(5):
                    assert await client.recv(100) == b"QUESTION"
                assert len(shell.udp_forwards.flows) == 1
                with trio.fail_after(5):
                    while shell.udp_forwards.flows:  # idle: 0.5 s
                        await trio.sleep(0.05)
                await client.send(b"later")  # a new flow for the same client
                with trio.fail_after(5):
                    assert await client.recv(100) == b"LATER"
                status.update(shell.status())
                nursery.cancel_scope.cancel()

    spec = ForwardSpec("udp", None, HOST_PORT, ipaddress.ip_address(GUEST[version]), 5353)
    with_kernel_guest(test, forwards=[spec], resolve=known_guest, udp_idle_seconds=0.5)
    assert status["udp_forwards"]["flows"] == 1 and not status["udp_forwards"]["drops"]


# -- DNS over TCP --------------------------------------------------------------------------

async def tcp_dns_server(listener) -> None:
    """The upstream resolver over TCP: every A question answered with ANSWER."""
    async def serve(conn) -> None:
        with conn:
            data = b""
            while True:
                chunk = await conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                while len(data) >= 2 and len(data) >= 2 + struct.unpack("!H", data[:2])[0]:
                    size = struct.unpack("!H", data[:2])[0]
                    query, data = DNS(data[2:2 + size]), data[2 + size:]
                    answer = bytes(DNS(id=query.id, qr=1, ra=1, qd=query.qd, an=DNSRR(
                        rrname=query.qd[0].qname, type="A", rdata=ANSWER)))
                    await conn.send(struct.pack("!H", len(answer)) + answer)

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(serve, conn)


async def ask_over_tcp(ns: str, version: int, query_id: int) -> DNS:
    """A query from the kernel guest to the gateway's TCP port 53, its answer."""
    with client_socket(ns, family_of(version)) as sock:
        await sock.connect((GW4 if version == 4 else GW6, 53))
        query = bytes(DNS(id=query_id, rd=1, qd=DNSQR(qname="example.test")))
        await sock.send(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = await sock.recv(65536)
            assert chunk, "the gateway closed before the answer"
            data += chunk
        return DNS(data[2:])


@pytest.mark.parametrize("version", [4, 6])
def test_dns_over_tcp_to_the_gateway_reaches_the_upstream_resolver(version):
    answers: list[DNS] = []

    async def test(shell, names, ns) -> None:
        async with serving(names["outside"], socket.AF_INET, OUT4, 53, tcp_dns_server):
            with trio.fail_after(10):
                answers.append(await ask_over_tcp(ns, version, 0x4242))

    with_kernel_guest(test)  # the upstream is IPv4: a v6 guest's query crosses families
    [answer] = answers
    assert answer.id == 0x4242 and answer.an[0].rdata == ANSWER


def test_dns_over_tcp_moves_past_a_dead_upstream_to_the_next():
    answers: list[DNS] = []

    async def test(shell, names, ns) -> None:
        shell.dns.upstreams.insert(0, ipaddress.ip_address(OUT6))  # nothing listens there
        async with serving(names["outside"], socket.AF_INET, OUT4, 53, tcp_dns_server):
            with trio.fail_after(10):
                answers.append(await ask_over_tcp(ns, 4, 7))

    with_kernel_guest(test)
    assert answers[0].id == 7


def test_dns_over_tcp_resets_the_guest_when_no_upstream_answers():
    async def test(shell, names, ns) -> None:
        with trio.fail_after(10), pytest.raises(ConnectionRefusedError):
            await ask_over_tcp(ns, 4, 1)  # nothing listens on the upstream's TCP port 53
        # A SYN the kernel retransmitted before our reset reached it opens a flow that is
        # refused the same way: none stays.
        with trio.fail_after(10):
            while shell.tcp.flows or shell.tcp_sockets:
                await trio.sleep(0.01)

    with_kernel_guest(test, upstreams=OUT6)

