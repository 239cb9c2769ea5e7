"""`--metrics`: what a scrape of /metrics says equals what `vhostvpn status` says (a hub with
a model guest in one process; a hub and endpoints as real processes), and the port is
contained: slowloris and never-reading clients, too many clients, bad requests do not stall
a scrape or end the server; a port in use is a one-line start-up error."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
from collections import Counter

import pytest
import trio
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.hub import TunnelKeys, endpoint_process, free_tcp_port, hub_process
from tests.test_direct_links import ipv4_frame, pair, wait_for
from tests.test_hub import GUEST_MAC, dhcp_discover, exchange, hub_with_guests
from tunnel import metrics
from tunnel.hub import HubConfig
from tunnel.keys import keygen
from tunnel.metrics import bind_metrics, serve_metrics

SCRAPE_SECONDS = 10.0


def http_get(port: int, path: str = "/metrics", timeout: float = SCRAPE_SECONDS) -> bytes:
    """A blocking HTTP/1.1 GET on loopback: the whole reply, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def samples(reply: bytes) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, from a 200 reply in the text format."""
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, frozenset(labels.items()))]


async def scrape(port: int, path: str = "/metrics") -> bytes:
    return await trio.to_thread.run_sync(http_get, port, path)


def assert_ports_match(scraped: dict, state: dict) -> None:
    """Every port's counters in the scrape are the status's."""
    for port in state["ports"]:
        ident = {"port": port["name"], "kind": port.get("kind", "port")}
        for direction in ("in", "out"):
            assert value(scraped, "vhostvpn_port_frames_total", **ident,
                         direction=direction) == port[f"{direction}_frames"]
            assert value(scraped, "vhostvpn_port_bytes_total", **ident,
                         direction=direction) == port[f"{direction}_bytes"]
        for reason, count in (port["drops"] | port.get("guest_drops", {})).items():
            assert value(scraped, "vhostvpn_port_drops_total", **ident, reason=reason) == count


async def test_a_scrape_says_what_status_says_about_ports_drops_and_dhcp(tmp_path):
    listen = bind_metrics("127.0.0.1", 0)
    port = listen.getsockname()[1]
    config = HubConfig(sockets=[str(tmp_path / "vm.sock")], state_dir=tmp_path,
                       subnet=ipaddress.IPv4Network("10.77.0.0/24"))
    async with hub_with_guests(config, 1) as (hub, [fe]), trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, listen, hub.status)
        await exchange(fe, dhcp_discover(GUEST_MAC, 7), "DHCP")
        fe.net.send([b"\x00" * 5])  # shorter than an Ethernet header: a guest drop
        fe.kick(1)
        with trio.fail_after(5):
            while not hub.status()["ports"][0].get("guest_drops"):
                await trio.sleep(0.01)
        scraped = samples(await scrape(port))
        state = hub.status()
        nursery.cancel_scope.cancel()
    assert_ports_match(scraped, state)
    guest = state["ports"][0]
    assert guest["in_frames"] >= 1 and guest["guest_drops"] == {"tx_runt": 1}
    assert value(scraped, "vhostvpn_port_link_up", port="vm.sock", kind="vhost-user") == 1
    assert value(scraped, "vhostvpn_port_broken", port="vm.sock", kind="vhost-user") == 0
    gateway = next(p for p in state["ports"] if p["kind"] == "gateway")
    assert gateway["dhcp"]["offer"] == 1
    for event, count in gateway["dhcp"].items():
        assert value(scraped, "vhostvpn_dhcp_events_total", event=event) == count
    assert value(scraped, "vhostvpn_dhcp_offers") == gateway["dhcp_tables"]["offers"] == 1
    assert value(scraped, "vhostvpn_dhcp_leases") == 0
    assert value(scraped, "vhostvpn_switch_macs") == len(state["macs"])
    assert value(scraped, "vhostvpn_info", role="hub", fingerprint="") == 1
    assert ("process_open_fds", frozenset()) in scraped


async def test_slow_silent_and_surplus_clients_do_not_stall_a_scrape(monkeypatch):
    monkeypatch.setattr(metrics, "REQUEST_SECONDS", 5.0)
    monkeypatch.setattr(metrics, "CLIENT_SECONDS", 6.0)
    listen = bind_metrics("127.0.0.1", 0)
    port = listen.getsockname()[1]
    # Enough ports that a reply (above 1 MB) does not fit in the sockets' buffers.
    state = {"role": "hub", "macs": [], "ports": [
        {"name": f"vm{i}", "kind": "vhost-user", "in_frames": i, "in_bytes": i,
         "out_frames": i, "out_bytes": i, "software_offloads": 0, "drops": {},
         "link_up": True, "broken": None, "connections": 1} for i in range(2000)]}

    def requests_counted(scraped: dict) -> dict[str, float]:
        return {dict(labels)["outcome"]: count for (name, labels), count in scraped.items()
                if name == "vhostvpn_metrics_requests_total"}

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, listen, lambda: state)
        # A client that asks and never reads, with the smallest receive window.
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        never_reads = trio.SocketStream(sock)
        await never_reads.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        # Half a request line and then nothing (slowloris), on every other place.
        hogs = [never_reads]
        for _ in range(metrics.MAX_CLIENTS - 1):
            hogs.append(await trio.open_tcp_stream("127.0.0.1", port))
            await hogs[-1].send_all(b"GET /metr")
        await trio.sleep(0.5)
        # Every place taken (the one who never reads holds its own): one more is closed at
        # once and counted.
        surplus = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(SCRAPE_SECONDS):
            assert await surplus.receive_some(100) == b""
        # One slow client goes away: its place serves a scrape, as large as ever.
        await hogs.pop().aclose()
        with trio.fail_after(SCRAPE_SECONDS):
            while True:
                reply = await scrape(port)
                if reply:  # the place may not be free yet: closed without a reply
                    break
                await trio.sleep(0.1)
        scraped = samples(reply)
        assert value(scraped, "vhostvpn_port_frames_total", port="vm9", kind="vhost-user",
                     direction="in") == 9
        # The slow ones are cut after REQUEST_SECONDS, the one who never reads after
        # CLIENT_SECONDS: every place is free again.
        state["ports"] = []
        with trio.fail_after(metrics.CLIENT_SECONDS + SCRAPE_SECONDS):
            while requests_counted(scraped).get("timeout", 0) < metrics.MAX_CLIENTS - 1:
                await trio.sleep(0.5)
                reply = await scrape(port)
                if reply:
                    scraped = samples(reply)
        for hog in [*hogs, surplus]:
            await hog.aclose()
        nursery.cancel_scope.cancel()
    requests = requests_counted(scraped)
    assert requests.pop("ok") >= 1
    assert requests.pop("refused_busy") >= 1
    assert requests == {"closed_early": 1, "timeout": metrics.MAX_CLIENTS - 1}


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"BREW /metrics\r\n\r\n", b"400"),
        # Headers that never end within MAX_REQUEST bytes (sent exactly: bytes beyond it
        # would be unread at close, and the kernel would answer them with a reset).
        (b"GET /metrics HTTP/1.1\r\nX: ".ljust(metrics.MAX_REQUEST, b"a"), b"400"),
    ],
)
async def test_bad_requests_get_an_error_and_the_server_goes_on(request_bytes, status):
    listen = bind_metrics("127.0.0.1", 0)
    port = listen.getsockname()[1]
    state = {"role": "hub", "ports": [], "macs": []}
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, listen, lambda: state)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(request_bytes)
        reply = b""
        with trio.fail_after(SCRAPE_SECONDS):
            while chunk := await client.receive_some(65536):
                reply += chunk
        await client.aclose()
        assert reply.split(b" ", 2)[1] == status
        assert samples(await scrape(port))
        nursery.cancel_scope.cancel()


async def test_a_status_that_raises_answers_500_and_the_next_scrape_works():
    listen = bind_metrics("127.0.0.1", 0)
    port = listen.getsockname()[1]
    calls = []

    def status() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in status()")
        return {"role": "hub", "ports": [], "macs": []}

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, listen, status)
        assert (await scrape(port)).startswith(b"HTTP/1.1 500 ")
        assert samples(await scrape(port))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("command", ["hub", "vm"])
def test_a_metrics_port_in_use_is_one_line_and_exit_status_1(tmp_path, command):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "tunnel.cli", command, "--socket",
                str(tmp_path / "vm.sock"), "--metrics", f"127.0.0.1:{port}"]
        if command == "vm":
            fingerprint = keygen(tmp_path / "hub-id")
            keygen(tmp_path / "vm-id")
            argv += ["--hub", "127.0.0.1:1", "--identity", str(tmp_path / "vm-id"),
                     "--hub-fingerprint", fingerprint]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"vhostvpn {command}: --metrics 127.0.0.1:{port}: port {port} is already in use by "
        f"another process (`ss -ltnp 'sport = :{port}'` shows which): stop it or choose "
        f"another port"]


@pytest.mark.slow
async def test_a_hub_and_its_endpoints_serve_their_status_as_metrics(tmp_path):
    keys = TunnelKeys(tmp_path, ("ep1",))
    keygen(tmp_path / "stranger-id")
    hub_metrics, ep_metrics = free_tcp_port(), free_tcp_port()
    hub_args = keys.hub_args("--subnet", "10.77.0.0/24", "--state-dir", str(tmp_path),
                             "--metrics", f"127.0.0.1:{hub_metrics}")
    async with hub_process(tmp_path, ["hub.sock"], hub_args) as hub, \
            endpoint_process(tmp_path, "ep1", ["a.sock"],
                             keys.vm_args("ep1", "--metrics", f"127.0.0.1:{ep_metrics}",
                                          "--rekey-seconds", "10")) as ep1, \
            endpoint_process(tmp_path, "stranger", ["s.sock"], keys.vm_args("stranger")):
        with trio.fail_after(40):
            while True:
                hub_state = await hub.status()
                ep_state = await ep1.status()
                if (ep_state["session"]["state"] == "up"
                        and ep_state["session"]["rekeys"] == 1
                        and ep_state["session"]["rtt_ms"] is not None
                        and hub_state["tunnel"]["refused"].get("auth_unknown_key")):
                    break
                await trio.sleep(0.2)
        hub_scraped = samples(await scrape(hub_metrics))
        hub_state = await hub.status()
        ep_scraped = samples(await scrape(ep_metrics))
        ep_state = await ep1.status()
    assert_ports_match(hub_scraped, hub_state)
    assert value(hub_scraped, "vhostvpn_session_up", session="ep1") == 1
    assert value(hub_scraped, "vhostvpn_port_connections_total", port="ep1",
                 kind="session") == 2  # the first link and the one a rekey made
    for reason, count in hub_state["tunnel"]["refused"].items():
        assert value(hub_scraped, "vhostvpn_tunnel_refused_total", reason=reason) == count
    assert value(hub_scraped, "vhostvpn_tunnel_refused_total", reason="auth_unknown_key") >= 1
    assert value(hub_scraped, "vhostvpn_tunnel_peers") == 1
    assert value(hub_scraped, "vhostvpn_dhcp_pool_free") == 253
    assert value(hub_scraped, "vhostvpn_info", role="hub",
                 fingerprint=hub_state["tunnel"]["fingerprint"]) == 1

    assert_ports_match(ep_scraped, ep_state)
    assert value(ep_scraped, "vhostvpn_session_up", session="hub") == 1
    assert value(ep_scraped, "vhostvpn_session_rtt_seconds", session="hub") > 0
    assert value(ep_scraped, "vhostvpn_uplink_reconnects_total") == ep_state["session"][
        "reconnects"] == 0
    assert value(ep_scraped, "vhostvpn_uplink_rekeys_total") == 1
    assert value(ep_scraped, "vhostvpn_port_link_up", port="a.sock", kind="vhost-user") == 0
    assert value(ep_scraped, "vhostvpn_info", role="endpoint",
                 fingerprint=ep_state["fingerprint"]) == 1


async def test_a_scrape_says_what_status_says_about_direct_peers(tmp_path):
    """An endpoint's direct paths as metrics: the listener's counts and, per introduced
    peer, its path, frames, bytes, rtt and sessions (two real DirectLinks over TLS)."""
    async with trio.open_nursery() as nursery:
        a, b = await pair(nursery, tmp_path)
        b.send(ipv4_frame("a", "b"))
        await wait_for(lambda: len(a.local.got) == 1)
        await wait_for(lambda: b.links.status()["peers"][0]["rtt_ms"] is not None)
        state = {"role": "endpoint", "direct": b.links.status()}
        listener = {"role": "endpoint", "direct": a.links.status()}
        nursery.cancel_scope.cancel()
    scraped = samples(b"HTTP/1.1 200 OK\r\n\r\n"
                      + generate_latest(metrics.make_registry(lambda: state, Counter())))
    [peer] = state["direct"]["peers"]
    name = peer["name"]
    assert value(scraped, "vhostvpn_direct_peer_direct", peer=name) == 1
    for direction in ("in", "out"):
        assert value(scraped, "vhostvpn_direct_peer_frames_total", peer=name,
                     direction=direction) == peer[f"{direction}_frames"]
        assert value(scraped, "vhostvpn_direct_peer_bytes_total", peer=name,
                     direction=direction) == peer[f"{direction}_bytes"]
    assert value(scraped, "vhostvpn_direct_peer_frames_total", peer=name, direction="out") == 1
    assert value(scraped, "vhostvpn_direct_peer_rtt_seconds", peer=name) == peer["rtt_ms"] / 1000
    assert value(scraped, "vhostvpn_direct_peer_sessions_total", peer=name) == 1
    assert value(scraped, "vhostvpn_direct_intros_total") == state["direct"]["intros"]
    scraped = samples(b"HTTP/1.1 200 OK\r\n\r\n"
                      + generate_latest(metrics.make_registry(lambda: listener, Counter())))
    assert value(scraped, "vhostvpn_direct_handshakes_in_progress") == 0
    assert value(scraped, "vhostvpn_direct_peer_direct",
                 peer=listener["direct"]["peers"][0]["name"]) == 1
