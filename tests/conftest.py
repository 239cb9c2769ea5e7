"""Shared pytest configuration: the repository root on sys.path, so tests import tests.support."""

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
