"""The guest image (vmlinuz, initramfs.gz) the lab's QEMU guests boot, and the environment
of the tooling that builds and boots it (qemu/build_image.py, qemu/run-vm.sh, found by
assets.py).  `lab up` builds the image when it is missing; `lab image` on request.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tunnel.lab import LabError, assets, say


def image_ready() -> None:
    """Build the guest image unless it is there."""
    build = assets.image_dir()
    if (build / "vmlinuz").exists() and (build / "initramfs.gz").exists():
        return
    build_image()


def build_image(force: bool = False) -> Path:
    """Build (or confirm up to date) the guest image in assets.image_dir(); return that."""
    build = assets.image_dir()
    say(f"building the guest image into {build} ({assets.build_image_script()})")
    argv = [sys.executable, str(assets.build_image_script()), *(["--force"] if force else [])]
    if subprocess.run(argv, env=tool_env()).returncode != 0:
        raise LabError("guest image build failed")
    return build


def tool_env() -> dict[str, str]:
    """The environment of run-vm.sh and build_image.py: the image folder made explicit (their
    own default, next to themselves, is right in a checkout only)."""
    return {**os.environ, "VV_BUILD_DIR": str(assets.image_dir())}
