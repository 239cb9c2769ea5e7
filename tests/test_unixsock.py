"""Socket paths a process listens on (virtio/unixsock.py): a live listener's path is never
taken over, a stale socket file is removed, something that is not a socket is left alone,
and at exit a process removes the path only while it is still its own socket."""

from __future__ import annotations

import socket

import pytest

from virtio.unixsock import BoundPath, SocketPathBusy, claim


def listening(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def test_a_path_a_process_listens_on_is_refused_and_kept(tmp_path):
    path = tmp_path / "live.sock"
    with listening(path) as live:
        with pytest.raises(SocketPathBusy, match="a process is listening on it"):
            claim(str(path))
        assert path.is_socket()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # still the live one's
            live.accept()[0].close()


def test_a_stale_socket_file_is_removed(tmp_path):
    path = tmp_path / "stale.sock"
    listening(path).close()  # a killed process leaves its socket file behind
    assert path.is_socket()
    claim(str(path))
    assert not path.exists()
    claim(str(path))  # nothing there: nothing to do


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(SocketPathBusy, match="is not a socket"):
        claim(str(path))
    assert path.read_text() == "mine"


def test_exit_removes_our_socket_but_not_a_successors(tmp_path):
    path = tmp_path / "s.sock"
    with listening(path):
        ours = BoundPath.after_bind(str(path))
        ours.remove()
        assert not path.exists()
    with listening(path):
        ours = BoundPath.after_bind(str(path))
        path.unlink()  # someone else took the path over
        with listening(path):
            ours.remove()
            assert path.is_socket()
