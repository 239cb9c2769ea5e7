"""A port's capture file: what the switch hands a CaptureBuffer, written by a PcapWriter as the
hub's shell does it (tunnel/capture.py FileCaptures, here by hand): round trip, rotation,
truncation at snaplen, file names, I/O errors, and tshark reading what we write."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether

from netstack.pcap import (
    EPB_OVERHEAD,
    MAX_SNAPLEN,
    CaptureBuffer,
    PcapWriter,
    file_header,
    safe_file_name,
)
from tests.support.clock import Clock
from tests.support.pcapng import read_pcapng


class FileCapture:
    """The two halves of a port's capture file: `buffer`, what the switch writes to, and
    `file`, the writer the shell hands what the buffer queued (here after every batch)."""

    def __init__(self, directory: Path, name: str, *, clock=None, **options) -> None:
        self.file = PcapWriter(directory, name, **options)
        self.buffer = CaptureBuffer(name, snaplen=self.file.snaplen,
                                    **({} if clock is None else {"clock": clock}))

    def write(self, frames, direction: str) -> None:
        self.buffer.write(frames, direction)
        self.file.write_blocks(self.buffer.take())


def frame(tag: int, length: int = 60) -> bytes:
    return bytes([tag]) * length


def capture_files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def test_round_trip_keeps_data_order_direction_and_timestamps(tmp_path: Path) -> None:
    clock = Clock(step=0.001)
    writer = FileCapture(tmp_path, "vm1", clock=clock)
    writer.write([frame(1), memoryview(frame(2, 61))], "in")
    writer.write([frame(3, 1514)], "out")
    writer.write([], "out")
    writer.file.close()

    got = read_pcapng(tmp_path / "vm1.pcapng")
    assert [(f.data, f.orig_len, f.direction) for f in got] == [
        (frame(1), 60, "in"),
        (frame(2, 61), 61, "in"),
        (frame(3, 1514), 1514, "out"),
    ]
    assert got[0].timestamp == pytest.approx(1_700_000_000.001, abs=1e-6)
    assert got[0].timestamp == got[1].timestamp  # one clock reading per batch
    assert got[2].timestamp == pytest.approx(1_700_000_000.002, abs=1e-6)
    assert writer.file.frames_written == 3
    assert writer.file.bytes_written == (tmp_path / "vm1.pcapng").stat().st_size
    assert writer.file.frames_dropped == 0


def test_a_64k_tso_frame_is_kept_whole_by_default(tmp_path: Path) -> None:
    writer = FileCapture(tmp_path, "vm1")
    big = frame(7, 65550)
    writer.write([big], "out")
    writer.file.close()
    [got] = read_pcapng(writer.file.path)
    assert (got.data, got.orig_len) == (big, 65550)


def test_truncation_at_snaplen_keeps_orig_len(tmp_path: Path) -> None:
    writer = FileCapture(tmp_path, "vm1", snaplen=100)
    writer.write([frame(1, 99), frame(2, 100), frame(3, 101), frame(4, 65550)], "in")
    writer.file.close()
    got = read_pcapng(writer.file.path)
    assert [(len(f.data), f.orig_len) for f in got] == [
        (99, 99),
        (100, 100),
        (100, 101),
        (100, 65550),
    ]
    assert got[3].data == frame(4, 100)


def test_rotation_keeps_at_most_max_files_and_the_newest_frames(tmp_path: Path) -> None:
    record = EPB_OVERHEAD + 1000
    max_file_bytes = len(file_header("vm1", MAX_SNAPLEN)) + 5 * record  # five frames a file
    writer = FileCapture(tmp_path, "vm1", max_file_bytes=max_file_bytes, max_files=3)
    for tag in range(40):
        writer.write([frame(tag, 1000)], "in" if tag % 2 else "out")
    writer.write([frame(tag, 1000) for tag in range(40, 52)], "in")  # one batch over 3 files
    writer.file.close()

    names = [p.name for p in capture_files(tmp_path)]
    assert names == ["vm1.pcapng", "vm1.pcapng.1", "vm1.pcapng.2"]
    for path in capture_files(tmp_path):
        assert path.stat().st_size <= max_file_bytes
    oldest_first = [tmp_path / n for n in ("vm1.pcapng.2", "vm1.pcapng.1", "vm1.pcapng")]
    tags = [f.data[0] for path in oldest_first for f in read_pcapng(path)]
    assert tags == list(range(52 - 12, 52))  # 52 frames = 10 full files + 2; the last 3 kept
    assert writer.file.frames_written == 52
    assert writer.file.files_rotated == 10


def test_a_frame_larger_than_a_file_still_gets_written(tmp_path: Path) -> None:
    writer = FileCapture(tmp_path, "vm1", max_file_bytes=4096, max_files=2)
    writer.write([frame(1, 10_000), frame(2, 10_000)], "in")
    writer.file.close()
    assert [f.data[0] for f in read_pcapng(tmp_path / "vm1.pcapng.1")] == [1]
    assert [f.data[0] for f in read_pcapng(tmp_path / "vm1.pcapng")] == [2]


def test_max_files_one_keeps_a_single_file(tmp_path: Path) -> None:
    writer = FileCapture(tmp_path, "vm1", max_file_bytes=4096, max_files=1)
    for tag in range(20):
        writer.write([frame(tag, 500)], "in")
    writer.file.close()
    assert [p.name for p in capture_files(tmp_path)] == ["vm1.pcapng"]
    assert read_pcapng(writer.file.path)[-1].data == frame(19, 500)


def test_a_capture_from_an_earlier_run_is_kept_as_the_first_old_file(tmp_path: Path) -> None:
    first = FileCapture(tmp_path, "vm1")
    first.write([frame(1)], "in")
    first.file.close()
    second = FileCapture(tmp_path, "vm1")
    second.write([frame(2)], "in")
    second.file.close()
    assert read_pcapng(tmp_path / "vm1.pcapng.1")[0].data == frame(1)
    assert read_pcapng(tmp_path / "vm1.pcapng")[0].data == frame(2)


@pytest.mark.parametrize(
    ("port_name", "stem"),
    [
        ("vm1.sock", "vm1.sock"),
        ("/run/a.sock", "_run_a.sock"),
        ("peer alice", "peer_alice"),
        ("..", "_."),
        (".hidden", "_hidden"),
        ("", "_"),
        ("pör*t\n", "p_r_t_"),
        ("x" * 300, "x" * 200),
    ],
)
def test_port_names_become_safe_file_names(port_name: str, stem: str) -> None:
    assert safe_file_name(port_name) == stem


def test_the_file_lands_in_the_directory_under_the_safe_name(tmp_path: Path) -> None:
    writer = FileCapture(tmp_path / "captures", "/run/vhostvpn/peer alice.sock")
    writer.write([frame(1)], "in")
    writer.file.close()
    assert capture_files(tmp_path / "captures") == [
        tmp_path / "captures/_run_vhostvpn_peer_alice.sock.pcapng"
    ]


def test_a_vanished_directory_disables_the_writer_without_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "captures"
    writer = FileCapture(directory, "vm1", max_file_bytes=4096, max_files=2)
    writer.write([frame(1, 1000)], "in")
    shutil.rmtree(directory)
    with caplog.at_level(logging.WARNING, logger="netstack.pcap"):
        for tag in range(10):  # rotation must open a new file in the missing directory
            writer.write([frame(tag, 1000)], "in")
    assert not writer.file.enabled
    assert "No such file or directory" in (writer.file.error or "")
    assert writer.file.frames_written + writer.file.frames_dropped == 11
    assert writer.file.frames_dropped >= 7
    assert len([r for r in caplog.records if "packet capture" in r.getMessage()]) == 1
    writer.file.close()


def test_an_unusable_directory_disables_the_writer_when_it_opens(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    writer = FileCapture(not_a_directory, "vm1")
    writer.file.open()  # the shell's first step, before any frame
    assert not writer.file.enabled
    assert "File exists" in (writer.file.error or "")
    writer.write([frame(1), frame(2)], "out")
    assert writer.file.frames_dropped == 2
    writer.file.close()


class FullDisk:
    """Stands in for the open capture file: takes `room` bytes, then fails like ENOSPC."""

    def __init__(self, real, room: int) -> None:
        self.real = real
        self.room = room

    def write(self, data: memoryview) -> int:
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        count = self.real.write(data[: self.room])
        self.room -= count
        return count

    def truncate(self, size: int) -> int:
        return self.real.truncate(size)

    def close(self) -> None:
        self.real.close()


def test_a_full_disk_disables_the_writer_and_leaves_a_readable_file(tmp_path: Path) -> None:
    writer = FileCapture(tmp_path, "vm1")
    writer.write([frame(1)], "in")
    writer.file._file = FullDisk(writer.file._file, room=150)  # the next batch is cut mid-block
    writer.write([frame(2), frame(3)], "in")
    writer.write([frame(4)], "in")
    assert not writer.file.enabled
    assert "No space left" in (writer.file.error or "")
    assert (writer.file.frames_written, writer.file.frames_dropped) == (1, 3)
    assert [f.data for f in read_pcapng(writer.file.path)] == [frame(1)]


def test_a_bad_direction_is_the_callers_bug(tmp_path: Path) -> None:
    writer = FileCapture(tmp_path, "vm1")
    with pytest.raises(ValueError, match="'in' or 'out'"):
        writer.write([frame(1)], "rx")
    writer.file.close()


def test_snaplen_beyond_wiresharks_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="262144"):
        PcapWriter(tmp_path, "vm1", snaplen=MAX_SNAPLEN + 1)
    with pytest.raises(ValueError, match="262144"):
        CaptureBuffer("vm1", snaplen=MAX_SNAPLEN + 1)


# --- a real reader -------------------------------------------------------------------------------

TSHARK = shutil.which("tshark")


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (apt-get install tshark)")
def test_tshark_reads_every_frame_with_its_fields_and_direction(tmp_path: Path) -> None:
    mac_a, mac_b = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
    arp = Ether(src=mac_a, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2")
    ping = Ether(src=mac_a, dst=mac_b) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP()
    segment = (
        Ether(src=mac_b, dst=mac_a)
        / IP(src="10.0.0.2", dst="10.0.0.1")
        / TCP(sport=80, dport=40000, flags="PA")
        / (b"y" * 1400)
    )
    tso = Ether(src=mac_b, dst=mac_a) / IP(src="10.0.0.2", dst="10.0.0.1") / TCP() / (b"z" * 65000)
    frames = [bytes(p) for p in (arp, ping, segment, tso)]
    writer = FileCapture(tmp_path, "peer alice", snaplen=2048)
    writer.write(frames[:2], "in")
    writer.write(frames[2:], "out")
    writer.file.close()

    fields = [
        "frame.len",
        "frame.cap_len",
        "eth.src",
        "ip.proto",
        "frame.packet_flags_direction",
        "frame.interface_name",
    ]
    command = [TSHARK, "-n", "-r", str(writer.file.path), "-T", "fields", "-E", "separator=|"]
    for field in fields:
        command += ["-e", field]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr  # stderr may also warn about running as root
    rows = [line.split("|") for line in result.stdout.splitlines()]
    assert rows == [
        [str(len(frames[0])), str(len(frames[0])), mac_a, "", "0x00000001", "peer alice"],
        [str(len(frames[1])), str(len(frames[1])), mac_a, "1", "0x00000001", "peer alice"],
        [str(len(frames[2])), str(len(frames[2])), mac_b, "6", "0x00000002", "peer alice"],
        [str(len(frames[3])), "2048", mac_b, "6", "0x00000002", "peer alice"],
    ]


def test_captures_are_private_to_their_owner_whatever_the_umask(tmp_path: Path) -> None:
    """Captures hold every frame's cleartext: the folder is 0700, every file 0600, rotated
    ones included, even under a permissive umask."""
    old_umask = os.umask(0)
    try:
        directory = tmp_path / "captures"
        writer = FileCapture(directory, "vm1", max_file_bytes=4096, max_files=3)
        for tag in range(10):
            writer.write([frame(tag, 1000)], "in")
        writer.file.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = capture_files(directory)
    assert len(files) == 3
    assert {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o600}
