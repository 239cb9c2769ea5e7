"""A second hub on a live one's paths: `vhostvpn hub` refuses to start (one line naming the
flag, exit status 1) when a process answers on its --socket or --control, and the first hub
keeps serving; a stale socket file left by a killed hub is replaced; at exit a hub removes
its sockets, but not a socket another process has put at the same path since."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.support.processes import answers, stop
from tunnel.control import query

pytestmark = pytest.mark.slow

START_SECONDS = 15.0


def hub(tmp_path, name: str) -> list[str]:
    return [sys.executable, "-m", "tunnel.cli", "hub", "--socket", str(tmp_path / "vm1.sock"),
            "--control", str(tmp_path / f"{name}.ctl"), "--log-level", "warning"]


def start(argv: list[str], *paths) -> subprocess.Popen:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + START_SECONDS
    while not all(answers(path) for path in paths):
        if process.poll() is not None:
            raise AssertionError(f"exited early: {process.stderr.read()}")
        assert time.monotonic() < deadline, "did not start"
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("shared", ["--socket", "--control"])
def test_a_second_hub_on_a_live_path_exits_1_and_the_first_keeps_serving(tmp_path, shared):
    first = start(hub(tmp_path, "first"), tmp_path / "vm1.sock", tmp_path / "first.ctl")
    try:
        argv = hub(tmp_path, "first" if shared == "--control" else "second")
        if shared == "--control":
            argv[argv.index("--socket") + 1] = str(tmp_path / "vm2.sock")
        second = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"vhostvpn hub: {shared} {tmp_path}")
        assert "a process is listening on it" in lines[0]
        assert first.poll() is None
        assert answers(tmp_path / "vm1.sock")
        assert query(str(tmp_path / "first.ctl"))["role"] == "hub"
    finally:
        stop(first)


def test_a_stale_socket_is_replaced_and_exit_removes_it(tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "vm1.sock"))
    stale.close()  # what a kill -9 leaves behind
    process = start(hub(tmp_path, "hub"), tmp_path / "vm1.sock", tmp_path / "hub.ctl")
    assert query(str(tmp_path / "hub.ctl"))["role"] == "hub"
    stop(process)
    assert process.returncode == 0
    assert not os.path.exists(tmp_path / "vm1.sock")
    assert not os.path.exists(tmp_path / "hub.ctl")


def test_exit_leaves_a_socket_another_process_put_at_the_path(tmp_path):
    process = start(hub(tmp_path, "hub"), tmp_path / "vm1.sock", tmp_path / "hub.ctl")
    try:
        os.unlink(tmp_path / "vm1.sock")  # someone else took the path over
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
            successor.bind(str(tmp_path / "vm1.sock"))
            successor.listen(1)
            stop(process)
            assert answers(tmp_path / "vm1.sock")
            assert not os.path.exists(tmp_path / "hub.ctl")
    finally:
        stop(process)
