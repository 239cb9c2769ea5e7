"""Capture's shells: the hub's capture files are written by a task off the event loop (the
switch touches no file; a stalled writer loses capture frames, counted, and never stalls
forwarding); live capture (`vhostvpn capture PORT`): the stream encoder queues whole pcapng
blocks and drops what does not fit its bound (never blocking the switch), a port's file
capture and live captures run side by side, the control socket refuses unknown ports and
captures past the limit; and with real processes (slow) a hub's gateway and an endpoint's
uplink are captured while traffic flows, and tshark reads the frames with their directions."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from scapy.layers.l2 import ARP, Ether

from netstack.frame import Frame
from netstack.pcap import (
    EPB_OVERHEAD,
    CaptureTee,
    PcapStream,
    add_capture,
    file_header,
    remove_capture,
)
from netstack.port import QueuedPort
from netstack.switch import Switch
from tests.support.hub import TunnelKeys, endpoint_process, hub_process
from tests.support.pcapng import read_pcapng
from tests.support.tunnel_client import ALICE_IP, ALICE_MAC, GATEWAY, SUBNET, connect_peer
from tunnel import capture
from tunnel.capture import CaptureError, FileCaptures, stream_capture
from tunnel.control import serve_control
from tunnel.hub import gateway_mac
from tunnel.keys import parse_fingerprint

PINGS = 5
STALL_SECONDS = 10.0


def frame(tag: int, length: int = 60) -> bytes:
    return bytes([0x02, 0, 0, 0, 0, tag]) * 2 + bytes([tag]) * (length - 12)


# --- the stream encoder ------------------------------------------------------------------

def test_a_stream_is_a_pcapng_file_of_whole_blocks_with_directions(tmp_path):
    stream = PcapStream("vm1")
    stream.write([frame(1), memoryview(frame(2, 61))], "in")
    stream.write([frame(3, 1514)], "out")
    (tmp_path / "s.pcapng").write_bytes(stream.take())
    assert stream.take() == b""
    got = read_pcapng(tmp_path / "s.pcapng")
    assert [(f.data, f.direction) for f in got] == [
        (frame(1), "in"), (frame(2, 61), "in"), (frame(3, 1514), "out")]
    assert (stream.frames_queued, stream.frames_dropped) == (3, 0)


def test_a_stream_nobody_reads_drops_what_does_not_fit_and_holds_no_more(tmp_path):
    header = len(file_header("vm1", 1514))
    stream = PcapStream("vm1", snaplen=1514, max_pending=header + 10 * (EPB_OVERHEAD + 1516))
    for _ in range(100):
        stream.write([frame(7, 1514)] * 4, "in")
    assert stream.pending_bytes <= stream.max_pending
    assert (stream.frames_queued, stream.frames_dropped) == (10, 390)
    (tmp_path / "s.pcapng").write_bytes(stream.take())
    assert len(read_pcapng(tmp_path / "s.pcapng")) == 10
    stream.write([frame(8)], "out")  # room again once taken
    assert stream.frames_queued == 11
    stream.close()
    stream.write([frame(9)], "out")
    assert stream.frames_dropped == 391


def test_a_stream_wakes_its_reader_once_per_wait():
    stream = PcapStream("vm1")
    woken = []
    stream.on_ready = lambda: woken.append(1)
    stream.write([frame(1)], "in")
    stream.write([frame(2)], "in")
    assert woken == [1] and stream.on_ready is None


def captured_pair(directory: Path) -> tuple[Switch, QueuedPort, QueuedPort, FileCaptures]:
    """A switch with ports a and b, a's capture files in `directory`."""
    switch = Switch()
    a, b = QueuedPort("a"), QueuedPort("b")
    switch.attach(a)
    switch.attach(b)
    files = FileCaptures(directory)
    files.add(a)
    return switch, a, b, files


async def test_file_and_live_captures_of_one_port_each_get_every_frame(tmp_path):
    switch, a, b, files = captured_pair(tmp_path)
    buffer, writer = files.captures[a]
    live1, live2 = PcapStream("a"), PcapStream("a")
    add_capture(a, live1)
    add_capture(a, live2)
    assert isinstance(a.capture, CaptureTee)
    switch.forward(a, [Frame(frame(1))])
    remove_capture(a, live2)
    switch.forward(a, [Frame(frame(2))])
    remove_capture(a, live1)
    assert a.capture is buffer
    switch.forward(a, [Frame(frame(3))])
    await files.close()
    assert [f.data for f in read_pcapng(tmp_path / "a.pcapng")] == [frame(1), frame(2), frame(3)]
    assert (writer.frames_written, live1.frames_queued, live2.frames_queued) == (3, 2, 1)
    assert a.capture is None


# --- capture files: the hub's shell --------------------------------------------------------

def broadcast(tag: int, length: int = 60) -> bytes:
    return b"\xff" * 6 + frame(tag, length)[6:]


def _drain(port: QueuedPort) -> list[Frame]:
    """What the switch delivered to `port` since the last call (its shell's part)."""
    frames = list(port.queue)
    port.queue.clear()
    return frames


async def test_the_switch_touches_no_file_until_the_capture_task_writes(tmp_path):
    directory = tmp_path / "pcap"  # not made yet: the writer makes it
    switch, a, b, files = captured_pair(directory)
    frames = [broadcast(tag) for tag in range(1, 6)]
    for data in frames:
        switch.forward(a, [Frame(data)])
    assert [bytes(f.data) for f in _drain(b)] == frames  # forwarded
    assert not directory.exists()  # and no file touched: the frames wait in the buffer
    assert files.captures[a][0].frames_queued == 5
    async with trio.open_nursery() as nursery:
        nursery.start_soon(files.run)
        with trio.fail_after(5):
            while files.captures[a][1].frames_written < 5:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [f.data for f in read_pcapng(directory / "a.pcapng")] == frames
    await files.close()


async def test_a_shutdown_during_a_write_waits_for_it_and_writes_everything_queued(tmp_path):
    """The hub stopping while the capture task's worker thread is writing (the task is
    cancelled, the thread goes on): close waits for that write, then writes what came after
    it, and closes the files: nothing forwarded before the stop is missing from them."""
    switch, a, b, files = captured_pair(tmp_path)
    writer = files.captures[a][1]
    in_write, finish = threading.Event(), threading.Event()
    write_blocks = writer.write_blocks

    def slow_write(data: bytes) -> None:
        in_write.set()
        finish.wait(5)
        write_blocks(data)

    writer.write_blocks = slow_write
    first, second = [broadcast(1)], [broadcast(2), broadcast(3)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(files.run)
        switch.forward(a, [Frame(data) for data in first])
        with trio.fail_after(5):
            while not in_write.is_set():  # the task's thread is inside the first write
                await trio.sleep(0.01)
        switch.forward(a, [Frame(data) for data in second])  # queued behind it
        nursery.cancel_scope.cancel()  # the hub stops: the thread is abandoned, not stopped
    threading.Timer(0.2, finish.set).start()  # the write takes a while longer
    with trio.fail_after(capture.CLOSE_SECONDS):
        await files.close()
    assert [f.data for f in read_pcapng(tmp_path / "a.pcapng")] == first + second
    assert writer.frames_written == 3
    _drain(b)


async def test_a_shutdown_before_the_write_thread_started_writes_that_work_itself(tmp_path):
    """The hub stopping while the capture task waits for a worker thread (all taken): that
    write never happens, so close writes its frames, with what came after, in order."""
    switch, a, b, files = captured_pair(tmp_path)
    limiter = trio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for holder in holders:
        limiter.acquire_on_behalf_of_nowait(holder)
    try:
        first, second = [broadcast(1)], [broadcast(2)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(files.run)
            switch.forward(a, [Frame(data) for data in first])
            await trio.testing.wait_all_tasks_blocked()  # handed over, waiting for a thread
            switch.forward(a, [Frame(data) for data in second])
            nursery.cancel_scope.cancel()
    finally:
        for holder in holders:
            limiter.release_on_behalf_of(holder)
    with trio.fail_after(capture.CLOSE_SECONDS):
        await files.close()
    assert [f.data for f in read_pcapng(tmp_path / "a.pcapng")] == first + second
    _drain(b)


async def test_a_stalled_capture_writer_loses_capture_frames_but_never_stalls_forwarding(
        tmp_path):
    switch, a, b, files = captured_pair(tmp_path)
    buffer, writer = files.captures[a]
    writer.open()
    # The file is now a pipe nobody reads, its buffer full: the writer's next write blocks
    # in its worker thread, as on a hung disk.
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, bytes(65536))
    os.set_blocking(write_end, True)
    writer._file.close()
    writer._file = open(write_end, "wb", buffering=0)  # noqa: SIM115 - the writer closes it
    batch = [Frame(broadcast(1, 1514))] * 64
    rounds = 2 * buffer.max_pending // (64 * (EPB_OVERHEAD + 1516))  # twice what it holds
    # The reader goes away when the test says so, or after STALL_SECONDS whatever happens:
    # a forward that waited for the pipe would fail the test, not hang it.
    release = threading.Event()
    closer = threading.Thread(target=lambda: (release.wait(STALL_SECONDS), os.close(read_end)))
    closer.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(files.run)
            with trio.fail_after(10):
                switch.forward(a, batch)
                assert len(_drain(b)) == 64
                while writer.frames_written == 0 and buffer.pending_bytes:  # the task took it
                    await trio.sleep(0.01)
                await trio.sleep(0.05)  # and is stuck in its thread's write
                for _ in range(rounds):
                    switch.forward(a, batch)
                    assert len(_drain(b)) == 64  # every frame forwarded, every round
                    await trio.lowlevel.checkpoint()
            assert buffer.pending_bytes <= buffer.max_pending
            assert buffer.frames_dropped > 0
            assert buffer.frames_queued + buffer.frames_dropped == 64 * (rounds + 1)
            assert writer.frames_written == 0
            release.set()  # the stalled write fails (EPIPE): the writer turns itself off
            with trio.fail_after(10):
                while writer.enabled:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        release.set()
        closer.join()
    assert "Broken pipe" in (writer.error or "")
    await files.close()


# --- the control socket, in-process ------------------------------------------------------

async def test_unknown_ports_and_captures_past_the_limit_are_refused_with_a_reason(
        tmp_path, monkeypatch):
    monkeypatch.setattr(capture, "MAX_CAPTURES", 1)
    monkeypatch.setattr(capture, "PORT_CHECK_SECONDS", 0.1)
    path = str(tmp_path / "c.sock")
    switch = Switch()
    gateway = QueuedPort("gateway")
    switch.attach(gateway)
    switch.attach(QueuedPort("vm1.sock"))
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_control(
            path, lambda: {}, ports=lambda: list(switch.ports), task_status=task_status))
        with pytest.raises(CaptureError, match=r"no port 'vm9' \(ports: gateway, vm1.sock\)"):
            await trio.to_thread.run_sync(stream_capture, path, "vm9", None)
        # one capture runs: a client that reads nothing (vm1 is vm1.sock)
        first = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await first.connect(path)
        await first.send(b"capture 65535 vm1\n")
        reply = json.loads((await first.recv(4096)).split(b"\n")[0])
        assert reply == {"ok": True, "port": "vm1.sock", "snaplen": 65535}
        with pytest.raises(CaptureError, match=r"1 captures running \(at most 1\)"):
            await trio.to_thread.run_sync(stream_capture, path, "gateway", None)
        for _ in range(200):  # the data path goes on: nobody waits for the silent reader
            switch.forward(switch.ports[1], [Frame(frame(1, 1514))] * 64)
        first.close()  # its capture ends, its slot frees
        with trio.fail_after(5):
            while switch.ports[1].capture is not None:
                await trio.sleep(0.05)
        out = tmp_path / "g.pcapng"
        with open(out, "wb") as file:
            sent = trio.to_thread.run_sync(
                lambda: stream_capture(path, "gateway", file, count=2))
            async with trio.open_nursery() as feed:
                feed.start_soon(_feed, switch, gateway)
                assert await sent == ("gateway", 2)
                feed.cancel_scope.cancel()
        assert [f.direction for f in read_pcapng(out)] == ["in", "in"]
        nursery.cancel_scope.cancel()


async def _feed(switch: Switch, port: QueuedPort) -> None:
    while True:
        switch.forward(port, [Frame(frame(5))])
        await trio.sleep(0.05)


# --- real processes ----------------------------------------------------------------------

def _capture_process(control: str, port: str, out: Path, *extra: str) -> subprocess.Popen:
    with open(out, "wb") as file:
        return subprocess.Popen([sys.executable, "-m", "tunnel.cli", "capture", "--control",
                                 control, port, *extra], stdout=file, stderr=subprocess.PIPE)


def _tshark(path: Path, fields: str) -> list[list[str]]:
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-E", "separator=,",
                          *(arg for f in fields.split() for arg in ("-e", f))],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split(",") for line in out.splitlines() if line]  # direction: "0x00000001"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
async def test_capturing_a_hub_gateway_and_an_endpoint_uplink_while_pings_flow(tmp_path):
    keys = TunnelKeys(tmp_path, ("ep1", "alice"))
    hub_args = keys.hub_args("--subnet", str(SUBNET), "--no-dhcp")
    async with hub_process(tmp_path, [], hub_args) as hub, \
            endpoint_process(tmp_path, "ep1", ["ep1.sock"], keys.vm_args("ep1")) as endpoint:
        await endpoint.session_up()
        uplink = next(p["name"] for p in (await endpoint.status())["ports"]
                      if p.get("kind") == "session")
        alice = await connect_peer(keys.port, tmp_path / "alice-id",
                                   parse_fingerprint(keys.hub_fingerprint), "alice")
        await alice.echo(ALICE_MAC, ALICE_IP, gateway_mac(SUBNET), GATEWAY, 0)

        gateway_file, uplink_file = tmp_path / "gateway.pcapng", tmp_path / "uplink.pcapng"
        at_gateway = _capture_process(hub.control, "gateway", gateway_file,
                                      "--count", str(2 * PINGS))
        at_uplink = _capture_process(endpoint.control, uplink, uplink_file, "--count", "1")
        try:
            with trio.fail_after(10):  # both captures attached: the hub logs it
                while (await trio.to_thread.run_sync(hub.log_path.read_text)).count(
                        "capture of port") < 1 or (await trio.to_thread.run_sync(
                        endpoint.log_path.read_text)).count("capture of port") < 1:
                    await trio.sleep(0.05)
            for sequence in range(1, PINGS + 1):
                await alice.echo(ALICE_MAC, ALICE_IP, gateway_mac(SUBNET), GATEWAY, sequence)
            # a broadcast from alice crosses the hub to ep1's uplink
            arp = Ether(src=ALICE_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
                hwsrc=ALICE_MAC, psrc=ALICE_IP, pdst="10.77.0.99")
            await alice.tls.send_all(alice.wire.send_frames([Frame(bytes(arp))]))
            for process in (at_gateway, at_uplink):
                assert await trio.to_thread.run_sync(lambda p=process: p.wait(timeout=20)) == 0
        finally:
            for process in (at_gateway, at_uplink):
                if process.poll() is None:
                    process.kill()
                    process.wait()

        rows = _tshark(gateway_file, "frame.interface_name frame.packet_flags_direction "
                                     "icmp.type icmp.seq")
        assert len(rows) == 2 * PINGS
        # the gateway port: requests leave the switch towards it (outbound, 2), replies
        # come from it (inbound, 1)
        assert sorted((int(seq), int(kind), int(direction, 0))
                      for name, direction, kind, seq in rows if name == "gateway") == sorted(
            [(seq, 8, 2) for seq in range(1, PINGS + 1)]
            + [(seq, 0, 1) for seq in range(1, PINGS + 1)])
        rows = _tshark(uplink_file, "frame.interface_name frame.packet_flags_direction "
                                    "arp.dst.proto_ipv4")
        assert [(name, int(direction, 0), target) for name, direction, target in rows] == [
            (uplink, 1, "10.77.0.99")]  # it entered the endpoint's switch
        # the hub and the endpoint still serve, the captures are gone
        await alice.echo(ALICE_MAC, ALICE_IP, gateway_mac(SUBNET), GATEWAY, PINGS + 1)
        with trio.fail_after(10):
            while "capture of port gateway ended" not in hub.log_path.read_text():
                await trio.sleep(0.05)


def test_the_cli_says_what_is_wrong_in_one_line(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "tunnel.cli", "capture", "--control",
                              str(tmp_path / "none.ctl"), "vm1"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"vhostvpn capture: cannot reach {tmp_path}/none.ctl")
    assert "Traceback" not in missing.stderr
