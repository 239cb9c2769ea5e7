"""The QEMU guest harness (qemu/, tests/support/guest.py) against real peers, not our backend.

DPDK testpmd's vhost PMD is the vhost-user back-end, io-forwarding port0 <-> port1, so two
guests on its two sockets share a wire; slirp (-netdev user) covers DHCP and one-shot guests.
The first tests only render command lines and boot nothing; the rest are marked slow.
A guest's reboot and its device options (no offloads) are tested on the hub, where they
also prove the hub's side: tests/test_qemu_hub.py, tests/test_qemu_netstack.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from tests.support import testpmd
from tests.support.guest import (
    RUN_VM,
    BootInfo,
    Guest,
    GuestError,
    ensure_image,
    image_available,
    iperf3_mbits,
    qemu_available,
    wait_all_booted,
)

F = TypeVar("F", bound=Callable[..., Any])

NET4 = "10.77.0"
NET6 = "fd77::"


# --- command lines (no guest booted) ---------------------------------------------------


def qemu_argv(guest: Guest, tmp_path: Path) -> list[str]:
    """What run-vm.sh would exec for `guest` (dry run, TCG, placeholder image files)."""
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initramfs.gz"
    kernel.write_bytes(b"")
    initrd.write_bytes(b"")
    argv = [*guest.argv(), "--accel", "tcg", "--kernel", str(kernel), "--initrd", str(initrd),
            "--dry-run"]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()


def option(argv: list[str], flag: str, prefix: str) -> str:
    """The value after `flag` that starts with `prefix`."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]
    matching = [v for v in values if v.startswith(prefix)]
    assert len(matching) == 1, f"{flag} {prefix}...: {values}"
    return matching[0]


def test_qemu_command_line_shares_memory_and_avoids_msix(tmp_path: Path) -> None:
    guest = Guest("ga", socket=tmp_path / "a.sock", ip="10.0.0.1/24", log_dir=tmp_path)
    argv = qemu_argv(guest, tmp_path)
    assert option(argv, "-object", "memory-backend-memfd") == (
        "memory-backend-memfd,id=mem0,size=256M,share=on")
    assert option(argv, "-numa", "node") == "node,memdev=mem0"
    assert option(argv, "-chardev", "socket") == (
        f"socket,id=chr0,path={tmp_path}/a.sock,reconnect=1")
    device = option(argv, "-device", "virtio-net-pci")
    assert ",vectors=0," in device and ",romfile=," in device and f"mac={guest.mac}" in device
    assert "-no-reboot" not in argv
    assert option(argv, "-append", "console=ttyS0").endswith("vv.name=ga vv.ip=10.0.0.1/24")


def test_device_options_come_last_and_queues_turn_on_mq(tmp_path: Path) -> None:
    guest = Guest("gm", socket=tmp_path / "m.sock", queues=2, device_opts="csum=off,packed=on",
                  log_dir=tmp_path)
    argv = qemu_argv(guest, tmp_path)
    assert option(argv, "-device", "virtio-net-pci").endswith(",mq=on,csum=off,packed=on")
    assert option(argv, "-netdev", "vhost-user").endswith(",queues=2")


def test_one_shot_command_travels_base64_and_long_ones_are_refused(tmp_path: Path) -> None:
    guest = Guest("gx", user_net=True, cmd="echo 'a b'; exit 3", stay=True, log_dir=tmp_path)
    assert guest.kernel_args() == "vv.cmd=ZWNobyAnYSBiJzsgZXhpdCAz vv.stay=1"
    with pytest.raises(ValueError, match="kernel arguments are"):
        Guest("gy", user_net=True, cmd="x" * 2000, log_dir=tmp_path).kernel_args()
    with pytest.raises(ValueError, match="exactly one of"):
        Guest("gz", log_dir=tmp_path)


def test_run_vm_refuses_unknown_options() -> None:
    proc = subprocess.run([str(RUN_VM), "--sokcet", "/x"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown option '--sokcet'" in proc.stderr


# --- real guests --------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_image() -> None:
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 not installed")
    try:
        ensure_image()
    except GuestError as exc:
        if not image_available():
            pytest.fail(f"cannot build the guest image: {exc}")


@pytest.fixture
async def switch(tmp_path: Path) -> AsyncIterator[tuple[testpmd.Testpmd, Path, Path]]:
    """testpmd as the back-end of two vhost-user sockets, forwarding between them."""
    if shutil.which("dpdk-testpmd") is None:
        pytest.skip("dpdk-testpmd not installed")
    sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
    async with testpmd.run_testpmd(testpmd.vhost_switch_config(sock_a, sock_b),
                                   log_path=tmp_path / "testpmd.log") as pmd:
        yield pmd, sock_a, sock_b


def boots_guests(test: F) -> F:
    """Slow, and needs the guest image (built once per module if missing or stale)."""
    return pytest.mark.slow(pytest.mark.usefixtures("guest_image")(test))


@asynccontextmanager
async def booted_pair(switch: tuple[testpmd.Testpmd, Path, Path], tmp_path: Path,
                      ) -> AsyncIterator[tuple[Guest, Guest, list[BootInfo]]]:
    """Guests ga and gb on the switch's two sockets, booted; their boot infos."""
    _, sock_a, sock_b = switch
    a = Guest("ga", socket=sock_a, ip=f"{NET4}.1/24", ip6=f"{NET6}1/64", log_dir=tmp_path)
    b = Guest("gb", socket=sock_b, ip=f"{NET4}.2/24", ip6=f"{NET6}2/64", log_dir=tmp_path)
    async with a, b:
        yield a, b, await wait_all_booted([a, b])


@boots_guests
async def test_two_guests_ping_and_iperf3_through_testpmd(
        switch: tuple[testpmd.Testpmd, Path, Path], tmp_path: Path) -> None:
    pmd = switch[0]
    async with booted_pair(switch, tmp_path) as (a, b, (info_a, info_b)):
        assert (info_a.ip, info_a.ip6) == (f"{NET4}.1/24", f"{NET6}1/64")
        assert info_b.fields["mac"] == b.mac
        assert info_a.fields["carrier"] == info_b.fields["carrier"] == "1"

        await a.check(f"ping -c 3 -W 5 {NET4}.2", timeout=40)
        await b.check(f"ping6 -c 2 -W 5 {NET6}1", timeout=40)

        # 1 MiB of random bytes over TCP arrives intact (busybox nc: the listener keeps its
        # stdin open, or it quits at stdin EOF; the client quits at its stdin EOF).
        await b.check("(sleep 120 | nc -l -p 5000 > /tmp/received) > /dev/null 2>&1 &")
        sent = await a.check("dd if=/dev/urandom of=/tmp/sent bs=1k count=1024 2>/dev/null;"
                             " sha256sum < /tmp/sent")
        await a.check(f"for i in $(seq 40); do nc {NET4}.2 5000 < /tmp/sent && exit 0;"
                      " sleep 0.25; done; exit 1", timeout=60)
        received = await b.check("for i in $(seq 100); do"
                                 " [ $(wc -c < /tmp/received) = 1048576 ] && break; sleep 0.1;"
                                 " done; sha256sum < /tmp/received", timeout=30)
        assert received == sent

        assert await iperf3_mbits(a, b, f"{NET4}.2") > 0

    await pmd.next_sample()
    stats_a, stats_b = pmd.stats(0), pmd.stats(1)
    assert stats_a is not None and stats_b is not None
    assert stats_a.rx_packets > 100 and stats_b.rx_packets > 100, "traffic bypassed testpmd?"


@boots_guests
async def test_console_commands_keep_exit_code_stderr_and_unterminated_lines(
        tmp_path: Path) -> None:
    async with Guest("gc", user_net=True, ip="10.0.2.15/24", log_dir=tmp_path) as g:
        await g.wait_booted()
        assert await g.run("echo out; echo err >&2; exit 7") == (7, "out\nerr")
        assert await g.run("printf no-newline") == (0, "no-newline")
        # A script longer than one console line travels in several VVDATA chunks.
        script = "cat <<'EOF' | wc -c\n" + "y" * 9000 + "\nEOF"
        assert await g.run(script) == (0, "9001")
        # Lines that are not VVRUN/VVDATA are ignored; the loop keeps working.
        await g.send_line("echo VVOUT-END bogus rc=0")
        assert await g.run("echo still-alive") == (0, "still-alive")
        with pytest.raises(GuestError, match="exited with rc=1"):
            await g.check("false")
        with pytest.raises(GuestError, match="no end of command"):
            await g.run("sleep 2", timeout=0.5)
        assert (await g.run("echo after-timeout", timeout=15))[1] == "after-timeout"


@boots_guests
async def test_one_shot_command_with_dhcp_then_power_off(tmp_path: Path) -> None:
    cmd = "ip -4 route; cat /sys/class/net/eth0/mtu; hostname"
    async with Guest("gd", user_net=True, dhcp=True, cmd=cmd, log_dir=tmp_path) as g:
        info = await g.wait_booted()
        assert info.ip == "10.0.2.15/24"  # slirp's DHCP server
        rc, output = await g.wait_cmd()
        assert rc == 0
        assert "default via 10.0.2.2" in output
        assert output.splitlines()[-1] == "gd"
        assert await g.wait_exit(30) == 0


@boots_guests
async def test_boot_failure_is_reported_with_console_tail(tmp_path: Path) -> None:
    async with Guest("gf", user_net=True, ip="not-an-address", log_dir=tmp_path) as g:
        with pytest.raises(GuestError, match=r"(?s)VV-BOOT-FAILED reason=ip.*console tail"):
            await g.wait_booted()


@boots_guests
async def test_guest_processes_are_gone_after_the_block(tmp_path: Path) -> None:
    g = Guest("gk", user_net=True, ip="10.0.2.15/24", log_dir=tmp_path)
    async with g:
        await g.wait_booted()
        pid = g.process.pid  # type: ignore[union-attr]
    assert g.process is not None and g.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert "VV-BOOTED" in g.console_log.read_text()
    with trio.fail_after(1):
        assert await g.stop() == g.process.returncode
