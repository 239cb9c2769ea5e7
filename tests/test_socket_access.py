"""Who may connect to a vhost-user socket (--socket-mode, --socket-group; virtio/unixsock.py):
the file gets exactly the asked group and mode, is never wider on the way, a path swapped
for a symlink right after bind is not followed, and bad values are refused in one line."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from virtio import unixsock
from virtio.unixsock import SocketAccess, SocketAccessError, SocketPathBusy, bind_listener

START_SECONDS = 15.0
NOBODY = 65534


def other_group() -> int:
    """A group this process does not run as (root may give a file any group)."""
    return next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in (0, os.getegid()))


@pytest.fixture
def open_dir():
    """A folder every user can traverse (pytest's tmp_path is 0700: others could not reach
    a socket in it whatever the socket's mode)."""
    path = Path(tempfile.mkdtemp(prefix="vv-access-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path)


def listener() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


@pytest.mark.parametrize("umask", [0, 0o022, 0o077])
def test_the_file_gets_exactly_the_asked_group_and_mode_whatever_the_umask(tmp_path, umask):
    gid = other_group()
    path = str(tmp_path / "vm1.sock")
    old = os.umask(umask)
    try:
        with listener() as sock:
            bind_listener(sock, path, SocketAccess(0o660, gid))
            info = os.lstat(path)
    finally:
        os.umask(old)
    assert stat.S_ISSOCK(info.st_mode)
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, gid)


def test_the_default_is_owner_only_in_the_process_group(tmp_path):
    path = str(tmp_path / "vm1.sock")
    with listener() as sock:
        bind_listener(sock, path, unixsock.OWNER_ONLY)
        info = os.lstat(path)
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o600, os.getegid())


def test_the_file_is_never_wider_than_asked_on_the_way(tmp_path, monkeypatch):
    """Each step is seen as it happens (the real chown and chmod run): at bind the file has
    the owner's bits only; group bits appear only once the file has the asked group."""
    gid = other_group()
    path = str(tmp_path / "vm1.sock")
    seen = []
    real_chown, real_chmod = os.chown, os.chmod

    def look(step):
        info = os.lstat(path)
        seen.append((step, stat.S_IMODE(info.st_mode), info.st_gid))

    def chown(target, uid, group):
        look("before chown")
        real_chown(target, uid, group)

    def chmod(target, mode):
        look("before chmod")
        real_chmod(target, mode)
        look("after chmod")

    monkeypatch.setattr(unixsock.os, "chown", chown)
    monkeypatch.setattr(unixsock.os, "chmod", chmod)
    with listener() as sock:
        bind_listener(sock, path, SocketAccess(0o640, gid))
    assert seen == [("before chown", 0o600, os.getegid()), ("before chmod", 0o600, gid),
                    ("after chmod", 0o640, gid)]


class SwappedSocket(socket.socket):
    """A real socket whose path is replaced by a symlink to `victim` right after bind: what
    someone who can write the socket's folder could do."""

    victim: Path

    def bind(self, address):
        super().bind(address)
        os.unlink(address)
        os.symlink(self.victim, address)


def test_a_symlink_swapped_in_after_bind_is_not_followed(tmp_path):
    victim = tmp_path / "libvirt-sock"  # someone else's socket, owner-only
    with listener() as other:
        other.bind(str(victim))
        victim.chmod(0o600)
        before = victim.lstat()
        with SwappedSocket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.victim = victim
            with pytest.raises(SocketPathBusy, match="replaced right after bind"):
                bind_listener(sock, str(tmp_path / "vm1.sock"),
                              SocketAccess(0o660, other_group()))
        after = victim.lstat()
    assert (after.st_mode, after.st_gid) == (before.st_mode, before.st_gid)


@pytest.mark.parametrize(("text", "mode"), [("0660", 0o660), ("660", 0o660), ("0o640", 0o640),
                                            ("0600", 0o600), ("0", 0)])
def test_an_octal_mode_is_read_as_octal(text, mode):
    assert unixsock.parse_mode(text) == mode


@pytest.mark.parametrize(("text", "message"), [
    ("0999", "want an octal mode"), ("rw", "want an octal mode"), ("", "want an octal mode"),
    ("01660", "from 0 to 0777"), ("-1", "want an octal mode"),
    ("0662", "lets every local user connect"), ("0666", "lets every local user connect"),
])
def test_a_bad_mode_is_refused(text, message):
    with pytest.raises(SocketAccessError, match=message):
        unixsock.parse_mode(text)


def test_a_group_is_found_by_name_or_number_and_an_unknown_one_refused():
    group = grp.getgrgid(other_group())
    assert unixsock.group_id(group.gr_name) == group.gr_gid
    assert unixsock.group_id(str(group.gr_gid)) == group.gr_gid
    with pytest.raises(SocketAccessError, match="no such group"):
        unixsock.group_id("vv-no-such-group")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunnel.cli", *args], capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize(("flags", "message"), [
    (["--socket-group", "vv-no-such-group"],
     "--socket-group 'vv-no-such-group': no such group on this machine"),
    (["--socket-mode", "0999"], "--socket-mode '0999': want an octal mode, e.g. 0660"),
    (["--socket-mode", "0666"], "--socket-mode '0666' lets every local user connect"),
])
@pytest.mark.parametrize("command", ["hub", "vm"])
def test_bad_socket_access_flags_exit_1_with_one_line(tmp_path, command, flags, message):
    endpoint = ["--hub", "127.0.0.1:7", "--identity", str(tmp_path),
                "--hub-fingerprint", "SHA256:" + "A" * 43] if command == "vm" else []
    result = run_cli(command, "--socket", str(tmp_path / "vm1.sock"), *endpoint, *flags)
    lines = result.stderr.splitlines()
    assert result.returncode == 1
    assert len(lines) == 1 and lines[0].startswith(f"vhostvpn {command}: {message}")
    assert not (tmp_path / "vm1.sock").exists()


def as_nobody(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run `argv` as nobody:nogroup with no other groups and no capabilities, this checkout
    on its import path."""
    root = str(Path(unixsock.__file__).resolve().parents[1])
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv], capture_output=True, text=True,
                          timeout=30, env=os.environ | {"PYTHONPATH": root}, **kw)


def nobody_runs_this_checkout() -> bool:
    """Whether tests can run this Python and import this checkout as nobody (not when they
    live under a folder only root may enter)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    return as_nobody([sys.executable, "-c", "import trio, virtio.unixsock"]).returncode == 0


@pytest.fixture(scope="module")
def nobody() -> None:
    if not nobody_runs_this_checkout():
        pytest.skip("needs root, setpriv, and this checkout and Python readable by nobody")


def connect_as(uid: int, gid: int, path: Path) -> subprocess.CompletedProcess:
    """connect() to `path` from a process running as uid:gid with no other groups."""
    script = ("import socket, sys\n"
              "s = socket.socket(socket.AF_UNIX)\n"
              "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
              "    sys.exit(e.strerror)\n")
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           sys.executable, "-c", script, str(path)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["hub", "vm"])
def test_a_socket_given_to_a_group_admits_that_group_and_no_other_user(open_dir, nobody,
                                                                       command):
    gid = other_group()
    path = open_dir / "vm1.sock"
    rest = []
    if command == "vm":  # serves its sockets before (and while) it reaches for a hub
        run_cli("keygen", str(open_dir / "id"))
        rest = ["--hub", "127.0.0.1:9", "--identity", str(open_dir / "id"),
                "--hub-fingerprint", "SHA256:" + "A" * 43]
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tunnel.cli", command, "--socket", str(path), "--socket-group",
         str(gid), "--log-level", "error", *rest],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not path.is_socket():
            assert daemon.poll() is None, daemon.stderr.read()
            assert time.monotonic() < deadline, f"{command} did not start"
            time.sleep(0.05)
        info = path.lstat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, gid)
        assert connect_as(NOBODY, gid, path).returncode == 0
        refused = connect_as(NOBODY, NOBODY if gid != NOBODY else 0, path)
        assert refused.returncode == 1 and "Permission denied" in refused.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        daemon.stderr.close()
    assert not path.exists()


@pytest.mark.parametrize("command", ["hub", "vm"])
def test_a_group_the_user_may_not_give_is_refused_at_start_in_one_line(open_dir, nobody,
                                                                     command):
    open_dir.chmod(0o777)
    rest = {"hub": ["--state-dir", str(open_dir)],
            "vm": ["--hub", "127.0.0.1:7", "--identity", str(open_dir),
                   "--hub-fingerprint", "SHA256:" + "A" * 43]}[command]
    result = as_nobody([sys.executable, "-m", "tunnel.cli", command, "--socket",
                        str(open_dir / "vm1.sock"), "--socket-group", "0", *rest])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"vhostvpn {command}: --socket-group 0: this user may not give files to that group "
        f"(run as root, with CAP_CHOWN, or as a member of the group)"]
    assert not (open_dir / "vm1.sock").exists()


def test_root_may_give_any_group_and_everyone_their_own():
    assert unixsock.may_give_group(os.getegid())
    assert unixsock.may_give_group(other_group()) == (os.geteuid() == 0)


def test_bind_refused_a_group_removes_its_file_and_says_why(open_dir, nobody):
    open_dir.chmod(0o777)
    path = open_dir / "vm1.sock"
    script = ("import socket, sys\n"
              "from virtio.unixsock import SocketAccess, bind_listener\n"
              "sock = socket.socket(socket.AF_UNIX)\n"
              "try:\n    bind_listener(sock, sys.argv[1], SocketAccess(0o660, 0))\n"
              "except OSError as e:\n    sys.exit(str(e))\n")
    result = as_nobody([sys.executable, "-c", script, str(path)])
    assert result.returncode == 1
    assert "cannot give it group 0 and mode 0660: Operation not permitted" in result.stderr
    assert not path.exists()
