"""Shared pytest configuration: the repository root on sys.path, so tests import tests.support;
each test's own runtime directory; the guest image for the modules that boot QEMU guests."""

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def runtime_directory(monkeypatch):
    """Each test's own folder for default control sockets (tunnel/control.py): a daemon
    started without --control in a test never meets another test's, or a real one's."""
    folder = tempfile.mkdtemp(prefix="vvrun-")  # short: unix socket paths are <= 107 bytes
    monkeypatch.setenv("RUNTIME_DIRECTORY", folder)
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def guest_image() -> None:
    """The QEMU test guest's image, built if missing or stale (tests/support/guest.py), for
    the modules that boot guests (`pytest.mark.usefixtures("guest_image")`)."""
    from tests.support.guest import ensure_image

    ensure_image()


@pytest.fixture(params=["python", "native"])
def ring_walk(request, monkeypatch) -> str:
    """Run the test over both ring walks (virtio/vring.py): the Python reference and the
    native one (virtio._ring).  Modules opt in with `pytest.mark.usefixtures("ring_walk")`;
    the native case is skipped, saying so, where virtio._ring is not built."""
    from virtio import vring

    if request.param == "native" and vring._ring is None:
        pytest.skip("virtio._ring is not built (no C compiler at install)")
    monkeypatch.setattr(vring, "NATIVE", request.param == "native")
    return request.param
